"""Terminal table, JSON record and PNG plots of a benchmark run."""

from __future__ import annotations

import itertools
import json
import math
import os
import re

CASE_TITLES = {
    "ce": "cross-entropy on logits (N, V): loss + dlogits",
    "head": "linear head + cross-entropy: loss + dhidden + dweight",
    "step": "training step through the loss (CPU promise: smoothce vs Inductor)",
}

MIB = 2**20
PEAK_SLACK = 1.01


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _group_key(row):
    return (row["case"], row["dtype"], row["n"], row["v"], row["d"], row["smoothing"])


def table(record: dict) -> str:
    """One block per problem; times relative to eager PyTorch of the same block."""
    lines = []
    dev = record["device"]
    lines.append(f"device: {dev['name']} ({dev['type']})   torch {record['torch']}   triton {record['triton']}   "
                 f"{record['date']}")
    lines.append("time: median of one fwd+bwd step (±: interquartile range); speedup: eager time / time; "
                 "peak: memory above the inputs during one step")
    rows = record["rows"]
    header = f"  {'method':<24}{'time ms':>10}{'±iqr':>8}{'speedup':>10}{'peak MiB':>10}{'GB/s':>8}"
    header += f"{'%peak':>7}{'TFLOP/s':>9}  status / note"
    for key, group in itertools.groupby(rows, key=_group_key):
        group = list(group)
        case, dtype, n, v, d, s = key
        shape = f"N={n} V={v}" + (f" D={d}" if d else "")
        lines.append("")
        lines.append(f"[{case}] {shape} {dtype} label_smoothing={s:g}   "
                     f"(logits {n * v * (2 if dtype != 'float32' else 4) / MIB:,.0f} MiB)")
        lines.append(header)
        eager = next((r["time_ms"] for r in group if r["method"] == "eager" and r["time_ms"]), None)
        for r in group:
            speed = f"{eager / r['time_ms']:.2f}x" if eager and r["time_ms"] else "-"
            status = r["status"] if r["status"] != "ok" else ""
            notes = [x for x in (status, r["note"]) if x]
            if r["check"] not in (None, "ok"):
                notes.append(f"MISMATCH vs eager: {r['check']}")
            peak = _fmt(r["peak_bytes"] and r["peak_bytes"] / MIB, ",.0f")
            share = _fmt(r["peak_share"] and 100 * r["peak_share"], ".0f")
            lines.append(
                f"  {r['method']:<24}{_fmt(r['time_ms'], '.2f'):>10}{_fmt(r['time_iqr_ms'], '.2f'):>8}{speed:>10}"
                f"{peak:>10}{_fmt(r['gbps'], '.3g'):>8}{share:>7}{_fmt(r['tflops'], '.3g'):>9}  {'; '.join(notes)}"
            )
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

_STYLE = {  # method -> (color, marker); smoothce methods solid, baselines dashed
    "smoothce": ("#d62728", "o", "-"),
    "smoothce-backend": ("#ff7f0e", "s", "-"),
    "smoothce-fused-linear": ("#8c564b", "D", "-"),
    "eager": ("#7f7f7f", "v", "--"),
    "inductor": ("#1f77b4", "^", "--"),
    "inductor-chunked": ("#17becf", "<", "--"),
    "torch-linear-ce": ("#2ca02c", ">", "--"),
    "liger": ("#9467bd", "P", "--"),
}


def _minor_label(y, _pos) -> str:
    # Label the 2x and 5x minor ticks of a log axis, so a range under a decade still reads.
    if y <= 0:
        return ""
    lead = round(y / 10 ** math.floor(math.log10(y)))
    return f"{y:g}" if lead in (2, 5) else ""


