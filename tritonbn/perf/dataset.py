"""``python -m tritonbn.perf.dataset``: each kernel timed alone, config by config, to fit
the launch heuristics from.

For every (shape, layout, dtype), each of the six kernels (heuristics.KERNELS) runs
alone, through the host function in ops.py that launches only it (stats_partials,
combine_stats, normalize, grad_partials, combine_grads, grad_input), its config
forced with ops.launch_overrides:

1. first the heuristic config (heuristics.heuristic, heuristic_combine: never a
   tuned one) of every (shape, layout, dtype, kernel);
2. then the tuning space around it (tuning/space.py: round 1's tiles and warps and
   round 2's stages and splits, taken in turn; a combine's own space), round-robin
   across (shape, layout, dtype, kernel), so that a short --budget-s still covers
   every shape.

Data is random with a non-zero mean (x, dy; float32 weight and bias), activation
relu. What a kernel reads besides it (partials, mean and invstd, the grad sums)
comes from one run of the kernels before it on their heuristic configs; a combine
sums its reduce's heuristic partials. A candidate is checked before it is timed:
with every buffer tritonbn allocates poisoned, its outputs must match the
heuristic's (tuner._mismatch; a reduce's partials through the combine at its own
split). One that differs is recorded "rejected", untimed; one that raises, "failed".

Compiling, not timing, is what a GPU budget goes on: each config is a new Triton
kernel variant. Work goes in batches; with --jobs N, each batch's variants are first
run once each in N spawned worker processes (no CUDA context inherited), which
compiles them into Triton's disk cache: that first run's wall time is a record's
compile_s. The main process then checks and times them with the cache warm
(first_run_s: its own first launch, the compile itself with --jobs 0).

Timing: triton.testing.do_bench medians, L2 cleared before each run; under the
interpreter (--device cpu, tiny shapes) a wall-clock median, marked "interpreter, not
performance". GB/s count model.kernel_bytes at the split the launch used;
pct_of_copy is against the copy bandwidth measured in the same run.

One JSON file (--out) holds every run: a run appends, skips each (shape, layout,
dtype, kernel, config) already measured on the same GPU and triton version (unless
--remeasure), and rewrites the file atomically after every batch, so a killed run
keeps what it measured.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from .. import heuristics, ops
from ..arguments import csv_choices
from ..heuristics import COMBINE_OF, KERNELS, REDUCE_KERNELS, TILE_KERNELS, CombineConfig, Config
from ..layout import kernel_view
from ..testing import poisoned_allocations
from ..tuning import space
from ..tuning.tuner import _mismatch
from . import bench, model, schema, shapes

FORMAT, VERSION = "tritonbn-kernel-dataset", 1
ACTIVATION, EPS, MOMENTUM = "relu", 1e-5, 0.1
# ResNet-50's (C, H=W) at batch 256 and 32, few channels with a long axis, BatchNorm1d
SHAPES = tuple((n, c, hw, hw) for n in shapes.RESNET50_BATCHES
               for c, hw in ((64, 56), (512, 28), (1024, 14), (2048, 7))) \
    + ((20, 6, 65536), (4096, 1024))
DTYPES = ("float16", "float32")
LAYOUTS = ("NCHW", "channels_last")  # of 4-D and 5-D shapes; others have one, "contiguous"
COMBINE_FOR = {reduce: combine for combine, reduce in COMBINE_OF.items()}
CONFIG_TYPES = {"Config": Config, "CombineConfig": CombineConfig}
SOURCES = ("heuristic", "candidate")
STATUSES = ("ok", "rejected", "failed")


def config_dict(cfg) -> dict:
    return {"type": type(cfg).__name__, **dataclasses.asdict(cfg)}


def config_from_dict(d: dict):
    """The Config or CombineConfig a record's "config" holds; ValueError if none."""
    fields = dict(d)
    typ = CONFIG_TYPES.get(fields.pop("type", None))
    if typ is None:
        raise ValueError(f"config {d!r}: \"type\" must be one of {', '.join(CONFIG_TYPES)}")
    try:
        return typ(**fields)
    except TypeError as e:
        raise ValueError(f"config {d!r}: {e}") from None


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_ok(device: torch.device) -> bool:
    """False once a CUDA error has broken this process's context (every later launch fails)."""
    try:
        _sync(device)
        return True
    except Exception:  # noqa: BLE001 - any error here means the context is gone
        return False


