"""Precomputed features as a stream: HDF5 (``h5:``) and NumPy (``npy:``) files, rows matched by id.

A stream whose model is ``h5:<path>[?options]`` or ``npy:<path>[?options]`` runs no model: the
extract stage (:func:`import_stream`) copies the file's rows into the feature store, in the
prepared dataset's order, matching each prepared sample to a row by its id. Every prepared sample
must have a row (rows without a sample are left out); the rows must be finite and all files of a
stream must share one dimension. Anything else is one ``error:`` line naming the file, the row or
the id.

Spec: ``<family>:<path>[?key=value&...]``; ``<path>`` may hold ``{split}``, which is expanded over
the ``splits`` option (the reference code writes one file per split:
``features/open_images/<split>/dino_features_dinov2_vitl14_reg.h5``). Options:

==========  ==================================================  =====================================
option      values                                              meaning
==========  ==================================================  =====================================
``key``     an HDF5 dataset name (default ``features``)         the ``[N, d]`` array (``h5:`` only)
``rows``    ``ids`` (default), ``openimages``, ``coco``          how row i maps to a sample id
``ids``     a text file (default ``ids.txt`` beside the file)    ``rows=ids``: the id of row i on line i
``splits``  comma-separated names (default ``train,val,test``:   the values of ``{split}``; without
            those whose file exists)                            ``{split}`` in the path not allowed
==========  ==================================================  =====================================

Row -> id mappings (``rows``):

* ``ids``: line i of the ids file (this project's feature store is ``npy:<dir>/features.npy``: its
  ``ids.txt`` lies beside it);
* ``openimages``: the reference's ``OpenImagesDataset`` (sparc/feature_extract/extract_open_images.py,
  read by sparc/datasets.py row by row): its samples are the (image, narrative) pairs of the
  split's Localized Narratives, images in order of their first narrative, each image's narratives
  in file order; row i is sample i, i.e. this project's id ``<ImageID>_<k>`` of the i-th pair of
  ``data/raw/openimages/narratives/<split file>`` (reference split ``val`` = Open Images
  ``validation``). The reference built its "simplified" JSON from the same narratives; the order
  is assumed to be the file order (JSON objects keep insertion order);
* ``coco``: the reference's ``CocoImagesDataset`` over torchvision's ``CocoCaptions``, whose
  images are ``sorted(coco.imgs)``: row i is the i-th image by id of
  ``data/raw/coco/annotations/captions_<split>2017.json``, id = the file name's stem (as this
  project's ``data.coco.captions: join``).

An HDF5 file's ``indices`` dataset (the reference writes ``indices[i] = i``), when present, gives
each row's sample number: row r holds sample ``indices[r]``.

DVC sees the file through its path in ``params.yaml`` (``streams.<s>.model``), not its bytes;
``meta.json`` records each file's size and SHA-256 (``source``). After replacing a file in place,
run ``dvc repro -f extract@<stream>``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparc.catalog import SPLIT, ModelSpec
from sparc.features.store import FeatureStoreError, StreamWriter

FAMILIES = ("h5", "npy")
DEFAULT_SPLITS = ("train", "val", "test")
# The reference's split folder names -> the official split of each dataset.
OPENIMAGES_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
COCO_SPLITS = {"train": "train2017", "val": "val2017"}
BLOCK = 65536
HASH_CHUNK = 1 << 24


@dataclass(frozen=True)
class SourceFile:
    """One file of a precomputed stream: its path, the split it holds ('' without ``{split}``)."""

    path: Path
    split: str


def source_files(spec: ModelSpec) -> list[SourceFile]:
    """The files of ``spec``: ``{split}`` expanded over ``splits`` (explicit: each must exist;
    default: those of train, val, test that exist, at least one). ValueError naming a missing file."""
    if SPLIT not in spec.name:
        path = Path(spec.name).expanduser()
        if not path.is_file():
            raise ValueError(f"{spec.family}: feature file {path} does not exist")
        return [SourceFile(path, "")]
    given = dict(spec.options).get("splits")
    splits = given.split(",") if given else DEFAULT_SPLITS
    files = [SourceFile(Path(spec.name.replace(SPLIT, s)).expanduser(), s) for s in splits]
    missing = [f.path for f in files if not f.path.is_file()]
    if given and missing:
        raise ValueError(f"{spec.family}: feature file {missing[0]} does not exist (splits={given})")
    files = [f for f in files if f.path.is_file()]
    if not files:
        raise ValueError(f"{spec.family}: no feature file {spec.name} for any of {', '.join(splits)} exists")
    return files


def openimages_row_ids(raw: Path, split: str) -> list[str]:
    """Sample ids of the reference's Open Images rows of ``split`` (module docstring)."""
    from sparc.data.openimages import narratives_path, read_narratives

    if split not in OPENIMAGES_SPLITS:
        raise ValueError(f"rows=openimages: unknown split {split!r} (reference splits: train, val, test)")
    path = raw / narratives_path(OPENIMAGES_SPLITS[split])
    if not path.is_file():
        raise ValueError(f"rows=openimages: {path} is missing; run the download stage (dvc repro download)")
    seen: dict[str, int] = {}
    pairs: dict[str, list[str]] = {}
    for n in read_narratives(path):
        k = seen.get(n.image_id, 0)
        seen[n.image_id] = k + 1
        pairs.setdefault(n.image_id, []).append(f"{n.image_id}_{k}")
    return [sid for ids in pairs.values() for sid in ids]


