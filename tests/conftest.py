"""Runs the suite on the GPU when there is one, else through Triton's interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at
collection time, before any test imports tritonbn's kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"

LAYOUTS = {
    # name: (module class name, shape, memory format)
    "NC": ("BatchNorm1d", (6, 5), torch.contiguous_format),
    "NCL": ("BatchNorm1d", (3, 5, 7), torch.contiguous_format),
    "NCHW": ("BatchNorm2d", (3, 5, 4, 3), torch.contiguous_format),
    "NHWC": ("BatchNorm2d", (3, 5, 4, 3), torch.channels_last),
    "NCDHW": ("BatchNorm3d", (2, 5, 3, 2, 3), torch.contiguous_format),
    "NDHWC": ("BatchNorm3d", (2, 5, 3, 2, 3), torch.channels_last_3d),
}

# (atol, rtol) against a float64 reference, for values of order 1
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def make_input(shape, dtype=torch.float32, memory_format=torch.contiguous_format, *,
               mean=1.5, std=2.0, device=DEVICE, requires_grad=False):
    """Random data with a non-zero, per-channel-varying mean; never zeros."""
    C = shape[1]
    offset = mean + torch.arange(C, dtype=torch.float64).view(1, C, *([1] * (len(shape) - 2))) * 0.25
    x = (torch.randn(shape, dtype=torch.float64) * std + offset).to(dtype)
    x = x.to(device).to(memory_format=memory_format)
    return x.requires_grad_(requires_grad)


def assert_close(actual, expected, dtype, scale=1.0):
    """actual (any dtype) against a float64 expected, with tolerances for dtype."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double().to(actual.device),
                               atol=atol * scale, rtol=rtol, equal_nan=True)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
