"""``tritonbn report``: a Markdown report and PNG plots from ``tritonbn bench`` results.

report.md holds the environment, issue 3's targets, a summary per (set, op,
pass, dtype, layout) (weighted geomean speedups, median % of the copy ceiling),
the records that failed their check, and one table per (set, op, pass) with its
two plots: tritonbn's speedup over each baseline per shape, and each
implementation's % of the copy ceiling per shape.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections import defaultdict

from . import schema
from .schema import load
from .model import OPS
from .summary import BASELINES, _group_order, by_key, speedup, summary_rows, targets

# what each op computes; tritonbn runs it in one fused module, torch and
# torch.compile as the unfused torch.nn modules a model would use
OP_TEXT = {"bn": "BatchNorm alone",
           "bn_relu": "relu(bn(x)); torch: `nn.Sequential(bn, nn.ReLU())`",
           "bn_add_relu": "relu(bn(x) + z), z a residual of x's shape, layout and dtype; bwd "
                          "includes dz (model: +E·s each way); torch: `torch.relu(bn(x) + z)`",
           "bn_leaky_relu": "leaky_relu(bn(x), 0.01); torch: `nn.LeakyReLU(0.01)` after bn",
           "bn_silu": "silu(bn(x)); torch: `nn.SiLU()` after bn",
           "bn_gelu": "gelu(bn(x)), exact erf form; torch: `nn.GELU()` after bn"}

IMPL_LABEL = {"tritonbn": "tritonbn", "torch": "torch", "torch_compile": "torch.compile",
              "tritonbn_heuristic": "tritonbn, heuristic configs",
              "tritonbn_split": "tritonbn, split path", "tritonbn_fused": "tritonbn, single-program",
              "tritonbn_kernel_combine": "tritonbn, split path, combine launches"}


def newest_gpu_results(directory: str) -> str | None:
    """The results file under directory (searched recursively: gpu_check puts each lease
    in perf/results/<date>-<gpu>/) with the latest date that came from a GPU, if any."""
    best = None
    for path in sorted(glob.glob(os.path.join(directory, "**", "*.json"), recursive=True)):
        try:
            doc = load(path)
        except (ValueError, OSError):
            continue  # not a results file (e.g. a correctness-check log)
        if doc["interpreter"]:
            continue
        if best is None or (doc["date"], path) > best[0]:
            best = ((doc["date"], path), path)
    return best[1] if best else None


def _fmt(v, spec=".2f", none="–"):
    return none if v is None else format(v, spec)


def _shape(s) -> str:
    return "×".join(map(str, s))


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", "_".join(parts)).strip("-")


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _compile_modes(doc: dict) -> str:
    """The modes the torch_compile records ran with (each record says; older files only
    say it once, for the whole run)."""
    modes = sorted({r.get("compile_mode", doc.get("compile_mode", "–")) for r in doc["records"]
                    if r["impl"] == "torch_compile"})
    return ", ".join(modes) if modes else doc.get("compile_mode", "–")


def markdown(doc: dict, plots: dict) -> str:
    records = doc["records"]
    lines = ["# tritonbn performance report", ""]
    if doc["interpreter"]:
        lines += [f"> **{schema.INTERPRETER_MODE}.** These numbers come from Triton's CPU "
                  "interpreter on tiny shapes; they show that the pipeline runs end to end and "
                  "say nothing about speed.", ""]
    if not doc.get("complete", True):
        lines += ["> The run stopped early (time budget or error): some cases are missing.", ""]
    lines += ["## Environment", ""]
    env = [("device", doc["device"]), ("torch", doc["torch"]), ("triton", doc["triton"]),
           ("cuDNN", doc["cudnn"]), ("date", doc["date"]), ("mode", doc["mode"]),
           ("copy ceiling", f"{doc['copy_gbps']:.0f} GB/s (device-to-device copy, read + write, same run)"),
           ("timing", {"graph": "each pass replayed from a CUDA graph: device time alone",
                       "eager": "each pass called from Python: host time included"}[
                           doc.get("timing", "eager")]),
           ("torch.compile mode", _compile_modes(doc)),
           ("tritonbn launch configs", doc.get("tuning", "–")),
           ("records", len(records))]
    lines += _table(("", ""), env) + [""]
    lines += ["Byte model (E = elements, s = bytes each): two-pass fwd 3·E·s, bwd 5·E·s, fwd+bwd "
              "8·E·s; single-read 2, 3, 5; a residual add (bn_add_relu) +E·s each way, a fused "
              "activation nothing. GB/s and % of the copy ceiling use the two-pass model "
              "unless marked 1-read (the model of tritonbn's single-program path, \"tb path\" "
              "fused). " + ("Times are wall-clock medians on the CPU. " if doc["interpreter"]
                                         else "Times are medians of `triton.testing.do_bench` with "
                                              "the L2 cache cleared before each run. ") +
              "Speedup = baseline ms / tritonbn ms; only records that passed the float64 check "
              "count.", ""]
    present = [op for op in OPS if any(r["op"] == op for r in records)]
    present += sorted({r["op"] for r in records} - set(present))
    if present:
        lines += ["Ops (tritonbn runs each as one fused module; torch and torch.compile as the "
                  "unfused torch.nn modules):", ""]
        lines += [f"- `{op}`: {OP_TEXT.get(op, op)}" for op in present] + [""]

    tg = targets(records)
    if any(t["value"] is not None for t in tg):
        lines += ["## Targets (fwd+bwd bn_relu, ResNet-50 batch 256, channels_last, float16)", ""]
        lines += _table(("target", "goal", "measured", "shapes", "state"),
                        [(t["target"], f"≥ {t['goal']:g}", _fmt(t["value"]), t["shapes"], t["state"])
                         for t in tg])
        lines += ["", "Batch 256 is the DRAM-bound regime; targets are measured here, never "
                  "asserted in tests.", ""]

    lines += ["## Summary", "",
              "Weighted geomean of tritonbn's speedup (ResNet-50 sets weight each shape by its "
              "layer count, others equally) and the median % of the copy ceiling.", ""]
    rows = summary_rows(records)
    lines += _table(("set", "op", "pass", "dtype", "layout", "shapes", "× torch", "× torch.compile",
                     "× heuristic configs", "slowest × torch", "% copy tritonbn", "% copy torch",
                     "% copy compile", "torch backend"),
                    [(r["set"], r["op"], r["pass"], r["dtype"], r["layout"], r["shapes"],
                      _fmt(r["vs_torch"]), _fmt(r["vs_torch_compile"]),
                      _fmt(r["vs_tritonbn_heuristic"]), _fmt(r["min_vs_torch"]),
                      _fmt(r["pct_tritonbn"], ".1f"), _fmt(r["pct_torch"], ".1f"),
                      _fmt(r["pct_torch_compile"], ".1f"), ", ".join(r["backends"]) or "–")
                     for r in rows]) + [""]

    failed = [r for r in records if not r["ok"]]
    errors = doc.get("errors", [])
    if failed or errors:
        lines += ["## Failed checks and errors", ""]
        lines += _table(("impl", "set", "shape", "layout", "dtype", "op", "pass", "max abs err",
                         "rel err"),
                        [(r["impl"], r["set"], _shape(r["shape"]), r["layout"], r["dtype"], r["op"],
                          r["pass"], _fmt(r["max_abs_err"], ".3g", "non-finite"),
                          _fmt(r["rel_err"], ".3g", "non-finite")) for r in failed]) + [""]
        for e in errors:
            lines.append(f"- {e['impl']} {e['set']} {_shape(e['shape'])} {e['layout']} {e['dtype']} "
                         f"{e['op']}: `{e['error']}`")
        lines.append("")

    lines += _paths(records)
    lines += ["## Per shape", ""]
    index = by_key(records)
    for (set_, op, pass_), keys in _sections(records).items():
        lines += [f"### {set_} · {op} · {pass_}", ""]
        table = []
        for k in keys:
            impls = index[k]
            ours = impls.get("tritonbn")

            def ms(impl):
                r = impls.get(impl)
                if r is None:
                    return "–"
                mark = "" if r["ok"] else " ✗"
                backend = f" ({r['backend']})" if impl == "torch" else ""
                return f"{r['ms']:.4g}{backend}{mark}"

            def speed(impl):
                return _fmt(speedup(ours, impls.get(impl)))

            peak = " / ".join(_fmt(impls[i]["peak_mb"], ".0f") if i in impls else "–"
                              for i in schema.DEFAULT_IMPLS)
            table.append((_shape(k[1]), k[3], k[2], (ours or {}).get("path", "–"),
                          ms("tritonbn"), ms("torch"), ms("torch_compile"),
                          speed("torch"), speed("torch_compile"), speed("tritonbn_heuristic"),
                          _fmt(ours and ours["gbps"], ".0f"), _fmt(ours and ours["pct_of_copy"], ".1f"),
                          _fmt(ours and ours["pct_of_copy_single_read"], ".1f"),
                          peak if pass_ == "fwd+bwd" else "–",
                          _fmt(ours and ours["max_abs_err"], ".2g")))
        lines += _table(("shape", "dtype", "layout", "tb path", "tritonbn ms", "torch ms",
                         "compile ms", "× torch", "× compile", "× heuristic", "GB/s", "% copy", "% copy 1-read",
                         "peak MiB (tb / torch / compile)", "max abs err"), table) + [""]
        for kind in ("speedup", "pct"):
            if (set_, op, pass_, kind) in plots:
                lines.append(f"![{kind} {set_} {op} {pass_}]({plots[(set_, op, pass_, kind)]})")
        lines.append("")
    return "\n".join(lines)


def _paths(records) -> list[str]:
    """The split path against the single-program one, and the last-program combine
    against combine launches of their own, where both were timed."""
    return _versus(records, "tritonbn_split", "tritonbn_fused", "path",
                   "## Paths: split against single-program",
                   "tritonbn forced onto each path (`--impls tritonbn_split,tritonbn_fused`); "
                   "\"ran\" is the path the fused run took (split where its tile does not fit). "
                   "Ratio = split ms / single-program ms: above 1 the single-program path is faster.",
                   ("split ms", "single-program ms")) + _versus(
        records, "tritonbn_kernel_combine", "tritonbn_split", "combine",
        "## Combines: launches of their own against the last program",
        "The split path with its combines in launches of their own (`--impls "
        "tritonbn_kernel_combine`) and in the reduce launches' last programs "
        "(`tritonbn_split`); \"ran\" is where the second run's combines ran. Ratio = "
        "combine-launch ms / last-program ms: above 1 the last-program combine is faster.",
        ("combine-launch ms", "last-program ms"))


def _versus(records, a: str, b: str, ran: str, title: str, text: str, columns) -> list[str]:
    """One table row per key where both impls a and b were timed: ms each, b's `ran`
    field, and a's ms over b's."""
    rows = []
    for k, impls in by_key(records).items():
        ra, rb = impls.get(a), impls.get(b)
        if ra and rb:
            rows.append((k[0], _shape(k[1]), k[2], k[3], k[4], k[5], f"{ra['ms']:.4g}",
                         f"{rb['ms']:.4g}", rb.get(ran, "–"), _fmt(speedup(rb, ra))))
    if not rows:
        return []
    return [title, "", text, ""] + _table(("set", "shape", "layout", "dtype", "op", "pass",
                                            *columns, "ran", "ratio"), rows) + [""]


def _sections(records) -> dict:
    """{(set, op, pass): [record keys]}, in summary order; shapes keep the suite's order."""
    sections = defaultdict(list)
    for k in by_key(records):
        sections[(k[0], k[4], k[5])].append(k)
    ordered = sorted(sections.items(), key=lambda kv: _group_order(kv[0] + ("", "")))
    return {s: sorted(keys, key=lambda k: (k[3], k[2])) for s, keys in ordered}


