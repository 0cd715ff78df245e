"""The `folder` dataset: bring your own images, captions and labels as a CSV file.

Format
------

``data.folder.csv`` names a CSV file (UTF-8, a byte-order mark is tolerated, comma-separated,
standard quoting so captions may hold commas, quotes and line breaks) with a header row and at
least these columns, in any order (other columns are ignored)::

    id,image,caption,labels
    cat_001,images/cat_001.jpg,"A grey cat asleep on a sofa, paws tucked in",animal/cat|indoor
    dog_007,/data/photos/dog_007.png,A dog catching a frisbee,animal/dog
    sky_003,images/sky_003.jpg,Clouds over the sea,

* ``id``: a unique, non-empty sample id (kept as written, surrounding spaces removed);
* ``image``: the image file, relative to the CSV file's directory or absolute; any format Pillow
  reads (transparency is composited onto white when features are extracted);
* ``caption``: the text that goes with the image, non-empty;
* ``labels``: label ids separated by ``|`` (spaces around each id are removed); may be empty.
  Labels are used for the concept and retrieval evaluations; a label may be a leaf or an inner
  node of the hierarchy.

An optional ``group`` column names what rows have in common when several captions describe one
image (an image id; usually the same for rows with the same ``image``): rows of one group always
fall in the same split (the split hashes the group, not the row id), and retrieval evaluates one
caption per group. Empty or absent = the row is its own group.

``data.folder.hierarchy`` optionally names a JSON file with the label tree::

    {"labels": [
      {"id": "animal",     "name": "Animal", "parent": null},
      {"id": "animal/cat", "name": "Cat",    "parent": "animal"},
      {"id": "animal/dog", "name": "Dog",    "parent": "animal"},
      {"id": "indoor",     "name": "Indoor", "parent": null}
    ]}

``parent`` null, empty or missing puts a label at the top level; ``name`` defaults to the id. The
tree must have no cycles and every parent must be listed. Without this file the hierarchy is flat:
every label seen in the CSV (sorted) is a child of the root. ``__root__`` is reserved.

Both paths are relative to the working directory (the repository root under DVC) or absolute.

Bad rows
--------

A row is bad when

* its quoting is broken (see below);
* it has fewer or more fields than the header has columns (an unquoted comma in a caption is the
  usual cause of more; extra columns are fine when the header names them);
* one of the id, image, caption or labels fields holds a byte that is not UTF-8 (the file is read
  as bytes and decoded leniently, so such a byte spoils only its row; one in another column is
  ignored like the column itself);
* its id is empty or repeats an earlier row's id, its image file is missing or cannot be decoded,
  its caption is empty, or one of its labels is not in the given hierarchy.

By default bad rows are left out, listed in ``skipped`` (and in ``meta.json`` of the prepared
data) and summarised on stderr, one line each with the row's first CSV line, its id, the problem
and how to fix it; with ``data.folder.strict: true`` the first bad row raises a ValueError saying
the same, with the CSV file. A missing CSV or hierarchy file, or a header without the required
columns, with broken quoting or with a byte that is not UTF-8, is always an error. Samples keep
the CSV's row order.

Quoting is broken when the CSV reader, in strict mode, finds a quoted field that runs to the end
of the file or a closing quote followed by something other than a comma or line end, or when a
record spans three or more lines and one of the lines between its first and its last reads, on
its own, as a row (as many fields as the header, and an image field naming an existing file).
This is what an unterminated quote looks like: the field swallows the following rows, up to the
next quote in the file (which then usually is an opening quote, followed by text). Such a
row is reported on the line it starts, with the id read from that line alone, and reading goes on
from the next line, so the swallowed rows are read as rows again. A quoted caption with line
breaks inside properly closed quotes is fine; write a quote inside a quoted field as ``""``.
"""

from __future__ import annotations

import csv
import io
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from sparc.data.base import DatasetBuild, Sample
from sparc.data.hierarchy import ROOT, Hierarchy
from sparc.data.images import to_8bit
from sparc.params import FolderOptions

