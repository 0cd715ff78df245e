"""The `openimages` dataset: Open Images V7 images with Localized Narratives captions (the paper's).

Files (``data/raw/openimages/``, fetched by the `download` stage; real URLs in ``URLS``):

* ``narratives/open_images_<split>_captions.jsonl`` (train: ``open_images_train_v6_captions.jsonl``):
  Localized Narratives, captions only: one JSON object per line with ``dataset_id``, ``image_id``,
  ``annotator_id`` and ``caption`` (the full ``*_localized_narratives.jsonl`` files carry the
  same records plus mouse traces and timing: about 30 times larger, and read the same way);
* ``labels/<split>-annotations-human-imagelabels-boxable.csv``: ``ImageID,Source,LabelName,
  Confidence``, the human-verified image labels of the 600 boxable classes; ``Confidence`` 1 is
  a positive label (0 = verified absent: not kept);
* ``metadata/oidv7-class-descriptions-boxable.csv``: ``LabelName,DisplayName`` (a MID such as
  ``/m/0cmf2`` and its name; a file without the header row is read the same);
* ``metadata/bbox_labels_600_hierarchy.json``: the class tree, nodes
  ``{"LabelName": mid, "Subcategory": [...], "Part": [...]}`` under the root ``/m/0bl9f``;
* ``<split>/<ImageID>.jpg``: the images (the ``open-images-dataset`` bucket's layout).

Samples: one per (image, narrative) pair, as the paper (its test split: 126,020 pairs, some
images carrying several narratives): id ``<ImageID>_<k>`` (the k-th narrative of
the image in file order), the caption as written (surrounding spaces removed), the image's
positive labels that are in the hierarchy, group = the ImageID (an image's narratives never
fall on both sides of a split), split = the official one (train, validation -> val, test).
``max_images: N`` keeps the first N images of each split in narrative-file order, with all
their narratives. Images the server does not have are left out and listed in ``skipped``.

Hierarchy (:func:`convert_hierarchy`): the ``Subcategory`` tree with the root ``/m/0bl9f`` as
this project's root, so depths match method.md (root 0, leaves at most 5). A label listed in
several places takes its deepest occurrence (the first of equally deep ones); ``Part`` lists
(parts of an object, not kinds of it) place nothing, as in the reference code; a boxable class
that the tree does not place hangs from the root. Display names come from the class
descriptions.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sparc.data.base import DatasetBuild, Sample
from sparc.data.download import (
    DownloadResult,
    RemoteFile,
    download_files,
    raw_dir,
    read_manifest,
    write_manifest,
)
from sparc.data.hierarchy import Hierarchy
from sparc.params import OpenImagesOptions

DATASET = "openimages"
ROOT_MID = "/m/0bl9f"
# Official split -> this project's split.
SPLITS = {"train": "train", "validation": "val", "test": "test"}
_GCS = "https://storage.googleapis.com"
URLS = {
    "classes": f"{_GCS}/openimages/v7/oidv7-class-descriptions-boxable.csv",
    "hierarchy": f"{_GCS}/openimages/2018_04/bbox_labels_600_hierarchy.json",
    "labels": f"{_GCS}/openimages/v5/{{split}}-annotations-human-imagelabels-boxable.csv",
    "narratives": f"{_GCS}/localized-narratives/annotations/{{name}}",
    "images": "https://open-images-dataset.s3.amazonaws.com/{split}/{image_id}.jpg",
}
CLASSES_PATH = "metadata/oidv7-class-descriptions-boxable.csv"
HIERARCHY_PATH = "metadata/bbox_labels_600_hierarchy.json"
_IMAGE_ID = re.compile(r"[0-9A-Za-z_-]+")


@dataclass(frozen=True)
class Narrative:
    """One Localized Narrative: the image it describes, its annotator and its caption."""

    image_id: str
    annotator_id: str
    caption: str


def narratives_path(split: str) -> str:
    name = "open_images_train_v6_captions.jsonl" if split == "train" else f"open_images_{split}_captions.jsonl"
    return f"narratives/{name}"


def labels_path(split: str) -> str:
    return f"labels/{split}-annotations-human-imagelabels-boxable.csv"


def image_path(split: str, image_id: str) -> str:
    return f"{split}/{image_id}.jpg"


def metadata_files(splits: list[str]) -> list[RemoteFile]:
    """The class list, the hierarchy, and each split's labels and narratives."""
    files = [
        RemoteFile(CLASSES_PATH, URLS["classes"], "csv"),
        RemoteFile(HIERARCHY_PATH, URLS["hierarchy"], "json"),
    ]
    for split in splits:
        files.append(RemoteFile(labels_path(split), URLS["labels"].format(split=split), "csv"))
        name = narratives_path(split).split("/", 1)[1]
        files.append(RemoteFile(narratives_path(split), URLS["narratives"].format(name=name), "jsonl"))
    return files


