"""Tune launch configs by timing candidates on scratch buffers.

Each kernel is tuned inside its stage, through the same host functions real
calls use (ops.batch_stats, ops.normalize, ops.grad_sums, ops.grad_input), with
the candidate forced by ops.launch_overrides:

- stats, stats_combine   batch_stats into scratch running stats
- normalize              y from fixed batch stats
- bwd_reduce, bwd_combine  the per-channel grad sums from fixed stats and dy
- dx                     dx from fixed stats and sums

Only x, dy, weight and bias are read; every buffer written is the tuner's own,
so a tuned call updates the caller's running stats once, in its real launch.
Before each candidate's check run every buffer tritonbn allocates is poisoned
(NaN), and its outputs must match the heuristic config's: exactly up to the
output dtype's rounding for the elementwise kernels (same inputs, same per-element
math), within 1e-3 of the largest value for the reductions (summation order
changes with the split). Failing, raising (e.g. out of shared memory) or NaN
candidates are rejected. The survivors are timed with triton.testing.do_bench
(median, L2 cleared before each run) and the fastest wins; the heuristic is
always a candidate, so tuning never picks a slower config than the default
by its own measure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import heuristics, ops, tuning
from ..testing import poisoned_allocations
from . import bucket, gpu_name, mode, select, space, store

REDUCTION_RTOL = 1e-3


@dataclass
class Result:
    kernel: str
    bucket: str
    config: object
    ms: float
    default: object  # the heuristic config
    default_ms: float
    tried: int = 0
    rejected: list = field(default_factory=list)  # (config, reason)

    @property
    def speedup(self) -> float:
        return self.default_ms / self.ms if self.ms > 0 else float("nan")


def do_bench_ms(fn, warmup_ms: float = 5.0, rep_ms: float = 25.0) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


class _Stages:
    """The data of one shape and the stage runs each kernel is tuned in."""

    def __init__(self, x, v, weight, bias, eps, activation, dy):
        self.x, self.v, self.w, self.b, self.eps, self.act = x, v, weight, bias, eps, activation
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.rm = torch.zeros(v.C, dtype=acc, device=x.device)
        self.rv = torch.ones(v.C, dtype=acc, device=x.device)
        self.nbt = torch.ones((), dtype=torch.int64, device=x.device)
        self.mean, self.invstd = ops.batch_stats(x, v, self.rm, self.rv, self.nbt, 0.1, eps)
        self.dy = dy
        self.sums = None

    def need_dy(self):
        if self.dy is None:  # a gradient with a non-zero mean, like a real one
            self.dy = ops.like(torch.randn_like(self.x).add_(0.25), self.x)
        if self.sums is None:
            self.sums = self.run("bwd_reduce")[0].clone()

    def run(self, kernel: str) -> list:
        """One stage run with the current launch configs; returns its outputs."""
        x, v, w, b, eps, act = self.x, self.v, self.w, self.b, self.eps, self.act
        if kernel in ("stats", "stats_combine"):
            self.rm.zero_()
            self.rv.fill_(1.0)
            return [*ops.batch_stats(x, v, self.rm, self.rv, self.nbt, 0.1, eps), self.rm, self.rv]
        if kernel == "normalize":
            return [ops.normalize(x, v, self.mean, self.invstd, w, b, True, eps, act)]
        if kernel in ("bwd_reduce", "bwd_combine"):
            sums, dw, db = ops.grad_sums(self.dy, x, v, self.mean, self.invstd, w, b, True, eps,
                                         act, w is not None, b is not None)
            return [t for t in (sums, dw, db) if t is not None]
        if kernel == "dx":
            return [ops.grad_input(self.dy, x, v, self.mean, self.invstd, w, b, self.sums, True,
                                   eps, act)]
        raise ValueError(kernel)


def _mismatch(outs, refs, reduction: bool) -> str | None:
    """Why the outputs differ from the default config's, or None."""
    for i, (out, ref) in enumerate(zip(outs, refs)):
        try:
            if reduction:
                scale = float(ref.abs().max()) if ref.numel() else 0.0
                torch.testing.assert_close(out, ref, rtol=REDUCTION_RTOL,
                                           atol=REDUCTION_RTOL * scale + 1e-12)
            else:
                torch.testing.assert_close(out, ref)
        except AssertionError as e:
            nan = int(torch.isnan(out).sum()) - int(torch.isnan(ref).sum())
            detail = next((line.strip() for line in str(e).splitlines() if "Mismatched" in line),
                          str(e).strip().splitlines()[0] if str(e).strip() else "")
            unwritten = f"{nan} more NaN (unwritten?); " if nan > 0 else ""
            return f"output {i} differs from the default config's: {unwritten}{detail}"
    return None


