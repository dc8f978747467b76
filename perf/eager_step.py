"""Host time per layer: a stack of BN+ReLU layers trained eagerly against the same
step replayed from a CUDA graph, tritonbn against torch.

Each implementation is a stack of `--layers` BN+ReLU layers (tritonbn:
BatchNorm2d(C, activation="relu"); torch: nn.BatchNorm2d(C) then nn.ReLU()) with
float32 parameters, fed a half-precision channels_last input, as under autocast.
A training step is the forward through the stack and the backward of a fixed
random dy into the input (which requires grad) and every parameter. Grads are set
to None before each step, as `zero_grad(set_to_none=True)` does: the captured
step then allocates its grads from the graph's pool and each replay writes them
afresh, the same work as an eager step, where accumulating would add one kernel
per parameter that a graph replay must also run (torch's CUDA-graph docs capture
whole-network training the same way).

Per (implementation, shape): eager ms/step (host clock over `--steps` steps,
synchronized at the end, median of `--repeats`), the same step captured in a
torch.cuda.CUDAGraph (warmed up on a side stream first) and timed the same way,
host µs per layer = (eager - graph) / layers (clamped at 0; the raw difference is
kept), and the GPU operations one step launches (torch.profiler). A capture that
fails is recorded and the run goes on; after replay the graph's output and grads
are checked against an eager step's. When the GPU, not the host, bounds the eager
step (large shapes), eager ≈ graph and the difference says nothing about host time.
On a GPU the JSON also holds `launch_host` (launch_host_us): the host µs of one
launch through tritonbn's fast launch against the compiled kernel's launcher alone.

Usage: python perf/eager_step.py --out eager.json [--shapes "32,256,14,14;256,64,56,56"]
       TRITON_INTERPRET=1 python perf/eager_step.py --device cpu --out x.json
         (tiny shape, 3 layers, no graph: a smoke run of the script, not performance)
Exit status: 0, 1 if a step failed or a graph's results differ from eager, 2 if
the device asked for is not there.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch import nn

IMPLS = ("tritonbn", "torch")
GPU_SHAPES = "32,256,14,14;256,64,56,56"  # ResNet-50 layers at batch 32 and 256
CPU_SHAPES = "2,8,4,4"
INTERPRETER = "interpreter, not performance"


def build(impl: str, C: int, layers: int, device) -> nn.Module:
    """The BN+ReLU stack of one implementation, float32 parameters."""
    if impl == "tritonbn":
        import tritonbn

        blocks = [tritonbn.BatchNorm2d(C, activation="relu") for _ in range(layers)]
    else:
        blocks = [nn.Sequential(nn.BatchNorm2d(C), nn.ReLU()) for _ in range(layers)]
    return nn.Sequential(*blocks).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, steps: int, repeats: int, device) -> float:
    """Median over repeats of host wall time per call of fn, synchronized at the end
    of each batch of `steps` calls (so queued GPU work is counted once)."""
    per_step = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        per_step.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(per_step)


def count_launches(fn) -> tuple[int, dict]:
    """GPU operations (kernels, memsets, copies) one call of fn runs, by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names: dict[str, int] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            key = e.name[:80]
            names[key] = names.get(key, 0) + 1
    return sum(names.values()), names


def results(model, x) -> list[torch.Tensor]:
    """What a step produces that the graph check compares: the input's and every
    parameter's grad (the output is checked separately)."""
    return [x.grad] + [p.grad for p in model.parameters()]


