"""The feature store: one directory per (dataset, stream), rows aligned across streams.

Layout of ``data/features/<dataset>/<stream>/``::

    features.npy   N x d float16 (NumPy .npy, opened memory-mapped for reading)
    ids.txt        the N sample ids, one per line, in row order
    meta.json      model spec, input, dim, dtype, preprocessing, dataset fingerprint, N

A stream is written to ``<stream>.tmp`` and renamed when complete (a previous ``<stream>`` is moved
to ``<stream>.old`` for the swap, then deleted), so an interrupted extraction never leaves a
directory that looks finished, and a failed one leaves no ``.tmp`` behind. A directory damaged
afterwards (a file missing, cut short by a crash or a partial copy, unreadable, or the files
disagreeing on N or d) is refused by :func:`open_stream` with one line naming the stream and the
file and saying how to restore it (``dvc checkout`` of the directory, or
``dvc repro extract@<stream>``).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DTYPE = np.float16
FINITE_CHUNK = 65536


class FeatureStoreError(ValueError):
    """The feature store is missing, misaligned or holds non-finite values (message says where)."""


def check_ids(name: str, ids: list[str]) -> None:
    """Ids must be unique, non-empty and single-line (ids.txt holds one per line)."""
    seen: set[str] = set()
    for row, sample_id in enumerate(ids):
        if not sample_id or "\n" in sample_id or "\r" in sample_id:
            raise FeatureStoreError(f"stream {name}: id at row {row} is empty or holds a line break: {sample_id!r}")
        if sample_id in seen:
            raise FeatureStoreError(f"stream {name}: duplicate id {sample_id!r} at row {row}")
        seen.add(sample_id)


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
        self.ids = list(ids)
        check_ids(self.out_dir.name, self.ids)
        if dim <= 0:
            raise FeatureStoreError(f"stream {self.out_dir.name}: feature dimension must be positive, got {dim}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
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
        """Check every row was written, add ids.txt and meta.json, rename tmp -> final."""
        if self.row != len(self.ids):
            raise FeatureStoreError(f"{self.out_dir.name}: {self.row} rows written, {len(self.ids)} expected")
        self.array.flush()
        self.array = None
        (self.tmp / "ids.txt").write_text("".join(f"{i}\n" for i in self.ids), encoding="utf-8")
        (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=1, sort_keys=True) + "\n")
        # The previous stream is moved aside before the swap, so no moment leaves a half-written one.
        old = self.out_dir.with_name(self.out_dir.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if self.out_dir.exists():
            self.out_dir.rename(old)
        self.tmp.rename(self.out_dir)
        if old.exists():
            shutil.rmtree(old)
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far (the temporary directory); the final one is untouched."""
        self.array = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


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


def _npy_header(path: Path) -> tuple[tuple[int, ...], int]:
    """(shape, expected file size in bytes) from a .npy file's header; ValueError if it has none."""
    with path.open("rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        return shape, fh.tell() + math.prod(shape) * dtype.itemsize


def open_stream(path: str | Path, name: str | None = None) -> FeatureStream:
    """Open one stream directory memory-mapped.

    A missing, truncated or unreadable file, or files that disagree with each other, raise a
    one-line FeatureStoreError naming the stream, the file and how to restore the directory.
    """
    path = Path(path)
    name = name or path.name
    npy, ids_txt, meta_json = path / "features.npy", path / "ids.txt", path / "meta.json"

    def broken(problem: str) -> FeatureStoreError:
        return FeatureStoreError(
            f"stream {name}: {problem}; restore it with `dvc checkout {path}`, "
            f"or extract it again with `dvc repro extract@{name}`"
        )

    for file in (npy, ids_txt, meta_json):
        if not file.is_file():
            raise broken(f"{file} is missing")
    try:
        shape, expected = _npy_header(npy)
    except ValueError as err:
        raise broken(f"{npy} is not a NumPy .npy file ({err})") from None
    size = npy.stat().st_size
    if size != expected:
        raise broken(f"{npy} is {size} bytes, but its header ({shape} array) needs {expected}")
    if len(shape) != 2:
        raise broken(f"{npy} holds a {shape} array, expected rows x dim")
    try:
        ids = ids_txt.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise broken(f"{ids_txt} is not UTF-8 ({err})") from None
    if ids and ids[-1] == "":
        ids.pop()
    if shape[0] != len(ids):
        raise broken(f"{npy} has {shape[0]} rows but {ids_txt} has {len(ids)} ids")
    try:
        meta = json.loads(meta_json.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise broken(f"{meta_json} is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise broken(f"{meta_json} holds a JSON {type(meta).__name__}, expected an object")
    if (meta.get("n", shape[0]), meta.get("dim", shape[1])) != shape:
        raise broken(f"{meta_json} says n={meta.get('n')}, dim={meta.get('dim')} but {npy} is {shape}")
    return FeatureStream(name, path, ids, np.load(npy, mmap_mode="r"), meta)


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
        if ids == ref.ids:
            continue
        common = min(len(ids), len(ref.ids))
        row = next((i for i in range(common) if ids[i] != ref.ids[i]), common)
        if row < common:
            raise FeatureStoreError(
                f"stream {name}: row {row} has id {ids[row]!r}, stream {ref_name} has {ref.ids[row]!r}"
            )
        longer, extra = (name, ids) if len(ids) > len(ref.ids) else (ref_name, ref.ids)
        raise FeatureStoreError(
            f"stream {name}: {len(ids)} rows, but stream {ref_name} has {len(ref.ids)} "
            f"(first unmatched row {row}: id {extra[row]!r} only in stream {longer})"
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
