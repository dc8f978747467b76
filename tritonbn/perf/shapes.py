"""Shape sets for the perf suite.

Each case is one BatchNorm input shape with a weight (how many layers of a
ResNet-50 have it; 1 elsewhere) and a ``set`` label that keeps the regimes apart
in the report: ``resnet50/b256`` (DRAM-bound), ``resnet50/b32`` (mostly
L2-resident on an H100), ``stress``, ``quick``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# (C, H=W, number of BN layers with that shape in ResNet-50); 53 layers in all
RESNET50 = [(64, 112, 1), (64, 56, 6), (256, 56, 4), (128, 56, 1), (128, 28, 7), (512, 28, 5),
            (256, 28, 1), (256, 14, 11), (1024, 14, 7), (512, 14, 1), (512, 7, 5), (2048, 7, 4)]
RESNET50_BATCHES = (256, 32)

STRESS = [(16, 64, 256, 256), (20, 6, 65536), (32, 2048, 7, 7)] + \
         [(32, c, 56, 56) for c in (24, 40, 72, 152, 368)] + [(3136, 256), (128, 8192)]

# five shapes covering the kinds above: DRAM-bound 2-D, L2-resident 2-D, few spatial
# positions, few channels with a long axis (BatchNorm1d 3-D), and (N, C) input
QUICK = [(256, 64, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7), (20, 6, 65536), (3136, 256)]

# where the split and the single-program paths both apply (issue 15's comparison):
# BatchNorm1d over 256 to 16384 samples, ResNet-50's 7x7 and 14x14 layers at batch 32
PATHS = [(n, 512) for n in (256, 1024, 4096, 16384)] + \
        [(32, 512, 7, 7), (32, 2048, 7, 7), (32, 256, 14, 14), (32, 1024, 14, 14)]

SET_NAMES = ("quick", "resnet50", "stress", "paths")
SUBSETS = ("resnet50/b256", "resnet50/b32")  # one batch regime of resnet50


@dataclass(frozen=True)
class Case:
    set: str
    shape: tuple
    weight: int = 1

    @property
    def layouts(self) -> tuple[str, ...]:
        """Memory layouts worth timing: NCHW and channels_last for 4-D input, else the one."""
        return ("NCHW", "channels_last") if len(self.shape) == 4 else ("contiguous",)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _tiny_c(c: int) -> int:
    # keep small C; map larger C to distinct odd-ish sizes (64 -> 23, 512 -> 26, 2048 -> 28)
    return c if c <= 24 else 16 + c.bit_length()


def tiny(shape: tuple) -> tuple:
    """The same kind of shape, small enough for Triton's CPU interpreter."""
    if len(shape) == 2:
        return (min(shape[0], 64), _tiny_c(shape[1]))
    n, c, *spatial = shape
    if len(spatial) == 1:
        return (min(n, 2), _tiny_c(c), min(spatial[0], 256))
    return (min(n, 2), _tiny_c(c), *(min(d, 8) for d in spatial))


def cases(name: str, tiny_shapes: bool = False) -> list[Case]:
    """The cases of shape set ``name``: quick, resnet50 (both batches), resnet50/b256,
    resnet50/b32, stress, or all."""
    if name == "all":
        return [c for n in SET_NAMES for c in cases(n, tiny_shapes)]
    if name in SUBSETS:
        return [c for c in cases("resnet50", tiny_shapes) if c.set == name]
    if name == "resnet50":
        out = [Case(f"resnet50/b{n}", (n, c, hw, hw), w)
               for n in RESNET50_BATCHES for c, hw, w in RESNET50]
    elif name == "stress":
        out = [Case("stress", s) for s in STRESS]
    elif name == "quick":
        out = [Case("quick", s) for s in QUICK]
    elif name == "paths":
        out = [Case("paths", s) for s in PATHS]
    else:
        raise ValueError(f"unknown shape set {name!r}; choose from "
                         f"{', '.join(SET_NAMES + SUBSETS)} or all")
    if tiny_shapes:  # shapes that shrink to the same tiny shape run once
        seen, small = set(), []
        for c in out:
            t = Case(c.set, tiny(c.shape), c.weight)
            if (t.set, t.shape) not in seen:
                seen.add((t.set, t.shape))
                small.append(t)
        out = small
    return out
