"""Terminal table, JSON record and PNG plots of a benchmark run."""

from __future__ import annotations

import itertools
import json
import math
import os
import re

MIB = 2**20
PEAK_SLACK = 1.01


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _group_key(row):
    return (row["case"], row["dtype"], row["n"], row["v"], row["d"], row["smoothing"])


def case_title(name: str) -> str:
    from benchmarks.cases import all_cases

    case = all_cases().get(name)
    return case.title if case else name


# The table's numeric columns: header -> the cell of a row (given the time of the block's eager row).
COLUMNS = {
    "time ms": lambda r, eager: _fmt(r["time_ms"], ".2f"),
    "±iqr": lambda r, eager: _fmt(r["time_iqr_ms"], ".2f"),
    "speedup": lambda r, eager: f"{eager / r['time_ms']:.2f}x" if eager and r["time_ms"] else "-",
    "peak MiB": lambda r, eager: _fmt(None if r["peak_bytes"] is None else r["peak_bytes"] / MIB, ",.0f"),
    "GB/s": lambda r, eager: _fmt(r["gbps"], ",.0f" if (r["gbps"] or 0) >= 100 else ".3g"),
    "%copy": lambda r, eager: _fmt(r.get("copy_share") and 100 * r["copy_share"], ".0f"),
    "%HBM": lambda r, eager: _fmt(r["peak_share"] and 100 * r["peak_share"], ".0f"),
    "TFLOP/s": lambda r, eager: _fmt(r["tflops"], ".3g"),
}
# Columns shown only when some row has a value.
OPTIONAL = {"GB/s": "gbps", "%copy": "copy_share", "%HBM": "peak_share", "TFLOP/s": "tflops"}


def _notes(r: dict) -> str:
    notes = [x for x in (r["status"] if r["status"] != "ok" else "", r["note"]) if x]
    if r["check"] not in (None, "ok"):
        notes.append(f"MISMATCH vs eager: {r['check']}")
    return "; ".join(notes)


def _load(loadavg) -> str:
    return "?" if not loadavg else f"{loadavg[0]:.1f}"


def table(record: dict) -> str:
    """One block per problem; times relative to eager PyTorch of the same block."""
    dev = record["device"]
    lines = [f"device: {dev['name']} ({dev['type']})   torch {record['torch']}   triton {record['triton']}   "
             f"{record['date']}"]
    config = record.get("config") or {}
    if dev["type"] == "cpu":
        lines.append(f"CPU: {dev.get('cores')} cores, {config.get('threads', dev.get('threads'))} torch thread(s), "
                     f"{config.get('busy_processes', 0)} other process(es) kept busy (--busy); load average "
                     f"{_load(record.get('loadavg_start'))} at start, {_load(record.get('loadavg_end'))} at end")
    if dev.get("copy_Bps"):
        lines.append(f"copy bandwidth (measured, bytes read + written): {dev['copy_Bps'] / 1e9:,.0f} GB/s"
                     + (f";  datasheet peak {dev['peak_bandwidth_Bps'] / 1e9:,.0f} GB/s"
                        if dev.get("peak_bandwidth_Bps") else ""))
    lines.append("time: median of one fwd+bwd step (±: interquartile range); speedup: eager time / time; "
                 "peak: memory above the inputs during one step")
    rows = record["rows"]
    if any(r.get("gbps") for r in rows):
        lines.append("GB/s: (one read of the logits + one write of the gradient) / time; "
                     "%copy, %HBM: that rate against the copy bandwidth, the datasheet peak")
    columns = [c for c in COLUMNS if c not in OPTIONAL or any(r.get(OPTIONAL[c]) for r in rows)]
    blocks = []
    for key, group in itertools.groupby(rows, key=_group_key):
        group = list(group)
        eager = next((r["time_ms"] for r in group if r["method"] == "eager" and r["time_ms"]), None)
        blocks.append((key, [(r["method"], [COLUMNS[c](r, eager) for c in columns], _notes(r)) for r in group]))
    # One width per column across the whole table, two spaces between columns.
    name_w = max([len("method")] + [len(m) for _, cells in blocks for m, _, _ in cells])
    widths = [max([len(c)] + [len(row[i]) for _, cells in blocks for _, row, _ in cells])
              for i, c in enumerate(columns)]
    header = "  " + "method".ljust(name_w) + "".join("  " + c.rjust(w) for c, w in zip(columns, widths))
    header += "  status / note"
    for (case, dtype, n, v, d, s), cells in blocks:
        shape = f"N={n} V={v}" + (f" D={d}" if d else "")
        itemsize = {"float32": 4}.get(dtype, 2)
        lines.append("")
        lines.append(f"[{case}] {shape} {dtype} label_smoothing={s:g}   (logits {n * v * itemsize / MIB:,.0f} MiB)")
        lines.append(header)
        for method, row, notes in cells:
            line = "  " + method.ljust(name_w) + "".join("  " + x.rjust(w) for x, w in zip(row, widths))
            lines.append((line + "  " + notes).rstrip())
    summary = step_summary(record)
    if summary:
        lines.append("")
        lines.append(f"step: smoothce vs Inductor (target: time ratio <= 1, peak ratio <= {PEAK_SLACK:g})")
        for s in summary:
            lines.append(
                f"  {s['method']:<18} N={s['n']} V={s['v']} ls={s['smoothing']:g}: time {s['time_ratio']:.2f}x "
                f"({s['time_ms']:.1f} vs {s['inductor_time_ms']:.1f} ms), peak "
                f"{_fmt(s['peak_ratio'], '.2f')}x ({_fmt(s['peak_bytes'] and s['peak_bytes'] / MIB, ',.0f')} vs "
                f"{_fmt(s['inductor_peak_bytes'] and s['inductor_peak_bytes'] / MIB, ',.0f')} MiB)  -> "
                f"{'meets' if s['meets'] else 'MISSES'} target"
            )
    if record.get("compile_time"):
        lines.append("")
        lines.append("compile time (cold cache, fresh process, first fwd+bwd call):")
        for c in record["compile_time"]:
            if c.get("status") != "ok":
                lines.append(f"  {c['backend']:<10} {c.get('status')}")
                continue
            extra = f", {c['rewrites']} CE rewritten" if c.get("rewrites") is not None else ""
            lines.append(f"  {c['backend']:<10} first call {c['first_call_s']:.1f} s, then {c['steady_ms']:.1f} ms/step"
                         f"  ({c['model']}{extra})")
    if not record.get("complete", True):
        lines.append("")
        lines.append("(incomplete record: the run stopped before its last shape)")
    return "\n".join(lines)