class NotFinite(ValueError):
    """The heuristic config's outputs hold NaN or inf: no candidate can be checked."""


class Case:
    """One (shape, layout, dtype) on a device: its view, each kernel's heuristic config,
    and, made on first use, its data and each kernel run alone. synthetic=True (a
    precompile worker) fills what kernels read besides x and dy with constants:
    values do not change what compiles."""

    def __init__(self, key: tuple, device: torch.device, interpret: bool, seed: int = 0,
                 synthetic: bool = False):
        shape, layout, dtype = key
        self.key, self.device, self.seed, self.synthetic = key, device, seed, synthetic
        self.dtype = bench.DTYPES[dtype]
        fmt = torch.contiguous_format
        if layout == "channels_last":
            fmt = torch.channels_last_3d if len(shape) == 5 else torch.channels_last
        meta = torch.empty(shape, dtype=self.dtype, device="meta").to(memory_format=fmt)
        self.v = kernel_view(meta)[1]
        self.numel, self.elem_size = meta.numel(), meta.element_size()
        self.heur = {k: heuristics.heuristic(k, self.v, self.elem_size, device, interpret)
                     for k in TILE_KERNELS}
        for combine, reduce in COMBINE_OF.items():
            self.heur[combine] = heuristics.heuristic_combine(self.v.C,
                                                              heuristics.split_of(self.v, self.heur[reduce]))
        self._data = None
        self._refs = {}  # kernel -> the heuristic's outputs, or the exception instead

    def candidates(self, kernel: str, sms: int, limit: int | None = None) -> list:
        """The tuning space around kernel's heuristic config, without it: rounds 1 and 2
        in turn (so a limit samples both), or a combine's space at its reduce's split."""
        base = self.heur[kernel]
        if kernel in TILE_KERNELS:
            rounds = itertools.zip_longest(
                space.tile_candidates(kernel, self.v, self.elem_size, sms, base),
                space.launch_candidates(kernel, self.v, sms, base))
            both = [c for pair in rounds for c in pair if c is not None]
        else:
            both = space.combine_candidates(kernel, self.v.C, self.split(kernel, base), base)
        return [c for c in dict.fromkeys(both) if c != base][:limit]

    def split(self, kernel: str, cfg) -> int:
        """Partials per channel: a tile kernel's own split, a combine's reduce's."""
        return heuristics.split_of(self.v, cfg if kernel in TILE_KERNELS else self.heur[COMBINE_OF[kernel]])

    def overrides(self, kernel: str, cfg) -> dict:
        """Every kernel's config for a run of kernel on cfg: the heuristics, and for a
        reduce its combine's heuristic at cfg's split (what a real launch takes)."""
        configs = dict(self.heur, **{kernel: cfg})
        if kernel in REDUCE_KERNELS:
            configs[COMBINE_FOR[kernel]] = heuristics.heuristic_combine(self.v.C,
                                                                        heuristics.split_of(self.v, cfg))
        return configs

    @property
    def data(self) -> SimpleNamespace:
        if self._data is None:
            self._data = self._make_data()
        return self._data

    def _make_data(self) -> SimpleNamespace:
        shape, layout, _ = self.key
        x, dy, w, b = bench.make_data(shape, layout, self.dtype, self.device, self.seed)
        x, v, C = x.detach(), self.v, self.v.C
        acc = dict(dtype=torch.float32, device=self.device)
        d = SimpleNamespace(x=x, dy=ops.like(dy, x), w=w, b=b, rm=torch.zeros(C, **acc),
                            rv=torch.ones(C, **acc),
                            nbt=torch.ones((), dtype=torch.int64, device=self.device))
        if self.synthetic:
            d.partials = torch.full((3, heuristics.split_of(v, self.heur["stats"]), C), 2.0, **acc)
            d.gpartials = torch.full((2, heuristics.split_of(v, self.heur["bwd_reduce"]), C), 2.0, **acc)
            d.mean, d.invstd = torch.zeros(C, **acc), torch.ones(C, **acc)
            d.sums = torch.zeros((2, C), **acc)
            return d
        with ops.launch_overrides(**self.heur):
            d.partials = ops.stats_partials(x, v)
            d.mean, d.invstd, _ = ops.combine_stats(x, v, d.partials, d.rm, d.rv, d.nbt,
                                                    MOMENTUM, EPS)
            d.gpartials = ops.grad_partials(d.dy, x, v, d.mean, d.invstd, w, b, True, EPS,
                                            ACTIVATION)
            d.sums = ops.combine_grads(x, v, d.gpartials, w, b, True, True)[0]
        return d

    def launch(self, kernel: str) -> list:
        """kernel alone, on the configs in force (ops.launch_overrides): its outputs."""
        d, x, v = self.data, self.data.x, self.v
        if kernel == "stats":
            return [ops.stats_partials(x, v)]
        if kernel == "stats_combine":
            return list(ops.combine_stats(x, v, d.partials, d.rm, d.rv, d.nbt, MOMENTUM, EPS)[:2])
        if kernel == "normalize":
            return [ops.normalize(x, v, d.mean, d.invstd, d.w, d.b, True, EPS, ACTIVATION)]
        if kernel == "bwd_reduce":
            return [ops.grad_partials(d.dy, x, v, d.mean, d.invstd, d.w, d.b, True, EPS,
                                      ACTIVATION)]
        if kernel == "bwd_combine":
            return list(ops.combine_grads(x, v, d.gpartials, d.w, d.b, True, True))
        if kernel == "dx":
            return [ops.grad_input(d.dy, x, v, d.mean, d.invstd, d.w, d.b, d.sums, True, EPS,
                                   ACTIVATION)]
        raise ValueError(f"unknown kernel {kernel!r}")

    def outputs(self, kernel: str) -> list:
        """What a run of kernel is checked by (copies): its outputs, the running stats a
        stats run updates, and a reduce's partials through its combine, since how many
        partials there are depends on the config."""
        d, x, v = self.data, self.data.x, self.v
        if kernel in ("stats", "stats_combine"):
            d.rm.zero_()
            d.rv.fill_(1.0)
        if kernel == "stats":
            outs = [*ops.combine_stats(x, v, self.launch(kernel)[0], d.rm, d.rv, d.nbt,
                                       MOMENTUM, EPS)[:2], d.rm, d.rv]
        elif kernel == "stats_combine":
            outs = [*self.launch(kernel), d.rm, d.rv]
        elif kernel == "bwd_reduce":
            outs = list(ops.combine_grads(x, v, self.launch(kernel)[0], d.w, d.b, True, True))
        else:
            outs = self.launch(kernel)
        return [t.clone() for t in outs]

    def first_run(self, kernel: str) -> float:
        """Seconds of kernel's first launch on the configs in force, to completion: its
        compile (or load from Triton's disk cache) when the variant is new here."""
        self.data  # made before the clock starts
        t0 = time.perf_counter()
        self.launch(kernel)
        _sync(self.device)
        return time.perf_counter() - t0

    def reference(self, kernel: str) -> list:
        """The heuristic config's outputs of kernel, with allocations poisoned, computed
        once; raises what that run raised, or NotFinite."""
        if kernel not in self._refs:
            try:
                with ops.launch_overrides(**self.heur), poisoned_allocations():
                    outs = self.outputs(kernel)
                if not all(bool(torch.isfinite(t).all()) for t in outs):
                    raise NotFinite("the heuristic config's outputs are not finite")
                self._refs[kernel] = outs
            except Exception as e:  # noqa: BLE001 - kept, raised again for each candidate
                self._refs[kernel] = e.with_traceback(None)  # its frames would hold tensors
        if isinstance(self._refs[kernel], Exception):
            raise self._refs[kernel]
        return self._refs[kernel]

    def measure(self, kernel: str, cfg, timer) -> dict:
        """Run kernel alone on cfg once, check it (the heuristic: finite outputs), then
        time it: status, reason, ms and first_run_s."""
        out = dict(status="ok", reason=None, ms=None, first_run_s=None)
        try:
            with ops.launch_overrides(**self.overrides(kernel, cfg)):
                out["first_run_s"] = self.first_run(kernel)
                if cfg == self.heur[kernel]:
                    self.reference(kernel)
                else:
                    with poisoned_allocations():
                        outs = self.outputs(kernel)
                    problem = _mismatch(outs, self.reference(kernel),
                                        reduction=kernel not in ops.GROUPS["elementwise"])
                    if problem is not None:
                        return dict(out, status="rejected", reason=problem)
                out["ms"] = timer(lambda: self.launch(kernel))
        except NotFinite as e:
            out.update(status="rejected", reason=str(e))
        except Exception as e:  # noqa: BLE001 - a config that cannot launch is data too
            out.update(status="failed", reason=_why(e))
        return out


