"""tritonbn.convert: BatchNorm replacement, nn.Sequential and torch.fx fusion of the
activation (and residual add) after a BatchNorm, against the unconverted torch model."""
import copy
import io
import operator
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import tritonbn
from conftest import DEVICE, make_input

CL = torch.channels_last     # the interpreter runs channels_last ~10x faster: fewer programs
TOLS = dict(rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# models


class BasicBlock(nn.Module):
    """torchvision's BasicBlock."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """A tiny ResNet for 8x8 digits: 6 BatchNorms."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4),
                                  nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 8, stride=2))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet():
    return ResNet().to(DEVICE).to(memory_format=CL)


def bn_calls(model):
    """Counter of (activation, with residual) over the BatchNorm calls in model's graph."""
    modules = dict(model.named_modules())
    out = Counter()
    for n in model.graph.nodes:
        if n.op == "call_module" and isinstance(modules[n.target], nn.BatchNorm2d):
            m = modules[n.target]
            assert isinstance(m, tritonbn.BatchNorm2d)
            out[(m.activation, len(n.args) == 2)] += 1
    return out


def fused(model):
    """Counter of the activations of model's tritonbn BatchNorms (None: unfused)."""
    return Counter(m.activation for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def check_same(ref, conv, *inputs, grads=True):
    """ref(*inputs) == conv(*inputs), the input grads and the running stats too."""
    a = [t.detach().clone().requires_grad_(grads) for t in inputs]
    b = [t.detach().clone().requires_grad_(grads) for t in inputs]
    ya, yb = ref(*a), conv(*b)
    torch.testing.assert_close(yb, ya, **TOLS)
    if grads:
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        for ta, tb in zip(a, b):
            if ta.grad is None:
                assert tb.grad is None
            else:
                torch.testing.assert_close(tb.grad, ta.grad, **TOLS)
    for (ka, va), (kb, vb) in zip(ref.state_dict().items(), conv.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(vb, va, **TOLS)


def check_both_modes(ref, out):
    """check_same on a (2, 3, 3, 2) x and residual, in training then in eval."""
    x = make_input((2, 3, 3, 2), memory_format=CL)
    other = make_input((2, 3, 3, 2), mean=-1.0)
    for mode in (True, False):
        ref.train(mode)
        out.train(mode)
        check_same(ref, out, x, other)


# --------------------------------------------------------------------------------------
# ResNet


def test_resnet_fusions_and_original_untouched():
    model = resnet()
    ref = copy.deepcopy(model)
    out = tritonbn.convert(model)
    assert isinstance(out, fx.GraphModule)
    # stem: nn.Sequential fusion, in place; each block: bn1+relu and bn2+add+relu by
    # tracing; the downsample BatchNorm has nothing after it but the add another one took
    assert bn_calls(out) == {("relu", False): 3, ("relu", True): 2, (None, False): 1}
    assert isinstance(out.stem[1], tritonbn.BatchNorm2d) and out.stem[1].activation == "relu"
    assert isinstance(out.stem[2], nn.Identity)
    assert out.layer1[1].downsample[1].activation is None
    assert out.layer1[1].bn2.activation == "relu"
    targets = [n.target for n in out.graph.nodes if n.op != "placeholder"]
    assert "layer1.1.relu" not in targets and "layer1.0.relu" not in targets
    assert not any(n.target in (operator.add, operator.iadd) for n in out.graph.nodes)
    # the argument: converted in place, the traced fusion lives in the GraphModule only
    assert model.stem[1] is out.stem[1] and isinstance(model.stem[2], nn.Identity)
    assert fused(model) == {None: 5, "relu": 1}
    assert isinstance(model.layer1[0].bn2, tritonbn.BatchNorm2d)
    assert model.layer1[0].bn2 is not out.layer1[0].bn2
    assert model.layer1[0].bn2.weight is out.layer1[0].bn2.weight
    x = make_input((4, 1, 8, 8), memory_format=CL)
    check_same(ref, out, x)
    check_same(ref, model, x)         # both take one more step of the same running stats
    # converting again changes nothing
    code = out.code
    assert tritonbn.convert(out) is out and out.code == code


def test_resnet_trains_like_torch_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    # float64: the digits' blank borders leave a channel of the strided 1x1 downsample
    # conv nearly constant, so its BatchNorm's invstd is ~1/sqrt(eps) and float32
    # rounding, torch's own, moves that conv's grad by more than its size (torch's
    # float32 grad there is ~2 off its float64 one, for grads of ~0.02); in float64 the
    # two trainings agree to 1e-6
    X = torch.tensor(digits.images[:64], dtype=torch.float64).unsqueeze(1) / 16.0
    X = X.to(DEVICE).contiguous(memory_format=CL)
    y = torch.tensor(digits.target[:64]).to(DEVICE)
    ref = resnet().double()
    model = tritonbn.convert(copy.deepcopy(ref))
    assert sum(bn_calls(model).values()) == 6
    init = copy.deepcopy(ref.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9) for m in (ref, model)]
    losses = []
    for _ in range(3):
        step = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            loss = F.cross_entropy(m(X), y)
            loss.backward()
            opt.step()
            step.append(loss.item())
        losses.append(step)
    for want, got in losses:
        assert got == pytest.approx(want, rel=1e-6)
    assert losses[-1][0] < losses[0][0]                  # it learns
    for (k, v0), (k1, va), (k2, vb) in zip(init.items(), ref.state_dict().items(),
                                           model.state_dict().items()):
        assert k == k1 == k2
        torch.testing.assert_close(vb, va, rtol=1e-6, atol=1e-6)
        if k.endswith("num_batches_tracked"):
            assert vb.item() == 3
        elif not torch.equal(va, v0):
            assert not torch.equal(vb, v0)               # trained, both
    ref.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-4, atol=1e-4)


