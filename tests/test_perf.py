"""The perf suite: byte model, shape sets, results schema, summary math, report
rendering, and the bench pipeline (through the interpreter on the CPU)."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import DEVICE
from tritonbn import heuristics
from tritonbn.perf import model, schema, shapes, summary
from tritonbn.perf.summary import summary_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- synthetic results

def fake_doc(sets=("resnet50", "quick"), interpreter=False, seed=0, ceiling=3000.0,
             impls=schema.IMPLS, dtypes=("float16", "float32"), ops=("bn_relu",)):
    """A results document with random timings, built the way bench builds records."""
    rng = random.Random(seed)
    records = []
    for name in sets:
        for case in shapes.cases(name):
            for layout in case.layouts:
                for dtype in dtypes:
                    s = {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
                    for op in ops:
                        for pass_ in model.PASSES:
                            for impl in impls:
                                nbytes = model.model_bytes(op, pass_, case.numel, s)
                                ms = nbytes / (ceiling * 1e9 * rng.uniform(0.3, 0.95)) * 1e3
                                gb = model.gbps(nbytes, ms)
                                gb1 = model.gbps(model.model_bytes(op, pass_, case.numel, s,
                                                                   "single_read"), ms)
                                records.append({
                                    "set": case.set, "op": op, "pass": pass_,
                                    "shape": list(case.shape), "layout": layout, "dtype": dtype,
                                    "impl": impl,
                                    "backend": {"tritonbn": "triton", "torch": "cudnn",
                                                "torch_compile": "inductor",
                                                "tritonbn_heuristic": "triton",
                                                "tritonbn_split": "triton",
                                                "tritonbn_fused": "triton",
                                                "tritonbn_kernel_combine": "triton"}[impl],
                                    "weight": case.weight, "ms": ms, "gbps": gb,
                                    "gbps_single_read": gb1, "pct_of_copy": 100 * gb / ceiling,
                                    "pct_of_copy_single_read": 100 * gb1 / ceiling,
                                    "max_abs_err": rng.uniform(0, 1e-3), "rel_err": 1e-4, "ok": True,
                                    "peak_mb": rng.uniform(1, 100) if pass_ == "fwd+bwd" else None})
    return {"schema": schema.SCHEMA_VERSION, "device": "NVIDIA Fake GPU", "torch": "2.x",
            "triton": "3.x", "cudnn": 90300, "date": f"2026-11-2{seed % 10}T00:00:00+00:00",
            "mode": schema.INTERPRETER_MODE if interpreter else "gpu", "interpreter": interpreter,
            "copy_gbps": ceiling, "records": records, "complete": True}


# ----------------------------------------------------------------------------- byte model

@pytest.mark.parametrize("op,pass_,two,one", [
    ("bn", "fwd", 3, 2), ("bn", "bwd", 5, 3), ("bn", "fwd+bwd", 8, 5),
    ("bn_relu", "fwd", 3, 2), ("bn_relu", "bwd", 5, 3), ("bn_relu", "fwd+bwd", 8, 5),
    ("bn_add_relu", "fwd", 4, 3), ("bn_add_relu", "bwd", 6, 4), ("bn_add_relu", "fwd+bwd", 10, 7),
    *[(op, p, two, one) for op in ("bn_leaky_relu", "bn_silu", "bn_gelu")
      for p, two, one in (("fwd", 3, 2), ("bwd", 5, 3), ("fwd+bwd", 8, 5))]])
def test_byte_model_matches_design_table(op, pass_, two, one):
    # DESIGN.md: fwd 3·E·s / 2·E·s, bwd 5·E·s / 3·E·s, residual +E·s each way; a fused
    # activation moves nothing extra
    assert model.elements_moved(op, pass_, "two_pass") == two
    assert model.elements_moved(op, pass_, "single_read") == one
    assert model.model_bytes(op, pass_, 1000, 2, "two_pass") == two * 1000 * 2


def test_gbps_units():
    assert model.gbps(6e9, 1000.0) == pytest.approx(6.0)      # 6 GB in one second
    assert model.gbps(3e6, 1e-3) == pytest.approx(3000.0)     # 3 MB in one microsecond


@pytest.mark.parametrize("args", [("bn", "back"), ("bn_tanh", "fwd"), ("bn_add_gelu", "fwd"),
                                  ("bn", "fwd", "three_pass")])
def test_byte_model_rejects_unknown_names(args):
    with pytest.raises(ValueError):
        model.elements_moved(*args)


def test_ops_name_their_activation_and_residual():
    assert model.OPS == ("bn", "bn_relu", "bn_add_relu", "bn_leaky_relu", "bn_silu", "bn_gelu")
    assert [model.activation_of(op) for op in model.OPS] == [
        None, "relu", "relu", "leaky_relu", "silu", "gelu"]
    assert [op for op in model.OPS if model.has_residual(op)] == ["bn_add_relu"]
    from tritonbn import ops

    assert {model.activation_of(op) for op in model.OPS} <= set(ops.ACTIVATIONS)  # the library's names
    with pytest.raises(ValueError, match="unknown op"):
        model.activation_of("bn_tanh")
    # every place that names the ops uses model.OPS
    from tritonbn.perf import bench, report

    assert schema.CHOICES["op"] == model.OPS == bench.OPS
    assert set(bench.DEFAULT_OPS) <= set(model.OPS) and "bn_add_relu" in bench.DEFAULT_OPS
    assert set(report.OP_TEXT) == set(model.OPS)


# ----------------------------------------------------------------------------- shape sets

def test_resnet50_set_is_the_issue_list():
    cs = shapes.cases("resnet50")
    assert len(cs) == 24
    for batch in (256, 32):
        sub = [c for c in cs if c.set == f"resnet50/b{batch}"]
        assert [(c.shape[1], c.shape[2]) for c in sub] == [
            (64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28), (256, 14),
            (1024, 14), (512, 14), (512, 7), (2048, 7)]
        assert all(c.shape[0] == batch and c.shape[2] == c.shape[3] for c in sub)
        assert [c.weight for c in sub] == [1, 6, 4, 1, 7, 5, 1, 11, 7, 1, 5, 4]
        assert sum(c.weight for c in sub) == 53  # ResNet-50's BatchNorm layers


def test_stress_and_quick_sets():
    stress = [c.shape for c in shapes.cases("stress")]
    assert (16, 64, 256, 256) in stress and (20, 6, 65536) in stress and (32, 2048, 7, 7) in stress
    assert {s[1] for s in stress if s[0] == 32 and s[2:] == (56, 56)} == {24, 40, 72, 152, 368}
    assert (3136, 256) in stress and (128, 8192) in stress
    assert len(shapes.cases("quick")) == 5
    assert len(shapes.cases("all")) == 5 + 24 + 10 + 8
    with pytest.raises(ValueError, match="unknown shape set"):
        shapes.cases("vgg")


@pytest.mark.parametrize("name", shapes.SET_NAMES)
def test_tiny_shapes_keep_rank_shrink_and_stay_distinct(name):
    big, small = shapes.cases(name), shapes.cases(name, tiny_shapes=True)
    keys = [(c.set, c.shape) for c in small]
    assert len(keys) == len(set(keys))
    assert all(c.numel <= 4096 for c in small)
    assert {len(c.shape) for c in small} == {len(c.shape) for c in big}
    if name == "quick":
        assert len(small) == len(big)


# ----------------------------------------------------------------------------- schema

def test_schema_accepts_a_results_document():
    doc = fake_doc()
    assert schema.validate(doc) is doc


def test_schema_accepts_every_op_and_rejects_others():
    doc = fake_doc(sets=("quick",), ops=model.OPS)
    assert {r["op"] for r in schema.validate(doc)["records"]} == set(model.OPS)
    doc["records"][0]["op"] = "bn_tanh"
    with pytest.raises(ValueError, match="op='bn_tanh' not one of"):
        schema.validate(doc)


@pytest.mark.parametrize("field", sorted(schema.RECORD))
def test_schema_names_a_missing_record_field(field):
    doc = fake_doc(sets=("quick",))
    del doc["records"][3][field]
    with pytest.raises(ValueError, match=f"record 3: missing field '{field}'"):
        schema.validate(doc)


@pytest.mark.parametrize("field", sorted(schema.TOP))
def test_schema_names_a_missing_top_level_field(field):
    doc = fake_doc(sets=("quick",))
    del doc[field]
    with pytest.raises(ValueError, match=f"missing top-level field '{field}'"):
        schema.validate(doc)


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(impl="cudnn"), "impl='cudnn' not one of"),
    (lambda r: r.update(ms=0.0), "ms must be > 0"),
    (lambda r: r.update(ms="1.0"), "field 'ms' has type str"),
    (lambda r: r.update(ok=1), "field 'ok' has type int"),
    (lambda r: r.update(shape=[2, 0, 3]), "shape must be positive"),
    (lambda r: r.update(max_abs_err=None), "non-finite output) but ok is true"),
    (lambda r: r.update(dtype="float64"), "dtype='float64' not one of"),
])
def test_schema_rejects_bad_records(change, message):
    doc = fake_doc(sets=("quick",))
    change(doc["records"][0])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        schema.validate(doc)


def test_schema_rejects_duplicates_and_disagreeing_mode():
    doc = fake_doc(sets=("quick",))
    doc["records"].append(dict(doc["records"][0]))
    with pytest.raises(ValueError, match="duplicate record"):
        schema.validate(doc)
    doc = fake_doc(sets=("quick",))
    doc["interpreter"] = True
    with pytest.raises(ValueError, match="disagrees with interpreter"):
        schema.validate(doc)


# ----------------------------------------------------------------------------- summary math

def test_weighted_geomean():
    assert summary.weighted_geomean([2, 8], [1, 1]) == pytest.approx(4.0)
    assert summary.weighted_geomean([2, 8], [3, 1]) == pytest.approx(2 ** 1.5)
    vals, ws = [1.3, 0.7, 2.2, 1.01], [6, 1, 11, 4]
    assert summary.weighted_geomean(vals, ws) == pytest.approx(
        math.prod(v ** (w / sum(ws)) for v, w in zip(vals, ws)))
    with pytest.raises(ValueError):
        summary.weighted_geomean([], [])
    with pytest.raises(ValueError):
        summary.weighted_geomean([1.0, -1.0], [1, 1])


def _target_records(speed, compile_speed=1.2, skip=()):
    """resnet50/b256 target-group records with tritonbn speed[i]× faster than torch on shape i."""
    doc = fake_doc(sets=("resnet50",), dtypes=("float16",))
    recs = [r for r in doc["records"] if r["set"] == "resnet50/b256" and r["layout"] == "channels_last"
            and r["pass"] == "fwd+bwd"]
    cases = [c for c in shapes.cases("resnet50") if c.set == "resnet50/b256"]
    out = []
    for i, c in enumerate(cases):
        if i in skip:
            continue
        by = {r["impl"]: r for r in recs if tuple(r["shape"]) == c.shape}
        by["torch"]["ms"] = by["tritonbn"]["ms"] * speed[i]
        by["torch_compile"]["ms"] = by["tritonbn"]["ms"] * compile_speed
        out += by.values()
    return out


def test_targets_use_layer_weights_and_the_slowest_shape():
    speed = [1.5] * 12
    speed[7] = 0.9  # (256, 14): 11 layers
    t = {x["target"]: x for x in summary.targets(_target_records(speed))}
    slowest = t["slowest shape vs torch (cuDNN)"]
    assert slowest["value"] == pytest.approx(0.9) and slowest["state"] == "not met"
    weights = [1, 6, 4, 1, 7, 5, 1, 11, 7, 1, 5, 4]
    expect = math.exp(sum(w * math.log(s) for s, w in zip(speed, weights)) / 53)
    geo = t["weighted geomean vs torch (cuDNN)"]
    assert geo["value"] == pytest.approx(expect)
    assert geo["state"] == ("met" if expect >= 1.3 else "not met")
    assert t["weighted geomean vs torch.compile"]["value"] == pytest.approx(1.2)
    assert t["weighted geomean vs torch.compile"]["state"] == "met"


def test_targets_incomplete_and_failed_checks_do_not_count():
    recs = _target_records([2.0] * 12, skip=(0,))
    t = {x["target"]: x for x in summary.targets(recs)}
    assert t["slowest shape vs torch (cuDNN)"]["state"] == "incomplete (11/12 shapes)"
    recs = _target_records([2.0] * 11 + [0.5])
    for r in recs:
        if r["impl"] == "torch" and r["shape"] == [256, 2048, 7, 7]:
            r["ok"] = False  # the one slow shape's baseline failed its check: left out
    t = {x["target"]: x for x in summary.targets(recs)}
    assert t["slowest shape vs torch (cuDNN)"]["value"] == pytest.approx(2.0)
    assert t["slowest shape vs torch (cuDNN)"]["shapes"] == 11


# ----------------------------------------------------------------------------- report

def _png_size(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path).shape


def test_report_renders_markdown_and_plots(tmp_path):
    from tritonbn.perf import report

    doc = fake_doc(seed=3)
    path = report.render(doc, str(tmp_path))
    text = open(path).read()
    assert "NVIDIA Fake GPU" in text and "3000 GB/s" in text and "interpreter" not in text
    rows = summary.summary_rows(doc["records"])
    for r in rows:  # every summary row, with its numbers
        line = f"| {r['set']} | {r['op']} | {r['pass']} | {r['dtype']} | {r['layout']} | {r['shapes']} | " \
               f"{r['vs_torch']:.2f} | {r['vs_torch_compile']:.2f} |"
        assert line in text
    for t in summary.targets(doc["records"]):
        assert f"| {t['target']} | ≥ {t['goal']:g} | {t['value']:.2f} |" in text
    sections = {(r["set"], r["op"], r["pass"]) for r in doc["records"]}
    for s in sections:
        assert f"### {s[0]} · {s[1]} · {s[2]}" in text
    pngs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
    assert len(pngs) == 2 * len(sections)
    for p in pngs:
        assert f"]({p})" in text
        h, w = _png_size(tmp_path / p)[:2]
        assert h > 200 and w > 200


def test_report_marks_interpreter_results_and_failed_checks(tmp_path):
    from tritonbn.perf import report

    doc = fake_doc(sets=("quick",), interpreter=True)
    doc["records"][0].update(ok=False, max_abs_err=None, rel_err=None)
    text = open(report.render(doc, str(tmp_path))).read()
    assert f"**{schema.INTERPRETER_MODE}.**" in text
    assert "## Failed checks and errors" in text and "non-finite" in text


@pytest.mark.parametrize("ops", [("bn_add_relu", "bn_gelu"), model.OPS])
def test_report_renders_the_new_ops_and_a_file_with_only_some(tmp_path, ops):
    """A results file may hold any subset of the ops (the first without bn_relu): each op
    gets its summary rows, sections, plots and a line saying what it is."""
    from tritonbn.perf import report

    doc = fake_doc(sets=("quick",), ops=ops, dtypes=("float16",), seed=2)
    plots = len(ops) < len(model.OPS)  # the PNGs once, for the subset (36 PNGs take seconds)
    text = (open(report.render(doc, str(tmp_path))).read() if plots
            else report.markdown(schema.validate(doc), {}))
    for op in ops:
        assert f"- `{op}`: {report.OP_TEXT[op]}" in text
        for pass_ in model.PASSES:
            assert f"### quick · {op} · {pass_}" in text
            for kind in ("speedup", "pct"):
                name = f"{kind}_{report._slug('quick', op, pass_)}.png"
                assert (tmp_path / name).exists() == plots and (f"]({name})" in text) == plots
    for op in set(model.OPS) - set(ops):
        assert f"`{op}`" not in text and f"· {op} ·" not in text
    # summary rows and sections in model.OPS order (bn_relu, the targets' op, first)
    order = sorted(ops, key=lambda o: (o != "bn_relu", model.OPS.index(o)))
    assert list(dict.fromkeys(r["op"] for r in summary_rows(doc["records"]))) == order
    sections = [line.split(" · ")[1] for line in text.splitlines() if line.startswith("### ")]
    assert list(dict.fromkeys(sections)) == order
    for r in summary_rows(doc["records"]):
        assert f"| {r['set']} | {r['op']} | {r['pass']} | {r['dtype']} | {r['layout']} |" in text


def test_report_cli_picks_newest_gpu_results(tmp_path, capsys):
    from tritonbn.cli import main

    res = tmp_path / "results"
    res.mkdir()
    assert main(["report", str(res), "--out", str(tmp_path / "none")]) == 0
    assert "no GPU results" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()
    for name, seed, interp in [("a.json", 1, False), ("b.json", 5, False), ("c.json", 8, True)]:
        doc = fake_doc(sets=("quick",), seed=seed, interpreter=interp)
        doc["device"] = name
        (res / name).write_text(json.dumps(doc))
    (res / "realistic.json").write_text(json.dumps({"records": []}))  # not a results file
    assert main(["report", str(res), "--out", str(tmp_path / "rep")]) == 0
    assert "| device | b.json |" in (tmp_path / "rep" / "report.md").read_text()


def test_report_cli_rejects_a_bad_file(tmp_path, capsys):
    from tritonbn.cli import main

    bad = tmp_path / "bad.json"
    doc = fake_doc(sets=("quick",))
    del doc["records"][0]["ms"]
    bad.write_text(json.dumps(doc))
    assert main(["report", str(bad), "--out", str(tmp_path / "rep")]) == 2
    assert "missing field 'ms'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bench

def test_bench_without_cuda_says_so_and_fails(monkeypatch, capsys):
    from tritonbn.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--shapes", "quick"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu" in err


def test_bench_rejects_unknown_choices(capsys):
    from tritonbn.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--dtypes", "float16,float8"])
    assert e.value.code == 2
    assert "float8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--ops", "bn_relu,bn_tanh"])
    assert e.value.code == 2
    assert "bn_tanh" in capsys.readouterr().err


@pytest.mark.parametrize("argv,ops", [
    ([], ("bn", "bn_relu", "bn_add_relu")),
    (["--ops", "all"], model.OPS),
    (["--ops", "bn_gelu,bn_add_relu"], ("bn_gelu", "bn_add_relu"))])
def test_bench_ops_option(monkeypatch, argv, ops):
    from tritonbn import cli
    from tritonbn.perf import bench

    seen = []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bench, "run", lambda opts, out, append=False: seen.append(opts) or 0)
    assert cli.main(["bench", "--device", "cpu", *argv]) == 0
    assert seen[0].ops == ops and bench.Options().ops == bench.DEFAULT_OPS


def test_backend_names_from_kernel_names():
    from tritonbn.perf.bench import classify

    assert classify(["void at::native::(anonymous namespace)::batch_norm_collect_statistics_kernel"
                     "<float>", "elementwise_kernel"]) == "native"
    assert classify(["void cudnn::bn_fw_tr_1C11_kernel_NCHW<__half, float>"]) == "cudnn"
    assert classify(["bn_bw_1C11_singleread<float>"]) == "cudnn"
    assert classify(["triton_per_fused_relu_0"]) is None


def _bench_case(build=None, monkeypatch=None, dtype="float32", op="bn_relu"):
    from tritonbn.perf import bench

    if build is not None:
        monkeypatch.setattr(bench, "build", build)
    opts = bench.Options(device=DEVICE, impls=("tritonbn", "torch"), cpu_reps=1, warmup_ms=1,
                         rep_ms=5)
    case = shapes.Case("quick", (3, 6, 5, 4))
    return bench.run_case(case, "channels_last", dtype, op, opts, torch.device(DEVICE), 100.0,
                          interpreted=DEVICE == "cpu")


@pytest.mark.parametrize("dtype,op", [("float32", "bn_relu"), ("bfloat16", "bn_relu"),
                                      ("float32", "bn_add_relu"), ("bfloat16", "bn_add_relu"),
                                      ("float32", "bn_gelu")])
def test_bench_case_checks_and_times_each_pass(dtype, op):
    from tritonbn.perf import bench

    records, errors = _bench_case(dtype=dtype, op=op)
    assert errors == []
    assert len(records) == 2 * 3
    tol = bench.REL_TOL[bench.DTYPES[dtype]]
    for r in records:
        assert r["ok"], r
        assert r["op"] == op and r["ms"] > 0
        assert math.isfinite(r["max_abs_err"]) and 0 <= r["rel_err"] <= tol
        assert r["gbps"] == pytest.approx(model.gbps(
            model.model_bytes(op, r["pass"], 3 * 6 * 5 * 4, 4 if dtype == "float32" else 2),
            r["ms"]))
    assert {r["backend"] for r in records if r["impl"] == "tritonbn"} <= {"triton", "triton-interpreter"}
    assert {r.get("path") for r in records} == {"fused", None}  # a small shape; torch has none
    doc = fake_doc(sets=())
    doc["records"] = records
    schema.validate(doc)
    doc["records"][0]["path"] = "other"
    with pytest.raises(ValueError, match="not split or fused"):
        schema.validate(doc)


def test_bench_checks_every_op_against_its_own_reference():
    """Every op through tritonbn's kernels and torch's unfused modules, fwd+bwd."""
    from tritonbn.perf import bench

    opts = bench.Options(device=DEVICE, impls=("tritonbn", "torch"), cpu_reps=1, warmup_ms=1,
                         rep_ms=5, passes=("fwd+bwd",))
    for op in model.OPS:
        records, errors = bench.run_case(shapes.Case("quick", (2, 5, 3, 4)), "NCHW", "float32", op,
                                         opts, torch.device(DEVICE), 100.0,
                                         interpreted=DEVICE == "cpu")
        assert errors == [] and len(records) == 2
        for r in records:
            assert r["ok"] and r["rel_err"] <= bench.REL_TOL[torch.float32], (op, r)


def test_bench_builds_what_each_op_means():
    """tritonbn: one fused module (activation, residual); torch: act(bn(x) [+ z]) unfused."""
    from torch import nn

    import tritonbn
    from tritonbn.perf import bench

    w, b = torch.rand(4) + 0.5, torch.randn(4)
    x, z = torch.randn(3, 4, 5, 2) + 1, torch.randn(3, 4, 5, 2) + 0.5
    for op in model.OPS:
        act = model.activation_of(op)
        mod, bn = bench.build("torch", op, 4, w, b)
        assert type(bn) is nn.BatchNorm2d
        pre = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, bench.EPS)
        if model.has_residual(op):
            assert isinstance(mod, bench.AddAct)
            got, pre = mod(x, z), pre + z
        else:
            got = mod(x)
        want = {None: lambda t: t, "relu": torch.relu,
                "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.01),
                "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[act]
        torch.testing.assert_close(got, want(pre))
        # the float64 reference the bench checks against (tritonbn.reference.activate)
        torch.testing.assert_close(bench.reference.activate(pre.double(), act, model.LEAKY_SLOPE),
                                   want(pre.double()))
        mod, bn = bench.build("tritonbn", op, 4, w, b)
        assert mod is bn and isinstance(bn, tritonbn.BatchNorm2d) and bn.activation == act
        assert bn.negative_slope == model.LEAKY_SLOPE
        torch.testing.assert_close(bn.weight.detach(), w)


def test_bench_residual_is_drawn_with_the_data():
    from tritonbn.perf import bench

    x, dy, w, b = bench.make_data((4, 6, 5, 5), "channels_last", torch.float16, "cpu", 3)
    x2, dy2, w2, b2, z = bench.make_data((4, 6, 5, 5), "channels_last", torch.float16, "cpu", 3,
                                         residual=True)
    for t, u in ((x, x2), (dy, dy2), (w, w2), (b, b2)):  # the rest of the data unchanged
        assert torch.equal(t, u)
    assert z.dtype == torch.float16 and z.shape == x.shape and z.requires_grad
    assert z.is_contiguous(memory_format=torch.channels_last)
    assert 0.3 < z.float().mean().item() < 0.7 and not torch.equal(z, x)


def test_reference_relu_takes_the_side_the_implementation_took():
    """A float16 y underflows to 0 where 0 < pre < 3e-8; an implementation deciding on its
    float32 pre passes the gradient there. The reference must follow it (through dz, or dx
    without a residual), for dx, dz and the sums, and still catch a real error."""
    from torch.nn.functional import batch_norm

    from tritonbn.perf import bench

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=g) * 2 + 1
    w = torch.rand(3, dtype=torch.float64, generator=g) + 0.5
    b = 0.25 * torch.randn(3, dtype=torch.float64, generator=g)
    dy = torch.randn(x.shape, dtype=torch.float64, generator=g)
    bn = batch_norm(x, None, None, w, b, True, 0.0, bench.EPS)
    idx = [3, 40, 77, 150]
    for op in ("bn_add_relu", "bn_relu", "bn_leaky_relu"):
        slope = 0.01 if op == "bn_leaky_relu" else 0.0
        residual = model.has_residual(op)
        z = torch.randn(x.shape, dtype=torch.float64, generator=g) + 0.5 if residual else None
        base = bn + z if residual else bn
        if residual:  # pre = 1e-8 at idx: float16 y rounds to 0
            z.view(-1)[idx] += 1e-8 - base.view(-1)[idx]
        else:
            b_shift = 1e-8 - bn.view(-1)[idx[0]]  # one element per channel: shift the bias
            b = b + torch.where(torch.arange(3) == idx[0] // 25 % 3, b_shift, 0.0)
            bn = batch_norm(x, None, None, w, b, True, 0.0, bench.EPS)
            idx = [idx[0]]
        leaves = [t.clone().requires_grad_() for t in ((x, z, w, b) if residual else (x, w, b))]
        xi, wi, bi = leaves[0], leaves[-2], leaves[-1]
        pre = batch_norm(xi, None, None, wi, bi, True, 0.0, bench.EPS)
        if residual:
            pre = pre + leaves[1]
        assert (pre.detach().view(-1)[idx] > 0).all()
        y = torch.nn.functional.leaky_relu(pre, slope) if slope else torch.relu(pre)
        grads = torch.autograd.grad(y, leaves, dy)
        y16 = y.detach().half()
        assert (y16.view(-1)[idx] == 0).all()
        ref = bench.Reference(x, w, b, dy, z)
        errs = ref.errors(op, y16, grads)
        for name in bench.grad_names(op):
            assert errs[name][1] < 1e-9, (op, name, errs)
        # the side is chosen only within rounding of 0: a wrong grad elsewhere still shows
        bad = list(grads)
        bad[0] = bad[0].clone()
        bad[0].view(-1)[5] += 0.5
        assert bench.Reference(x, w, b, dy, z).errors(op, y16, bad)["dx"][0] == pytest.approx(0.5)


def test_bench_check_catches_a_wrong_residual_grad(monkeypatch):
    """dz is part of the bwd check: a residual grad off by 1.5x fails bwd and fwd+bwd, not fwd."""
    from tritonbn.perf import bench

    class ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            return z.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.5 * g

    real = bench.build

    def wrong_dz(impl, op, ndim, weight, bias):
        mod, bn = real(impl, op, ndim, weight, bias)
        if impl == "tritonbn":
            return (lambda x, z: mod(x, ScaleGrad.apply(z))), bn
        return mod, bn

    records, errors = _bench_case(wrong_dz, monkeypatch, op="bn_add_relu")
    assert errors == []
    assert all(r["ok"] for r in records if r["impl"] == "torch")
    assert {r["pass"]: r["ok"] for r in records if r["impl"] == "tritonbn"} == {
        "fwd": True, "bwd": False, "fwd+bwd": False}


@pytest.mark.skipif(DEVICE != "cpu", reason="simulates a GPU's tuning cache in the interpreter")
def test_bench_times_tritonbn_on_heuristic_configs_next_to_tuned(monkeypatch, tmp_path):
    """impl tritonbn_heuristic runs every launch on the heuristic, even where a tuned
    config exists; the summary and report show tritonbn's speedup over it."""
    from tritonbn import ops, tuning
    from tritonbn.layout import kernel_view
    from tritonbn.perf import bench
    from tritonbn.perf.report import markdown

    monkeypatch.setenv("TRITONBN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_stores", {})
    shape = (3, 6, 5, 4)
    _, v = kernel_view(torch.empty(shape).to(memory_format=torch.channels_last))
    tuned = heuristics.Config(4, 2, 3, num_warps=2)
    tuning.store("Fake GPU").put({tuning.bucket(k, torch.float32, v): (tuned, {})
                                  for k in heuristics.TILE_KERNELS})
    chosen = []
    real_plan = ops.plan
    monkeypatch.setattr(ops, "_plans", {})  # every launch signature is planned afresh here
    monkeypatch.setattr(ops, "plan", lambda v, cfg: chosen.append(cfg) or real_plan(v, cfg))
    opts = bench.Options(device=DEVICE, impls=("tritonbn", "tritonbn_heuristic"), cpu_reps=1,
                         passes=("fwd",))
    # the split path: tuned configs are per split kernel (the single-program path has none)
    with tuning.simulate_gpu(timer=None, gpu="Fake GPU"), ops.launch_overrides(path="split"):
        records, errors = bench.run_case(shapes.Case("quick", shape), "channels_last", "float32",
                                         "bn_relu", opts, torch.device(DEVICE), 100.0,
                                         interpreted=True)
    assert {r["path"] for r in records} == {"split"}
    assert errors == [] and all(r["ok"] for r in records)
    assert [r["impl"] for r in records] == ["tritonbn", "tritonbn_heuristic"]
    n_tuned = sum(c == tuned for c in chosen)
    assert n_tuned > 0 and n_tuned == len(chosen) - n_tuned  # same launches, heuristic configs
    doc = fake_doc(sets=())
    doc["records"] = records
    (row,) = summary_rows(records)
    assert row["vs_tritonbn_heuristic"] == pytest.approx(records[1]["ms"] / records[0]["ms"])
    assert "× heuristic configs" in markdown(schema.validate(doc), {})


