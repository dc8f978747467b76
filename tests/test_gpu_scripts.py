"""The GPU check's standalone scripts, on the CPU: perf/ncu_kernels.py (its ncu
command line, its parser of ncu's raw CSV, its refusal without CUDA) and
perf/eager_step.py (an interpreter smoke run)."""
import importlib.util
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "perf" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ncu = _load("ncu_kernels")

STALL = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
# ncu --csv --page raw: a header of launch columns then one column per metric
# (launch__waves_per_multiprocessor missing here), a units row, one row per
# launch, values with thousands separators; ==PROF== lines and the application's
# own output before it.
HEADER = (["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream",
           "Block Size", "Grid Size", "Device", "CC",
           "dram__bytes_read.sum", "dram__bytes_write.sum",
           "dram__throughput.avg.pct_of_peak_sustained_elapsed", "gpu__time_duration.sum",
           "launch__block_size", "launch__grid_size", "launch__registers_per_thread",
           "sm__maximum_warps_per_active_cycle_pct",
           "sm__warps_active.avg.pct_of_peak_sustained_active"]
          + [STALL.format(r) for r in ("barrier", "long_scoreboard", "selected", "wait",
                                       "lg_throttle")])
UNITS = [""] * 11 + ["Mbyte", "byte", "%", "usecond", "", "", "register/thread", "%", "%"] + [""] * 5
ROWS = [
    ["0", "4711", "python3", "h", "stats_partial_kernel", "1", "7", "(128, 1, 1)", "(2, 528, 1)",
     "0", "9.0", "51.38", "1,056", "71.2", "21.5", "128", "1,056", "40", "100", "87.5",
     "0.5", "12.25", "50", "2.5", "7.75"],
    ["1", "4711", "python3", "h",
     "void at::native::(anonymous namespace)::vectorized_elementwise_kernel<4, "
     "at::native::AddFunctor<long>>(int, float *)", "1", "7", "(64, 1, 1)", "(1, 1, 1)",
     "0", "9.0", "0", "0", "0.1", "1.25", "64", "1", "16", "50", "3.1",
     "", "0.3", "1", "9", "n/a"],
]


def _csv_text(header=HEADER, units=UNITS, rows=ROWS):
    quote = lambda row: ",".join(f'"{v}"' for v in row)  # noqa: E731 - ncu quotes every field
    lines = ["==PROF== Connected to process 4711 (/usr/bin/python3.12)",
             "ncu_kernels run: one training step of BatchNorm2d(64, relu)",
             '==PROF== Profiling "stats_partial_kernel" - 0: 0%....50%....100% - 9 passes',
             "==PROF== Disconnected from process 4711", quote(header)]
    if units is not None:
        lines.append(quote(units))
    return "\n".join(lines + [quote(r) for r in rows]) + "\n"


def test_ncu_parser_reads_raw_csv():
    rows, units = ncu.read_raw_csv(_csv_text())
    assert len(rows) == 2 and units["gpu__time_duration.sum"] == "usecond"
    stats, add = ncu.summarize(rows, units, "b256")
    assert stats["kernel"] == "stats_partial_kernel" and stats["label"] == "b256"
    assert add["kernel"] == "vectorized_elementwise_kernel" and add["id"] == 1
    assert stats["time_us"] == pytest.approx(21.5)
    assert stats["dram_read_bytes"] == 51_380_000 and stats["dram_write_bytes"] == 1056
    assert stats["dram_bytes"] == 51_381_056
    assert stats["dram_gb_per_s"] == pytest.approx(51_381_056 / 21.5e-6 / 1e9)
    assert stats["dram_pct"] == pytest.approx(71.2)
    assert (stats["achieved_occupancy_pct"], stats["theoretical_occupancy_pct"]) == (87.5, 100)
    assert (stats["registers"], stats["block"], stats["grid"]) == (40, 128, 1056)
    assert stats["waves"] is None  # not in the CSV
    # the top 3 by value, "selected" (an issue, not a stall) left out
    assert stats["stalls"] == [{"reason": "long_scoreboard", "value": 12.25},
                               {"reason": "lg_throttle", "value": 7.75},
                               {"reason": "wait", "value": 2.5}]
    # empty and "n/a" values are left out, not read as 0
    assert [s["reason"] for s in add["stalls"]] == ["wait", "long_scoreboard"]
    assert ncu.missing_metrics(rows) == ["waves"]


