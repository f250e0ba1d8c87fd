"""The README's two set-up commands are what CI runs and what the package provides."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _setup_commands():
    block = re.search(r"## Try it.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_demo_and_test_commands():
    demo, tests = _setup_commands()
    assert demo.endswith("python -m smoothce demo")
    assert tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    _, tests = _setup_commands()
    install, run = (part.strip() for part in tests.split("&&"))
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m " + install in ci  # same requirement spec, through the same interpreter
    assert re.search(r"^" + re.escape(run) + r"$", ci, re.M)
