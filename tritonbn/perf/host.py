"""``tritonbn bench --host``: tritonbn's host time per BatchNorm call against torch's.

At small batch an eager BN layer's speed is mostly host time: Python, dispatch,
allocations and launches. This measures tritonbn's own share of it with every
Triton launch replaced by a no-op at Triton's level (the interpreter's launcher,
``InterpretedFunction.run``), so what is timed is everything tritonbn does around
its kernels, on a tiny CPU tensor. Beside it, in the same process and interleaved
round by round, torch's own modules compute for real on the same tensor: on so
small a tensor their time is host time too. Ratio = tritonbn / torch (≤ 1.0 is the
goal, issue 14). Triton's own per-launch cost on a GPU is not in it: the GPU
check's eager stage (perf/eager_step.py) measures the real launch path.

Cases: ``bn``, ``bn_relu`` and ``bn_add_relu`` (relu(bn(x) + z)) training forward +
backward, and ``bn_relu`` eval forward (no grad), on (2, 8, 4, 4) channels_last
float32. torch runs ``nn.BatchNorm2d`` then ``nn.ReLU`` (``torch.relu(bn(x) + z)``),
single-threaded as a tensor this small runs anyway.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import time

import torch
from torch import nn

SCHEMA_VERSION = 1
KIND = "host"
SHAPE = (2, 8, 4, 4)
CASES = (("bn", "train"), ("bn_relu", "train"), ("bn_add_relu", "train"), ("bn_relu", "eval"))
# alternating rounds of N calls a side: many short ones, the least taken (measure)
N, ROUNDS = 10, 400


@contextlib.contextmanager
def stubbed_launches(counter: list | None = None):
    """Inside the block every Triton kernel launch returns at once, run by nothing
    (the interpreter's launcher is replaced); each launch appends its kernel to counter."""
    from triton.runtime.interpreter import InterpretedFunction

    saved = InterpretedFunction.run

    def run(self, *args, **kwargs):
        if counter is not None:
            counter.append(self.fn.__name__)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = saved


class _AddRelu(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.bn = nn.BatchNorm2d(C)

    def forward(self, x, z):
        return torch.relu(self.bn(x) + z)


def _modules(op: str):
    import tritonbn

    C = SHAPE[1]
    ours = tritonbn.BatchNorm2d(C, activation=None if op == "bn" else "relu")
    theirs = {"bn": lambda: nn.BatchNorm2d(C),
              "bn_relu": lambda: nn.Sequential(nn.BatchNorm2d(C), nn.ReLU()),
              "bn_add_relu": lambda: _AddRelu(C)}[op]()
    return ours, theirs


def _call(mod, op: str, mode: str, x, z, dy):
    """One call as a model makes it: training forward + backward, or eval forward."""
    if mode == "eval":
        with torch.no_grad():
            return mod(x)
    y = mod(x, z) if op == "bn_add_relu" else mod(x)
    y.backward(dy)
    return y


def _per_call_us(fn, n: int) -> float:
    t0 = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - t0) / n * 1e6


class _NoOp(torch.autograd.Function):
    """The least a Python autograd node costs: forward and backward allocate their
    outputs and compute nothing."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return torch.empty_like(dy), None, None


def python_node_floor_us(n: int = N, rounds: int = ROUNDS) -> float:
    """µs of a training fwd+bwd through _NoOp on the benchmark's tensor (the least of
    its rounds, as measure() times): the
    floor under any BatchNorm written as a Python autograd.Function (torch's own is a
    C++ node), a bound the ratios cannot go below."""
    x = torch.randn(SHAPE).to(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(SHAPE).to(memory_format=torch.channels_last)
    weight = torch.ones(SHAPE[1], requires_grad=True)
    call = lambda: _NoOp.apply(x, weight, None).backward(dy)  # noqa: E731
    for _ in range(20):
        call()
    return min(_per_call_us(call, n) for _ in range(rounds))


def measure(n: int = N, rounds: int = ROUNDS, warmup: int = 50) -> tuple[list[dict], float]:
    """One record per case: µs per call of tritonbn (launches stubbed) and of torch,
    each the least of `rounds` alternating rounds of n calls on the thread's CPU clock
    (a round the VM preempts is not inflated, and the least is the one the least
    disturbed: medians of 9 long wall-clock rounds moved bn's ratio from 0.99 to 1.17
    between runs on a 2-core VM, this by about 0.03), their ratio, and the
    medians beside them; and the floor (python_node_floor_us) measured the same way."""
    from .. import ops

    if not ops.interpreting():
        raise RuntimeError("the host benchmark stubs Triton's interpreter launcher: set "
                           "TRITON_INTERPRET=1 before triton is imported (`tritonbn bench "
                           "--host` does)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        records = []
        for op, mode in CASES:
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(SHAPE, generator=g) * 2 + 1.5).to(memory_format=torch.channels_last)
            z = torch.randn(SHAPE, generator=g).to(memory_format=torch.channels_last)
            dy = torch.randn(SHAPE, generator=g).to(memory_format=torch.channels_last)
            x.requires_grad_(mode == "train")
            z.requires_grad_(mode == "train")
            ours, theirs = _modules(op)
            ours.train(mode == "train")
            theirs.train(mode == "train")
            launches: list = []
            with stubbed_launches(launches):
                _call(ours, op, mode, x, z, dy)
            counted = list(launches)
            times = {"tritonbn": [], "torch": []}
            with stubbed_launches():
                for _ in range(warmup):
                    _call(ours, op, mode, x, z, dy)
                    _call(theirs, op, mode, x, z, dy)
                for _ in range(rounds):
                    times["tritonbn"].append(
                        _per_call_us(lambda: _call(ours, op, mode, x, z, dy), n))
                    times["torch"].append(
                        _per_call_us(lambda: _call(theirs, op, mode, x, z, dy), n))
            ours_us, torch_us = (min(times[k]) for k in ("tritonbn", "torch"))
            records.append({"op": op, "mode": mode,
                            "pass": "fwd+bwd" if mode == "train" else "fwd",
                            "tritonbn_us": ours_us, "torch_us": torch_us,
                            "ratio": ours_us / torch_us, "launches": len(counted),
                            "kernels": counted,
                            "median_us": {k: statistics.median(v) for k, v in times.items()},
                            "spread_us": {k: [min(v), max(v)] for k, v in times.items()}})
        return records, python_node_floor_us(n, rounds)
    finally:
        torch.set_num_threads(threads)


def document(records: list[dict], n: int, rounds: int, floor_us: float | None = None) -> dict:
    import triton

    return {"kind": KIND, "schema": SCHEMA_VERSION, "python_node_floor_us": floor_us,
            "device": f"CPU {platform.machine()} ({os.cpu_count()} cores), Triton launches "
                      "stubbed",
            "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "shape": list(SHAPE), "calls_per_round": n, "rounds": rounds, "records": records}


_RECORD = {"op": str, "mode": str, "pass": str, "tritonbn_us": (int, float),
           "torch_us": (int, float), "ratio": (int, float), "launches": int}


def validate(doc) -> dict:
    """doc if it is a host-time results document, else ValueError naming what is wrong."""
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ValueError("not a tritonbn host-time file (kind != 'host')")
    if doc.get("schema") != SCHEMA_VERSION or not isinstance(doc.get("records"), list):
        raise ValueError(f"host-time file: schema {doc.get('schema')!r} or records unreadable")
    for i, r in enumerate(doc["records"]):
        for name, typ in _RECORD.items():
            if not isinstance(r.get(name), typ) or isinstance(r.get(name), bool):
                raise ValueError(f"host-time file: record {i} field {name!r} missing or wrong")
        if not (r["tritonbn_us"] > 0 and r["torch_us"] > 0):
            raise ValueError(f"host-time file: record {i} has a time <= 0")
    return doc


def table(records: list[dict]) -> list[str]:
    """Markdown rows: one per case."""
    out = ["| case | tritonbn µs | torch µs | ratio (≤ 1 is the goal) | launches |",
           "|---|---|---|---|---|"]
    for r in records:
        out.append(f"| {r['op']} {r['mode']} {r['pass']} | {r['tritonbn_us']:.1f} | "
                   f"{r['torch_us']:.1f} | {r['ratio']:.2f} | {r['launches']} |")
    return out


def markdown(doc: dict) -> str:
    lines = ["# tritonbn host time per call", "",
             f"{doc['device']}; torch {doc['torch']}, triton {doc['triton']}, {doc['date']}.",
             "", f"Every Triton launch is a no-op (the interpreter's launcher), so tritonbn's "
                 f"time is its own host work; torch's modules compute for real on the same "
                 f"{'×'.join(map(str, doc['shape']))} channels_last float32 tensor, "
                 f"single-threaded. Each time is the least of {doc['rounds']} alternating "
                 f"rounds of {doc['calls_per_round']} calls on the thread's CPU clock.", ""]
    lines += table(doc["records"])
    if doc.get("python_node_floor_us"):
        lines += ["", f"Floor: a training fwd+bwd through a Python autograd.Function that "
                      f"computes nothing costs {doc['python_node_floor_us']:.1f} µs here "
                      f"(autograd's engine and the Python node), part of every tritonbn "
                      f"training row; torch's BatchNorm is a C++ node."]
    return "\n".join(lines) + "\n"


def run(out: str | None, n: int = N, rounds: int = ROUNDS) -> int:
    records, floor = measure(n, rounds)
    doc = document(records, n, rounds, floor)
    print("\n".join(table(records)))
    print(f"floor: a Python autograd node's training fwd+bwd, computing nothing: {floor:.1f} µs")
    if out:
        from .schema import write_json

        write_json(doc, out)
        print(f"-> {out}")
    return 0