def test_ncu_parser_takes_newer_metric_names():
    """Newer ncu names DRAM throughput gpu__dram_throughput.*, and its stall columns
    may be per-warp latencies; both are read."""
    header = [h.replace("dram__throughput", "gpu__dram_throughput") for h in HEADER]
    header = [h.replace("smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active",
                        "smsp__average_warp_latency_issue_stalled_long_scoreboard") for h in header]
    rows, units = ncu.read_raw_csv(_csv_text(header=header))
    stats = ncu.summarize(rows, units, "b256")[0]
    assert stats["dram_pct"] == pytest.approx(71.2)
    assert stats["stalls"][0] == {"reason": "long_scoreboard", "value": 12.25}


def test_ncu_parser_units_and_header():
    """Without a units row values are taken in ncu's base units (ns, bytes); a unit
    it does not know gives None rather than a wrong number; no header is an error."""
    rows, units = ncu.read_raw_csv(_csv_text(units=None))
    assert units == {} and len(rows) == 2
    assert ncu.summarize(rows, units, "x")[0]["time_us"] == pytest.approx(0.0215)
    odd = list(UNITS)
    odd[HEADER.index("gpu__time_duration.sum")] = "cycle"
    rows, units = ncu.read_raw_csv(_csv_text(units=odd))
    assert ncu.summarize(rows, units, "x")[0]["time_us"] is None
    with pytest.raises(ValueError, match="Kernel Name"):
        ncu.read_raw_csv("==PROF== no kernels were profiled\n")


