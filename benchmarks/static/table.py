"""The static report's record as Markdown: what was compiled and with what, the targets per call,
the L2 plan per V, and every variant's figures."""

from __future__ import annotations

from collections import defaultdict

from benchmarks.static import model, variants


def _widths(d: dict) -> str:
    return " ".join(f"{n}x{bits}" for bits, n in sorted(d.items(), key=lambda kv: -int(kv[0]))) or "-"


def _pct(x) -> str:
    return "-" if x is None else (">999" if x > 9.99 else f"{100 * x:.0f}")


def _k(V: int) -> str:
    return f"{V // 1024}K" if V % 1024 == 0 else str(V)


def markdown(rec: dict) -> str:
    about = rec["about"]
    out = [
        "# Static GPU report of smoothce's Triton kernels",
        "",
        f"Triton {about['triton']}, torch {about['torch']}, Python {about['python']}; commit "
        f"{about['commit'] or 'unknown'}{' with local changes' if about['dirty'] else ''}; {about['date']}. "
        f"`{about['command']}`.",
        "",
        "Nothing here ran on a GPU: every variant the launchers can run was compiled on a CPU-only machine by "
        "Triton's own ptxas for the targets below, with its arguments specialised as a launch specialises them, "
        "and read from its binary (benchmarks/static/). Bounds and the L2 plan are arithmetic on that code "
        "and on the GPU constants below (benchmarks/static/model.py says how); they are ceilings to be "
        "checked against a measurement, not measurements.",
        "",
        "Entries: " + "; ".join(f"`{k}`: {v}" for k, v in variants.ENTRIES.items() if k in rec["entries"]) + ".",
        "Features: `plain` (ignore_index -100), `smoothing` (label_smoothing 0.1), `weights` (class weights), "
        "`z_loss` (1e-4), `softcap` (30), `all` (all four). `fixed`: the tuning table's choice (problems under "
        "the autotuning threshold); `tuned`: every configuration the autotuner keeps for the call.",
        "",
        "| GPU | SMs | clock GHz | copy TB/s | L2 MiB | copy figure |",
        "|---|---|---|---|---|---|",
    ]
    for g in model.GPUS:
        out.append(f"| {g.name} | {g.sms} | {g.clock_hz / 1e9:.2f} | {g.copy_Bps / 1e12:.2f} | {g.l2_bytes >> 20} | "
                   f"{g.copy_source} |")
    for target, skipped in rec.get("skipped_targets", {}).items():
        out += ["", f"{target}: not compiled ({skipped})."]
    rows = rec["rows"]
    kernels = rec["kernels"]
    for target in rec["targets"]:
        trows = [r for r in rows if r["target"] == target]
        if not trows:
            continue
        out += ["", f"## {target}: targets per call", "",
                "Worst over V and over the variants that may run: instructions per logit (limit 40 plain and "
                "smoothing, 50 otherwise), spill bytes, the hot code's logits loads and gradient stores (count x "
                "bits, per loop body), and whether every variant meets every target.", "",
                "| entry | dtype | features | variants | instr/logit max (variant, V) | spill B max | logits loads | "
                "gradient stores | meets |", "|---|---|---|---|---|---|---|---|---|"]
        groups = defaultdict(list)
        for r in trows:
            groups[(r["entry"], r["dtype"], r["features"])].append(r)
        for (entry, dtype, feats), rs in groups.items():
            worst = max(rs, key=lambda r: r["instr_per_logit"])
            spill = max(kernels[r["kernel"]]["spill_store_bytes"] for r in rs)
            loads, stores = _merged(rs, "logits loads"), _merged(rs, "gradient stores")
            failed = sorted({name for r in rs for name, ok in r["checks"].items() if not ok})
            out.append(f"| {entry} | {dtype} | {feats} | {len({r['kernel'] for r in rs})} | "
                       f"{worst['instr_per_logit']:.1f} ({worst['config']}, {_k(worst['V'])}) | {spill} | "
                       f"{loads} | {stores} | {'yes' if not failed else 'no: ' + ', '.join(failed)} |")
        if target == "sm_90":
            out += _l2_plan(trows)
        out += _every_variant(target, trows, kernels)
    return "\n".join(out) + "\n"


def _merged(rs, key) -> str:
    seen = sorted({_widths(r["hot_accesses"].get(key, {})) for r in rs})
    return ", ".join(seen)


def _l2_plan(rows) -> list:
    out = ["", "## sm_90: the second read and L2", "",
           "Variants that read each logit twice (TWO_PASS with a gradient): rows streamed at once, the share of "
           "the second read L2 is expected to serve, HBM traffic per logit and the ceiling it sets, per V. "
           "Rows: the op at the benchmark's N = 8192, the head's chunk.", "",
           "| entry | dtype | V | variant | rows in flight | L2 share H100 / H200 | HBM reads + writes per logit "
           "H100 | ceiling % of copy H100 / H200 |", "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        g = r["gpus"]
        h100, h200 = g["H100"], g["H200"]
        if h100["l2_share_of_second_read"] is None:
            continue
        key = (r["entry"], r["dtype"], r["V"], r["config"], r["features"] == "weights" or r["features"] == "all")
        if key in seen or r["features"] not in ("plain", "all"):
            continue
        seen.add(key)
        out.append(f"| {r['entry']} | {r['dtype']} | {_k(r['V'])} | {r['config']}{' (weights)' if key[-1] else ''} | "
                   f"{h100['rows_in_flight']} | {_pct(h100['l2_share_of_second_read'])}% / "
                   f"{_pct(h200['l2_share_of_second_read'])}% | {h100['hbm_reads_per_logit']:.2f} + "
                   f"{h100['hbm_writes_per_logit']:.0f} | {_pct(h100['ceiling'])} / {_pct(h200['ceiling'])} |")
    return out


def _every_variant(target, rows, kernels) -> list:
    gpu = target == "sm_90"
    head = ("| entry | dtype | V | features | choice | variant | regs | spill st/ld B | smem B | CTAs/SM | logits "
            "loads | gradient stores | weights loads | instr/logit | MUFU/logit |")
    head += " HBM R+W/logit H100 | issue bound % H100 / H200 | ceiling % H100 / H200 |" if gpu else ""
    out = ["", f"## {target}: every variant", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        k = kernels[r["kernel"]]
        acc = r["hot_accesses"]
        line = (f"| {r['entry']} | {r['dtype']} | {_k(r['V'])} | {r['features']} | {r['choice']} | {r['config']} | "
                f"{k['registers']} | {k['spill_store_bytes']}/{k['spill_load_bytes']} | {k['shared_bytes']} | "
                f"{k['occupancy']['ctas_per_sm']} | {_widths(acc.get('logits loads', {}))} | "
                f"{_widths(acc.get('gradient stores', {}))} | {_widths(acc.get('weights loads', {}))} | "
                f"{r['instr_per_logit']:.1f} | {r['mufu_per_logit']:.2f} |")
        if gpu:
            h100, h200 = r["gpus"]["H100"], r["gpus"]["H200"]
            line += (f" {h100['hbm_reads_per_logit']:.2f}+{h100['hbm_writes_per_logit']:.0f} | "
                     f"{_pct(h100['issue'])} / {_pct(h200['issue'])} | {_pct(h100['ceiling'])} / "
                     f"{_pct(h200['ceiling'])} |")
        out.append(line)
    return out

