"""``python -m benchmarks``: run the suite, print the table, write JSON and plots."""

from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks.harness import DTYPES

DEFAULT_CASES = ("ce", "head")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _ints(text: str) -> tuple:
    return tuple(int(x) for x in text.split(","))


def _floats(text: str) -> tuple:
    return tuple(float(x) for x in text.split(","))


def _names(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Cross-entropy loss + gradient: smoothce against PyTorch eager, Inductor, "
                    "F.linear_cross_entropy, Liger-Kernel and Quack, on the same inputs in the same process.",
    )
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when available (default)")
    ap.add_argument("--case", type=_names, default=DEFAULT_CASES,
                    help="comma list of cases (default: ce,head); see --list")
    ap.add_argument("--methods", type=_names, default=None,
                    help="comma list of methods (default: all); see --list")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing")
    ap.add_argument("--out", default=None,
                    help="directory for the JSON and PNGs (default: benchmarks/results/; with --from-json, "
                         "the record's directory)")
    ap.add_argument("--no-plots", action="store_true", help="write no PNGs")
    ap.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    ap.add_argument("--no-compile-time", action="store_true", help="skip the compile-time comparison")
    ap.add_argument("--n", type=_ints, default=None, help="override rows N, e.g. 1024,4096")
    ap.add_argument("--v", type=_ints, default=None, help="override vocabulary sizes V")
    ap.add_argument("--d", type=int, default=None, help="override the hidden size D (cases with one)")
    ap.add_argument("--dtypes", type=_names, default=None, help=f"override dtypes ({', '.join(DTYPES)})")
    ap.add_argument("--smoothing", type=_floats, default=None, help="override label smoothing values (default 0,0.1)")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="seconds of timed runs per row (default 1.0, --quick 0.3; GPU: do_bench rep)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's default). On a shared machine 1 "
                         "avoids OpenMP workers spinning against other processes")
    ap.add_argument("--busy", type=int, default=0, metavar="K",
                    help="keep K other processes spinning on the CPU for the whole run (the CPU promises "
                         "hold on a shared machine too); recorded in the JSON")
    ap.add_argument("--note", action="append", default=[], help="free text stored in the JSON (repeatable)")
    ap.add_argument("--commit", default=None,
                    help="the commit being measured, recorded where the checkout has no git metadata")
    ap.add_argument("--from-json", metavar="PATH", default=None,
                    help="measure nothing: print the table of a written record and draw its plots "
                         "(into --out, default: beside the record)")
    ap.add_argument("--list", action="store_true", help="list cases and methods, then exit")
    return ap.parse_args(argv)


def _error(text: str) -> int:
    print(f"error: {text}", file=sys.stderr)
    return 2


def _render(record: dict, out: str, stem: str, plots: bool) -> None:
    from benchmarks import report

    if plots:
        for f in report.plot(record, out, stem):
            print(f"wrote {f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from benchmarks import report
    from benchmarks.cases import all_cases

    cases = all_cases()
    if args.list:
        for case in cases.values():
            print(f"{case.name}: {case.title}")
            for m in case.methods.values():
                print(f"    {m.name:<30} {m.label}")
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            record = json.load(f)
        print(report.table(record))
        out = args.out or os.path.dirname(args.from_json) or "."
        _render(record, out, os.path.basename(args.from_json).removesuffix(".json"), not args.no_plots)
        return 0
    unknown = [c for c in args.case if c not in cases]
    if unknown:
        return _error(f"unknown case(s) {unknown}; choose from {', '.join(cases)}")
    if args.methods is not None:
        known = {name for case in args.case for name in cases[case].methods}
        bad = [m for m in args.methods if m not in known]
        if bad:
            return _error(f"unknown method(s) {bad} for case(s) {','.join(args.case)}; "
                          f"choose from {', '.join(sorted(known))}")
    if args.dtypes:
        bad = [d for d in args.dtypes if d not in DTYPES]
        if bad:
            return _error(f"unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
    import torch

    from benchmarks import runner

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return _error("--device cuda but torch.cuda.is_available() is False")
    if args.busy < 0:
        return _error(f"--busy must be >= 0, got {args.busy}")
    if args.threads is not None:
        if args.threads < 1:
            return _error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    min_run_time = args.min_run_time or (0.3 if args.quick else 1.0)
    opts = runner.Options(
        device=device,
        cases=args.case,
        methods=args.methods,
        quick=args.quick,
        memory=not args.no_memory,
        compile_time=not args.no_compile_time,
        min_run_time=min_run_time,
        grid_overrides={"ns": args.n, "vs": args.v, "d": args.d, "dtypes": args.dtypes,
                        "smoothings": args.smoothing},
        commit=args.commit,
    )
    config = {
        "cases": list(args.case), "methods": list(args.methods) if args.methods else None, "quick": args.quick,
        "min_run_time_s": min_run_time, "threads": torch.get_num_threads(),
        "busy_processes": args.busy,
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    out = args.out or RESULTS_DIR
    suffix = "" if tuple(args.case) == DEFAULT_CASES else "-" + "-".join(args.case)
    suffix += f"-busy{args.busy}" if args.busy else ""
    paths = {}

    def save(record: dict) -> str:
        # The first save names the file (the date in its name is the run's start).
        if not paths:
            stem = report.basename(record, suffix + ("-quick" if args.quick else ""))
            paths.update(stem=stem, json=os.path.join(out, stem + ".json"))
        report.write_json({**record, "config": config, "notes": args.note}, paths["json"])
        return paths["json"]

    from benchmarks.load import busy

    with busy(args.busy):
        record = runner.run(opts, checkpoint=save)
    path = save(record)
    record = {**record, "config": config, "notes": args.note}
    print(report.table(record))
    print(f"\nwrote {path}")
    _render(record, out, paths["stem"], not args.no_plots)
    return 0
