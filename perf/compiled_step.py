"""Time one compiled ResNet-style training step (forward, backward, SGD) with torch's
BatchNorm and with tritonbn's (tritonbn.convert), both under torch.compile (issue 7).

Each model is compiled with fullgraph=True, warmed up (compiles and Triton JITs
happen there), then timed with triton.testing.do_bench: medians, L2 cleared
before each step. Both start from the same weights; the first step's losses are
compared, so a wrong result is not timed as a fast one. Writes one JSON file.

Usage: python perf/compiled_step.py --out step.json [--batch 64 --size 56 --width 64]
       python perf/compiled_step.py --device cpu --backend aot_eager --out x.json
         (TRITON_INTERPRET=1: a smoke run of the script, not performance)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys

import torch


def _model(width, device, fmt):
    from tritonbn.demo import res_net

    return res_net(width).to(device).to(memory_format=fmt)


def _step_fn(model, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        return loss

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=56, help="input height and width")
    p.add_argument("--width", type=int, default=64, help="channels of the first stage")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"),
                   help="autocast dtype (float32: no autocast)")
    p.add_argument("--rep-ms", type=int, default=200)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("compiled_step: no CUDA device", file=sys.stderr)
        return 2
    import triton
    import triton.testing

    import tritonbn

    dev = torch.device(args.device)
    fmt = torch.channels_last
    torch.manual_seed(0)
    ref = _model(args.width, dev, fmt)
    models = {"torch": ref, "tritonbn": tritonbn.convert(copy.deepcopy(ref))}
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).to(memory_format=fmt)
    target = torch.randint(0, 10, (args.batch,), device=dev)
    amp = args.dtype != "float32"
    records, losses = [], {}
    for name, model in models.items():
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=args.backend)
        step = _step_fn(compiled, x, target)
        with torch.autocast(dev.type, dtype=getattr(torch, args.dtype), enabled=amp):
            losses[name] = step().item()  # compiles; the first step's loss
            if args.device == "cuda":
                for _ in range(2):
                    step()
                ms = triton.testing.do_bench(step, rep=args.rep_ms, return_mode="median")
            else:
                ms = None  # the interpreter says nothing about speed
        records.append({"impl": name, "median_ms": ms, "first_loss": losses[name]})
        print(f"{name:9} first loss {losses[name]:.6f}  step "
              f"{'-' if ms is None else f'{ms:.3f} ms'}", flush=True)
    same = abs(losses["torch"] - losses["tritonbn"]) <= 1e-2 * max(1.0, abs(losses["torch"]))
    doc = {"what": "compiled ResNet-style training step: forward, backward, SGD",
           "device": torch.cuda.get_device_name(dev) if args.device == "cuda" else "cpu",
           "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.date.today().isoformat(), "backend": args.backend,
           "shape": [args.batch, 3, args.size, args.size], "width": args.width,
           "dtype": args.dtype, "memory_format": "channels_last",
           "losses_match": same, "records": records}
    if all(r["median_ms"] for r in records):
        doc["tritonbn_speedup"] = records[0]["median_ms"] / records[1]["median_ms"]
        print(f"tritonbn: {doc['tritonbn_speedup']:.2f}x torch BatchNorm, both compiled")
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
