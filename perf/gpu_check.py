"""One prepared GPU lease: every check worth a GPU, in order of value per second,
each under a hard limit, inside one ~9-minute `run`, with everything it wrote
packed into one archive after every stage.

The device tool brings back at most 8 files from $OUT, two folders down, and a
command killed at its limit returns only what is already there. So stages write
into a work directory outside OUTDIR, and after each stage (finished, failed or
killed at its limit) the whole of it is packed into OUTDIR/gpu_check.tar.gz
(replaced atomically) next to OUTDIR/summary.txt. Unpack with
`python perf/gpu_check.py unpack OUTDIR/gpu_check.tar.gz` (docs/performance.md, "On a GPU").

Stages (default order; limits in seconds, 530 in all, with the environment 535):
  smoke      pytest -m gpu_smoke: each kernel family compiled once, realistic
             shapes and small edge cases, against torch in float64; CUDA graphs,
             Inductor, no host sync                                          85
  headline   bench resnet50 (batch 256, then 32), fp16 channels_last bn_relu:
             tritonbn and torch (cuDNN) first, then torch.compile (default mode,
             to fit; the records say which mode) with what is left; eager
             timing (host time included)                                      90
  device     the headline's tritonbn and torch again, each pass replayed from a
             CUDA graph (bench --timing graph): the device's time alone, into
             <name>-graph.json (the first lease's eager timings were host-bound) 45
  paths      bench the split path against the single-program one where both
             apply (BatchNorm1d 256-16384 samples, resnet50 b32 7x7 and
             14x14), fp16 bn_relu, graph-timed: sets the dispatch threshold;
             then, eager, the split path's combines in launches of their own
             against the last-program combine                                30
  short_rows perf/short_rows.py: the four tile kernels alone at the 7x7 NCHW fp16
             layers (batch 32 and 256), 4 vs 8 warps, flat tiles on and off:
             the choices made from the sm_90 compile alone                   25
  dataset    the per-kernel dataset: the six kernels alone, heuristic configs on
             every shape, then tuning candidates, compiled ahead in parallel;
             appended to perf/results/kernel-dataset.json                    70
  wider      bench resnet50: fp16/bf16, channels_last/NCHW, bn_relu and
             bn_add_relu, tritonbn vs torch; cases already measured on this
             GPU (this run or perf/results) are skipped, so leases add up     25
  tune       tritonbn tune resnet50/b256 fp16 channels_last, exported as the
             shipped configs for this GPU                                     30
  sanitizer  compute-sanitizer memcheck on small shapes, fp16, relu with and
             without the residual's 1-bit mask, on both paths                 35
  ncu        Nsight Compute on the six kernels at two shapes: DRAM % of peak,
             occupancy, warp stall reasons (clocks left alone)                35
  eager      20 BN+ReLU layers, eager vs CUDA graph: host time per layer      40
  report     `tritonbn report` of the bench JSON, and of the graph-timed one  20
By name only: tests (the whole suite, ~5 min), compiled (perf/compiled_step.py),
quick (bench quick, every dtype/layout).

Usage: python perf/gpu_check.py OUTDIR [STAGE ...] [--total-s 535] [--dry-run]
       perf/gpu_check.sh OUTDIR [STAGE ...]       (the same)
Run it with the device tool's timeout_s about 20 s above --total-s (555).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "perf" / "results"
DATASET = "kernel-dataset.json"
ARCHIVE = "gpu_check.tar.gz"
TOTAL_S = 535
MAX_FILE_BYTES = 8 << 20  # a file larger than this is left out of the archive (and listed)
PY = sys.executable


@dataclass
class Cmd:
    argv: list
    stdout: Path | None = None  # the command's stdout goes here instead of the stage log


@dataclass
class Ctx:
    """What stages know: where to write, which GPU, and the time left."""
    work: Path
    name: str  # <date>-<gpu slug>: the archive's folder, perf/results/<name>/
    slug: str
    stage_deadline: float = 0.0

    @property
    def bench_json(self) -> Path:
        return self.work / f"{self.name}.json"

    @property
    def graph_json(self) -> Path:
        """The bench records timed from CUDA-graph replay (device time alone)."""
        return self.work / f"{self.name}-graph.json"

    def left(self) -> float:
        """Seconds left in the running stage."""
        return self.stage_deadline - time.monotonic()


def _bench(ctx: Ctx, *args, graph: bool = False) -> list:
    """tritonbn bench appending to this lease's eager results, or (graph) to its
    CUDA-graph-timed ones: one timing per file."""
    out, timing = (ctx.graph_json, "graph") if graph else (ctx.bench_json, "eager")
    return [PY, "-m", "tritonbn", "bench", "--out", str(out), "--append", "--timing", timing,
            "--warmup-ms", "10", "--rep-ms", "40", "--no-progress", *args]


def _budget(seconds: float) -> str:
    return str(max(1, int(seconds)))


def _xdist() -> list:
    """pytest-xdist's options where it is installed (the GPU machine): compiles in parallel."""
    return ["-n", "8"] if importlib.util.find_spec("xdist") else []


