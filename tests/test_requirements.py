"""requirements.txt pins every third-party package that src/sparc imports directly, so a fresh
set-up never depends on what other packages happen to pull in."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_top_level_modules(src: Path) -> set[str]:
    """Top-level names of every absolute ``import``/``from`` statement under ``src``."""
    names: set[str] = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def pinned_distributions(requirements: Path) -> dict[str, str]:
    """Normalised distribution name -> pinned version, from ``name[extras]==version`` lines."""
    pins = {}
    for line in requirements.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", line.strip())
        if match:
            pins[normalise(match.group(1))] = match.group(3)
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_direct_import_is_pinned() -> None:
    modules = imported_top_level_modules(ROOT / "src" / "sparc") - set(sys.stdlib_module_names) - {"sparc"}
    dists = packages_distributions()
    pins = pinned_distributions(ROOT / "requirements.txt")
    unpinned = {}
    for module in sorted(modules):
        names = {normalise(d) for d in dists.get(module, [])}
        assert names, f"src/ imports {module!r}, which no installed distribution provides"
        if not names & pins.keys():
            unpinned[module] = sorted(names)
    assert not unpinned, f"imported by src/ but not pinned in requirements.txt: {unpinned}"
