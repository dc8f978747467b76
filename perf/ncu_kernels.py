"""Why each kernel of a training step sits under the copy ceiling: Nsight Compute's
counters for the six kernels of one tritonbn BatchNorm training step.

Three modes:
  run      (under ncu) build tritonbn.BatchNorm{1,2,3}d(C, activation="relu") on CUDA,
           run 2 warm-up training steps (forward + backward with a random dy; the
           kernels compile here), then exactly one step between
           torch.cuda.profiler.start() and stop(), so `ncu --profile-from-start off`
           profiles only that step: stats_partial, stats_combine, normalize,
           bwd_reduce, bwd_combine, bwd_dx, and torch's num_batches_tracked += 1
           (one tiny elementwise kernel, as torch's own BatchNorm launches).
  command  print the ncu command line for one shape (ncu_command(), which the GPU
           check imports, so the check and the docs share one definition).
  parse    read ncu's raw CSV (one or more files, one per shape) and write per
           kernel: time, DRAM throughput and bytes, achieved and theoretical
           occupancy, registers, grid, waves and the top 3 warp stall reasons.

Usage (from the repository root):
  python3 perf/ncu_kernels.py command --shape 256,64,56,56 --out-csv OUT/ncu_b256.csv
      prints: ncu ... python3 perf/ncu_kernels.py run --shape 256,64,56,56 ...
  python3 perf/ncu_kernels.py parse OUT/ncu_b256.csv --label b256 OUT/ncu_b32.csv
      --label b32 --out OUT/ncu_summary.json          (one --label per CSV, in order)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import sys

# What ncu collects: its standard sections (section names are stable across ncu
# versions, where single metric names have been renamed: DRAM throughput is
# dram__throughput.* in older releases, gpu__dram_throughput.* in newer ones), plus
# the DRAM byte counts. A metric name ncu does not know makes it profile nothing,
# so only these two well-established ones are named. `--page raw` prints every
# metric the sections collected; the parser takes whichever name is there.
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats")
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
# summary field -> the raw-page columns that hold it, first found wins
COLUMNS = {
    "time": ("gpu__time_duration.sum",),
    "dram_pct": ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                 "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    "dram_read": ("dram__bytes_read.sum",),
    "dram_write": ("dram__bytes_write.sum",),
    "achieved_occupancy": ("sm__warps_active.avg.pct_of_peak_sustained_active",),
    "theoretical_occupancy": ("sm__maximum_warps_per_active_cycle_pct",),
    "registers": ("launch__registers_per_thread",),
    "block": ("launch__block_size",),
    "grid": ("launch__grid_size",),
    "waves": ("launch__waves_per_multiprocessor",),
}
# WarpStateStats: cycles a warp spends stalled per issued instruction, by reason
STALL_COLUMN = re.compile(r"^smsp__average_warps?_(?:latency_)?issue_stalled_(.+?)"
                          r"(?:_per_issue_active)?\.ratio$")
# "selected" is the cycle a warp issues, about 1 per instruction: not a stall
NOT_STALLS = ("selected",)

TIME_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
           "second": 1e6, "s": 1e6}
BYTES = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12}
LAYOUTS = ("channels_last", "contiguous", "nchw")  # nchw = contiguous, any rank; any case
DTYPES = ("float16", "bfloat16", "float32")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_shape(shape) -> tuple[int, ...]:
    """(256, 64, 56, 56) from "256,64,56,56" or a sequence of ints."""
    dims = tuple(int(d) for d in (shape.split(",") if isinstance(shape, str) else shape))
    if not 2 <= len(dims) <= 5 or min(dims) < 1:
        raise ValueError(f"shape {shape!r}: 2 to 5 positive sizes, (N, C, ...)")
    return dims


def ncu_command(shape, layout: str, dtype: str, csv_path, *, python: str = "python3",
                ncu: str = "ncu") -> list[str]:
    """The argv that profiles one training step at `shape` and writes ncu's raw CSV
    to csv_path, to be run from the repository root (the script's path is relative
    to it, as in the docs). --log-file, not a stdout redirect, so the script's own
    output stays out of the CSV; --print-units base gives ns and bytes whatever the
    magnitude.
    Clocks are left as they are (--clock-control none): the numbers are those of
    the clocks the timings ran at."""
    layout = layout.lower()
    if layout not in LAYOUTS or dtype not in DTYPES:
        raise ValueError(f"layout {layout!r} / dtype {dtype!r}: choose from {LAYOUTS} / {DTYPES}")
    script = os.path.relpath(os.path.abspath(__file__), ROOT)
    dims = ",".join(map(str, parse_shape(shape)))
    return [ncu, "--clock-control", "none", "--profile-from-start", "off",
            "--target-processes", "all", "--csv", "--page", "raw", "--print-units", "base",
            "--log-file", str(csv_path),
            *[a for name in SECTIONS for a in ("--section", name)],
            "--metrics", ",".join(METRICS),
            python, script, "run", "--shape", dims, "--layout", layout, "--dtype", dtype]


# ----------------------------------------------------------------------------- run

def run(shape, layout: str, dtype: str) -> int:
    """Two warm-up training steps, then one between profiler start and stop."""
    import torch

    if not torch.cuda.is_available():
        print("ncu_kernels run: no CUDA device (it profiles GPU kernels under ncu)",
              file=sys.stderr)
        return 2
    import tritonbn
    from tritonbn.ops import interpreting
    from tritonbn.perf.bench import bn_class

    if interpreting():
        print("ncu_kernels run: TRITON_INTERPRET is set; unset it to run compiled kernels",
              file=sys.stderr)
        return 2
    fmt = torch.contiguous_format
    if layout == "channels_last":
        if len(shape) not in (4, 5):
            print(f"ncu_kernels run: channels_last needs a 4-D or 5-D shape, got {shape}",
                  file=sys.stderr)
            return 2
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    torch.manual_seed(0)
    bn = bn_class(len(shape), tritonbn)(shape[1], activation="relu").cuda()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(shape, device="cuda") * 2 + 1).to(memory_format=fmt)
    x = x.to(getattr(torch, dtype)).requires_grad_()
    dy = torch.randn_like(x)  # x's memory format: backward reads it without a copy

    def step():
        bn.zero_grad(set_to_none=True)  # no grad-accumulation kernels in the profile
        x.grad = None
        bn(x).backward(dy)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"ncu_kernels run: one training step of {type(bn).__name__}({shape[1]}, relu), "
          f"shape {list(shape)} {layout} {dtype}, on {torch.cuda.get_device_name()}")
    return 0


# ----------------------------------------------------------------------------- parse

def read_raw_csv(text: str) -> tuple[list[dict], dict]:
    """(rows, units) of ncu's `--csv --page raw` output: one dict per kernel launch,
    keyed by column; units by column (empty without a units row). Anything before
    the header row (the one holding "Kernel Name") and every ==PROF==/==WARNING==
    line is skipped."""
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("==")]
    rows = list(csv.reader(lines))
    start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if start is None:
        raise ValueError('no ncu raw CSV header (a row with "Kernel Name")')
    header, body = rows[start], [r for r in rows[start + 1:] if len(r) == len(rows[start])]
    name_col = header.index("Kernel Name")
    units = {}
    if body and body[0][name_col] == "":  # the units row has no kernel name
        units = dict(zip(header, body.pop(0)))
    return [dict(zip(header, r)) for r in body], units


def number(text):
    """ncu's value as a float (thousands separators removed); None if empty or not a number."""
    try:
        return float(str(text).replace(",", "").strip())
    except ValueError:
        return None