def _smoke(ctx):
    yield Cmd([PY, "-m", "pytest", "-q", "-m", "gpu_smoke", *_xdist(), "-p", "no:cacheprovider",
               f"--junitxml={ctx.work / 'smoke.xml'}", "tests"])


def _headline(ctx):
    target = ["--shapes", "resnet50", "--dtypes", "float16", "--layouts", "channels_last",
              "--ops", "bn_relu"]
    yield Cmd(_bench(ctx, *target, "--impls", "tritonbn,torch",
                     "--budget-s", _budget(ctx.left() * 0.4)))
    # torch.compile costs a compile per case: it takes what is left, batch 256 first
    yield Cmd(_bench(ctx, *target, "--impls", "torch_compile", "--compile-mode", "default",
                     "--budget-s", _budget(ctx.left() - 35)))


def _device(ctx):
    yield Cmd(_bench(ctx, "--shapes", "resnet50", "--dtypes", "float16", "--layouts",
                     "channels_last", "--ops", "bn_relu", "--impls", "tritonbn,torch",
                     "--budget-s", _budget(ctx.left() - 8), graph=True))


def _paths(ctx):
    yield Cmd(_bench(ctx, "--shapes", "paths", "--dtypes", "float16", "--ops", "bn_relu",
                     "--impls", "tritonbn_split,tritonbn_fused,torch",
                     "--budget-s", _budget(ctx.left() * 0.6 - 4), graph=True))
    # eager: a CUDA graph capture takes the combine launches either way (ops._counter)
    yield Cmd(_bench(ctx, "--shapes", "paths", "--dtypes", "float16", "--ops", "bn_relu",
                     "--impls", "tritonbn_split,tritonbn_kernel_combine",
                     "--budget-s", _budget(ctx.left() - 8)))


def _short_rows(ctx):
    yield Cmd([PY, "perf/short_rows.py", "--out", str(ctx.work / "short_rows.json")])


def _dataset(ctx):
    yield Cmd([PY, "-m", "tritonbn.perf.dataset", "--out", str(ctx.work / DATASET),
               "--budget-s", _budget(ctx.left() - 30), "--jobs", "14"])


def _wider(ctx):
    yield Cmd(_bench(ctx, "--shapes", "resnet50", "--dtypes", "float16,bfloat16",
                     "--layouts", "channels_last,NCHW", "--ops", "bn_relu,bn_add_relu",
                     "--impls", "tritonbn,torch", "--skip-measured", str(ctx.bench_json), str(RESULTS),
                     "--budget-s", _budget(ctx.left() - 8)))


def _tune(ctx):
    yield Cmd([PY, "-m", "tritonbn", "tune", "--shapes", "resnet50/b256", "--dtype", "float16",
               "--layout", "channels_last", "--budget-s", _budget(ctx.left() - 10),
               "--warmup-ms", "2", "--rep-ms", "10", "--no-progress",
               "--export", str(ctx.work / "configs" / f"{ctx.slug}.json")])


def _sanitizer(ctx):
    yield Cmd(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", PY,
               "perf/check_realistic.py", "--small", "--dtypes", "float16",
               "--out", str(ctx.work / "sanitizer_small.json")])