def digest(record: dict) -> str:
    """One line per problem: each method's time and, where the case counts bytes, its share of
    the copy bandwidth; the methods without a number are left out. For a short report."""
    lines = []
    for (case, dtype, n, v, d, s), group in itertools.groupby(record["rows"], key=_group_key):
        cells = []
        for r in group:
            if r["time_ms"]:
                share = f" {100 * r['copy_share']:.0f}%" if r.get("copy_share") else ""
                cells.append(f"{r['method']} {r['time_ms']:.3g}{share}")
        shape = f"N={n} V={v}" + (f" D={d}" if d else "")
        lines.append(f"[{case}] {shape} {dtype} ls={s:g}: " + (", ".join(cells) or "no numbers"))
    return "\n".join(lines)


def step_summary(record: dict) -> list[dict]:
    """For each step problem: each smoothce method against Inductor on the same inputs."""
    out = []
    rows = [r for r in record["rows"] if r["case"] == "step"]
    for key, group in itertools.groupby(rows, key=_group_key):
        group = {r["method"]: r for r in group}
        ind = group.get("inductor")
        if not ind or not ind["time_ms"]:
            continue
        for name in ("smoothce", "smoothce-backend"):
            r = group.get(name)
            if not r or not r["time_ms"]:
                continue
            peak_ratio = (r["peak_bytes"] / ind["peak_bytes"]
                          if r["peak_bytes"] is not None and ind["peak_bytes"] else None)
            out.append({
                "method": name, "n": r["n"], "v": r["v"], "dtype": r["dtype"], "smoothing": r["smoothing"],
                "time_ms": r["time_ms"], "inductor_time_ms": ind["time_ms"],
                "time_ratio": r["time_ms"] / ind["time_ms"],
                "peak_bytes": r["peak_bytes"], "inductor_peak_bytes": ind["peak_bytes"], "peak_ratio": peak_ratio,
                # 1% slack on the peak: resident-set sizes move by a few pages run to run.
                "meets": r["time_ms"] <= ind["time_ms"] and (peak_ratio is None or peak_ratio <= PEAK_SLACK),
            })
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def basename(record: dict, suffix: str = "") -> str:
    dev = record["device"]
    name = dev["name"] if dev["type"] == "cuda" else f"cpu-{dev['name']}"
    return f"{slug(name)}-{record['date'][:10]}{suffix}"


def write_json(record: dict, path: str) -> None:
    record = dict(record, step_summary=step_summary(record))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


# ---------------------------------------------------------------------------------------------
# Plots