def short_name(name: str) -> str:
    """The function's own name: no return type, namespaces, template or argument lists."""
    out, depth = [], 0
    for ch in name:
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    base = "".join(out).strip().split(" ")[-1]
    return [p for p in base.split("::") if p][-1] if base.strip(":") else name


def _column(row, field):
    """The raw-page column holding a summary field in this row, or None."""
    return next((c for c in COLUMNS[field] if c in row), None)


def _value(row, field):
    col = _column(row, field)
    return None if col is None else number(row[col])


def _scaled(row, units, field, table, base):
    """A field's value in the table's unit (µs, bytes); without a units row, in ncu's
    base unit `base`; None if absent or its unit unknown."""
    col = _column(row, field)
    value = None if col is None else number(row[col])
    unit = units.get(col) or base
    return None if value is None or unit not in table else value * table[unit]


def _int(value):
    return int(value) if value is not None and float(value).is_integer() else value


def summarize(rows: list[dict], units: dict, label: str) -> list[dict]:
    """One record per kernel launch, in launch order."""
    out = []
    for row in rows:
        time_us = _scaled(row, units, "time", TIME_US, "nsecond")
        read, write = (_scaled(row, units, m, BYTES, "byte") for m in ("dram_read", "dram_write"))
        read, write = (None if b is None else round(b) for b in (read, write))
        total = read + write if read is not None and write is not None else None
        stalls = []
        for col, value in row.items():
            m = STALL_COLUMN.match(col)
            if m and m.group(1) not in NOT_STALLS and number(value) is not None:
                stalls.append({"reason": m.group(1), "value": number(value)})
        stalls.sort(key=lambda s: -s["value"])
        out.append({
            "label": label, "id": _int(number(row.get("ID", ""))),
            "kernel": short_name(row["Kernel Name"]),
            "time_us": time_us,
            "dram_pct": _value(row, "dram_pct"),
            "dram_read_bytes": read, "dram_write_bytes": write, "dram_bytes": total,
            "dram_gb_per_s": total / time_us / 1e3 if total is not None and time_us else None,
            "achieved_occupancy_pct": _value(row, "achieved_occupancy"),
            "theoretical_occupancy_pct": _value(row, "theoretical_occupancy"),
            "registers": _int(_value(row, "registers")),
            "block": _int(_value(row, "block")),
            "grid": _int(_value(row, "grid")),
            "waves": _value(row, "waves"),
            "stalls": stalls[:3],
        })
    return out


