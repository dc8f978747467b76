"""Launch-config tuning: buckets, search spaces, the persisted cache, shipped configs,
TRITONBN_AUTOTUNE, the interpreter bypass and `tritonbn tune`.

Timing needs a GPU, so here the tuner runs through the interpreter under
tuning.simulate_gpu with a fake timer: everything but do_bench is the real code.
"""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import tritonbn
from conftest import DEVICE, assert_close, make_input
from tritonbn import heuristics, ops, tuning
from tritonbn.heuristics import CombineConfig, Config
from tritonbn.layout import kernel_view
from tritonbn.tuning import cache, command, space, tuner

GPU = "Simulated GPU 80GB"
pytestmark = pytest.mark.skipif(DEVICE != "cpu", reason="interpreter-side tuning tests")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """An empty cache directory, an empty shipped-configs directory, default mode, and
    the split path: tuned configs are the split kernels' (these shapes are small
    enough for the single-program path, which has none)."""
    monkeypatch.setenv("TRITONBN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.delenv("TRITONBN_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "_stores", {})
    with ops.launch_overrides(path="split"):
        yield tmp_path


class FakeTimer:
    """timer(fn) -> ms: runs fn once, then a cost from the forced config of `kernel`
    (via ops' overrides); the default cost prefers fewer stages and more warps."""

    def __init__(self, cost=None):
        self.calls = 0
        self.cost = cost or (lambda cfg: 1.0 + getattr(cfg, "num_stages", 1) / 10
                             - cfg.num_warps / 100)

    def __call__(self, fn):
        self.calls += 1
        fn()
        forced = [c for k, c in ops._overrides.items() if k in heuristics.KERNELS and c is not None]
        return self.cost(forced[-1])


def view_of(shape, fmt=torch.contiguous_format, dtype=torch.float32):
    return kernel_view(make_input(shape, dtype, fmt))


def config_for(kernel, x, v):
    return tuning.select(kernel, x, v, ops.interpreting())


# ----------------------------------------------------------------------------- buckets


def test_bucket_rounds_the_reduced_extent_up_to_a_power_of_two():
    x, v = view_of((4, 6, 5, 5), torch.channels_last)  # count 100 -> 128
    assert space.bucket("stats", x.dtype, v) == "stats|float32|channel_last|6|128|1"
    _, v2 = view_of((2, 6, 7, 8), torch.channels_last)  # count 112 -> 128: same bucket
    assert space.bucket("stats", x.dtype, v2) == space.bucket("stats", x.dtype, v)
    _, v3 = view_of((6, 6, 5, 5), torch.channels_last)  # count 150 -> 256
    assert space.bucket("stats", x.dtype, v3) == "stats|float32|channel_last|6|256|1"


def test_bucket_separates_kernel_dtype_tiling_channels_and_inner_extent():
    x, v = view_of((4, 6, 5, 5))
    key = space.bucket("normalize", x.dtype, v)
    assert key == "normalize|float32|channel_first|6|128|32"
    others = {
        space.bucket("dx", x.dtype, v),
        space.bucket("normalize", torch.float16, v),
        space.bucket("normalize", x.dtype, view_of((4, 6, 5, 5), torch.channels_last)[1]),
        space.bucket("normalize", x.dtype, view_of((4, 7, 5, 5))[1]),
        space.bucket("normalize", x.dtype, view_of((1, 6, 10, 10))[1]),  # inner 100 -> 128
    }
    assert key not in others and len(others) == 5
    for k in others | {key}:
        assert space.parse_bucket(k) == k.split("|")[0]


@pytest.mark.parametrize("key", ["stats|float32|channel_last|6|128", "nope|float32|channel_last|6|128|1",
                                 "stats|int8|channel_last|6|128|1", "stats|float32|rows|6|128|1",
                                 "stats|float32|channel_last|6|0|1", "stats|float32|channel_last|x|1|1"])
def test_malformed_bucket_is_rejected(key):
    with pytest.raises(ValueError):
        space.parse_bucket(key)


# ----------------------------------------------------------------------------- search spaces

