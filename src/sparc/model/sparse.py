"""Sparse kernels of the SAE: gathers and scatters of latent rows that never touch all L latents.

Every weight matrix here is stored with one row per latent, ``W [L, d]`` (the encoder ``W_enc^s`` as
in ``nn.Linear``, and the decoder ``W_dec^s`` transposed, so that the ``k`` decoder columns of a
sample are ``k`` contiguous rows). A sparse code is a pair ``(values [n, S, m], idx [n, m])``: for
sample ``i`` the ``m`` latent ids ``idx[i]`` are shared by ``S`` sources (the streams in Global
TopK all use the same index set), and ``values[i, s]`` are source ``s``'s activations there.

Two autograd Functions carry the training step:

- :func:`sparse_decode` -- ``out[i, s] = sum_j values[i, s, j] * W[idx[i, j]]`` for one or more
  groups with different index sets (e.g. the Global TopK code and the AuxK code of one stream),
  so that one backward builds the whole gradient of ``W``. Forward is an ``embedding_bag``.
  Backward needs ``dvalues[i, s, j] = <g[i, s], W[idx[i, j]]>`` and
  ``dW[l] = sum_{(i, s, j): idx[i, j] = l} values[i, s, j] * g[i, s]``.
- :func:`gather_logits` -- ``h.gather(1, idx)`` of logits ``h = (x - b_pre) W_enc^T + b_lat``
  computed densely *without* a graph; backward sends gradient only to the gathered latents:
  ``db_lat[l] = sum g``, ``dW_enc[l] = sum g * (x - b_pre)`` and ``db_pre = -db_lat W_enc``
  (``O(n m d + L d)`` instead of the ``O(n L d)`` of a dense backward).

Both backward passes view the occurrences ``(i, s, j)`` of all groups, sorted by latent id, as
the pattern of a sparse matrix ``A [L, R]`` over the ``R`` rows ``(i, s)`` of the small, cache
resident table of per-sample gradients ``G [R, d]`` (:class:`LatentPlan`). Then
``dW = A G`` (values of ``A`` = the coefficients) and ``dvalues`` = ``(W G^T)`` sampled at the
pattern of ``A``: each latent's row of ``W`` is read once for all its occurrences.

On CPU (``CPU_KERNELS``) ``dvalues`` comes from ``torch.sparse.sampled_addmm`` and ``dW`` from
the MKL CSR ``torch.addmm`` written into a reusable buffer (outputs of ``POOL_MIN_BYTES`` or
more); elsewhere, or with ``CPU_KERNELS = False``, portable ops are used (``embedding_bag`` with
one bag per latent, and gathered rows with a batched matmul).

Row-wise maintenance of ``[L, d]`` matrices (:func:`remove_parallel_`, :func:`normalise_rows_`,
the decoder's projected gradient and unit rows, every step) runs on CPU block by block, each block
of rows read from memory once and worked on while it stays in the caches; row by row the
operations are those on the whole matrix, so the results are the same to the bit.

CPU memory: glibc serves large allocations (always from 32 MiB, e.g. the ``[8192, 1024]`` float32
gradient of a 1024-d stream) with fresh pages, i.e. ~8k page faults (~15 ms) per gradient per step.
Large ``[L, d]`` gradients are therefore written into buffers from :class:`CpuBufferPool`, which
hands a buffer out again only once no tensor refers to it any more (the trainer's
``zero_grad(set_to_none=True)`` releases it; :func:`sparc.model.topk.global_topk` takes its
``[B, L]`` sum of the streams' logits from the pool too). On accelerators nothing here
synchronises with the host.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Use the CPU-specific kernels on CPU (False: the accelerator code path everywhere; the tests run
# both on CPU).
CPU_KERNELS = True
# On CPU, [L, d] gradients at least this large are written into pooled buffers (MKL CSR matmul);
# smaller ones come from embedding_bag (faster while its output does not fault in fresh pages).
POOL_MIN_BYTES = 8 * 1024 * 1024
# On CPU, the portable gather-dot works in chunks of samples whose gathered rows fit in the L2 cache.
_CPU_GATHER_BYTES = 1024 * 1024
# Rows per chunk of the CPU row-wise dot products (keeps the temporary in cache).
_CPU_DOT_ROWS = 2048
# Bytes of one [rows, d] block of the CPU row-wise kernels (remove_parallel_, normalise_rows_):
# each block is read from memory once and worked on while it stays in the L2 cache.
_CPU_ROW_BLOCK_BYTES = 1024 * 1024


class CpuBufferPool:
    """Large CPU float buffers reused across steps once nothing refers to them.

    Buffers are numpy arrays exposed through ``torch.from_numpy``; every tensor (or view) made
    from one holds a reference to the array, so an array whose reference count is back to the
    pool's own is free. At most ``max_per_shape`` buffers are kept per (shape, dtype); beyond
    that, and for non-float dtypes, :meth:`take` returns an ordinary new tensor. Buffers stay
    allocated until :meth:`clear`.
    """

    def __init__(self, max_per_shape: int = 4) -> None:
        self.max_per_shape = max_per_shape
        self._arrays: dict[tuple[tuple[int, ...], torch.dtype], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised CPU tensor of ``shape``/``dtype``, from the pool when possible."""
        np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype)
        if np_dtype is None:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            arrays = self._arrays.setdefault((tuple(shape), dtype), [])
            for i in range(len(arrays)):
                if sys.getrefcount(arrays[i]) == 2:  # only the list and this call refer to it
                    return torch.from_numpy(arrays[i])
            if len(arrays) >= self.max_per_shape:
                return torch.empty(shape, dtype=dtype)
            arrays.append(np.empty(shape, dtype=np_dtype))
            return torch.from_numpy(arrays[-1])

    def clear(self) -> None:
        """Forget every buffer (memory is returned once the last tensor using it is gone)."""
        with self._lock:
            self._arrays.clear()