def read_narratives(path: Path) -> list[Narrative]:
    """The narratives of one JSONL file in file order; ValueError naming the line when a line is
    not JSON, lacks ``image_id``/``caption`` or has an image id that is not a plain name."""
    out: list[Narrative] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                image_id, caption = str(obj["image_id"]), obj["caption"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path} line {lineno}: not a Localized Narrative ({err})") from None
            if not _IMAGE_ID.fullmatch(image_id):
                raise ValueError(f"{path} line {lineno}: image_id {image_id!r} is not a plain id")
            out.append(Narrative(image_id, str(obj.get("annotator_id", "")), str(caption or "")))
    return out


def select_images(narratives: list[Narrative], max_images: int) -> list[str]:
    """Image ids in order of first narrative; the first ``max_images`` of them (0 = all)."""
    ids = list(dict.fromkeys(n.image_id for n in narratives))
    return ids[:max_images] if max_images > 0 else ids


def read_class_descriptions(path: Path) -> dict[str, str]:
    """``LabelName -> DisplayName``; the header row is optional (older files have none)."""
    names: dict[str, str] = {}
    with Path(path).open(encoding="utf-8-sig", newline="") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if not row or (i == 0 and row[0] == "LabelName"):
                continue
            if len(row) < 2:
                raise ValueError(f"{path} line {i + 1}: expected LabelName,DisplayName, got {row}")
            names[row[0].strip()] = row[1].strip()
    if not names:
        raise ValueError(f"{path}: no class descriptions")
    return names


def read_image_labels(path: Path, image_ids: set[str]) -> tuple[dict[str, list[str]], Counter]:
    """Positive labels (``Confidence`` 1) of the images in ``image_ids``, in file order without
    repeats, and counts of the rows read (``positive``, ``negative``, ``other_images``)."""
    labels: dict[str, list[str]] = {}
    counts: Counter = Counter()
    with Path(path).open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"ImageID", "LabelName", "Confidence"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: lacks the column(s) {', '.join(sorted(missing))}")
        for row in reader:
            image_id = row["ImageID"]
            if image_id not in image_ids:
                counts["other_images"] += 1
                continue
            try:
                positive = float(row["Confidence"]) == 1.0
            except ValueError:
                raise ValueError(f"{path} line {reader.line_num}: Confidence {row['Confidence']!r}") from None
            if not positive:
                counts["negative"] += 1
                continue
            counts["positive"] += 1
            got = labels.setdefault(image_id, [])
            if row["LabelName"] not in got:
                got.append(row["LabelName"])
    return labels, counts


def convert_hierarchy(tree: dict, names: dict[str, str] | None = None) -> tuple[Hierarchy, dict]:
    """This project's :class:`Hierarchy` from ``bbox_labels_600_hierarchy.json`` (module docstring).

    ``tree``'s root label becomes the hierarchy root; every other ``LabelName`` reached through
    ``Subcategory`` lists is placed at its deepest occurrence (ties: the first in document
    order); ``names`` (class descriptions) gives display names, and its labels missing from the
    tree hang from the root. Returns the hierarchy and info: ``root``, ``multi_placed`` (label ->
    depths of its occurrences, for labels listed more than once) and ``outside_tree``.
    """
    if not isinstance(tree, dict) or not isinstance(tree.get("LabelName"), str):
        raise ValueError("hierarchy JSON: expected an object with a LabelName at the top")
    root = tree["LabelName"]
    best: dict[str, tuple[int, str | None]] = {}
    depths: dict[str, list[int]] = {}

    def visit(node: object, parent: str | None, depth: int) -> None:
        if not isinstance(node, dict) or not isinstance(node.get("LabelName"), str):
            raise ValueError(f"hierarchy JSON: a Subcategory entry under {parent or root} has no LabelName")
        label = node["LabelName"]
        depths.setdefault(label, []).append(depth)
        if label not in best or depth > best[label][0]:
            best[label] = (depth, parent)
        children = node.get("Subcategory", [])
        if not isinstance(children, list):
            raise ValueError(f"hierarchy JSON: Subcategory of {label} is not a list")
        for child in children:
            visit(child, label, depth + 1)

    for child in tree.get("Subcategory", []):
        visit(child, None, 1)
    if root in best:
        raise ValueError(f"hierarchy JSON: the root {root} is listed again inside the tree")
    parents: dict[str, str | None] = {label: parent for label, (_, parent) in best.items()}
    names = dict(names or {})
    outside = [label for label in names if label not in parents and label != root]
    for label in outside:
        parents[label] = None
    hierarchy = Hierarchy.from_parents(parents, {lab: names.get(lab, lab) for lab in parents})
    info = {
        "root": root,
        "multi_placed": {lab: d for lab, d in depths.items() if len(d) > 1},
        "outside_tree": sorted(outside),
    }
    return hierarchy, info


