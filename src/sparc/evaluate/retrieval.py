"""Cross-stream retrieval (method.md section 4).

Codes come from per-stream inference (each stream its own top-k), so a shared index set cannot
leak the answer. Query i (row i of stream s) should find gallery item i (row i of stream t) among
all N rows of the evaluated split. Similarity: cosine of the L2-normalised code vectors (or of the
L2-normalised raw features for the baseline). Ranks treat ties as a uniformly random order
(:func:`sparc.evaluate.metrics.retrieval_metrics`); what is computed here are the rank counts
greater_i = #{j : S_ij > S_ii} and ties_i = #{j != i : S_ij = S_ii} in both directions.

The scores, exactly: codes are normalised in float64 and stored as float32 rows whose entries run
by decreasing latent index; S_ij is the float32 sum, in that order, of the float32 products
q_il * g_jl over the latents active in both rows (0 when none is), one rounding per product and
per addition. That is what a sparse-row x dense-column kernel computes (adding a zero product
changes nothing), so both computations below give bit-identical scores, hence equal counts
(tests/evaluate/test_retrieval.py checks it on the machine that runs them).

* :func:`sparse_pair_rank_counts` (codes on the CPU; what :func:`pair_rank_counts` runs there):
  an inverted index. The gallery is held by columns (latent -> the samples where it is active and
  their values); for query i, ``y = G[:, active(i)] @ q_i`` (SciPy's CSC mat-vec: one
  ``y[j] += g_jl * q_il`` per stored entry, columns in the query's stored order) touches only the
  postings of its k latents, about k * (k / L) * N entries instead of the N * k of a dense
  column. ``y`` is still a full ``[N]`` row, so samples sharing no latent with the query score
  exactly 0 and are ranked (and tied) exactly as in the dense computation, whatever the sign of
  the values; the counts are 4 comparisons of ``y`` with S_ii and with the diagonal. The diagonal
  comes from :func:`paired_scores` (the formula, vectorised) and every query checks its own
  mat-vec score against it: where SciPy's kernel rounds otherwise (a build that fuses multiply and
  add), the counts come from the dense computation instead, with a warning. Queries are split
  over threads (the mat-vec and the comparisons release the GIL).
* :func:`dense_pair_rank_counts` (the reference; raw features; any ``evaluate.device``):
  S = Q G^T is never held whole. For a block of b query rows, the block is densified (``[L, b]``)
  and ``S_block^T = G @ Q_block^T`` (``[N, b]``) is a sparse x dense product with the gallery kept
  as a CSR matrix (torch; dense features use a dense matmul). One pass gives both directions:
  the columns of the block rank the gallery for queries s -> t, its rows rank the queries for the
  reverse direction t -> s (``S^{t->s} = S^T``), compared with the diagonal S_jj computed
  beforehand by the same kernel on the same rows (so exact ties stay exact).

The raw-feature baseline (dense features) applies where two streams share an embedding space: the
same OpenCLIP model reading the image in one stream and the caption in the other.

Cost per stream pair (both directions), at the paper's scale (N = 126k, L = 8192, k = 64):
dense, nnz(codes) x N multiply-adds (500-1100 CPU seconds per pair); sparse, about
N * k^2 / L * N scattered adds (128x fewer) plus 4 comparisons per score (40-60 CPU seconds per
pair; benchmarks/evaluate_memory.py). Memory: the sparse path holds the gallery twice (rows and
columns) and a few ``[N]`` vectors per thread; the dense path one ``[N, b]`` block.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import torch

from sparc.evaluate.metrics import l2_normalise_rows

DEFAULT_BLOCK_BYTES = 1 << 27  # one [N, b] float32 similarity block (128 MiB)
CPU_MAX_ROWS = 128  # measured best block width for the CPU sparse x dense product
CHUNK_QUERIES = 256  # the sparse path hands queries to its threads in runs of this many
# SciPy's compiled kernels behind ``csc[:, cols]`` and ``csc @ x``, called without the public API's
# per-call checks and allocations (twice as fast per query at the paper's scale). They are private:
# FAST_KERNELS (set below the InvertedIndex class) is True only when they exist and agree with the
# public calls on a small case; otherwise the public calls are used.
try:
    from scipy.sparse._sparsetools import csc_matvec as _csc_matvec
    from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
except ImportError:
    _csc_matvec = _csr_row_index = None
RankCounts = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _csr_to_torch(mat: sp.csr_matrix, device: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(mat.indptr.astype(np.int64)),
            torch.from_numpy(mat.indices.astype(np.int64)),
            torch.from_numpy(mat.data.astype(np.float32)),
            size=mat.shape,
            device=device,
            check_invariants=False,  # built from a valid SciPy CSR matrix
        )


def descending_rows(mat: sp.csr_matrix) -> sp.csr_matrix:
    """``mat`` with each row's entries stored by decreasing column index (the summation order of
    the scores); returned as is when already so (what :func:`l2_normalise_rows` gives for sorted
    input), else a reordered copy. Duplicate entries are summed first."""
    indptr, indices = mat.indptr, mat.indices
    steps = np.diff(indices)  # indices are >= 0, so no overflow
    row_start = np.zeros(indices.size, dtype=bool)
    row_start[indptr[:-1][np.diff(indptr) > 0]] = True
    if indices.size < 2 or (steps < 0)[~row_start[1:]].all():
        return mat
    out = sp.csr_matrix(mat, copy=True)
    out.sum_duplicates()  # also sorts each row ascending
    lengths = np.diff(out.indptr)
    starts = np.repeat(out.indptr[:-1], lengths)
    flip = 2 * starts + np.repeat(lengths, lengths) - 1 - np.arange(out.indices.size)
    return sp.csr_matrix((out.data[flip], out.indices[flip], out.indptr), shape=out.shape)


def _normalise(x: sp.csr_matrix | np.ndarray) -> sp.csr_matrix | np.ndarray:
    """Unit rows (zero rows stay zero), float32: CSR for codes (rows by decreasing latent),
    ndarray for raw features."""
    if sp.issparse(x):
        return descending_rows(sp.csr_matrix(l2_normalise_rows(x), dtype=np.float32))
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def _check_pair(query: sp.csr_matrix | np.ndarray, gallery: sp.csr_matrix | np.ndarray) -> None:
    if query.shape != gallery.shape:
        raise ValueError(f"retrieval: query {query.shape} and gallery {gallery.shape} differ")
    if sp.issparse(query) != sp.issparse(gallery):
        raise ValueError("retrieval: query and gallery must both be sparse codes or both dense")


def pair_rank_counts(
    query: sp.csr_matrix | np.ndarray,
    gallery: sp.csr_matrix | np.ndarray,
    device: str = "cpu",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> RankCounts:
    """Rank counts in both directions between two aligned representations of the same N items.

    ``query`` and ``gallery``: ``[N, L]`` CSR codes or ``[N, d]`` dense features (same kind).
    Returns ``((greater, ties) for query->gallery, (greater, ties) for gallery->query)``, each
    ``[N]`` int64: greater_i = #{j : S_ij > S_ii}, ties_i = #{j != i : S_ij = S_ii} (row-wise for
    the first direction, column-wise for the second), as in :func:`metrics.rank_counts`.
    Codes on the CPU take the inverted index (:func:`sparse_pair_rank_counts`), everything else
    the blocked dense product (:func:`dense_pair_rank_counts`); both give the same counts.
    """
    _check_pair(query, gallery)
    if sp.issparse(query) and torch.device(device).type == "cpu":
        return sparse_pair_rank_counts(query, gallery)
    return dense_pair_rank_counts(query, gallery, device=device, block_bytes=block_bytes)


# --------------------------------------------------------------------------- dense (reference)


class _Gallery:
    """The gallery on ``device`` (torch CSR or dense) and products with dense query blocks."""

    def __init__(self, gallery: sp.csr_matrix | np.ndarray, device: str) -> None:
        self.host = gallery
        self.device = device
        self.sparse = sp.issparse(gallery)
        self.tensor = _csr_to_torch(gallery, device) if self.sparse else torch.from_numpy(gallery).to(device)

    def times(self, query_block_t: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``G[rows] @ query_block_t`` (all rows when None): ``[n, b]`` float32."""
        if rows is None:
            mat = self.tensor
        elif self.sparse:
            mat = _csr_to_torch(self.host[rows], self.device)
        else:
            mat = self.tensor[rows]
        return torch.sparse.mm(mat, query_block_t) if self.sparse else mat @ query_block_t


