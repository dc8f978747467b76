"""GPU correctness check at realistic shapes (issue 2): tritonbn vs torch, every element written.

For each (shape, layout, dtype), without and with a residual: one training step of
tritonbn.BatchNorm (relu; relu(bn(x) + z) with the residual, which also writes and
reads the 1-bit mask) against torch.nn.BatchNorm + relu run in float32 on the same
data, with every buffer tritonbn allocates poisoned first (NaN; the mask 0xA5).
Each on both paths (ops.launch_overrides(path=...)): the split kernels, and the
single-program ones where the tile fits (the small shapes; the split path
elsewhere, as the record's "path" says). Writes a JSON record.
Usage: python perf/check_realistic.py --out results.json [--small] [--dtypes float16,float32]
                                      [--paths split,fused]
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys

import torch
from torch import nn

import tritonbn
from tritonbn import ops
from tritonbn.perf.bench import bn_class
from tritonbn.testing import poisoned_allocations

SHAPES = [((32, 256, 56, 56), "channels_last"), ((256, 64, 112, 112), "nchw"),
          ((20, 6, 65536), "ncl")]
SMALL = [((4, 24, 10, 10), "channels_last"), ((4, 6, 12, 12), "nchw"), ((3, 6, 300), "ncl")]


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def check(shape, layout, dtype, residual=False):
    C = shape[1]
    cls, ref_cls = bn_class(len(shape), tritonbn), bn_class(len(shape), nn)
    ours, ref = cls(C, activation="relu").cuda(), ref_cls(C).cuda()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(shape, device="cuda") * 2 + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x = x.to(dtype).requires_grad_()
    z = (torch.randn_like(x) - 0.5).requires_grad_() if residual else None
    dy = torch.randn_like(x)
    xr = x.detach().float().requires_grad_()
    zr = z.detach().float().requires_grad_() if residual else None
    y = ours(x, z)
    y.backward(dy)
    yr = torch.relu(ref(xr) + zr) if residual else torch.relu(ref(xr))
    yr.backward(dy.float())
    torch.cuda.synchronize()
    outs = {"y": y, "dx": x.grad, "dweight": ours.weight.grad, "dbias": ours.bias.grad,
            "running_mean": ours.running_mean, "running_var": ours.running_var}
    errs = {"dz": _err(z.grad, zr.grad)} if residual else {}
    if residual:
        outs["dz"] = z.grad
    return {
        "shape": list(shape), "layout": layout, "dtype": str(dtype).replace("torch.", ""),
        "residual": residual,
        "max_abs_err": {**errs, "y": _err(y, yr), "dx": _err(x.grad, xr.grad),
                        "dweight": _err(ours.weight.grad, ref.weight.grad),
                        "dbias": _err(ours.bias.grad, ref.bias.grad),
                        "running_mean": _err(ours.running_mean, ref.running_mean),
                        "running_var": _err(ours.running_var, ref.running_var)},
        "all_written": all(not torch.isnan(t).any().item() for t in outs.values()),
        "memory_format_kept": y.stride() == x.stride(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--small", action="store_true", help="tiny shapes (for compute-sanitizer)")
    p.add_argument("--dtypes", default="float16,bfloat16,float32",
                   help="comma-separated (default float16,bfloat16,float32)")
    p.add_argument("--paths", default="split,fused", help="comma-separated (default both)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_realistic: no CUDA device", file=sys.stderr)
        return 2
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    records = []
    for shape, layout in (SMALL if args.small else SHAPES):
        for dtype, residual, path in itertools.product(dtypes, (False, True),
                                                       args.paths.split(",")):
            # every buffer tritonbn allocates starts poisoned
            with poisoned_allocations(), ops.launch_overrides(path=path):
                r = check(shape, layout, dtype, residual)
                x = torch.empty(shape, device="cuda")
                r["path"] = ops.path_of(x.to(memory_format=torch.channels_last)
                                        if layout == "channels_last" else x)
            print(json.dumps(r), flush=True)
            records.append(r)
            torch.cuda.empty_cache()
    import triton

    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "date": datetime.date.today().isoformat(),
           "records": records}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    return 0 if all(r["all_written"] and r["memory_format_kept"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
