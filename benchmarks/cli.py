"""``python -m benchmarks``: run the suite, print the table, write JSON and plots."""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks.harness import CASES, DTYPES

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
                    "F.linear_cross_entropy and Liger-Kernel, on the same inputs in the same process.",
    )
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when available (default)")
    ap.add_argument("--case", type=_names, default=DEFAULT_CASES,
                    help=f"comma list of {', '.join(CASES)} (default: ce,head; step is the CPU "
                         "smoothce-vs-Inductor comparison)")
    ap.add_argument("--methods", type=_names, default=None,
                    help="comma list of methods (default: all); see --list")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing")
    ap.add_argument("--out", default=RESULTS_DIR, help="directory for the JSON and PNGs (default: %(default)s)")
    ap.add_argument("--no-plots", action="store_true", help="write no PNGs")
    ap.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    ap.add_argument("--no-compile-time", action="store_true", help="skip the compile-time comparison")
    ap.add_argument("--n", type=_ints, default=None, help="override rows N, e.g. 1024,4096")
    ap.add_argument("--v", type=_ints, default=None, help="override vocabulary sizes V")
    ap.add_argument("--d", type=int, default=None, help="override the head case's hidden size D")
    ap.add_argument("--dtypes", type=_names, default=None, help=f"override dtypes ({', '.join(DTYPES)})")
    ap.add_argument("--smoothing", type=_floats, default=None, help="override label smoothing values (default 0,0.1)")
    ap.add_argument("--min-run-time", type=float, default=None,
                    help="seconds of timed runs per row (default 1.0, --quick 0.3; GPU: do_bench rep)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's default). On a shared machine 1 "
                         "avoids OpenMP workers spinning against other processes")
    ap.add_argument("--note", action="append", default=[], help="free text stored in the JSON (repeatable)")
    ap.add_argument("--list", action="store_true", help="list cases and methods, then exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from benchmarks import report, runner

    if args.list:
        for case in CASES:
            print(f"{case}: {report.CASE_TITLES[case]}")
            for m in runner.methods_for(case).values():
                print(f"    {m.name:<24} {m.label}")
        return 0
    unknown = [c for c in args.case if c not in CASES]
    if unknown:
        print(f"error: unknown case(s) {unknown}; choose from {', '.join(CASES)}", file=sys.stderr)
        return 2
    if args.methods is not None:
        known = {name for case in args.case for name in runner.methods_for(case)}
        bad = [m for m in args.methods if m not in known]
        if bad:
            print(f"error: unknown method(s) {bad} for case(s) {','.join(args.case)}; "
                  f"choose from {', '.join(sorted(known))}", file=sys.stderr)
            return 2
    if args.dtypes:
        bad = [d for d in args.dtypes if d not in DTYPES]
        if bad:
            print(f"error: unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}", file=sys.stderr)
            return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
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
    )
    record = runner.run(opts)
    record["config"] = {
        "cases": list(args.case), "methods": list(args.methods) if args.methods else None, "quick": args.quick,
        "min_run_time_s": min_run_time, "threads": torch.get_num_threads(), "argv": sys.argv[1:] if argv is None else list(argv),
    }
    record["notes"] = args.note
    print(report.table(record))
    suffix = "" if tuple(args.case) == DEFAULT_CASES else "-" + "-".join(args.case)
    stem = report.basename(record, suffix + ("-quick" if args.quick else ""))
    path = os.path.join(args.out, stem + ".json")
    report.write_json(record, path)
    print(f"\nwrote {path}")
    if not args.no_plots:
        for f in report.plot(record, args.out, stem):
            print(f"wrote {f}")
    return 0
