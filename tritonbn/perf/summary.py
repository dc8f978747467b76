"""Numbers derived from a results document, shared by the bench's printout and the report.

Speedups compare records of the same (set, shape, layout, dtype, op, pass): the
baseline's ms over tritonbn's. Only records that passed their correctness check
count. ResNet-50 sets weight each shape by its layer count; other sets weight 1.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict

from .model import OPS
from .schema import key

BASELINES = ("torch", "torch_compile", "tritonbn_heuristic")
GROUP = ("set", "op", "pass", "dtype", "layout")

# issue 3's targets: fwd+bwd bn_relu on resnet50 batch 256, channels_last, float16
TARGET_GROUP = {"set": "resnet50/b256", "op": "bn_relu", "pass": "fwd+bwd", "dtype": "float16",
                "layout": "channels_last"}
RESNET50_SHAPES = 12


def weighted_geomean(values, weights) -> float:
    values, weights = list(values), list(weights)
    if not values or len(values) != len(weights) or sum(weights) <= 0:
        raise ValueError("weighted_geomean needs as many positive weights as values, at least one")
    if any(v <= 0 for v in values):
        raise ValueError("weighted_geomean needs positive values")
    return math.exp(sum(w * math.log(v) for v, w in zip(values, weights)) / sum(weights))


def by_key(records) -> dict:
    """{(set, shape, layout, dtype, op, pass): {impl: record}}"""
    out = defaultdict(dict)
    for r in records:
        out[key(r)][r["impl"]] = r
    return out


def speedup(ours: dict | None, base: dict | None) -> float | None:
    """baseline ms / tritonbn ms, when both ran and passed their check."""
    if ours and base and ours["ok"] and base["ok"]:
        return base["ms"] / ours["ms"]
    return None


def speedups(records, baseline: str) -> list[tuple[dict, float]]:
    """(tritonbn record, speedup over baseline) wherever there is one."""
    out = []
    for impls in by_key(records).values():
        s = speedup(impls.get("tritonbn"), impls.get(baseline))
        if s is not None:
            out.append((impls["tritonbn"], s))
    return out


def group_of(r: dict) -> tuple:
    return tuple(r[g] for g in GROUP)


def summary_rows(records) -> list[dict]:
    """One row per (set, op, pass, dtype, layout): weighted geomean speedups, median % of copy."""
    groups = defaultdict(list)
    for r in records:
        groups[group_of(r)].append(r)
    rows = []
    for g in sorted(groups, key=_group_order):
        rs = groups[g]
        row = dict(zip(GROUP, g))
        row["shapes"] = len({tuple(r["shape"]) for r in rs})
        for base in BASELINES:
            pairs = speedups(rs, base)
            row[f"vs_{base}"] = (weighted_geomean([s for _, s in pairs], [r["weight"] for r, _ in pairs])
                                 if pairs else None)
            row[f"min_vs_{base}"] = min((s for _, s in pairs), default=None)
            row[f"n_vs_{base}"] = len(pairs)
        for impl in ("tritonbn",) + BASELINES:
            pct = [r["pct_of_copy"] for r in rs if r["impl"] == impl and r["ok"]]
            row[f"pct_{impl}"] = statistics.median(pct) if pct else None
        row["backends"] = sorted({r["backend"] for r in rs if r["impl"] == "torch"})
        rows.append(row)
    return rows


_SET_ORDER = {"resnet50/b256": 0, "resnet50/b32": 1, "quick": 2, "stress": 3}
_PASS_ORDER = {"fwd+bwd": 0, "fwd": 1, "bwd": 2}


def _group_order(g):
    s, op, p, dtype, layout = g
    # bn_relu (the targets' op) first, then the others in model.OPS order
    return (_SET_ORDER.get(s, 9), s, op != "bn_relu", OPS.index(op) if op in OPS else len(OPS), op,
            _PASS_ORDER.get(p, 9), dtype, layout)


def targets(records) -> list[dict]:
    """issue 3's targets, each with its measured value and met / not met / no data.
    The issue calls batch 256 DRAM-bound; the % of ceiling target uses those 12 shapes
    (256×256×14×14 and 256×512×7×7 in fp16 are 26 MB and 6 MB: under an H100's 50 MB
    L2, so they can beat the DRAM model)."""
    rs = [r for r in records if all(r[k] == v for k, v in TARGET_GROUP.items())]
    vs_torch, vs_compile = speedups(rs, "torch"), speedups(rs, "torch_compile")
    pct = [r["pct_of_copy"] for r in rs if r["impl"] == "tritonbn" and r["ok"]]

    def verdict(name, value, goal, n, need):
        if value is None:
            state = "no data"
        elif n < need:
            state = f"incomplete ({n}/{need} shapes)"
        else:
            state = "met" if value >= goal else "not met"
        return {"target": name, "value": value, "goal": goal, "shapes": n, "state": state}

    weights = lambda pairs: [r["weight"] for r, _ in pairs]  # noqa: E731
    return [
        verdict("slowest shape vs torch (cuDNN)", min((s for _, s in vs_torch), default=None),
                1.0, len(vs_torch), RESNET50_SHAPES),
        verdict("weighted geomean vs torch (cuDNN)",
                weighted_geomean([s for _, s in vs_torch], weights(vs_torch)) if vs_torch else None,
                1.3, len(vs_torch), RESNET50_SHAPES),
        verdict("weighted geomean vs torch.compile",
                weighted_geomean([s for _, s in vs_compile], weights(vs_compile)) if vs_compile else None,
                1.0, len(vs_compile), RESNET50_SHAPES),
        verdict("median % of copy ceiling, two-pass model",
                statistics.median(pct) if pct else None, 85.0, len(pct), RESNET50_SHAPES),
    ]
