"""smoothce: find cross-entropy losses in torch.compile graphs and run them as one fused kernel.

Importing this package changes nothing: the rewrite is active only through
``torch.compile(..., backend="smoothce")`` or after :func:`register_patterns`.
Public names are loaded on first use so ``import smoothce`` stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {
    "cross_entropy": ("smoothce.kernels.cross_entropy", "cross_entropy"),
    "CrossEntropyLoss": ("smoothce.kernels.cross_entropy", "CrossEntropyLoss"),
    "fused_linear_cross_entropy": ("smoothce.kernels.linear_cross_entropy", "fused_linear_cross_entropy"),
    "fused_soft_cross_entropy": ("smoothce.kernels.soft_cross_entropy", "fused_soft_cross_entropy"),
    "fused_linear_soft_cross_entropy": ("smoothce.kernels.linear_soft_cross_entropy",
                                        "fused_linear_soft_cross_entropy"),
    "register_patterns": ("smoothce.compiler.registration", "register_patterns"),
    "unregister_patterns": ("smoothce.compiler.registration", "unregister_patterns"),
    "move_loss_into_model": ("smoothce.compiler.trainer", "move_loss_into_model"),
    "inspect": ("smoothce.compiler.inspect", "inspect"),
    "Report": ("smoothce.compiler.report", "Report"),
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'smoothce' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