def test_state_dict_keys_and_loading_both_ways():
    torch.manual_seed(1)
    orig = resnet()
    torch.manual_seed(2)
    conv = tritonbn.convert(resnet())
    assert isinstance(conv, fx.GraphModule)
    assert list(conv.state_dict()) == list(orig.state_dict())
    with torch.no_grad():
        for name, b in orig.named_buffers():
            if "running" in name:
                b.uniform_(0.5, 1.5)
    conv.load_state_dict(orig.state_dict())
    for (k, va), vb in zip(orig.state_dict().items(), conv.state_dict().values()):
        assert torch.equal(va, vb), k
    orig.eval()
    conv.eval()
    x = make_input((2, 1, 8, 8), memory_format=CL)
    check_same(orig, conv, x)
    back = ResNet().to(DEVICE).to(memory_format=CL).eval()
    back.load_state_dict(conv.state_dict())
    check_same(orig, back, x)
    # the GraphModule keeps the original's structure: indexable containers, train flags
    assert len(conv.layer1) == 2 and isinstance(conv.layer1[1].downsample[0], nn.Conv2d)
    assert not conv.training and not conv.layer1.training and not conv.layer1[0].bn2.training
    with pytest.raises(RuntimeError, match="call the whole model"):
        conv.layer1[0](x)
    # pickles, copies
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert bn_calls(loaded) == bn_calls(conv)
    assert list(copy.deepcopy(conv).state_dict()) == list(orig.state_dict())


def test_parameters_shared_with_an_optimizer_built_before():
    model = resnet()
    bn = model.layer1[0].bn2
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.5)
    out = tritonbn.convert(model)
    assert [id(p) for p in out.parameters()] == [id(p) for p in params]
    assert out.layer1[0].bn2.running_mean is bn.running_mean
    assert out.layer1[0].bn2.num_batches_tracked is bn.num_batches_tracked
    before = [p.detach().clone() for p in params]
    out(make_input((2, 1, 8, 8), memory_format=CL)).square().mean().backward()
    opt.step()
    assert all(not torch.equal(p, b) for p, b in zip(out.parameters(), before))
    assert bn.num_batches_tracked.item() == 1 and not torch.equal(bn.running_mean,
                                                                  torch.zeros(4, device=DEVICE))


# --------------------------------------------------------------------------------------
# the patterns


class OneBN(nn.Module):
    def __init__(self, fn, act=None, residual=None):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.act = act
        self.fn, self.residual = fn, residual

    def forward(self, x, other):
        return self.fn(self, RESIDUALS[self.residual](self.bn, x, other))


def _iadd(bn, x, other):
    y = bn(x)
    y += other
    return y


RESIDUALS = {
    None: lambda bn, x, other: bn(x),
    "bn+other": lambda bn, x, other: bn(x) + other,
    "other+bn": lambda bn, x, other: other + bn(x),
    "+=": _iadd,
    "torch.add": lambda bn, x, other: torch.add(bn(x), other),
    "torch.add(other)": lambda bn, x, other: torch.add(other, bn(x), alpha=1),
    "add_": lambda bn, x, other: bn(x).add_(other),
    "other.add": lambda bn, x, other: other.add(bn(x)),
}

