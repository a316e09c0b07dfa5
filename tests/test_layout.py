"""The house rules of the code itself: imports run one way (no cycles, lazy imports included), no
module imports another's ``_private`` name, and no module grows past about 400 lines."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "oneshot")
MAX_LINES = 400


def _modules() -> dict[str, str]:
    """Module name -> file, for every module of the oneshot package (kernels/ as oneshot.kernels)."""
    found = {}
    for base, name in ((PACKAGE, "oneshot"), (os.path.join(ROOT, "kernels"), "oneshot.kernels")):
        for folder, _, files in os.walk(base):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(folder, f), base)[:-3].replace(os.sep, ".")
                module = name if rel == "__init__" else f"{name}.{rel.removesuffix('.__init__')}"
                found[module] = os.path.join(folder, f)
    return found


def _imports(module: str, path: str, modules: dict[str, str]):
    """(imported module, names) for every import in the file, at any depth (lazy imports count)."""
    is_package = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("oneshot"):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("oneshot"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            if submodules:
                yield from ((s, []) for s in submodules)
                rest = [n for n in names if f"{target}.{n}" not in modules]
                if rest:
                    yield target, rest
            else:
                yield target, names


def _graph():
    modules = _modules()
    graph = {m: set() for m in modules}
    private = []
    for module, path in modules.items():
        for target, names in _imports(module, path, modules):
            if target in modules and target != module:
                graph[module].add(target)
            for name in names:
                if name.startswith("_") and not name.startswith("__") and target != module:
                    private.append(f"{module} imports {target}.{name}")
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph, _ = _graph()
    assert "oneshot.engine.loop" in graph and graph["oneshot.engine.loop"]  # the parser sees imports at all
    assert _cycles(graph) == []


def test_no_private_names_imported_from_other_modules():
    assert _graph()[1] == []


def test_no_module_over_the_size_limit():
    sizes = {m: sum(1 for _ in open(p, encoding="utf-8")) for m, p in _modules().items()}
    assert {m: n for m, n in sizes.items() if n > MAX_LINES} == {}


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
