"""The one command for a lent GPU machine: install, test and measure, most valuable first.

    python3 -m benchmarks.gpu.check [--phases install,ce,tests,head,llama] [--budget 570]
        [--phase-budgets tests=400] [--out gpu-check] [--archive PATH.tar.gz] [--wheels .wheels]
        [--commit SHA] [--pytest-args ARGS] [--smoke]

Run from the repository root with the machine's own python3 (torch, triton, transformers,
matplotlib, pytest there); nothing is fetched. Phases, in the default order:

    install  join the bundle parts that have arrived (benchmarks.gpu.fetch_wheels), build this
             checkout's wheel, install both into <out>/env/site (nothing outside <out> changes)
             and record the import path; runs first by itself when no earlier call installed
    ce       python -m benchmarks --case ce: bf16, N = 8192, V = 32K/128K/256K, eps 0 and 0.1,
             smoothce against Quack, Liger, Inductor and eager
    tests    python -m pytest, the whole suite (-n 8 with pytest-xdist), with a JUnit report
    head     python -m benchmarks --case head at N = 16384, D = 4096, V = 128K, bf16
    llama    python -m benchmarks --case llama (where this checkout has the case)

Each phase runs in its own process group, stopped at min(its budget, what is left of --budget).
A benchmark stopped part way leaves the rows it finished (its JSON is rewritten after every
shape) and is drawn from them. After every phase <out>/summary.md, and the --archive of <out>
(without the installed packages), are rewritten, so whatever ends the call, what was measured
is kept. Phases can run in separate calls: results and the install persist in <out>.

--smoke runs the same phases on a machine without a GPU: the Triton kernels under
TRITON_INTERPRET=1, tiny shapes and a short test selection, to prove the command before a GPU is
spent on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Callable

from benchmarks.gpu.install import import_path, install
from benchmarks.gpu.process import REPO_ROOT, run, status

# Shapes of the benchmark phases on a GPU, as the issues that set the targets name them; --smoke
# replaces them by tiny ones.
BENCH_ARGS = {
    "ce": ["--min-run-time", "0.5"],
    "head": ["--n", "16384", "--d", "4096", "--v", "131072", "--dtypes", "bfloat16", "--min-run-time", "0.5"],
    "llama": [],
}
SMOKE_BENCH_ARGS = {  # CPU peak memory takes a fresh process per row: left out of the smoke run
    "ce": ["--device", "cpu", "--n", "64", "--v", "512,1024", "--min-run-time", "0.01", "--no-memory"],
    "head": ["--device", "cpu", "--n", "64", "--d", "32", "--v", "512", "--min-run-time", "0.01", "--no-memory"],
    "llama": ["--device", "cpu", "--n", "64", "--v", "512", "--d", "32", "--min-run-time", "0.01", "--no-memory"],
}
SMOKE_TESTS = ["tests/test_benchmarks_smoke.py"]
REDRAW_S = 30  # for drawing the plots of a benchmark stopped at its limit
RESERVE_S = REDRAW_S + 15  # kept back from the budget: a redraw, the summary and the archive
MIN_PHASE_S = 30  # a phase with less time than this left is skipped


@dataclasses.dataclass
class Context:
    out: str
    smoke: bool
    commit: str | None
    wheels: str
    pytest_args: list | None
    deadline: float  # time.monotonic() by which every phase has ended

    @property
    def env_dir(self) -> str:
        return os.path.join(self.out, "env")

    @property
    def results(self) -> str:
        return os.path.join(self.out, "results")

    @property
    def logs(self) -> str:
        return os.path.join(self.out, "logs")

    def log(self, phase: str) -> str:
        return os.path.join(self.logs, f"{phase}.log")

    def child_env(self, kernels: bool = False) -> dict:
        """The environment of the phases' processes: the installed packages first on the path;
        under --smoke, for the benchmarks, smoothce's Triton kernels in the interpreter."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
        path = import_path(self.env_dir)
        if path:
            env["PYTHONPATH"] = os.pathsep.join(path)
        if self.smoke and kernels:
            env.update(TRITON_INTERPRET="1", SMOOTHCE_KERNEL="triton")
        return env


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Phases: each returns {"status": ..., "detail": ...}


ENVIRONMENT_PROBE = """
import importlib, importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e: print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
else:
    print("device: no CUDA device")
for name in ("smoothce", "expecttest", "liger-kernel", "cut-cross-entropy", "quack-kernels",
             "nvidia-cutlass-dsl", "transformers", "matplotlib", "pytest", "pytest-xdist"):
    try: print(name, md.version(name))
    except md.PackageNotFoundError: print(name, "not installed")
for module in ("smoothce", "liger_kernel.transformers", "cut_cross_entropy", "quack.cross_entropy"):
    try: importlib.import_module(module); print("import", module, "ok")
    except Exception as e: print("import", module, "FAILS:", type(e).__name__, str(e)[:200])
"""