_STYLE = {  # method -> (color, marker, line); smoothce's methods solid, the peers dashed
    "smoothce": ("#d62728", "o", "-"),
    "smoothce-backend": ("#ff7f0e", "s", "-"),
    "smoothce-backend-upcast": ("#e377c2", "s", "-"),
    "smoothce-backend-handwritten": ("#bcbd22", "s", "-"),
    "smoothce-fused-linear": ("#8c564b", "D", "-"),
    "quack": ("#2ca02c", "*", "--"),
    "liger": ("#9467bd", "P", "--"),
    "inductor": ("#1f77b4", "^", "--"),
    "inductor-upcast": ("#aec7e8", "^", "--"),
    "inductor-handwritten": ("#17becf", "^", "--"),
    "inductor-chunked": ("#9edae5", "<", "--"),
    "torch-linear-ce": ("#98df8a", ">", "--"),
    "eager": ("#7f7f7f", "v", "--"),
}


def _minor_label(y, _pos) -> str:
    # Label the 2x and 5x minor ticks of a log axis, so a range under a decade still reads.
    if y <= 0:
        return ""
    lead = round(y / 10 ** math.floor(math.log10(y)))
    return f"{y:g}" if lead in (2, 5) else ""


def _largest_n(rows: list[dict]) -> tuple[int, list[dict]]:
    n = max(r["n"] for r in rows)
    return n, [r for r in rows if r["n"] == n]


def _by_method(rows: list[dict]):
    """(method, its rows sorted by V), in the order the methods first appear."""
    for name in dict.fromkeys(r["method"] for r in rows):
        yield name, sorted((r for r in rows if r["method"] == name), key=lambda r: r["v"])


def _bars(axes, rows: list[dict], what: str) -> None:
    """Time and peak memory of one shape as horizontal bars from 0, each labelled with its value."""
    names = [r["label"] for r in rows][::-1]
    colors = [_STYLE.get(r["method"], (None,))[0] or "#888888" for r in rows][::-1]
    for ax, key, scale, unit, label in ((axes[0], "time_ms", 1.0, "ms", "time per step, fwd+bwd (ms)"),
                                        (axes[1], "peak_bytes", 1.0 / MIB, "MiB", "peak memory above inputs (MiB)")):
        values = [(r[key] or 0.0) * scale for r in rows][::-1]
        ax.barh(names, values, color=colors)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f} {unit}" if v else " not measured", va="center", fontsize=8)
        ax.set_xlim(0, max(values + [1.0]) * 1.25)
        ax.set_xlabel(label)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_title(f"{label.split(' (')[0]}, {what}", fontsize=10)