def graph_step(model, x, dy, step, steps, repeats, warmup) -> dict:
    """Capture one training step in a CUDA graph, time its replays and check them
    against an eager step. Never raises: an error is returned in the record."""
    rec = {"graph_ms": None, "graph_error": None, "graph_matches_eager": None}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture's stream, as torch's docs do
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        model.zero_grad(set_to_none=True)
        x.grad = None
        with torch.cuda.graph(graph):
            y = model(x)
            y.backward(dy)
        graph.replay()
        rec["graph_ms"] = time_ms(graph.replay, steps, repeats, x.device)
        graph.replay()
        torch.cuda.synchronize()
        replayed = [t.clone() for t in [y] + results(model, x)]
        eager = [step()] + results(model, x)
        diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(replayed, eager)]
        rec["graph_max_abs_diff"] = max(diffs)
        for a, b in zip(replayed, eager):
            if b.dtype == torch.float32:  # grads of parameters: sums over the batch
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
            else:
                torch.testing.assert_close(a, b)
        rec["graph_matches_eager"] = True
    except AssertionError as e:
        rec["graph_matches_eager"] = False
        rec["graph_error"] = str(e)[:500]
    except Exception as e:  # noqa: BLE001 - a failed capture is a result, not a crash
        rec["graph_error"] = f"{type(e).__name__}: {e}"[:500]
    return rec


