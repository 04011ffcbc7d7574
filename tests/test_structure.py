"""The package's import graph, read from the source with `ast`: no cycle, and every import of
a project module at module level (function-local imports only for optional dependencies such
as torch, which are not project modules)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "scformer_jax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    """The project modules an import statement loads (a name imported from a package is the
    submodule when one exists)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    assert node.level == 0, "relative imports are not used in this project"
    if node.module is None or node.module.split(".")[0] != PACKAGE:
        return []
    found = []
    for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.append(sub if sub in modules else node.module)
    return found


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], list[tuple[int, str]]]:
    """(project modules imported at module level, (line, module) of those imported inside a
    function or method)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top: set[str] = set()
    local: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, modules):
                    if in_function:
                        local.append((child.lineno, target))
                    else:
                        top.add(target)
            visit(
                child,
                in_function
                or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
            )

    visit(tree, False)
    return top, local


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    modules = _modules()
    graph, local = {}, {}
    for name, path in modules.items():
        top, inner = _imports(path, modules)
        graph[name] = {t for t in top if t != name}
        if inner:
            local[name] = inner
    return graph, local


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_sees_imports_and_cycles():
    # The helpers themselves, on known input, so that a passing suite means something.
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    graph, _ = _graph()
    assert f"{PACKAGE}.model" in graph[f"{PACKAGE}.objectives"]
    assert f"{PACKAGE}.convert.reading" in graph[f"{PACKAGE}.convert"]
    assert f"{PACKAGE}.parallel" in graph[f"{PACKAGE}.training"]  # `from pkg import module`


def test_no_import_cycle():
    graph, _ = _graph()
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_project_modules_are_imported_at_module_level():
    _, local = _graph()
    listed = [
        f"{module}:{line} imports {target}"
        for module, found in local.items()
        for line, target in found
    ]
    assert not listed, (
        "function-local imports of project modules (import them at the top; "
        "only optional third-party dependencies may be imported lazily): " + "; ".join(listed)
    )


def test_layers_point_one_way():
    # The low layers (data, config, losses, metrics, model) never reach up into training,
    # evaluation, prediction or the run folder.
    graph, _ = _graph()
    upper = {f"{PACKAGE}.{m}" for m in ("training", "evaluation", "predict", "runs", "convert")}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for low in (
        "config",
        "losses",
        "metrics",
        "model",
        "objectives",
        "data",
        "data.dataset",
        "data.batching",
        "checkpoints",
        "vocab",
    ):
        name = f"{PACKAGE}.{low}"
        assert not reach(name) & upper, (name, sorted(reach(name) & upper))