# name: (act module, fn(self, y), activation, its scalar: negative_slope, elu's alpha)
FORMS = {
    "nn.ReLU": (nn.ReLU(inplace=True), lambda s, y: s.act(y), "relu", 0.01),
    "nn.LeakyReLU": (nn.LeakyReLU(0.2), lambda s, y: s.act(y), "leaky_relu", 0.2),
    "nn.SiLU": (nn.SiLU(), lambda s, y: s.act(y), "silu", 0.01),
    "nn.GELU": (nn.GELU(), lambda s, y: s.act(y), "gelu", 0.01),
    "F.relu": (None, lambda s, y: F.relu(y), "relu", 0.01),
    "F.relu_inplace": (None, lambda s, y: F.relu(y, inplace=True), "relu", 0.01),
    "torch.relu": (None, lambda s, y: torch.relu(y), "relu", 0.01),
    "torch.relu_": (None, lambda s, y: torch.relu_(y), "relu", 0.01),
    "y.relu()": (None, lambda s, y: y.relu(), "relu", 0.01),
    "y.relu_()": (None, lambda s, y: y.relu_(), "relu", 0.01),
    "F.leaky_relu": (None, lambda s, y: F.leaky_relu(y, 0.2), "leaky_relu", 0.2),
    "F.leaky_relu_kw": (None, lambda s, y: F.leaky_relu(y, negative_slope=0.2, inplace=True),
                        "leaky_relu", 0.2),
    "F.leaky_relu_default": (None, lambda s, y: F.leaky_relu(y), "leaky_relu", 0.01),
    "F.silu": (None, lambda s, y: F.silu(y), "silu", 0.01),
    "F.gelu": (None, lambda s, y: F.gelu(y), "gelu", 0.01),
    "F.gelu_none": (None, lambda s, y: F.gelu(y, approximate="none"), "gelu", 0.01),
    # issue 16; elu's alpha is not the default, so a dropped alpha shows
    "nn.ReLU6": (nn.ReLU6(inplace=True), lambda s, y: s.act(y), "relu6", 0.01),
    "nn.Hardtanh(0,6)": (nn.Hardtanh(0.0, 6.0), lambda s, y: s.act(y), "relu6", 0.01),
    "nn.Hardswish": (nn.Hardswish(inplace=True), lambda s, y: s.act(y), "hardswish", 0.01),
    "nn.Hardsigmoid": (nn.Hardsigmoid(), lambda s, y: s.act(y), "hardsigmoid", 0.01),
    "nn.Mish": (nn.Mish(inplace=True), lambda s, y: s.act(y), "mish", 0.01),
    "nn.ELU": (nn.ELU(alpha=0.5, inplace=True), lambda s, y: s.act(y), "elu", 0.5),
    "nn.GELU(tanh)": (nn.GELU(approximate="tanh"), lambda s, y: s.act(y), "gelu_tanh", 0.01),
    "F.relu6": (None, lambda s, y: F.relu6(y), "relu6", 0.01),
    "F.relu6_inplace": (None, lambda s, y: F.relu6(y, inplace=True), "relu6", 0.01),
    "F.hardtanh(0,6)": (None, lambda s, y: F.hardtanh(y, 0, 6.0), "relu6", 0.01),
    "F.hardtanh_": (None, lambda s, y: F.hardtanh_(y, min_val=0.0, max_val=6.0), "relu6", 0.01),
    "F.hardswish": (None, lambda s, y: F.hardswish(y, inplace=True), "hardswish", 0.01),
    "F.hardsigmoid": (None, lambda s, y: F.hardsigmoid(y), "hardsigmoid", 0.01),
    "F.mish": (None, lambda s, y: F.mish(y), "mish", 0.01),
    "F.elu": (None, lambda s, y: F.elu(y, 0.5), "elu", 0.5),
    "F.elu_kw": (None, lambda s, y: F.elu(y, alpha=1.5, inplace=True), "elu", 1.5),
    "F.elu_default": (None, lambda s, y: F.elu(y), "elu", 1.0),
    "F.elu_": (None, lambda s, y: F.elu_(y, 0.5), "elu", 0.5),
    "F.gelu_tanh": (None, lambda s, y: F.gelu(y, approximate="tanh"), "gelu_tanh", 0.01),
}

CASES = ([(form, None) for form in FORMS]
         + [("nn.ReLU", res) for res in RESIDUALS if res is not None]
         + [(form, "other+bn") for form in ("F.leaky_relu", "nn.SiLU", "F.gelu")]
         + [("y.relu()", "+=")]
         + [("nn.ReLU6", "+="), ("F.elu", "other+bn"), ("nn.Hardswish", "bn+other"),
            ("F.gelu_tanh", "torch.add")])


