"""The `coco` dataset: MS-COCO 2017 images, captions, and instance annotations (labels and masks).

Files (``data/raw/coco/``, fetched by the `download` stage; the layout of images.cocodataset.org):

* ``annotations/annotations_trainval2017.zip``, from which ``annotations/captions_<split>.json``
  (``images``: ``id``, ``file_name``, ``width``, ``height``; ``annotations``: ``id``,
  ``image_id``, ``caption``) and ``annotations/instances_<split>.json`` (``categories``: ``id``,
  ``name``, ``supercategory``; ``annotations``: ``id``, ``image_id``, ``category_id``,
  ``segmentation`` (polygons, or uncompressed RLE when ``iscrowd`` is 1), ``area``, ``bbox`` as
  x, y, w, h in pixels, ``iscrowd``) are extracted;
* ``<split>/<file_name>``: the images (``000000039769.jpg``).

Samples (``data.coco``): images in id order (the order of torchvision's CocoCaptions, which the
reference read), the first ``max_images`` of each split (0 = all), images without a caption left
out. ``captions: join`` (the reference): one sample per image, id = the file name's stem, caption
= the image's captions in file order, each stripped, joined with one space; ``captions: each``:
one sample per caption, id ``<stem>_<caption id>``, group = the stem (an image's captions never
fall on both sides of a split; retrieval evaluates one caption per image). Labels: the
categories of the image's instances (crowd regions included), in category id order. Splits:
val2017 is the test split (the paper's localisation and retrieval set; COCO's own test set has
no annotations), train2017 is split by image into train and val (``data.val_fraction``).

Hierarchy: root > ``supercategory:<name>`` (12) > category name (80), in category id order.

Masks: every kept image's instances are written to the prepared data's ``annotations.jsonl``
(group = stem: ``split``, ``file_name``, ``width``, ``height``, ``instances`` with ``id``,
``category``, ``category_id``, ``bbox``, ``area``, ``iscrowd``, ``segmentation`` as in the
source), read back with :func:`sparc.data.prepared.load_annotations`; :func:`instance_mask` and
:func:`category_mask` (the localisation protocol: the union of a category's instances) decode
them with Pillow and NumPy.

Memory: ``instances_train2017.json`` is 448 MB and takes several GB as Python objects while the
dataset is prepared; val2017 alone needs well under 1 GB.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

from sparc.data.base import DatasetBuild, Sample
from sparc.data.download import (
    DownloadResult,
    FileRecord,
    RemoteFile,
    download_files,
    file_md5,
    raw_dir,
    read_manifest,
    write_manifest,
)
from sparc.data.hierarchy import Hierarchy
from sparc.params import CocoOptions

DATASET = "coco"
HOST = "http://images.cocodataset.org"
ANNOTATIONS_ZIP = "annotations/annotations_trainval2017.zip"
# COCO split -> this project's split (trainval: hashed into train and val by image).
SPLITS = {"train2017": "trainval", "val2017": "test"}
_FILE_NAME = re.compile(r"[0-9A-Za-z_.-]+")


def captions_path(split: str) -> str:
    return f"annotations/captions_{split}.json"


def instances_path(split: str) -> str:
    return f"annotations/instances_{split}.json"


def image_path(split: str, file_name: str) -> str:
    return f"{split}/{file_name}"


def extract_annotations(raw: Path, splits: list[str]) -> dict[str, FileRecord]:
    """Extract the captions and instances JSON of ``splits`` from the annotations zip (a member
    already extracted with the right size is kept); returns their records."""
    records: dict[str, FileRecord] = {}
    with zipfile.ZipFile(raw / ANNOTATIONS_ZIP) as zf:
        members = {info.filename: info for info in zf.infolist()}
        for split in splits:
            for member in (captions_path(split), instances_path(split)):
                if member not in members:
                    raise ValueError(f"{raw / ANNOTATIONS_ZIP} has no {member}")
                dest = raw / member
                if not (dest.is_file() and dest.stat().st_size == members[member].file_size):
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_name(dest.name + ".tmp")
                    with zf.open(member) as src, tmp.open("wb") as out:
                        while chunk := src.read(1 << 20):
                            out.write(chunk)
                    os.replace(tmp, dest)
                records[member] = FileRecord(dest.stat().st_size, file_md5(dest))
    return records


def load_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the download stage first (dvc repro download)")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def captions_by_image(captions: dict) -> dict[int, list[dict]]:
    """``image_id -> caption annotations`` in file order."""
    out: dict[int, list[dict]] = {}
    for ann in captions.get("annotations", []):
        out.setdefault(int(ann["image_id"]), []).append(ann)
    return out


def select_images(captions: dict, max_images: int) -> list[dict]:
    """Image entries with at least one caption, in id order; the first ``max_images`` (0 = all).
    ValueError for a file name that is not a plain name."""
    have = captions_by_image(captions)
    images = sorted((img for img in captions.get("images", []) if int(img["id"]) in have), key=lambda i: int(i["id"]))
    for img in images:
        if not _FILE_NAME.fullmatch(str(img.get("file_name", ""))):
            raise ValueError(f"COCO image {img.get('id')}: file_name {img.get('file_name')!r} is not a plain name")
    return images[:max_images] if max_images > 0 else images


def build_hierarchy(categories: list[dict]) -> Hierarchy:
    """root > ``supercategory:<name>`` > category name, in category id order."""
    parents: dict[str, str | None] = {}
    names: dict[str, str] = {}
    for cat in sorted(categories, key=lambda c: int(c["id"])):
        sup = f"supercategory:{cat['supercategory']}"
        parents.setdefault(sup, None)
        names[sup] = str(cat["supercategory"])
        if parents.setdefault(str(cat["name"]), sup) != sup:
            raise ValueError(f"COCO category {cat['name']!r} is listed under two supercategories")
        names[str(cat["name"])] = str(cat["name"])
    return Hierarchy.from_parents(parents, names)


def download_coco(options: CocoOptions, raw: Path, *, base_url: str = "", workers: int = 16, **kwargs) -> Path:
    """The `download` stage for coco: the annotations zip, its JSON for ``options.splits``, then
    the selected images; returns the manifest path."""
    zipped = download_files([RemoteFile(ANNOTATIONS_ZIP, f"{HOST}/{ANNOTATIONS_ZIP}", "zip")], raw,
                            dataset=DATASET, base_url=base_url, workers=workers, desc="coco annotations", **kwargs)
    extracted = extract_annotations(raw, options.splits)
    images: list[RemoteFile] = []
    counts = {}
    for split in options.splits:
        chosen = select_images(load_json(raw / captions_path(split)), options.max_images)
        counts[split] = len(chosen)
        images += [
            RemoteFile(image_path(split, img["file_name"]), f"{HOST}/{split}/{img['file_name']}", "jpeg", optional=True)
            for img in chosen
        ]
    got = download_files(images, raw, dataset=DATASET, base_url=base_url, workers=workers,
                         desc="coco images", **kwargs)
    if got.unavailable:
        print(f"coco: {len(got.unavailable)} image(s) unavailable on the server "
              f"(listed in {raw / 'manifest.json'})", file=sys.stderr)
    result = DownloadResult(records={**zipped.records, **extracted, **got.records}, unavailable=got.unavailable)
    info = {"splits": list(options.splits), "max_images": options.max_images, "images": counts}
    return write_manifest(raw, DATASET, result, info)


def _instance(ann: dict, names: dict[int, str]) -> dict:
    return {
        "id": ann["id"],
        "category": names[int(ann["category_id"])],
        "category_id": int(ann["category_id"]),
        "bbox": ann.get("bbox"),
        "area": ann.get("area"),
        "iscrowd": int(ann.get("iscrowd", 0)),
        "segmentation": ann.get("segmentation"),
    }


def build_coco(options: CocoOptions, work_dir: Path, *, raw: Path | None = None) -> DatasetBuild:
    """The samples of the downloaded splits (module docstring); images are read in place.

    Raises FileNotFoundError when the download is missing or incomplete, ValueError for
    malformed annotation files or categories that differ between splits.
    """
    raw = Path(raw) if raw is not None else raw_dir(DATASET)
    unavailable = read_manifest(raw).get("unavailable", {})
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    missing: list[str] = []
    annotations: dict[str, dict] = {}
    categories: list[dict] | None = None
    per_split: dict[str, dict] = {}
    for split in options.splits:
        captions = load_json(raw / captions_path(split))
        instances = load_json(raw / instances_path(split))
        cats = sorted(instances.get("categories", []), key=lambda c: int(c["id"]))
        if categories is None:
            categories = cats
        elif cats != categories:
            raise ValueError(f"coco: the categories of {split} differ from those of {options.splits[0]}")
        names = {int(c["id"]): str(c["name"]) for c in cats}
        by_image: dict[int, list[dict]] = {}
        for ann in instances.get("annotations", []):
            by_image.setdefault(int(ann["image_id"]), []).append(ann)
        caps = captions_by_image(captions)
        n_before = len(samples)
        chosen = select_images(captions, options.max_images)
        for img in chosen:
            stem = Path(img["file_name"]).stem
            rel = image_path(split, img["file_name"])
            if rel in unavailable:
                skipped.append((stem, f"image {rel} unavailable on the server ({unavailable[rel]})"))
                continue
            if not (raw / rel).is_file():
                missing.append(rel)
                continue
            insts = by_image.get(int(img["id"]), [])
            labels = tuple(names[c] for c in sorted({int(a["category_id"]) for a in insts}))
            texts = [(a["id"], str(a["caption"]).strip()) for a in caps[int(img["id"])]]
            texts = [(i, t) for i, t in texts if t]
            if not texts:
                skipped.append((stem, "only empty captions"))
                continue
            image = raw / rel
            if options.captions == "join":
                samples.append(Sample(stem, image, " ".join(t for _, t in texts), labels, group=stem,
                                      split=SPLITS[split]))
            else:
                samples += [Sample(f"{stem}_{i}", image, t, labels, group=stem, split=SPLITS[split])
                            for i, t in texts]
            annotations[stem] = {
                "split": split,
                "file_name": img["file_name"],
                "width": img.get("width"),
                "height": img.get("height"),
                "instances": [_instance(a, names) for a in insts],
            }
        per_split[split] = {"images": len(chosen), "samples": len(samples) - n_before}
    if missing:
        raise FileNotFoundError(
            f"coco: {len(missing)} image(s) of the selection are not in {raw} (first: {missing[0]}); "
            "run the download stage (dvc repro download)"
        )
    hierarchy = build_hierarchy(categories or [])
    info = {"raw": str(raw), "captions": options.captions, "splits": per_split}
    return DatasetBuild(samples, hierarchy, skipped=skipped, info=info, annotations=annotations,
                        portable_paths=True)


def instance_mask(instance: dict, width: int, height: int) -> np.ndarray:
    """``[height, width]`` bool mask of one instance: polygons (``[[x1, y1, x2, y2, ...], ...]``,
    filled with Pillow) or uncompressed RLE (``{"counts": [...], "size": [h, w]}``: alternating
    runs of 0 and 1 in column-major order). ValueError for compressed (string) RLE."""
    seg = instance["segmentation"]
    if isinstance(seg, list):
        from PIL import Image, ImageDraw

        canvas = Image.new("1", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in seg:
            if len(poly) >= 6:
                draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)], fill=1)
        return np.array(canvas, dtype=bool)
    if isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        h, w = (int(v) for v in seg["size"])
        flat = np.zeros(h * w, dtype=bool)
        pos = 0
        for k, run in enumerate(seg["counts"]):
            if k % 2:
                flat[pos : pos + int(run)] = True
            pos += int(run)
        return flat.reshape(w, h).T
    raise ValueError(f"instance {instance.get('id')}: unsupported segmentation (compressed RLE needs pycocotools)")


def category_mask(image_annotations: dict, category: str) -> np.ndarray:
    """``[height, width]`` bool union of the masks of ``category``'s instances in one image (the
    localisation protocol's ground truth); all False when the image has none."""
    w, h = int(image_annotations["width"]), int(image_annotations["height"])
    mask = np.zeros((h, w), dtype=bool)
    for inst in image_annotations["instances"]:
        if inst["category"] == category:
            mask |= instance_mask(inst, w, h)
    return mask
