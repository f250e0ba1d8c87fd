"""Command line: ``python -m smoothce inspect FILE.py:FACTORY`` and ``python -m smoothce demo``.

Lives in a module of its own (``smoothce/__main__.py`` only calls :func:`main`) so that the
classes here are the same objects whether reached through ``python -m`` or an import.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import traceback

from smoothce.compiler import demo
from smoothce.compiler.errors import UsageError

USAGE_ERROR = 2  # bad input: missing file or factory, factory raising, model that cannot be traced
EXPECT_FAILED = 1  # --expect N and fewer than N losses would be rewritten


def _load_factory(spec: str):
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"expected FILE.py:FACTORY, got {spec!r}")
    if not os.path.isfile(path):
        raise UsageError(f"no such file: {path}")
    module_name = "_smoothce_user_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(module_name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise UsageError(f"cannot import {path} (not a Python file?)")
    module = importlib.util.module_from_spec(mod_spec)
    # The file's own directory first, as `python FILE.py` would have it: sibling imports work.
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    sys.modules[module_name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"importing {path} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, name, None)
    if factory is None:
        raise UsageError(f"{path} has no {name!r}")
    if not callable(factory):
        raise UsageError(f"{path}:{name} is a {type(factory).__name__}, not a callable factory")
    return factory


def _call_factory(factory, spec: str):
    try:
        made = factory()
    except Exception as e:
        raise UsageError(f"factory {spec} raised {type(e).__name__}: {e}") from e
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3):
        raise UsageError(
            f"factory {spec} must return (model_or_fn, args) or (model_or_fn, args, kwargs), "
            f"got {type(made).__name__}" + (f" of length {len(made)}" if isinstance(made, (tuple, list)) else "")
        )
    model, args, kwargs = made[0], made[1], made[2] if len(made) == 3 else {}
    if not callable(model):
        raise UsageError(f"factory {spec} returned a {type(model).__name__} as the model, not a callable")
    if not isinstance(args, (tuple, list)):
        args = (args,)  # a single example tensor
    if not isinstance(kwargs, dict):
        raise UsageError(f"factory {spec} returned kwargs of type {type(kwargs).__name__}, expected a dict")
    return model, tuple(args), kwargs


def _write_graphs(report, directory: str) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    written = []
    for g in report.graphs:
        for stage, code in (("before", g.before), ("after", g.after)):
            path = os.path.join(directory, f"graph_{g.index}_{stage}.py")
            with open(path, "w") as f:
                f.write(code)
            written.append(path)
    return written


def cmd_inspect(args) -> int:
    factory = _load_factory(args.target)
    model, ex_args, ex_kwargs = _call_factory(factory, args.target)

    from smoothce.compiler.inspect import inspect

    # A model that fails under Dynamo also makes torch log the error with a traceback; that is
    # for --verbose (or an explicit TORCH_LOGS), the default is the one line below.
    quiet = not args.verbose and "TORCH_LOGS" not in os.environ
    if quiet:
        logging.disable(logging.ERROR)
    try:
        report = inspect(model, *ex_args, **ex_kwargs)
    except Exception as e:
        hint = " (--verbose for details)" if quiet else ""
        raise UsageError(f"tracing {args.target} failed: {type(e).__name__}: {_first_line(e)}{hint}") from e
    finally:
        if quiet:
            logging.disable(logging.NOTSET)

    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.render(verbose=args.verbose))
    if args.graphs:
        written = _write_graphs(report, args.graphs)
        print(f"wrote {len(written)} files to {args.graphs}", file=sys.stderr)
    for err in report.errors:
        print(f"smoothce: detector error in {err}", file=sys.stderr)
    if args.expect is not None and len(report.matches) < args.expect:
        print(
            f"smoothce: expected at least {args.expect} rewritten losses, found {len(report.matches)}",
            file=sys.stderr,
        )
        return EXPECT_FAILED
    return USAGE_ERROR if report.errors else 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothce",
        description="Find cross-entropy losses in torch.compile graphs and run them as one fused kernel.",
        epilog="Use `smoothce COMMAND --help` for a command's options. "
        "While compiling with backend='smoothce', TORCH_LOGS=smoothce logs what was rewritten.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "inspect",
        help="show which losses smoothce would rewrite in a model",
        description="Trace a model like torch.compile does and report the cross-entropy losses "
        "smoothce would rewrite, the near misses and the graph breaks. The model runs once.",
    )
    p.add_argument(
        "target",
        metavar="FILE.py:FACTORY",
        help="a function in FILE.py returning (model_or_fn, args) or (model_or_fn, args, kwargs)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--graphs", metavar="DIR", help="write each graph's code before/after the rewrite to DIR")
    p.add_argument("--expect", type=int, metavar="N", help="exit with status 1 if fewer than N losses are rewritten")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the detector's coefficients, graph node names and graph code, and tracebacks on errors")
    p.set_defaults(func=cmd_inspect)

    d = sub.add_parser(
        "demo",
        help="train a tiny language model with a hand-written label-smoothed loss, "
        "smoothce vs Inductor",
        description="Train a tiny language model whose loss is a hand-written label-smoothed "
        "cross-entropy with a padding mask, compiled with backend='smoothce' and with plain "
        "Inductor; print the inspection report and loss, step time and peak memory side by side.",
    )
    demo.add_arguments(d)
    d.set_defaults(func=demo.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(f"smoothce {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130