def plot(record: dict, out_dir: str, stem: str) -> list[str]:
    """Time and peak memory vs V per method (one PNG per case and dtype, largest N), and where the
    case counts bytes, the effective bandwidth against the measured copy bandwidth. Returns the
    files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib, or pass --no-plots)")
        return []

    def vocab_axis(ax):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1024:g}K"))
        ax.set_xlabel("vocabulary size V")
        ax.grid(True, which="both", alpha=0.3)

    def log_axis(ax):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))

    def finish(fig, axes, title, missing, path):
        # Bands in inches, top to bottom: title, the axes, the legend, the note on what is missing.
        width, height = fig.get_size_inches()
        handles = {}
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        note = "not shown: " + "; ".join(missing) if missing else ""
        note_band = 0.08 + 0.16 * math.ceil(len(note) / (17 * width)) if note else 0.0
        legend_band = 0.15 + 0.24 * math.ceil(len(handles) / 3)
        fig.text(0.5, 1 - 0.1 / height, title, ha="center", va="top", fontsize=10.5)
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8.5, frameon=False,
                   bbox_to_anchor=(0.5, note_band / height))
        if note:
            fig.text(0.01, 0.05 / height, note, fontsize=7.5, color="#555555", wrap=True)
        fig.tight_layout(rect=(0, (note_band + legend_band) / height, 1, 1 - 0.55 / height))
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def not_shown(rows):
        """Methods without a number, grouped by the reason: 'not installed: liger, quack'."""
        reasons = {}
        for r in rows:
            if r["status"] != "ok":
                reasons.setdefault(r["status"][:90], set()).add(r["method"])
        return [f"{reason}: {', '.join(sorted(names))}" for reason, names in sorted(reasons.items())]

    os.makedirs(out_dir, exist_ok=True)
    dev = record["device"]
    subtitle = (f"{dev['name']} ({dev['type']}), torch {record['torch']}, triton {record['triton']}, "
                f"{record['date'][:10]}")
    files = []
    ok_rows = [r for r in record["rows"] if r["status"] == "ok" and r["time_ms"]]
    for case, dtype in sorted({(r["case"], r["dtype"]) for r in ok_rows}):
        n, rows = _largest_n([r for r in ok_rows if r["case"] == case and r["dtype"] == dtype])
        smoothings = sorted({r["smoothing"] for r in rows})
        missing = not_shown([r for r in record["rows"] if r["case"] == case and r["dtype"] == dtype])
        vs = sorted({r["v"] for r in rows})
        fig, axes = plt.subplots(len(smoothings), 2, figsize=(12, 3.6 * len(smoothings) + 2.0), squeeze=False)
        for i, s in enumerate(smoothings):
            if len(vs) == 1:  # one shape: a bar per method reads better than lone points on log axes
                _bars(axes[i], [mrows[0] for _, mrows in _by_method([r for r in rows if r["smoothing"] == s])],
                      f"V={vs[0]}, label_smoothing={s:g}")
                continue
            for name, mrows in _by_method([r for r in rows if r["smoothing"] == s]):
                color, marker, line = _STYLE.get(name, (None, "x", ":"))
                kw = dict(color=color, marker=marker, linestyle=line, label=mrows[0]["label"])
                axes[i][0].plot([r["v"] for r in mrows], [r["time_ms"] for r in mrows], **kw)
                mem = [r for r in mrows if r["peak_bytes"]]  # a log axis cannot show 0
                if mem:
                    axes[i][1].plot([r["v"] for r in mem], [r["peak_bytes"] / MIB for r in mem], **kw)
            axes[i][0].set_ylabel("time per step, fwd+bwd (ms)")
            axes[i][1].set_ylabel("peak memory above inputs (MiB)")
            for j, what in enumerate(("time", "peak memory")):
                vocab_axis(axes[i][j])
                log_axis(axes[i][j])
                axes[i][j].set_title(f"{what}, label_smoothing={s:g}", fontsize=10)
        d = rows[0]["d"]
        shape = f"N={n}" + (f", D={d}" if d else "")
        title = f"{case_title(case)}; {dtype}, {shape}\n{subtitle}"
        files.append(finish(fig, list(axes.flat), title, missing, os.path.join(out_dir, f"{stem}-{case}-{dtype}.png")))

    copy_bps, peak_bps = dev.get("copy_Bps"), dev.get("peak_bandwidth_Bps")
    for case, dtype in sorted({(r["case"], r["dtype"]) for r in ok_rows if r.get("gbps")}):
        n, rows = _largest_n([r for r in ok_rows if r["case"] == case and r["dtype"] == dtype and r.get("gbps")])
        smoothings = sorted({r["smoothing"] for r in rows})
        fig, axes = plt.subplots(1, len(smoothings), figsize=(6.2 * len(smoothings), 5.6), squeeze=False)
        for ax, s in zip(axes[0], smoothings):
            for name, mrows in _by_method([r for r in rows if r["smoothing"] == s]):
                color, marker, line = _STYLE.get(name, (None, "x", ":"))
                ax.plot([r["v"] for r in mrows], [r["gbps"] for r in mrows], color=color, marker=marker,
                        linestyle=line, label=mrows[0]["label"])
            top = max([r["gbps"] for r in rows] + [b / 1e9 for b in (copy_bps, peak_bps) if b])
            ax.set_ylim(0, top * 1.12)
            vocab_axis(ax)
            for bps, text, style in ((copy_bps, "copy (measured)", "-"), (peak_bps, "datasheet peak", ":")):
                if bps:
                    ax.axhline(bps / 1e9, color="black", linestyle=style, linewidth=1)
                    ax.annotate(f"{text} {bps / 1e9:,.0f} GB/s", (0.01, bps / 1e9), xycoords=("axes fraction", "data"),
                                xytext=(0, 2), textcoords="offset points", fontsize=8)
            if copy_bps:
                share = ax.secondary_yaxis("right", functions=(lambda g: 100 * g * 1e9 / copy_bps,
                                                               lambda p: p / 100 * copy_bps / 1e9))
                share.set_ylabel("% of copy bandwidth")
            ax.set_ylabel("effective bandwidth (GB/s)\n(read logits + write gradient) / time")
            ax.set_title(f"label_smoothing={s:g}", fontsize=10)
        title = f"{case_title(case)} against the memory roofline; {dtype}, N={n}\n{subtitle}"
        files.append(finish(fig, list(axes.flat), title, [], os.path.join(out_dir, f"{stem}-{case}-{dtype}-bandwidth.png")))
    return files
