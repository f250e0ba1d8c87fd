"""Run from a clone's root (``python -m pytest``, ``python -m smoothce demo``, ``python -c``), the
repository's folders must not hide another distribution's module of the same name: transformers
imports Hugging Face's ``kernels``, and ``kernels/`` is also this repository's folder.

Each check runs a fresh interpreter whose working directory is the root, as CI and contributors
run it: the root is then first on ``sys.path``."""

import os
import pathlib
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = ("compiler", "kernels", "patterns")  # installed as smoothce.<name>


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def test_the_package_folders_are_smoothce_modules():
    assert sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in ("benchmarks",)) \
        == sorted(PACKAGE_FOLDERS), "a new folder of the package: add it here and give it the guard"
    out = _python(f"""
        import importlib
        for name in {PACKAGE_FOLDERS!r}:
            print(importlib.import_module("smoothce." + name).__file__)
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(ROOT / n / "__init__.py") for n in PACKAGE_FOLDERS]


def test_a_bare_name_finds_another_distribution_or_nothing():
    out = _python(f"""
        import importlib
        for name in {PACKAGE_FOLDERS!r}:
            try:
                print(name, importlib.import_module(name).__file__)
            except ModuleNotFoundError as e:
                assert e.name == name, e
                print(name, "-")
    """)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        name, where = line.split()
        assert where == "-" or not pathlib.Path(where).resolve().is_relative_to(ROOT), line


def test_a_bare_name_finds_the_distribution_installed_under_it(tmp_path):
    # Stand-ins for distributions that picked these names (Hugging Face's kernels is one), on
    # sys.path after the root, as site-packages is; their submodules import too.
    for name in PACKAGE_FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'other {name}'\n")
        (tmp_path / name / "sub.py").write_text("from . import WHO\n")
    out = _python(f"""
        import importlib, sys
        assert sys.path[0] in ("", {str(ROOT)!r}), sys.path[:2]
        for name in {PACKAGE_FOLDERS!r}:
            print(importlib.import_module(name).WHO, importlib.import_module(name + ".sub").WHO)
    """, PYTHONPATH=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"other {n} other {n}" for n in PACKAGE_FOLDERS]


def test_no_installed_distribution_shares_a_name_the_root_or_tests_put_on_sys_path():
    # benchmarks/ is run as `python -m benchmarks` and tests/ helpers are imported by bare name
    # (pytest puts tests/ on sys.path): those must stay theirs, so no dependency may use the names.
    # The root's own modules (compat.py) would hide a distribution's module of the same name.
    names = {"benchmarks", "tests"} | {p.stem for p in (ROOT / "tests").glob("*.py")} | {p.stem for p in ROOT.glob("*.py")}
    taken = metadata.packages_distributions()
    assert {n: taken[n] for n in names if n in taken} == {}


def test_a_hugging_face_model_compiles_from_the_root():
    pytest.importorskip("transformers")
    out = _python("""
        import torch, transformers
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
        model = transformers.LlamaForCausalLM(config)
        ids = torch.randint(0, 64, (2, 8))
        eager = model(input_ids=ids, labels=ids).loss
        compiled = torch.compile(model, backend="smoothce")(input_ids=ids, labels=ids).loss
        compiled.backward()
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        from smoothce.compiler.backend import rewrite_pass
        print(rewrite_pass.match_count)
    """)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) >= 1, out.stdout