REQUIRED_COLUMNS = ("id", "image", "caption", "labels")
GROUP_COLUMN = "group"  # optional: the image a row shows, shared by its other captions
LABEL_SEP = "|"
SUMMARY_LINES = 20
# Bytes that are not UTF-8 decode to lone surrogates with errors="surrogateescape".
_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _printable(text: str) -> str:
    """``text`` with each byte that is not UTF-8 shown as U+FFFD (safe to print and to save)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _bad_byte(text: str) -> str | None:
    """'invalid UTF-8 byte 0x..' for the first byte in ``text`` that was not UTF-8, else None."""
    bad = _NOT_UTF8.search(text)
    return None if bad is None else f"invalid UTF-8 byte 0x{ord(bad.group()) - 0xDC00:02x}"


class _Lines:
    """The physical lines of a text (ends kept), iterated from a position that can be moved."""

    def __init__(self, text: str) -> None:
        self.lines = io.StringIO(text, newline="").readlines()
        self.pos = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.pos == len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


def _records(
    lines: _Lines, is_row: Callable[[list[str]], bool]
) -> Iterator[tuple[int, list[str], str | None]]:
    """(first line, fields, quoting problem or None) for each non-blank record from ``lines.pos``.

    A record with broken quoting (rules in the module docstring; ``is_row`` tells whether a line's
    fields read as a row of its own) comes with the fields of its first line alone, and reading
    resumes on the line after that.
    """
    reader = csv.reader(lines, strict=True)
    while lines.pos < len(lines.lines):
        start = lines.pos
        try:
            fields = next(reader)
        except csv.Error as err:
            if "end of data" in str(err):
                detail = "a quoted field opened in this row runs to the end of the file"
            else:
                detail = f"{err} on line {lines.pos}"
        else:
            inner = lines.lines[start + 1 : lines.pos - 1]  # lines wholly inside the record
            taken = next((start + 2 + k for k, line in enumerate(inner) if is_row(_fields(line))), None)
            detail = None
            if taken is not None:
                detail = f"a quoted field opened in this row takes in line {taken}, which reads as a row"
        if detail is not None:
            lines.pos = start + 1
            fix = 'close the quote, and write a quote inside a quoted field as ""'
            yield start + 1, _fields(lines.lines[start]), f"bad quoting ({detail}): {fix}"
        elif fields:
            yield start + 1, fields, None


def _fields(line: str) -> list[str]:
    """The fields of one physical line read on its own (a quote left open ends with the line)."""
    return next(csv.reader([line]))


def _format_problem(fields: list[str], header: list[str], row: dict[str, str]) -> str | None:
    """Too few or too many fields, or a byte that is not UTF-8 in a used column; else None."""
    if len(fields) != len(header):
        fix = (
            "give every column a value, empty ones too"
            if len(fields) < len(header)
            else "quote a field that holds commas, or name the extra column in the header"
        )
        return f"{len(fields)} fields, expected {len(header)} ({_printable(','.join(header))}): {fix}"
    for column in REQUIRED_COLUMNS:
        bad = _bad_byte(row[column])
        if bad is not None:
            return f"{bad} in column {column}: save the CSV as UTF-8"
    return None


def _readable(path: Path) -> str | None:
    """None when Pillow decodes the image and :func:`~sparc.data.images.to_8bit` can scale its
    values (16-bit or float greyscale), else a short reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                to_8bit(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return f"unreadable image {path} ({err})"
    return None


def _row_problem(
    row: dict[str, str],
    base: Path,
    first_line: dict[str, int],
    hierarchy: Hierarchy | None,
) -> tuple[Path, tuple[str, ...], str | None]:
    """Check one row; returns (image path, labels, problem or None)."""
    sample_id = row["id"]
    image = Path(row["image"].strip())
    if not image.is_absolute():
        image = base / image
    labels = tuple(x.strip() for x in row["labels"].split(LABEL_SEP) if x.strip())
    if not sample_id:
        return image, labels, "empty id"
    if sample_id in first_line:
        return image, labels, f"duplicate id (first used on line {first_line[sample_id]})"
    if not row["image"].strip():
        return image, labels, "empty image path"
    if not image.is_file():
        return image, labels, f"missing image file {image}"
    if not row["caption"].strip():
        return image, labels, "empty caption"
    for label in labels:
        if label == ROOT:
            return image, labels, f"label {ROOT!r} is reserved"
        if hierarchy is not None and label not in hierarchy.parents:
            return image, labels, f"label {label!r} is not in the hierarchy"
    problem = _readable(image)
    return image, labels, problem


def build_folder(options: FolderOptions, work_dir: Path) -> DatasetBuild:
    """Read the CSV named by ``options.csv`` (format in the module docstring).

    Images are read in place (``work_dir`` is unused). Raises FileNotFoundError for a missing CSV
    or hierarchy file, ValueError for an unset ``csv`` option, a header without the required
    columns, with broken quoting or a byte that is not UTF-8, or (with ``options.strict``) the
    first bad row.
    """
    if not options.csv:
        raise ValueError(
            "data.folder.csv: set it to a CSV file with columns id,image,caption,labels "
            "(see docs/datasets.md, 'Bring your own data')"
        )
    csv_path = Path(options.csv).expanduser()  # `~/data.csv` as a shell would read it
    if not csv_path.is_file():
        raise FileNotFoundError(f"data.folder.csv: {csv_path} not found")
    hierarchy: Hierarchy | None = None
    if options.hierarchy:
        try:
            hierarchy = Hierarchy.load(Path(options.hierarchy).expanduser())
        except FileNotFoundError:
            raise FileNotFoundError(f"data.folder.hierarchy: {options.hierarchy} not found") from None
        except ValueError as err:
            raise ValueError(f"data.folder.hierarchy: {options.hierarchy}: {err}") from None
    base = csv_path.resolve().parent

    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    first_line: dict[str, int] = {}
    n_rows = 0
    where = f"data.folder.csv: {csv_path}"
    lines = _Lines(csv_path.read_bytes().decode("utf-8-sig", errors="surrogateescape"))
    header_line, header, problem = next(_records(lines, lambda _: False), (1, [], None))
    if not header:
        raise ValueError(f"{where} is empty (expected a header row)")
    bad = _bad_byte(",".join(header))
    if problem is None and bad is not None:
        problem = f"{bad}: save the CSV as UTF-8"
    if problem is not None:
        raise ValueError(f"{where} line {header_line} (header): {problem}")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(
            f"{where} lacks the column(s) {', '.join(missing)} "
            f"(found: {', '.join(h for h in header if h)}; required: {', '.join(REQUIRED_COLUMNS)})"
        )
    index = {name: i for i, name in enumerate(header)}

    def is_row(fields: list[str]) -> bool:
        image = fields[index["image"]].strip() if len(fields) == len(header) else ""
        return bool(image) and (base / image).is_file()

    for start_line, fields, quoting in _records(lines, is_row):
        n_rows += 1
        row = {c: fields[index[c]] if index[c] < len(fields) else "" for c in REQUIRED_COLUMNS}
        row["id"] = row["id"].strip()
        group = fields[index[GROUP_COLUMN]].strip() if index.get(GROUP_COLUMN, len(fields)) < len(fields) else ""
        problem = quoting or _format_problem(fields, header, row)
        if problem is None and _bad_byte(group) is not None:
            problem = f"{_bad_byte(group)} in column {GROUP_COLUMN}: save the CSV as UTF-8"
        if problem is None:
            image, labels, problem = _row_problem(row, base, first_line, hierarchy)
            if problem is None:
                samples.append(Sample(row["id"], image.resolve(), row["caption"].strip(), labels, group=group))
        if row["id"] and row["id"] not in first_line:
            first_line[row["id"]] = start_line
        if problem is not None:
            shown = _printable(row["id"]) or f"<empty id on line {start_line}>"
            if options.strict:
                raise ValueError(
                    f"{where} line {start_line}, id {shown!r}: {problem} (data.folder.strict is true)"
                )
            skipped.append((shown, f"line {start_line}: {problem}"))

    if hierarchy is None:
        hierarchy = Hierarchy.flat(sorted({lab for s in samples for lab in s.labels}))
    if skipped:
        print(
            f"folder: {csv_path}: {n_rows} rows, {len(samples)} kept, {len(skipped)} skipped:",
            file=sys.stderr,
        )
        for sample_id, reason in skipped[:SUMMARY_LINES]:
            print(f"  {sample_id!r}: {reason}", file=sys.stderr)
        if len(skipped) > SUMMARY_LINES:
            print(f"  ... and {len(skipped) - SUMMARY_LINES} more (see meta.json)", file=sys.stderr)
    info = {
        "csv": str(csv_path.resolve()),
        "hierarchy": str(Path(options.hierarchy).expanduser().resolve()) if options.hierarchy else "",
        "n_rows": n_rows,
        "n_kept": len(samples),
        "n_skipped": len(skipped),
    }
    if GROUP_COLUMN in index:
        info["n_groups"] = len({s.group_key for s in samples})
    return DatasetBuild(samples=samples, hierarchy=hierarchy, skipped=skipped, info=info)
