"""The package's import graph, read from the sources (``ast``; nothing is imported): no circle
between files or between packages, imports inside functions included (they hide the real graph,
they do not remove an edge); the layering the layout promises: ``models`` below ``conversion``,
the main job (``train``) not built on test support (``testing``)."""

from __future__ import annotations

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "megatron_papo")
PACKAGE = "megatron_papo"


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path[:-3], os.path.dirname(ROOT)).replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in the file)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                if not name.startswith(PACKAGE):
                    continue
                while name not in modules and "." in name:
                    name = name.rsplit(".", 1)[0]
                # a module's own parent packages are imported before it anyway: no edge
                if name in modules and not (module + ".").startswith(name + "."):
                    graph[module].add(name)
    return graph


def _unit(module: str) -> str:
    """The package (or top-level module) a module belongs to: megatron_papo.<unit>."""
    return ".".join(module.split(".")[:2])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        units.setdefault(_unit(module), set()).update(
            _unit(t) for t in targets if _unit(t) != _unit(module))
    return units


def test_no_import_circle_between_files_or_packages():
    graph = import_graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    packages = _package_graph(graph)
    assert _cycle(packages) is None, " -> ".join(_cycle(packages))


def test_layering_models_below_conversion_and_train_not_on_testing():
    packages = _package_graph(import_graph())
    assert f"{PACKAGE}.conversion" not in packages[f"{PACKAGE}.models"]
    assert f"{PACKAGE}.testing" not in packages[f"{PACKAGE}.train"]
    # file helpers live outside the command-line module
    assert f"{PACKAGE}.cli" not in packages[f"{PACKAGE}.models"] | packages[f"{PACKAGE}.conversion"]


def test_the_checker_sees_a_circle_and_a_lazy_import(tmp_path):
    """The walk counts imports inside functions and finds a circle when there is one."""
    graph = import_graph()
    assert f"{PACKAGE}.models.qwen2_5_vl.tiny" in graph[f"{PACKAGE}.train.loop"]  # lazy import
    graph[f"{PACKAGE}.models.qwen2_5_vl.tiny"].add(f"{PACKAGE}.train.loop")
    assert _cycle(graph) is not None
    assert _cycle(_package_graph(graph)) is not None
