"""The prepared dataset: the `prepare` stage's output and every later stage's view of the data.

Layout of ``data/prepared/<dataset>/``::

    samples.csv      id, image, caption, labels ('|'-joined label ids), split, image_sha256
                     [, group: only for datasets whose samples share images]
    hierarchy.json   the label tree (see sparc.data.hierarchy)
    meta.json        dataset name, options, counts, skipped items, fingerprint
    annotations.jsonl  only where the dataset has per-image annotations (COCO's instances): one
                     JSON object per group of the kept samples, ``{"group": ..., ...}``
    images/          images the builder rendered (emoji); other datasets point at files in place
                     (absolute paths, or relative to this directory for downloaded data)

Rows are in the builder's order, optionally reduced to an evenly spread subset. The split is a
pure function of (split_seed, group), the group being the image a sample shows (the sample id
when the dataset has no groups), so samples sharing an image never fall on both sides of a
split, and a split does not move when other samples come or go. Datasets with official splits
(Open Images, COCO) keep them (:func:`assign_split`). The fingerprint is the SHA-256 of
``samples.csv`` (which holds every image's hash), so it changes whenever any id, caption,
label, split or image byte does.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from sparc.data.base import DatasetBuild, Sample
from sparc.data.hierarchy import Hierarchy
from sparc.params import DataParams

SPLITS = ("train", "val", "test")
# The fewest rows per split the pipeline can use: training needs a train row, evaluation a spread
# of test features (FVU divides by sum_b ||x_b - mean(x)||^2, zero for one row). `prepare` checks
# them before writing anything; an empty val split only loses the val metrics (a warning).
MIN_SPLIT_ROWS = {"train": 1, "test": 2}
LABEL_SEP = "|"
ANNOTATIONS = "annotations.jsonl"


def split_of(key: str, split_seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split of a group key (the image id; the sample id when the dataset has no
    groups): u = first 8 bytes of sha256(f"{seed}:{key}") / 2**64 in [0, 1);
    test if u < test_fraction, val if u < test_fraction + val_fraction, else train."""
    digest = hashlib.sha256(f"{split_seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


FIXED_SPLITS = (*SPLITS, "trainval")


def assign_split(sample: Sample, split_seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of ``sample``: its dataset's own split (``sample.split``) when it has one,
    ``trainval`` hashed into train/val only (``split_of(group, seed, val_fraction, 0)``), and
    an empty split hashed into all three by its group (:func:`split_of`)."""
    if sample.split == "":
        return split_of(sample.group_key, split_seed, val_fraction, test_fraction)
    if sample.split == "trainval":
        return split_of(sample.group_key, split_seed, val_fraction, 0.0)
    if sample.split not in SPLITS:
        raise ValueError(
            f"sample {sample.id!r} has split {sample.split!r} (known: {', '.join(FIXED_SPLITS)} or empty)"
        )
    return sample.split


def _image_field(image: Path, tmp: Path, out_dir: Path, portable: bool) -> str:
    """How samples.csv names an image: relative to the prepared directory when rendered into it
    (or, with ``portable``, wherever it lies), else absolute."""
    try:
        return image.resolve().relative_to(tmp.resolve()).as_posix()
    except ValueError:
        if portable:
            return Path(os.path.relpath(image.resolve(), out_dir.resolve())).as_posix()
        return str(image.resolve())


def spread_subset(n: int, max_samples: int) -> np.ndarray:
    """Indices of an evenly spread subset of ``max_samples`` out of ``n`` (all when 0 or >= n)."""
    if max_samples <= 0 or max_samples >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_samples).round().astype(np.int64))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_prepared(
    build: DatasetBuild,
    out_dir: Path,
    *,
    dataset: str,
    options: dict,
    max_samples: int,
    split_seed: int,
    val_fraction: float,
    test_fraction: float,
    min_rows: Mapping[str, int] | None = None,
    labels: dict | None = None,
) -> Path:
    """Write the prepared dataset atomically to ``out_dir`` (``out_dir.tmp`` then rename).

    ``labels``: where the labels came from when not from the dataset itself (meta.json's
    ``labels``, e.g. ``{"from": "captions", ...}`` from :func:`captions_as_labels`); None = the
    dataset's own labels, and meta.json has no ``labels`` key.

    Images under ``out_dir.tmp`` (rendered by the builder) are stored relative to ``out_dir``,
    like every image when ``build.portable_paths``. The ``group`` column is written only when some
    sample's group differs from its id (so datasets without groups keep their bytes).
    Raises ValueError for duplicate ids, no samples, an unknown split, a label missing from
    the hierarchy, or a split with fewer rows than ``min_rows[split]`` (split -> minimum; None = no
    minimum); the checks run before anything is written.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    samples = build.samples
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{dataset}: duplicate sample id {dup!r}")
    if not samples:
        raise ValueError(f"{dataset}: no usable samples")
    keep = spread_subset(len(samples), max_samples)
    grouped = any(s.group_key != s.id for s in samples)
    known = set(build.hierarchy.labels)
    rows = []
    for i in keep:
        s = samples[i]
        for label in s.labels:
            if label not in known:
                raise ValueError(f"{dataset}: sample {s.id!r} has label {label!r} not in the hierarchy")
            if LABEL_SEP in label:
                raise ValueError(f"{dataset}: sample {s.id!r} has label {label!r} containing {LABEL_SEP!r}")
        image = Path(s.image)
        row = {
            "id": s.id,
            "image": _image_field(image, tmp, out_dir, build.portable_paths),
            "caption": s.caption,
            "labels": LABEL_SEP.join(s.labels),
            "split": assign_split(s, split_seed, val_fraction, test_fraction),
            "image_sha256": file_sha256(image),
        }
        if grouped:
            row["group"] = s.group_key
        rows.append(row)
    counts = {sp: sum(r["split"] == sp for r in rows) for sp in SPLITS}
    check_split_sizes(dataset, counts, min_rows or {})
    tmp.mkdir(parents=True, exist_ok=True)
    # Rendered images that did not make the subset are removed.
    kept_images = {r["image"] for r in rows}
    for f in sorted(tmp.rglob("*")):
        if f.is_file() and f.relative_to(tmp).as_posix() not in kept_images:
            f.unlink()
    with (tmp / "samples.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    build.hierarchy.save(tmp / "hierarchy.json")
    kept_groups = list(dict.fromkeys(samples[i].group_key for i in keep))
    if build.annotations:
        with (tmp / ANNOTATIONS).open("w", encoding="utf-8") as fh:
            for group in kept_groups:
                if group in build.annotations:
                    fh.write(json.dumps({"group": group, **build.annotations[group]}, ensure_ascii=False) + "\n")
    meta = {
        "dataset": dataset,
        "options": options,
        "n_samples": len(rows),
        "n_source": len(samples),
        "splits": counts,
        "split_seed": split_seed,
        "n_labels": len(build.hierarchy.labels),
        "hierarchy_depth": build.hierarchy.max_depth,
        "skipped": [{"id": i, "reason": r} for i, r in build.skipped],
        "info": build.info,
        "fingerprint": file_sha256(tmp / "samples.csv"),
    }
    if grouped:
        meta["n_groups"] = len(kept_groups)
    if labels is not None:
        meta["labels"] = labels
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    # Swap in: the old output is moved aside first, so a crash never leaves out_dir half-written.
    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
    return out_dir


def check_split_sizes(dataset: str, counts: Mapping[str, int], min_rows: Mapping[str, int]) -> None:
    """ValueError naming the split sizes when a split has fewer than ``min_rows[split]`` rows;
    a warning on stderr for an empty val split (no val metrics) when ``min_rows`` is given."""
    sizes = f"{sum(counts.values())} samples split train {counts['train']} / val {counts['val']} / test {counts['test']}"
    short = [f"{need} {sp}" for sp, need in min_rows.items() if counts[sp] < need]
    if short:
        raise ValueError(
            f"{dataset}: {sizes}; the pipeline needs at least {' and '.join(short)} samples: add samples, "
            "or change data.val_fraction / data.test_fraction (or data.split_seed)"
        )
    if min_rows and counts["val"] == 0:
        print(f"warning: {dataset}: {sizes}; the val split is empty, so training reports no val metrics",
              file=sys.stderr)


@dataclass(frozen=True)
class PreparedIndex:
    """The rows of a prepared dataset without their content: ids and splits in row order, and
    ``meta.json`` (what the stages that only align and split rows need: train, encode)."""

    root: Path
    ids: list[str]
    splits: np.ndarray  # [N] str: train | val | test
    meta: dict

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def __len__(self) -> int:
        return len(self.ids)

    def indices(self, split: str) -> np.ndarray:
        """Row indices of ``split`` (train | val | test), ascending."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        return np.flatnonzero(self.splits == split)


@dataclass(frozen=True)
class PreparedData(PreparedIndex):
    """A prepared dataset read back: parallel lists in row order plus the hierarchy."""

    images: list[Path]
    captions: list[str]
    labels: list[tuple[str, ...]]
    hierarchy: Hierarchy
    groups: list[str]  # the image each row shows (its id when the dataset has no groups)

    def one_per_group(self, rows: np.ndarray) -> np.ndarray:
        """The subset of ``rows`` (ascending row indices) that are the first row of their group:
        one caption per image. Equals ``rows`` when no two rows share a group."""
        seen: set[str] = set()
        keep = []
        for i in rows:
            group = self.groups[int(i)]
            if group not in seen:
                seen.add(group)
                keep.append(int(i))
        return np.asarray(keep, dtype=np.asarray(rows).dtype if len(rows) else np.int64)


def _require(root: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"prepared dataset incomplete: {root / name} is missing (run `dvc repro prepare`)"
            )


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector: a bulk read makes millions of acyclic containers,
    which it would otherwise scan again and again (half the time of reading 1.8M rows)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_prepared_index(root: str | Path) -> PreparedIndex:
    """The ids and splits of ``data/prepared/<dataset>`` (and its meta.json), without captions,
    labels or image paths: a tenth of :func:`load_prepared`'s memory (0.34 vs 3.1 GB for 1.8M rows
    of Open Images' shape). FileNotFoundError naming the missing file."""
    root = Path(root)
    _require(root, ("samples.csv", "meta.json"))
    ids, splits = [], []
    with _collector_paused(), (root / "samples.csv").open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        try:
            c_id, c_split = header.index("id"), header.index("split")
        except ValueError:
            raise ValueError(f"{root / 'samples.csv'}: needs the columns id and split, has {header}") from None
        for row in reader:
            ids.append(row[c_id])
            splits.append(row[c_split])
    return PreparedIndex(root=root, ids=ids, splits=np.array(splits), meta=json.loads((root / "meta.json").read_text()))


def load_prepared(root: str | Path) -> PreparedData:
    """Read ``data/prepared/<dataset>``; FileNotFoundError naming the missing file otherwise."""
    root = Path(root)
    _require(root, ("samples.csv", "hierarchy.json", "meta.json"))
    with _collector_paused():
        return _read_prepared(root)


def _read_prepared(root: Path) -> PreparedData:
    with (root / "samples.csv").open(newline="") as fh:  # rows as lists: no dict per row
        reader = csv.reader(fh)
        header = next(reader, [])
        rows = list(reader)
    c_id, c_image, c_caption, c_labels, c_split = (header.index(c) for c in ("id", "image", "caption", "labels", "split"))
    c_group = header.index("group") if "group" in header else c_id
    return PreparedData(
        root=root,
        ids=[r[c_id] for r in rows],
        images=[root / r[c_image] for r in rows],  # an absolute path stays itself
        captions=[r[c_caption] for r in rows],
        labels=[tuple(x for x in r[c_labels].split(LABEL_SEP) if x) for r in rows],
        splits=np.array([r[c_split] for r in rows]),
        hierarchy=Hierarchy.load(root / "hierarchy.json"),
        meta=json.loads((root / "meta.json").read_text()),
        groups=[r[c_group] or r[c_id] for r in rows],
    )


def load_annotations(root: str | Path) -> dict[str, dict]:
    """``annotations.jsonl`` of a prepared dataset as ``group -> annotations`` (empty when the
    dataset has none), e.g. COCO's ``{"width", "height", "instances": [{"category",
    "segmentation", "bbox", "iscrowd", ...}]}`` (sparc.data.coco)."""
    path = Path(root) / ANNOTATIONS
    if not path.is_file():
        return {}
    out: dict[str, dict] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                entry = json.loads(line)
                out[entry.pop("group")] = entry
    return out


def prepare_dataset(data: DataParams, out_dir: str | Path) -> Path:
    """The `prepare` stage: build dataset ``data.dataset`` and write it to ``out_dir``.

    The builder renders into ``out_dir.tmp/images``; nothing at ``out_dir`` changes until the
    whole dataset is written. Every split must hold :data:`MIN_SPLIT_ROWS` rows (ValueError naming
    the split sizes otherwise).
    """
    from sparc.data import get_builder

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    options = getattr(data, data.dataset, None)
    try:
        build = get_builder(data.dataset)(options, tmp / "images")
        labels = None
        if data.labels_from == "captions":
            build, labels = captions_as_labels(build, data.wordnet_depth)
        return write_prepared(
            build,
            out_dir,
            dataset=data.dataset,
            options=asdict(options) if options is not None else {},
            max_samples=data.max_samples,
            split_seed=data.split_seed,
            val_fraction=data.val_fraction,
            test_fraction=data.test_fraction,
            min_rows=MIN_SPLIT_ROWS,
            labels=labels,
        )
    finally:
        # On failure nothing is left behind but an untouched out_dir (if one existed).
        if tmp.exists():
            shutil.rmtree(tmp)


def captions_as_labels(build: DatasetBuild, depth: int) -> tuple[DatasetBuild, dict]:
    """``build`` with every sample's labels replaced by WordNet pseudo-labels of its caption and
    the hierarchy by theirs (:func:`sparc.data.wordnet.pseudo_labels`, ``depth`` levels below
    entity.n.01), and the provenance for meta.json: ``{"from": "captions", "wordnet_depth",
    "wordnet": the files' sha256, "coverage": fraction of samples with a label, "n_dataset_labels":
    the labels the dataset had}``. :class:`sparc.data.wordnet.WordNetMissing` (a FileNotFoundError
    naming the Debian package) when WordNet is not installed."""
    from sparc.data.wordnet import WORDNET_DIR, WordNet, pseudo_labels, require_wordnet

    root = require_wordnet(WORDNET_DIR)
    pseudo = pseudo_labels([s.caption for s in build.samples], depth, WordNet(root))
    samples = [replace(s, labels=lab) for s, lab in zip(build.samples, pseudo.labels, strict=True)]
    info = {
        "from": "captions",
        "wordnet_depth": depth,
        "wordnet": {name: file_sha256(root / name) for name in ("index.noun", "data.noun")},
        "coverage": pseudo.coverage(),
        "n_dataset_labels": len(build.hierarchy.labels),
    }
    return replace(build, samples=samples, hierarchy=pseudo.hierarchy), info
