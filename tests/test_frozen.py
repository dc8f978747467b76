"""tritonbn.FrozenBatchNorm2d (issue 16): fixed statistics and affine parameters, one
fused kernel each way, against its float64 formula; and convert() of torchvision's
and timm's FrozenBatchNorm2d, by a stand-in (neither is imported here)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import tritonbn
from conftest import DEVICE, TOL, assert_close, make_input
from tritonbn import reference
from tritonbn.testing import poisoned_allocations


def _frozen(C, activation=None, dtype=torch.float32):
    m = tritonbn.FrozenBatchNorm2d(C, activation=activation, negative_slope=0.2, alpha=0.6,
                                   device=DEVICE, dtype=dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-1.0, 2.0)
        m.running_var.uniform_(0.5, 3.0)
    return m


def _formula(m, x64, z64=None):
    """act((x - mean) / sqrt(var + eps) * weight + bias [+ z]) in float64."""
    shape = (1, -1, 1, 1)
    scale = (m.weight.double() / (m.running_var.double() + m.eps).sqrt()).view(shape)
    pre = (x64 - m.running_mean.double().view(shape)) * scale + m.bias.double().view(shape)
    return reference.activate(pre + z64 if z64 is not None else pre, m.activation, m._slope())


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("activation,residual", [(None, False), ("relu", True), ("silu", False),
                                                 ("leaky_relu", True), ("relu6", True),
                                                 ("elu", True), ("gelu_tanh", False)])
def test_frozen_equals_its_formula(fmt, dtype, activation, residual):
    m = _frozen(5, activation)
    x = make_input((3, 5, 4, 3), dtype, fmt, requires_grad=True)
    z = make_input((3, 5, 4, 3), dtype, fmt, mean=-0.5, requires_grad=True) if residual else None
    with poisoned_allocations():
        y = m(x, z)
        dy = make_input(x.shape, dtype, fmt, mean=0.3, std=1.0)
        y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    z64 = z.detach().double().requires_grad_() if residual else None
    y64 = _formula(m, x64, z64)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.stride() == x.stride()
    assert_close(y, y64, dtype, 4.0)
    assert_close(x.grad, x64.grad, dtype, 4.0)
    if residual:
        assert_close(z.grad, z64.grad, dtype, 4.0)
    assert all(b.grad is None for b in m.buffers()) and not list(m.parameters())


def test_frozen_state_dict_and_errors():
    m = _frozen(4)
    assert list(m.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    state = dict(m.state_dict(), num_batches_tracked=torch.tensor(3))  # torch's BN keys
    other = tritonbn.FrozenBatchNorm2d(4, device=DEVICE)
    other.load_state_dict(state)
    assert torch.equal(other.running_var, m.running_var)
    with pytest.raises(ValueError, match="expected 4D input"):
        m(torch.randn(2, 4, 3, device=DEVICE))
    assert "activation=None" in repr(m)


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d as torchvision writes it."""
    __module__ = "torchvision.ops.misc"

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class Backbone(nn.Module):
    """A detection backbone's residual block on frozen BatchNorms."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn1, self.bn2 = FrozenBatchNorm2d(3), FrozenBatchNorm2d(3)
        self.stem = nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm2d(3), nn.ReLU(inplace=True))
        for m in self.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.stem(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + x)


def test_convert_fuses_frozen_batchnorms():
    ref = Backbone().to(DEVICE)
    buffers = {n: id(b) for n, b in ref.named_buffers()}
    out, rows = tritonbn.convert(copy.deepcopy(ref), report=True)
    assert isinstance(out, fx.GraphModule)
    frozen = {n: m for n, m in out.named_modules() if isinstance(m, tritonbn.FrozenBatchNorm2d)}
    assert sorted(frozen) == ["bn1", "bn2", "stem.1"]
    assert {n: m.activation for n, m in frozen.items()} == {"bn1": "relu", "bn2": "relu",
                                                           "stem.1": "relu"}
    assert {r.name: r.residual for r in rows} == {"bn1": False, "bn2": True, "stem.1": False}
    assert list(out.state_dict()) == list(ref.state_dict())
    same = tritonbn.convert(ref)                   # in place: the very buffers
    assert {n: id(b) for n, b in same.named_buffers()} == buffers
    x = make_input((2, 3, 3, 2), memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    twin = Backbone().to(DEVICE)
    twin.load_state_dict(out.state_dict())
    ya, yb = twin(a), out(b)
    torch.testing.assert_close(yb, ya, **dict(zip(("atol", "rtol"), TOL[torch.float32])))
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4)


def _same_step(ref, out):
    """ref and out (converted) give the same output and input grad."""
    x = make_input((2, 3, 3, 2), mean=0.0)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(a), out(b)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    ya.backward(torch.ones_like(ya))
    yb.backward(torch.ones_like(yb))
    torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5)


class FrozenElu(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1, self.bn2 = FrozenBatchNorm2d(3), FrozenBatchNorm2d(3)
        self.seq = nn.Sequential(FrozenBatchNorm2d(3), nn.ELU(0.3, inplace=True))
        for m in (self.bn1, self.bn2, self.seq[0]):
            m.running_mean.uniform_(-1.0, 1.0)

    def forward(self, x):
        return F.elu(self.bn1(x), alpha=0.5) + F.hardswish(self.bn2(x)) + self.seq(x)


def test_convert_frozen_keeps_elu_alpha():
    ref = FrozenElu().to(DEVICE)
    out = tritonbn.convert(copy.deepcopy(ref))
    acts = {n: (m.activation, m.alpha) for n, m in out.named_modules()
            if isinstance(m, tritonbn.FrozenBatchNorm2d)}
    assert acts == {"bn1": ("elu", 0.5), "bn2": ("hardswish", 1.0), "seq.0": ("elu", 0.3)}
    assert "alpha=0.5" in repr(out.bn1)
    _same_step(ref, out)


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm.layers.norm_act.FrozenBatchNormAct2d as timm writes it: frozen BN, then
    self.drop, then self.act."""
    __module__ = "timm.layers.norm_act"

    def __init__(self, num_features, act=None, drop=None):
        super().__init__(num_features)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self.running_mean.uniform_(-1.0, 1.0)
        self.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


