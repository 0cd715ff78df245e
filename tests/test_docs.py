"""README.md and docs/: every relative link and anchor resolves, and every command they name
(``python -m sparc <command>``, ``make <target>``) exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sparc.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def prose(text: str) -> str:
    """``text`` without its fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings (``-1``, ``-2`` for repeated ones)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def test_slug_follows_github():
    assert slug("Open Images and COCO (downloaded)") == "open-images-and-coco-downloaded"
    assert slug("Without the weights: the paper's architectures, and the run's cost") == (
        "without-the-weights-the-papers-architectures-and-the-runs-cost")
    assert slug("Set-up: two commands") == "set-up-two-commands"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path):
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_commands_exist(page: Path):
    text = page.read_text(encoding="utf-8")
    named = set(re.findall(r"python -m sparc (?:--params \S+ )?([a-z][\w-]*)", text))
    assert named <= set(COMMANDS), f"{page.name}: no such command: {sorted(named - set(COMMANDS))}"
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    code = " ".join(re.findall(r"`([^`\n]+)`", FENCE.sub("", text))) + "\n" + "\n".join(FENCE.findall(text))
    made = set(re.findall(r"(?:^|[\s`])make ([a-z][\w-]*)", code, re.M))
    assert made <= targets, f"{page.name}: no such make target: {sorted(made - targets)}"


def test_docs_map_lists_every_page():
    """The README's documentation map links every page of docs/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme) if t.startswith("docs/")}
    pages = {p.name for p in PAGES[1:]}
    assert pages <= linked, f"not in README's map: {sorted(pages - linked)}"