def test_bench_check_catches_a_wrong_implementation(monkeypatch):
    from tritonbn.perf import bench

    real = bench.build

    def off_by_eps(impl, op, ndim, weight, bias):
        mod, bn = real(impl, op, ndim, weight, bias)
        if impl == "tritonbn":
            bn.eps = 0.05  # a plausible bug: the wrong epsilon
        return mod, bn

    records, errors = _bench_case(off_by_eps, monkeypatch)
    assert errors == []
    assert all(r["ok"] for r in records if r["impl"] == "torch")
    assert not any(r["ok"] for r in records if r["impl"] == "tritonbn")
    doc = fake_doc(sets=())
    doc.update(records=records, errors=errors)
    assert bench._finish(doc, "x.json", 0.0) == 1


def test_bench_records_an_implementation_that_raises(monkeypatch):
    from tritonbn.perf import bench

    real = bench.build

    def broken(impl, op, ndim, weight, bias):
        if impl == "torch":
            raise RuntimeError("no kernel image")
        return real(impl, op, ndim, weight, bias)

    records, errors = _bench_case(broken, monkeypatch)
    assert {r["impl"] for r in records} == {"tritonbn"}
    assert errors and errors[0]["impl"] == "torch" and "no kernel image" in errors[0]["error"]


def _run(out, **kw):
    from tritonbn.perf import bench

    opts = dict(device=DEVICE, sets=("quick",), dtypes=("float32",), ops=("bn",),
                impls=("tritonbn",), passes=("fwd",), cpu_reps=1, warmup_ms=1, rep_ms=5,
                progress=False)
    opts.update(kw)
    return bench.run(bench.Options(**opts), str(out))


