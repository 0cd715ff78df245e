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

A row is bad when its id is empty or repeats an earlier row's id, its image file is missing or
cannot be decoded, its caption is empty, or one of its labels is not in the given hierarchy. By
default bad rows are left out, listed in ``skipped`` (and in ``meta.json`` of the prepared data)
and summarised on stderr; with ``data.folder.strict: true`` the first bad row raises a ValueError
naming its id, CSV line and problem. A missing CSV or hierarchy file, or a header without the
required columns, is always an error. Samples keep the CSV's row order.
"""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path

from PIL import Image

from sparc.data.base import DatasetBuild, Sample
from sparc.data.hierarchy import ROOT, Hierarchy
from sparc.params import FolderOptions

REQUIRED_COLUMNS = ("id", "image", "caption", "labels")
LABEL_SEP = "|"
SUMMARY_LINES = 20


def _readable(path: Path) -> str | None:
    """None when Pillow decodes the image, else a short reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
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
    columns, or (with ``options.strict``) the first bad row.
    """
    if not options.csv:
        raise ValueError(
            "data.folder.csv: set it to a CSV file with columns id,image,caption,labels "
            "(see README 'Bring your own data')"
        )
    csv_path = Path(options.csv)
    if not csv_path.is_file():
        raise FileNotFoundError(f"data.folder.csv: {csv_path} not found")
    hierarchy: Hierarchy | None = None
    if options.hierarchy:
        try:
            hierarchy = Hierarchy.load(options.hierarchy)
        except FileNotFoundError:
            raise FileNotFoundError(f"data.folder.hierarchy: {options.hierarchy} not found") from None
        except ValueError as err:
            raise ValueError(f"data.folder.hierarchy: {options.hierarchy}: {err}") from None
    base = csv_path.resolve().parent

    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    first_line: dict[str, int] = {}
    n_rows = 0
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames
        if not header:
            raise ValueError(f"data.folder.csv: {csv_path} is empty (expected a header row)")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"data.folder.csv: {csv_path} lacks the column(s) {', '.join(missing)} "
                f"(found: {', '.join(h for h in header if h)}; required: {', '.join(REQUIRED_COLUMNS)})"
            )
        while True:
            start_line = reader.line_num + 1
            try:
                raw = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise ValueError(f"data.folder.csv: {csv_path} line {start_line}: {err}") from None
            n_rows += 1
            row = {c: (raw.get(c) or "") for c in REQUIRED_COLUMNS}
            row["id"] = row["id"].strip()
            image, labels, problem = _row_problem(row, base, first_line, hierarchy)
            if row["id"] and row["id"] not in first_line:
                first_line[row["id"]] = start_line
            if problem is not None:
                shown = row["id"] or f"<empty id on line {start_line}>"
                if options.strict:
                    raise ValueError(
                        f"data.folder.csv: {csv_path} line {start_line}, id {shown!r}: {problem} "
                        "(data.folder.strict is true)"
                    )
                skipped.append((shown, f"line {start_line}: {problem}"))
                continue
            samples.append(Sample(row["id"], image.resolve(), row["caption"].strip(), labels))

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
        "hierarchy": str(Path(options.hierarchy).resolve()) if options.hierarchy else "",
        "n_rows": n_rows,
        "n_kept": len(samples),
        "n_skipped": len(skipped),
    }
    return DatasetBuild(samples=samples, hierarchy=hierarchy, skipped=skipped, info=info)