@pytest.mark.parametrize("form,residual", CASES)
def test_pattern_fused_and_equal(form, residual):
    act, fn, activation, slope = FORMS[form]
    ref = OneBN(fn, copy.deepcopy(act), residual).to(DEVICE)
    out = tritonbn.convert(copy.deepcopy(ref))
    assert isinstance(out, fx.GraphModule)
    assert [n.op for n in out.graph.nodes] == ["placeholder", "placeholder", "call_module",
                                               "output"]
    (call,) = [n for n in out.graph.nodes if n.op == "call_module"]
    assert len(call.args) == (1 if residual is None else 2)
    assert out.bn.activation == activation
    assert (out.bn.alpha if activation == "elu" else out.bn.negative_slope) == pytest.approx(slope)
    check_both_modes(ref, out)


class BN1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return F.silu(self.bn(x))


def test_batchnorm1d_traced():
    ref = BN1d().to(DEVICE)
    out = tritonbn.convert(copy.deepcopy(ref))
    assert isinstance(out.bn, tritonbn.BatchNorm1d) and out.bn.activation == "silu"
    check_same(ref, out, make_input((4, 3)))


# --------------------------------------------------------------------------------------
# not fused where that would change the result


class _OneBN2d(nn.Module):
    """The cases below: one BatchNorm2d(3) as self.bn, and their own forward."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)


class UsedTwice(_OneBN2d):
    def forward(self, x, other):
        y = self.bn(x)
        return F.relu(y) + y * other


class SelfAdd(_OneBN2d):
    def forward(self, x, other):
        y = self.bn(x)
        return F.relu(y + y)


class CalledTwice(_OneBN2d):
    def forward(self, x, other):
        return F.relu(self.bn(self.bn(x) + other))


class NotRelu6(_OneBN2d):
    """hardtanh with other bounds than relu6's (0, 6)."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.BatchNorm2d(3), nn.Hardtanh(-1.0, 6.0))

    def forward(self, x, other):
        return F.hardtanh(self.bn(x), 0.0, 5.0) + self.seq(other)


class WritesBetween(_OneBN2d):
    """Fusing would run bn after h.relu_(), normalizing the rectified h. (No backward:
    torch's BatchNorm saved h, which relu_ then changed.)"""

    def forward(self, x, other):
        h = x * 1.0
        y = self.bn(h)
        h.relu_()
        return F.relu(y + h)


class AddIntoOther(_OneBN2d):
    """o.add_(bn(x)) writes into o, which is read afterwards."""

    def forward(self, x, other):
        o = other * 1.0
        z = o.add_(self.bn(x)).relu_()
        return z + o


class Hooked(_OneBN2d):
    def __init__(self):
        super().__init__()
        self.bn.register_forward_hook(lambda m, inp, out: out * 2.0)

    def forward(self, x, other):
        return F.silu(self.bn(x))


@pytest.mark.parametrize("cls", [UsedTwice, SelfAdd, CalledTwice, NotRelu6, WritesBetween, AddIntoOther,
                                 Hooked])
def test_not_fused_when_unsafe(cls):
    torch.manual_seed(0)
    ref = cls().to(DEVICE)
    out = tritonbn.convert(copy.deepcopy(ref))
    assert type(out) is cls                    # no fusion: the module itself, converted
    assert fused(out) == {None: sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())}
    assert all(isinstance(m, tritonbn.BatchNorm2d) for m in out.modules()
               if isinstance(m, nn.BatchNorm2d))
    x = make_input((2, 3, 2, 2), memory_format=CL)
    other = make_input((2, 3, 2, 2), mean=-1.0)
    check_same(ref, out, x, other, grads=cls is not WritesBetween)


