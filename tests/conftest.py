import os
import pickle
import random
import re
import sys
from importlib import metadata

import pytest
import torch
from packaging.markers import Marker

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    # Triton kernels run on CPU only through the interpreter, which is read when @triton.jit
    # decorates: it must be on before any test module imports a kernel module. A CUDA machine
    # runs them compiled, on CUDA tensors.
    if not HAS_CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Inductor writes its default cache directory into os.environ the first time it is asked
    # (importing torch._dynamo.testing asks): asked here, before any test module is imported, that
    # write is not taken for a module's (see pytest_make_collect_report).
    from smoothce import compat

    compat.inductor_cache_dir()


def installed_versions(*roots: tuple[str, tuple[str, ...]]) -> dict[str, str]:
    """{distribution: version} of each (distribution, extras) root and of every distribution it
    requires, transitively, as installed; what is not installed is left out."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name, wanted = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in found:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found[key] = dist.version
        for req in dist.requires or ():
            spec, _, marker = req.partition(";")
            if marker.strip():
                env_extras = wanted or ("",)
                if not any(Marker(marker).evaluate({"extra": e}) for e in env_extras):
                    continue
            todo.append((re.split(r"[\s<>=!~\[(;]", spec.strip(), maxsplit=1)[0], ()))
    return found


def pytest_report_header(config):
    # When a new release of a dependency breaks the suite, the log says which versions ran.
    # smoothce's own metadata may be missing (a GPU machine's --target install): the four whose
    # releases matter most are named as well.
    versions = installed_versions(("smoothce", ("test",)), *((name, ()) for name in
                                                             ("torch", "triton", "transformers", "accelerate")))
    return "installed: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def _process_state() -> dict:
    """What importing a test module must leave as it found it: the random generators (torch's,
    Python's, numpy's and CUDA's where in use) and each environment variable."""
    state = {"torch's generator": torch.random.get_rng_state().numpy().tobytes(),
             "Python's random": random.getstate()}
    if "numpy" in sys.modules:
        state["numpy's generator"] = pickle.dumps(sys.modules["numpy"].random.get_state())
    if torch.cuda.is_initialized():
        state["CUDA's generators"] = [t.numpy().tobytes() for t in torch.cuda.get_rng_state_all()]
    state.update((f"os.environ[{k!r}]", v) for k, v in os.environ.items())
    return state


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A test module that draws from a global generator or writes the environment at import makes
    # every later test's inputs depend on which files were collected: its collection fails instead.
    if not isinstance(collector, pytest.Module):
        yield
        return
    before = _process_state()
    outcome = yield
    after = _process_state()
    changed = [k for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]
    report = outcome.get_result()
    if changed and report.passed:
        report.outcome = "failed"
        report.longrepr = f"importing {collector.path.name} changed process-wide state: {', '.join(changed)}"


@pytest.fixture
def device() -> str:
    """Where kernel tests put their tensors: CUDA when the machine has it, else the CPU (the
    Triton kernel then runs through the interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _same_random_state():
    # A test that draws from the global generators gets the same inputs whichever tests ran before it.
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles from scratch: no cached graphs or recompile counters leak between tests.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _ranks(world: int):
    from ranks import Ranks

    group = Ranks(world)
    yield group
    group.close()


@pytest.fixture(scope="session")
def ranks2():
    """Two CPU processes in a gloo process group (tests/ranks.py), started once per session."""
    yield from _ranks(2)


@pytest.fixture(scope="session")
def ranks4():
    """Four CPU processes in a gloo process group (tests/ranks.py), started once per session."""
    yield from _ranks(4)