def test_bench_append_keeps_earlier_records_and_budget_stops_early(tmp_path):
    from tritonbn.perf import bench

    out = tmp_path / "r.json"
    assert _run(out) == 0
    first = schema.validate(json.loads(out.read_text()))
    assert first["complete"] and len(first["records"]) == 8  # 8 quick cases × 1 impl × 1 pass
    assert bench.run(bench.Options(device=DEVICE, sets=("quick",), dtypes=("bfloat16",), ops=("bn",),
                                   impls=("tritonbn",), passes=("fwd",), cpu_reps=1, warmup_ms=1,
                                   rep_ms=5, progress=False, budget_s=0.0), str(out),
                     append=True) == 0
    second = schema.validate(json.loads(out.read_text()))
    assert not second["complete"] and second["records"] == first["records"]
    assert len(second["runs"]) == 2 and second["runs"][1]["cases_run"] == 0
    fresh = tmp_path / "fresh.json"
    assert _run(fresh, budget_s=0.0) == 0
    assert json.loads(fresh.read_text())["records"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_rule_agrees_with_the_profiler():
    from tritonbn.perf import bench

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x, dy, w, b = bench.make_data((8, 16, 10, 10), "channels_last", dtype, "cuda", 0)
        mod, bn = bench.build("torch", "bn", 4, w, b)
        seen = bench.classify(bench.kernel_names(
            lambda: torch.autograd.grad(mod(x), [x, bn.weight, bn.bias], dy)))
        assert seen == bench.torch_backend(x, w)


def test_bench_cpu_smoke_end_to_end(tmp_path):
    """`tritonbn bench --device cpu` through the real CLI, then `tritonbn report` on its JSON."""
    out = tmp_path / "new_dir" / "smoke.json"  # bench creates the directory
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "tritonbn", "bench", "--device", "cpu", "--shapes", "quick",
           "--dtypes", "float32,bfloat16", "--ops", "bn_relu", "--impls", "tritonbn,torch",
           "--cpu-reps", "1", "--no-progress", "--out", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "interpreter, not performance" in p.stdout
    doc = schema.validate(json.loads(out.read_text()))
    assert doc["interpreter"] and doc["mode"] == schema.INTERPRETER_MODE and doc["complete"]
    n_cases = 3 * 2 + 2  # 4-D shapes in two layouts, two others
    assert len(doc["records"]) == n_cases * 2 * 2 * 3  # × dtypes × impls × passes
    assert all(r["ok"] for r in doc["records"])
    assert {r["backend"] for r in doc["records"]} == {"triton-interpreter", "native"}
    p = subprocess.run([sys.executable, "-m", "tritonbn", "report", str(out), "--out",
                        str(tmp_path / "rep")], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "interpreter, not performance" in (tmp_path / "rep" / "report.md").read_text()


def test_bench_timing_option_and_append_keeps_one_timing(monkeypatch, tmp_path):
    """--timing graph reaches Options; without CUDA a pass is timed eagerly and says so;
    a file of one timing refuses records of the other."""
    from tritonbn import cli
    from tritonbn.perf import bench

    seen = []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bench, "run", lambda opts, out, append=False: seen.append(opts) or 0)
    assert cli.main(["bench", "--device", "cpu", "--timing", "graph"]) == 0
    assert seen[0].timing == "graph" and bench.Options().timing == "eager"
    monkeypatch.undo()
    opts = bench.Options(device="cpu", timing="graph", cpu_reps=1)
    ms, how = bench.time_pass(lambda: None, torch.device("cpu"), opts)
    assert ms >= 0 and how == {"timing": "eager"}
    out = tmp_path / "r.json"
    assert _run(out) == 0
    doc = json.loads(out.read_text())
    assert doc["timing"] == "eager" and all(r["timing"] == "eager" for r in doc["records"])
    with pytest.raises(SystemExit, match="eager timings, not graph"):
        bench.run(bench.Options(device=DEVICE, sets=("quick",), dtypes=("bfloat16",), ops=("bn",),
                                impls=("tritonbn",), passes=("fwd",), cpu_reps=1, progress=False,
                                timing="graph"), str(out), append=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_replays_what_the_eager_call_computes():
    """bench.graphed: a tritonbn training forward captured once and replayed writes
    what the eager call wrote; time_pass says it timed the graph."""
    import tritonbn
    from tritonbn.perf import bench

    m = tritonbn.BatchNorm2d(16, activation="relu", device="cuda")
    x = torch.randn(8, 16, 12, 12, device="cuda") + 1.0
    out = {}

    def step():
        out["y"] = m(x)

    replay, graph = bench.graphed(step)
    eager = m(x)
    replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out["y"], eager)
    ms, how = bench.time_pass(step, torch.device("cuda"),
                              bench.Options(timing="graph", warmup_ms=1, rep_ms=5))
    assert ms > 0 and how == {"timing": "graph"}
