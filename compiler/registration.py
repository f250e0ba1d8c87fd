"""Install the cross-entropy rewrite into Inductor itself, for code that compiles with the default backend.

    import smoothce
    smoothce.register_patterns()          # torch.compile(m) now rewrites cross-entropy losses
    smoothce.unregister_patterns()        # back to what was there before

The rewrite goes into ``torch._inductor.config.pre_grad_custom_pass`` as a ``CustomGraphPass``
whose ``uuid()`` hashes the rewrite's source files, so Inductor's FX graph cache keys on it and
keeps hitting. A pass the user installed before stays and runs first. Registering twice is a
no-op; unregistering puts back the exact value that was there, unless the hook was changed
since, in which case only the smoothce pass is taken out of it.
"""

from __future__ import annotations

from smoothce import compat
from smoothce.compiler.passes import CrossEntropyPass, register_ops

_UNSET = object()

_registered: CrossEntropyPass | None = None
_previous = _UNSET  # the hook value before register_patterns()
_installed = _UNSET  # the hook value register_patterns() set


def registered_pass() -> CrossEntropyPass | None:
    """The pass object currently installed by :func:`register_patterns`, or None."""
    if _registered is None:
        return None
    # Someone may have overwritten the hook since; then it is no longer installed.
    if not any(p is _registered for p in compat.pre_grad_passes(compat.get_pre_grad_pass())):
        return None
    return _registered


def register_patterns(*, fuse_linear: bool = True) -> CrossEntropyPass:
    """Make every Inductor compile rewrite cross-entropy losses; returns the installed pass.

    With ``fuse_linear`` (the default) an LM head that only feeds the loss is fused into it, so
    its logits are never materialised; ``fuse_linear=False`` keeps the head as it is.
    Its ``results`` / ``match_count`` say what each compiled graph contained. Calling it again
    with the same settings returns the installed pass; with other settings it replaces it.
    Call it before compiling: code Dynamo has already compiled keeps running as it was compiled.
    """
    global _registered, _previous, _installed
    current = registered_pass()
    if current is not None:
        if current.fuse_linear == fuse_linear:
            return current
        unregister_patterns()
    # On a warm cache Inductor skips the pass (2.13) and loads code that calls the ops: they
    # must exist before the first compile, not only once something has been rewritten.
    register_ops()
    new_pass = CrossEntropyPass(label="Inductor pre-grad graph", fuse_linear=fuse_linear)
    previous = compat.get_pre_grad_pass()
    installed = compat.chain_pre_grad_pass(previous, new_pass)
    compat.set_pre_grad_pass(installed)
    _registered, _previous, _installed = new_pass, previous, installed
    return new_pass


def unregister_patterns() -> bool:
    """Remove the pass installed by :func:`register_patterns`; returns whether one was installed."""
    global _registered, _previous, _installed
    ours = registered_pass()
    if ours is not None:
        current = compat.get_pre_grad_pass()
        if current is _installed:
            compat.set_pre_grad_pass(_previous)
        else:
            compat.set_pre_grad_pass(compat.unchain_pre_grad_pass(current, ours))
    _registered, _previous, _installed = None, _UNSET, _UNSET
    return ours is not None