# --------------------------------------------------------------------------------------
# untraceable models


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = BasicBlock(3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn(self.block(x))
        if x.mean() > 0:
            return F.relu(y)
        return F.silu(y)


class TrainingDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = BasicBlock(3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = F.relu(self.bn(self.block(x)))
        return y * 0.5 if self.training else y


@pytest.mark.parametrize("cls,reason", [(DataDependent, "TraceError"),
                                        (TrainingDependent, "depends on self.training")])
def test_untraceable_warns_fuses_children_and_matches(cls, reason):
    ref = cls().to(DEVICE).to(memory_format=CL)
    model = copy.deepcopy(ref)
    with pytest.warns(UserWarning, match="could not trace") as record:
        out = tritonbn.convert(model)
    msgs = [str(w.message) for w in record if "tritonbn.convert" in str(w.message)]
    assert len(msgs) == 1
    assert "'<root>'" in msgs[0] and reason in msgs[0] and "not fused" in msgs[0]
    assert out is model and type(out) is cls
    assert isinstance(out.block, fx.GraphModule)          # the child is traced and fused
    assert bn_calls(out.block) == {("relu", False): 1, ("relu", True): 1}
    assert isinstance(out.bn, tritonbn.BatchNorm2d) and out.bn.activation is None
    x = make_input((2, 3, 3, 3), memory_format=CL)
    check_same(ref, out, x)
    ref.eval()
    out.eval()
    check_same(ref, out, x)


# --------------------------------------------------------------------------------------
# module replacement (no kernels run)


def test_replacement_rules():
    class MyBN(nn.BatchNorm2d):
        pass

    class OwnForward(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    sync = nn.SyncBatchNorm(3)
    lazy = nn.LazyBatchNorm2d()
    already = tritonbn.BatchNorm2d(3, activation="silu")
    model = nn.Sequential(
        nn.Linear(3, 3), nn.BatchNorm1d(3, momentum=None, affine=False), nn.LeakyReLU(0.3),
        nn.Unflatten(1, (3, 1, 1, 1)), nn.BatchNorm3d(3, eps=1e-3, track_running_stats=False),
        nn.GELU(), nn.Flatten(2), nn.BatchNorm1d(3), nn.Flatten(),
        nn.Unflatten(1, (3, 1, 1)), MyBN(3), nn.Hardtanh(0.0, 5.0), OwnForward(3),
        nn.ReLU(), sync, lazy, already, nn.ReLU(),
    ).eval()
    old = list(model)
    keys = list(model.state_dict())
    # OwnForward, a BatchNorm convert leaves alone, is called as a leaf (not traced
    # into, where torch's BatchNorm.forward does not trace): the model traces, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tritonbn.convert(model)
    assert out is model and list(out.state_dict()) == keys
    assert type(out[1]) is tritonbn.BatchNorm1d and out[1].activation == "leaky_relu"
    assert out[1].negative_slope == 0.3 and isinstance(out[2], nn.Identity)
    assert out[1].momentum is None and not out[1].affine and out[1].weight is None
    assert out[1].running_var is old[1].running_var and not out[1].training
    assert type(out[4]) is tritonbn.BatchNorm3d and out[4].activation == "gelu"
    assert out[4].eps == 1e-3 and out[4].running_mean is None and not out[4].track_running_stats
    assert type(out[7]) is tritonbn.BatchNorm1d and out[7].activation is None
    assert type(out[10]) is tritonbn.BatchNorm2d and out[10].activation is None
    assert out[10].weight is old[10].weight and type(out[11]) is nn.Hardtanh
    assert out[12] is old[12] and type(out[13]) is nn.ReLU        # own forward: kept
    assert type(out[14]) is tritonbn.SyncBatchNorm and out[14].weight is sync.weight
    assert out[14].process_group is sync.process_group and out[14].activation is None
    assert out[15] is lazy and out[16] is already
    assert type(out[17]) is nn.ReLU                                # already fused: kept
    assert tritonbn.convert(nn.Sequential()) is not None


def test_root_batchnorm_and_no_fusion_flag():
    bn = nn.BatchNorm2d(5).eval()
    new = tritonbn.convert(bn)
    assert type(new) is tritonbn.BatchNorm2d and new.weight is bn.weight and not new.training
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    out = tritonbn.convert(model, fuse_activation=False)
    assert out[0].activation is None and type(out[1]) is nn.ReLU
    shared = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Sequential(shared, nn.ReLU()), shared)   # registered twice
    out = tritonbn.convert(model)
    assert out[0][0] is out[1] and out[1].activation is None         # one module, unfused


def test_no_warning_for_a_traceable_model_without_fusions():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tritonbn.convert(model)
    assert out is model and out[1].activation is None


# --------------------------------------------------------------------------------------
# modules that compute nothing, between a BatchNorm and its activation or add (issue 16)


class StochasticDepth(nn.Module):
    """Stands in for torchvision.ops.StochasticDepth (recognized by class and module
    name; torchvision's own does not import with the CPU torch here)."""
    __module__ = "torchvision.ops.stochastic_depth"

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x if self.p == 0 or not self.training else F.dropout(x, self.p, True)


class Noops(nn.Module):
    """timm's Bottleneck (bn2 -> drop_block, an Identity -> act2) and its residual tail
    (bn3 -> drop_path -> + shortcut -> act3), with no-op modules in each gap."""

    def __init__(self, noop, act_after_add=nn.Identity()):
        super().__init__()
        self.bn2, self.bn3 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        self.drop_block, self.drop_path, self.after = noop, copy.deepcopy(noop), act_after_add
        self.act2, self.act3 = nn.ReLU(), nn.ReLU(inplace=True)

    def forward(self, x, shortcut):
        y = self.act2(self.drop_block(self.bn2(x)))
        y = self.drop_path(self.bn3(y)) + shortcut
        return self.act3(self.after(y))


@pytest.mark.parametrize("noop", [nn.Identity(), nn.Dropout(0.0), nn.Dropout2d(p=0.0, inplace=True),
                                  StochasticDepth(0.0)],
                         ids=["Identity", "Dropout(0)", "Dropout2d(0,inplace)", "StochasticDepth(0)"])
def test_noop_modules_are_seen_through(noop):
    ref = Noops(noop, act_after_add=nn.Dropout(0.0)).to(DEVICE)
    out = tritonbn.convert(copy.deepcopy(ref))
    assert isinstance(out, fx.GraphModule)
    assert [n.target for n in out.graph.nodes if n.op == "call_module"] == ["bn2", "bn3"]
    assert out.bn2.activation == out.bn3.activation == "relu"
    (bn3,) = [n for n in out.graph.nodes if n.target == "bn3"]
    assert len(bn3.args) == 2                      # the residual add, fused
    assert list(out.state_dict()) == list(ref.state_dict())
    check_both_modes(ref, out)


@pytest.mark.parametrize("noop", [nn.Dropout(0.1), StochasticDepth(0.2), nn.Tanh()],
                         ids=["Dropout(0.1)", "StochasticDepth(0.2)", "Tanh"])
def test_modules_that_compute_are_not_seen_through(noop):
    ref = Noops(noop).to(DEVICE)
    out = tritonbn.convert(copy.deepcopy(ref))
    assert fused(out) == {None: 2}
    ref.eval()
    out.eval()
    check_same(ref, out, make_input((2, 3, 3, 2), memory_format=CL),
               make_input((2, 3, 3, 2), mean=-1.0))


def test_sequential_sees_through_noop_modules():
    ref = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Identity(), nn.Dropout(0.0),
                        nn.LeakyReLU(0.2), nn.BatchNorm2d(3), nn.Dropout(0.5), nn.ReLU()).to(DEVICE)
    out = tritonbn.convert(copy.deepcopy(ref))
    assert out[1].activation == "leaky_relu" and out[1].negative_slope == pytest.approx(0.2)
    assert isinstance(out[4], nn.Identity) and out[5].activation is None  # dropout 0.5: kept
    ref.eval()
    out.eval()
    check_same(ref, out, make_input((2, 3, 3, 2), memory_format=CL))


# the activation modules of issue 16, each after a BatchNorm in an nn.Sequential:
# name -> (module, activation, its scalar (elu's alpha) or None)
MORE_MODULES = {
    "ReLU6": (nn.ReLU6(inplace=True), "relu6", None),
    "Hardtanh(0,6)": (nn.Hardtanh(0, 6), "relu6", None),
    "Hardswish": (nn.Hardswish(inplace=True), "hardswish", None),
    "Hardsigmoid": (nn.Hardsigmoid(inplace=True), "hardsigmoid", None),
    "Mish": (nn.Mish(), "mish", None),
    "ELU(0.5)": (nn.ELU(0.5, inplace=True), "elu", 0.5),
    "GELU(tanh)": (nn.GELU(approximate="tanh"), "gelu_tanh", None),
}


@pytest.mark.parametrize("name", list(MORE_MODULES))
def test_each_activation_module_fuses_and_trains_alike(name):
    """conv -> bn -> act -> conv: bn takes the activation (the report says so), act's
    slot becomes nn.Identity, and two SGD steps (outputs, every parameter's grad, the
    parameters and running stats after each step) then eval match the torch model."""
    act, activation, alpha = MORE_MODULES[name]
    ref = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), copy.deepcopy(act),
                        nn.Conv2d(3, 2, 1)).to(DEVICE).to(memory_format=CL)
    with torch.no_grad():                  # pre reaches relu6's 6, hardswish's +-3
        ref[1].weight.uniform_(1.0, 3.5)
        ref[1].bias.uniform_(-1.0, 1.0)
    out, rows = tritonbn.convert(copy.deepcopy(ref), report=True)
    assert type(out[1]) is tritonbn.BatchNorm2d and out[1].activation == activation
    assert isinstance(out[2], nn.Identity) and out[1].alpha == (alpha or 1.0)
    assert [(r.name, r.activation, r.note) for r in rows] == [("1", activation, "")]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, out)]
    for _ in range(2):
        x = make_input((2, 3, 3, 2), memory_format=CL)
        ys = [m(x) for m in (ref, out)]
        torch.testing.assert_close(ys[1], ys[0], **TOLS)
        g = torch.randn_like(ys[0])
        for y, opt in zip(ys, opts):
            opt.zero_grad()
            y.backward(g)
            opt.step()
        for (k, p), q in zip(ref.named_parameters(), out.parameters()):
            torch.testing.assert_close(q.grad, p.grad, **TOLS, msg=k)
        for (k, a), b in zip(ref.state_dict().items(), out.state_dict().values()):
            torch.testing.assert_close(b, a, **TOLS, msg=k)
    ref.eval()
    out.eval()
    x = make_input((2, 3, 3, 2), memory_format=CL)
    torch.testing.assert_close(out(x), ref(x), **TOLS)