def missing_metrics(rows: list[dict]) -> list[str]:
    """The summary fields (and the stall reasons) that no column of rows holds."""
    cols = rows[0] if rows else {}
    missing = [f for f in COLUMNS if _column(cols, f) is None]
    if not any(STALL_COLUMN.match(c) for c in cols):
        missing.append("stall reasons")
    return missing


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(records: list[dict]) -> str:
    """A compact text table of summarize()'s records."""
    w = max([5] + [len(r["label"]) for r in records])
    head = (f"{'label':<{w}} {'kernel':<22} {'µs':>8} {'DRAM%':>6} {'GB/s':>7} {'MB':>8} "
            f"{'occ a/t %':>11} {'regs':>4} {'grid':>7} {'waves':>6}  top stalls")
    lines = [head]
    for r in records:
        stalls = ", ".join(f"{s['reason']} {s['value']:.1f}" for s in r["stalls"])
        mb = None if r["dram_bytes"] is None else r["dram_bytes"] / 1e6
        occ = f"{_fmt(r['achieved_occupancy_pct'], '.0f')}/{_fmt(r['theoretical_occupancy_pct'], '.0f')}"
        lines.append(f"{r['label']:<{w}} {r['kernel'][:22]:<22} {_fmt(r['time_us'], '.1f'):>8} "
                     f"{_fmt(r['dram_pct'], '.1f'):>6} {_fmt(r['dram_gb_per_s'], '.0f'):>7} "
                     f"{_fmt(mb, '.1f'):>8} {occ:>11} {_fmt(r['registers'], '.0f'):>4} "
                     f"{_fmt(r['grid'], '.0f'):>7} {_fmt(r['waves'], '.2f'):>6}  {stalls}")
    return "\n".join(lines)


def parse(paths: list[str], labels: list[str] | None, out: str | None) -> int:
    labels = labels or [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(labels) != len(paths):
        print(f"ncu_kernels parse: {len(paths)} CSV files but {len(labels)} labels",
              file=sys.stderr)
        return 2
    records, per_label = [], {}
    for path, label in zip(paths, labels):
        text = ""
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            rows, units = read_raw_csv(text)
        except (OSError, ValueError) as e:  # ncu failed or never ran: say why
            why = [ln for ln in text.splitlines() if ln.startswith(("==ERROR==", "==WARNING=="))]
            per_label[label] = {"csv": path, "error": f"{e}; " + " | ".join(why)[:1000]}
            print(f"ncu_kernels parse: {label}: {per_label[label]['error']}", file=sys.stderr)
            continue
        recs = summarize(rows, units, label)
        records += recs
        times = [r["time_us"] for r in recs if r["time_us"] is not None]
        per_label[label] = {"csv": path, "kernels": len(recs),
                            "time_us": sum(times) if times else None,
                            "missing_metrics": missing_metrics(rows)}
    print(table(records))
    if out:
        doc = {"what": "ncu counters per kernel of one tritonbn training step (raw page)",
               "sections": list(SECTIONS), "metrics": list(METRICS), "labels": per_label,
               "kernels": records}
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0 if records and not any("error" in v for v in per_label.values()) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    for name in ("run", "command"):
        s = sub.add_parser(name)
        s.add_argument("--shape", required=True, help="N,C[,...], e.g. 256,64,56,56")
        s.add_argument("--layout", default="channels_last", type=str.lower, choices=LAYOUTS)
        s.add_argument("--dtype", default="float16", choices=DTYPES)
        if name == "command":
            s.add_argument("--out-csv", required=True, help="where ncu writes its raw CSV")
    sp = sub.add_parser("parse")
    sp.add_argument("csv", nargs="+")
    sp.add_argument("--label", action="append",
                    help="once per CSV, in order (default: the file's name)")
    sp.add_argument("--out", help="summary JSON")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["parse"]:  # files and labels may alternate: a.csv --label A b.csv --label B
        args = sp.parse_intermixed_args(argv[1:])
        return parse(args.csv, args.label, args.out)
    args = p.parse_args(argv)
    try:
        shape = parse_shape(args.shape)
    except ValueError as e:
        p.error(str(e))
    if args.mode == "command":
        print(shlex.join(ncu_command(shape, args.layout, args.dtype, args.out_csv)))
        return 0
    return run(shape, args.layout, args.dtype)


if __name__ == "__main__":
    sys.exit(main())