@pytest.mark.parametrize("act,drop,activation", [
    (nn.ReLU(inplace=True), None, "relu"), (nn.Hardswish(), nn.Dropout(0.0), "hardswish"),
    (None, None, None), (nn.ELU(0.4), None, "elu")])
def test_timm_frozen_batchnorm_act_converts_with_its_activation(act, drop, activation):
    """timm's FrozenBatchNormAct2d becomes a tritonbn FrozenBatchNorm2d with its act
    fused (elu's alpha kept), the same buffers and state_dict keys, and computes the
    same, forward and backward."""
    ref = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNormAct2d(4, act, drop)).to(DEVICE)
    out, rows = tritonbn.convert(copy.deepcopy(ref), report=True)
    assert isinstance(out[1], tritonbn.FrozenBatchNorm2d) and out[1].activation == activation
    assert [(r.name, r.became, r.activation) for r in rows] == [
        ("1", "tritonbn.FrozenBatchNorm2d", activation)]
    if activation == "elu":
        assert out[1].alpha == 0.4
    assert list(out.state_dict()) == list(ref.state_dict())
    _same_step(ref, out)


@pytest.mark.parametrize("act,drop", [(nn.Tanh(), None), (nn.ReLU(), nn.Dropout(0.3))])
def test_timm_frozen_batchnorm_act_that_computes_more_stays(act, drop):
    """An activation tritonbn does not fuse, or a drop that computes: left alone, and
    the report says so."""
    ref = nn.Sequential(FrozenBatchNormAct2d(4, act, drop)).to(DEVICE)
    out, rows = tritonbn.convert(copy.deepcopy(ref), report=True)
    assert type(out[0]) is FrozenBatchNormAct2d
    assert rows[0].became.endswith("FrozenBatchNormAct2d") and "left alone" in rows[0].note