NCU_SHAPES = [("256,64,56,56", "channels_last", "float16", "resnet_b256_64x56x56_cl_fp16"),
              ("32,2048,7,7", "NCHW", "float16", "resnet_b32_2048x7x7_nchw_fp16")]


def _ncu(ctx):
    ncu = _load("ncu_kernels")
    csvs = []
    for shape, layout, dtype, label in NCU_SHAPES:
        csv = ctx.work / f"ncu_{label}.csv"
        csvs += [str(csv), "--label", label]
        yield Cmd(ncu.ncu_command(shape, layout, dtype, csv, python=PY))
    yield Cmd([PY, "perf/ncu_kernels.py", "parse", *csvs, "--out", str(ctx.work / "ncu.json")])


def _eager(ctx):
    yield Cmd([PY, "perf/eager_step.py", "--out", str(ctx.work / "eager_step.json")])


def _report(ctx):
    yield Cmd([PY, "-m", "tritonbn", "report", str(ctx.bench_json), "--out",
               str(ctx.work / "report")])
    if ctx.graph_json.exists():
        yield Cmd([PY, "-m", "tritonbn", "report", str(ctx.graph_json), "--out",
                   str(ctx.work / "report-graph")])


def _tests(ctx):
    yield Cmd([PY, "-m", "pytest", "-q", *_xdist(), "-p", "no:cacheprovider", "tests"])


def _compiled(ctx):
    yield Cmd([PY, "perf/compiled_step.py", "--out", str(ctx.work / "compiled_step.json")])


def _quick(ctx):
    yield Cmd(_bench(ctx, "--shapes", "quick", "--impls", "tritonbn,torch",
                     "--budget-s", _budget(ctx.left() - 15)))


@dataclass
class Stage:
    name: str
    limit_s: float
    commands: object  # ctx -> iterator of Cmd, built one at a time (budgets from the time left)
    default: bool = True


STAGES = [
    Stage("smoke", 85, _smoke), Stage("headline", 90, _headline), Stage("device", 45, _device),
    Stage("paths", 30, _paths), Stage("short_rows", 25, _short_rows),
    Stage("dataset", 70, _dataset), Stage("wider", 25, _wider), Stage("tune", 30, _tune),
    Stage("sanitizer", 35, _sanitizer), Stage("ncu", 35, _ncu),
    Stage("eager", 40, _eager), Stage("report", 20, _report),
    Stage("tests", 300, _tests, default=False), Stage("compiled", 60, _compiled, default=False),
    Stage("quick", 60, _quick, default=False),
]
BY_NAME = {s.name: s for s in STAGES}