def plot(doc: dict, out_dir: str) -> dict:
    """Two PNGs per (set, op, pass); returns {(set, op, pass, kind): file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = doc["records"]
    keys_by_section = _sections(records)
    index = by_key(records)
    files = {}
    title_env = f"{doc['device']}" + (f" — {schema.INTERPRETER_MODE}" if doc["interpreter"] else "")
    for (set_, op, pass_), keys in keys_by_section.items():
        dtypes = [d for d in schema.DTYPES if any(k[3] == d for k in keys)]
        layouts = [lay for lay in schema.LAYOUTS if any(k[2] == lay for k in keys)]
        widest = max(sum(1 for k in keys if (k[3], k[2]) == (d, lay)) for d in dtypes for lay in layouts)
        for kind in ("speedup", "pct"):
            series = BASELINES if kind == "speedup" else schema.IMPLS
            fig, axes = plt.subplots(len(dtypes), len(layouts), squeeze=False,
                                     figsize=(len(layouts) * max(3.5, 0.55 * widest + 1.5),
                                              2.8 * len(dtypes) + 0.8))
            drawn = False
            for row, dtype in enumerate(dtypes):
                for col, layout in enumerate(layouts):
                    ax = axes[row][col]
                    ks = [k for k in keys if (k[3], k[2]) == (dtype, layout)]
                    if not ks:
                        ax.axis("off")
                        continue
                    drawn |= _bars(ax, kind, series, ks, index)
                    ax.set_title(f"{dtype}, {layout}", fontsize=9)
            what = "tritonbn speedup (baseline ms / tritonbn ms)" if kind == "speedup" else \
                "% of copy ceiling, two-pass byte model"
            if not drawn:  # no series had a value (e.g. no baseline ran): no figure
                plt.close(fig)
                continue
            fig.suptitle(f"{what}: {set_} {op} {pass_}\n{title_env}", fontsize=10)
            handles, labels = [], []
            for ax in axes.flat:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    if lab not in labels:
                        handles.append(h)
                        labels.append(lab)
            top = 1 - 0.9 / fig.get_figheight()
            fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8,
                       bbox_to_anchor=(0.5, top), frameon=False)
            fig.tight_layout(rect=(0, 0, 1, top - 0.25 / fig.get_figheight()))
            name = f"{kind}_{_slug(set_, op, pass_)}.png"
            fig.savefig(os.path.join(out_dir, name), dpi=90, metadata={"Software": None})
            files[(set_, op, pass_, kind)] = name
            plt.close(fig)
    return files


def _bars(ax, kind, series, ks, index) -> bool:
    """Grouped bars for one panel; False when no series had a value."""
    width = 0.8 / len(series)
    drawn = False
    for j, impl in enumerate(series):
        vals = []
        for k in ks:
            ours, r = index[k].get("tritonbn"), index[k].get(impl)
            if kind == "speedup":
                v = speedup(ours, r)
            else:
                v = r["pct_of_copy"] if r and r["ok"] else None
            vals.append(float("nan") if v is None else v)
        if all(v != v for v in vals):
            continue
        drawn = True
        name = f"vs {IMPL_LABEL[impl]}" if kind == "speedup" else IMPL_LABEL[impl]
        ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(ks))], vals, width,
               label=name)
    ax.axhline(1.0 if kind == "speedup" else 100.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(ks)))
    ax.set_xticklabels([_shape(k[1]) for k in ks], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("× faster" if kind == "speedup" else "% of copy")
    return drawn


def render(doc: dict, out_dir: str) -> str:
    """Write report.md and its PNGs to out_dir; return the report's path."""
    os.makedirs(out_dir, exist_ok=True)
    plots = plot(doc, out_dir)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(markdown(doc, plots))
    return path