SHAPES = [((256, 64, 56, 56), torch.channels_last), ((256, 64, 56, 56), torch.contiguous_format),
          ((32, 2048, 7, 7), torch.contiguous_format), ((20, 6, 65536), torch.contiguous_format),
          ((3136, 256), torch.contiguous_format)]


@pytest.mark.parametrize("shape,fmt", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_search_space_is_valid_and_starts_from_the_default(shape, fmt, dtype):
    x, v = kernel_view(torch.empty(shape, dtype=dtype, device="meta").to(memory_format=fmt))
    s = x.element_size()
    pow2 = heuristics.pow2
    for kernel in heuristics.TILE_KERNELS:
        base = heuristics.heuristic(kernel, v, s, x.device, False)  # 132 SMs off the GPU
        round1 = space.tile_candidates(kernel, v, s, 132, base)
        round2 = space.launch_candidates(kernel, v, 132, round1[-1])
        assert round1[0] == base and round2[0] == round1[-1]
        # the default and the grid of tiles x warps (the default's split is in whole
        # waves on an sm_90, the candidates' asks for programs_per_sm: it may be apart)
        sp = space.SPACE[kernel]
        grid = len(sp["tile"]) * len(sp["num_warps"]) * max(
            len(sp["channel_last_bytes"]), len(sp["channel_first_bytes"]))
        assert len(set(round1)) == len(round1) and 2 <= len(round1) <= 1 + grid <= 19
        assert len(round2) <= 1 + len(space.SPACE[kernel]["num_stages"]) * len(
            space.SPACE[kernel]["programs_per_sm"])
        for cfg in round1 + round2:
            space.check_config(kernel, cfg)
            assert cfg.BLOCK_C <= pow2(v.C) and cfg.BLOCK_M * cfg.BLOCK_C <= 8192
            assert cfg.num_stages in space.SPACE[kernel]["num_stages"] + (base.num_stages,)
        assert {c.num_stages for c in round2} == set(space.SPACE[kernel]["num_stages"]) | {3}
    for kernel in heuristics.COMBINE_KERNELS:
        base = heuristics.heuristic_combine(v.C, 528)
        for cfg in space.combine_candidates(kernel, v.C, 528, base):
            space.check_config(kernel, cfg)


@pytest.mark.parametrize("cfg,why", [(Config(3, 4, 1), "power of two"), (Config(4, 4, 0), "positive"),
                                     (Config(4, 4, 1, num_warps=3), "num_warps"),
                                     (Config(512, 256, 1), "over 65536"),
                                     (Config(4, 4, 1, num_stages=9), "over 8"),
                                     (CombineConfig(8, 8), "expected a Config"),
                                     (Config(4, 4, True), "positive integer")])
def test_check_config_names_the_problem(cfg, why):
    with pytest.raises(ValueError, match=why):
        space.check_config("stats", cfg)


@pytest.mark.parametrize("shape,fmt", [((3, 7, 5, 4), torch.channels_last), ((3, 7, 5, 4), None),
                                       ((40, 5), None)])
def test_every_candidate_gives_the_heuristics_numbers(shape, fmt):
    """Elementwise kernels bit for bit; reductions to float32 rounding (the split
    changes the summation order), and both match float64 torch."""
    x, v = view_of(shape, fmt or torch.contiguous_format)
    C = shape[1]
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    dy = ops.like(make_input(shape, memory_format=fmt or torch.contiguous_format, mean=0.3), x)
    rm, rv = torch.zeros(C), torch.ones(C)
    mean, invstd = ops.batch_stats(x, v, rm, rv, None, 0.1, 1e-5)
    y = ops.normalize(x, v, mean, invstd, w, b, True, 1e-5, "relu")
    sums, dw, db = ops.grad_sums(dy, x, v, mean, invstd, w, b, True, 1e-5, "relu", True, True)
    dx = ops.grad_input(dy, x, v, mean, invstd, w, b, sums, True, 1e-5, "relu")
    x64 = x.double()
    assert_close(mean, x64.mean(dim=[d for d in range(x.dim()) if d != 1]), torch.float32)
    checked = 0
    for kernel in heuristics.TILE_KERNELS:
        base = heuristics.heuristic(kernel, v, 4, x.device, True)
        for cfg in space.tile_candidates(kernel, v, 4, 132, base)[1:4] + \
                space.launch_candidates(kernel, v, 132, base)[1::7]:
            with ops.launch_overrides(**{kernel: cfg}), tritonbn.testing.poisoned_allocations():
                m2, i2 = ops.batch_stats(x, v, rm.clone(), rv.clone(), None, 0.1, 1e-5)
                y2 = ops.normalize(x, v, mean, invstd, w, b, True, 1e-5, "relu")
                s2, dw2, db2 = ops.grad_sums(dy, x, v, mean, invstd, w, b, True, 1e-5, "relu",
                                             True, True)
                dx2 = ops.grad_input(dy, x, v, mean, invstd, w, b, sums, True, 1e-5, "relu")
            assert torch.equal(y2, y) and torch.equal(dx2, dx)
            for a, e in ((m2, mean), (i2, invstd), (s2, sums), (dw2, dw), (db2, db)):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))
            checked += 1
    assert checked >= 8


