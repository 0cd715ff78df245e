"""Deterministic ``.npz`` files: the same arrays always give the same bytes; reading some rows.

``np.savez`` stamps the current time into every zip entry, so an output rewritten with identical
arrays gets a new hash (DVC then sees a changed output). :func:`save_npz` writes the entries with
a fixed date, in the order given, to a temporary file renamed over ``path`` once complete (an
interrupted write never leaves a truncated file behind). ``np.load`` reads the result as usual.

:func:`load_npz_rows` reads only some rows (first axis) of every array: the stored (not deflated)
entries that :func:`save_npz` writes by default are read from their offsets in the file, block by
block, so a stage that needs the 126k test rows of codes stored for 1.8M rows holds those rows and
one block, not the whole arrays.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# load_npz_rows reads stored entries in blocks of about this many bytes
READ_BLOCK_BYTES = 1 << 24
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header (30 bytes)

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can carry


def save_npz(path: str | Path, arrays: Mapping[str, np.ndarray], compress: bool = False) -> Path:
    """Write ``arrays`` (name -> array, no pickled objects) to ``path`` as an ``.npz``; entries
    deflated when ``compress`` (as ``np.savez_compressed``), else stored (as ``np.savez``)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    try:
        with zipfile.ZipFile(tmp, "w", compression=method) as zf:
            for key, arr in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
                info.compress_type = method
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asarray(arr, order="C"), allow_pickle=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_npz_rows(path: str | Path, rows: np.ndarray | None = None, n_rows: int | None = None,
                  block_bytes: int = READ_BLOCK_BYTES) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path`` (name without ``.npy`` -> array), or only its rows
    ``rows`` (int indices along the first axis, any order, repeats allowed; the result's row ``j``
    is stored row ``rows[j]``). All arrays must have at least ``max(rows) + 1`` rows, and exactly
    ``n_rows`` when that is given (checked before reading).

    Stored entries in C order are read from their offsets in the file: only the blocks of about
    ``block_bytes`` that hold a wanted row, from its first to its last wanted row, so memory is the
    result plus one block. Deflated entries (``np.savez_compressed``) are read whole, then indexed.
    Raises ``ValueError`` when a row is out of range, an array has not ``n_rows`` rows or the file
    is not a readable ``.npz``.
    """
    path = Path(path)
    want = None if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf, path.open("rb") as fh:
            for info in zf.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if want is None or info.compress_type != zipfile.ZIP_STORED:
                    with zf.open(info) as entry:
                        arr = np.lib.format.read_array(entry, allow_pickle=False)
                    _check_count(arr.shape, n_rows, path, name)
                    out[name] = arr if want is None else _take_rows(arr, want, path, name)
                    continue
                fh.seek(info.header_offset)
                header = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
                if header[0] != b"PK\x03\x04":
                    raise ValueError(f"entry {info.filename}: bad local header")
                fh.seek(info.header_offset + _LOCAL_HEADER.size + header[-2] + header[-1])
                version = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(fh)
                _check_count(shape, n_rows, path, name)
                if fortran or dtype.hasobject or len(shape) == 0:
                    with zf.open(info) as entry:
                        out[name] = _take_rows(np.lib.format.read_array(entry, allow_pickle=False), want, path, name)
                    continue
                out[name] = _read_stored_rows(fh, fh.tell(), shape, dtype, want, block_bytes, path, name)
    except (zipfile.BadZipFile, struct.error, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz ({err})") from None
    return out


def _check_count(shape: tuple[int, ...], n_rows: int | None, path: Path, name: str) -> None:
    if n_rows is not None and (len(shape) == 0 or shape[0] != n_rows):
        raise ValueError(f"{path}: {name} has shape {shape}, expected {n_rows} rows")


def _check_rows(rows: np.ndarray, n: int, path: Path, name: str) -> None:
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"{path}: {name} has {n} rows, rows {int(rows.min())}..{int(rows.max())} were asked for")


def _take_rows(arr: np.ndarray, rows: np.ndarray, path: Path, name: str) -> np.ndarray:
    if arr.ndim == 0:
        raise ValueError(f"{path}: {name} is a scalar, it has no rows")
    _check_rows(rows, arr.shape[0], path, name)
    return arr[rows]


def _read_stored_rows(fh, offset: int, shape: tuple[int, ...], dtype: np.dtype, rows: np.ndarray,
                      block_bytes: int, path: Path, name: str) -> np.ndarray:
    """Rows ``rows`` of the C-order array ``shape``/``dtype`` whose data start at ``offset``."""
    n = shape[0]
    _check_rows(rows, n, path, name)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    out = np.empty((rows.size, *shape[1:]), dtype=dtype)
    if rows.size == 0 or row_bytes == 0:
        return out
    order = np.argsort(rows, kind="stable")
    ranked = rows[order]
    per_block = max(1, block_bytes // row_bytes)
    pos = 0
    while pos < ranked.size:
        first = int(ranked[pos])
        end = int(np.searchsorted(ranked, first - first % per_block + per_block, side="left"))
        last = int(ranked[end - 1])
        block = np.empty((last - first + 1, *shape[1:]), dtype=dtype)
        fh.seek(offset + first * row_bytes)
        if fh.readinto(block.reshape(-1).view(np.uint8)) != block.nbytes:
            raise ValueError(f"{path}: {name} is truncated")
        out[order[pos:end]] = block[ranked[pos:end] - first]
        pos = end
    return out
