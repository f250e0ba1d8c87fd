"""The ``torch.compile`` backends.

``"smoothce"``: rewrite the cross-entropy losses in the Dynamo graph, then compile with Inductor.
    ``torch.compile(m, backend="smoothce", mode=..., options={...})`` takes the same ``mode`` and
    ``options`` as the ``"inductor"`` backend; they reach Inductor as config patches.
``"smoothce_aot_eager"``: the same rewrite, then AOTAutograd with eager kernels (no code
    generation). It exercises the same rewritten graph and the op's autograd in a fraction of the
    time, which is what most tests use.

Both names are ``torch_dynamo_backends`` entry points, so they work after ``pip install`` with no
import of smoothce in user code. Both record what they found in :data:`rewrite_pass`.
"""

from __future__ import annotations

from typing import Any

import torch

from smoothce.compiler import compat
from smoothce.compiler.passes import CrossEntropyPass

# The pass both backends run. ``rewrite_pass.results`` holds one RewriteResult per compiled graph
# (forward graphs only: the rewrite happens before autograd), ``rewrite_pass.clear()`` resets it.
rewrite_pass = CrossEntropyPass(label="smoothce backend graph")


def smoothce_backend(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    options: dict[str, Any] | None = None,
    mode: str | None = None,
):
    # Check options before rewriting, so a typo fails before any work is done.
    config_patches = compat.inductor_config_patches(mode, options)
    rewrite_pass.rewrite_recursive(gm)
    return compat.compile_fx(gm, example_inputs, config_patches=config_patches)


def smoothce_aot_eager(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any):
    rewrite_pass.rewrite_recursive(gm)
    return compat.lookup_backend("aot_eager")(gm, example_inputs, **kwargs)
