"""tritonbn.convert on the model zoos people use (issue 16): torchvision's and timm's
models, random init, counts of converted BatchNorms and fused activations asserted
exactly, and a training step and an eval step equal to the unconverted model.

Skipped where torchvision or timm is not installed (they are in the test extras).
The big models run on torch's CPU path (the interpreter would take minutes a
model): what is tested there is what convert made of each model; one small model
runs through the interpreter, so the kernels run."""
import copy
import sys
from collections import Counter

import pytest
import torch

import tritonbn
from tritonbn import ops


def _import_torchvision():
    """torchvision, imported. The registry's torchvision wheel is built against CUDA
    torch: with the CPU torch its C++ ops do not load, and its import then fails in
    its fake-op registrations (`operator torchvision::nms does not exist`). The
    models need none of those ops, so here (tests only) the two operators it
    registers fakes for at import are declared first, and the import retried."""
    try:
        import torchvision
        return torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e) or "does not exist" not in str(e):
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _import_torchvision.lib = lib  # the declarations live as long as the process
    import torchvision
    return torchvision


try:
    tv = _import_torchvision()
except ImportError:
    pytest.skip("torchvision (test extras) not installed", allow_module_level=True)
timm = pytest.importorskip("timm")


def _fpn_backbone():
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)


MODELS = {
    "tv_resnet18": lambda: tv.models.resnet18(),
    "tv_mobilenet_v2": lambda: tv.models.mobilenet_v2(),
    "tv_mobilenet_v3_small": lambda: tv.models.mobilenet_v3_small(),
    "tv_efficientnet_b0": lambda: tv.models.efficientnet_b0(),
    "tv_fpn_resnet18_frozen": _fpn_backbone,
    "timm_resnet18": lambda: timm.create_model("resnet18"),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "timm_mobilenetv3_small_100": lambda: timm.create_model("mobilenetv3_small_100"),
    "timm_regnety_002": lambda: timm.create_model("regnety_002"),
    # timm's own GELU module (get_act_layer("gelu")), in its BatchNormAct2d too
    "timm_resnet18_gelu": lambda: timm.create_model("resnet18", act_layer="gelu"),
    "timm_efficientnet_b0_gelu_tanh": lambda: timm.create_model("efficientnet_b0",
                                                                act_layer="gelu_tanh"),
    # timm's own SyncBatchNorm conversion: SyncBatchNormAct, with the act and drop
    "timm_mobilenetv3_small_100_sync": lambda: timm.layers.convert_sync_batchnorm(
        timm.create_model("mobilenetv3_small_100")),
    # timm's frozen BatchNormAct2d: FrozenBatchNormAct2d
    "timm_efficientnet_b0_frozen": lambda: timm.layers.freeze_batch_norm_2d(
        timm.create_model("efficientnet_b0")),
}


def build(name):
    torch.manual_seed(0)
    return MODELS[name]().eval()


def counts(model):
    """(BatchNorms in the model, what convert's report says they became, by class,
    the fused activations by name, fused residuals)."""
    converted, rows = tritonbn.convert(copy.deepcopy(model), report=True)
    became = Counter(r.became for r in rows)
    acts = Counter(r.activation for r in rows if r.activation)
    return len(rows), dict(became), dict(acts), sum(r.residual for r in rows)