def install_phase(ctx: Context) -> dict:
    result = install(ctx.env_dir, ctx.wheels, ctx.log("install"), ctx.deadline)
    environment = os.path.join(ctx.logs, "environment.log")
    run([sys.executable, "-c", ENVIRONMENT_PROBE], environment, ctx.deadline, ctx.child_env())
    if shutil.which("nvidia-smi"):
        run(["nvidia-smi"], environment, ctx.deadline)
    return result


def tests(ctx: Context) -> dict:
    junit = os.path.join(ctx.results, "pytest.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={junit}"]
    env = ctx.child_env()
    if not ctx.smoke and subprocess.run([sys.executable, "-c", "import xdist"], env=env,
                                        capture_output=True).returncode == 0:
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]
    cmd += ctx.pytest_args if ctx.pytest_args is not None else (SMOKE_TESTS if ctx.smoke else [])
    rc = run(cmd, ctx.log("tests"), ctx.deadline, env)
    detail = ctx.log("tests")
    try:
        suites = ElementTree.parse(junit).getroot()
        counts = {k: sum(int(s.get(k, 0)) for s in suites.iter("testsuite"))
                  for k in ("tests", "failures", "errors", "skipped")}
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        detail = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
                  f"{counts['skipped']} skipped")
    except (OSError, ElementTree.ParseError):
        pass
    return {"status": "some tests failed" if rc == 1 else status(rc), "detail": detail}


def available_cases(ctx: Context) -> list[str]:
    probe = subprocess.run([sys.executable, "-m", "benchmarks", "--list"], cwd=REPO_ROOT, env=ctx.child_env(),
                           capture_output=True, text=True)
    return [line.split(":", 1)[0] for line in probe.stdout.splitlines() if line and not line.startswith(" ")]


def records_of(case: str, folder: str, since: float) -> list[str]:
    """The benchmark records of ``case`` alone written in ``folder`` since ``since``."""
    out = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".json") and os.path.getmtime(path) >= since:
            config = (read_json(path) or {}).get("config") or {}
            if config.get("cases") == [case]:
                out.append(path)
    return out


def benchmark(case: str) -> Callable[[Context], dict]:
    def phase(ctx: Context) -> dict:
        if case not in available_cases(ctx):
            return {"status": "skipped", "detail": f"this checkout has no benchmark case {case!r}"}
        env = ctx.child_env(kernels=True)
        cmd = [sys.executable, "-m", "benchmarks", "--case", case, "--no-compile-time", "--out", ctx.results,
               *(SMOKE_BENCH_ARGS if ctx.smoke else BENCH_ARGS)[case]]
        if ctx.commit:
            cmd += ["--commit", ctx.commit]
        started = time.time()
        rc = run(cmd, ctx.log(case), ctx.deadline, env)
        records = records_of(case, ctx.results, started)
        if not records:
            return {"status": status(rc), "detail": f"no record written; see {ctx.log(case)}"}
        record = max(records, key=os.path.getmtime)
        if rc != 0:  # the plots are drawn at the end of a run: draw them from the rows it finished
            run([sys.executable, "-m", "benchmarks", "--from-json", record], ctx.log(case),
                time.monotonic() + REDRAW_S, env)
        return {"status": status(rc), "detail": os.path.relpath(record, ctx.out), "record": record}

    return phase


PHASES: dict[str, tuple[int, Callable[[Context], dict]]] = {  # name -> (budget in seconds, run)
    "install": (120, install_phase),
    "ce": (300, benchmark("ce")),
    "tests": (300, tests),
    "head": (240, benchmark("head")),
    "llama": (180, benchmark("llama")),
}


# ---------------------------------------------------------------------------------------------
# Summary and archive


def summary(ctx: Context, done: dict) -> str:
    from benchmarks import report

    lines = ["# GPU check", "", f"commit: {ctx.commit or 'not given'}; smoke: {ctx.smoke}", "",
             "| phase | status | seconds | detail |", "|---|---|---|---|"]
    for name, result in done.items():
        lines.append(f"| {name} | {result['status']} | {result.get('seconds', 0):.0f} | {result.get('detail', '')} |")
    environment = os.path.join(ctx.logs, "environment.log")
    if os.path.exists(environment):
        with open(environment) as f:
            lines += ["", "## Environment", "", "```", *[line.rstrip() for line in f][:40], "```"]
    for name, result in done.items():
        record = read_json(result.get("record", ""))
        if record:
            share = any(r.get("copy_share") for r in record["rows"])
            copy = f" and % of the copy bandwidth ({record['device']['copy_Bps'] / 1e9:,.0f} GB/s)" if share else ""
            lines += ["", f"## {name}: time ms{copy}", "", "```", report.digest(record), "```"]
    return "\n".join(lines) + "\n"


