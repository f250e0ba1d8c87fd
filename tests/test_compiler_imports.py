"""The shape of compiler/ (and compiler/measure/), read from their sources (nothing is imported or run):
no import circle, the rewrite's log beside the pass and not in the inspection module, the demo
and the benchmarks on one tiny LM, one progress bar and one peak-memory method, and no import
from patterns/ or kernels/ up into compiler/."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imports() -> dict[str, set[str]]:
    """smoothce module -> the smoothce modules it imports (at the top or inside functions)."""
    files = [p for folder in ("compiler", "compiler/measure") for p in (ROOT / folder).glob("*.py")]
    names = {p: "smoothce." + ".".join(p.relative_to(ROOT).with_suffix("").parts) for p in files}
    known = set(names.values())
    graph = {}
    for path, name in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("smoothce."):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = deps & known - {name}
    return graph


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_no_import_circle():
    graph = _imports()
    circles = sorted(m for m in graph if m in _reachable(graph, m))
    assert circles == [], circles


def test_the_pass_logs_without_the_inspection_module():
    graph = _imports()
    assert "smoothce.compiler.rewrite_log" in graph["smoothce.compiler.passes"]
    assert "smoothce.compiler.inspect" not in _reachable(graph, "smoothce.compiler.passes")


def test_the_demo_and_the_benchmarks_share_the_measuring_pieces():
    demo = _imports()["smoothce.compiler.demo"]
    assert {"smoothce.compiler.measure.tiny_lm", "smoothce.compiler.measure.memory", "smoothce.compiler.measure.progress"} <= demo
    defined = {
        (path.name, node.name)
        for path in (ROOT / "benchmarks").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in ("TinyLM", "Progress", "peak_cpu", "peak_cuda")
    }
    assert defined == set(), defined


def _imported_names(path: pathlib.Path):
    """(line, every module name an import statement may bind) for each import in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]


def test_patterns_and_kernels_never_import_compiler():
    """compiler/ builds on patterns/ and kernels/, never the other way round; what they share with
    it (compat.py: the torch version differences) sits below all three and imports none of them."""
    upward = [f"{path.relative_to(ROOT)}:{line}" for folder in ("patterns", "kernels")
              for path in sorted((ROOT / folder).rglob("*.py")) for line, names in _imported_names(path)
              if any(n == "smoothce.compiler" or n.startswith("smoothce.compiler.") for n in names)]
    assert upward == []
    assert [line for line, names in _imported_names(ROOT / "compat.py") if any(n.startswith("smoothce") for n in names)] == []
