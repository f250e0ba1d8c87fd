"""Every private PyTorch API smoothce touches, in one place, for torch 2.11 and 2.13.

It sits at the package's root, below compiler/ and patterns/, because both read it: compiler/
for Inductor's pass hooks and caches, patterns/ for the names Dynamo gives graph inputs
(``graph_input_source``) and the calls it records (``OPERATOR_METHODS``), and patterns/ never
imports compiler/. It imports nothing of smoothce.

What differs between the two (read from their sources):

- ``torch._inductor.config.pre_grad_custom_pass``: 2.11 types it as ONE callable (or None) and
  calls it as ``config.pre_grad_custom_pass(gm.graph)``. 2.13 also accepts a list or tuple of
  callables and runs each in order (``custom_graph_pass.get_custom_graph_passes``).
- When the pre-grad pass runs relative to the FX graph cache: 2.11 runs pre-grad passes before
  the cache lookup, so the key is computed from the already rewritten graph and the pass runs on
  every compile, hit or miss. 2.13 runs them after the lookup ("late") when every pass is a
  ``CustomGraphPass`` whose ``uuid()`` is not None; the uuid then enters the cache key and the
  pass does NOT run on a hit. A pass without a uuid makes 2.13 fall back to running early.
- What of the pass enters the FX graph cache key: 2.13 its ``uuid()``; 2.11 a deep copy and a
  pickle of the whole Inductor config, the pass object included (``CustomGraphPass`` below). On
  2.11 AOTAutograd's cache, which checks the graph after the early pass, also refuses a graph
  that calls the functions the rewrite inserts, so only Inductor's FX graph cache hits there.
- ``CustomGraphPass`` exists in both (2.13 adds a ``CustomPassBase`` above it).

- Traced graphs: 2.11 records ``a == b`` on a tensor as a method call (``OPERATOR_METHODS``), and
  rejects int32 labels into ``F.one_hot`` while tracing (``one_hot_traces_int32_labels``), and
  records a DTensor's redistribute as a call of a closure where 2.13 records the method
  (``redistributed_tensor``).

- ``torch.compile(isolate_recompiles=True)``: 2.13 only. A compile with it keeps its cache entries
  in a region of their own, not counted against other compiles of the same function.

Everything else used here (``compile_fx(config_patches=)``, ``list_mode_options``,
``lookup_backend``, ``fresh_cache``, ``run_and_get_code``) has the same shape in both. Dynamo's
per-code memory (``_debug_get_cache_entry_list``, ``reset_code``, ``torch._dynamo.pgo``'s code
state) predates 2.11 and was checked on 2.13; invalidating one cache entry falls back to leaving
it where the machinery for it is missing.
"""

from __future__ import annotations

import contextlib
import copy
import inspect as _inspect
import operator
from typing import Any, Callable, Iterator

import torch
from torch._inductor import config as inductor_config
from torch._inductor import custom_graph_pass as _custom_graph_pass