def archive(out: str, path: str) -> None:
    """``out`` as a .tar.gz, without the installed packages; written beside and then renamed, so
    a reader never sees half an archive."""
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for entry in sorted(os.listdir(out)):
            if entry != "env":
                tar.add(os.path.join(out, entry), arcname=os.path.join(os.path.basename(out), entry))
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu.check", description=__doc__.splitlines()[0])
    ap.add_argument("--phases", default="install,ce,tests,head,llama",
                    help=f"comma list, run in this order (default: %(default)s); known: {', '.join(PHASES)}")
    ap.add_argument("--budget", type=float, default=570, help="seconds for all phases together (default: %(default)s)")
    ap.add_argument("--phase-budgets", default="",
                    help="seconds per phase instead of the defaults, e.g. tests=600,ce=400 (defaults: "
                         + ", ".join(f"{name}={budget}" for name, (budget, _) in PHASES.items()) + ")")
    ap.add_argument("--out", default="gpu-check", help="results, logs and the install (default: %(default)s)")
    ap.add_argument("--archive", default=None, help="also write <out> as this .tar.gz after every phase")
    ap.add_argument("--wheels", default=".wheels", help="the bundle of parts (default: %(default)s)")
    ap.add_argument("--commit", default=None, help="the commit of this checkout, recorded in the results")
    ap.add_argument("--pytest-args", default=None, help="arguments for pytest instead of the whole suite")
    ap.add_argument("--smoke", action="store_true", help="no GPU: interpreter, tiny shapes, few tests")
    args = ap.parse_args(argv)
    started = time.monotonic()
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    budgets = {name: budget for name, (budget, _) in PHASES.items()}
    try:
        given = dict(item.split("=") for item in args.phase_budgets.split(",") if item.strip())
        budgets.update({name.strip(): float(seconds) for name, seconds in given.items()})
    except ValueError:
        print(f"error: --phase-budgets {args.phase_budgets!r}: expected name=seconds,...", file=sys.stderr)
        return 2
    unknown = [p for p in phases + list(budgets) if p not in PHASES]
    if unknown:
        print(f"error: unknown phase(s) {unknown}; choose from {', '.join(PHASES)}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    ctx = Context(out, args.smoke, args.commit, os.path.abspath(args.wheels),
                  shlex.split(args.pytest_args) if args.pytest_args is not None else None,
                  started + args.budget - RESERVE_S)
    for folder in (ctx.results, ctx.logs, ctx.env_dir):
        os.makedirs(folder, exist_ok=True)
    if "install" not in phases and import_path(ctx.env_dir) is None:
        phases.insert(0, "install")  # a fresh machine: nothing installed by an earlier call
    done_path = os.path.join(out, "phases.json")
    done = read_json(done_path) or {}  # earlier calls' phases, kept in the summary
    for name in phases:
        budget, phase = budgets[name], PHASES[name][1]
        left = ctx.deadline - time.monotonic()
        print(f"== {name}: budget {budget:.0f} s, {left:.0f} s left", flush=True)
        t0 = time.monotonic()
        if left < MIN_PHASE_S:
            result = {"status": "skipped", "detail": f"{left:.0f} s left of --budget"}
        else:
            ctx.deadline, whole = min(ctx.deadline, t0 + budget), ctx.deadline
            try:
                result = phase(ctx)
            except Exception as exc:  # a broken phase must not cost the ones after it
                result = {"status": f"error: {type(exc).__name__}: {exc}"[:300]}
            ctx.deadline = whole
        result["seconds"] = time.monotonic() - t0
        done.pop(name, None)
        done[name] = result
        print(f"   {result['status']} ({result['seconds']:.0f} s): {result.get('detail', '')}", flush=True)
        with open(done_path, "w") as f:
            json.dump(done, f, indent=1)
        text = summary(ctx, done)
        with open(os.path.join(out, "summary.md"), "w") as f:
            f.write(text)
        if args.archive:
            archive(out, args.archive)
    print()
    print(text)
    print(f"results in {out}" + (f"; archive {args.archive}" if args.archive else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
