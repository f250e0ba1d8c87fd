"""Why ``compiler``, ``kernels`` and ``patterns`` never answer to their bare names.

The repository's root is the ``smoothce`` package (pyproject.toml maps it), so its folders are
``smoothce.compiler``, ``smoothce.kernels`` and ``smoothce.patterns``. But ``python -m ...`` and
``python -c`` put the current directory first on ``sys.path``: run from a clone's root, a bare
``import kernels`` would find the folder before any installed distribution of that name
(transformers imports Hugging Face's ``kernels`` package, for one). Each folder's ``__init__.py``
therefore checks the name it was imported under; as a top-level module it calls
:func:`step_aside`, which puts in its place what that import would have found without the clone's
root on ``sys.path``: another distribution's module, or a ModuleNotFoundError.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib.machinery import PathFinder

__all__ = ["step_aside"]


def _same_dir(entry: str, root: str) -> bool:
    return os.path.realpath(entry or os.curdir) == root


def step_aside(name: str, init_file: str) -> None:
    """Replace the module ``name``, being imported from ``init_file`` (a folder of the clone's
    root), with what ``import name`` finds on the rest of ``sys.path``, or raise
    ModuleNotFoundError as that import would."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(init_file)))
    elsewhere = [p for p in sys.path if isinstance(p, str) and not _same_dir(p, root)]
    spec = None
    for finder in sys.meta_path:  # in the import system's own order
        if finder is PathFinder:
            spec = PathFinder.find_spec(name, elsewhere)
        elif hasattr(finder, "find_spec"):
            spec = finder.find_spec(name, None)
        if spec is not None:
            break
    if spec is None:
        raise ModuleNotFoundError(f"No module named {name!r} (the folder of that name in {root} is "
                                  f"smoothce.{name})", name=name)
    module = importlib.util.module_from_spec(spec)
    # The import system returns whatever sys.modules holds once this module's body has run.
    sys.modules[name] = module
    try:
        if spec.loader is not None:
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
