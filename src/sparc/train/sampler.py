"""Training data: aligned feature rows gathered batch by batch, and a seeded sample-level sampler.

Non-finite values are found by :func:`first_nonfinite_row`, which reads the (memory-mapped) array
in contiguous blocks of ``SCAN_BYTES``, holding one block at a time: at the paper's scale (1.7M
float16 rows of 1024) a stream takes under a second from the page cache, else the time to read it.

Rows of a memory-mapped store (a ``np.memmap`` of the feature store) are read from its file with
``os.preadv`` (:class:`StoredRows`), not by indexing the mapping: the bytes pass through the page
cache into the caller's buffer and nothing stays mapped, so the process's resident set does not
grow with the rows read (pages of a mapping count in it until unmapped, up to the whole 8.7 GB
store of the paper's scale), and the kernel reads no more than the rows (a page fault on a mapping
reads ahead around it, megabytes per row in a store that is not cached).

Every random choice of the trainer is a pure function of ``(seed, purpose, counter)`` (NumPy's
``SeedSequence`` over the three numbers), so the whole sampler state is the global step: a resumed
run draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
import mmap
import os
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

from sparc.features.store import FeatureStoreError

# Purposes of the counter-based random streams (second entry of the seed sequence).
PERMUTATION = 1
USAE_SOURCE = 2
REVIVE = 3
STREAM_SUBSET = 4
# Bytes of features read per block when scanning for non-finite values (stays in the CPU caches).
SCAN_BYTES = 4 * 2**20
# Threads reading one batch from the store (os.preadv releases the GIL; several reads in flight
# keep the disk busy when the rows are not in the page cache).
READ_THREADS = 8
# Fewer rows than this per stream are read by the calling thread alone.
READ_PARALLEL_MIN_ROWS = 64


def nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Bool ``[n]``: the rows of a float ``[n, d]`` block that hold NaN or inf.

    float16 is tested on its bits (exponent all ones), about 5x faster than NumPy's ``isfinite``.
    """
    if block.dtype == np.float16:
        return (block.view(np.uint16) & 0x7FFF).max(axis=1) >= 0x7C00
    return ~np.isfinite(block).all(axis=1)


class StoredRows:
    """Rows of a memory-mapped ``[N, d]`` array (``np.memmap``), read from its file with ``os.preadv``.

    ``read(rows, out)`` fills ``out [len(rows), d]`` (the array's dtype) with ``array[rows]``;
    each run of consecutive row ids is one call. :meth:`of` returns None for arrays it cannot read
    this way (not a memmap, rows not contiguous in the file).
    """

    def __init__(self, path: str, position: int, row_stride: int, d: int, dtype: np.dtype) -> None:
        self.position, self.row_stride, self.d, self.dtype = position, row_stride, d, dtype
        self.fd = os.open(path, os.O_RDONLY)
        self._close = weakref.finalize(self, os.close, self.fd)

    @classmethod
    def of(cls, array: np.ndarray) -> StoredRows | None:
        """A reader of ``array``'s rows, or None when ``array`` is not a file-backed memmap with
        contiguous rows."""
        mapping = getattr(array, "_mmap", None)
        path = getattr(array, "filename", None)
        if not isinstance(array, np.memmap) or mapping is None or path is None or array.ndim != 2:
            return None
        if not hasattr(os, "preadv"):  # not on every OS: such a memmap is indexed instead
            return None
        if array.strides[1] != array.dtype.itemsize or array.strides[0] < array.shape[1] * array.dtype.itemsize:
            return None
        # np.memmap maps the file from its offset rounded down to the allocation granularity
        start = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
        base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
        return cls(path, start + array.ctypes.data - base, array.strides[0], array.shape[1], array.dtype)

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        """``out[i] = array[rows[i]]`` (``out`` C-contiguous); runs of consecutive ids in ``rows``
        (e.g. of an ascending batch) are read with one call each."""
        if len(rows) == 0:
            return
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate([[0], breaks]).tolist()
        stops = np.concatenate([breaks, [len(rows)]]).tolist()
        row_bytes = self.d * self.dtype.itemsize
        flat = out.reshape(-1).view(np.uint8)
        for a, b in zip(starts, stops, strict=True):
            first = int(rows[a])
            if self.row_stride == row_bytes:
                self._read_exact(flat[a * row_bytes : b * row_bytes], self.position + first * self.row_stride)
            else:
                for i in range(a, b):
                    self._read_exact(flat[i * row_bytes : (i + 1) * row_bytes],
                                     self.position + (first + i - a) * self.row_stride)

    def _read_exact(self, buffer: np.ndarray, position: int) -> None:
        view = memoryview(buffer)
        while len(view):
            n = os.preadv(self.fd, [view], position)
            if n <= 0:
                raise FeatureStoreError(f"unexpected end of the feature file at byte {position}")
            view, position = view[n:], position + n