# ----------------------------------------------------------------------------- precompile workers

_worker_case: Case | None = None


def precompile(device: str, items: list) -> list[dict]:
    """In a worker: run each (case key, kernel, config) once, which compiles it into
    Triton's disk cache (and a reduce's check combine at its split): {"compile_s"} per
    item, or {"error", "fatal"} (fatal: this process's CUDA context is lost, so the
    rest are left to the main process). One case's data is kept at a time: 14 workers
    holding every case would not fit beside the main process."""
    global _worker_case
    dev = torch.device(device)
    out = []
    for key, kernel, cfg in items:
        if _worker_case is None or _worker_case.key != key:
            _worker_case = None  # the previous case's tensors go back to the GPU first
            torch.cuda.empty_cache()  # (a no-op without CUDA)
            _worker_case = Case(key, dev, ops.interpreting(), synthetic=True)
        try:
            with ops.launch_overrides(**_worker_case.overrides(kernel, cfg)):
                seconds = _worker_case.first_run(kernel)
                _worker_case.outputs(kernel)
            out.append({"compile_s": seconds})
        except Exception as e:  # noqa: BLE001 - reported; the main process decides
            out.append({"error": _why(e), "fatal": not _device_ok(dev)})
            if out[-1]["fatal"]:
                rest = {"error": "not precompiled: the worker lost its CUDA context",
                        "fatal": False}
                return out + [rest] * (len(items) - len(out))
    return out