class CustomGraphPass(_custom_graph_pass.CustomGraphPass):
    """Inductor's CustomGraphPass, copied and pickled without the state it gathers while running.

    torch 2.11 builds the FX graph cache key from a deep copy and a pickle of the whole Inductor
    config, the pre_grad_custom_pass object included; 2.13 reads only the pass's uuid(). A pass
    that logs every graph it ran on thus had a new key at every compile on 2.11, and the cache
    never hit. ``_run_state`` names such attributes (log, caches) with a factory of their empty
    value: copies and pickles leave them out and start them empty.
    """

    _run_state: dict[str, Callable[[], Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k not in self._run_state}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        for name, empty in self._run_state.items():
            setattr(self, name, empty())


# Feature test rather than a version compare: the list form arrived together with this helper.
PRE_GRAD_PASS_ACCEPTS_LIST: bool = hasattr(_custom_graph_pass, "get_custom_graph_passes")



def pre_grad_pass_runs_on_cache_hit() -> bool:
    """Whether a pre-grad ``CustomGraphPass`` with a uuid still runs when the graph cache hits."""
    from torch._inductor import codecache

    # 2.13 decides "early"/"late" here; 2.11 has no such notion and always runs passes early.
    return not hasattr(codecache, "resolve_pre_grad_pass_timing")


# --- the pre-grad hook -------------------------------------------------------------------------


def get_pre_grad_pass() -> Any:
    return inductor_config.pre_grad_custom_pass


def set_pre_grad_pass(value: Any) -> None:
    inductor_config.pre_grad_custom_pass = value


def pre_grad_passes(value: Any) -> tuple[Callable, ...]:
    """The callables a ``pre_grad_custom_pass`` value stands for, in the order Inductor runs them."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, ChainedPass):
        return value.passes
    return (value,)


class ChainedPass(CustomGraphPass):
    """Several pre-grad passes behind the one callable that torch 2.11's hook accepts.

    Its uuid combines the parts' uuids, and is None (no caching) if any part has none, which is
    what 2.13 itself decides for a list holding such a pass.
    """

    def __init__(self, passes: tuple[Callable, ...]) -> None:
        self.passes = tuple(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Any:
        ids = []
        for p in self.passes:
            uid = p.uuid() if isinstance(p, CustomGraphPass) else None
            if uid is None:
                return None
            ids.append(uid)
        return tuple(ids)

    def __repr__(self) -> str:
        return f"ChainedPass({', '.join(map(repr, self.passes))})"


def _compose(passes: tuple[Callable, ...], accepts_list: bool) -> Any:
    if not passes:
        return None
    if len(passes) == 1:
        return passes[0]
    return list(passes) if accepts_list else ChainedPass(passes)


def chain_pre_grad_pass(existing: Any, new_pass: Callable, *, accepts_list: bool | None = None) -> Any:
    """The hook value that runs ``existing`` (whatever the user installed) and then ``new_pass``."""
    if accepts_list is None:
        accepts_list = PRE_GRAD_PASS_ACCEPTS_LIST
    passes = pre_grad_passes(existing)
    if isinstance(existing, (list, tuple)) and not accepts_list:
        raise TypeError(
            f"torch {torch.__version__} takes one callable as pre_grad_custom_pass, got {existing!r}"
        )
    return _compose(passes + (new_pass,), accepts_list)


def unchain_pre_grad_pass(current: Any, old_pass: Callable) -> Any:
    """The hook value ``current`` without ``old_pass``; ``current`` itself when it does not hold it.

    A plain callable the user installed keeps its identity, so "restore what was there" holds.
    """
    passes = pre_grad_passes(current)
    if not any(p is old_pass for p in passes):
        return current
    rest = tuple(p for p in passes if p is not old_pass)
    # Keep the user's own container type when they installed a list themselves.
    if isinstance(current, (list, tuple)) and len(rest) > 1:
        return type(current)(rest)
    return _compose(rest, accepts_list=isinstance(current, (list, tuple)))


# --- backends ----------------------------------------------------------------------------------


def compile_fx(gm: torch.fx.GraphModule, example_inputs, config_patches: dict[str, Any]):
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    return _compile_fx(gm, example_inputs, config_patches=config_patches)


def lookup_backend(name: str) -> Callable:
    from torch._dynamo.backends.registry import lookup_backend as _lookup

    return _lookup(name)


def inductor_config_patches(mode: str | None, options: dict[str, Any] | None) -> dict[str, Any]:
    """What ``torch.compile(mode=, options=)`` turns into for Inductor, checked the way torch checks it.

    A mode expands to its options first (``torch._inductor.list_mode_options``); explicit options
    win over the mode's. Unknown option names and wrongly typed values are errors naming them.
    """
    patches: dict[str, Any] = {}
    if mode is not None and mode != "default":
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    if options:
        known = inductor_config.get_config_copy()
        for key, value in options.items():
            name = key.replace("-", "_")
            if name not in known:
                raise RuntimeError(
                    f"smoothce: unknown Inductor option {key!r} in options={options!r}"
                )
            expected = inductor_config.get_type(name)
            # Generic annotations (Optional[...], list[...]) cannot be checked with isinstance.
            if getattr(expected, "__origin__", None) is None and isinstance(expected, type):
                if not isinstance(value, expected):
                    raise RuntimeError(
                        f"smoothce: Inductor option {key!r} takes {expected.__name__}, "
                        f"got {value!r} ({type(value).__name__})"
                    )
            patches[name] = value
    return patches


# --- test and inspection helpers ---------------------------------------------------------------


def graph_input_source(node: torch.fx.Node) -> str | None:
    """Where Dynamo took a graph input from, as Dynamo writes it (``L['self']._buffers['w']``), or
    None for a node that is not such an input. ``Source.name`` is a method on older torches and a
    cached property on newer ones."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name


def inductor_cache_dir() -> str:
    """Inductor's default on-disk cache directory (TORCHINDUCTOR_CACHE_DIR or its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def fresh_inductor_cache():
    """Context manager: Inductor's on-disk caches in a fresh temporary directory."""
    from torch._inductor.utils import fresh_cache

    return fresh_cache()


def run_and_get_code(fn: Callable, *args, **kwargs):
    """``(result, [generated source, ...])`` of running ``fn`` with Inductor compiling inside it."""
    from torch._inductor.utils import run_and_get_code as _run_and_get_code

    return _run_and_get_code(fn, *args, **kwargs)


def cache_counters() -> dict[str, int]:
    """Inductor's FX graph cache and AOTAutograd cache hit/miss counters so far."""
    from torch._dynamo.utils import counters

    return {
        "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "autograd_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
        "autograd_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
    }


# --- traced graphs ------------------------------------------------------------------------------

# Methods Dynamo records in place of an operator: method name -> the operator, as the other
# version records it. torch 2.11 records ``a == b`` on a tensor ``a`` as ``a.__eq__(b)``
# (call_method "__eq__": its handler of operator.eq hands a tensor comparison to the tensor's
# method); 2.13 records call_function operator.eq, as both record every other comparison.
OPERATOR_METHODS: dict[str, Callable] = {"__eq__": operator.eq}


def redistributed_tensor(node: torch.fx.Node):
    """The DTensor that ``node`` redistributes, when it is a redistribute in a graph Dynamo traced
    (``ColwiseParallel``'s output hook), else None. torch 2.13 records ``x.redistribute(...)`` as
    call_method "redistribute"; 2.11 as a call_function of a closure named "prim_redistribute"
    with the placements inside it (its handler wraps the call so that the placements are plain
    values)."""
    if node.op == "call_method" and node.target == "redistribute" or (
            node.op == "call_function" and getattr(node.target, "__name__", None) == "prim_redistribute"):
        return node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    return None


def one_hot_traces_int32_labels() -> bool:
    """Whether torch.compile traces ``F.one_hot`` of int32 labels, which eager rejects.

    torch 2.13 traces one_hot through a decomposition (aten.one_hot's Python kernel for
    CompositeImplicitAutograd) that takes labels of any integer dtype, so a graph can hold a
    one-hot of int32 labels and the detector has to leave it to eager. torch 2.11 has no such
    kernel: its fake one_hot rejects int32 as eager does, and Dynamo raises before any backend
    sees the graph.
    """
    import torch._decomp  # noqa: F401  (registers the decomposition where there is one)

    return torch._C.DispatchKey.CompositeImplicitAutograd in torch.ops.aten.one_hot.default.py_kernels


# --- Dynamo's memory of traced code ------------------------------------------------------------

# torch.compile keyword arguments for a compile whose entries should not count against the
# user's own compiles of the same function (nothing on a torch without the option).
ISOLATED_COMPILE: dict[str, Any] = (
    {"isolate_recompiles": True} if "isolate_recompiles" in _inspect.signature(torch.compile).parameters else {}
)


def _valid_entries(code) -> list:
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    # An invalidated entry keeps its place in the list with its compiled code set to None.
    return [e for e in _debug_get_cache_entry_list(code) if e.code is not None]


def _traced_codes() -> list:
    from torch._dynamo import convert_frame

    return [c for ref in list(convert_frame.input_codes.seen) if (c := ref()) is not None]


@contextlib.contextmanager
def dynamo_state_restored() -> Iterator[None]:
    """Run a trace whose traces Dynamo forgets afterwards.

    Dynamo remembers two things per code object: compiled cache entries (each new backend adds
    one, up to the recompile limit) and the shapes it saw (automatic dynamic: a later compile
    with another shape becomes dynamic). On exit, a code object that had no entries before
    loses all of them (``reset_code``: exactly as found); one that had entries (the user
    compiled the same function) keeps those and has the new ones invalidated; the shapes seen
    are put back as they were.
    """
    from torch._C._dynamo.eval_frame import reset_code
    from torch._dynamo import pgo

    before = {id(code): {id(e.code) for e in _valid_entries(code)} for code in _traced_codes()}
    shapes_seen = copy.deepcopy(dict(pgo.get_code_state()))
    try:
        yield
    finally:
        for code in _traced_codes():
            kept = before.get(id(code))
            if not kept:
                reset_code(code)
                continue
            for entry in _valid_entries(code):
                if id(entry.code) not in kept:
                    _invalidate(entry)
        state = pgo.get_code_state()
        state.clear()
        state.update(shapes_seen)


def _invalidate(entry) -> None:
    # What Dynamo does when an object a guard refers to dies: the entry never matches again and
    # drops its compiled code. Where that machinery is missing the entry just stays: it is
    # guarded on a backend nobody will pass again, so it never runs.
    try:
        from torch._dynamo.guards import DeletedGuardManagerWrapper
    except ImportError:
        return
    extra_state = getattr(entry.guard_manager, "extra_state", None)
    if extra_state is not None:
        extra_state.invalidate(entry, DeletedGuardManagerWrapper("smoothce.inspect traced it"))