def coco_row_ids(raw: Path, split: str) -> list[str]:
    """Sample ids of the reference's COCO rows of ``split``: image file stems by image id."""
    from sparc.data.coco import captions_path, load_json

    if split not in COCO_SPLITS:
        raise ValueError(f"rows=coco: unknown split {split!r} (reference splits: train, val)")
    images = load_json(raw / captions_path(COCO_SPLITS[split])).get("images", [])
    return [Path(img["file_name"]).stem for img in sorted(images, key=lambda i: int(i["id"]))]


def ids_file_rows(spec: ModelSpec, file: SourceFile) -> list[str]:
    """``rows=ids``: the lines of the ids file (option ``ids``, ``{split}`` expanded; default
    ``ids.txt`` beside the feature file)."""
    given = dict(spec.options).get("ids")
    path = Path(given.replace(SPLIT, file.split)).expanduser() if given else file.path.parent / "ids.txt"
    if not path.is_file():
        raise ValueError(f"{spec.family}: ids file {path} for {file.path} does not exist (option ids=<file>)")
    ids = path.read_text(encoding="utf-8").split("\n")
    return ids[:-1] if ids and ids[-1] == "" else ids


class ArrayFile:
    """The ``[N, d]`` array of one source file, read in row blocks; ``indices`` (h5) maps rows to
    sample numbers."""

    def __init__(self, spec: ModelSpec, path: Path) -> None:
        self.path = path
        self.indices: np.ndarray | None = None
        if spec.family == "npy":
            try:
                self.array = np.load(path, mmap_mode="r")
            except ValueError as err:
                raise ValueError(f"npy: {path} is not a NumPy .npy file ({err})") from None
            self.handle = None
        else:
            import h5py

            try:
                self.handle = h5py.File(path, "r")
            except OSError as err:
                raise ValueError(f"h5: {path} is not an HDF5 file ({err})") from None
            key = dict(spec.options).get("key", "features")
            if key not in self.handle:
                raise ValueError(f"h5: {path} has no dataset {key!r} (datasets: {', '.join(self.handle)}; option key=<name>)")
            self.array = self.handle[key]
            if "indices" in self.handle and self.handle["indices"].shape == (self.array.shape[0],):
                self.indices = np.asarray(self.handle["indices"][:], dtype=np.int64)
        if len(self.array.shape) != 2 or self.array.shape[1] == 0:
            raise ValueError(f"{spec.family}: {path} holds a {tuple(self.array.shape)} array, expected rows x dim")

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, no repeats) as float32 ``[len(rows), d]``: one slice of their
        span when it is at most 4 times as long (files in sample order), else the sorted rows."""
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if hi - lo <= 4 * len(rows):
            return np.asarray(self.array[lo:hi], dtype=np.float32)[rows - lo]
        order = np.argsort(rows)
        out = np.empty((len(rows), self.array.shape[1]), dtype=np.float32)
        out[order] = np.asarray(self.array[np.sort(rows)], dtype=np.float32)
        return out

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def row_ids(spec: ModelSpec, file: SourceFile, n: int, indices: np.ndarray | None, raw: Path) -> list[str]:
    """The sample id of each of the ``n`` rows of ``file`` (``rows`` option; ``indices`` reorders)."""
    rows = dict(spec.options).get("rows", "ids")
    read: Callable[[], list[str]] = {
        "ids": lambda: ids_file_rows(spec, file),
        "openimages": lambda: openimages_row_ids(raw, file.split),
        "coco": lambda: coco_row_ids(raw, file.split),
    }[rows]
    ids = read()
    if indices is not None:
        if indices.min(initial=0) < 0 or indices.max(initial=-1) >= len(ids):
            raise ValueError(f"{spec.family}: {file.path}: its indices reach {int(indices.max())}, but rows={rows} gives {len(ids)} samples")
        return [ids[i] for i in indices]
    if len(ids) != n:
        raise ValueError(f"{spec.family}: {file.path} has {n} rows, but rows={rows} gives {len(ids)} sample ids")
    return ids


def import_stream(
    spec: ModelSpec, ids: list[str], out_dir: str | Path, meta: dict, raw: Path, progress: bool = True
) -> Path:
    """Write the rows of ``spec``'s files for the prepared ``ids`` (in their order) as the stream
    ``out_dir`` (float16, :class:`~sparc.features.store.StreamWriter`). ``meta``: the stream's
    metadata, to which ``source`` (files, sizes, SHA-256) is added. ``raw``: the dataset's raw
    directory (``rows=openimages|coco``). ValueError naming the first missing id, a file whose
    dimension differs, or a non-finite row."""
    from tqdm import tqdm

    files = source_files(spec)
    arrays = [ArrayFile(spec, f.path) for f in files]
    try:
        dims = {a.path: int(a.array.shape[1]) for a in arrays}
        if len(set(dims.values())) > 1:
            raise ValueError(f"{spec.family}: the files of {spec} differ in dimension: " + ", ".join(f"{p} {d}" for p, d in dims.items()))
        where: dict[str, tuple[int, int]] = {}
        for fi, (file, arr) in enumerate(zip(files, arrays, strict=True)):
            for row, sid in enumerate(row_ids(spec, file, int(arr.array.shape[0]), arr.indices, raw)):
                where.setdefault(sid, (fi, row))
        missing = [sid for sid in ids if sid not in where]
        if missing:
            raise ValueError(
                f"{spec.family}: {len(missing)} of the {len(ids)} prepared samples have no row in "
                f"{', '.join(str(f.path) for f in files)} (first: {missing[0]!r}); check rows= and splits= "
                "(README \"Using the paper's released weights and features\")"
            )
        source = np.array([where[sid] for sid in ids], dtype=np.int64).reshape(-1, 2)
        meta = dict(meta, source=[{"path": str(f.path), "split": f.split, "size": f.path.stat().st_size,
                                   "sha256": file_sha256(f.path)} for f in files])
        dim = next(iter(dims.values()))
        with StreamWriter(out_dir, ids, dim, meta) as writer:
            for start in tqdm(range(0, len(ids), BLOCK), desc=f"import {meta['stream']}", disable=not progress):
                block_src = source[start : start + BLOCK]
                block = np.empty((len(block_src), dim), dtype=np.float32)
                for fi, arr in enumerate(arrays):
                    sel = np.flatnonzero(block_src[:, 0] == fi)
                    if len(sel):
                        block[sel] = arr.rows(block_src[sel, 1])
                bad = ~np.isfinite(block).all(axis=1)
                if bad.any():
                    i = int(np.argmax(bad))
                    fi, row = block_src[i]
                    raise FeatureStoreError(
                        f"{spec.family}: {files[fi].path} row {row} (sample {ids[start + i]!r}) holds NaN or "
                        "infinite features"
                    )
                writer.write(block)
    finally:
        for arr in arrays:
            arr.close()
    return Path(out_dir)