# ----------------------------------------------------------------------------- the cache


def put(store, kernel, x, v, cfg):
    store.put({space.bucket(kernel, x.dtype, v): (cfg, {"ms": 1.0, "heuristic_ms": 1.5})})


def test_cache_round_trip(isolated):
    x, v = view_of((4, 6, 5, 5), torch.channels_last)
    cfg, ccfg = Config(8, 4, 3, 8, 2), CombineConfig(2, 8, 2)
    s = tuning.store(GPU)
    put(s, "stats", x, v, cfg)
    put(s, "stats_combine", x, v, ccfg)
    path = cache.cache_path(GPU)
    assert path.parent == isolated / "cache" and path.name.startswith("simulated-gpu-80gb-triton")
    doc = json.loads(path.read_text())
    assert {k: doc[k] for k in ("format", "gpu")} == {"format": 1, "gpu": GPU}
    assert doc["triton"] == cache.versions()["triton"] and doc["tritonbn"] == tritonbn.__version__
    assert doc["configs"][space.bucket("stats", x.dtype, v)] == {
        "BLOCK_M": 8, "BLOCK_C": 4, "split": 3, "num_warps": 8, "num_stages": 2, "ms": 1.0,
        "heuristic_ms": 1.5}
    fresh = cache.Store(GPU, path, cache.shipped_path(GPU))  # a new process
    assert fresh.get(space.bucket("stats", x.dtype, v)) == cfg
    assert fresh.get(space.bucket("stats_combine", x.dtype, v)) == ccfg
    assert fresh.get(space.bucket("normalize", x.dtype, v)) is None
    # the configs are what launches select, on that GPU only
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU):
        assert config_for("stats", x, v) == cfg
        assert tuning.select("stats_combine", x, v, True, split=3) == ccfg
        assert config_for("normalize", x, v) == heuristics.heuristic("normalize", v, 4, x.device, True)
    with tuning.simulate_gpu(FakeTimer(), gpu="Another GPU"):
        assert config_for("stats", x, v) == heuristics.heuristic("stats", v, 4, x.device, True)


def test_cache_is_loaded_lazily(isolated, monkeypatch):
    loads = []
    real = cache.load
    monkeypatch.setattr(cache, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    s = tuning.store(GPU)
    assert loads == []
    x, v = view_of((4, 6, 5, 5))
    s.get(space.bucket("stats", x.dtype, v))
    assert loads[0] == cache.cache_path(GPU) and loads[1] == cache.shipped_path(GPU)
    s.get(space.bucket("dx", x.dtype, v))
    assert len(loads) == 2


def write_cache(doc_or_text):
    path = cache.cache_path(GPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc_or_text if isinstance(doc_or_text, str) else json.dumps(doc_or_text))
    return path


def test_corrupt_cache_warns_and_falls_back_to_heuristics():
    x, v = view_of((4, 6, 5, 5), torch.channels_last)
    path = write_cache('{"format": 1, "gpu": "Simulated GPU 80GB", "configs": {"stats|')
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU), pytest.warns(cache.CacheWarning, match="corrupt"):
        cfg = config_for("stats", x, v)
    assert cfg == heuristics.heuristic("stats", v, 4, x.device, True)
    # and a forward pass through it gives torch's numbers
    bn, ref = tritonbn.BatchNorm2d(6), torch.nn.BatchNorm2d(6, dtype=torch.float64)
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU), warnings.catch_warnings():
        warnings.simplefilter("ignore", cache.CacheWarning)
        assert_close(bn(x), ref(x.double()), torch.float32)
    # tuning later replaces the corrupt file with a valid one
    put(tuning.store(GPU), "stats", x, v, Config(8, 4, 3))
    assert len(json.loads(path.read_text())["configs"]) == 1