def _dense_block_t(query: sp.csr_matrix | np.ndarray, rows: slice, device: str) -> torch.Tensor:
    block = query[rows].toarray() if sp.issparse(query) else query[rows]
    return torch.from_numpy(np.ascontiguousarray(block.T, dtype=np.float32)).to(device)


def _row_blocks(N: int, device: str, block_bytes: int) -> list[slice]:
    """Query row blocks whose ``[N, b]`` float32 similarity block fits ``block_bytes``."""
    b = max(1, block_bytes // (4 * max(N, 1)))
    if torch.device(device).type == "cpu":
        b = min(b, CPU_MAX_ROWS)
    return [slice(a, min(a + b, N)) for a in range(0, N, b)]


def _diagonal(q: sp.csr_matrix | np.ndarray, gal: _Gallery, blocks: list[slice]) -> torch.Tensor:
    """``[N]`` float32 S_jj for every j, by the dense kernel on the same gallery rows as the main pass."""
    diag = torch.empty(q.shape[0], dtype=torch.float32, device=gal.device)
    for rows in blocks:
        diag[rows] = torch.diagonal(gal.times(_dense_block_t(q, rows, gal.device), rows))
    return diag


def dense_pair_rank_counts(
    query: sp.csr_matrix | np.ndarray,
    gallery: sp.csr_matrix | np.ndarray,
    device: str = "cpu",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> RankCounts:
    """:func:`pair_rank_counts` by blocked dense similarity blocks ``[N, b]`` on ``device`` (the
    reference computation; the one for raw features and for CUDA)."""
    _check_pair(query, gallery)
    q = _normalise(query)
    gal = _Gallery(_normalise(gallery), device)
    N = q.shape[0]
    on_cpu = torch.device(device).type == "cpu"
    blocks = _row_blocks(N, device, block_bytes)
    diag = _diagonal(q, gal, blocks)

    fwd_greater = np.empty(N, dtype=np.int64)
    fwd_ties = np.empty(N, dtype=np.int64)
    rev_greater = np.zeros(N, dtype=np.int64)
    rev_ties = np.zeros(N, dtype=np.int64)
    for rows in blocks:
        st = gal.times(_dense_block_t(q, rows, device))  # [N, b]: st[j, c] = S_{rows.start + c, j}
        counts = _block_counts(st, diag, rows, on_cpu)
        fwd_greater[rows], fwd_ties[rows] = counts[0], counts[1]
        rev_greater += counts[2]
        rev_ties += counts[3]
    return (fwd_greater, fwd_ties), (rev_greater, rev_ties)


def _block_counts(st: torch.Tensor, diag: torch.Tensor, rows: slice, on_cpu: bool) -> list[np.ndarray]:
    """Counts from one ``[N, b]`` block, the answers themselves excluded: per query column, entries
    above / equal to its diagonal value; per gallery row, entries above / equal to that row's
    diagonal value. NumPy on CPU (several times faster than torch's CPU reductions here), torch
    on other devices."""
    own = np.arange(rows.start, rows.stop)
    cols = own - rows.start
    if on_cpu:
        s, d = st.numpy(), diag.numpy()
        v, dcol = d[rows], d[:, None]
        self_sim = s[own, cols]
        out = [
            np.count_nonzero(s > v, axis=0) - (self_sim > v),
            np.count_nonzero(s == v, axis=0) - (self_sim == v),
            np.count_nonzero(s > dcol, axis=1),
            np.count_nonzero(s == dcol, axis=1),
        ]
    else:
        v, dcol = diag[rows], diag[:, None]
        self_sim = st[torch.from_numpy(own).to(st.device), torch.from_numpy(cols).to(st.device)]
        out = [
            t.cpu().numpy()
            for t in (
                (st > v).sum(dim=0) - (self_sim > v).long(),
                (st == v).sum(dim=0) - (self_sim == v).long(),
                (st > dcol).sum(dim=1),
                (st == dcol).sum(dim=1),
            )
        ]
        self_sim, v = self_sim.cpu().numpy(), v.cpu().numpy()
    out = [np.asarray(c, dtype=np.int64) for c in out]
    out[2][rows] -= self_sim > v
    out[3][rows] -= self_sim == v
    return out


# --------------------------------------------------------------------------- sparse (inverted index)


class InvertedIndex:
    """The gallery by latent: ``cols`` is the ``[N, L]`` float32 gallery in CSC form, column l listing
    the samples where latent l is active and their values (the posting list of l)."""

    def __init__(self, gallery: sp.csr_matrix) -> None:
        cols = sp.csc_matrix(gallery, dtype=np.float32)
        idx = np.int32 if cols.nnz < 2**31 else np.int64
        self.indptr = cols.indptr.astype(idx)
        self.indices = cols.indices.astype(idx)
        self.data = cols.data
        self.cols = sp.csc_matrix((self.data, self.indices, self.indptr), shape=cols.shape)
        self.N = cols.shape[0]

    def scores(self, latents: np.ndarray, values: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out[j]`` (``[N]`` float32, overwritten) = sum over t of ``G[j, latents[t]] * values[t]``,
        added in the order of ``latents``: the query's scores against every gallery row
        (``G[:, latents] @ values``, touching only those latents' postings)."""
        values = np.asarray(values, dtype=np.float32)
        if FAST_KERNELS:
            return self._scores_private(latents, values, out)
        out[:] = self.cols[:, latents] @ values
        return out

    def _scores_private(self, latents: np.ndarray, values: np.ndarray, out: np.ndarray) -> np.ndarray:
        """:meth:`scores` through the kernels the public calls use (gather the postings, then mat-vec)."""
        latents = np.asarray(latents, dtype=self.indptr.dtype)
        lengths = self.indptr[latents + 1] - self.indptr[latents]
        ptr = np.zeros(latents.size + 1, dtype=self.indptr.dtype)
        np.cumsum(lengths, out=ptr[1:])
        rows = np.empty(ptr[-1], dtype=self.indptr.dtype)
        vals = np.empty(ptr[-1], dtype=np.float32)
        _csr_row_index(latents.size, latents, self.indptr, self.indices, self.data, rows, vals)
        out.fill(0.0)
        _csc_matvec(self.N, latents.size, ptr, rows, vals, values, out)
        return out


def _private_kernels_work() -> bool:
    """True when SciPy's private kernels exist and give the public calls' scores on a small case."""
    if _csc_matvec is None or _csr_row_index is None:
        return False
    index = InvertedIndex(sp.csr_matrix(np.array([[0.5, 0.0, 2.0], [1.0, 3.0, 0.0], [0.0, 0.0, 7.0]])))
    latents, values = np.array([2, 0], dtype=np.int32), np.array([0.25, 4.0], dtype=np.float32)
    try:
        fast = index._scores_private(latents, values, np.empty(3, dtype=np.float32))
    except (TypeError, ValueError, RuntimeError):  # a changed signature
        return False
    return bool(np.array_equal(fast, index.cols[:, latents] @ values))


FAST_KERNELS = _private_kernels_work()


def query_scores(q: sp.csr_matrix, index: InvertedIndex, i: int, out: np.ndarray | None = None) -> np.ndarray:
    """``[N]`` float32 S_ij of query row i of ``q`` against every gallery row j: the postings of its
    active latents in the order its row stores them (zeros where nothing is shared)."""
    lo, hi = q.indptr[i], q.indptr[i + 1]
    out = np.empty(index.N, dtype=np.float32) if out is None else out
    return index.scores(q.indices[lo:hi], q.data[lo:hi], out)


def paired_scores(q: sp.csr_matrix, g: sp.csr_matrix, block_bytes: int = 1 << 26) -> np.ndarray:
    """``[N]`` float32 S_ii = the score of row i of ``q`` with row i of ``g``, both ``[N, L]`` float32
    with rows by decreasing latent (:func:`descending_rows`), by the formula of the module
    docstring: float32 products of the shared latents, added one by one in ``g``'s row order.
    Rows of ``q`` are spread into a dense ``[b, L]`` scratch of ``block_bytes`` at a time."""
    N, L = g.shape
    products = np.empty(g.nnz, dtype=np.float32)  # g_il * q_il, 0 where q_il is not stored
    rows_per_block = max(1, min(N, block_bytes // (4 * max(L, 1))))
    scratch = np.zeros(rows_per_block * L, dtype=np.float32)  # [b, L] flat
    for a in range(0, N, rows_per_block):
        b = min(a + rows_per_block, N)
        q_part = slice(q.indptr[a], q.indptr[b])
        g_part = slice(g.indptr[a], g.indptr[b])
        q_at = np.repeat(np.arange(b - a, dtype=np.int64) * L, np.diff(q.indptr[a : b + 1])) + q.indices[q_part]
        g_at = np.repeat(np.arange(b - a, dtype=np.int64) * L, np.diff(g.indptr[a : b + 1])) + g.indices[g_part]
        np.put(scratch, q_at, q.data[q_part])
        np.multiply(g.data[g_part], np.take(scratch, g_at), out=products[g_part])
        np.put(scratch, q_at, 0.0)
    lengths = np.diff(g.indptr)
    scores = np.zeros(N, dtype=np.float32)
    for m in range(int(lengths.max()) if N else 0):  # the m-th entry of every row long enough
        rows = np.flatnonzero(lengths > m)
        scores[rows] += products[g.indptr[rows] + m]
    return scores


class _DiagonalMismatch(Exception):
    """A query's own score from the mat-vec differs from :func:`paired_scores`."""


def _scan(
    q: sp.csr_matrix, index: InvertedIndex, diag: np.ndarray, chunks: list[range], forward: list[np.ndarray]
) -> list[np.ndarray]:
    """Counts for the queries in ``chunks``: forward greater / ties written into ``forward[0]`` /
    ``forward[1]`` at those rows; returns these queries' share of the reverse greater / ties
    (``[N]`` each). The answers themselves are excluded."""
    N = q.shape[0]
    rev_greater = np.zeros(N, dtype=np.int64)
    rev_ties = np.zeros(N, dtype=np.int64)
    # reverse counts gather in uint8 over at most 255 queries, then move to the int64 totals
    acc_greater = np.zeros(N, dtype=np.uint8)
    acc_ties = np.zeros(N, dtype=np.uint8)
    mask = np.empty(N, dtype=bool)
    y = np.empty(N, dtype=np.float32)
    for rows in chunks:
        for start in range(rows.start, rows.stop, 255):
            for i in range(start, min(start + 255, rows.stop)):
                query_scores(q, index, i, out=y)
                s = diag[i]
                if y[i] != s:
                    raise _DiagonalMismatch(f"query {i}: mat-vec score {y[i]!r}, formula {s!r}")
                forward[0][i] = np.count_nonzero(np.greater(y, s, out=mask))
                forward[1][i] = np.count_nonzero(np.equal(y, s, out=mask)) - 1  # y[i] == s itself
                np.add(acc_greater, np.greater(y, diag, out=mask).view(np.uint8), out=acc_greater)
                np.add(acc_ties, np.equal(y, diag, out=mask).view(np.uint8), out=acc_ties)
            rev_greater += acc_greater
            rev_ties += acc_ties
            acc_greater[:] = 0
            acc_ties[:] = 0
        rev_ties[rows.start : rows.stop] -= 1  # S_ii tied with itself in the reverse direction
    return [rev_greater, rev_ties]


def sparse_pair_rank_counts(
    query: sp.csr_matrix,
    gallery: sp.csr_matrix,
    threads: int | None = None,
    chunk: int = CHUNK_QUERIES,
) -> RankCounts:
    """:func:`pair_rank_counts` of ``[N, L]`` CSR codes by an inverted index on the CPU (module
    docstring), over ``threads`` threads (default ``torch.get_num_threads()``), each taking every
    ``threads``-th run of ``chunk`` queries. Counts equal :func:`dense_pair_rank_counts` on the CPU."""
    _check_pair(query, gallery)
    if not sp.issparse(query):
        raise ValueError("sparse retrieval: query and gallery must be sparse codes")
    q = _normalise(query)
    g = _normalise(gallery)
    N = q.shape[0]
    diag = paired_scores(q, g)
    index = InvertedIndex(g)
    chunks = [range(a, min(a + chunk, N)) for a in range(0, N, chunk)]
    workers = max(1, min(threads or torch.get_num_threads(), len(chunks)))
    forward = [np.zeros(N, dtype=np.int64), np.zeros(N, dtype=np.int64)]
    shares = [chunks[w::workers] for w in range(workers)]
    try:
        if workers == 1:
            parts = [_scan(q, index, diag, share, forward) for share in shares]
        else:
            with ThreadPoolExecutor(workers) as pool:
                parts = list(pool.map(lambda share: _scan(q, index, diag, share, forward), shares))
    except _DiagonalMismatch as err:
        warnings.warn(
            f"sparse retrieval: SciPy's mat-vec does not round as the score formula here ({err}); "
            "using the dense computation",
            RuntimeWarning,
            stacklevel=2,
        )
        return dense_pair_rank_counts(query, gallery)
    reverse = [np.sum([p[d] for p in parts], axis=0, dtype=np.int64) for d in (0, 1)]
    return (forward[0], forward[1]), (reverse[0], reverse[1])


def shares_space(meta_a: dict, meta_b: dict) -> bool:
    """True when two feature streams embed into one space: the same ``openclip:`` model spec,
    one reading ``image`` and the other ``caption``, equal ``dim`` (the feature store's meta.json)."""
    model_a, model_b = str(meta_a.get("model", "")), str(meta_b.get("model", ""))
    return (
        model_a == model_b
        and model_a.startswith("openclip:")
        and {meta_a.get("input"), meta_b.get("input")} == {"image", "caption"}
        and meta_a.get("dim") == meta_b.get("dim")
    )


def spread_picks(n: int, n_picks: int) -> np.ndarray:
    """``min(n_picks, n)`` row indices evenly spread over ``range(n)`` (the example queries)."""
    if n_picks <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, min(n_picks, n)).round().astype(np.int64))


def cosine_scores(queries: sp.csr_matrix, gallery: sp.csr_matrix) -> np.ndarray:
    """``[n_gallery, n_queries]`` float64 cosine similarities of L2-normalised sparse codes
    (a zero code scores 0 against everything)."""
    q = l2_normalise_rows(queries).astype(np.float64)
    g = l2_normalise_rows(gallery).astype(np.float64)
    return np.asarray((g @ q.T).todense())
