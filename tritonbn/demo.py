"""A small conv net whose BN+ReLU pairs run as tritonbn.BatchNorm2d(activation="relu").

Both nets start from the same weights; each training step compares outputs,
every gradient, running stats and num_batches_tracked, then eval does the same.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

import tritonbn
from tritonbn import ops


def conv_net(channels=(3, 16, 32, 32)) -> nn.Sequential:
    layers = []
    for cin, cout in zip(channels, channels[1:]):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], 10))


def swap_bn_relu(net: nn.Sequential) -> nn.Sequential:
    """A copy of net with each BatchNorm2d + ReLU pair fused into tritonbn.BatchNorm2d."""
    layers, mods = [], list(net)
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.BatchNorm2d) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU):
            t = tritonbn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                                     m.track_running_stats, activation="relu")
            t.load_state_dict(m.state_dict())
            layers.append(t.to(next(m.parameters()).device))
            i += 2
        else:
            layers.append(copy.deepcopy(m))
            i += 1
    return nn.Sequential(*layers)


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def run(device: str, steps: int = 3, seed: int = 0) -> int:
    torch.manual_seed(seed)
    dev = torch.device(device)
    ref = conv_net().to(dev).to(memory_format=torch.channels_last)
    ours = swap_bn_relu(ref)
    where = ("GPU " + torch.cuda.get_device_name(dev)) if dev.type == "cuda" else \
        "CPU through Triton's interpreter (TRITON_INTERPRET=1)"
    print(f"tritonbn {tritonbn.__version__}: torch {torch.__version__}; kernels run on {where}")
    print(f"interpreter: {ops.interpreting()}  (Triton kernels, no PyTorch fallback: "
          f"{ops.uses_triton(torch.empty(0, device=dev))})")
    n_fused = sum(isinstance(m, tritonbn.BatchNorm2d) for m in ours)
    print(f"{n_fused} BatchNorm2d+ReLU pairs fused; input channels_last")
    formats = []
    for m in ours:
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
        bn_ref = [m for m in ref if isinstance(m, nn.BatchNorm2d)]
        bn_ours = [m for m in ours if isinstance(m, tritonbn.BatchNorm2d)]
        for k, (a, b) in enumerate(zip(bn_ref, bn_ours)):
            errs[f"bn{k} running_mean"] = _max_err(a.running_mean, b.running_mean)
            errs[f"bn{k} running_var"] = _max_err(a.running_var, b.running_var)
            errs[f"bn{k} num_batches_tracked"] = float(a.num_batches_tracked != b.num_batches_tracked)
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