class Workers:
    """--jobs spawned processes (no CUDA context inherited, nothing set that changes
    Triton's cache key) that precompile a batch; restarted after one breaks."""

    def __init__(self, jobs: int, device: torch.device):
        self.jobs, self.device, self.pool = jobs, device, None

    def run(self, items: list) -> tuple[list[dict], bool]:
        """Each item's precompile result, in order, and whether the workers were started
        for this batch (its wall time includes their start-up)."""
        started = self.pool is None
        if started:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                self.jobs, mp_context=multiprocessing.get_context("spawn"))
        order = sorted(range(len(items)), key=lambda i: items[i][0])
        chunks = [order[j::self.jobs] for j in range(min(self.jobs, len(items)))]  # dealt out
        futures = [self.pool.submit(precompile, str(self.device), [items[i] for i in chunk])
                   for chunk in chunks]
        results, broken = [None] * len(items), False
        for chunk, future in zip(chunks, futures):
            try:
                res = future.result()
            except Exception as e:  # noqa: BLE001 - a dead worker: the main process compiles these
                res = [{"error": f"precompile worker: {_why(e)}", "fatal": False}] * len(chunk)
                broken = True
            broken = broken or any(r.get("fatal") for r in res)
            for i, r in zip(chunk, res):
                results[i] = r
        if broken:
            self.close()
        return results, started

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


# ----------------------------------------------------------------------------- the file

_num, _opt = (int, float), (int, float, type(None))
RECORD = {"gpu": str, "triton": str, "torch": str, "mode": str, "shape": list, "layout": str,
          "dtype": str, "kernel": str, "config": dict, "source": str, "status": str, "ok": bool,
          "reason": (str, type(None)), "ms": _opt, "launch_split": int, "bytes": int, "gbps": _opt,
          "pct_of_copy": _opt, "copy_gbps": _num, "compile_s": _opt, "first_run_s": _opt,
          "date": str, "run": int}


