"""perf/gpu_check.py without a GPU: the stage plan and its limits, the archive packed
after every stage (a failed or killed stage too), unpacking into perf/results, the
report stage from a synthetic result, and the bench's skipping of measured cases."""
import dataclasses
import importlib.util
import json
import pathlib
import sys
import tarfile
import time

import pytest

from test_perf import fake_doc
from tritonbn.perf import bench, shapes

ROOT = pathlib.Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "perf" / "gpu_check.py")
gc = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up
spec.loader.exec_module(gc)


def _names(archive):
    with tarfile.open(archive) as tar:
        return {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}


def test_default_plan_fits_one_lease_in_order_of_value():
    stages = gc.plan([], gc.TOTAL_S)
    assert [s.name for s in stages] == ["smoke", "headline", "device", "paths", "short_rows",
                                        "dataset", "wider", "tune", "sanitizer", "ncu", "eager",
                                        "report"]
    assert sum(s.limit_s for s in stages) <= gc.TOTAL_S <= 540
    assert stages[0].limit_s <= 90
    with pytest.raises(SystemExit, match="unknown stage"):
        gc.plan(["smoke", "nope"], gc.TOTAL_S)


def test_dry_run_prints_every_command(capsys):
    assert gc.main(["OUT", "--dry-run"]) == 0
    text = capsys.readouterr().out
    for needle in ("-m gpu_smoke", "--impls tritonbn,torch", "--impls torch_compile",
                   "tritonbn.perf.dataset", "--skip-measured", "tritonbn tune",
                   "compute-sanitizer", "--clock-control none", "perf/eager_step.py",
                   "perf/short_rows.py",
                   "tritonbn report", "total of stage limits"):
        assert needle in text, needle


def _stage(name, limit, code):
    return gc.Stage(name, limit, lambda ctx: iter([gc.Cmd([sys.executable, "-c", code])]))


def test_packed_after_every_stage_failed_and_killed_ones_too(tmp_path):
    out, work = tmp_path / "OUT", tmp_path / "work" / "2026-01-01-fake-gpu"
    out.mkdir()
    work.mkdir(parents=True)
    archive = out / gc.ARCHIVE
    total, reserve = 24, 10  # the report keeps its 10 s to the end
    wall_end = time.time() + total - reserve - 3  # "fails" leaves the next stage under 5 s
    stages = [
        _stage("first", 20, f"open({str(work / 'a.txt')!r}, 'w').write('a')"),
        # sees the first stage's file already packed, writes its own, then hangs
        _stage("hangs", 3, "import tarfile, time\n"
                           f"names = tarfile.open({str(archive)!r}).getnames()\n"
                           "assert any(n.endswith('/a.txt') for n in names), names\n"
                           f"open({str(work / 'b.txt')!r}, 'w').write('b')\n"
                           "time.sleep(60)"),
        _stage("fails", 20, f"import time; time.sleep(max(0, {wall_end} - time.time())); "
                            "raise SystemExit(3)"),
        _stage("late", 60, "pass"),
        _stage("report", 10, f"open({str(work / 'r.txt')!r}, 'w').write('r')"),
    ]
    ctx = gc.Ctx(work, work.name, "fake-gpu")
    t0 = time.monotonic()
    outcomes = gc.run(stages, ctx, out, total_s=total, env=None, t_start=t0)
    assert time.monotonic() - t0 < total  # the hung stage was killed at its limit
    status = {o.name: o.status for o in outcomes}
    assert status == {"first": "ok", "hangs": "killed at limit", "fails": "failed (rc 3)",
                      "late": "skipped (no time)", "report": "ok"}
    names = _names(archive)
    assert {"a.txt", "b.txt", "r.txt", "stages.json", "summary.txt", "logs/hangs.log"} <= names
    with tarfile.open(archive) as tar:
        stages_json = json.load(tar.extractfile(f"{work.name}/stages.json"))
    assert [s["status"] for s in stages_json] == list(status.values())
    summary = (out / "summary.txt").read_text()
    assert "killed at limit" in summary and "skipped (no time)" in summary
    assert sorted(p.name for p in out.iterdir()) == [gc.ARCHIVE, "summary.txt"]  # 2 of 8 files


