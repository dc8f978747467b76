"""Tuning on a real GPU: do_bench timings, compiled candidates, the cache on disk.

The interpreter-side tests (test_tuning.py) cover the logic with a fake timer;
this runs the same path with TRITONBN_AUTOTUNE=1 on CUDA, a few candidates per round.
"""
import json

import pytest
import torch

import tritonbn
from conftest import DEVICE, assert_close, make_input
from tritonbn import heuristics, tuning
from tritonbn.layout import kernel_view
from tritonbn.tuning import cache, space

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")


def test_tune_on_first_use_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONBN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITONBN_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "_stores", {})
    monkeypatch.setattr(tuning, "_limit", 3)
    x = make_input((16, 24, 20, 20), torch.float16, torch.channels_last)
    bn = tritonbn.BatchNorm2d(24, activation="relu", device="cuda")
    ref = torch.nn.BatchNorm2d(24, device="cuda", dtype=torch.float64)
    xt, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    y = bn(xt)
    y.backward(torch.ones_like(y))
    y_ref = torch.relu(ref(x64))
    y_ref.backward(torch.ones_like(y_ref))
    assert_close(y, y_ref, torch.float16)
    assert_close(xt.grad, x64.grad, torch.float16, 4)
    assert_close(bn.running_var, ref.running_var, torch.float32)  # one update, not one per candidate
    assert int(bn.num_batches_tracked) == 1
    gpu = torch.cuda.get_device_name()
    doc = json.loads(cache.cache_path(gpu).read_text())
    _, v = kernel_view(x)
    for kernel in heuristics.KERNELS:
        e = doc["configs"][space.bucket(kernel, torch.float16, v)]
        assert e["ms"] > 0 and e["heuristic_ms"] > 0 and e["ms"] <= e["heuristic_ms"]
    assert cache.load(cache.cache_path(gpu), gpu)  # loads back without a warning
