"""The import graph between mlxlocal's modules keeps DESIGN.md's layers: no cycle, nothing upward.

Read from the source with `ast` (module-level and function-local imports, absolute and relative),
so a function-local import that dodges a cycle still counts as the edge it is.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

# DESIGN.md's "Layers", top to bottom (module names without "mlxlocal."; "x.*" is package x and
# everything in it). A module may import modules of its own layer or of the layers below it.
LAYERS: dict[str, list[str]] = {
    "cli": ["cli"],
    "verbs": [
        "__init__",
        "convert",
        "verify",
        "gguf_import",
        "quantize",
        "quant_plan",
        "quality",
        "calibration_text",
        "info",
        "generate",
        "chat",
        "batch",
        "serve.*",
        "evaluate",
        "plan",
        "report",
        "train.*",
        "export.*",
        "quickstart",
    ],
    "mid": ["recipe", "data", "decoding", "choices", "constraints"],
    "core": [
        "models",
        "ranks",  # mx.distributed: training and evaluation share ranks
        "rope",  # rotary embeddings models.own_rope puts into mlx-lm's models
        "sources",
        "tiny",  # the built-in model: a source like the Hub, built by sources.builtin_model
        "adapters.*",  # above checkpoint/: models.load applies adapters in memory
        "checkpoint.*",
        "errors",
        "progress",
        "resources",
        "blas",
    ],
}
# Edges inside a layer that DESIGN.md rules out: (importers, imported, why).
BASE = ["checkpoint.*", "errors", "progress", "resources", "blas"]
FORBIDDEN: list[tuple[list[str], list[str], str]] = [
    (["evaluate"], ["train.*"], "evaluation must not reach into the training engine"),
    (["convert"], ["gguf_import"], "the CLI dispatches on the source kind"),
    (["gguf_import"], ["export.*"], "shared GGUF naming lives in checkpoint/"),
    (BASE, ["models", "sources", "adapters.*"], "the base of core knows no models or adapters"),
    (["adapters.*"], ["models"], "models applies adapters, not the other way round"),
]
# What `import mlxlocal` may load: the rest comes lazily, so `mlxlocal --help` stays light.
INIT_IMPORTS = {"errors", "version"}

PACKAGE = Path(find_spec("mlxlocal").origin).parent  # found, not imported


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # file:line
    runtime: bool  # False under `if TYPE_CHECKING:`
    top_level: bool  # at module level (not inside a function)

    def __str__(self) -> str:
        return f"{self.source} → {self.target}  ({self.where})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


class _Imports(ast.NodeVisitor):
    """Every import of an mlxlocal module in one file, with where and how it happens."""

    def __init__(self, name: str, path: Path, known: set[str]):
        self.name, self.path, self.known = name, path, known
        is_package = path.name == "__init__.py"
        self.package = name if is_package and name != "__init__" else name.rpartition(".")[0]
        self.edges: list[Edge] = []
        self.depth = 0
        self.type_checking = False

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            self.type_checking = True
            for child in node.body:
                self.visit(child)
            self.type_checking = False
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "mlxlocal" or alias.name.startswith("mlxlocal."):
                self._add(self._local(alias.name), node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".") if self.package else []
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        elif node.module == "mlxlocal" or (node.module or "").startswith("mlxlocal."):
            target = self._local(node.module)
        else:
            return
        for alias in node.names:  # `from pkg import module` imports the module itself
            sub = f"{target}.{alias.name}" if target else alias.name
            self._add(sub if sub in self.known else target, node)

    def _local(self, dotted: str) -> str:
        return dotted.removeprefix("mlxlocal").removeprefix(".")

    def _add(self, target: str, node: ast.stmt) -> None:
        target = target or "__init__"
        where = f"{self.path.relative_to(PACKAGE.parent)}:{node.lineno}"
        runtime = not self.type_checking
        edge = Edge(self.name, target, where, runtime, top_level=self.depth == 0)
        if target != self.name and edge not in self.edges:
            self.edges.append(edge)


def import_graph() -> list[Edge]:
    found = modules()
    edges = []
    for name, path in found.items():
        visitor = _Imports(name, path, set(found))
        visitor.visit(ast.parse(path.read_text(), str(path)))
        edges += visitor.edges
    return edges


def matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        return module == pattern[:-2] or module.startswith(pattern[:-1])
    return module == pattern


def layer_of(module: str) -> int | None:
    for rank, patterns in enumerate(LAYERS.values()):
        if any(matches(module, p) for p in patterns):
            return rank
    return None


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if layer_of(m) is None]
    assert not unplaced, f"place these modules in LAYERS (DESIGN.md's map): {unplaced}"


def shortest_cycle(start: str, out: dict[str, list[Edge]]) -> list[Edge]:
    """The shortest path of imports from `start` back to itself (breadth first)."""
    paths: dict[str, list[Edge]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for e in out.get(v, []):
                if e.target == start:
                    return paths[v] + [e]
                if e.target not in paths:
                    paths[e.target] = paths[v] + [e]
                    following.append(e.target)
        frontier = following
    return []


def shortest_cycles(component: list[str], edges: list[Edge]) -> list[list[Edge]]:
    """For each module of a component, the shortest cycle through it (each cycle once)."""
    out: dict[str, list[Edge]] = {}
    for e in edges:
        if e.source in component and e.target in component:
            out.setdefault(e.source, []).append(e)
    found: dict[tuple[str, ...], list[Edge]] = {}
    for start in component:
        cycle = shortest_cycle(start, out)
        names = [e.source for e in cycle]
        first = names.index(min(names))
        found.setdefault(tuple(names[first:] + names[:first]), cycle)
    return [found[k] for k in sorted(found, key=lambda k: (len(k), k))]


def test_no_import_cycle():
    edges = [e for e in import_graph() if e.runtime]
    report = []
    for component in cycles(edges):
        report.append(f"modules in a cycle: {', '.join(component)}")
        for cycle in shortest_cycles(component, edges):
            path = " → ".join([e.source for e in cycle] + [cycle[0].source])
            report.append(f"  {path}\n" + "\n".join(f"    {e}" for e in cycle))
    assert not report, "\n".join(report)


def test_no_import_goes_up_a_layer_or_across_a_forbidden_edge():
    names = list(LAYERS)
    bad = []
    for e in import_graph():
        low, high = layer_of(e.source), layer_of(e.target)
        if low is not None and high is not None and high < low:
            bad.append(f"{e}: {names[low]} imports {names[high]}, a higher layer")
        for sources, targets, why in FORBIDDEN:
            if any(matches(e.source, p) for p in sources) and any(
                matches(e.target, p) for p in targets
            ):
                bad.append(f"{e}: {why}")
    assert not bad, "imports against DESIGN.md's layers:\n" + "\n".join(bad)


def test_package_init_loads_no_verb():
    extra = [
        str(e)
        for e in import_graph()
        if e.source == "__init__" and e.top_level and e.runtime and e.target not in INIT_IMPORTS
    ]
    assert not extra, (
        f"mlxlocal/__init__.py may import only {sorted(INIT_IMPORTS)} at start-up "
        "(load the rest lazily):\n" + "\n".join(extra)
    )
