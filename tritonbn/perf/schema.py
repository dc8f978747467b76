"""The results format written by ``tritonbn bench`` and read by ``tritonbn report``.

A results file is one JSON object: the environment, the measured copy bandwidth
(the ceiling), and one record per (set, shape, layout, dtype, op, pass, impl).
``validate`` names every field that is missing or wrong, so a hand-edited or
truncated file fails with a clear message rather than a wrong report.
"""
from __future__ import annotations

import json
import os

from .model import OPS, PASSES

SCHEMA_VERSION = 1
# tritonbn_heuristic: tritonbn with every launch on its heuristic config (no tuned
# or shipped configs), to measure what tuning gains; tritonbn_split and
# tritonbn_fused: tritonbn forced onto one path (the fused one where its tile fits;
# each record's "path" says which ran), to set the dispatch threshold;
# tritonbn_kernel_combine: the split path with its combines in launches of their own
# (each record's "combine" says where they ran), against the last-program combine.
# --impls.
IMPLS = ("tritonbn", "torch", "torch_compile", "tritonbn_heuristic", "tritonbn_split",
         "tritonbn_fused", "tritonbn_kernel_combine")
DEFAULT_IMPLS = IMPLS[:3]
BACKENDS = ("triton", "triton-interpreter", "cudnn", "native", "inductor")
LAYOUTS = ("NCHW", "channels_last", "contiguous")
DTYPES = ("float16", "bfloat16", "float32")
INTERPRETER_MODE = "interpreter, not performance"

_num = (int, float)
_opt_num = (int, float, type(None))

TOP = {"schema": int, "device": str, "torch": str, "triton": str, "cudnn": (int, type(None)),
       "date": str, "mode": str, "interpreter": bool, "copy_gbps": _num, "records": list}

RECORD = {"set": str, "op": str, "pass": str, "shape": list, "layout": str, "dtype": str,
          "impl": str, "backend": str, "weight": int, "ms": _num, "gbps": _num,
          "gbps_single_read": _num, "pct_of_copy": _num, "pct_of_copy_single_read": _num,
          "max_abs_err": _opt_num, "rel_err": _opt_num, "ok": bool, "peak_mb": _opt_num}

CHOICES = {"op": OPS, "pass": PASSES, "impl": IMPLS, "backend": BACKENDS, "layout": LAYOUTS,
           "dtype": DTYPES}


def key(r: dict) -> tuple:
    """What one record measures, without the implementation."""
    return (r["set"], tuple(r["shape"]), r["layout"], r["dtype"], r["op"], r["pass"])


def record_id(r: dict) -> tuple:
    """One record's identity in a results file: what it measures, and with what."""
    return key(r) + (r["impl"],)


def _wrong_type(value, typ) -> bool:
    # bool is an int to isinstance; only a bool field takes one
    return not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool)


def problems(doc) -> list[str]:
    """Everything wrong with a results document (empty when it is valid)."""
    if not isinstance(doc, dict):
        return [f"results must be a JSON object, got {type(doc).__name__}"]
    out = []
    for name, typ in TOP.items():
        if name not in doc:
            out.append(f"missing top-level field {name!r}")
        elif _wrong_type(doc[name], typ):
            out.append(f"top-level field {name!r} has type {type(doc[name]).__name__}")
    if out:
        return out
    if doc["schema"] != SCHEMA_VERSION:
        out.append(f"schema version {doc['schema']} (this tritonbn reads {SCHEMA_VERSION})")
    if not doc["copy_gbps"] > 0:
        out.append(f"copy_gbps must be > 0, got {doc['copy_gbps']}")
    if doc["interpreter"] != (doc["mode"] == INTERPRETER_MODE):
        out.append(f"mode {doc['mode']!r} disagrees with interpreter={doc['interpreter']}")
    seen = set()
    for i, r in enumerate(doc["records"]):
        where = f"record {i}"
        if not isinstance(r, dict):
            out.append(f"{where} is not an object")
            continue
        bad = False
        for name, typ in RECORD.items():
            if name not in r:
                out.append(f"{where}: missing field {name!r}")
                bad = True
            elif _wrong_type(r[name], typ):
                out.append(f"{where}: field {name!r} has type {type(r[name]).__name__}")
                bad = True
        if bad:
            continue
        for name, allowed in CHOICES.items():
            if r[name] not in allowed:
                out.append(f"{where}: {name}={r[name]!r} not one of {allowed}")
        if not r["shape"] or not all(isinstance(d, int) and d > 0 for d in r["shape"]):
            out.append(f"{where}: shape must be positive integers, got {r['shape']}")
        if not r["ms"] > 0:
            out.append(f"{where}: ms must be > 0, got {r['ms']}")
        for name in ("max_abs_err", "rel_err"):
            if r[name] is None:  # the output was not finite
                if r["ok"]:
                    out.append(f"{where}: {name} is null (non-finite output) but ok is true")
            elif not r[name] >= 0:
                out.append(f"{where}: {name} must be a number >= 0 or null, got {r[name]}")
        if r.get("path") not in (None, "split", "fused"):
            out.append(f"{where}: path={r['path']!r} not split or fused")
        k = record_id(r)
        if k in seen:
            out.append(f"{where}: duplicate record for {k}")
        seen.add(k)
    return out


def validate(doc) -> dict:
    """Return doc if it is a valid results document, else raise ValueError naming the problems."""
    found = problems(doc)
    if found:
        more = f" (and {len(found) - 10} more)" if len(found) > 10 else ""
        raise ValueError("not a tritonbn results file: " + "; ".join(found[:10]) + more)
    return doc


def read_validated(path: str, check) -> dict:
    """The JSON document at path through check (a validate function); ValueError naming
    the file otherwise."""
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
    try:
        return check(doc)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load(path: str) -> dict:
    """The results file at path, validated (ValueError naming the file and what is wrong)."""
    return read_validated(path, validate)


def write_json(doc: dict, path: str) -> None:
    """doc as JSON at path, atomically (a temporary file, then a rename), its folder made."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