# --------------------------------------------------------------------------------------
# timm's BatchNormAct2d (issue 16), by a stand-in: timm is not a dependency


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d as timm 1.0 writes it: torch's batch_norm
    inlined in its own forward, then self.drop, then self.act."""
    __module__ = "timm.layers.norm_act"

    def __init__(self, num_features, act=None, drop=None, **kw):
        super().__init__(num_features, **kw)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        return self.act(self.drop(x))


class TimmBlock(nn.Module):
    """A timm-style residual tail: conv -> BatchNormAct2d(act) -> conv ->
    BatchNormAct2d(no act) -> + shortcut -> act."""

    def __init__(self, act1, drop1=None):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
        self.bn1 = BatchNormAct2d(3, act=act1, drop=drop1)
        self.bn2 = BatchNormAct2d(3, momentum=None)
        self.act = nn.ReLU()

    def forward(self, x, shortcut):
        return self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + shortcut)


@pytest.mark.parametrize("act,activation", [(nn.ReLU(inplace=True), "relu"),
                                            (nn.SiLU(), "silu"), (nn.LeakyReLU(0.2), "leaky_relu"),
                                            (nn.ReLU6(), "relu6"), (nn.ELU(0.5), "elu"),
                                            (nn.GELU(approximate="tanh"), "gelu_tanh")])
def test_timm_batchnorm_act_converts_with_its_activation(act, activation):
    ref = TimmBlock(act, drop1=nn.Dropout(0.0)).to(DEVICE)
    keys = list(ref.state_dict())
    params = [id(p) for p in ref.parameters()]
    out = tritonbn.convert(ref)                    # in place: the same Parameters
    assert type(out.bn1) is tritonbn.BatchNorm2d and out.bn1.activation == activation
    assert out.bn1._slope() == getattr(act, "alpha", getattr(act, "negative_slope", 0.01))
    assert type(out.bn2) is tritonbn.BatchNorm2d and out.bn2.activation == "relu"  # + the add
    (bn2,) = [n for n in out.graph.nodes if n.target == "bn2"]
    assert len(bn2.args) == 2
    assert list(out.state_dict()) == keys and [id(p) for p in out.parameters()] == params
    ref = TimmBlock(copy.deepcopy(act), drop1=nn.Dropout(0.0)).to(DEVICE)
    ref.load_state_dict(out.state_dict())
    check_both_modes(ref, tritonbn.convert(copy.deepcopy(ref)))


@pytest.mark.parametrize("act,drop", [(nn.Hardtanh(), None), (nn.ReLU(), nn.Dropout(0.1))],
                         ids=["unsupported_act", "dropout"])
def test_timm_batchnorm_act_that_computes_more_stays(act, drop):
    ref = TimmBlock(act, drop1=drop).to(DEVICE)
    out = tritonbn.convert(copy.deepcopy(ref))
    assert type(out.bn1) is BatchNormAct2d
    assert type(out.bn2) is tritonbn.BatchNorm2d
    ref.eval()
    out.eval()
    check_same(ref, out, make_input((2, 3, 3, 2), memory_format=CL),
               make_input((2, 3, 3, 2), mean=-1.0))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm.layers.norm_act.SyncBatchNormAct as timm 1.0 writes it (what its
    convert_sync_batchnorm makes of a BatchNormAct2d): torch's SyncBatchNorm, then
    self.drop and self.act where they are set."""
    __module__ = "timm.layers.norm_act"

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


