"""7×7 NCHW, the choices made without a GPU (perf/NOTES.md, "7×7 NCHW: 8 warps and flat
tiles"): each tile kernel of a bn_relu training step alone, at ResNet-50's 7×7
layers in fp16 NCHW, on the heuristic's tile with 4 and with 8 warps, and normalize
and dx with flat tiles on and off. The sm_90 compile chose 8 warps and flat tiles by
registers and load width; the first lease's dataset had 8 warps slower at batch 32
(dx 21 -> 48 µs, 2-D tiles, one sample). This measures what to keep.

Per (shape, kernel, warps, flat): the median ms of triton.testing.do_bench (L2
flushed before each run) and GB/s by the byte model (stats E·s, normalize 2·E·s,
bwd_reduce 2·E·s, dx 3·E·s). The most telling cases first (batch 32, dx), and the
JSON is rewritten after each record, so a run cut at its limit keeps what it measured.

Usage: python perf/short_rows.py --out short_rows.json [--shapes "32,2048,7,7;256,512,7,7"]
       TRITON_INTERPRET=1 python perf/short_rows.py --device cpu --out x.json
         (a tiny shape: a smoke run of the script, not performance)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

GPU_SHAPES = "32,2048,7,7;256,512,7,7"
CPU_SHAPES = "2,16,7,7"
KERNELS = ("dx", "normalize", "bwd_reduce", "stats")
BYTES = {"stats": 1, "normalize": 2, "bwd_reduce": 2, "dx": 3}  # x E·s per kernel
INTERPRETER = "interpreter, not performance"


def _time_ms(fn, device) -> float:
    """do_bench's median on a GPU (the tuner's timer); one timed call on the CPU."""
    if device.type == "cuda":
        from tritonbn.tuning.tuner import do_bench_ms

        return do_bench_ms(fn, warmup_ms=5, rep_ms=20)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def cases(shape, device):
    """(kernel, run) of one bn_relu training step's tile kernels over an fp16 NCHW x of
    shape, each launched alone (ops' one-kernel helpers)."""
    from tritonbn import ops

    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = (torch.randn(shape, generator=g) * 2 + 1).to(device, dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    C = shape[1]
    w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    xk, v = ops.kernel_view(x)
    mean, s = ops.batch_stats(xk, v, rm, rv, None, 0.1, 1e-5)
    sums = ops.grad_sums(dy, xk, v, mean, s, w, b, True, 1e-5, "relu", True, True)[0]
    return xk, v, {
        "stats": lambda: ops.stats_partials(xk, v),
        "normalize": lambda: ops.normalize(xk, v, mean, s, w, b, True, 1e-5, "relu"),
        "bwd_reduce": lambda: ops.grad_partials(dy, xk, v, mean, s, w, b, True, 1e-5, "relu"),
        "dx": lambda: ops.grad_input(dy, xk, v, mean, s, w, b, sums, True, 1e-5, "relu"),
    }


def measure(shapes, device, out=None, doc=None) -> dict:
    from tritonbn import heuristics, ops

    doc = doc if doc is not None else {"records": []}
    for shape in shapes:
        xk, v, runs = cases(shape, device)
        E = xk.numel() * xk.element_size()
        for kernel in KERNELS:
            base = heuristics.heuristic(kernel, v, xk.element_size(), xk.device,
                                        ops.interpreting())
            flats = (True, False) if kernel in ("normalize", "dx") else (True,)
            for warps in (8, 4):
                for flat in flats:
                    cfg = dataclasses.replace(base, num_warps=warps)
                    with ops.launch_overrides(flat=flat, **{kernel: cfg}):
                        runs[kernel]()  # compile outside the timing
                        ms = _time_ms(runs[kernel], device)
                        flat_ran = kernel in ("normalize", "dx") and ops.flat_tiles(
                            v, cfg, xk.element_size())
                    doc["records"].append({
                        "shape": list(shape), "kernel": kernel, "warps": warps,
                        "flat": flat_ran, "heuristic": dataclasses.asdict(base), "ms": ms,
                        "gbps": BYTES[kernel] * E / (ms * 1e6) if ms > 0 else None})
                    print(f"{'x'.join(map(str, shape)):>12} {kernel:10} warps={warps} "
                          f"flat={flat_ran!s:5} {ms * 1e3:9.1f} µs", flush=True)
                    if out:
                        with open(out, "w") as f:
                            json.dump(doc, f, indent=1)
    return doc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", default=None, help=f'"N,C,H,W;..." (GPU default "{GPU_SHAPES}")')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("short_rows: no CUDA device", file=sys.stderr)
        return 2
    from tritonbn import ops

    if device.type == "cpu" and not ops.interpreting():
        print("short_rows: --device cpu needs TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    shapes = [tuple(int(n) for n in s.split(",")) for s in
              (args.shapes or (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)).split(";")]
    doc = {"kind": "short_rows", "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else INTERPRETER, "torch": torch.__version__,
           "records": []}
    measure(shapes, device, args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
