"""The ``tritonbn`` command: demo, bench, report, tune."""
from __future__ import annotations

import argparse
import os
import sys

from .arguments import csv_choices


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no")


def _use_interpreter_without_gpu() -> str:
    """Pick where kernels run, before triton is imported: the GPU, else the interpreter."""
    import torch

    if torch.cuda.is_available() and not _interpret_env():
        return "cuda"
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"


def _pick_backend_early(argv) -> None:
    """Set TRITON_INTERPRET for the commands that run kernels on the CPU, before
    anything imports triton: its language helpers are made once, at import, for
    the mode the environment names then (building the tune parser imports triton)."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "demo":
        _use_interpreter_without_gpu()
    elif command == "bench":
        early = argparse.ArgumentParser(add_help=False)
        early.add_argument("--device", default="cuda")
        early.add_argument("--host", action="store_true")
        known = early.parse_known_args(argv[argv.index("bench") + 1:])[0]
        if known.device == "cpu" or known.host:  # --host stubs the interpreter's launcher
            os.environ["TRITON_INTERPRET"] = "1"


def _add_bench(sub):
    from .perf import model, schema, shapes
    from .perf.bench import COMPILE_MODES, DEFAULT_OPS, DTYPES, OPS, TIMINGS, Options

    p = sub.add_parser("bench", help="time tritonbn against torch (cuDNN/native) and torch.compile",
                       description="Time BatchNorm passes of tritonbn, torch eager and torch.compile "
                                   "against the device's copy bandwidth; write JSON results.")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default): real timings. cpu: tiny shapes through Triton's "
                        "interpreter to exercise the pipeline; the results are marked "
                        "'interpreter, not performance'")
    p.add_argument("--host", action="store_true",
                   help="time tritonbn's host work per call (every Triton launch stubbed) "
                        "against torch's BatchNorm on a tiny CPU tensor, side by side; prints "
                        "the ratios and writes them to --out if given (`tritonbn report` "
                        "renders that file). Any machine; the other options do not apply")
    p.add_argument("--shapes", type=csv_choices(shapes.SET_NAMES + shapes.SUBSETS + ("all",)),
                   default=("quick",), help="shape sets: quick, resnet50 (batch 256 and 32), "
                                            "resnet50/b256, resnet50/b32, stress, paths (where "
                                            "the split and single-program paths both apply), "
                                            "all (default quick)")
    p.add_argument("--dtypes", type=csv_choices(tuple(DTYPES)), default=tuple(DTYPES))
    p.add_argument("--layouts", type=csv_choices(("NCHW", "channels_last")), default=("NCHW", "channels_last"),
                   help="for 4-D shapes (2-D and 3-D inputs have one layout)")
    p.add_argument("--ops", type=csv_choices(OPS + ("all",)), default=DEFAULT_OPS,
                   help=f"default {','.join(DEFAULT_OPS)}; all, or of {', '.join(OPS)}. bn_add_relu is "
                        "relu(bn(x) + z) with the residual z's grad in the bwd pass; "
                        "bn_leaky_relu (slope 0.01), bn_silu, bn_gelu (exact erf) fuse their "
                        "activation (torch: unfused modules)")
    p.add_argument("--passes", type=csv_choices(model.PASSES), default=model.PASSES)
    p.add_argument("--impls", type=csv_choices(schema.IMPLS), default=schema.DEFAULT_IMPLS,
                   help="default tritonbn,torch,torch_compile; tritonbn_heuristic times tritonbn "
                        "with every launch on its heuristic config (what tuning gains)")
    p.add_argument("--out", help="results JSON (default tritonbn-bench-DATE-DEVICE.json)")
    p.add_argument("--append", action="store_true",
                   help="keep the records already in --out (same device); re-measured ones are replaced")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new case after this many seconds; the JSON says complete: false")
    p.add_argument("--warmup-ms", type=float, default=Options.warmup_ms,
                   help="do_bench warm-up (GPU)")
    p.add_argument("--rep-ms", type=float, default=Options.rep_ms,
                   help="do_bench repetition time (GPU)")
    p.add_argument("--cpu-reps", type=int, default=Options.cpu_reps, help="timed runs per pass on the CPU")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=Options.compile_mode,
                   help=f"torch.compile mode of the torch_compile baseline (default "
                        f"{Options.compile_mode}; 'default' compiles in seconds rather than "
                        "minutes); recorded in each record")
    p.add_argument("--timing", choices=TIMINGS, default=Options.timing,
                   help="eager (default): each pass called from Python, host time included; "
                        "graph: each pass captured once in a CUDA graph and replayed, the "
                        "device's time alone (GPU); recorded in each record")
    p.add_argument("--skip-measured", nargs="+", default=(), metavar="PATH",
                   help="results files or directories (searched recursively): skip cases whose "
                        "records for every requested impl and pass are there, checked, from "
                        "this GPU (so several runs add up)")
    p.add_argument("--seed", type=int, default=Options.seed)
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _bench(args, argv) -> int:
    import torch

    if args.host:  # _pick_backend_early has set TRITON_INTERPRET=1 already
        from .perf.host import run as run_host

        return run_host(args.out)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("tritonbn bench: no CUDA device (torch.cuda.is_available() is False), so there "
                  "is nothing to time. Run it on a GPU machine, or use `tritonbn bench --device "
                  "cpu --shapes quick` for an interpreter smoke run (not performance).",
                  file=sys.stderr)
            return 2
        if _interpret_env():
            print("tritonbn bench: TRITON_INTERPRET is set, so Triton would interpret its kernels "
                  "rather than compile them; unset it to time on the GPU.", file=sys.stderr)
            return 2
    # --device cpu: _pick_backend_early has set TRITON_INTERPRET=1 already
    from .perf.bench import OPS, Options, run

    ops = OPS if "all" in args.ops else args.ops
    opts = Options(device=args.device, sets=args.shapes, dtypes=args.dtypes, layouts=args.layouts,
                   ops=ops, passes=args.passes, impls=args.impls, warmup_ms=args.warmup_ms,
                   rep_ms=args.rep_ms, cpu_reps=args.cpu_reps, budget_s=args.budget_s,
                   compile_mode=args.compile_mode, timing=args.timing,
                   skip_measured=tuple(args.skip_measured),
                   seed=args.seed, progress=not args.no_progress, argv=list(argv))
    return run(opts, args.out, append=args.append)


def _add_report(sub):
    p = sub.add_parser("report", help="render a Markdown report and PNG plots from bench results",
                       description="Render a Markdown report and PNG plots from a results JSON. "
                                   "Given a directory, use its newest GPU results (interpreter "
                                   "smoke runs are skipped); none is not an error.")
    p.add_argument("results", help="a results JSON file, or a directory of them (e.g. perf/results)")
    p.add_argument("--out", required=True, help="directory for report.md and the PNGs")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _pick_backend_early(argv)
    parser = argparse.ArgumentParser(prog="tritonbn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a small conv net's BN+ReLU layers through tritonbn "
                                       "and check them against torch")
    demo.add_argument("--steps", type=int, default=3, help="training steps before eval")
    demo.add_argument("--seed", type=int, default=0)
    _add_bench(sub)
    _add_report(sub)
    from .tuning.command import add_parser as add_tune

    add_tune(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        device = _use_interpreter_without_gpu()
        from .demo import run

        return run(device, steps=args.steps, seed=args.seed)
    if args.command == "bench":
        return _bench(args, argv)
    if args.command == "report":
        from .perf.report import render_cli

        return render_cli(args.results, args.out)
    if args.command == "tune":
        from .tuning.command import run

        return run(args)
    return 2