@pytest.mark.parametrize("change,match", [
    ({"triton": "0.0.1"}, "triton"), ({"tritonbn": "0.0.0"}, "tritonbn"),
    ({"gpu": "Other GPU"}, "GPU"), ({"format": 0}, "format"), ({"configs": []}, "configs")])
def test_stale_cache_warns_and_falls_back_to_heuristics(change, match):
    x, v = view_of((4, 6, 5, 5), torch.channels_last)
    key = space.bucket("stats", x.dtype, v)
    doc = cache.header(GPU) | {"configs": {key: cache.entry(Config(8, 4, 3))}}
    write_cache(doc | change)
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU), pytest.warns(cache.CacheWarning, match=match):
        assert config_for("stats", x, v) == heuristics.heuristic("stats", v, 4, x.device, True)


def test_invalid_entries_are_skipped_and_the_rest_used():
    x, v = view_of((4, 6, 5, 5), torch.channels_last)
    good = Config(8, 4, 3)
    doc = cache.header(GPU) | {"configs": {
        space.bucket("stats", x.dtype, v): cache.entry(good),
        space.bucket("normalize", x.dtype, v): cache.entry(Config(6, 4, 3)),  # not a power of two
        space.bucket("dx", x.dtype, v): {"BLOCK_M": 8},                       # fields missing
        "garbage": cache.entry(good)}}
    write_cache(doc)
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU), pytest.warns(cache.CacheWarning, match="3 invalid"):
        assert config_for("stats", x, v) == good
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU):
        assert config_for("normalize", x, v) == heuristics.heuristic("normalize", v, 4, x.device, True)
        assert config_for("dx", x, v) == heuristics.heuristic("dx", v, 4, x.device, True)


def test_unwritable_cache_warns_and_keeps_configs_for_this_process(isolated, monkeypatch):
    blocker = isolated / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("TRITONBN_CACHE_DIR", str(blocker / "cache"))
    x, v = view_of((4, 6, 5, 5))
    s = tuning.store(GPU)
    with pytest.warns(cache.CacheWarning) as caught:
        put(s, "stats", x, v, Config(8, 4, 3))
    messages = [str(w.message) for w in caught]
    assert any("cannot read" in m for m in messages) and any("could not save" in m for m in messages)
    assert s.get(space.bucket("stats", x.dtype, v)) == Config(8, 4, 3)


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tritonbn.heuristics import Config
    from tritonbn.tuning import cache
    path, tiling, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for i in range(n):
        key = f"stats|float32|{tiling}|{i + 1}|128|1"
        cache.save(path, "Simulated GPU 80GB", {key: cache.entry(Config(4, 2, i + 1))})