def first_nonfinite_row(array: np.ndarray, rows: np.ndarray) -> int | None:
    """The lowest of ``rows`` whose features in ``array`` ``[N, d]`` hold NaN or inf, else None.

    Reads contiguous blocks of about ``SCAN_BYTES`` between the lowest and highest of ``rows``
    (blocks without a selected row are skipped), so a memmap is read once, sequentially (through
    :class:`StoredRows` into one reused buffer).
    """
    if len(rows) == 0:
        return None
    lo, hi = int(rows.min()), int(rows.max()) + 1
    selected = np.zeros(hi - lo, dtype=bool)
    selected[rows - lo] = True
    step = max(1, SCAN_BYTES // (array.shape[1] * array.dtype.itemsize))
    reader = StoredRows.of(array)
    buffer = np.empty((step, array.shape[1]), dtype=array.dtype) if reader is not None else None
    for start in range(lo, hi, step):
        stop = min(hi, start + step)
        mask = selected[start - lo : stop - lo]
        if mask.any():
            if reader is not None:
                block = buffer[: stop - start]
                reader.read(np.arange(start, stop), block)
            else:
                block = np.asarray(array[start:stop])
            bad = nonfinite_rows(block) & mask
            if bad.any():
                return start + int(np.argmax(bad))
    return None


def counter_rng(seed: int, purpose: int, counter: int) -> np.random.Generator:
    """A NumPy generator for ``(seed, purpose, counter)``; independent across the three."""
    return np.random.default_rng([int(seed), int(purpose), int(counter)])


def counter_seed(seed: int, purpose: int, counter: int) -> int:
    """A 63-bit integer seed for ``(seed, purpose, counter)`` (e.g. for ``torch.Generator``)."""
    state = np.random.SeedSequence([int(seed), int(purpose), int(counter)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def stream_subset(seed: int, step: int, batch: int, n_streams: int, keep: float) -> np.ndarray:
    """The stream-subset rule's draw for global step ``step``: bool ``[batch, n_streams]``.

    Each stream of each sample is kept independently with probability ``keep``; rows that keep
    no stream are drawn again (from the same generator) until they keep one, so every row is a
    non-empty subset with probability proportional to ``keep^|S| (1 - keep)^(n - |S|)``. A pure
    function of ``(seed, step)`` and the shape (``counter_rng(seed, STREAM_SUBSET, step)``): a
    resumed run draws the same subsets, and processes that split the batch slice the same draw.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"stream_subset: keep must be in (0, 1], got {keep}")
    rng = counter_rng(seed, STREAM_SUBSET, step)
    mask = rng.random((batch, n_streams)) < keep
    empty = ~mask.any(axis=1)
    while empty.any():
        mask[empty] = rng.random((int(empty.sum()), n_streams)) < keep
        empty = ~mask.any(axis=1)
    return mask


class EpochSampler:
    """Sample-level shuffling with a new permutation per epoch.

    Epoch e uses the permutation ``counter_rng(seed, PERMUTATION, e).permutation(n)``, cut into
    ``steps_per_epoch = ceil(n / batch_size)`` near-equal batches (sizes differ by at most one, so
    there is no tiny last batch and every sample is used once per epoch). Global step t belongs to
    epoch ``t // steps_per_epoch``. Batches are returned sorted (memmap locality; the loss is a mean
    over the batch, so the order inside a batch does not matter).
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1:
            raise ValueError("no training rows")
        if batch_size < 1:
            raise ValueError(f"train.batch_size: must be positive, got {batch_size}")
        self.n = n
        self.batch_size = min(batch_size, n)
        self.seed = seed
        self.steps_per_epoch = math.ceil(n / self.batch_size)
        self._bounds = np.linspace(0, n, self.steps_per_epoch + 1).round().astype(np.int64)
        self._permutation = lru_cache(maxsize=2)(self._make_permutation)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        return counter_rng(self.seed, PERMUTATION, epoch).permutation(self.n)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def batch(self, step: int) -> np.ndarray:
        """Sorted positions in ``[0, n)`` of global step ``step``'s batch."""
        epoch, j = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        return np.sort(perm[self._bounds[j] : self._bounds[j + 1]])


class FeatureSource:
    """Aligned training rows of several streams.

    ``arrays[s]`` is ``[N, d_s]`` (NumPy array or read-only memmap, any float dtype) and ``rows``
    the training row indices (default: all). When the selected rows fit in ``ram_budget_bytes``
    (their size in the arrays' own dtype; None = no limit) they are copied once into memory on
    ``device`` (RAM, or GPU memory when training on CUDA); otherwise each batch is gathered from
    the arrays (e.g. a memmap) in ascending row order and copied to ``device``. Either way :meth:`gather` returns float32
    tensors on ``device`` with identical values. Rows of a memmap (the feature store) are read
    from its file by :class:`StoredRows`, a batch's rows by ``READ_THREADS`` threads, so neither
    path leaves the store's pages mapped into the process; :meth:`prefetch` starts reading the
    next batch in the background, so that reading it overlaps the current training step (a
    :meth:`gather` of other positions reads its own). Construction checks shapes and (unless
    ``check_finite`` is False, for callers that checked already) that every selected value is
    finite, raising :class:`FeatureStoreError` naming the stream and row.
    """

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        rows: np.ndarray | None = None,
        *,
        ram_budget_bytes: int | None = None,
        device: str | torch.device = "cpu",
        check_finite: bool = True,
    ) -> None:
        if not arrays:
            raise FeatureStoreError("no streams given")
        n_total = None
        for s, a in arrays.items():
            if a.ndim != 2:
                raise FeatureStoreError(f"stream {s}: expected a [N, d] array, got shape {a.shape}")
            if not np.issubdtype(a.dtype, np.floating):
                raise FeatureStoreError(f"stream {s}: expected floating features, got {a.dtype}")
            if n_total is None:
                n_total, first = len(a), s
            elif len(a) != n_total:
                raise FeatureStoreError(f"stream {s}: {len(a)} rows, but stream {first} has {n_total}")
        rows = np.arange(n_total) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or len(rows) == 0:
            raise ValueError("training rows: need a non-empty 1-D index array")
        if rows.min() < 0 or rows.max() >= n_total:
            raise ValueError(f"training rows: index out of range [0, {n_total})")
        self.device = torch.device(device)
        self.rows = rows
        self.dims = {s: int(a.shape[1]) for s, a in arrays.items()}
        nbytes = sum(len(rows) * a.shape[1] * a.dtype.itemsize for a in arrays.values())
        self.in_memory = ram_budget_bytes is None or nbytes <= ram_budget_bytes
        if check_finite:
            for s, a in arrays.items():
                if (row := first_nonfinite_row(a, rows)) is not None:
                    raise FeatureStoreError(f"stream {s}: non-finite features at row {row}")
        self._tensors: dict[str, torch.Tensor] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._readers = {s: r for s, a in arrays.items() if (r := StoredRows.of(a)) is not None}
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="feature-read") if self._readers else None
        self._ahead: ThreadPoolExecutor | None = None
        self._pending: tuple[np.ndarray, Future] | None = None
        if self.in_memory:  # kept in the arrays' dtype, on the training device
            for s, host in self._take(dict(arrays), rows).items():
                self._tensors[s] = torch.from_numpy(host).to(self.device)
            self._readers = {}
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
        else:
            self._arrays = dict(arrays)
            if self._pool is not None:
                self._ahead = ThreadPoolExecutor(1, thread_name_prefix="feature-prefetch")
                weakref.finalize(self, self._pool.shutdown, wait=False)
                weakref.finalize(self, self._ahead.shutdown, wait=False)

    @property
    def streams(self) -> list[str]:
        return list(self.dims)

    def __len__(self) -> int:
        return len(self.rows)

    def gather(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """Float32 tensors ``[B, d_s]`` of training positions ``positions`` (sorted, in ``[0, len)``)."""
        if self.in_memory:
            index = self._to_device(torch.from_numpy(np.asarray(positions, dtype=np.int64)))
            return {s: t.index_select(0, index).float() for s, t in self._tensors.items()}
        positions = np.asarray(positions, dtype=np.int64)
        pending, self._pending = self._pending, None
        if pending is not None and np.array_equal(pending[0], positions):
            host = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()  # not needed any more (if it has not started yet)
            host = self._read(positions)
        return {s: self._to_device(torch.from_numpy(host[s])).float() for s in self._arrays}

    def prefetch(self, positions: np.ndarray) -> None:
        """Start reading the rows of training positions ``positions`` in a background thread, for
        the next :meth:`gather` of the same positions (a no-op when the rows are in memory)."""
        if self._ahead is None:
            return
        positions = np.array(positions, dtype=np.int64)
        self._pending = (positions, self._ahead.submit(self._read, positions))

    def _read(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Host arrays ``[B, d_s]`` (the arrays' dtype) of training positions ``positions``."""
        return self._take(self._arrays, self.rows[positions])

    def _take(self, arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        """``arrays[s][rows]`` as new C-contiguous arrays of the arrays' dtypes: through each
        stream's :class:`StoredRows` where it has one, every stream in up to ``READ_THREADS`` parts
        read in parallel; by indexing otherwise."""
        out, parts = {}, []
        for s, a in arrays.items():
            reader = self._readers.get(s)
            if reader is None:  # fancy indexing copies: a writable, contiguous block
                out[s] = np.ascontiguousarray(a[rows])
                continue
            out[s] = np.empty((len(rows), a.shape[1]), dtype=a.dtype)
            n = max(1, min(READ_THREADS, len(rows) // READ_PARALLEL_MIN_ROWS))
            bounds = np.linspace(0, len(rows), n + 1).astype(np.int64).tolist()
            parts += [(reader, slice(lo, hi), out[s]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        if self._pool is None or len(parts) < 2:
            for reader, part, dest in parts:
                reader.read(rows[part], dest[part])
        else:
            for done in [self._pool.submit(reader.read, rows[part], dest[part]) for reader, part, dest in parts]:
                done.result()
        return out

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host tensor -> device; on CUDA through pinned memory without blocking the host."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)
