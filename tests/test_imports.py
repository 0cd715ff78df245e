"""The import graph of src/sparc, read with ast (imports inside functions included): no cycle, and
no edge from a lower floor to a higher one.

Floors, bottom first (a module may import its own floor and those below it):

0. params, catalog, device, paths, npz, distributed: typed parameters, the datasets and model
   families params may name, the one device picker, paths, the npz writer, torchrun plumbing
1. data: datasets, downloads, the prepared-data format
2. features, model: extractors and the feature store; the multi-stream SAE
3. train, presets: the training loop and stage; the paper settings as overrides
4. evaluate: metric functions, the encode, concepts and evaluate stages and their files (run_files)
5. localise: text-guided localisation and its stage
6. report: figures, the concept browser, the ablation tables
7. preflight, api, cli, the package itself and __main__
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
FLOORS = [
    {"params", "catalog", "device", "paths", "npz", "distributed"},
    {"data"},
    {"features", "model"},
    {"train", "presets"},
    {"evaluate"},
    {"localise"},
    {"report"},
    {"preflight", "api", "cli", "__main__", ""},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the sparc modules it imports (``from a import b`` names ``a.b`` when that is a
    module, else ``a``)."""
    modules = {module_name(p): p for p in (SRC / "sparc").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name.split(".")[0] == "sparc"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "sparc":
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    out.add(full if full in modules else node.module)
        graph[name] = {m for m in out if m in modules and m != name}
    return graph


def floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(FLOORS) if top in names)


def test_every_module_has_a_floor():
    for module in import_graph():
        floor(module)  # StopIteration names a package that has no floor yet


def test_no_import_from_a_lower_floor_to_a_higher_one():
    upward = sorted(
        f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
        for a, targets in import_graph().items() for b in targets
        if floor(b) > floor(a)
    )
    assert not upward, "\n".join(upward)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_cycles_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []
