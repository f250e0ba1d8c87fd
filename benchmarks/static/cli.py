"""``python -m benchmarks.static``: compile every kernel variant for GPUs this machine need not have,
read the binaries, write the record (JSON) and its table (Markdown)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

from benchmarks.static import variants
from benchmarks.static.model import GPUS

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
ARCHS = (90, 80, 100)
# The few calls CI compiles: the fixed choices of the op and of the fused head's chunk (one pass
# over a few rows, one pass over one row, two passes), plain and with every feature, with a gradient.
CI = dict(entries=("op", "head"), dtypes=variants.DTYPES, vs=(1024, 4096, 131072), features=("plain", "all"),
          choices=("fixed",), archs=(90,))


def _names(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple:
    return tuple(int(x) for x in _names(text))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.static",
        description="Compile every variant of smoothce's Triton kernels for sm_90 (and sm_80, sm_100) on this "
                    "machine, GPU or not, and report registers, spills, shared memory, occupancy, access widths, "
                    "instructions per logit, memory traffic and ceilings against H100 / H200 copy bandwidth.")
    ap.add_argument("--archs", type=_ints, default=ARCHS, help="compute capabilities (default 90,80,100)")
    ap.add_argument("--entries", type=_names, default=tuple(variants.ENTRIES), help="default: all")
    ap.add_argument("--dtypes", type=_names, default=variants.DTYPES)
    ap.add_argument("--v", type=_ints, default=variants.VS, help="vocabulary sizes")
    ap.add_argument("--features", type=_names, default=(*variants.FEATURES, *variants.SOFT_FEATURES),
                    help="default: all (the soft entries take their own: kd, probs, symmetric, mixup, probs_all)")
    ap.add_argument("--choices", type=_names, default=("fixed", "tuned"))
    ap.add_argument("--ci", action="store_true", help="the small set the test suite compiles (sm_90 only)")
    ap.add_argument("--out", default=RESULTS_DIR, help="directory of the record (default benchmarks/results/)")
    ap.add_argument("--name", default=None, help="file stem (default static-<date>-<targets>-triton-<version>)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a variant misses a target")
    ap.add_argument("--commit", default=None, help="the commit, where the checkout has no git metadata")
    args = ap.parse_args(argv)
    if args.ci:
        args.entries, args.dtypes, args.v, args.features = CI["entries"], CI["dtypes"], CI["vs"], CI["features"]
        args.choices, args.archs = CI["choices"], CI["archs"]
    return args


def build(args) -> dict:
    import torch
    import triton

    from benchmarks.runner import git_commit
    from benchmarks.static import record
    from smoothce.kernels.triton_target import GPUTarget

    todo = [c for c in variants.calls(args.entries, args.dtypes, args.v, args.features) if c.choice in args.choices]
    kernels, rows, skipped, index = {}, [], {}, {}
    start = time.time()
    # Compiled afresh, never taken from Triton's cache: a binary cached from another copy of the same
    # sources carries that copy's file paths and line numbers, and the accesses' roles are read there.
    with tempfile.TemporaryDirectory() as cache, triton.knobs.cache.scope():
        triton.knobs.cache.dir = cache
        for arch in args.archs:
            target = GPUTarget("cuda", arch, 32)
            for n, call in enumerate(todo):
                try:
                    compiled = variants.compile_call(call, target)
                except Exception as e:  # a target this Triton cannot compile for
                    if n == 0 and arch != 90:
                        skipped[f"sm_{arch}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        break
                    raise
                for kernel in compiled:
                    kid = f"sm_{arch}:{kernel.hash[:16]}"
                    if kid not in index:
                        index[kid] = record.kernel_record(kernel, arch)
                    rows.append(record.row(call, arch, kid, index[kid]))
                print(f"[{time.time() - start:6.0f} s] sm_{arch} {call.entry} {call.dtype} V={call.V} "
                      f"{call.features} {call.choice}: {len(compiled)} variant(s), {len(index)} kernels so far",
                      file=sys.stderr, flush=True)
    kernels = {kid: record.public(k) for kid, k in index.items()}
    commit = git_commit(args.commit)
    return {
        "about": {
            "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit["commit"], "dirty": commit["dirty"],
            "date": datetime.date.today().isoformat(),
            "command": "python -m benchmarks.static " + " ".join(sys.argv[1:]),
            "seconds": round(time.time() - start),
        },
        "targets": [f"sm_{a}" for a in args.archs],
        "skipped_targets": skipped,
        "entries": list(args.entries),
        "gpus": [vars(g) for g in GPUS],
        "kernels": kernels,
        "rows": rows,
    }


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("python -m benchmarks.static compiles the kernels: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    args = parse_args(argv)
    from benchmarks.static.table import markdown

    rec = build(args)
    import triton

    targets = "-".join(t.replace("_", "") for t in rec["targets"])
    stem = args.name or f"static-{rec['about']['date']}-{targets}-triton-{triton.__version__}"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, stem)
    with open(path + ".json", "w") as f:
        json.dump(rec, f, indent=1)
    with open(path + ".md", "w") as f:
        f.write(markdown(rec))
    missed = [r for r in rec["rows"] if not all(r["checks"].values())]
    print(f"wrote {path}.json and .md: {len(rec['rows'])} rows, {len(rec['kernels'])} kernels, "
          f"{len(missed)} rows missing a target", file=sys.stderr)
    return 1 if args.check and missed else 0