""")


def test_concurrent_writers_keep_every_entry_and_the_file_whole(isolated):
    """Two processes save 60 entries each, one at a time, while this one keeps reading."""
    path = isolated / "cache" / "shared.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tiling, "60"], env=env,
                              stderr=subprocess.PIPE, text=True)
             for tiling in space.TILINGS]
    reads = 0
    while any(p.poll() is None for p in procs):
        if path.exists():
            doc = json.loads(path.read_text())  # never half a file
            assert doc["format"] == 1
            reads += 1
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    configs = cache.load(path, GPU)
    assert len(configs) == 120
    assert configs["stats|float32|channel_first|60|128|1"] == Config(4, 2, 60)
    assert configs["stats|float32|channel_last|1|128|1"] == Config(4, 2, 1)
    assert not list(path.parent.glob("*.tmp"))
    assert reads > 0


# ----------------------------------------------------------------------------- shipped configs


def ship(configs: dict, gpu=GPU, **header):
    cache.SHIPPED_DIR.mkdir(parents=True, exist_ok=True)
    doc = cache.header(gpu) | header | {"configs": {k: cache.entry(c) for k, c in configs.items()}}
    cache.shipped_path(GPU).write_text(json.dumps(doc))


def test_shipped_configs_are_used_from_any_triton_version_and_the_cache_wins():
    x, v = view_of((4, 6, 5, 5), torch.channels_last)
    shipped, tuned = Config(16, 4, 2), Config(8, 4, 3)
    ship({space.bucket("stats", x.dtype, v): shipped,
          space.bucket("normalize", x.dtype, v): shipped}, triton="2.0.0", tritonbn="0.0.1")
    assert cache.shipped_path(GPU).name == "simulated-gpu-80gb.json"
    put(tuning.store(GPU), "normalize", x, v, tuned)
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU):
        assert config_for("stats", x, v) == shipped
        assert config_for("normalize", x, v) == tuned


def test_shipped_configs_for_another_gpu_are_ignored():
    x, v = view_of((4, 6, 5, 5), torch.channels_last)
    ship({space.bucket("stats", x.dtype, v): Config(16, 4, 2)}, gpu="Other GPU")
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU), pytest.warns(cache.CacheWarning, match="GPU"):
        assert config_for("stats", x, v) == heuristics.heuristic("stats", v, 4, x.device, True)


def test_package_ships_its_configs_directory_and_every_file_in_it_is_valid():
    real = cache.Path(tritonbn.__file__).parent / "configs"
    assert (real / "README.md").exists()
    for path in real.glob("*.json"):
        doc = json.loads(path.read_text())
        assert path.name == cache.slug(doc["gpu"]) + ".json"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cache.load(path, doc["gpu"], check_versions=False)


# ----------------------------------------------------------------------------- modes


@pytest.mark.parametrize("value,expected", [(None, 0), ("0", 0), ("1", 1), ("", 0), (" 1 ", 1)])
def test_autotune_env_values(monkeypatch, value, expected):
    if value is not None:
        monkeypatch.setenv("TRITONBN_AUTOTUNE", value)
    assert tuning.mode() == expected


def test_autotune_env_bad_value_warns_and_means_0(monkeypatch):
    monkeypatch.setenv("TRITONBN_AUTOTUNE", "yes please")
    tuning._warn_bad_mode.cache_clear()
    with pytest.warns(UserWarning, match="not 0 or 1"):
        assert tuning.mode() == 0


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONBN_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TRITONBN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "tritonbn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "tritonbn"


def spy_tune(monkeypatch):
    calls = []
    real = tuner.tune
    monkeypatch.setattr(tuner, "tune", lambda *a, **k: calls.append(tuple(a[0])) or real(*a, **k))
    return calls


def train_step(bn, ref, x):
    """One forward + backward of tritonbn and torch (float64) on the same input."""
    xt = x.clone().requires_grad_()
    x64 = x.double().requires_grad_()
    dy = make_input(x.shape, memory_format=torch.channels_last, mean=0.2)
    y = bn(xt)
    y.backward(dy)
    y_ref = torch.relu(ref(x64))
    y_ref.backward(dy.double())
    return y, y_ref, xt.grad, x64.grad


def test_mode_0_never_tunes_and_uses_tuned_configs(monkeypatch):
    calls = spy_tune(monkeypatch)
    x = make_input((4, 6, 5, 5), memory_format=torch.channels_last)
    xk, v = kernel_view(x)
    tuned = Config(16, 2, 3, 8, 1)
    put(tuning.store(GPU), "stats", xk, v, tuned)
    used = []
    real_plan = ops.plan
    monkeypatch.setattr(ops, "_plans", {})  # every launch signature is planned afresh here
    monkeypatch.setattr(ops, "plan", lambda v, cfg: used.append(cfg) or real_plan(v, cfg))
    bn, ref = tritonbn.BatchNorm2d(6, activation="relu"), torch.nn.BatchNorm2d(6, dtype=torch.float64)
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU):
        y, y_ref, dx, dx_ref = train_step(bn, ref, x)
    # stats launches first, with the cached config (planned with its last-program combine
    # and without, the fallback under CUDA graph capture; bwd_reduce too), the others not
    assert calls == [] and used[:2] == [tuned, tuned]
    assert len(used) == 6 and all(c != tuned for c in used[2:])
    assert_close(y, y_ref, torch.float32)
    assert_close(dx, dx_ref, torch.float32, 4)


def test_mode_1_tunes_unseen_buckets_once_and_updates_running_stats_once(monkeypatch, isolated):
    monkeypatch.setenv("TRITONBN_AUTOTUNE", "1")
    calls = spy_tune(monkeypatch)
    timer = FakeTimer()
    x = make_input((4, 6, 5, 5), memory_format=torch.channels_last)
    bn = tritonbn.BatchNorm2d(6, activation="relu", momentum=None)
    ref = torch.nn.BatchNorm2d(6, dtype=torch.float64, momentum=None)
    with tuning.simulate_gpu(timer, gpu=GPU, limit=3):
        y, y_ref, dx, dx_ref = train_step(bn, ref, x)
        # the statistics and the normalize are separate ops (library.py): one tune each
        assert calls == [("stats", "stats_combine"), ("normalize",),
                         ("bwd_reduce", "bwd_combine", "dx")]
        assert timer.calls > 12  # candidates were really timed
        # one real call: the running stats saw one batch, not one per candidate
        assert int(bn.num_batches_tracked) == 1
        assert_close(bn.running_mean, ref.running_mean, torch.float32)
        assert_close(bn.running_var, ref.running_var, torch.float32)
        assert_close(y, y_ref, torch.float32)
        assert_close(dx, dx_ref, torch.float32, 4)
        assert_close(bn.weight.grad, ref.weight.grad, torch.float32, 40)
        # the second call finds every bucket tuned
        y2, y2_ref, _, _ = train_step(bn, ref, x)
        assert len(calls) == 3
        bn.eval()
        ref.eval()
        assert_close(bn(x), torch.relu(ref(x.double())), torch.float32)
        assert len(calls) == 3
    assert int(bn.num_batches_tracked) == 2
    assert_close(bn.running_var, ref.running_var, torch.float32)
    # the tuned configs were saved, with the fake timer's choice: fewer stages, more warps
    configs = cache.load(cache.cache_path(GPU), GPU)
    assert sorted(k.split("|")[0] for k in configs) == sorted(heuristics.KERNELS)
    xk, v = kernel_view(x)
    assert configs[space.bucket("stats", xk.dtype, v)].num_stages == 1
    # and a new process (a fresh store) launches with them, without tuning
    monkeypatch.setattr(tuning, "_stores", {})
    with tuning.simulate_gpu(timer, gpu=GPU):
        assert config_for("stats", xk, v) == configs[space.bucket("stats", xk.dtype, v)]
        train_step(bn.train(), ref.train(), x)
    assert len(calls) == 3


def test_mode_1_under_the_interpreter_uses_heuristics_and_never_tunes(monkeypatch):
    """Outside simulate_gpu the interpreter ignores the cache and TRITONBN_AUTOTUNE."""
    monkeypatch.setenv("TRITONBN_AUTOTUNE", "1")
    calls = spy_tune(monkeypatch)
    x = make_input((4, 6, 5, 5), memory_format=torch.channels_last)
    xk, v = kernel_view(x)
    put(tuning.store(GPU), "stats", xk, v, Config(16, 2, 3))
    assert ops.interpreting()
    for kernel in heuristics.TILE_KERNELS:
        assert config_for(kernel, xk, v) == heuristics.heuristic(kernel, v, 4, x.device, True)
    bn, ref = tritonbn.BatchNorm2d(6, activation="relu"), torch.nn.BatchNorm2d(6, dtype=torch.float64)
    y, y_ref, _, _ = train_step(bn, ref, x)
    assert calls == []
    assert_close(y, y_ref, torch.float32)


# ----------------------------------------------------------------------------- the tuner


def test_tuner_rejects_a_candidate_that_leaves_outputs_unwritten_or_raises(monkeypatch):
    """The fake timer calls the broken candidates fastest; they must still lose."""
    x, v = view_of((4, 6, 5, 5), torch.channels_last)
    base = heuristics.heuristic("normalize", v, 4, x.device, True)
    lazy = Config(base.BLOCK_M, base.BLOCK_C, base.split, num_warps=2)  # launches nothing
    bad = Config(base.BLOCK_M, base.BLOCK_C, base.split, num_warps=1, num_stages=2)
    good = Config(base.BLOCK_M, base.BLOCK_C, base.split, num_warps=8, num_stages=1)
    monkeypatch.setattr(space, "tile_candidates", lambda *a: [base, lazy, bad, good])
    monkeypatch.setattr(space, "launch_candidates", lambda *a: [a[-1]])
    real_kernel = ops.K.normalize_kernel

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                if kw["num_warps"] == 2:
                    return None  # y stays as allocated: poisoned to NaN by the tuner
                if kw["num_warps"] == 1:
                    raise RuntimeError("out of resources: shared memory")
                return real_kernel[grid](*args, **kw)
            return launch

    monkeypatch.setattr(ops.K, "normalize_kernel", Broken())
    cost = {lazy: 0.1, bad: 0.2, good: 0.5, base: 1.0}
    res, = tuner.tune(("normalize",), x, v, timer=FakeTimer(lambda c: cost[c]), interpret=True)
    assert res.config == good and res.ms == 0.5 and res.default_ms == 1.0
    assert res.tried == 3
    assert [c for c, _ in res.rejected] == [lazy, bad]
    assert "NaN (unwritten?)" in res.rejected[0][1] and "Mismatched elements" in res.rejected[0][1]
    assert "out of resources" in res.rejected[1][1]


def test_tuner_keeps_the_default_when_nothing_is_faster():
    x, v = view_of((3, 6, 4, 4))
    w, b = torch.rand(6) + 0.5, torch.randn(6)
    before = [t.clone() for t in (x, w, b)]
    results = tuner.tune(heuristics.KERNELS, x, v, weight=w, bias=b, activation="relu",
                         timer=FakeTimer(lambda c: 1.0 if c.num_warps == 4 else 2.0),
                         interpret=True, limit=4)
    assert [r.kernel for r in results] == list(heuristics.KERNELS)
    for r in results:
        assert r.config == r.default and r.ms == r.default_ms == 1.0 and r.tried > 0
        assert r.bucket == space.bucket(r.kernel, x.dtype, v) and not r.rejected
    assert all(torch.equal(a, b) for a, b in zip(before, (x, w, b)))  # inputs untouched


def test_tuner_skips_kernels_whose_data_is_not_finite():
    x, v = view_of((3, 6, 4, 4))
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    results = tuner.tune(("stats", "normalize"), x, v, timer=FakeTimer(), interpret=True, limit=2)
    assert results == []


# ----------------------------------------------------------------------------- tritonbn tune


def tune_args(*argv):
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    command.add_parser(sub)
    return p.parse_args(["tune", "--no-progress", *argv])


def test_tune_times_any_activation():
    """--activation takes every name the kernels have (ops.ACTIVATIONS; None as 'none')."""
    from tritonbn import ops

    for act in ops.ACTIVATIONS:
        assert tune_args("--activation", act or "none").activation == (act or "none")
    with pytest.raises(SystemExit):
        tune_args("--activation", "tanh")


def test_parse_shapes():
    assert command.parse_shapes("32,64,56,56;3136,256") == [(32, 64, 56, 56), (3136, 256)]
    assert command.parse_shapes("quick")[0] == (256, 64, 56, 56)
    assert len(command.parse_shapes("resnet50")) == 24
    assert len(command.parse_shapes("quick,stress")) == len(set(command.parse_shapes("quick,stress")))
    for bad in ("32", "0,4", "a,b", "1,2,3,4,5,6", "resnet", ""):
        with pytest.raises(ValueError):
            command.parse_shapes(bad)


def test_tune_command_tunes_saves_skips_tuned_buckets_and_exports(isolated, capsys):
    args = tune_args("--shapes", "2,23,4,4;2,23,3,3;40,6", "--dtype", "float32,float16",
                     "--layout", "channels_last,nchw", "--export", str(isolated / "ship.json"))
    assert [c[:2] for c in command.cases(args)][:4] == [((2, 23, 4, 4), "channels_last")] * 2 + \
        [((2, 23, 4, 4), "nchw")] * 2
    assert len(command.cases(args)) == 10  # (40, 6) has one layout
    timer = FakeTimer()
    with tuning.simulate_gpu(timer, gpu=GPU):
        assert command.tune_cases(args, torch.device("cpu"), GPU, timer, interpret=True, limit=2) == 0
    out = capsys.readouterr().out
    # 2x23x3x3 shares every bucket of 2x23x4x4 (count 18 and 32 -> 32) in channels_last;
    # in nchw the inner extent (9 -> 16 vs 16) is the same bucket too
    assert out.count("bucket ") == 6 and "tuned 36 buckets" in out
    assert "bucket float16|channel_last|23|32|1   (tuned on 2x23x4x4)" in out
    for kernel in heuristics.KERNELS:
        assert f"\n  {kernel} " in out
    configs = cache.load(cache.cache_path(GPU), GPU)
    assert len(configs) == 36
    exported = json.loads((isolated / "ship.json").read_text())
    assert exported["gpu"] == GPU and len(exported["configs"]) == 36
    # a second run finds everything tuned; --retune tunes again
    with tuning.simulate_gpu(timer, gpu=GPU):
        assert command.tune_cases(args, torch.device("cpu"), GPU, timer, interpret=True, limit=2) == 0
        assert "tuned 0 buckets" in capsys.readouterr().out
        retune = tune_args("--shapes", "40,6", "--dtype", "float32", "--passes", "fwd", "--retune")
        assert command.tune_cases(retune, torch.device("cpu"), GPU, timer, interpret=True, limit=2) == 0
        assert "tuned 3 buckets" in capsys.readouterr().out


def test_tune_command_reports_a_failing_shape_and_goes_on(isolated, capsys, monkeypatch):
    args = tune_args("--shapes", "2,5,3,3;30,4", "--dtype", "float32", "--passes", "fwd", "--layout", "nchw")
    real = tuner.tune

    def flaky(kernels, x, v, **kw):
        if x.dim() == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(kernels, x, v, **kw)

    monkeypatch.setattr(tuner, "tune", flaky)
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU):
        rc = command.tune_cases(args, torch.device("cpu"), GPU, FakeTimer(), interpret=True, limit=2)
    captured = capsys.readouterr()
    assert rc == 1 and "OutOfMemoryError" in captured.out and "tuned 3 buckets" in captured.out
    assert "1 shapes failed" in captured.err


@pytest.mark.parametrize("interpret", [True, False])
def test_tune_without_a_gpu_exits_nonzero_and_says_why(interpret):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "tritonbn", "tune", "--shapes", "quick"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "tuning needs a CUDA GPU" in proc.stderr
    assert ("TRITON_INTERPRET" in proc.stderr) == interpret


def test_select_memo_forgets_its_answers_when_configs_are_added():
    x, v = view_of((4, 6, 5, 5), torch.channels_last)
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU):
        assert config_for("stats", x, v) == heuristics.heuristic("stats", v, 4, x.device, True)
        assert tuning.store(GPU).memo  # answered from the memo from now on
        put(tuning.store(GPU), "stats", x, v, Config(8, 4, 3))
        assert config_for("stats", x, v) == Config(8, 4, 3)
        with tuning.heuristics_only():
            assert config_for("stats", x, v) == heuristics.heuristic("stats", v, 4, x.device, True)


def test_a_combine_is_tuned_for_the_split_its_reduce_launches_with():
    """stats tuned earlier (split 2), stats_combine not: the combine's default and
    candidates are sized for 2 partials, not for the heuristic's split."""
    x, v = view_of((4, 6, 16, 16))
    cached = Config(64, 2, 2)
    put(tuning.store(GPU), "stats", x, v, cached)
    assert heuristics.plan(v, cached)[0][1] == 2
    assert heuristics.plan(v, heuristics.heuristic("stats", v, 4, x.device, True))[0][1] != 2
    with tuning.simulate_gpu(FakeTimer(), gpu=GPU):
        res, = tuner.tune(("stats_combine",), x, v, timer=FakeTimer(), interpret=True)
    assert res.default == heuristics.heuristic_combine(6, 2)
    assert res.config.BLOCK_S <= 2