def test_ncu_parse_command_writes_summary(tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text(_csv_text())
    b.write_text(_csv_text(rows=ROWS[:1]))
    out = tmp_path / "summary.json"
    # labels after the files, or each after its file (as perf/gpu_check.py passes them)
    assert ncu.main(["parse", str(a), str(b), "--label", "b256", "--label", "b32"]) == 0
    assert ncu.main(["parse", str(a), "--label", "b256", str(b), "--label", "b32",
                     "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [(k["label"], k["kernel"]) for k in doc["kernels"]] == [
        ("b256", "stats_partial_kernel"), ("b256", "vectorized_elementwise_kernel"),
        ("b32", "stats_partial_kernel")]
    assert doc["labels"]["b256"]["time_us"] == pytest.approx(22.75)
    assert doc["labels"]["b32"]["missing_metrics"] == ["waves"]
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 * 4  # each call: a header, then 3 kernels
    assert table[1].split()[:2] == ["b256", "stats_partial_kernel"]
    assert "long_scoreboard 12.2, lg_throttle 7.8, wait 2.5" in table[1]
    assert ncu.main(["parse", str(a), str(b), "--label", "only-one"]) == 2
    assert "2 CSV files but 1 labels" in capsys.readouterr().err
    # a failed ncu run (no header) is reported with ncu's reason, the other files still read
    failed = tmp_path / "failed.csv"
    failed.write_text("==PROF== Connected to process 1\n"
                      "==ERROR== Failed to find metric dram__no_such_metric\n")
    assert ncu.main(["parse", str(failed), str(a), str(tmp_path / "never.csv"),
                     "--out", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert "dram__no_such_metric" in doc["labels"]["failed"]["error"]
    assert "No such file" in doc["labels"]["never"]["error"]
    assert doc["labels"]["a"]["kernels"] == 2


def test_ncu_command():
    cmd = ncu.ncu_command((256, 64, 56, 56), "channels_last", "float16", "/tmp/x.csv")
    pairs = list(zip(cmd, cmd[1:]))
    assert cmd[0] == "ncu"
    for pair in [("--clock-control", "none"), ("--profile-from-start", "off"),
                 ("--target-processes", "all"), ("--page", "raw"), ("--log-file", "/tmp/x.csv")]:
        assert pair in pairs
    assert "--csv" in cmd
    metrics = cmd[cmd.index("--metrics") + 1].split(",")
    assert metrics == ["dram__bytes_read.sum", "dram__bytes_write.sum"]
    sections = [b for a, b in pairs if a == "--section"]
    assert sections == ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats"]
    app = cmd[cmd.index("python3"):]
    assert app[1] == "perf/ncu_kernels.py"  # from the repository root, where the check runs it
    assert app[2:] == ["run", "--shape", "256,64,56,56", "--layout", "channels_last",
                       "--dtype", "float16"]
    # the command mode prints the same argv, shell-quoted
    proc = subprocess.run([sys.executable, str(ROOT / "perf" / "ncu_kernels.py"), "command",
                           "--shape", "256,64,56,56", "--out-csv", "/tmp/x.csv"],
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == cmd


def _script(name, *args, interpret):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(ROOT / "perf" / f"{name}.py"), *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_ncu_run_refuses_without_cuda():
    proc = _script("ncu_kernels", "run", "--shape", "2,8,4,4", interpret=True)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr


def test_eager_step_smoke(tmp_path):
    """Both stacks train through the interpreter; the JSON says it is not performance."""
    out = tmp_path / "eager.json"
    proc = _script("eager_step", "--device", "cpu", "--out", str(out), interpret=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "interpreter, not performance" and doc["layers"] == 3
    assert [r["impl"] for r in doc["records"]] == ["tritonbn", "torch"]
    for r in doc["records"]:
        assert "error" not in r and r["shape"] == [2, 8, 4, 4] and r["eager_ms"] > 0
        assert "graph_ms" not in r  # no CUDA graph on the CPU


def test_launch_host_times_each_kept_launch(monkeypatch):
    """eager_step.launch_host_us with stand-in compiled kernels (the fast launch on
    the CPU): one record per launch of the small training step, the single-program
    forward and backward, each way timed, the launcher called with every pointer and
    scalar."""
    from tritonbn import ops

    eager_step = _load("eager_step")
    monkeypatch.setattr(ops, "_FAST_LAUNCH", True)
    monkeypatch.setattr(ops, "_device_stream", lambda: (0, 1234))
    monkeypatch.setattr(ops, "_plans", {})
    runs = []

    class Compiled:
        function, packed_metadata = "handle", "metadata"

        def run(self, *args):
            runs.append(len(args))

    class Jit:
        pre_run_hooks = []

        def __init__(self, name):
            self.__name__ = name

        def __getitem__(self, grid):
            return lambda *args, **options: Compiled()

    for name in ("fused_forward_kernel", "fused_backward_kernel"):
        monkeypatch.setattr(ops.K, name, Jit(name))
    records = eager_step.launch_host_us(torch.device("cpu"), calls=7)
    assert [r["kernel"] for r in records] == ["fused_forward_kernel", "fused_backward_kernel"]
    for r in records:
        assert r["calls"] == 7 and all(r[k] > 0 for k in ("go_us", "launcher_us", "spec_us"))
    # grid, stream, handle, metadata, 3 hooks, then the arguments; 14 timed runs a launch
    expected = [9 + r["pointers"] + r["scalars"] for r in records]
    assert sorted(set(runs)) == sorted(set(expected)) and len(runs) >= 2 * 14


def test_eager_step_cpu_needs_the_interpreter(tmp_path):
    proc = _script("eager_step", "--device", "cpu", "--out", str(tmp_path / "x.json"),
                   interpret=False)
    assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_short_rows_smoke(tmp_path):
    """perf/short_rows.py through the interpreter: every kernel at both warp counts,
    normalize and dx with flat tiles on and off (and flat where they ran so)."""
    out = tmp_path / "short_rows.json"
    proc = _script("short_rows", "--device", "cpu", "--out", str(out), interpret=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["kind"] == "short_rows" and doc["device"] == "interpreter, not performance"
    seen = {(r["kernel"], r["warps"], r["flat"]) for r in doc["records"]}
    assert seen == {(k, w, f) for k in ("dx", "normalize") for w in (4, 8) for f in (True, False)} \
        | {(k, w, False) for k in ("stats", "bwd_reduce") for w in (4, 8)}
    assert all(r["shape"] == [2, 16, 7, 7] and r["ms"] > 0 for r in doc["records"])
