"""Download the wheels a lent GPU machine lacks, and pack them into parts that travel one per call.

    python -m benchmarks.gpu.fetch_wheels [--out .wheels] [--part-mib 56] [--without quack]

Run from the repository root where a package registry is reachable. The GPU machine's image has
torch, triton, transformers, accelerate, matplotlib, pytest, pytest-xdist, numpy, einops, protobuf
and cuda-bindings; what it lacks is listed in :data:`WHEELS`, pinned to the versions the committed
GPU figures name. Wheels are downloaded for that machine's interpreter (:data:`TARGET`, not this
one's) into ``<out>/download/`` (kept, so a second run downloads nothing) and packed into
``<out>/part1/``, ``<out>/part2/``, ... each at most ``--part-mib`` (a wheel larger than that is
cut into pieces that ``check`` joins again). ``<out>`` is ignored by git: wheels are never
committed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from benchmarks.gpu import bundle

# The GPU machine's interpreter: CPython 3.12 on x86-64 Linux (glibc 2.28 or newer).
TARGET = {
    "python_version": "3.12",
    "implementation": "cp",
    "platforms": ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                  "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"],
}

# (requirement, group, why), in the order they are packed: the small, most needed ones first, so
# the first part alone already runs the tests and Liger.
WHEELS = (
    ("expecttest==0.3.0", "tests", "the test suite's graph goldens"),
    ("liger-kernel==0.8.5", "liger", "peer: Liger-Kernel"),
    ("cut-cross-entropy==25.1.1", "cce", "peer: Cut Cross-Entropy (head case)"),
    ("quack-kernels==0.6.5", "quack", "peer: Quack"),
    ("apache-tvm-ffi==0.1.15.post2", "quack", "Quack's kernel launcher"),
    ("torch-c-dlpack-ext==0.1.5", "quack", "Quack's tensor exchange"),
    ("nvidia-cutlass-dsl==4.8.1", "quack", "CuTe DSL, which Quack's kernels are written in"),
    ("nvidia-cutlass-dsl-libs-core==4.8.1", "quack", "CuTe DSL"),
    ("nvidia-cutlass-dsl-libs-base==4.8.1", "quack", "CuTe DSL"),
    ("nvidia-cutlass-dsl-libs-cu13==4.8.1", "quack", "CuTe DSL for CUDA 13 (the image's torch is cu130)"),
)


def pip_download(requirements: list[str], dest: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", TARGET["python_version"], "--implementation", TARGET["implementation"],
           *(arg for platform in TARGET["platforms"] for arg in ("--platform", platform)),
           "--dest", dest, *requirements]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def wheel_file(requirement: str, folder: str) -> str | None:
    """The downloaded wheel of a pinned requirement (wheel names normalise '-' to '_')."""
    name, version = requirement.split("==")
    prefix = f"{name.replace('-', '_')}-{version}-"
    matches = sorted(f for f in os.listdir(folder) if f.lower().startswith(prefix.lower()) and f.endswith(".whl"))
    return os.path.join(folder, matches[0]) if matches else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.fetch_wheels", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".wheels", help="bundle folder (default: %(default)s, ignored by git)")
    ap.add_argument("--part-mib", type=float, default=56.0,
                    help="largest part in MiB (default: %(default)s: one call carries 64 MiB with the checkout)")
    ap.add_argument("--without", default="", help="comma list of groups to leave out: "
                    + ", ".join(dict.fromkeys(group for _, group, _ in WHEELS)))
    args = ap.parse_args(argv)
    groups = {group for _, group, _ in WHEELS}
    without = {g.strip() for g in args.without.split(",") if g.strip()}
    if without - groups:
        print(f"error: unknown group(s) {sorted(without - groups)}; choose from {', '.join(sorted(groups))}",
              file=sys.stderr)
        return 2
    wanted = [req for req, group, _ in WHEELS if group not in without]
    download = os.path.join(args.out, "download")
    os.makedirs(download, exist_ok=True)
    absent = [req for req in wanted if wheel_file(req, download) is None]
    if absent:
        pip_download(absent, download)
    wheels = [wheel_file(req, download) for req in wanted]
    if None in wheels:
        print(f"error: pip saved no wheel for {[r for r, w in zip(wanted, wheels) if w is None]}", file=sys.stderr)
        return 1
    parts = bundle.pack(wheels, args.out, int(args.part_mib * bundle.MIB), TARGET)
    for part in parts:
        names = [p["wheel"] if p["count"] == 1 else f"{p['wheel']} (piece {p['index'] + 1}/{p['count']})"
                 for p in part.pieces]
        print(f"{args.out}/{part.name}: {part.size / bundle.MIB:.1f} MiB: {', '.join(names)}")
    print(f"carry one part per call ({', '.join(f'{args.out}/{p.name}' for p in parts)}), "
          "then run `python3 -m benchmarks.gpu.check` (benchmarks/README.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
