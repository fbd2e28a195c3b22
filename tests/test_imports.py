"""The import graph of the library packages, read from the sources (function-local imports
included): no cycles, `libra_tok` never imports `libra_lm`, the libraries never import the CLI,
and the LM never reaches into the tokenizer's trainer."""

import ast
from pathlib import Path

import pytest

from builders import ROOT

PACKAGES = ("libra_tok", "libra_lm")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imported(module: str, path: Path, node: ast.AST, known: dict[str, Path]) -> list[str]:
    """Modules of the packages (or other top-level names) that an import statement names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")
            if path.name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names]
    out = []
    for name in names:
        resolved = name
        while resolved and resolved not in known:
            resolved = resolved.rpartition(".")[0]
        out.append(resolved or name)
    return out


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    graph = {}
    for module, path in known.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(d for d in _imported(module, path, node, known) if d != module)
        graph[module] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_local_and_relative_imports():
    graph = import_graph()
    assert "libra_tok.config" in graph["libra_tok.model"]  # a relative import at module level
    assert graph["libra_lm.model"], "libra_lm.model imports nothing?"


def test_no_import_cycles():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("module", sorted(_modules()))
def test_dependency_direction(module):
    deps = import_graph()[module]
    assert not any(d.split(".")[0] in ("cli", "libra_cli") for d in deps), f"{module} imports the CLI"
    if module.startswith("libra_tok"):
        assert not any(d.startswith("libra_lm") for d in deps), f"{module} imports libra_lm"
    if module.startswith("libra_lm"):
        assert "libra_tok.train" not in deps, f"{module} imports the tokenizer's trainer"
