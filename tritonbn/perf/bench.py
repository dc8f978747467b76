"""``tritonbn bench``: time tritonbn, torch eager and torch.compile BatchNorm on one device.

For every (shape, layout, dtype, op) the harness
1. draws random input with a non-zero mean, a random upstream gradient, random
   affine parameters (float32, as under autocast) and, for ``bn_add_relu``, a
   residual z in the input's layout and dtype, also with a non-zero mean;
2. runs each implementation once and checks its output and its gradients (dx,
   dweight, dbias, and dz for the residual) against a float64 reference (the
   relu / leaky_relu mask taken from that implementation's own output, so
   rounding at y = 0 is not counted as an error);
3. times each pass (fwd, bwd, fwd+bwd) in training mode: on the GPU the median
   of ``triton.testing.do_bench``, which clears the L2 cache (256 MB) before
   every run; on the CPU a wall-clock median, marked "interpreter, not performance";
4. writes a JSON record per pass and implementation (``schema.py``), rewriting
   the results file after every case so a time limit leaves what was measured.

The ops (``model.OPS``): ``bn``, ``bn_relu``, ``bn_add_relu`` = relu(bn(x) + z),
``bn_leaky_relu`` (slope 0.01), ``bn_silu``, ``bn_gelu`` (exact erf). tritonbn runs
each as one fused module (``activation=...``, ``mod(x, z)``); torch and torch.compile
run what a model writes: ``act(bn(x) [+ z])`` with torch.nn's modules, unfused in
eager. The bwd pass is autograd over every input: x, weight, bias and z.

The ceiling is a device-to-device copy measured in the same run, counted as
bytes read + bytes written (``copy_bandwidth``).
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import reference
from . import model, schema, shapes
from .schema import write_json
from .summary import summary_rows

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
OPS = model.OPS
# what `tritonbn bench` runs without --ops: plain BN, the fused ReLU, and ResNet's
# residual tail relu(bn(x) + z); the other activations move bn_relu's bytes
DEFAULT_OPS = ("bn", "bn_relu", "bn_add_relu")
# implementations that are tritonbn's modules (schema.IMPLS)
TRITONBN_IMPLS = ("tritonbn", "tritonbn_heuristic", "tritonbn_split", "tritonbn_fused",
                  "tritonbn_kernel_combine")
COMPILE_MODE = "max-autotune-no-cudagraphs"
# torch.compile modes --compile-mode takes ("default" compiles in seconds, not minutes)
COMPILE_MODES = ("max-autotune-no-cudagraphs", "default", "max-autotune", "reduce-overhead")
EPS = 1e-5

# Largest |impl - reference| / max |reference| over an output that still passes:
# a few units of the dtype's rounding at the output's largest values.
REL_TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class Options:
    device: str = "cuda"
    sets: tuple = ("quick",)
    dtypes: tuple = tuple(DTYPES)
    layouts: tuple = ("NCHW", "channels_last")
    ops: tuple = DEFAULT_OPS
    passes: tuple = model.PASSES
    impls: tuple = schema.DEFAULT_IMPLS
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_reps: int = 3
    budget_s: float | None = None
    compile_mode: str = COMPILE_MODE
    timing: str = "eager"  # or "graph": each pass replayed from a CUDA graph (device time)
    skip_measured: tuple = ()  # results files or directories: cases measured there are skipped
    seed: int = 0
    progress: bool = True
    argv: list = field(default_factory=list)


# ----------------------------------------------------------------------------- timing

def time_ms(fn, device: torch.device, opts: Options) -> float:
    """Median milliseconds of fn(): do_bench (events, L2 cleared each run) on the GPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=opts.warmup_ms, rep=opts.rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(max(1, opts.cpu_reps)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


TIMINGS = ("eager", "graph")


def graphed(fn):
    """fn captured in a CUDA graph, after three warm-up calls on a side stream (the
    capture rules): returns (replay, graph). do_bench of replay times the device's
    work with the L2 cleared before each replay, without the Python and launches of
    an eager call (which the eager timing and `tritonbn bench --host` measure)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay, graph


def time_pass(fn, device: torch.device, opts: Options) -> tuple[float, dict]:
    """(median ms, what the record says of how it was timed): opts.timing "graph"
    replays fn from a CUDA graph on the GPU; a capture that fails falls back to the
    eager timing and says why."""
    if opts.timing != "graph" or device.type != "cuda":
        return time_ms(fn, device, opts), {"timing": "eager"}
    try:
        replay, _graph = graphed(fn)  # the graph lives while replay is timed
    except Exception as e:  # noqa: BLE001 - e.g. a baseline that cannot be captured
        torch.cuda.synchronize()
        return time_ms(fn, device, opts), {"timing": "eager",
                                           "graph_error": f"{type(e).__name__}: {e}"[:200]}
    return time_ms(replay, device, opts), {"timing": "graph"}


def copy_bandwidth(device: torch.device, opts: Options) -> float:
    """GB/s of a large device-to-device copy, bytes read + bytes written."""
    nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, opts)
    return model.gbps(2 * nbytes, ms)


# ----------------------------------------------------------------------------- modules

def bn_class(ndim: int, lib):
    return {2: lib.BatchNorm1d, 3: lib.BatchNorm1d, 4: lib.BatchNorm2d, 5: lib.BatchNorm3d}[ndim]


TORCH_ACT = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(model.LEAKY_SLOPE),
             "silu": nn.SiLU, "gelu": nn.GELU}  # nn.GELU(): the exact erf form


class AddAct(nn.Module):
    """act(bn(x) + z), unfused: a residual block's tail as a torch model writes it
    (bn_add_relu: ``torch.relu(self.bn(x) + z)``)."""

    def __init__(self, bn: nn.Module, act: nn.Module):
        super().__init__()
        self.bn, self.act = bn, act

    def forward(self, x, z):
        return self.act(self.bn(x) + z)


def build(impl: str, op: str, ndim: int, weight: torch.Tensor, bias: torch.Tensor):
    """(module to call, its BatchNorm) for one implementation; parameters copied in.
    The module takes (x) or, for a residual op, (x, z)."""
    C = weight.numel()
    act = model.activation_of(op)
    if impl in TRITONBN_IMPLS:
        import tritonbn

        bn = bn_class(ndim, tritonbn)(C, activation=act)  # negative_slope: 0.01 by default
        mod = bn
    else:
        bn = bn_class(ndim, nn)(C)
        if model.has_residual(op):
            mod = AddAct(bn, TORCH_ACT[act]())
        else:
            mod = nn.Sequential(bn, TORCH_ACT[act]()) if act else bn
    bn.to(weight.device)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    return mod, bn


def compiled(mod: nn.Module, mode: str) -> nn.Module:
    torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no fallback to eager
    return torch.compile(mod, mode=mode, dynamic=False)


def torch_backend(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which backend torch's batch_norm picks in training, by its own rule
    (aten/src/ATen/native/Normalization.cpp, _select_batch_norm_backend)."""
    if x.device.type != "cuda":
        return "native"
    cudnn = (torch.backends.cudnn.enabled and torch.backends.cudnn.is_available()
             and x.dtype != torch.bfloat16 and weight.dtype != torch.bfloat16
             and (x.dtype != torch.float16 or weight.dtype == torch.float32)
             and x.dim() >= 3 and x.shape[0] <= 880801 and x.numel() < 2**31 - 1
             and EPS >= 1e-5)
    return "cudnn" if cudnn else "native"


def kernel_names(fn) -> list[str]:
    """Names of the CUDA kernels fn launches, by torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name not in names:
            names.append(e.name)
    return names


def classify(names: list[str]) -> str | None:
    """cudnn / native from kernel names; None when the names do not say."""
    low = [n.lower() for n in names]
    if any("batch_norm" in n for n in low):  # aten's batch_norm_collect_statistics_kernel, ...
        return "native"
    if any("cudnn" in n or n.startswith(("bn_", "batchnorm")) or "::bn_" in n for n in low):
        return "cudnn"
    return None


# ----------------------------------------------------------------------------- correctness

# grads, in the order of the inputs autograd runs over: x, [z,] weight, bias
def grad_names(op: str) -> tuple[str, ...]:
    return ("dx", "dz", "dweight", "dbias") if model.has_residual(op) else ("dx", "dweight", "dbias")


class Reference:
    """float64 BatchNorm (training, batch statistics) [+ z] on the same input, forward and backward."""

    def __init__(self, x, weight, bias, dy, z=None):
        self.x = x.detach().double().requires_grad_()
        self.w = weight.detach().double().requires_grad_()
        self.b = bias.detach().double().requires_grad_()
        self.z = None if z is None else z.detach().double().requires_grad_()
        self.pre = F.batch_norm(self.x, None, None, self.w, self.b, True, 0.0, EPS)
        if self.z is not None:
            self.pre = self.pre + self.z
        self.dy = dy.double()
        self.leaves = {"dx": self.x, "dz": self.z, "dweight": self.w, "dbias": self.b}

    def errors(self, op: str, y: torch.Tensor, grads) -> dict:
        """{output: (max abs error, max abs error / max |reference|)}; None where not finite.
        grads: the implementation's, in grad_names(op) order."""
        act = model.activation_of(op)
        names = grad_names(op)
        if model.has_residual(op) and self.z is None:
            raise ValueError(f"op {op} needs the reference built with its residual z")
        got = dict(zip(names, grads), y=y)
        out_t = reference.activate(self.pre, act, model.LEAKY_SLOPE)
        if act in ("relu", "leaky_relu"):
            ref = self._masked_grads(act, names, got)
        else:
            ref = self._grads(names, out_t, self.dy)
        ref["y"] = out_t.detach()
        out = {}
        for name in ("y",) + names:
            a, r = got[name].detach().double(), ref[name]
            if not torch.isfinite(a).all():
                out[name] = (None, None)
                continue
            err = (a - r).abs().max().item()
            out[name] = (err, err / max(r.abs().max().item(), 1e-30))
        return out

    def _grads(self, names, out, g) -> dict:
        return dict(zip(names, torch.autograd.grad(out, [self.leaves[n] for n in names], g,
                                                   retain_graph=True)))

    def _masked_grads(self, act, names, got) -> dict:
        """Reference grads of relu / leaky_relu with act' = 1 where the implementation's own
        y > 0, else the slope: a pre-activation within rounding of 0 may land on either
        side, and that is not an error. Where y is exactly 0 and pre that close to 0 (a
        float16 y underflows to 0 for 0 < pre < 3e-8, and an implementation deciding on
        its float32 pre passes the gradient there), the reference takes the side the
        implementation's dz (residual) or dx shows it took."""
        y = got["y"].detach()
        slope = 0.0 if act == "relu" else model.LEAKY_SLOPE
        d = torch.where(y > 0, 1.0, slope).double()
        pre = self.pre.detach()
        band = 2.0 ** -16 * max(pre.abs().max().item(), 1.0)
        either = (y == 0) & (pre.abs() <= band)
        if either.any():  # ~1e-4 of the elements at most: two more float64 backward passes
            show = "dz" if "dz" in names else "dx"
            a = got[show].detach().double()
            r0 = self._grads((show,), self.pre, self.dy * d)[show]
            d1 = torch.where(either, 1.0, d)
            r1 = self._grads((show,), self.pre, self.dy * d1)[show]
            d = torch.where(either & ((a - r1).abs() < (a - r0).abs()), 1.0, d)
        return self._grads(names, self.pre, self.dy * d)


def pass_error(errors: dict, pass_: str) -> tuple:
    """(max abs error, max relative error) over the outputs a pass produces (dz too where
    the op has a residual); None if any not finite."""
    bwd = ("dx", "dz", "dweight", "dbias") if "dz" in errors else ("dx", "dweight", "dbias")
    names = {"fwd": ("y",), "bwd": bwd, "fwd+bwd": ("y",) + bwd}[pass_]
    vals = [errors[n] for n in names]
    if any(a is None for a, _ in vals):
        return None, None
    return max(a for a, _ in vals), max(r for _, r in vals)


# ----------------------------------------------------------------------------- one case

def make_data(shape, layout, dtype, device, seed, residual: bool = False):
    """x (non-zero mean), dy, weight, bias, and with residual=True also z (the
    residual: x's layout and dtype, non-zero mean, requires grad); drawn on the
    device: a 205M-element tensor drawn on the host would cost seconds of every GPU case."""
    g = torch.Generator(device=device).manual_seed(seed)
    C = shape[1]
    fmt = torch.contiguous_format
    if layout == "channels_last":
        fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
    randn = lambda *size: torch.randn(*size, generator=g, device=device)  # noqa: E731
    x = (randn(shape) * 2.0 + 1.5).to(dtype).to(memory_format=fmt).requires_grad_()
    dy = randn(shape).to(dtype).to(memory_format=fmt)
    weight, bias = 1.0 + 0.25 * randn(C), 0.25 * randn(C)
    if not residual:
        return x, dy, weight, bias
    z = (randn(shape) + 0.5).to(dtype).to(memory_format=fmt).requires_grad_()
    return x, dy, weight, bias, z


def run_case(case: shapes.Case, layout: str, dtype_name: str, op: str, opts: Options,
             device: torch.device, ceiling: float, interpreted: bool, on_impl=None):
    """Records (and errors) for every implementation and pass of one case."""
    dtype = DTYPES[dtype_name]
    if model.has_residual(op):
        x, dy, weight, bias, z = make_data(case.shape, layout, dtype, device, opts.seed, residual=True)
    else:
        (x, dy, weight, bias), z = make_data(case.shape, layout, dtype, device, opts.seed), None
    ref = Reference(x, weight, bias, dy, z)
    records, errors = [], []
    for impl in opts.impls:
        if on_impl:
            on_impl(impl)
        try:
            records += _run_impl(impl, case, layout, dtype_name, op, opts, device, ceiling,
                                 interpreted, x, dy, weight, bias, z, ref)
        except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
            errors.append({"set": case.set, "shape": list(case.shape), "layout": layout,
                           "dtype": dtype_name, "op": op, "impl": impl,
                           "error": f"{type(e).__name__}: {e}"[:500]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records, errors


def _run_impl(impl, case, layout, dtype_name, op, opts, device, ceiling, interpreted,
              x, dy, weight, bias, z, ref):
    from .. import ops
    from ..tuning import heuristics_only

    context = {"tritonbn_heuristic": heuristics_only,
               "tritonbn_split": lambda: ops.launch_overrides(path="split"),
               "tritonbn_fused": lambda: ops.launch_overrides(path="fused"),
               "tritonbn_kernel_combine": lambda: ops.launch_overrides(path="split",
                                                                       combine="kernel"),
               }.get(impl, contextlib.nullcontext)
    with context():
        return _measure(impl, case, layout, dtype_name, op, opts, device, ceiling, interpreted,
                        x, dy, weight, bias, z, ref)


def _measure(impl, case, layout, dtype_name, op, opts, device, ceiling, interpreted,
             x, dy, weight, bias, z, ref):
    mod, bn = build(impl, op, x.dim(), weight, bias)
    if impl == "torch_compile":
        mod = compiled(mod, opts.compile_mode)
    # autograd over every input, the residual's too: its dz is part of the bwd pass
    inputs = [x, bn.weight, bn.bias] if z is None else [x, z, bn.weight, bn.bias]
    call = (lambda: mod(x)) if z is None else (lambda: mod(x, z))
    y = call()  # also compiles, for torch_compile
    grads = torch.autograd.grad(y, inputs, dy, retain_graph=True)
    errors = ref.errors(op, y, grads)
    del grads
    fns = {"fwd": call,
           "bwd": lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True),
           "fwd+bwd": lambda: torch.autograd.grad(call(), inputs, dy)}
    extra = {}
    if impl in TRITONBN_IMPLS:
        from .. import ops

        backend = "triton-interpreter" if interpreted else "triton"
        # fused: one launch each way, measured against the single-read model
        extra["path"] = ops.path_of(x)
        if extra["path"] == "split":  # where its combines ran (outside CUDA graph capture)
            extra["combine"] = ops.combine_of(x)
    elif impl == "torch_compile":
        backend = "inductor"
        extra["compile_mode"] = opts.compile_mode
    else:
        backend = torch_backend(x, weight)
        extra["backend_source"] = "rule"
        if device.type == "cuda":
            try:
                names = kernel_names(fns["fwd+bwd"])
            except Exception as e:  # noqa: BLE001 - no profiler (CUPTI): keep torch's rule
                names, extra["profiler_error"] = [], f"{type(e).__name__}: {e}"[:200]
            seen = classify(names)
            extra["kernels"] = [n[:80] for n in names[:8]]
            if seen:
                backend, extra["backend_source"] = seen, "profiler"

    out = []
    for pass_ in opts.passes:
        ms, how = time_pass(fns[pass_], device, opts)
        peak_mb = _peak_mb(fns[pass_]) if pass_ == "fwd+bwd" and device.type == "cuda" else None
        nbytes = model.model_bytes(op, pass_, case.numel, x.element_size(), "two_pass")
        nbytes1 = model.model_bytes(op, pass_, case.numel, x.element_size(), "single_read")
        abs_err, rel_err = pass_error(errors, pass_)
        ok = rel_err is not None and rel_err <= REL_TOL[x.dtype]
        gb, gb1 = model.gbps(nbytes, ms), model.gbps(nbytes1, ms)
        out.append({"set": case.set, "op": op, "pass": pass_, "shape": list(case.shape),
                    "layout": layout, "dtype": dtype_name, "impl": impl, "backend": backend,
                    "weight": case.weight, "ms": ms, "gbps": gb, "gbps_single_read": gb1,
                    "pct_of_copy": 100 * gb / ceiling, "pct_of_copy_single_read": 100 * gb1 / ceiling,
                    "max_abs_err": abs_err, "rel_err": rel_err, "ok": ok, "peak_mb": peak_mb,
                    "copy_gbps": ceiling, **how, **extra})
    return out


def _peak_mb(fn) -> float:
    """Memory fn allocates beyond what is already live, at its peak (MiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------- the run

def plan(opts: Options, tiny: bool) -> list[tuple]:
    """Every (case, layout, dtype, op) to run, in order."""
    todo = []
    for name in opts.sets:
        for case in shapes.cases(name, tiny_shapes=tiny):
            for layout in case.layouts:
                if len(case.shape) == 4 and layout not in opts.layouts:
                    continue
                for dtype in opts.dtypes:
                    for op in opts.ops:
                        todo.append((case, layout, dtype, op))
    return todo


def measured_ids(paths, device: str, timing: str = "eager") -> set:
    """record_ids of the checked (ok) records in results files of `device` (GPU runs
    only) timed the same way: each path a results JSON or a directory searched
    recursively."""
    from .schema import load

    files = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "**", "*.json"), recursive=True)) \
            if os.path.isdir(p) else [p] if os.path.exists(p) else []
    ids = set()
    for f in files:
        try:
            doc = load(f)
        except (ValueError, OSError):
            continue  # not a results file (a dataset, a log)
        if (doc["device"] == device and not doc["interpreter"]
                and doc.get("timing", "eager") == timing):
            ids |= {schema.record_id(r) for r in doc["records"] if r["ok"]}
    return ids


def already_measured(case, layout, dtype, op, opts: Options, ids: set) -> bool:
    """Whether every (impl, pass) this run would time for the case is in ids."""
    base = (case.set, tuple(case.shape), layout, dtype, op)
    return bool(ids) and all(base + (p, impl) in ids for impl in opts.impls for p in opts.passes)


def environment(device: torch.device, interpreted: bool, compile_mode: str = COMPILE_MODE,
                timing: str = "eager") -> dict:
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        hw = {"sm_count": props.multi_processor_count,
              "l2_bytes": getattr(props, "L2_cache_size", None)}
    else:
        name = f"CPU {platform.machine()} ({os.cpu_count()} cores), Triton interpreter"
        hw = {}
    return {"schema": schema.SCHEMA_VERSION, "device": name, "torch": torch.__version__,
            "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mode": schema.INTERPRETER_MODE if interpreted else "gpu",
            "interpreter": interpreted, "compile_mode": compile_mode, "timing": timing,
            "tuning": _tuning_state(name if device.type == "cuda" else None), **hw}


def _tuning_state(gpu: str | None) -> str:
    """Which launch configs the `tritonbn` implementation ran with."""
    from .. import tuning

    if gpu is None:
        return "heuristic (the interpreter always uses them)"
    tuned, shipped = tuning.store(gpu).sizes()
    return (f"{tuned} tuned buckets in {tuning.cache_path(gpu)}, {shipped} shipped, else heuristic; "
            f"TRITONBN_AUTOTUNE={tuning.mode()}")


def default_out(env: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    if env["interpreter"]:
        slug = "cpu-interpreter"
    return f"tritonbn-bench-{env['date'][:10]}-{slug}.json"


def _merge(doc: dict, path: str) -> dict:
    """Records of an earlier run on the same device, kept unless this run re-measures them."""
    with open(path) as f:
        old = schema.validate(json.load(f))
    if old["device"] != doc["device"] or old["interpreter"] != doc["interpreter"]:
        raise SystemExit(f"tritonbn bench: --append to {path}, which holds results from "
                         f"{old['device']!r}, not {doc['device']!r}")
    if old.get("timing", "eager") != doc.get("timing", "eager"):
        raise SystemExit(f"tritonbn bench: --append to {path}, which holds {old.get('timing', 'eager')}"
                         f" timings, not {doc.get('timing', 'eager')}: write them to another file")
    doc["records"] = old["records"]
    doc["errors"] = old.get("errors", [])
    doc["runs"] = old.get("runs", []) + doc["runs"]
    return doc


def run(opts: Options, out: str | None, append: bool = False) -> int:
    from tqdm import tqdm

    from .. import ops

    device = torch.device(opts.device)
    interpreted = device.type == "cpu"
    if interpreted and not ops.interpreting():
        print("tritonbn bench --device cpu runs the kernels through Triton's interpreter: "
              "set TRITON_INTERPRET=1 before triton is imported (the `tritonbn` command does).",
              file=sys.stderr)
        return 2
    env = environment(device, interpreted, opts.compile_mode, opts.timing)
    out = out or default_out(env)
    t_start = time.monotonic()
    torch.manual_seed(opts.seed)
    ceiling = copy_bandwidth(device, opts)
    doc = {**env, "copy_gbps": ceiling, "records": [], "errors": [],
           "runs": [{"date": env["date"], "argv": opts.argv, "copy_gbps": ceiling}]}
    if append and os.path.exists(out):
        doc = _merge(doc, out)
    todo = plan(opts, tiny=interpreted)
    if opts.skip_measured:
        ids = measured_ids(opts.skip_measured, env["device"], opts.timing)
        skipped = [t for t in todo if already_measured(*t, opts, ids)]
        todo = [t for t in todo if not already_measured(*t, opts, ids)]
        doc["runs"][-1]["cases_skipped"] = len(skipped)
        print(f"{len(skipped)} cases already measured on {env['device']} in "
              f"{', '.join(opts.skip_measured)}: skipped", flush=True)
    doc["complete"] = False
    doc["runs"][-1].update(cases_run=0, cases_planned=len(todo))
    write_json(schema.validate(doc), out)  # fail now, not after the run, if out is not writable
    print(f"tritonbn bench on {env['device']}: copy {ceiling:.0f} GB/s; {len(todo)} cases × "
          f"{len(opts.impls)} implementations × {len(opts.passes)} passes -> {out}"
          + ("\n  interpreter, not performance: tiny shapes through Triton's CPU interpreter"
             if interpreted else ""), flush=True)
    done = 0
    bar = tqdm(todo, disable=not opts.progress, unit="case", dynamic_ncols=True,
               mininterval=0.2 if sys.stderr.isatty() else 15.0)
    for case, layout, dtype, op in bar:
        if opts.budget_s is not None and time.monotonic() - t_start > opts.budget_s:
            bar.write(f"time budget of {opts.budget_s:.0f} s spent: {len(todo) - done} cases not run")
            break
        bar.set_description(f"{case.set} {'x'.join(map(str, case.shape))} {layout} {dtype} {op}",
                            refresh=False)
        records, errors = run_case(case, layout, dtype, op, opts, device, ceiling, interpreted,
                                   on_impl=lambda impl: bar.set_postfix_str(impl, refresh=False))
        fresh = {schema.record_id(r) for r in records}
        doc["records"] = [r for r in doc["records"] if schema.record_id(r) not in fresh]
        doc["records"] += records
        doc["errors"] += errors
        for e in errors:
            bar.write(f"ERROR {e['impl']} {e['set']} {e['shape']} {e['layout']} {e['dtype']} "
                      f"{e['op']}: {e['error']}")
        done += 1
        doc["complete"] = done == len(todo)
        doc["runs"][-1]["cases_run"] = done
        write_json(schema.validate(doc), out)
    bar.close()
    return _finish(doc, out, time.monotonic() - t_start)


def _finish(doc: dict, out: str, seconds: float) -> int:
    records = doc["records"]
    failed = [r for r in records if not r["ok"]]
    print(f"\n{len(records)} records in {seconds:.0f} s -> {out}"
          + (f"  [{doc['mode']}]" if doc["interpreter"] else ""))
    rows = [r for r in summary_rows(records) if r["pass"] == "fwd+bwd"]
    if rows:
        print(f"{'set':14} {'op':13} {'dtype':9} {'layout':14} {'×torch':>7} {'×compile':>8} "
              f"{'%copy':>6}")
        fmt = lambda v, f: "-".rjust(int(f.split(".")[0])) if v is None else format(v, f)  # noqa: E731
        for r in rows:
            print(f"{r['set']:14} {r['op']:13} {r['dtype']:9} {r['layout']:14} "
                  f"{fmt(r['vs_torch'], '7.2f')} {fmt(r['vs_torch_compile'], '8.2f')} "
                  f"{fmt(r['pct_tritonbn'], '6.1f')}")
    for r in failed:
        print(f"CHECK FAILED {r['impl']} {r['set']} {r['shape']} {r['layout']} {r['dtype']} "
              f"{r['op']} {r['pass']}: max abs err {r['max_abs_err']}, rel {r['rel_err']}")
    ours_bad = [r for r in failed if r["impl"].startswith("tritonbn")] + \
               [e for e in doc["errors"] if e["impl"].startswith("tritonbn")]
    if doc["errors"]:
        print(f"{len(doc['errors'])} implementation runs raised (see 'errors' in {out})")
    return 1 if ours_bad else 0
