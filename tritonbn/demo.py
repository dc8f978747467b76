"""A small ResNet, converted with tritonbn.convert: its BN+ReLU pairs and its
relu(bn(x) + identity) tails run as fused tritonbn.BatchNorm2d modules.

Both nets start from the same weights (convert shares them); each training step
compares outputs, every gradient, running stats and num_batches_tracked, then
eval does the same.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

import tritonbn
from tritonbn import ops


class Block(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu, conv-bn, += identity, relu."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def res_net(width=16) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        Block(width, width), Block(width, 2 * width, stride=2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def fused_counts(net: nn.Module) -> tuple[int, int, int]:
    """(BN fused with an activation, of which also with a residual add, BN left alone)."""
    bns = {n: m for n, m in net.named_modules() if isinstance(m, tritonbn.BatchNorm2d)}
    with_res = set()
    if isinstance(net, fx.GraphModule):
        with_res = {n.target for n in net.graph.nodes
                    if n.op == "call_module" and n.target in bns and len(n.args) == 2}
    fused = sum(m.activation is not None for m in bns.values())
    return fused, len(with_res), len(bns) - fused


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def run(device: str, steps: int = 3, seed: int = 0) -> int:
    torch.manual_seed(seed)
    dev = torch.device(device)
    ref = res_net().to(dev).to(memory_format=torch.channels_last)
    ours = tritonbn.convert(copy.deepcopy(ref))
    where = ("GPU " + torch.cuda.get_device_name(dev)) if dev.type == "cuda" else \
        "CPU through Triton's interpreter (TRITON_INTERPRET=1)"
    print(f"tritonbn {tritonbn.__version__}: torch {torch.__version__}; kernels run on {where}")
    print(f"interpreter: {ops.interpreting()}  (Triton kernels, no PyTorch fallback: "
          f"{ops.uses_triton(torch.empty(0, device=dev))})")
    fused, with_res, alone = fused_counts(ours)
    print(f"tritonbn.convert: {fused} BatchNorm2d fused with their ReLU, {with_res} of them with "
          f"the residual add too, {alone} alone; input channels_last")
    formats = []
    for m in ours.modules():
        if isinstance(m, tritonbn.BatchNorm2d):
            m.register_forward_hook(lambda mod, inp, out: formats.append(
                out.is_contiguous(memory_format=torch.channels_last)))
    tol = 1e-4
    worst = 0.0
    for step in range(steps + 1):
        train = step < steps
        ref.train(train)
        ours.train(train)
        x = (torch.randn(4, 3, 16, 16, device=dev) + 0.5).to(memory_format=torch.channels_last)
        out_ref, out = ref(x), ours(x)
        out_ref.square().mean().backward()
        out.square().mean().backward()
        errs = {"out": _max_err(out, out_ref)}
        for (n, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
            errs[f"grad {n}"] = _max_err(q.grad, p.grad)
        ours_buffers = dict(ours.named_buffers())
        for n, a in ref.named_buffers():
            errs[n] = _max_err(a, ours_buffers[n])
        name, err = max(errs.items(), key=lambda kv: kv[1])
        kept = all(formats)
        formats.clear()
        worst = max(worst, err if kept else float("inf"))
        print(f"{'train' if train else 'eval '} step {step}: max |tritonbn - torch| = {err:.2e} "
              f"({name}); BN outputs stayed channels_last: {kept}")
        for net in (ref, ours):
            net.zero_grad(set_to_none=True)
    ok = worst <= tol
    print(f"{'OK' if ok else 'MISMATCH'}: worst difference {worst:.2e} (tolerance {tol:.0e})")
    return 0 if ok else 1