CPU_BUFFERS = CpuBufferPool()


def cpu_path(t: Tensor) -> bool:
    """Whether ``t`` takes the CPU-specific code paths (on CPU, unless ``CPU_KERNELS`` is off)."""
    return CPU_KERNELS and t.device.type == "cpu"


def _use_cpu_kernels(t: Tensor) -> bool:
    return cpu_path(t) and t.dtype in (torch.float32, torch.float64)


def row_dots(a: Tensor, b: Tensor) -> Tensor:
    """``out[l] = <a[l], b[l]>`` for ``a, b [L, d]`` without an ``[L, d]`` temporary on CPU."""
    if not cpu_path(a):
        return (a * b).sum(1)
    out = torch.empty(a.shape[0], dtype=a.dtype)
    tmp = torch.empty(min(_CPU_DOT_ROWS, a.shape[0]), a.shape[1], dtype=a.dtype)
    for start in range(0, a.shape[0], _CPU_DOT_ROWS):
        stop = min(a.shape[0], start + _CPU_DOT_ROWS)
        t = tmp[: stop - start]
        torch.mul(a[start:stop], b[start:stop], out=t)
        torch.sum(t, 1, out=out[start:stop])
    return out


def _row_blocks(W: Tensor) -> list[slice]:
    """Row ranges of ``W [L, d]`` for the row-wise kernels: one block on accelerators, blocks of
    about ``_CPU_ROW_BLOCK_BYTES`` on CPU."""
    L = W.shape[0]
    if not cpu_path(W):
        return [slice(0, L)]
    rows = max(1, _CPU_ROW_BLOCK_BYTES // max(1, W.shape[1] * W.element_size()))
    return [slice(start, min(L, start + rows)) for start in range(0, L, rows)]


def remove_parallel_(g: Tensor, W: Tensor, eps: float) -> None:
    """``g[l] <- g[l] - (<g[l], W[l]> / max(||W[l]||^2, eps)) W[l]`` in place, ``g, W [L, d]``.

    Row by row the same operations (and float results) as on the whole matrices; on CPU block by
    block (:func:`_row_blocks`), so ``g`` and ``W`` are read once and ``g`` written once.
    """
    for rows in _row_blocks(W):
        w, gb = W[rows], g[rows]
        sq = torch.linalg.vector_norm(w, dim=1).square().clamp_min(eps)
        gb.addcmul_(w, (row_dots(gb, w) / sq).unsqueeze(1), value=-1.0)


def normalise_rows_(W: Tensor, eps: float) -> None:
    """``W[l] <- W[l] / max(||W[l]||, eps)`` in place, ``W [L, d]`` (block by block on CPU, as
    :func:`remove_parallel_`; the same float results as on the whole matrix)."""
    for rows in _row_blocks(W):
        w = W[rows]
        w.div_(torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(eps))


class LatentPlan:
    """The occurrences of latent ids in several groups, sorted by latent: a sparse ``[L, R]`` pattern.

    Group ``g`` has ids ``idx[g] [n_g, m_g]`` shared by ``S_g`` sources; its occurrence
    ``(i, s, j)`` (flattened in that order) pairs latent ``idx[g][i, j]`` with table row
    ``base_g + i * S_g + s`` (the groups' tables are stacked, ``R = sum n_g S_g``). ``order``
    sorts all occurrences by latent (stably, so table rows ascend within a latent); ``crow`` and
    ``cols`` are the CSR pattern of ``A [L, R]``.
    """

    def __init__(self, L: int, idx: Sequence[Tensor], sources: Sequence[int]) -> None:
        keys, rows = [], []
        base = 0
        self.shapes: list[tuple[int, int, int]] = []
        for ix, S in zip(idx, sources, strict=True):
            n, m = ix.shape
            keys.append(ix.unsqueeze(1).expand(n, S, m).reshape(-1))
            r = torch.arange(base, base + n * S, device=ix.device).view(n, S, 1)
            rows.append(r.expand(n, S, m).reshape(-1))
            self.shapes.append((n, S, m))
            base += n * S
        key = torch.cat(keys) if len(keys) > 1 else keys[0]
        self.L, self.R, self.nnz = L, base, key.numel()
        self.idx = list(idx)
        # int32 keys sort faster; a stable sort gives the same order whatever the key dtype
        self.order = torch.argsort(key.to(torch.int32) if L < 2**31 else key, stable=True)
        if cpu_path(key):
            counts = torch.bincount(key, minlength=L)
        else:  # bincount synchronises with the host on accelerators; a scatter does not
            counts = torch.zeros(L, dtype=torch.long, device=key.device).index_add_(0, key, torch.ones_like(key))
        self.crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self.cols = (torch.cat(rows) if len(rows) > 1 else rows[0]).index_select(0, self.order)

    def sort(self, per_group: Sequence[Tensor]) -> Tensor:
        """Per-occurrence values ``[n, S, m]`` of every group -> ``[nnz]`` in CSR order."""
        flat = torch.cat([v.reshape(-1) for v in per_group]) if len(per_group) > 1 else per_group[0].reshape(-1)
        return flat.index_select(0, self.order)

    def unsort(self, sorted_values: Tensor) -> list[Tensor]:
        """Inverse of :meth:`sort`: ``[nnz]`` in CSR order -> ``[n, S, m]`` per group."""
        flat = torch.empty_like(sorted_values).index_copy_(0, self.order, sorted_values)
        return [p.view(shape) for p, shape in zip(flat.split([a * b * c for a, b, c in self.shapes]), self.shapes, strict=True)]

    def csr(self, sorted_values: Tensor) -> Tensor:
        """The sparse CSR matrix ``A [L, R]`` with the given values (CSR order)."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.cols, sorted_values, size=(self.L, self.R),
                                           check_invariants=False)


def scatter_rows(plan: LatentPlan, coef: Sequence[Tensor], table: Tensor) -> Tensor:
    """``dW = A table``: ``out[l] = sum over occurrences (i, s, j) of l of coef[i, s, j] * table[row]``.

    ``coef``: ``[n, S, m]`` per group of ``plan``; ``table [R, d]``. Returns ``[L, d]`` (rows of
    latents that never occur are zero). Cost ``O(nnz d)`` plus one write of the output.
    """
    weight = plan.sort(coef).to(table.dtype)
    d = table.shape[1]
    if _use_cpu_kernels(table) and plan.L * d * table.element_size() >= POOL_MIN_BYTES:
        out = CPU_BUFFERS.take((plan.L, d), table.dtype)
        return torch.addmm(out, plan.csr(weight), table, beta=0.0, out=out)
    return F.embedding_bag(plan.cols, table, plan.crow[:-1], mode="sum", per_sample_weights=weight)


def sampled_dots(plan: LatentPlan, table: Tensor, W: Tensor) -> list[Tensor]:
    """``out[i, s, j] = <table[row of (i, s)], W[idx[i, j]]>`` per group of ``plan``: ``[n, S, m]``.

    On CPU ``(W table^T)`` sampled at the pattern of ``A`` (each row of ``W`` read once per
    latent); elsewhere gathered rows and a batched matmul.
    """
    if _use_cpu_kernels(table):
        ones = torch.ones(plan.nnz, dtype=table.dtype)
        sampled = torch.sparse.sampled_addmm(plan.csr(ones), W, table.T, beta=0.0)
        return plan.unsort(sampled.values())
    results, row = [], 0
    for ids, (n, S, _) in zip(plan.idx, plan.shapes, strict=True):
        results.append(gather_dot_bmm(table[row:row + n * S].view(n, S, -1), ids, W))
        row += n * S
    return results


def gather_dot_bmm(g: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    """``out[i, s, j] = <g[i, s], W[idx[i, j]]>`` from gathered rows and a batched matmul.

    ``g [n, S, d]``, ``idx [n, m]``, ``W [L, d]`` -> ``[n, S, m]``. The ``m`` rows of each sample
    are gathered once and shared by its ``S`` sources; on CPU in chunks that stay in cache.
    """
    n, S, d = g.shape
    m = idx.shape[1]
    if not cpu_path(W):
        return torch.bmm(g, W[idx].transpose(1, 2))
    out = torch.empty(n, S, m, dtype=g.dtype, device=g.device)
    chunk = max(1, _CPU_GATHER_BYTES // max(1, m * d * W.element_size()))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rows = W.index_select(0, idx[start:stop].reshape(-1)).view(stop - start, m, d)
        torch.bmm(g[start:stop], rows.transpose(1, 2), out=out[start:stop])
    return out


def decode_rows(values: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    """``out[i, s] = sum_j values[i, s, j] * W[idx[i, j]]``: ``[n, S, m] x [n, m] -> [n, S, d]``."""
    n, S, m = values.shape
    bags = idx.unsqueeze(1).expand(n, S, m).reshape(n * S, m)
    out = F.embedding_bag(bags, W, mode="sum", per_sample_weights=values.reshape(n * S, m))
    return out.view(n, S, W.shape[1])


class _SparseDecode(torch.autograd.Function):
    """Decode several sparse groups with one weight ``W [L, d]``; see :func:`sparse_decode`."""

    @staticmethod
    def forward(ctx, W: Tensor, idx: tuple[Tensor, ...], *values: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.idx = idx
        ctx.save_for_backward(W, *values)
        return tuple(decode_rows(v, ix, W) for v, ix in zip(values, idx, strict=True))

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        W, *values = ctx.saved_tensors
        plan = LatentPlan(W.shape[0], ctx.idx, [v.shape[1] for v in values])
        table = torch.cat([g.reshape(-1, W.shape[1]) for g in grads]).to(W.dtype)
        dW = scatter_rows(plan, values, table) if ctx.needs_input_grad[0] else None
        dvalues: list[Tensor | None] = [None] * len(values)
        if any(ctx.needs_input_grad[2:]):
            dvalues = list(sampled_dots(plan, table, W))
        return (dW, None, *dvalues)


def sparse_decode(W: Tensor, groups: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """Differentiable sparse decode of several groups ``(values [n, S, m], idx [n, m])`` with ``W``.

    Returns ``[n, S, d]`` per group: ``out[i, s] = sum_j values[i, s, j] W[idx[i, j]]`` (no bias).
    Gradients flow to ``values`` and to the touched rows of ``W``; the indices are constants.
    """
    idx = tuple(ix for _, ix in groups)
    values = [v for v, _ in groups]
    return list(_SparseDecode.apply(W, idx, *values))


class _GatherLogits(torch.autograd.Function):
    """``h.gather(1, idx)`` with the sparse encoder backward; see :func:`gather_logits`."""

    @staticmethod
    def forward(ctx, h: Tensor, x: Tensor, b_pre: Tensor, W_enc: Tensor, b_lat: Tensor,  # type: ignore[override]
                idx: Tensor, split: int | None) -> Tensor:
        ctx.split = split
        ctx.save_for_backward(x, b_pre, W_enc, idx)
        return h.gather(1, idx)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, b_pre, W_enc, idx = ctx.saved_tensors
        L = W_enc.shape[0]
        _, need_x, need_pre, need_w, need_lat, _, _ = ctx.needs_input_grad
        g = g.to(W_enc.dtype)
        d_lat = torch.zeros(L, dtype=g.dtype, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
        dW = None
        if need_w:
            xc = x - b_pre
            cut = idx.shape[1] if ctx.split is None else ctx.split
            parts = [slice(0, cut), slice(cut, idx.shape[1])] if cut < idx.shape[1] else [slice(0, cut)]
            plan = LatentPlan(L, [idx[:, p] for p in parts], [1] * len(parts))
            dW = scatter_rows(plan, [g[:, None, p] for p in parts], torch.cat([xc] * len(parts)))
        dx = d_pre = None
        if need_x:
            dx = decode_rows(g.unsqueeze(1), idx, W_enc)[:, 0]
            if need_pre:
                d_pre = -dx.sum(0)
        elif need_pre:
            d_pre = -(d_lat @ W_enc)
        return None, dx, d_pre, dW, d_lat if need_lat else None, None, None


def gather_logits(h: Tensor, x: Tensor, b_pre: Tensor, W_enc: Tensor, b_lat: Tensor,
                  idx: Tensor, split: int | None = None) -> Tensor:
    """Logits at ``idx``, differentiable in the encoder parameters (and ``x``) with a sparse backward.

    ``h [n, L]`` must equal ``(x - b_pre) @ W_enc.T + b_lat`` and carry no graph (it is computed
    once, densely, to choose ``idx [n, m]``). Returns ``h.gather(1, idx)`` ``[n, m]`` whose
    gradient reaches ``W_enc`` and ``b_lat`` only at the gathered latents, and ``b_pre`` (and ``x``
    if it requires grad) through them. ``split``: columns ``[:split]`` and ``[split:]`` are two
    index sets (e.g. top-k and AuxK) that may share latents.
    """
    return _GatherLogits.apply(h, x, b_pre, W_enc, b_lat, idx, split)