def validate(doc) -> dict:
    """doc itself if it is a kernel dataset; else ValueError naming what is wrong."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f'not a tritonbn kernel dataset (no "format": "{FORMAT}")')
    if doc.get("version") != VERSION:
        raise ValueError(f"dataset version {doc.get('version')!r}, this code reads {VERSION}")
    for name, typ in (("mode", str), ("records", list), ("runs", list)):
        if not isinstance(doc.get(name), typ):
            raise ValueError(f"{name!r} missing or not a {typ.__name__}")
    for i, r in enumerate(doc["records"]):
        if not isinstance(r, dict):
            raise ValueError(f"record {i} is not an object")
        for name, typ in RECORD.items():
            if name not in r or not isinstance(r[name], typ):
                raise ValueError(f"record {i}: {name!r} missing or of the wrong type")
        for name, choices in (("kernel", KERNELS), ("source", SOURCES), ("status", STATUSES)):
            if r[name] not in choices:
                raise ValueError(f"record {i}: {name} {r[name]!r} is not one of {choices}")
        if r["ok"] != (r["status"] == "ok") or (r["ok"] and r["ms"] is None):
            raise ValueError(f"record {i}: ok, status and ms disagree")
        try:
            space.check_config(r["kernel"], config_from_dict(r["config"]))
        except ValueError as e:
            raise ValueError(f"record {i}: {e}") from None
    if not all(isinstance(run, dict) and "argv" in run for run in doc["runs"]):
        raise ValueError("every run must be an object with its argv")
    return doc


def load(path: str) -> dict:
    """The dataset in path, validated; ValueError naming the file otherwise."""
    return schema.read_validated(path, validate)


def variant_key(gpu: str, triton: str, shape, layout: str, dtype: str, kernel: str,
                config: dict) -> tuple:
    """What a record measures, and where: one per (GPU, triton version) and variant."""
    return (gpu, triton, tuple(shape), layout, dtype, kernel, json.dumps(config, sort_keys=True))


def record_key(r: dict) -> tuple:
    return variant_key(r["gpu"], r["triton"], r["shape"], r["layout"], r["dtype"], r["kernel"],
                       r["config"])


# ----------------------------------------------------------------------------- the run

def case_keys(shape_list, layouts, dtypes, tiny: bool) -> list[tuple]:
    """(shape, layout, dtype) in order: 4-D and 5-D shapes in each layout, others as they
    come; under the interpreter each shape shrunk (shapes.tiny), duplicates once."""
    out = []
    for shape in shape_list:
        shape = shapes.tiny(shape) if tiny else tuple(shape)
        for layout in (layouts if len(shape) >= 4 else ("contiguous",)):
            out += [(shape, layout, dtype) for dtype in dtypes]
    return list(dict.fromkeys(out))


def _record(env: dict, case: Case, kernel: str, cfg, source: str, result: dict,
            copy_gbps: float, compile_s, run: int) -> dict:
    shape, layout, dtype = case.key
    split = case.split(kernel, cfg)
    nbytes = model.kernel_bytes(kernel, case.numel, case.v.C, case.elem_size, split)
    gbps = model.gbps(nbytes, result["ms"]) if result["ms"] else None
    return {"gpu": env["device"], "triton": env["triton"], "torch": env["torch"],
            "mode": env["mode"], "shape": list(shape), "layout": layout, "dtype": dtype,
            "kernel": kernel, "config": config_dict(cfg), "source": source, **result,
            "ok": result["status"] == "ok", "launch_split": split, "bytes": nbytes, "gbps": gbps,
            "pct_of_copy": None if gbps is None else 100 * gbps / copy_gbps,
            "copy_gbps": copy_gbps, "compile_s": compile_s, "date": env["date"], "run": run}


def _device_problem(device: torch.device) -> str | None:
    if device.type == "cpu":
        if not ops.interpreting():
            return ("--device cpu runs the kernels through Triton's interpreter, which must be "
                    "chosen before triton is imported: run `TRITON_INTERPRET=1 python -m "
                    "tritonbn.perf.dataset --device cpu ...`")
        return None
    if not torch.cuda.is_available():
        return ("no CUDA device (torch.cuda.is_available() is False): nothing to time. "
                "--device cpu with TRITON_INTERPRET=1 runs the pipeline (not performance).")
    if ops.interpreting():
        return ("TRITON_INTERPRET is set, so kernels would be interpreted: unset it to time on "
                "the GPU")
    return None


def _compile_totals(batches: list) -> dict:
    """What precompiling bought over the run: the first runs' seconds, summed, against
    the wall time the workers took for them."""
    total = sum(b["compile_s_sum"] for b in batches)
    wall = sum(b["precompile_s"] for b in batches)
    return {"precompiled": sum(b["precompiled"] for b in batches), "compile_s_sum": total,
            "precompile_s": wall, "parallel_gain": total / wall if wall > 0 else None}


def plan(cases: dict, kernels, sms: int, limit: int | None) -> list[tuple]:
    """(case key, kernel, config, source) in measuring order: every heuristic config,
    then the candidates, round-robin across (case, kernel)."""
    heur = [(k, kern, c.heur[kern], "heuristic") for k, c in cases.items() for kern in kernels]
    lists = [[(k, kern, cfg, "candidate") for cfg in c.candidates(kern, sms, limit)]
             for k, c in cases.items() for kern in kernels]
    return heur + [i for col in itertools.zip_longest(*lists) for i in col if i is not None]


def batches(queue: list, size: int):
    """Slices of queue of about `size` items, a case's heuristic configs never split (the
    main process makes a case's data with them, so they come precompiled together)."""
    pos = 0
    while pos < len(queue):
        end = pos + size
        while (end < len(queue) and queue[end][3] == "heuristic"
               and queue[end][0] == queue[end - 1][0]):
            end += 1
        yield queue[pos:end]
        pos = end


