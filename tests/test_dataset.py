"""The per-kernel timing dataset (tritonbn.perf.dataset) and its byte model: what it
records and in what order, how candidates are checked, precompile workers, and how
runs append to one file. Driven through the interpreter on tiny shapes; on a GPU
the dataset runs for real (its own script), so those tests are skipped there."""
import contextlib
import json
import math
import shutil

import pytest
import torch

from conftest import DEVICE
from tritonbn import heuristics, ops
from tritonbn.heuristics import Config
from tritonbn.layout import kernel_view
from tritonbn.perf import dataset, model

interpreter_only = pytest.mark.skipif(
    DEVICE != "cpu", reason="drives the dataset through Triton's interpreter")

BASE = ["--device", "cpu", "--dtypes", "float32", "--cpu-reps", "1", "--jobs", "0"]
# channel-first with 2 partials per channel, and channel-last (N, C)
SHAPES = "2,6,256;64,21"


def run(out, *args):
    assert dataset.main(BASE + ["--out", str(out), *args]) == 0
    return dataset.load(str(out))


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One run: two shapes, every kernel, two candidates each."""
    out = tmp_path_factory.mktemp("dataset") / "first.json"
    return out, run(out, "--shapes", SHAPES, "--max-candidates", "2")


def view(shape):
    return kernel_view(torch.empty(shape))[1]


def used_split(r) -> int:
    """The partials a record's launch wrote, from heuristics.plan alone: a tile kernel's
    own grid, a combine's from its reduce's heuristic config."""
    v = view(r["shape"])
    if r["kernel"] in heuristics.TILE_KERNELS:
        cfg = dataset.config_from_dict(r["config"])
    else:
        cfg = heuristics.heuristic(heuristics.COMBINE_OF[r["kernel"]], v, 4, torch.device("cpu"), True)
    return heuristics.plan(v, cfg)[0][1]


# ----------------------------------------------------------------------------- byte model

def test_kernel_bytes_table():
    E, C, s, split = 1000, 10, 2, 3
    assert model.kernel_bytes("stats", E, C, s, split) == E * s + 3 * split * C * 4 == 2360
    assert model.kernel_bytes("stats_combine", E, C, s, split) == 3 * 3 * 10 * 4 + 2 * 40 + 4 * 40 == 600
    assert model.kernel_bytes("normalize", E, C, s, split) == 2 * E * s == 4000
    assert model.kernel_bytes("bwd_reduce", E, C, s, split) == 2 * E * s + 2 * split * C * 4 == 4240
    assert model.kernel_bytes("bwd_combine", E, C, s, split) == 2 * 3 * 40 + 2 * 40 + 2 * C * 4 == 400
    assert model.kernel_bytes("dx", E, C, s, split) == 3 * E * s == 6000
    assert model.kernel_bytes("stats", E, C, s, split, acc_size=8) == 2000 + 3 * 3 * 10 * 8
    with pytest.raises(ValueError, match="unknown kernel"):
        model.kernel_bytes("bwd", E, C, s, split)


def test_kernel_bytes_add_up_to_the_two_pass_model_without_partials():
    # per-kernel full-size traffic is DESIGN.md's two-pass model: fwd 3·E·s, bwd 5·E·s
    E, s = 4096, 2
    fwd = sum(model.kernel_bytes(k, E, 8, s, 0) for k in heuristics.PASS_KERNELS["fwd"])
    bwd = sum(model.kernel_bytes(k, E, 8, s, 0) for k in heuristics.PASS_KERNELS["bwd"])
    per_channel = model.kernel_bytes("stats_combine", E, 8, s, 0) + \
        model.kernel_bytes("bwd_combine", E, 8, s, 0)
    assert fwd + bwd - per_channel == model.model_bytes("bn", "fwd+bwd", E, s)


# ----------------------------------------------------------------------------- shapes

def test_default_shapes_are_the_issue_list():
    resnet = [(n, c, hw, hw) for n in (256, 32) for c, hw in ((64, 56), (512, 28), (1024, 14), (2048, 7))]
    assert list(dataset.SHAPES) == resnet + [(20, 6, 65536), (4096, 1024)]
    keys = dataset.case_keys(dataset.SHAPES, dataset.LAYOUTS, dataset.DTYPES, tiny=False)
    assert len(keys) == (8 * 2 + 2) * 2
    assert ((4096, 1024), "contiguous", "float16") in keys
    assert ((256, 64, 56, 56), "channels_last", "float32") in keys
    tiny = dataset.case_keys(dataset.SHAPES, ("NCHW",), ("float16",), tiny=True)
    assert len(tiny) == len(set(tiny)) == 4 + 2  # batch 256 and 32 shrink to the same
    assert dataset._shapes("2,6,256;64,21") == [(2, 6, 256), (64, 21)]


# ----------------------------------------------------------------------------- one run

@interpreter_only
def test_every_kernel_heuristic_first_then_candidates_round_robin(first):
    _, doc = first
    recs = doc["records"]
    sources = [r["source"] for r in recs]
    assert sources == ["heuristic"] * 12 + ["candidate"] * (len(recs) - 12)
    assert {r["kernel"] for r in recs if r["source"] == "candidate"} == set(heuristics.KERNELS)
    cpu = torch.device("cpu")
    for r in recs[:12]:
        v = view(r["shape"])
        if r["kernel"] in heuristics.TILE_KERNELS:
            expected = heuristics.heuristic(r["kernel"], v, 4, cpu, True)
        else:
            expected = heuristics.heuristic_combine(v.C, used_split(r))
        assert dataset.config_from_dict(r["config"]) == expected
    cands = recs[12:]
    # round-robin: the first twelve candidates are of twelve different (shape, kernel)
    assert len({(tuple(r["shape"]), r["kernel"]) for r in cands[:12]}) == 12
    seen = set()
    for r in cands:
        key = (tuple(r["shape"]), r["kernel"], json.dumps(r["config"], sort_keys=True))
        assert key not in seen
        seen.add(key)
        assert r["config"] != next(h["config"] for h in recs[:12]
                                   if (h["shape"], h["kernel"]) == (r["shape"], r["kernel"]))
    # the kernels are right whatever the config: every candidate checked, passed, timed
    assert all(r["ok"] and r["status"] == "ok" and r["reason"] is None and r["ms"] > 0
               for r in recs)
    # the tile kernels' two candidates come from both rounds: a tile and a launch change
    norm = [dataset.config_from_dict(r["config"]) for r in cands if r["kernel"] == "normalize"
            and r["shape"] == [64, 21]]
    assert any(c.num_stages != 3 for c in norm) and any(c.BLOCK_C != 32 for c in norm)
    run_ = doc["runs"][0]
    assert run_["complete"] and run_["measured"] == len(recs) == run_["planned"]
    assert run_["counts"] == {"ok": len(recs), "rejected": 0, "failed": 0}
    assert all(r["mode"] == doc["mode"] == "interpreter, not performance" for r in recs)


@interpreter_only
def test_summary_rows(first):
    _, doc = first
    recs = doc["records"]
    keys = dataset.case_keys([(2, 6, 256), (64, 21)], dataset.LAYOUTS, ("float32",), tiny=True)
    cases = {k: dataset.Case(k, torch.device("cpu"), True) for k in keys}
    lines = dataset.summary(doc, recs[0]["gpu"], recs[0]["triton"], cases, heuristics.KERNELS)
    assert len(lines) == 1 + len(heuristics.KERNELS)
    for line, kernel in zip(lines[1:], heuristics.KERNELS):
        name, n, pct, ok, rejected, failed, gain_median, gain_max = line.split()
        mine = [r for r in recs if r["kernel"] == kernel]
        heur = {tuple(r["shape"]): r["ms"] for r in mine if r["source"] == "heuristic"}
        best = {}
        for r in mine:
            if r["source"] == "candidate":
                best[tuple(r["shape"])] = min(best.get(tuple(r["shape"]), math.inf), r["ms"])
        gains = [heur[shape] / best[shape] for shape in heur]
        assert (name, int(n), int(rejected), int(failed)) == (kernel, 2, 0, 0)
        assert int(ok) == sum(r["source"] == "candidate" for r in mine)
        assert float(gain_max) == pytest.approx(max(gains), abs=1e-3)


@interpreter_only
def test_bytes_and_bandwidth_use_the_split_the_launch_used(first):
    _, doc = first
    copy = doc["runs"][0]["copy_gbps"]
    for r in doc["records"]:
        C, numel = r["shape"][1], torch.Size(r["shape"]).numel()
        assert r["launch_split"] == used_split(r)
        assert r["bytes"] == model.kernel_bytes(r["kernel"], numel, C, 4, used_split(r))
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["ms"] * 1e-3) / 1e9)
        assert r["copy_gbps"] == copy
        assert r["pct_of_copy"] == pytest.approx(100 * r["gbps"] / copy)
    by = {(tuple(r["shape"]), r["kernel"]): r for r in doc["records"] if r["source"] == "heuristic"}
    assert by[(64, 21), "normalize"]["bytes"] == 2 * 64 * 21 * 4
    assert by[(2, 6, 256), "stats"]["launch_split"] == 2  # so the partials' bytes count twice
    assert by[(2, 6, 256), "stats_combine"]["bytes"] == 3 * 2 * 6 * 4 + 6 * 6 * 4


@interpreter_only
def test_runs_append_skip_what_is_measured_and_remeasure_replaces(first, tmp_path):
    src, before = first
    out = tmp_path / "d.json"
    shutil.copy(src, out)
    n = len(before["records"])
    doc = run(out, "--shapes", SHAPES, "--max-candidates", "2")
    assert doc["records"] == before["records"]
    assert len(doc["runs"]) == 2 and doc["runs"][1]["measured"] == 0
    assert doc["runs"][1]["skipped_measured"] == doc["runs"][1]["planned"] == n
    doc = run(out, "--shapes", SHAPES, "--max-candidates", "3", "--kernels", "normalize")
    assert doc["records"][:n] == before["records"]
    new = doc["records"][n:]
    assert [(r["kernel"], r["source"], r["run"]) for r in new] == [("normalize", "candidate", 2)] * 2
    had = [r for r in doc["records"] if (tuple(r["shape"]), r["kernel"]) == ((64, 21), "stats_combine")]
    assert had and had[0]["source"] == "heuristic"
    doc = run(out, "--shapes", "64,21", "--kernels", "stats_combine", "--remeasure")
    assert len(doc["records"]) == n + 2
    again = [r for r in doc["records"] if r["run"] == 3]
    assert {(tuple(r["shape"]), r["kernel"]) for r in again} == {((64, 21), "stats_combine")}
    # the heuristic and its candidates, measured again, not added
    assert sorted(str(r["config"]) for r in again) == sorted(str(r["config"]) for r in had)


@interpreter_only
def test_a_candidate_with_wrong_outputs_is_rejected_and_one_that_raises_failed(tmp_path, monkeypatch):
    """The first candidate writes nothing (its output stays poisoned), the second raises;
    only the heuristic and the third are timed."""
    real_kernel = ops.K.normalize_kernel

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["num_warps"] == 4:
                    return None
                if kw["num_stages"] == 1:
                    raise RuntimeError("out of resources: shared memory")
                return real_kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(ops.K, "normalize_kernel", Broken())
    timed, real_time = [], dataset.bench.time_ms
    monkeypatch.setattr(dataset.bench, "time_ms",
                        lambda fn, d, o: timed.append(ops._overrides["normalize"]) or real_time(fn, d, o))
    poisoned, real_poison = [], dataset.poisoned_allocations

    @contextlib.contextmanager
    def spy():
        poisoned.append(ops._overrides["normalize"])
        with real_poison():
            yield

    monkeypatch.setattr(dataset, "poisoned_allocations", spy)
    doc = run(tmp_path / "r.json", "--shapes", "2,23,8,8", "--layouts", "channels_last",
              "--kernels", "normalize", "--max-candidates", "3")
    recs = doc["records"]
    assert [r["status"] for r in recs] == ["ok", "rejected", "failed", "ok"]
    assert [dataset.config_from_dict(r["config"]).num_warps for r in recs[:2]] == [8, 4]
    assert "NaN (unwritten?)" in recs[1]["reason"] and "out of resources" in recs[2]["reason"]
    assert all(r["ms"] is None and r["gbps"] is None and not r["ok"] for r in recs[1:3])
    configs = [dataset.config_from_dict(r["config"]) for r in recs]
    assert [t for t in timed if t is not None] == [configs[0], configs[3]]
    # the heuristic's reference, then each candidate that launched, checked poisoned
    assert poisoned == [configs[0], configs[1], configs[3]]
    assert doc["runs"][0]["counts"] == {"ok": 2, "rejected": 1, "failed": 1}


@interpreter_only
def test_precompile_workers_run_each_variant_first(tmp_path):
    doc = run(tmp_path / "w.json", "--jobs", "2", "--shapes", "2,6,256",
              "--kernels", "normalize,bwd_combine", "--max-candidates", "1")
    recs = doc["records"]
    assert len(recs) == 4 and all(r["ok"] for r in recs)
    assert all(isinstance(r["compile_s"], float) and r["compile_s"] > 0 for r in recs)
    run_ = doc["runs"][0]
    assert run_["jobs"] == 2
    batch, = run_["batches"]
    assert batch["started_workers"] and batch["precompiled"] == batch["variants"] == 4
    assert batch["compile_s_sum"] == pytest.approx(sum(r["compile_s"] for r in recs))
    assert run_["compile"]["precompiled"] == 4
    assert run_["compile"]["parallel_gain"] == pytest.approx(
        batch["compile_s_sum"] / batch["precompile_s"])


@interpreter_only
def test_a_worker_reports_a_variant_that_cannot_run():
    key = ((2, 6, 256), "contiguous", "float32")
    bad, good = Config(3, 8, 2), Config(256, 8, 2, num_warps=2, num_stages=1)
    res = dataset.precompile("cpu", [(key, "normalize", bad), (key, "normalize", good)])
    assert "power of 2" in res[0]["error"] and res[0]["fatal"] is False
    assert res[1]["compile_s"] > 0


@interpreter_only
def test_a_variant_that_broke_a_worker_is_recorded_failed_not_run_here(monkeypatch):
    key = ((64, 21), "contiguous", "float32")
    case = dataset.Case(key, torch.device("cpu"), True)
    cfg = case.candidates("normalize", 132, 1)[0]
    measured = []
    monkeypatch.setattr(dataset.Case, "measure", lambda self, *a: measured.append(a))
    entry = {"counts": dict.fromkeys(dataset.STATUSES, 0), "unchecked": 0}
    fatal = {"error": "RuntimeError: CUDA error: an illegal memory access", "fatal": True}
    recs, heuristic_failed, lost = dataset.measure_batch(
        [(key, "normalize", cfg, "candidate")], [fatal], {key: case}, None, entry,
        lambda case, kernel, cfg, source, result, compile_s: result)
    assert measured == [] and not heuristic_failed and not lost
    assert recs[0]["status"] == "failed" and "illegal memory access" in recs[0]["reason"]
    assert entry["counts"]["failed"] == 1


@interpreter_only
def test_a_failure_that_breaks_the_device_stops_the_run_with_what_it_measured(
        tmp_path, monkeypatch, capsys):
    real_kernel = ops.K.normalize_kernel

    class RaisesAtOneStage:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["num_stages"] == 1:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
                return real_kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(ops.K, "normalize_kernel", RaisesAtOneStage())
    monkeypatch.setattr(dataset, "_device_ok", lambda device: False)  # as after that error
    out = tmp_path / "lost.json"
    assert dataset.main(BASE + ["--out", str(out), "--shapes", "64,21", "--kernels", "normalize",
                                "--max-candidates", "3"]) == 1
    assert "broke the CUDA context" in capsys.readouterr().err
    doc = dataset.load(str(out))
    assert [r["status"] for r in doc["records"]] == ["ok", "ok", "failed"]
    assert doc["runs"][0]["complete"] is False and doc["runs"][0]["planned"] == 4


@interpreter_only
def test_a_budget_cut_and_a_kill_leave_a_valid_file_that_a_rerun_completes(tmp_path, monkeypatch):
    out = tmp_path / "k.json"
    args = ("--shapes", "64,21", "--kernels", "normalize", "--max-candidates", "4", "--batch", "2")
    doc = run(out, *args, "--budget-s", "0")
    assert doc["records"] == [] and doc["runs"][0]["complete"] is False
    assert doc["runs"][0]["planned"] == 5
    calls, real = [], dataset.Case.measure

    def dies_in_the_second_batch(self, *a):
        calls.append(a)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(self, *a)

    monkeypatch.setattr(dataset.Case, "measure", dies_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        dataset.main(BASE + ["--out", str(out), *args])
    doc = dataset.load(str(out))  # the first batch of two, written whole
    assert [r["source"] for r in doc["records"]] == ["heuristic", "candidate"]
    assert doc["runs"][1]["complete"] is False and doc["runs"][1]["measured"] == 2
    monkeypatch.undo()
    doc = run(out, *args)
    assert len(doc["records"]) == 5 and doc["runs"][2]["complete"]
    assert doc["runs"][2]["skipped_measured"] == 2 and doc["runs"][2]["measured"] == 3


@interpreter_only
@pytest.mark.parametrize("content,message", [
    ("{not json", "not JSON"),
    (json.dumps({"device": "x", "records": []}), "not a tritonbn kernel dataset"),
    (json.dumps({"format": dataset.FORMAT, "version": 1, "mode": "interpreter, not performance",
                 "records": [{"gpu": "x"}], "runs": []}), "record 0: 'triton' missing"),
    (json.dumps({"format": dataset.FORMAT, "version": 1, "mode": "gpu", "records": [], "runs": []}),
     "cannot append"),
])
def test_a_file_that_is_not_a_dataset_is_refused_and_left_alone(tmp_path, capsys, content, message):
    out = tmp_path / "bad.json"
    out.write_text(content)
    assert dataset.main(BASE + ["--out", str(out), "--shapes", "64,21", "--kernels", "dx"]) == 2
    assert message in capsys.readouterr().err
    assert out.read_text() == content


def test_cpu_needs_the_interpreter(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    assert dataset.main(BASE + ["--out", str(tmp_path / "x.json")]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
