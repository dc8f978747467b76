"""The package's imports point one way: kernels <- ops <- autograd/library <- modules
<- fusion/distributed, with cli and perf on top. Every intra-package import is read
from the source (those inside functions too), and the import cycles found must be
among the one still to undo (ops <-> tuning: the tuner runs ops, and so does the
testing helper it poisons with, while ops tunes on first use): a new one fails here."""
import ast
import pathlib

import tritonbn

ROOT = pathlib.Path(tritonbn.__file__).parent
# what is left to undo, by the modules of each cycle
KNOWN_CYCLES = {frozenset({"tritonbn.ops", "tritonbn.tuning", "tritonbn.tuning.tuner",
                           "tritonbn.testing"})}


def _name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """Module -> the package's modules it imports, anywhere in its source."""
    modules = {_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import ops` imports a module
                    sub = f"{mod}.{alias.name}"
                    deps.add(sub if sub in modules else mod)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("tritonbn."))
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict) -> set:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), set()

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
            scc = set()
            while True:
                w = stack.pop()
                on.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.add(frozenset(scc))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_graph_reads_the_imports():
    graph = import_graph()
    assert "tritonbn.kernels" in graph["tritonbn.ops"]
    assert "tritonbn.ops" in graph["tritonbn.autograd"]
    assert "tritonbn.distributed" in graph["tritonbn.fusion"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}


def test_no_import_cycle_but_the_known_ones():
    found = cycles(import_graph())
    assert found <= KNOWN_CYCLES, sorted(map(sorted, found - KNOWN_CYCLES))


def test_lower_layers_never_import_higher_ones():
    order = ["kernels", "layout", "heuristics", "ops", "autograd", "library", "functional",
             "modules", "distributed", "fusion"]
    graph = import_graph()
    for i, low in enumerate(order):
        for dep in graph.get(f"tritonbn.{low}", set()):
            top = dep.split(".")[1]
            assert top not in order[i + 1:], f"{low} imports {dep}"
