"""flux_npu/patches/ has no import circle (issue 16 item 5): the graph of its modules importing one
another (at the top or inside functions) is acyclic."""

import ast
import os

import flux_npu.patches

PATCHES = os.path.dirname(flux_npu.patches.__file__)


def _edges():
    names = {f[:-3] for f in os.listdir(PATCHES) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for name in names:
        with open(os.path.join(PATCHES, name + ".py")) as f:
            tree = ast.parse(f.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[name] = deps & names
    return graph


def test_patches_import_graph_is_acyclic():
    graph = _edges()
    assert graph["bfl"] and "engine" not in graph["bfl"]  # the graph is read (bfl imports spec, routes, ...)
    state, cycles = {}, []

    def visit(n, path):
        state[n] = "open"
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d] if d in path else [n, d])
            elif d not in state:
                visit(d, path + [d])
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, f"import circles in flux_npu/patches: {cycles}"