def _load(name: str):
    """A script of perf/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "perf" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- running


@dataclass
class Outcome:
    name: str
    limit_s: float
    status: str = "not run"  # ok, failed (rc), killed at limit, skipped (why)
    rc: int | None = None
    seconds: float = 0.0
    commands: list = field(default_factory=list)


def _env(work: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p),
               TRITONBN_CACHE_DIR=str(work / "tuning-cache"))  # tuned configs come back too
    env.setdefault("TRITON_CACHE_DIR", str(work.parent / "triton-cache"))  # shared, not packed
    env.pop("TRITON_INTERPRET", None)
    return env


def _kill(proc: subprocess.Popen) -> None:
    """The command and everything it started (xdist workers, compile pools, ncu's target)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_command(cmd: Cmd, log: Path, timeout: float, env: dict) -> tuple[int | None, bool]:
    """(return code, killed at the limit) of one command, its output appended to log."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd.argv))}   [{datetime.datetime.now():%H:%M:%S}, "
                f"limit {timeout:.0f} s]\n")
        f.flush()
        out = open(cmd.stdout, "w") if cmd.stdout else f
        try:
            proc = subprocess.Popen([str(a) for a in cmd.argv], cwd=ROOT, env=env, stdout=out,
                                    stderr=f, start_new_session=True)
        except OSError as e:  # e.g. compute-sanitizer or ncu not installed
            f.write(f"cannot start: {e}\n")
            return 127, False
        finally:
            if cmd.stdout:
                out.close()
        try:
            return proc.wait(timeout=max(timeout, 0.1)), False
        except subprocess.TimeoutExpired:
            _kill(proc)
            f.write(f"\nkilled at the stage's limit ({timeout:.0f} s left when it started)\n")
            return proc.returncode, True


def run_stage(stage: Stage, ctx: Ctx, seconds: float, env: dict) -> Outcome:
    res = Outcome(stage.name, seconds)
    log = ctx.work / "logs" / f"{stage.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ctx.stage_deadline = t0 + seconds
    rcs, killed = [], False
    try:
        for cmd in stage.commands(ctx):
            left = ctx.left()
            if left < 2:
                killed = True
                break
            res.commands.append(" ".join(map(str, cmd.argv)))
            rc, killed = run_command(cmd, log, left, env)
            rcs.append(rc)
            if killed:
                break
    except Exception as e:  # noqa: BLE001 - a stage that cannot even build its command
        with open(log, "a") as f:
            f.write(f"stage error: {type(e).__name__}: {e}\n")
        rcs.append(1)
    res.seconds = time.monotonic() - t0
    res.rc = max((r for r in rcs if r is not None), default=None)
    res.status = ("killed at limit" if killed else "ok" if rcs and res.rc == 0 else
                  f"failed (rc {res.rc})")
    return res


def pack(work: Path, out: Path, outcomes: list) -> Path:
    """work/ as OUTDIR/gpu_check.tar.gz (atomically replaced) and OUTDIR/summary.txt."""
    (work / "stages.json").write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    text = summary(outcomes)
    (work / "summary.txt").write_text(text)
    left_out = []
    tmp = out / f".{ARCHIVE}.tmp"

    def keep(info: tarfile.TarInfo):
        if info.isfile() and info.size > MAX_FILE_BYTES:
            left_out.append(f"{info.name} ({info.size} bytes)")
            return None
        return info

    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(work, arcname=work.name, filter=keep)
    os.replace(tmp, out / ARCHIVE)
    if left_out:
        text += "\nleft out of the archive (over 8 MiB): " + ", ".join(left_out) + "\n"
    (out / "summary.txt").write_text(text)
    return out / ARCHIVE


def summary(outcomes: list) -> str:
    lines = [f"{'stage':10} {'status':18} {'s':>6} {'limit':>6}"]
    for o in outcomes:
        lines.append(f"{o.name:10} {o.status[:18]:18} {o.seconds:6.0f} {o.limit_s:6.0f}")
    return "\n".join(lines) + "\n"


def _tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def gpu_identity() -> tuple[str, str]:
    """(<date>-<gpu slug>, slug) of the GPU torch sees."""
    import torch

    slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"{datetime.date.today().isoformat()}-{slug}", slug


def plan(names: list, total_s: float) -> list[Stage]:
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"gpu_check: unknown stage(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names] if names else [s for s in STAGES if s.default]


def run(stages: list[Stage], ctx: Ctx, out: Path, total_s: float, env: dict | None = None,
        t_start: float | None = None) -> list[Outcome]:
    """Run stages in order inside total_s (the report keeps its time to the end),
    packing after each one. Returns the outcomes."""
    env = env if env is not None else _env(ctx.work)
    deadline = (t_start or time.monotonic()) + total_s
    outcomes = [Outcome(s.name, s.limit_s) for s in stages]
    pack(ctx.work, out, outcomes)
    for i, stage in enumerate(stages):
        reserve = sum(s.limit_s for s in stages[i + 1:] if s.name == "report")
        seconds = min(stage.limit_s, deadline - time.monotonic() - reserve)
        if seconds < min(5, stage.limit_s):  # not worth starting
            outcomes[i].status = "skipped (no time)"
        else:
            print(f"== {stage.name} ({seconds:.0f} s, {datetime.datetime.now():%H:%M:%S})",
                  flush=True)
            outcomes[i] = run_stage(stage, ctx, seconds, env)
            print(f"   {outcomes[i].status} in {outcomes[i].seconds:.0f} s\n"
                  + _tail(ctx.work / "logs" / f"{stage.name}.log"), flush=True)
        pack(ctx.work, out, outcomes)
    return outcomes


def _seed_dataset(work: Path) -> None:
    """Start from the committed dataset, so this lease appends to it."""
    src = RESULTS / DATASET
    if src.exists():
        shutil.copy2(src, work / DATASET)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="OUTDIR: gets gpu_check.tar.gz and summary.txt ($OUT on the device)")
    p.add_argument("stages", nargs="*", help=f"stages to run, in order (default: the default "
                                             f"ones); of {', '.join(BY_NAME)}")
    p.add_argument("--total-s", type=float, default=TOTAL_S,
                   help=f"seconds for the whole run (default {TOTAL_S}); stages past it are skipped")
    p.add_argument("--work", help="work directory (default: a new one under the temp dir)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the stages, their limits and commands; run nothing (no GPU needed)")
    args = p.parse_args(argv)
    stages = plan(args.stages, args.total_s)
    if args.dry_run:
        ctx = Ctx(Path(args.work or "WORK") / "DATE-GPU", "DATE-GPU", "GPU")
        total = 0.0
        for s in stages:
            total += s.limit_s
            ctx.stage_deadline = time.monotonic() + s.limit_s  # budgets as if it had all of it
            print(f"{s.name:10} {s.limit_s:5.0f} s")
            for cmd in s.commands(ctx):
                print("    " + " ".join(map(str, cmd.argv))
                      + (f" > {cmd.stdout}" if cmd.stdout else ""))
        print(f"total of stage limits {total:.0f} s; --total-s {args.total_s:.0f} s")
        return 0
    t_start = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    name, slug = gpu_identity()
    parent = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    ctx = Ctx(parent / name, name, slug)
    ctx.work.mkdir(parents=True, exist_ok=True)
    env = _env(ctx.work)
    with open(ctx.work / "env.txt", "w") as f:
        subprocess.run(["nvidia-smi"], stdout=f, stderr=subprocess.STDOUT, check=False)
        subprocess.run([PY, "-c", "import torch, triton, platform; print('python', "
                        "platform.python_version(), 'torch', torch.__version__, 'triton', "
                        "triton.__version__, 'cuda', torch.version.cuda, 'gpu', "
                        "torch.cuda.get_device_name())"], stdout=f, stderr=subprocess.STDOUT,
                       env=env, check=False)
    _seed_dataset(ctx.work)
    print(f"gpu_check {name}: {', '.join(s.name for s in stages)}; {args.total_s:.0f} s in all; "
          f"archive {out / ARCHIVE}", flush=True)
    outcomes = run(stages, ctx, out, args.total_s, env, t_start)
    print("\n" + summary(outcomes), flush=True)
    return 0 if all(o.status == "ok" for o in outcomes) else 1


# ----------------------------------------------------------------------------- unpacking


def unpack(archive: Path, results: Path = RESULTS, configs: Path = ROOT / "tritonbn" / "configs"
           ) -> Path:
    """A lease's archive into results/<date>-<gpu>/; its dataset (which started as the
    committed one and was appended to) replaces results/kernel-dataset.json, and its
    exported configs go to tritonbn/configs/. Returns the results folder."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        tops = {Path(m.name).parts[0] for m in members}
        bad = [m.name for m in members if Path(m.name).is_absolute() or ".." in Path(m.name).parts
               or not (m.isfile() or m.isdir())]
        if len(tops) != 1 or bad:
            raise SystemExit(f"gpu_check unpack: {archive} is not one folder of plain files")
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(results, members=members, **kw)
    folder = results / tops.pop()
    if (folder / DATASET).exists():
        shutil.move(str(folder / DATASET), str(results / DATASET))
    for cfg in sorted((folder / "configs").glob("*.json")):
        configs.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cfg, configs / cfg.name)
    shutil.rmtree(folder / "tuning-cache", ignore_errors=True)  # the exported configs say it
    return folder


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "unpack":
        ap = argparse.ArgumentParser(prog="gpu_check.py unpack")
        ap.add_argument("archive")
        ap.add_argument("--results", default=str(RESULTS))
        ap.add_argument("--configs", default=str(ROOT / "tritonbn" / "configs"))
        a = ap.parse_args(sys.argv[2:])
        print(unpack(Path(a.archive), Path(a.results), Path(a.configs)))
        sys.exit(0)
    sys.exit(main())
