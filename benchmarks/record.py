"""Write a benchmark's measured figure into its row of docs/benchmarks.md.

docs/benchmarks.md holds one table of measured figures (what, figure, command, machine, date)
between ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``. A benchmark run with
``--record`` calls :func:`record`, which replaces the row whose first column is ``what`` (or adds
it at the end of the table) with the figure just printed, this machine and today's date.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def machine() -> str:
    """This machine in words: CPU model and core count, and the GPU where torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    words = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            words += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return words


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def record(what: str, figure: str, command: str, path: Path = BENCHMARKS_MD,
           date: datetime.date | None = None, where: str | None = None) -> None:
    """Replace (or append) the row of ``what`` in the table of ``path``."""
    text = path.read_text(encoding="utf-8")
    a, b = text.index(BEGIN), text.index(END)
    lines = text[a:b].splitlines()
    row = (f"| {_cell(what)} | {_cell(figure)} | `{_cell(command)}` | {_cell(where or machine())} "
           f"| {(date or datetime.date.today()).isoformat()} |")
    key = f"| {_cell(what)} |"
    hits = [i for i, line in enumerate(lines) if line.startswith(key)]
    if hits:
        lines[hits[0]] = row
    else:
        lines.append(row)
    path.write_text(text[:a] + "\n".join(lines) + "\n" + text[b:], encoding="utf-8")
    print(f"recorded in {path}: {what}")