def _sync_norm_act(act, drop, group=None):
    m = SyncBatchNormAct(3, momentum=None, process_group=group)
    m.act, m.drop = act, drop
    return m


@pytest.mark.parametrize("act,activation", [(nn.Hardswish(), "hardswish"), (nn.Identity(), None)])
def test_timm_sync_batchnorm_act_becomes_sync_batchnorm_with_its_activation(act, activation):
    """Without a process group (or in eval) a SyncBatchNorm is BatchNorm: the converted
    module equals timm's, keeps its process group, Parameters and state_dict keys."""
    group = object()  # carried over as it is; no collective runs without a process group
    ref = nn.Sequential(nn.Conv2d(3, 3, 1), _sync_norm_act(act, nn.Dropout(0.0), group)).to(DEVICE)
    keys, params = list(ref.state_dict()), [id(p) for p in ref.parameters()]
    out = tritonbn.convert(ref)
    assert type(out[1]) is tritonbn.SyncBatchNorm and out[1].activation == activation
    assert out[1].process_group is group and out[1].momentum is None
    assert list(out.state_dict()) == keys and [id(p) for p in out.parameters()] == params
    ref = nn.Sequential(nn.Conv2d(3, 3, 1), _sync_norm_act(copy.deepcopy(act), nn.Dropout(0.0)))
    ref = ref.to(DEVICE)
    ref.load_state_dict(out.state_dict())
    out[1].process_group = None
    x = make_input((2, 3, 3, 2), memory_format=CL)
    for mode in (True, False):
        ref.train(mode)
        out.train(mode)
        check_same(ref, out, x)


