"""``tritonbn tune``: tune every kernel's launch config for a set of shapes on this GPU.

For each (shape, layout, dtype) it tunes the shape's buckets that the cache does
not hold yet (all of them with --retune), prints a table per bucket (the chosen
config against the heuristic default, each timed with do_bench medians) and
saves the configs to the tuning cache after every shape, so an interrupted run
keeps what it measured. --export writes this GPU's configs in the format shipped
in tritonbn/configs/.
"""
from __future__ import annotations

import json
import math
import sys
import time
from functools import partial
from pathlib import Path

from ..arguments import csv_choices
from ..heuristics import PASS_KERNELS

LAYOUTS = ("channels_last", "nchw")
PASSES = PASS_KERNELS
DTYPES = ("float16", "bfloat16", "float32")


def parse_shapes(text: str) -> list[tuple]:
    """Set names (comma-separated) or explicit shapes 'N,C,H,W;N,C,H,W'."""
    from ..perf import shapes as sets

    text = text.strip()
    if text[:1].isdigit():
        out = []
        for part in filter(None, (p.strip() for p in text.split(";"))):
            try:
                shape = tuple(int(d) for d in part.split(","))
            except ValueError:
                raise ValueError(f"{part!r}: a shape is comma-separated integers, e.g. 32,64,56,56")
            if len(shape) < 2 or len(shape) > 5 or min(shape) < 1:
                raise ValueError(f"{part!r}: a BatchNorm input has 2 to 5 positive dims (N, C, ...)")
            out.append(shape)
        return out
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = sets.SET_NAMES + sets.SUBSETS + ("all",)
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ValueError(f"{','.join(bad) or repr(text)}: choose from {', '.join(known)}, "
                         "or give shapes as 'N,C,H,W;N,C,H,W'")
    return list(dict.fromkeys(c.shape for n in names for c in sets.cases(n)))


