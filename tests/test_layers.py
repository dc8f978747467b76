"""The package's imports point one way: kernels <- ops <- autograd/library <- modules
<- fusion/distributed, with cli and perf on top. Every intra-package import is read
from the source (those inside functions too): no cycle, and no lower layer importing
a higher one. (The tuner runs ops, so ops takes its first-use hook as an argument.)"""
import ast
import pathlib

import tritonbn

ROOT = pathlib.Path(tritonbn.__file__).parent


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


def test_no_import_cycle():
    assert not cycles(import_graph()), sorted(map(sorted, cycles(import_graph())))


# bottom to top (the package itself: its version; its names load lazily); a module
# not named here (cli, perf, demo, ...) sits on top of them all
LAYERS = [("tritonbn",), ("tritonbn.kernels",), ("tritonbn.layout",), ("tritonbn.heuristics",),
          ("tritonbn.tuning", "tritonbn.tuning.cache", "tritonbn.tuning.space"),  # selection
          ("tritonbn.ops",), ("tritonbn.testing",), ("tritonbn.tuning.tuner",),
          ("tritonbn.reference", "tritonbn.autograd", "tritonbn.library"),
          ("tritonbn.functional",), ("tritonbn.modules",), ("tritonbn.distributed",),
          ("tritonbn.fusion",)]


def _rank(module: str):
    for i, layer in enumerate(LAYERS):
        if module in layer or (layer == ("tritonbn.kernels",)
                               and module.startswith("tritonbn.kernels.")):
            return i
    return None


def test_lower_layers_never_import_higher_ones():
    for module, deps in import_graph().items():
        rank = _rank(module)
        for dep in deps:
            assert rank is None or _rank(dep) is not None and _rank(dep) <= rank, \
                f"{module} imports {dep}"