def test_timm_sync_batchnorm_act_that_computes_more_stays():
    ref = nn.Sequential(_sync_norm_act(nn.Hardtanh(), nn.Identity()))
    out, rows = tritonbn.convert(ref, report=True)
    assert type(out[0]) is SyncBatchNormAct and "left alone" in rows[0].note


class Counting(nn.Module):
    """A forward that updates a buffer in place, as timm's BatchNormAct2d does."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x, other):
        self.calls.add_(1)
        return F.relu(self.bn(x) + other)


def test_tracing_leaves_buffers_alone_and_the_graph_updates_them():
    """convert traces without moving the model's buffers, and the converted graph
    moves them on every call, as the model does."""
    model = Counting().to(DEVICE)
    out = tritonbn.convert(model)
    assert isinstance(out, fx.GraphModule) and out.bn.activation == "relu"
    assert model.calls.item() == 0 and out.calls.item() == 0
    ref = Counting().to(DEVICE)
    check_both_modes(ref, out)
    assert ref.calls.item() == out.calls.item() == 2


def test_report_says_what_each_batchnorm_became():
    """convert(..., report=True): one row per BatchNorm, by name: what it became, the
    activation and residual fused, or why not; format_report prints them."""
    from tritonbn.fusion import format_report

    model = nn.Sequential()
    model.add_module("block", BasicBlock(3, 3))
    model.add_module("timm", TimmBlock(nn.Hardtanh()))
    model.add_module("tail", TrainingDependent())
    with pytest.warns(UserWarning, match="could not trace 'tail'"):
        out, rows = tritonbn.convert(copy.deepcopy(model), report=True)
    by = {r.name: r for r in rows}
    assert list(by) == [n for n, m in model.named_modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert (by["block.bn1"].became, by["block.bn1"].activation, by["block.bn1"].residual) == \
        ("tritonbn.BatchNorm2d", "relu", False)
    assert by["block.bn2"].activation == "relu" and by["block.bn2"].residual
    assert by["timm.bn1"].became == "timm.BatchNormAct2d" and "left alone" in by["timm.bn1"].note
    assert by["timm.bn2"].residual and by["timm.bn2"].note == ""
    assert by["tail.bn"].activation is None and "could not trace 'tail'" in by["tail.bn"].note
    assert by["tail.block.bn1"].activation == "relu"  # its own block traced alone
    text = format_report(rows)
    assert "timm.bn1" in text and text.splitlines()[-1].startswith(f"{len(rows)} BatchNorms")
    _, rows = tritonbn.convert(copy.deepcopy(model), fuse_activation=False, report=True)
    assert {r.note for r in rows if r.became.startswith("tritonbn")} == \
        {"not fused: fusion was turned off"}
    assert tritonbn.convert(copy.deepcopy(BasicBlock(3, 3))).__class__ is not tuple
