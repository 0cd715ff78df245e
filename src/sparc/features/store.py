"""The feature store: one directory per (dataset, stream), rows aligned across streams.

Layout of ``data/features/<dataset>/<stream>/``::

    features.npy   N x d float16 (NumPy .npy, opened memory-mapped for reading)
    ids.txt        the N sample ids, one per line, in row order
    meta.json      model spec, input, dim, dtype, preprocessing, dataset fingerprint, N

A stream is written to ``<stream>.tmp`` and renamed when complete, so an interrupted extraction
never leaves a directory that looks finished.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DTYPE = np.float16
FINITE_CHUNK = 65536


class FeatureStoreError(ValueError):
    """The feature store is missing, misaligned or holds non-finite values (message says where)."""


class StreamWriter:
    """Append row blocks of one stream; :meth:`close` publishes the directory atomically.

    Usage::

        with StreamWriter(out_dir, ids, dim, meta) as w:
            for block in blocks:   # [b, dim] arrays, in row order
                w.write(block)
    """

    def __init__(self, out_dir: str | Path, ids: list[str], dim: int, meta: dict) -> None:
        self.out_dir = Path(out_dir)
        self.tmp = self.out_dir.with_name(self.out_dir.name + ".tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.ids = list(ids)
        self.meta = dict(meta, dim=int(dim), n=len(self.ids), dtype=np.dtype(DTYPE).name)
        self.array = np.lib.format.open_memmap(
            self.tmp / "features.npy", mode="w+", dtype=DTYPE, shape=(len(self.ids), dim)
        )
        self.row = 0

    def write(self, block: np.ndarray) -> None:
        """Write the next ``[b, dim]`` rows; raises FeatureStoreError on non-finite values."""
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[1] != self.array.shape[1]:
            raise FeatureStoreError(f"{self.out_dir.name}: block shape {block.shape} != (b, {self.array.shape[1]})")
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            row = self.row + int(np.argmax(bad))
            raise FeatureStoreError(f"stream {self.out_dir.name}: non-finite features at row {row} (id {self.ids[row]!r})")
        end = self.row + len(block)
        if end > len(self.ids):
            raise FeatureStoreError(f"{self.out_dir.name}: more rows written than ids ({len(self.ids)})")
        self.array[self.row : end] = block
        self.row = end

    def close(self) -> Path:
        if self.row != len(self.ids):
            raise FeatureStoreError(f"{self.out_dir.name}: {self.row} rows written, {len(self.ids)} expected")
        self.array.flush()
        del self.array
        (self.tmp / "ids.txt").write_text("".join(f"{i}\n" for i in self.ids))
        (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=1, sort_keys=True) + "\n")
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self.tmp.rename(self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        del self.array
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_stream(out_dir: str | Path, ids: list[str], features: np.ndarray, meta: dict) -> Path:
    """Write a whole ``[N, d]`` array as one stream (convenience for tests and small data)."""
    with StreamWriter(out_dir, ids, features.shape[1], meta) as writer:
        writer.write(features)
    return Path(out_dir)


@dataclass(frozen=True)
class FeatureStream:
    """One stream read back: ``features`` is a read-only memmap ``[N, d]`` float16."""

    name: str
    path: Path
    ids: list[str]
    features: np.ndarray
    meta: dict

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.ids)


def open_stream(path: str | Path, name: str | None = None) -> FeatureStream:
    """Open one stream directory memory-mapped; FeatureStoreError naming what is missing."""
    path = Path(path)
    name = name or path.name
    for fname in ("features.npy", "ids.txt", "meta.json"):
        if not (path / fname).is_file():
            raise FeatureStoreError(f"stream {name}: {path / fname} is missing (run `dvc repro extract`)")
    features = np.load(path / "features.npy", mmap_mode="r")
    ids = (path / "ids.txt").read_text().splitlines()
    if features.ndim != 2 or features.shape[0] != len(ids):
        raise FeatureStoreError(f"stream {name}: features {features.shape} do not match {len(ids)} ids")
    return FeatureStream(name, path, ids, features, json.loads((path / "meta.json").read_text()))


def first_nonfinite_row(features: np.ndarray) -> int | None:
    """Index of the first row holding NaN or inf, scanning in chunks (memmap friendly)."""
    for start in range(0, len(features), FINITE_CHUNK):
        block = np.asarray(features[start : start + FINITE_CHUNK])
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def check_aligned(streams: dict[str, FeatureStream], check_finite: bool = True) -> None:
    """Check every stream has the same ids in the same order (and finite values).

    Raises FeatureStoreError naming the stream and the first offending row.
    """
    names = list(streams)
    if not names:
        raise FeatureStoreError("no streams given")
    ref_name = names[0]
    ref = streams[ref_name]
    for name in names[1:]:
        ids = streams[name].ids
        if len(ids) != len(ref.ids):
            raise FeatureStoreError(
                f"stream {name}: {len(ids)} rows, but stream {ref_name} has {len(ref.ids)}"
            )
        if ids != ref.ids:
            row = next(i for i, (a, b) in enumerate(zip(ids, ref.ids)) if a != b)
            raise FeatureStoreError(
                f"stream {name}: row {row} has id {ids[row]!r}, stream {ref_name} has {ref.ids[row]!r}"
            )
    fingerprints = {n: s.meta.get("dataset_fingerprint") for n, s in streams.items()}
    if len(set(fingerprints.values())) > 1:
        raise FeatureStoreError(f"streams were extracted from different datasets: {fingerprints}")
    if check_finite:
        for name, stream in streams.items():
            row = first_nonfinite_row(stream.features)
            if row is not None:
                raise FeatureStoreError(f"stream {name}: non-finite features at row {row} (id {stream.ids[row]!r})")


def load_streams(root: str | Path, names: list[str], check_finite: bool = True) -> dict[str, FeatureStream]:
    """Open ``root/<name>`` for each stream name and check they are aligned and finite."""
    root = Path(root)
    streams = {name: open_stream(root / name, name) for name in names}
    check_aligned(streams, check_finite=check_finite)
    return streams
