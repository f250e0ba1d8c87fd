"""The ``torch.compile`` backends.

``"smoothce"``: rewrite the cross-entropy losses in the Dynamo graph, then compile with Inductor.
    ``torch.compile(m, backend="smoothce", mode=..., options={...})`` takes the same ``mode`` and
    ``options`` as the ``"inductor"`` backend; they reach Inductor as config patches. Keys starting
    with ``"smoothce."`` set the rewrite instead (:data:`REWRITE_OPTIONS`), e.g.
    ``options={"smoothce.fuse_linear": False}`` keeps an LM head out of the loss op (it is fused by
    default when nothing else reads its logits).
``"smoothce_aot_eager"``: the same rewrite, then AOTAutograd with eager kernels (no code
    generation). It exercises the same rewritten graph and the op's autograd in a fraction of the
    time, which is what most tests use.

Both names are ``torch_dynamo_backends`` entry points, so they work after ``pip install`` with no
import of smoothce in user code. Both record what they found in :data:`rewrite_pass`.
"""

from __future__ import annotations

from typing import Any

import torch

from smoothce import compat
from smoothce.compiler.passes import CrossEntropyPass

# The pass both backends run. ``rewrite_pass.results`` holds one RewriteResult per compiled graph
# (forward graphs only: the rewrite happens before autograd), ``rewrite_pass.clear()`` resets it.
rewrite_pass = CrossEntropyPass(label="smoothce backend graph")


# Options of the rewrite itself, given as options={"smoothce.<name>": value}; every other key is
# Inductor's. name -> type; each is a keyword of CrossEntropyPass.rewrite.
REWRITE_OPTIONS: dict[str, type] = {
    # Fuse an LM head whose logits only feed the loss into the loss op (no logits in memory).
    "fuse_linear": bool,
}
_PREFIX = "smoothce."


def split_options(options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(rewrite options, Inductor options)`` from a ``torch.compile(options=...)`` dict."""
    ours: dict[str, Any] = {}
    theirs: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if not key.startswith(_PREFIX):
            theirs[key] = value
            continue
        name = key[len(_PREFIX):].replace("-", "_")
        if name not in REWRITE_OPTIONS:
            known = ", ".join(_PREFIX + k for k in REWRITE_OPTIONS)
            raise RuntimeError(f"smoothce: unknown option {key!r}; known: {known}")
        expected = REWRITE_OPTIONS[name]
        if not isinstance(value, expected):
            raise RuntimeError(
                f"smoothce: option {key!r} takes {expected.__name__}, got {value!r} ({type(value).__name__})"
            )
        ours[name] = value
    return ours, theirs


def smoothce_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
):
    # Check options before rewriting, so a typo fails before any work is done.
    rewrite_options, inductor_options = split_options(options)
    config_patches = compat.inductor_config_patches(mode, inductor_options)
    rewrite_pass.rewrite_recursive(gm, **rewrite_options)
    return compat.compile_fx(gm, example_inputs, config_patches=config_patches)


def smoothce_aot_eager(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
):
    rewrite_options, other = split_options(options)
    if other or mode not in (None, "default"):
        raise RuntimeError(
            f"smoothce_aot_eager generates no code: it takes only smoothce.* options, "
            f"got options={other!r}, mode={mode!r}"
        )
    rewrite_pass.rewrite_recursive(gm, **rewrite_options)
    return compat.lookup_backend("aot_eager")(gm, example_inputs)