def render_cli(results: str, out_dir: str) -> int:
    if os.path.isdir(results):
        path = newest_gpu_results(results)
        if path is None:
            print(f"tritonbn report: no GPU results in {results}/ yet (interpreter smoke runs are "
                  "skipped); nothing to render.")
            return 0
    else:
        path = results
        if _is_host_file(path):
            return _render_host(path, out_dir)
    try:
        doc = load(path)
    except (ValueError, OSError) as e:
        print(f"tritonbn report: {e}", file=sys.stderr)
        return 2
    out = render(doc, out_dir)
    n_png = len([f for f in os.listdir(out_dir) if f.endswith(".png")])
    print(f"tritonbn report: {path} ({doc['device']}, {doc['mode']}, {len(doc['records'])} records)"
          f" -> {out} and {n_png} PNG plots")
    return 0


def _is_host_file(path: str) -> bool:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("kind") == "host"


def _render_host(path: str, out_dir: str) -> int:
    """A `tritonbn bench --host` file: its table of host time per call, as report.md."""
    from . import host

    with open(path) as f:
        try:
            doc = host.validate(json.load(f))
        except ValueError as e:
            print(f"tritonbn report: {path}: {e}", file=sys.stderr)
            return 2
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "report.md")
    with open(out, "w") as f:
        f.write(host.markdown(doc))
    print(f"tritonbn report: {path} (host time, {len(doc['records'])} cases) -> {out}")
    return 0
