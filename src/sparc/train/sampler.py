"""Training data: aligned feature rows gathered batch by batch, and a seeded sample-level sampler.

Non-finite values are found by :func:`first_nonfinite_row`, which reads the (memory-mapped) array
in contiguous blocks of ``SCAN_BYTES``, holding one block at a time: at the paper's scale (1.7M
float16 rows of 1024) a stream takes under a second from the page cache, else the time to read it.

Every random choice of the trainer is a pure function of ``(seed, purpose, counter)`` (NumPy's
``SeedSequence`` over the three numbers), so the whole sampler state is the global step: a resumed
run draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
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


def nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Bool ``[n]``: the rows of a float ``[n, d]`` block that hold NaN or inf.

    float16 is tested on its bits (exponent all ones), about 5x faster than NumPy's ``isfinite``.
    """
    if block.dtype == np.float16:
        return (block.view(np.uint16) & 0x7FFF).max(axis=1) >= 0x7C00
    return ~np.isfinite(block).all(axis=1)


def first_nonfinite_row(array: np.ndarray, rows: np.ndarray) -> int | None:
    """The lowest of ``rows`` whose features in ``array`` ``[N, d]`` hold NaN or inf, else None.

    Reads contiguous blocks of about ``SCAN_BYTES`` between the lowest and highest of ``rows``
    (blocks without a selected row are skipped), so a memmap is read once, sequentially.
    """
    if len(rows) == 0:
        return None
    lo, hi = int(rows.min()), int(rows.max()) + 1
    selected = np.zeros(hi - lo, dtype=bool)
    selected[rows - lo] = True
    step = max(1, SCAN_BYTES // (array.shape[1] * array.dtype.itemsize))
    for start in range(lo, hi, step):
        stop = min(hi, start + step)
        mask = selected[start - lo : stop - lo]
        if mask.any():
            bad = nonfinite_rows(np.asarray(array[start:stop])) & mask
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
    tensors on ``device`` with identical values. Construction checks shapes and (unless
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
        if self.in_memory:  # kept in the arrays' dtype, on the training device
            for s, a in arrays.items():  # fancy indexing copies: a writable, contiguous block
                self._tensors[s] = torch.from_numpy(np.ascontiguousarray(a[rows])).to(self.device)
        else:
            self._arrays = dict(arrays)

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
        index = self.rows[positions]
        return {
            s: self._to_device(torch.from_numpy(np.asarray(a[index], dtype=np.float32)))
            for s, a in self._arrays.items()
        }

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host tensor -> device; on CUDA through pinned memory without blocking the host."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)
