"""The cross-entropy rewrite as one graph pass object, shared by the backends and the Inductor hook."""

from __future__ import annotations

import functools
import hashlib
import pathlib

import torch

from smoothce import compat

_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent

# What decides the rewritten graph: the detector (with its subpackages and the version
# differences it reads graphs through), the functions it inserts (their argument checks, fake
# kernels and autograd formulas are traced into the compiled graph) and this file.
_SOURCE_DIRS = ("patterns", "kernels")
_SOURCE_MODULES = ("compat.py",)


def _source_files() -> list[pathlib.Path]:
    files = [pathlib.Path(__file__).resolve()] + [_PACKAGE_ROOT / name for name in _SOURCE_MODULES]
    for folder in _SOURCE_DIRS:
        files.extend(sorted((_PACKAGE_ROOT / folder).rglob("*.py")))
    return files


def source_hash() -> str:
    """sha256 over the relative paths and contents of the files the rewrite depends on."""
    hasher = hashlib.sha256()
    for path in _source_files():
        hasher.update(path.relative_to(_PACKAGE_ROOT).as_posix().encode())
        hasher.update(b"\0")
        hasher.update(path.read_bytes())
        hasher.update(b"\0")
    return hasher.hexdigest()


# The modules whose import registers the smoothce:: ops the rewrite inserts.
_OP_MODULES = ("smoothce.kernels.cross_entropy", "smoothce.kernels.linear_cross_entropy",
               "smoothce.kernels.vocab_parallel")


def register_ops() -> None:
    """Register every ``smoothce::`` op a rewritten graph can call (importing their modules).

    Compiled code that calls them can come from Inductor's and AOTAutograd's on-disk caches,
    where nothing is rewritten and so nothing else imports the kernels: every process that can
    compile with the pass (it runs it, or has it installed and hits a cache keyed on its uuid)
    calls this first.
    """
    import importlib

    for name in _OP_MODULES:
        importlib.import_module(name)


def _subgraphs(gm: torch.fx.GraphModule):
    """Child GraphModules that ``gm``'s graph reads through get_attr (higher-order op bodies)."""
    used = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    for name, child in gm.named_children():
        if name in used and isinstance(child, torch.fx.GraphModule):
            yield name, child


class CrossEntropyPass(compat.CustomGraphPass):
    """Finds cross-entropy losses in a Dynamo torch-IR graph and replaces them with smoothce ops.

    Usable as Inductor's ``pre_grad_custom_pass`` (called with a ``torch.fx.Graph``) and directly
    by a backend through :meth:`rewrite`. Every run appends its ``RewriteResult`` to
    :attr:`results`, so tests and tools can read what was found; :meth:`clear` forgets them.
    On torch 2.13 Inductor does not run the pass when its FX graph cache hits, so a cached
    graph adds no result.
    """

    # What a run leaves behind: not part of what the pass is (copies and cache keys leave it out).
    _run_state = {"results": list, "_source_hash": lambda: None}

    def __init__(self, label: str = "graph", *, fuse_linear: bool = True) -> None:
        if not isinstance(fuse_linear, bool):
            raise TypeError(f"smoothce: fuse_linear must be a bool, got {fuse_linear!r}")
        self.label = label  # names the graphs in TORCH_LOGS=smoothce output
        # Also fuse an LM head that only feeds the loss into the loss (the logits never exist).
        self.fuse_linear = fuse_linear
        self.results: list = []  # one RewriteResult per graph this pass ran on
        self._source_hash: str | None = None

    def rewrite(self, gm: torch.fx.GraphModule, *, fuse_linear: bool | None = None):
        """Rewrite ``gm`` in place; ``fuse_linear`` overrides the pass's setting for this graph."""
        # Imported on first use: importing smoothce must stay cheap and inert.
        from smoothce.compiler.rewrite_log import rewrite_and_log
        from smoothce.patterns.cross_entropy import rewrite_cross_entropy

        register_ops()
        fuse = self.fuse_linear if fuse_linear is None else fuse_linear
        result = rewrite_and_log(
            gm, functools.partial(rewrite_cross_entropy, fuse_linear=fuse), name=self.label
        )
        self.results.append(result)
        return result

    def rewrite_recursive(self, gm: torch.fx.GraphModule, *, fuse_linear: bool | None = None) -> list:
        """:meth:`rewrite` on ``gm``'s subgraphs (bodies of checkpoint and other higher-order ops),
        innermost first, then on ``gm``: what Inductor does with its own pre-grad passes."""
        results = []
        for _, sub in _subgraphs(gm):
            results += self.rewrite_recursive(sub, fuse_linear=fuse_linear)
        results.append(self.rewrite(gm, fuse_linear=fuse_linear))
        return results

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        if gm is None:
            raise ValueError(f"smoothce: the graph handed to the pass has no owning module: {graph}")
        self.rewrite(gm)

    def uuid(self) -> str:
        # Sources are hashed once per pass object: the files do not change under a process.
        if self._source_hash is None:
            self._source_hash = source_hash()
        # The settings change the rewritten graph, so they are part of the id.
        return f"smoothce.CrossEntropyPass:fuse_linear={self.fuse_linear}:{self._source_hash}"

    @property
    def matches(self) -> list:
        return [m for r in self.results for m in r.matches]

    @property
    def near_misses(self) -> list:
        return [n for r in self.results for n in r.near_misses]

    @property
    def match_count(self) -> int:
        return sum(len(r.matches) for r in self.results)

    @property
    def last_result(self):
        return self.results[-1] if self.results else None

    def clear(self) -> None:
        self.results.clear()

    def __repr__(self) -> str:
        return (
            f"CrossEntropyPass(label={self.label!r}, fuse_linear={self.fuse_linear}, "
            f"graphs={len(self.results)}, matches={self.match_count})"
        )