def measure_batch(batch: list, pre: list, cases: dict, timer, entry: dict, make_record):
    """Check and time a batch's variants in this process: (records, whether a heuristic
    config failed, whether a failure broke this process's CUDA context)."""
    fresh, heuristic_failed = [], False
    for (key, kernel, cfg, source), p in zip(batch, pre):
        case, lost = cases[key], False
        if p.get("fatal"):
            result = dict(status="failed", ms=None, first_run_s=None,
                          reason=f"in a precompile worker, which it left without a CUDA context "
                                 f"(so not run here): {p['error']}")
        else:
            if source == "candidate":
                try:
                    case.reference(kernel)
                except Exception:  # noqa: BLE001 - the heuristic's own record says why
                    entry["unchecked"] += 1
                    continue
            result = case.measure(kernel, cfg, timer)
            lost = result["status"] == "failed" and not _device_ok(case.device)
        fresh.append(make_record(case, kernel, cfg, source, result, p.get("compile_s")))
        entry["counts"][result["status"]] += 1
        if source == "heuristic" and result["status"] != "ok":
            heuristic_failed = True
            print(f"HEURISTIC {result['status'].upper()} {kernel} {key}: {result['reason']}",
                  flush=True)
        if lost:
            return fresh, heuristic_failed, True
    return fresh, heuristic_failed, False