def download_openimages(
    options: OpenImagesOptions, raw: Path, *, base_url: str = "", workers: int = 16, **kwargs
) -> Path:
    """The `download` stage for openimages: metadata first, then the selected images of each
    split (see :mod:`sparc.data.download`); returns the manifest path."""
    meta = download_files(metadata_files(options.splits), raw, dataset=DATASET, base_url=base_url,
                          workers=workers, desc="openimages metadata", **kwargs)
    images: list[RemoteFile] = []
    counts = {}
    for split in options.splits:
        chosen = select_images(read_narratives(raw / narratives_path(split)), options.max_images)
        counts[split] = len(chosen)
        images += [
            RemoteFile(image_path(split, i), URLS["images"].format(split=split, image_id=i), "jpeg", optional=True)
            for i in chosen
        ]
    got = download_files(images, raw, dataset=DATASET, base_url=base_url, workers=workers,
                         desc="openimages images", **kwargs)
    result = DownloadResult(records={**meta.records, **got.records}, unavailable=got.unavailable)
    if got.unavailable:
        print(f"openimages: {len(got.unavailable)} image(s) unavailable on the server "
              f"(listed in {raw / 'manifest.json'})", file=sys.stderr)
    info = {"splits": list(options.splits), "max_images": options.max_images, "images": counts}
    return write_manifest(raw, DATASET, result, info)


def build_openimages(options: OpenImagesOptions, work_dir: Path, *, raw: Path | None = None) -> DatasetBuild:
    """The samples of the downloaded splits (module docstring); images are read in place.

    Raises FileNotFoundError when the download is missing or incomplete (images of the
    selection neither present nor unavailable), ValueError for malformed files.
    """
    raw = Path(raw) if raw is not None else raw_dir(DATASET)
    unavailable = read_manifest(raw).get("unavailable", {})
    names = read_class_descriptions(raw / CLASSES_PATH)
    hierarchy, hinfo = convert_hierarchy(json.loads((raw / HIERARCHY_PATH).read_text(encoding="utf-8")), names)
    known = set(hierarchy.labels)
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    missing: list[str] = []
    per_split: dict[str, dict] = {}
    for split in options.splits:
        narratives = read_narratives(raw / narratives_path(split))
        chosen = set(select_images(narratives, options.max_images))
        labels, counts = read_image_labels(raw / labels_path(split), chosen)
        outside = Counter(lab for labs in labels.values() for lab in labs if lab not in known)
        seen: Counter = Counter()
        n_before = len(samples)
        for n in narratives:
            if n.image_id not in chosen:
                continue
            sid = f"{n.image_id}_{seen[n.image_id]}"
            seen[n.image_id] += 1
            rel = image_path(split, n.image_id)
            if rel in unavailable:
                skipped.append((sid, f"image {rel} unavailable on the server ({unavailable[rel]})"))
                continue
            if not (raw / rel).is_file():
                missing.append(rel)
                continue
            if not n.caption.strip():
                skipped.append((sid, "empty caption"))
                continue
            image_labels = tuple(lab for lab in labels.get(n.image_id, []) if lab in known)
            samples.append(Sample(sid, raw / rel, n.caption.strip(), image_labels, group=n.image_id,
                                  split=SPLITS[split]))
        per_split[split] = {
            "narratives": sum(seen.values()),
            "images": len(chosen),
            "samples": len(samples) - n_before,
            "label_rows": dict(sorted(counts.items())),
            "labels_outside_hierarchy": sum(outside.values()),
        }
    if missing:
        raise FileNotFoundError(
            f"openimages: {len(missing)} image(s) of the selection are not in {raw} (first: {missing[0]}); "
            "run the download stage (dvc repro download)"
        )
    info = {"raw": str(raw), "splits": per_split, "hierarchy": hinfo, "n_classes": len(names)}
    return DatasetBuild(samples, hierarchy, skipped=skipped, info=info, portable_paths=True)
