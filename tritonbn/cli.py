"""The ``tritonbn`` command: ``tritonbn demo`` (later: bench, tune, report)."""
from __future__ import annotations

import argparse
import os


def _use_interpreter_without_gpu() -> str:
    """Pick where kernels run, before triton is imported: the GPU, else the interpreter."""
    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "cuda"
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tritonbn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a small conv net's BN+ReLU layers through tritonbn "
                                       "and check them against torch")
    demo.add_argument("--steps", type=int, default=3, help="training steps before eval")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        device = _use_interpreter_without_gpu()
        from .demo import run

        return run(device, steps=args.steps, seed=args.seed)
    return 2