def plot(record: dict, out_dir: str, stem: str) -> list[str]:
    """Time and peak memory vs V per method (one PNG per case and dtype, largest N), and on GPU
    the effective bandwidth against the device's HBM peak. Returns the files written."""
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

    os.makedirs(out_dir, exist_ok=True)
    dev = record["device"]
    subtitle = (f"{dev['name']} ({dev['type']}), torch {record['torch']}, triton {record['triton']}, "
                f"{record['date'][:10]}")
    files = []
    ok_rows = [r for r in record["rows"] if r["status"] == "ok" and r["time_ms"]]
    for case, dtype in sorted({(r["case"], r["dtype"]) for r in ok_rows}):
        rows = [r for r in ok_rows if r["case"] == case and r["dtype"] == dtype]
        n = max(r["n"] for r in rows)
        rows = [r for r in rows if r["n"] == n]
        smoothings = sorted({r["smoothing"] for r in rows})
        fig, axes = plt.subplots(len(smoothings), 2, figsize=(12, 4.2 * len(smoothings)), squeeze=False)
        for i, s in enumerate(smoothings):
            srows = [r for r in rows if r["smoothing"] == s]
            for name in dict.fromkeys(r["method"] for r in srows):
                mrows = sorted((r for r in srows if r["method"] == name), key=lambda r: r["v"])
                color, marker, line = _STYLE.get(name, (None, "x", ":"))
                kw = dict(color=color, marker=marker, linestyle=line, label=mrows[0]["label"])
                axes[i][0].plot([r["v"] for r in mrows], [r["time_ms"] for r in mrows], **kw)
                mem = [r for r in mrows if r["peak_bytes"]]  # a log axis cannot show 0
                if mem:
                    axes[i][1].plot([r["v"] for r in mem], [r["peak_bytes"] / MIB for r in mem], **kw)
            axes[i][0].set_ylabel("time per step, fwd+bwd (ms)")
            axes[i][1].set_ylabel("peak memory above inputs (MiB)")
            for j, what in enumerate(("time", "peak memory")):
                ax = axes[i][j]
                vocab_axis(ax)
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
                ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))
                ax.set_title(f"{what}, label_smoothing={s:g}")
        d = rows[0]["d"]
        shape = f"N={n}" + (f", D={d}" if d else "")
        fig.suptitle(f"{CASE_TITLES[case]}\n{dtype}, {shape}   |   {subtitle}", fontsize=11)
        handles, labels = {}, {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=9,
                   bbox_to_anchor=(0.5, 0.03), frameon=False)
        missing = sorted({f"{r['method']} ({r['status'][:70]})" for r in record["rows"]
                          if r["case"] == case and r["dtype"] == dtype and r["status"] != "ok"})
        if missing:
            fig.text(0.01, 0.005, "not shown: " + ", ".join(missing), fontsize=7.5, color="#555555", wrap=True)
        fig.tight_layout(rect=(0, 0.11 if len(smoothings) > 1 else 0.17, 1, 1))
        path = os.path.join(out_dir, f"{stem}-{case}-{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    peak_bw = dev.get("peak_bandwidth_Bps")
    bw_rows = [r for r in ok_rows if r["gbps"] is not None]
    if dev["type"] == "cuda" and bw_rows:
        dtypes = sorted({r["dtype"] for r in bw_rows})
        fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.6), squeeze=False)
        for ax, dtype in zip(axes[0], dtypes):
            rows = [r for r in bw_rows if r["dtype"] == dtype]
            n = max(r["n"] for r in rows)
            rows = [r for r in rows if r["n"] == n and r["case"] == "ce"]
            for (name, s), mrows in itertools.groupby(
                    sorted(rows, key=lambda r: (r["method"], r["smoothing"], r["v"])),
                    key=lambda r: (r["method"], r["smoothing"])):
                mrows = list(mrows)
                color, marker, _ = _STYLE.get(name, (None, "x", ":"))
                ax.plot([r["v"] for r in mrows], [r["gbps"] for r in mrows], color=color, marker=marker,
                        linestyle="-" if s == 0 else ":", label=f"{mrows[0]['label']}, ls={s:g}")
            if peak_bw:
                ax.axhline(peak_bw / 1e9, color="black", linestyle="--", linewidth=1)
                ax.text(ax.get_xlim()[0], peak_bw / 1e9 * 0.97, f" HBM peak {peak_bw / 1e12:.2f} TB/s",
                        va="top", fontsize=8)
            vocab_axis(ax)
            ax.set_ylim(bottom=0)
            ax.set_ylabel("effective bandwidth (GB/s)\n(read logits + write gradient) / time")
            ax.set_title(f"{dtype}, N={n}")
            ax.legend(fontsize=7)
        fig.suptitle(f"cross-entropy loss + gradient vs the memory roofline   |   {subtitle}", fontsize=11)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-bandwidth.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