def measure(impl, shape, args, device) -> dict:
    """One record: eager and graph ms/step, host µs per layer, launches per step."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = build(impl, shape[1], args.layers, device)
    x = (torch.randn(shape, device=device) * 2 + 1).to(memory_format=torch.channels_last)
    x = x.to(dtype).requires_grad_()
    dy = torch.randn_like(x)

    def step():
        model.zero_grad(set_to_none=True)
        x.grad = None
        y = model(x)
        y.backward(dy)
        return y

    rec = {"impl": impl, "shape": list(shape), "layers": args.layers}
    for _ in range(args.warmup):  # compiles the Triton kernels
        step()
    rec["eager_ms"] = time_ms(step, args.steps, args.repeats, device)
    if device.type == "cuda":
        rec.update(graph_step(model, x, dy, step, args.steps, args.repeats, args.warmup))
        if rec["graph_ms"] is not None:
            diff_us = (rec["eager_ms"] - rec["graph_ms"]) * 1e3 / args.layers
            rec["host_us_per_layer"] = max(0.0, diff_us)
            rec["host_us_per_layer_raw"] = diff_us
        try:  # after the capture, so the profiler's CUPTI session cannot disturb it
            rec["launches_per_step"], rec["launches"] = count_launches(step)
        except Exception as e:  # noqa: BLE001 - no profiler (CUPTI): the timings still stand
            rec["launches_error"] = f"{type(e).__name__}: {e}"[:500]
    return rec


def launch_host_us(device, calls: int = 1000) -> list[dict]:
    """Host µs per launch of a small tritonbn BN+ReLU training step's kernels
    (2x64x4x4 float16 channels_last: the single-program path, a launch each way),
    each launch timed `calls` times three ways: through ops._go (tritonbn's fast
    launch), through the compiled kernel's launcher alone (Triton's own cost), and
    _go's specialization key alone (ops._spec, every pointer's dtype and alignment).
    go - launcher is what tritonbn adds to a launch (issue 14). Only launches whose
    compiled kernel was kept are timed: none under the interpreter."""
    import tritonbn
    from tritonbn import ops

    bn = tritonbn.BatchNorm2d(64, activation="relu").to(device)
    x = torch.randn(2, 64, 4, 4, device=device, dtype=torch.float16)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    for _ in range(3):  # compiles; the later launches keep their kernels
        bn(x).float().sum().backward()
    seen, real = [], ops._go

    def spy(fn, launch, compiled, name, *ptrs):
        seen.append((fn, launch, compiled, name, ptrs))
        return real(fn, launch, compiled, name, *ptrs)

    ops._go = spy
    try:
        bn(x).float().sum().backward()
    finally:
        ops._go = real
    records = []
    for fn, launch, compiled, name, ptrs in seen:
        hit = compiled.get(name)
        if hit is None:
            continue
        k, (grid, args, _) = hit[1], launch
        dev, stream = ops._device_stream()
        g = (*grid, 1, 1)[:3]
        ways = {"go_us": lambda: real(fn, launch, compiled, name, *ptrs),
                "launcher_us": lambda: k.run(*g, stream, k.function, k.packed_metadata,
                                             None, None, None, *ptrs, *args),
                "spec_us": lambda: ops._spec(ptrs, dev)}
        rec = {"kernel": getattr(fn, "__name__", type(fn).__name__), "pointers": len(ptrs),
               "scalars": len(args), "calls": calls}
        for key, way in ways.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                way()
            sync(device)
            rec[key] = (time.perf_counter() - t0) / calls * 1e6
        records.append(rec)
    return records


def environment(device) -> dict:
    import datetime
    import platform

    import triton

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--shapes", help=f"N,C,H,W;... (default {GPU_SHAPES}; cpu: {CPU_SHAPES})")
    p.add_argument("--layers", type=int, help="BN+ReLU layers in the stack (default 20; cpu: 3)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--steps", type=int, help="steps per timed batch (default 10; cpu: 2)")
    p.add_argument("--repeats", type=int, help="timed batches, median taken (default 5; cpu: 1)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--impls", default=",".join(IMPLS))
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    if cpu:
        from tritonbn.ops import interpreting

        if not interpreting():
            print("eager_step --device cpu: set TRITON_INTERPRET=1 (before triton is imported) "
                  "so tritonbn's kernels run through the interpreter", file=sys.stderr)
            return 2
    elif not torch.cuda.is_available():
        print("eager_step: no CUDA device (--device cpu runs the interpreter smoke test)",
              file=sys.stderr)
        return 2
    args.layers = args.layers or (3 if cpu else 20)
    args.steps = args.steps or (2 if cpu else 10)
    args.repeats = args.repeats or (1 if cpu else 5)
    if cpu:
        args.warmup = min(args.warmup, 1)
    shapes = [tuple(int(d) for d in s.split(",")) for s in
              (args.shapes or (CPU_SHAPES if cpu else GPU_SHAPES)).split(";")]
    device = torch.device(args.device)
    records = []
    for shape in shapes:
        for impl in args.impls.split(","):
            try:
                rec = measure(impl, shape, args, device)
            except Exception as e:  # noqa: BLE001 - record it; the other cases still run
                rec = {"impl": impl, "shape": list(shape), "layers": args.layers,
                       "error": f"{type(e).__name__}: {e}"[:500]}
            records.append(rec)
            print(f"{impl:9} {'x'.join(map(str, shape)):>14}  eager {_fmt(rec.get('eager_ms'), '.3f')} ms"
                  f"  graph {_fmt(rec.get('graph_ms'), '.3f')} ms"
                  f"  host/layer {_fmt(rec.get('host_us_per_layer_raw'), '.1f')} µs"
                  f"  launches {_fmt(rec.get('launches_per_step'), 'd')}"
                  f"  graph==eager {rec.get('graph_matches_eager')}"
                  + (f"  ERROR {rec.get('error') or rec.get('graph_error')}"
                     if rec.get("error") or rec.get("graph_error") else ""), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    doc = {"what": "BN+ReLU stack training step: eager vs CUDA graph replay, host time per layer",
           "mode": INTERPRETER if cpu else "gpu", "environment": environment(device),
           "dtype": args.dtype, "param_dtype": "float32", "memory_format": "channels_last",
           "layers": args.layers, "steps": args.steps, "repeats": args.repeats,
           "grads": "set to None before each step (zero_grad(set_to_none=True))",
           "records": records}
    if device.type == "cuda":
        try:
            doc["launch_host"] = launch_host_us(device)
            for r in doc["launch_host"]:
                print(f"launch {r['kernel']:24} _go {r['go_us']:.1f} µs  launcher alone "
                      f"{r['launcher_us']:.1f} µs  _spec {r['spec_us']:.1f} µs", flush=True)
        except Exception as e:  # noqa: BLE001 - the stack's timings still stand
            doc["launch_host_error"] = f"{type(e).__name__}: {e}"[:500]
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    bad = [r for r in records if "error" in r or (not cpu and r.get("graph_matches_eager") is not True)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
