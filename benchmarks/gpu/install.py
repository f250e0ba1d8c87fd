"""Install this checkout and the carried wheels into a folder of their own, without a registry.

The wheels are installed with ``pip install --no-index --target <env>/site`` for the interpreter
they were fetched for, so the machine's own packages stay as they were. A ``--target`` install
does not run the packages' ``.pth`` files (the CuTe DSL adds its own folder to the path through
one): the path entries they add are read once here and recorded in ``<env>/env.json``, and every
later process gets them through ``PYTHONPATH`` (:func:`import_path`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from benchmarks.gpu import bundle
from benchmarks.gpu.process import run, status

SITE_PATH_PROBE = """
import json, site, sys
before = list(sys.path)
site.addsitedir(sys.argv[1])
print(json.dumps([p for p in sys.path if p not in before]))
"""


def install(env_dir: str, wheels_dir: str, log: str, deadline: float) -> dict:
    """{"status", "detail"}: join the bundle's parts that have arrived, build this checkout's
    wheel and install them all into ``<env_dir>/site``."""
    unpacked = bundle.unpack(wheels_dir, os.path.join(env_dir, "wheels"))
    dist = os.path.join(env_dir, "dist")
    shutil.rmtree(dist, ignore_errors=True)
    rc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
              "--wheel-dir", dist, "."], log, deadline)
    if rc != 0:
        return {"status": f"building the project's wheel {status(rc)}", "detail": log}
    target = []
    if unpacked.target:  # for the interpreter the wheels were fetched for
        t = unpacked.target
        target = ["--only-binary=:all:", "--python-version", t["python_version"], "--implementation",
                  t["implementation"], *(a for p in t["platforms"] for a in ("--platform", p))]
    site = os.path.abspath(os.path.join(env_dir, "site"))
    wheels = unpacked.wheels + [os.path.join(dist, f) for f in os.listdir(dist)]
    rc = run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--upgrade",
              "--disable-pip-version-check", "--target", site, *target, *wheels], log, deadline)
    if rc != 0:
        return {"status": f"pip install {status(rc)}", "detail": log}
    probe = subprocess.run([sys.executable, "-c", SITE_PATH_PROBE, site], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    path = json.loads(probe.stdout) if probe.returncode == 0 else [site]
    with open(os.path.join(env_dir, "env.json"), "w") as f:
        json.dump({"path": path, "wheels": [os.path.basename(w) for w in wheels], "missing": unpacked.missing},
                  f, indent=1)
    detail = f"{len(wheels)} wheels installed"
    if unpacked.missing:
        detail += "; not yet here: " + "; ".join(unpacked.missing)
    return {"status": "ok", "detail": detail}


def import_path(env_dir: str) -> list[str] | None:
    """The path entries an earlier :func:`install` recorded, or None when nothing is installed."""
    try:
        with open(os.path.join(env_dir, "env.json")) as f:
            return json.load(f)["path"]
    except (OSError, ValueError, KeyError):
        return None