def run(args, argv: list) -> int:
    device = torch.device(args.device)
    problem = _device_problem(device)
    if problem:
        print(f"tritonbn.perf.dataset: {problem}", file=sys.stderr)
        return 2
    interpreted = device.type == "cpu"
    env = bench.environment(device, interpreted)
    gpu, triton_version, out = env["device"], env["triton"], args.out
    try:
        doc = load(out) if os.path.exists(out) else \
            {"format": FORMAT, "version": VERSION, "mode": env["mode"], "records": [], "runs": []}
    except ValueError as e:
        print(f"tritonbn.perf.dataset: --out {e}", file=sys.stderr)
        return 2
    if doc["mode"] != env["mode"]:
        print(f"tritonbn.perf.dataset: {out} holds {doc['mode']!r} records; a {env['mode']!r} "
              "run cannot append to it", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    bopts = bench.Options(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=args.cpu_reps)
    copy_gbps = bench.copy_bandwidth(device, bopts)
    cases = {k: Case(k, device, interpreted, args.seed)
             for k in case_keys(args.shapes, args.layouts, args.dtypes, interpreted)}
    planned = plan(cases, args.kernels, heuristics.sm_count(device), args.max_candidates)
    seen = set() if args.remeasure else \
        {record_key(r) for r in doc["records"] if r["gpu"] == gpu and r["triton"] == triton_version}
    queue = [i for i in planned
             if variant_key(gpu, triton_version, *i[0], i[1], config_dict(i[2])) not in seen]
    jobs, size = args.jobs, args.batch or max(8, 2 * args.jobs)
    entry = {"date": env["date"], "argv": list(argv), "gpu": gpu,
             **{k: env[k] for k in ("torch", "triton", "python", "mode")},
             "copy_gbps": copy_gbps, "jobs": jobs, "batch": size, "budget_s": args.budget_s,
             "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "planned": len(planned),
             "skipped_measured": len(planned) - len(queue), "measured": 0, "unchecked": 0,
             "counts": dict.fromkeys(STATUSES, 0), "batches": [], "complete": False}
    doc["runs"].append(entry)
    bench.write_json(doc, out)  # fail now, not after the run, if out is not writable
    budget = "none" if args.budget_s is None else f"{args.budget_s:g} s"
    print(f"tritonbn kernel dataset on {gpu} (triton {triton_version}): copy {copy_gbps:.0f} GB/s; "
          f"{len(cases)} (shape, layout, dtype) x {len(args.kernels)} kernels; {len(queue)} "
          f"variants to measure ({entry['skipped_measured']} already measured); jobs {jobs}, "
          f"batch {size}, budget {budget} -> {out}"
          + (f"\n  {schema.INTERPRETER_MODE}: tiny shapes through Triton's CPU interpreter"
             if interpreted else ""), flush=True)

    def make_record(case, kernel, cfg, source, result, compile_s):
        return _record(env, case, kernel, cfg, source, result, copy_gbps, compile_s,
                       len(doc["runs"]) - 1)

    workers = Workers(jobs, device) if jobs > 0 else None
    status, done = 0, 0
    try:
        for batch in batches(queue, size):
            if args.budget_s is not None and time.monotonic() - t_start > args.budget_s:
                print(f"time budget of {budget} spent: {len(queue) - done} variants not measured",
                      flush=True)
                break
            t0 = time.perf_counter()
            pre, started = (workers.run([i[:3] for i in batch]) if workers
                            else ([{}] * len(batch), False))
            t1 = time.perf_counter()
            fresh, failed, lost = measure_batch(batch, pre, cases,
                                                lambda fn: bench.time_ms(fn, device, bopts),
                                                entry, make_record)
            status = 1 if failed else status
            done += len(batch)
            compiles = [p["compile_s"] for p in pre if "compile_s" in p]
            entry["batches"].append({
                "variants": len(batch), "precompile_s": t1 - t0, "started_workers": started,
                "precompiled": len(compiles), "compile_s_sum": sum(compiles),
                "compile_s_max": max(compiles, default=None),
                "measure_s": time.perf_counter() - t1})
            replaced = {record_key(r) for r in fresh}
            doc["records"] = [r for r in doc["records"] if record_key(r) not in replaced] + fresh
            entry["measured"] += len(fresh)
            entry["compile"] = _compile_totals(entry["batches"])
            entry["complete"] = done == len(queue) and not lost
            entry["seconds"] = time.monotonic() - t_start
            bench.write_json(doc, out)
            pre_text = (f"precompiled in {t1 - t0:.1f} s by {jobs} workers (compiles summing "
                        f"{sum(compiles):.1f} s), " if workers else "")
            print(f"batch {len(entry['batches'])}: {len(batch)} variants, {pre_text}measured in "
                  f"{entry['batches'][-1]['measure_s']:.1f} s; {done}/{len(queue)} after "
                  f"{entry['seconds']:.0f} s", flush=True)
            if lost:
                print("tritonbn.perf.dataset: a failed launch broke the CUDA context; stopping "
                      "(its record says which); a rerun goes on from here", file=sys.stderr)
                return 1
    finally:
        if workers:
            workers.close()
    entry["complete"] = done == len(queue)
    entry["seconds"] = time.monotonic() - t_start
    bench.write_json(doc, out)
    print(f"\n{entry['measured']} records in {entry['seconds']:.0f} s -> {out}"
          + (f"  [{schema.INTERPRETER_MODE}]" if interpreted else ""))
    c = entry.get("compile")
    if workers and c:
        print(f"precompiled {c['precompiled']} variants with {jobs} workers: first runs summing "
              f"{c['compile_s_sum']:.1f} s in {c['precompile_s']:.1f} s of wall time "
              f"({c['parallel_gain']:.1f}x; the first batch's includes starting the workers)")
    print("\n".join(summary(doc, gpu, triton_version, cases, args.kernels)))
    return status


def summary(doc: dict, gpu: str, triton: str, cases: dict, kernels) -> list[str]:
    """Per kernel, over the file's records of this GPU and triton for the run's cases:
    the heuristic configs' median % of copy, candidates by status, and the gain of the
    fastest ok candidate (heuristic ms / its ms), median and max over cases."""
    groups = {}  # (shape, layout, dtype, kernel) -> records
    for r in doc["records"]:
        if r["gpu"] == gpu and r["triton"] == triton:
            groups.setdefault(record_key(r)[2:6], []).append(r)
    lines = [f"{'kernel':<14}{'cases':>6}{'heur %copy':>12}{'ok':>6}{'rejected':>9}{'failed':>7}"
             f"{'gain median':>13}{'gain max':>10}"]
    for kernel in kernels:
        pcts, gains, counts = [], [], dict.fromkeys(STATUSES, 0)
        for key, case in cases.items():
            mine = groups.get((*key, kernel), [])
            heur = config_dict(case.heur[kernel])
            h = next((r for r in mine if r["config"] == heur and r["ok"]), None)
            cands = [r for r in mine if r["config"] != heur]
            for r in cands:
                counts[r["status"]] += 1
            if h is None:
                continue
            pcts.append(h["pct_of_copy"])
            best = min((r["ms"] for r in cands if r["ok"]), default=None)
            if best:
                gains.append(h["ms"] / best)
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append(f"{kernel:<14}{len(pcts):>6}"
                     f"{fmt(statistics.median(pcts) if pcts else None, '.1f'):>12}"
                     f"{counts['ok']:>6}{counts['rejected']:>9}{counts['failed']:>7}"
                     f"{fmt(statistics.median(gains) if gains else None, '.3f'):>13}"
                     f"{fmt(max(gains, default=None), '.3f'):>10}")
    return lines


def _shapes(text: str) -> list[tuple]:
    from ..tuning.command import parse_shapes

    if text.strip() == "dataset":
        return list(SHAPES)
    try:
        return parse_shapes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m tritonbn.perf.dataset",
        description="Time each kernel alone, config by config (the heuristic's, then the tuning "
                    "space's), into one JSON dataset that later runs append to; for fitting the "
                    "launch heuristics.")
    p.add_argument("--out", required=True, help="the dataset JSON; appended to if it exists")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: tiny shapes through Triton's interpreter (TRITON_INTERPRET=1), "
                        "not performance")
    p.add_argument("--shapes", type=_shapes, default=list(SHAPES),
                   help="dataset (default: ResNet-50's (64,56), (512,28), (1024,14), (2048,7) at "
                        "batch 256 and 32, 20,6,65536 and 4096,1024), a bench shape set, or "
                        "shapes 'N,C,H,W;N,C'; with --device cpu each shrunk (shapes.tiny)")
    p.add_argument("--dtypes", type=csv_choices(tuple(bench.DTYPES)), default=DTYPES,
                   help=f"default {','.join(DTYPES)}")
    p.add_argument("--layouts", type=csv_choices(LAYOUTS), default=LAYOUTS,
                   help="of 4-D and 5-D shapes (others have one); default both")
    p.add_argument("--kernels", type=csv_choices(KERNELS), default=KERNELS,
                   help=f"default all: {','.join(KERNELS)}")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new batch after this many seconds")
    p.add_argument("--max-candidates", type=int, default=None,
                   help="candidates per (shape, layout, dtype, kernel): the first N of its space")
    p.add_argument("--jobs", type=int, default=None,
                   help="precompile worker processes; default min(14, CPUs - 2) on cuda, 0 on cpu; "
                        "0: no precompile")
    p.add_argument("--batch", type=int, default=None,
                   help="variants per batch (precompile, then time); default max(8, 2 x jobs)")
    p.add_argument("--warmup-ms", type=float, default=2.0, help="do_bench warm-up per variant")
    p.add_argument("--rep-ms", type=float, default=10.0,
                   help="do_bench repetition time per variant")
    p.add_argument("--cpu-reps", type=int, default=3, help="timed runs per variant on the CPU")
    p.add_argument("--remeasure", action="store_true",
                   help="measure again what the file holds for this GPU and triton (replacing it)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.jobs is None:
        args.jobs = max(0, min(14, (os.cpu_count() or 1) - 2)) if args.device == "cuda" else 0
    if args.jobs < 0 or (args.batch is not None and args.batch < 1) or \
            (args.max_candidates is not None and args.max_candidates < 0):
        p.error("--jobs and --max-candidates must be >= 0, --batch >= 1")
    args.kernels = tuple(k for k in KERNELS if k in args.kernels)  # stage order
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