# (BatchNorms, what they became, fused activations, fused residuals), from the report.
# ResNet-18: the stem's and every block's first BN with ReLU, each block's second with
# its residual and ReLU, the 3 downsample BNs alone. EfficientNet-B0: SiLU after the
# stem, the 15 expansions, the 16 depthwise convs and the head; the 16 projections alone.
# MobileNetV2: ReLU6 after every BN but the 17 projections; timm's
# MobileNetV3 builds its BNs as BatchNormAct2d, which convert takes with their act.
EXPECTED = {
    "tv_resnet18": (20, {"tritonbn.BatchNorm2d": 20}, {"relu": 17}, 8),
    "tv_mobilenet_v2": (52, {"tritonbn.BatchNorm2d": 52}, {"relu6": 35}, 0),
    "tv_mobilenet_v3_small": (34, {"tritonbn.BatchNorm2d": 34}, {"hardswish": 18, "relu": 5}, 0),
    "tv_efficientnet_b0": (49, {"tritonbn.BatchNorm2d": 49}, {"silu": 33}, 0),
    "tv_fpn_resnet18_frozen": (20, {"tritonbn.FrozenBatchNorm2d": 20}, {"relu": 17}, 8),
    "timm_resnet18": (20, {"tritonbn.BatchNorm2d": 20}, {"relu": 17}, 8),
    "timm_efficientnet_b0": (49, {"tritonbn.BatchNorm2d": 49}, {"silu": 33}, 0),
    "timm_mobilenetv3_small_100": (34, {"tritonbn.BatchNorm2d": 34},
                                   {"hardswish": 18, "relu": 5}, 0),
    "timm_mobilenetv3_small_100_sync": (34, {"tritonbn.SyncBatchNorm": 34},
                                        {"hardswish": 18, "relu": 5}, 0),
    "timm_resnet18_gelu": (20, {"tritonbn.BatchNorm2d": 20}, {"gelu": 17}, 8),
    "timm_efficientnet_b0_gelu_tanh": (49, {"tritonbn.BatchNorm2d": 49}, {"gelu_tanh": 33}, 0),
    "timm_regnety_002": (44, {"tritonbn.BatchNorm2d": 44}, {"relu": 40}, 13),
    "timm_efficientnet_b0_frozen": (49, {"tritonbn.FrozenBatchNorm2d": 49}, {"silu": 33}, 0),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_convert_fuses_what_there_is(name):
    assert counts(build(name)) == EXPECTED[name]


def _step(model, x, train):
    """One step: (output, {parameter name: grad}, {buffer name: value}) in training,
    (output, {}, buffers) in eval; the same random numbers for dropout and drop-path."""
    model.train(train)
    torch.manual_seed(1)
    if not train:
        with torch.no_grad():
            return model(x), {}, {k: b.clone() for k, b in model.named_buffers()}
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out.values()])
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, {k: b.clone() for k, b in model.named_buffers()}


def _equal_steps(ref, ours, x, rtol):
    """Outputs, grads and buffers equal to rtol, the grads' absolute tolerance scaled by
    the largest grad: a grad that is a sum over a BatchNorm's batch of terms summing to
    0 (a bias before a conv and a BatchNorm) is rounding alone on both sides."""
    for train in (True, False):
        out_ref, g_ref, b_ref = _step(ref, x, train)
        out, g, b = _step(ours, x, train)
        torch.testing.assert_close(out, out_ref, rtol=rtol, atol=rtol)
        assert g.keys() == g_ref.keys() and b.keys() == b_ref.keys()
        scale = max([float(t.abs().max()) for t in g_ref.values()] + [1.0])
        for k in g_ref:
            torch.testing.assert_close(g[k], g_ref[k], rtol=rtol, atol=rtol * scale, msg=k)
        for k in b_ref:
            torch.testing.assert_close(b[k], b_ref[k], rtol=rtol, atol=rtol, msg=k)


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_steps_equal_the_model(name, monkeypatch):
    """A training step (output, every parameter's grad, every buffer) then an eval step,
    converted against unconverted, on torch's CPU path (see the module's docstring)."""
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    ref = build(name)
    ours = tritonbn.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 64, 64) + 0.5
    _equal_steps(ref, ours, x, 1e-4)


def test_a_small_zoo_model_through_the_kernels():
    """torchvision's MobileNetV3-Small converted, every BatchNorm on tritonbn's kernels
    through the interpreter: a training step and an eval step as the unconverted model."""
    if not ops.interpreting():
        pytest.skip("runs the kernels through the interpreter (TRITON_INTERPRET=1)")
    ref = build("tv_mobilenet_v3_small")
    ours = tritonbn.convert(copy.deepcopy(ref))
    x = torch.randn(2, 3, 64, 64) + 0.5  # at 32x32 the last BatchNorms see 2 values each
    _equal_steps(ref, ours, x, 1e-4)
