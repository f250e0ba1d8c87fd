"""The backend's log of each rewrite: ``TORCH_LOGS=smoothce`` prints the table of each rewritten
graph, ``TORCH_LOGS=+smoothce`` adds the graph code before and after, and with ``TORCH_TRACE`` set
the report lands in tlparse output as the ``smoothce_report`` artifact.

No log name or artifact is registered with torch: TORCH_LOGS accepts any importable module name
(torch >= 2.1), so the ``smoothce`` logger works on every supported torch without touching torch's
registry at import, and without the artifact name having to exist before ``import torch``
parses TORCH_LOGS.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from smoothce.compiler.render import terminal_width
from smoothce.compiler.report import loss_sections, plural, result_dict
from smoothce.patterns.report import RewriteResult

__all__ = ["log_rewrite", "rewrite_and_log"]

log = logging.getLogger(__name__)


def _compile_id() -> str | None:
    try:
        from torch._guards import CompileContext

        cid = CompileContext.current_compile_id()
    except Exception:  # private API; the id is a nicety
        return None
    return str(cid) if cid is not None else None


def log_rewrite(gm_name: str, result: RewriteResult, before_code: str | None = None,
                after_code: str | None = None) -> None:
    """Report one backend rewrite: ``TORCH_LOGS=smoothce`` logs its table, ``+smoothce`` also
    the code before/after; with TORCH_TRACE the JSON lands in tlparse as ``smoothce_report``.
    Costs nothing beyond two checks when neither is on."""
    # torch's log format already shows the compile id ([0/0]) on every line.
    label = gm_name
    if log.isEnabledFor(logging.INFO):
        if result.matches or result.near_misses:
            text = "\n".join(loss_sections(result.matches, result.near_misses, terminal_width()))
            log.info(
                "smoothce rewrite of %s: %s rewritten, %s\n%s", label, plural(len(result.matches), "loss"),
                plural(len(result.near_misses), "near miss"), text,
            )
        else:
            log.info("smoothce rewrite of %s: no cross-entropy found", label)
    if log.isEnabledFor(logging.DEBUG):
        if before_code is not None:
            log.debug("smoothce %s before:\n%s", label, before_code)
        if after_code is not None:
            log.debug("smoothce %s after:\n%s", label, after_code)
    _trace_artifact(gm_name, result, after_code)


def _trace_artifact(gm_name: str, result: RewriteResult, after_code: str | None) -> None:
    try:
        from torch._logging import trace_structured
    except ImportError:
        return
    compile_id = _compile_id()  # now: the payload is built later, only when a trace wants it
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": "smoothce_report", "encoding": "json"},
        payload_fn=lambda: json.dumps({"graph": gm_name, "compile_id": compile_id, **result_dict(result)}),
    )
    if after_code is not None and result.matches:
        trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": "smoothce_graph_after", "encoding": "string"},
            payload_fn=lambda: after_code,
        )


def rewrite_and_log(gm, rewrite: Callable, name: str) -> RewriteResult:
    """``rewrite(gm)`` (in place) and log its result under ``name``.

    The graph code is rendered only when ``+smoothce`` debug logging or a trace wants it."""
    before = _readable(gm) if log.isEnabledFor(logging.DEBUG) else None
    result = rewrite(gm)
    wants_after = before is not None or (result.matches and _tracing())
    log_rewrite(name, result, before, _readable(gm) if wants_after else None)
    return result


def _readable(gm) -> str:
    return gm.print_readable(print_output=False)


def _tracing() -> bool:
    # TORCH_TRACE output is on when torch's structured-trace logger has a handler.
    try:
        from torch._logging._internal import trace_log
    except ImportError:
        return False
    return bool(trace_log.handlers)