def test_a_command_that_cannot_start_fails_its_stage(tmp_path):
    out, work = tmp_path / "OUT", tmp_path / "w" / "x"
    out.mkdir()
    work.mkdir(parents=True)
    stage = gc.Stage("missing", 10, lambda ctx: iter([gc.Cmd(["no-such-tool-here"])]))
    (outcome,) = gc.run([stage], gc.Ctx(work, "x", "g"), out, total_s=20)
    assert outcome.status == "failed (rc 127)"
    assert "cannot start" in (work / "logs" / "missing.log").read_text()


def test_report_stage_renders_a_synthetic_result(tmp_path):
    out, work = tmp_path / "OUT", tmp_path / "w" / "2026-11-28-nvidia-fake-gpu"
    out.mkdir()
    work.mkdir(parents=True)
    ctx = gc.Ctx(work, work.name, "nvidia-fake-gpu")
    ctx.bench_json.write_text(json.dumps(fake_doc(sets=("resnet50",))))
    stage = dataclasses.replace(gc.BY_NAME["report"], limit_s=300)  # a loaded CI machine
    (outcome,) = gc.run([stage], ctx, out, total_s=300)
    assert outcome.status == "ok", (work / "logs" / "report.log").read_text()
    names = _names(out / gc.ARCHIVE)
    assert "report/report.md" in names and any(n.endswith(".png") for n in names)


def test_unpack_places_results_dataset_and_configs(tmp_path):
    work = tmp_path / "w" / "2026-11-28-nvidia-h100"
    (work / "configs").mkdir(parents=True)
    (work / "tuning-cache").mkdir()
    (work / "configs" / "nvidia-h100.json").write_text("{}")
    (work / "tuning-cache" / "c.json").write_text("{}")
    (work / gc.DATASET).write_text('{"records": []}')
    (work / f"{work.name}.json").write_text("{}")
    out = tmp_path / "OUT"
    out.mkdir()
    gc.pack(work, out, [])
    results, configs = tmp_path / "results", tmp_path / "configs"
    folder = gc.unpack(out / gc.ARCHIVE, results, configs)
    assert folder == results / work.name
    assert (folder / f"{work.name}.json").exists() and (folder / "summary.txt").exists()
    assert (results / gc.DATASET).read_text() == '{"records": []}'
    assert not (folder / gc.DATASET).exists() and not (folder / "tuning-cache").exists()
    assert (configs / "nvidia-h100.json").exists()


def test_unpack_refuses_paths_outside_one_folder(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    (tmp_path / "f.txt").write_text("x")
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(tmp_path / "f.txt", arcname="../escape.txt")
    with pytest.raises(SystemExit, match="not one folder"):
        gc.unpack(bad, tmp_path / "results", tmp_path / "configs")
    assert not (tmp_path / "escape.txt").exists()


def test_bench_skips_cases_measured_on_the_same_gpu(tmp_path):
    """What an earlier lease measured (checked) is skipped; another GPU's results,
    failed checks and missing passes are not."""
    doc = fake_doc(sets=("resnet50",), impls=("tritonbn", "torch"), dtypes=("float16",))
    case = shapes.cases("resnet50/b256")[0]
    failed = shapes.cases("resnet50/b256")[1]
    for r in doc["records"]:
        if tuple(r["shape"]) == failed.shape:
            r["ok"] = False
    (tmp_path / "lease").mkdir()
    (tmp_path / "lease" / "a.json").write_text(json.dumps(doc))
    (tmp_path / "kernel-dataset.json").write_text('{"records": 1}')  # not a results file
    ids = bench.measured_ids([str(tmp_path)], "NVIDIA Fake GPU")
    opts = bench.Options(impls=("tritonbn", "torch"))
    assert bench.already_measured(case, "channels_last", "float16", "bn_relu", opts, ids)
    assert not bench.already_measured(failed, "channels_last", "float16", "bn_relu", opts, ids)
    assert not bench.already_measured(case, "channels_last", "bfloat16", "bn_relu", opts, ids)
    assert not bench.already_measured(case, "channels_last", "float16", "bn_relu",
                                      bench.Options(impls=("tritonbn", "torch_compile")), ids)
    assert not bench.measured_ids([str(tmp_path)], "NVIDIA Other GPU")
    # graph-timed results count for graph-timed runs only, and the other way round
    assert not bench.measured_ids([str(tmp_path)], "NVIDIA Fake GPU", "graph")
    (tmp_path / "lease" / "a.json").write_text(json.dumps(doc | {"timing": "graph"}))
    assert bench.measured_ids([str(tmp_path)], "NVIDIA Fake GPU", "graph") == ids
    assert not bench.measured_ids([str(tmp_path)], "NVIDIA Fake GPU")