def tune(kernels, x: torch.Tensor, v, *, weight=None, bias=None, eps=1e-5, activation=None,
         dy=None, timer=None, interpret: bool = False, limit: int | None = None,
         fixed: dict | None = None) -> list[Result]:
    """Tune `kernels` (names from heuristics.KERNELS) for x's buckets; returns one
    Result per kernel, in stage order. A kernel whose default run gives non-finite
    values (NaN or inf in the data) is not tuned: nothing could be checked.

    x must already be a kernel view (ops.kernel_view). timer(fn) -> ms defaults to
    do_bench medians; limit caps the candidates per round (tests). fixed holds
    configs already chosen for other kernels (e.g. the stats config a combine's
    split comes from); configs chosen here are added to it as tuning goes.
    """
    timer = timer or do_bench_ms
    fixed = dict(fixed or {})
    stages = _Stages(x, v, weight, bias, eps, activation, dy)
    results = []
    for kernel in (k for k in heuristics.KERNELS if k in kernels):
        if kernel in heuristics.PASS_KERNELS["bwd"]:
            stages.need_dy()
        result = _tune_one(kernel, stages, timer, interpret, limit, fixed)
        if result is not None:
            results.append(result)
            fixed[kernel] = result.config
    return results


def _tune_one(kernel, stages, timer, interpret, limit, fixed) -> Result | None:
    x, v = stages.x, stages.v
    reduction = kernel in heuristics.REDUCE_KERNELS or kernel in heuristics.COMBINE_KERNELS
    sms = heuristics.sm_count(x.device)
    if kernel in heuristics.TILE_KERNELS:
        default = heuristics.heuristic(kernel, v, x.element_size(), x.device, interpret)
        rounds = [lambda best: space.tile_candidates(kernel, v, x.element_size(), sms, best),
                  lambda best: space.launch_candidates(kernel, v, sms, best)]
    else:
        # the split the combine sums is that of the config its reduce really launches with
        parent = heuristics.COMBINE_OF[kernel]
        parent_cfg = fixed.get(parent) or select(parent, x, v, interpret)
        split = heuristics.split_of(v, parent_cfg)
        default = heuristics.heuristic_combine(v.C, split)
        rounds = [lambda best: space.combine_candidates(kernel, v.C, split, best)]

    def check_and_time(cfg, refs):
        """(outputs, ms or None, why rejected or None) of one candidate."""
        with ops.launch_overrides(**fixed, **{kernel: cfg}):
            with poisoned_allocations():  # every buffer tritonbn allocates starts as NaN
                outs = [t.clone() for t in stages.run(kernel)]
            problem = _mismatch(outs, refs, reduction) if refs is not None else None
            if problem is not None:
                return outs, None, problem
            return outs, timer(lambda: stages.run(kernel)), None

    refs, default_ms, _ = check_and_time(default, None)
    if not all(bool(torch.isfinite(t).all()) for t in refs):
        return None
    timings = {default: default_ms}
    result = Result(kernel, space.bucket(kernel, x.dtype, v), default, default_ms, default,
                    default_ms)
    best = default
    for make in rounds:
        for cfg in make(best)[:limit]:
            if cfg in timings:
                continue
            result.tried += 1
            try:
                _, ms, problem = check_and_time(cfg, refs)
            except Exception as e:  # noqa: BLE001 - a candidate that cannot launch is rejected
                ms, problem = None, f"{type(e).__name__}: {e}".splitlines()[0][:200]
            if problem is not None:
                result.rejected.append((cfg, problem))
            else:
                timings[cfg] = ms
        best = min(timings, key=timings.get)
    result.config, result.ms = best, timings[best]
    return result


def _capturing_or_tracing(x: torch.Tensor) -> bool:
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return compiling or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def on_first_use(kernels, x: torch.Tensor, v, interpret: bool, **data) -> None:
    """With TRITONBN_AUTOTUNE=1: tune those of `kernels` whose bucket has no config
    yet, before the real launch, on scratch buffers (tune), and save them. The host
    ops take it as their first_use argument (autograd.py, library.py pass it).

    data: weight, bias, eps, activation, and dy for backward kernels.
    """
    if mode() != 1:
        return
    gpu = gpu_name(x, interpret)
    if gpu is None or _capturing_or_tracing(x):
        return
    s = store(gpu)
    missing = [k for k in kernels if s.get(bucket(k, x.dtype, v)) is None]
    if not missing:
        return
    sim = tuning._simulated  # the test hooks (tuning.simulate_gpu, tuning._limit)
    results = tune(missing, x, v, interpret=interpret, timer=sim.timer if sim else None,
                   limit=sim.limit if sim else tuning._limit, **data)
    s.put({r.bucket: (r.config, {"ms": r.ms, "heuristic_ms": r.default_ms}) for r in results})