def _shapes_arg(text):
    import argparse

    try:
        return parse_shapes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def add_parser(sub):
    p = sub.add_parser(
        "tune", help="tune launch configs on this GPU and save them to the tuning cache",
        description=__doc__.split("\n\n")[0] + " Configs are kept per shape bucket (kernel, "
                    "dtype, tiling, C, reduced extent rounded up to a power of two), in "
                    "$TRITONBN_CACHE_DIR or ~/.cache/tritonbn. Needs a CUDA GPU.")
    p.add_argument("--shapes", type=_shapes_arg, default=_shapes_arg("resnet50"),
                   help="quick, resnet50, resnet50/b256, resnet50/b32, stress, all "
                        "(comma-separated), or shapes 'N,C,H,W;N,C,H,W' (default resnet50)")
    p.add_argument("--dtype", type=csv_choices(DTYPES), default=("float16", "bfloat16"),
                   help="default float16,bfloat16")
    p.add_argument("--layout", type=csv_choices(LAYOUTS), default=LAYOUTS,
                   help="for 4-D and 5-D shapes (2-D and 3-D inputs have one layout); default both")
    p.add_argument("--passes", type=csv_choices(tuple(PASSES)), default=tuple(PASSES),
                   help="fwd (stats, combine, normalize), bwd (reduce, combine, dx); default both")
    p.add_argument("--activation", choices=("relu", "leaky_relu", "silu", "gelu", "gelu_tanh",
                                            "relu6", "hardswish", "hardsigmoid", "mish", "elu",
                                            "none"),
                   default="relu",
                   help="the activation timed (default relu); configs serve every activation")
    p.add_argument("--retune", action="store_true", help="tune buckets the cache already holds")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new shape after this many seconds")
    p.add_argument("--export", metavar="PATH",
                   help="also write this GPU's tuned configs to PATH (the tritonbn/configs/ format)")
    p.add_argument("--warmup-ms", type=float, default=5.0, help="do_bench warm-up per candidate")
    p.add_argument("--rep-ms", type=float, default=25.0, help="do_bench repetition time per candidate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _cfg(cfg) -> str:
    import dataclasses

    return " ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))


def table(results, shape) -> str:
    """The per-bucket table: chosen config, its time and the heuristic's."""
    group = results[0].bucket.split("|", 1)[1]
    lines = [f"bucket {group}   (tuned on {'x'.join(map(str, shape))})",
             f"  {'kernel':<14}{'config':<62}{'tuned ms':>10}{'heur. ms':>10}{'gain':>7}"
             f"{'tried':>7}{'rejected':>9}"]
    for r in results:
        lines.append(f"  {r.kernel:<14}{_cfg(r.config):<62}{r.ms:>10.4f}{r.default_ms:>10.4f}"
                     f"{r.speedup:>6.2f}x{r.tried:>7}{len(r.rejected):>9}")
    return "\n".join(lines)


def cases(args) -> list[tuple]:
    """(shape, layout, dtype) to tune; 2-D and 3-D shapes once, as they come."""
    out = []
    for shape in args.shapes:
        layouts = args.layout if len(shape) >= 4 else ("nchw",)
        for layout in layouts:
            for dtype in args.dtype:
                out.append((shape, layout, dtype))
    return list(dict.fromkeys(out))


def run(args) -> int:
    import torch

    from .. import ops
    from .tuner import do_bench_ms

    if not torch.cuda.is_available() or ops.interpreting():
        why = ("TRITON_INTERPRET is set, so kernels would be interpreted, not compiled"
               if ops.interpreting() else "no CUDA device (torch.cuda.is_available() is False)")
        print(f"tritonbn tune: tuning needs a CUDA GPU: {why}. Nothing was tuned; launches use "
              "the shipped or heuristic configs.", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    timer = partial(do_bench_ms, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    return tune_cases(args, device, torch.cuda.get_device_name(device), timer)


def tune_cases(args, device, gpu: str, timer, interpret: bool = False, limit=None) -> int:
    """The body of `tritonbn tune` on a device (tests drive it through the interpreter
    with a fake timer)."""
    import torch
    from tqdm import tqdm

    from .. import ops
    from ..layout import kernel_view
    from ..perf.bench import DTYPES as TORCH_DTYPES
    from ..perf.bench import make_data
    from . import bucket, store
    from .cache import save
    from .tuner import tune

    s = store(gpu)
    kernels = tuple(k for p in args.passes for k in PASSES[p])
    activation = None if args.activation == "none" else args.activation
    todo = cases(args)
    print(f"tritonbn tune: {len(todo)} shape x layout x dtype on {gpu}; cache {s.path}")
    t0, tuned, failed, gains = time.perf_counter(), set(), 0, []
    bar = tqdm(todo, unit="shape", disable=args.no_progress, file=sys.stderr)
    for shape, layout, dtype in bar:
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            tqdm.write(f"budget of {args.budget_s:g} s spent: {len(todo) - bar.n} shapes left untuned")
            break
        bar.set_postfix_str(f"{'x'.join(map(str, shape))} {layout} {dtype}")
        try:
            x, dy, weight, bias = make_data(shape, "channels_last" if layout == "channels_last"
                                            else "NCHW", TORCH_DTYPES[dtype], device, args.seed)
            x, v = kernel_view(x.detach())
            keys = {k: bucket(k, x.dtype, v) for k in kernels}
            missing = [k for k in kernels if keys[k] not in tuned
                       and (args.retune or s.tuned(keys[k]) is None)]
            if not missing:
                continue
            fixed = {k: s.get(keys[k]) for k in kernels if k not in missing and s.get(keys[k])}
            results = tune(missing, x, v, weight=weight, bias=bias, activation=activation,
                           dy=ops.like(dy, x), timer=timer, fixed=fixed, interpret=interpret,
                           limit=limit)
            s.put({r.bucket: (r.config, {"ms": r.ms, "heuristic_ms": r.default_ms})
                   for r in results})
            tuned.update(r.bucket for r in results)
            gains += [r.speedup for r in results]
            if results:
                tqdm.write(table(results, shape))
        except Exception as e:  # noqa: BLE001 - one shape failing (e.g. out of memory) must not end the run
            failed += 1
            tqdm.write(f"{'x'.join(map(str, shape))} {layout} {dtype}: {type(e).__name__}: {e}"[:400])
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    geo = math.exp(sum(map(math.log, gains)) / len(gains)) if gains else float("nan")
    print(f"tuned {len(tuned)} buckets in {time.perf_counter() - t0:.0f} s; geomean gain over "
          f"the heuristic {geo:.3f}x (per kernel, as timed); configs saved to {s.path}")
    if args.export:
        configs = json.loads(s.path.read_text())["configs"] if s.path.exists() else {}
        save(Path(args.export), gpu, configs, check_versions=False)
        print(f"exported {len(configs)} configs to {args.export}")
    if failed:
        print(f"tritonbn tune: {failed} shapes failed (see above)", file=sys.stderr)
        return 1
    return 0
