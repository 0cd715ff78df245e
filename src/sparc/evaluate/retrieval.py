"""Cross-stream retrieval (method.md section 4).

Codes come from per-stream inference (each stream its own top-k), so a shared index set cannot
leak the answer. Query i (row i of stream s) should find gallery item i (row i of stream t) among
all N rows of the evaluated split. Similarity: cosine of the L2-normalised code vectors (or of the
L2-normalised raw features for the baseline). Ranks treat ties as a uniformly random order
(:func:`sparc.evaluate.metrics.retrieval_metrics`); what is computed here are the rank counts
greater_i = #{j : S_ij > S_ii} and ties_i = #{j != i : S_ij = S_ii} in both directions.

The scores, exactly (the tie rule is defined on them). Each row is scaled to unit L2 norm in
float64 (:func:`sparc.evaluate.metrics.l2_normalise_rows`: a sequential sum of squares, a square
root, one product per entry) and each entry x is then fixed to the integer grid
``round(x * 2**24)`` (:data:`SCALE`; halves to even), stored as float32, which holds these
integers exactly (|x| <= 1). The score is the integer

    S_ij = sum over latents l of  q_il * g_jl          (q, g the integer rows)

Every product is an integer below 2^48 in magnitude, and every partial sum over any subset of the
latents is bounded by Cauchy-Schwarz by |q_i| |g_j| <= (2^24 + sqrt(L) / 2)^2 < 2^49, so float64
represents each of them exactly: a float64 dot product gives S_ij exactly whatever its summation
order, blocking, vector width, fused multiply-adds or device. The numba kernel, the CPU's BLAS or
sparse-BLAS, and CUDA therefore give bit-identical scores, hence identical rank counts, on every
machine (the differences a float32 sum would have between kernels, one ulp in about 1% of the
scores, turned ties into wins on some CPUs). The grid's step, 2^-24 of a unit vector's length, is
the precision of a float32 near 1: scores closer than that were ties in float32 already.

* :func:`sparse_pair_rank_counts` (codes on the CPU; what :func:`pair_rank_counts` runs there):
  an inverted index and a kernel compiled by numba (:func:`_count_kernel`). The gallery is held
  by columns (latent -> the samples where it is active and their values); for query i, each
  stored (latent l, value q_il) adds ``y[j] += g_jl * q_il`` (int64) over the postings of l,
  about k * (k / L) * N entries instead of the N * k of a dense column. ``y`` is a full ``[N]``
  int64 row of the worker's scratch, so samples sharing no latent with the query score exactly
  0 and are ranked (and tied) exactly as in the dense computation, whatever the sign of the
  values; one vectorised pass over ``y`` counts it against S_ii (forward) and against the diagonal
  S_jj (the worker's reverse counts) and zeroes it again. (Visiting only the rows a query touches,
  with a touched list, was measured slower: at the paper's sizes a query meets about 0.5 N
  postings, 40% of the rows, and scattered updates of per-row counters cost more than the pass.)
  The diagonal comes from :func:`paired_scores`. Queries are interleaved over numba's threads
  (``prange``); the machine code is cached on disk (:func:`kernel_cache_dir`).
* :func:`dense_pair_rank_counts` (raw features; codes on any ``evaluate.device``): S = Q G^T is
  never held whole. For a block of b query rows, the block is densified (``[L, b]``) and
  ``S_block^T = G @ Q_block^T`` (``[N, b]``, float64) is a sparse x dense product with the
  gallery kept as a CSR matrix (torch; dense features use a dense matmul). One pass gives both
  directions: the columns of the block rank the gallery for queries s -> t, its rows rank the
  queries for the reverse direction t -> s (``S^{t->s} = S^T``), compared with the diagonal S_jj.

The raw-feature baseline (dense features) applies where two streams share an embedding space: the
same OpenCLIP model reading the image in one stream and the caption in the other.

Cost per stream pair (both directions), at the paper's scale (N = 126k, L = 8192, k = 64):
dense, nnz(codes) x N multiply-adds (500-1100 CPU seconds per pair); sparse, about
N * k^2 / L * N scattered adds (128x fewer, about 1.8 ns each) plus one pass over N scores per
query (about 0.4 ns per score): about 20 CPU seconds per pair (10-12 s wall on 2 threads)
(benchmarks/evaluate_memory.py). Compiling the kernels takes about 4 CPU seconds, once per machine
and version of this file (0.3 s to load them from the cache). Memory: the sparse path holds the
gallery twice (rows and columns), an ``[N]`` int64 scratch and two ``[N]`` int32 counters per
worker, and numba adds about 0.1 GiB; the dense path one ``[N, b]`` float64 block.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
import scipy.sparse as sp
import torch

from sparc.evaluate.metrics import l2_normalise_rows
from sparc.model.jit import jit, kernel_cache_dir  # noqa: F401  (kernel_cache_dir: part of this module's API)

SCALE = float(2**24)  # the integer grid of unit-row entries (module docstring)
DEFAULT_BLOCK_BYTES = 1 << 27  # one [N, b] float64 similarity block (128 MiB)
CPU_MAX_ROWS = 128  # measured best block width for the CPU sparse x dense product
RankCounts = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _csr_to_torch(mat: sp.csr_matrix, device: str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(mat.indptr.astype(np.int64)),
            torch.from_numpy(mat.indices.astype(np.int64)),
            torch.from_numpy(mat.data.astype(np.float64)),
            size=mat.shape,
            device=device,
            check_invariants=False,  # built from a valid SciPy CSR matrix
        )


def fixed_point_rows(x: sp.csr_matrix | np.ndarray) -> sp.csr_matrix | np.ndarray:
    """The rows the scores are defined on (module docstring): unit L2 norm in float64 (zero rows
    stay zero), then ``round(x * SCALE)``, as float32 (integers of magnitude <= 2^24, exact).
    ``[N, L]`` codes give float32 CSR (duplicate entries summed first), ``[N, d]`` dense features
    a float32 ndarray."""
    if sp.issparse(x):
        mat = sp.csr_matrix(x, dtype=np.float64, copy=True)
        mat.sum_duplicates()
        # l2_normalise_rows's arithmetic (its row norms; one product per entry), in place
        norms = np.sqrt(np.asarray(mat.multiply(mat).sum(axis=1)).ravel())
        scale = np.zeros_like(norms)
        np.divide(1.0, norms, out=scale, where=norms > 0)
        data = mat.data
        data *= np.repeat(scale, np.diff(mat.indptr))
        data *= SCALE  # a power of two: exact
        np.rint(data, out=data)
        return sp.csr_matrix((data.astype(np.float32), mat.indices, mat.indptr), shape=mat.shape)
    x = np.asarray(x)
    out = np.empty(x.shape, dtype=np.float32)
    for a in range(0, x.shape[0], 8192):  # the codes' computation, a block of rows at a time
        out[a : a + 8192] = fixed_point_rows(sp.csr_matrix(x[a : a + 8192])).toarray()
    return out


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
    the first direction, column-wise for the second), as in :func:`metrics.rank_counts`, on the
    exact scores of the module docstring. Codes on the CPU take the inverted index
    (:func:`sparse_pair_rank_counts`), everything else the blocked dense product
    (:func:`dense_pair_rank_counts`); both give the same counts on every machine.
    """
    _check_pair(query, gallery)
    if sp.issparse(query) and torch.device(device).type == "cpu":
        return sparse_pair_rank_counts(query, gallery)
    return dense_pair_rank_counts(query, gallery, device=device, block_bytes=block_bytes)


# --------------------------------------------------------------------------- dense


class _Gallery:
    """The gallery's integer rows on ``device`` (float64 torch CSR or dense) and its products
    with dense query blocks."""

    def __init__(self, gallery: sp.csr_matrix | np.ndarray, device: str) -> None:
        self.host = gallery
        self.device = device
        self.sparse = sp.issparse(gallery)
        if self.sparse:
            self.tensor = _csr_to_torch(gallery, device)
        else:
            self.tensor = torch.from_numpy(np.asarray(gallery, dtype=np.float64)).to(device)

    def times(self, query_block_t: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``G[rows] @ query_block_t`` (all rows when None): ``[n, b]`` float64, exact."""
        if rows is None:
            mat = self.tensor
        elif self.sparse:
            mat = _csr_to_torch(self.host[rows], self.device)
        else:
            mat = self.tensor[rows]
        return torch.sparse.mm(mat, query_block_t) if self.sparse else mat @ query_block_t


def _dense_block_t(query: sp.csr_matrix | np.ndarray, rows: slice, device: str) -> torch.Tensor:
    """``[L, b]`` float64 transpose of the query rows ``rows`` (integer rows, dense)."""
    block = query[rows].toarray() if sp.issparse(query) else query[rows]
    return torch.from_numpy(np.ascontiguousarray(block.T, dtype=np.float64)).to(device)


def _row_blocks(N: int, device: str, block_bytes: int) -> list[slice]:
    """Query row blocks whose ``[N, b]`` float64 similarity block fits ``block_bytes``."""
    b = max(1, block_bytes // (8 * max(N, 1)))
    if torch.device(device).type == "cpu":
        b = min(b, CPU_MAX_ROWS)
    return [slice(a, min(a + b, N)) for a in range(0, N, b)]


def dense_pair_rank_counts(
    query: sp.csr_matrix | np.ndarray,
    gallery: sp.csr_matrix | np.ndarray,
    device: str = "cpu",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> RankCounts:
    """:func:`pair_rank_counts` by blocked dense similarity blocks ``[N, b]`` on ``device`` (the
    path for raw features and for codes off the CPU)."""
    _check_pair(query, gallery)
    q = fixed_point_rows(query)
    g = fixed_point_rows(gallery)
    gal = _Gallery(g, device)
    N = q.shape[0]
    on_cpu = torch.device(device).type == "cpu"
    diag = torch.from_numpy(paired_scores(q, g).astype(np.float64)).to(device)  # exact (< 2^49)

    fwd_greater = np.empty(N, dtype=np.int64)
    fwd_ties = np.empty(N, dtype=np.int64)
    rev_greater = np.zeros(N, dtype=np.int64)
    rev_ties = np.zeros(N, dtype=np.int64)
    for rows in _row_blocks(N, device, block_bytes):
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
    """The gallery by latent (its CSC form): ``rows[ptr[l]:ptr[l + 1]]`` are the samples where
    latent l is active (the posting list of l) and ``values[ptr[l]:ptr[l + 1]]`` (int32) their
    values. Indices are unsigned (``ptr`` uint64, ``rows`` uint32), which spares the compiled loops
    the handling of negative indices (a quarter of the scatter's time)."""

    def __init__(self, gallery: sp.csr_matrix) -> None:
        cols = sp.csc_matrix(gallery)
        if cols.shape[0] >= 2**32:
            raise ValueError(f"sparse retrieval: {cols.shape[0]} gallery rows do not fit uint32 indices")
        self.ptr = cols.indptr.astype(np.uint64)
        self.rows = _as_uint32(cols.indices)
        self.values = np.ascontiguousarray(cols.data, dtype=np.int32)
        self.N = cols.shape[0]


def _as_uint32(indices: np.ndarray) -> np.ndarray:
    """Non-negative CSR/CSC indices as uint32: a view of int32 ones (no copy), else a copy."""
    if indices.dtype == np.int32 and indices.flags.c_contiguous:
        return indices.view(np.uint32)
    return indices.astype(np.uint32)


def _query_arrays(q: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indptr uint64, latents uint32, values int32)`` of the integer rows of CSR query codes
    (:func:`fixed_point_rows`), as the kernels take them."""
    values = np.ascontiguousarray(q.data, dtype=np.int32)
    return q.indptr.astype(np.uint64), _as_uint32(q.indices), values


@jit(nogil=True)
def _scatter(i, q_ptr, q_lat, q_val, g_ptr, g_row, g_val, y):
    """Adds query i's scores against the gallery into ``y`` (``[N]`` int64 holding 0s): for each
    stored (latent l, value v) of query row i and each posting (j, g) of l, ``y[j] += g * v``
    (int64, exact). Rows sharing no latent with i stay 0."""
    for p in range(q_ptr[i], q_ptr[i + 1]):
        lat = q_lat[p]
        v = np.int64(q_val[p])
        for e in range(g_ptr[lat], g_ptr[lat + 1]):
            y[g_row[e]] += g_val[e] * v


@jit(nogil=True, parallel=True)
def _count_kernel(q_ptr, q_lat, q_val, g_ptr, g_row, g_val, diag, fwd_greater, fwd_ties, rev_greater, rev_ties):
    """Rank counts of all queries by W = ``rev_greater.shape[0]`` workers run in parallel (numba
    prange; worker w takes queries w, w + W, ... with its own ``[N]`` int64 scratch ``y``).

    Query i's scores y_j = S_ij (:func:`_scatter`), then one pass over j that zeroes ``y`` again and
    counts: ``fwd_greater[i]`` = #{j : y_j > S_ii}, ``fwd_ties[i]`` = #{j : y_j = S_ii} - 1 (the
    answer itself), and worker w's share of the reverse direction ``rev_greater[w, j]`` +=
    [y_j > S_jj], ``rev_ties[w, j]`` += [y_j = S_jj] (S_jj = ``diag[j]``; the caller takes the
    answers off)."""
    N = diag.size
    workers = rev_greater.shape[0]
    y = np.zeros((workers, N), dtype=np.int64)
    for w in numba.prange(workers):
        yw, rg, rt = y[w], rev_greater[w], rev_ties[w]
        for i in range(w, N, workers):
            _scatter(i, q_ptr, q_lat, q_val, g_ptr, g_row, g_val, yw)
            s = diag[i]
            greater = 0
            ties = 0
            for j in range(N):
                yj = yw[j]
                yw[j] = 0
                greater += yj > s
                ties += yj == s
                d = diag[j]
                rg[j] += yj > d
                rt[j] += yj == d
            fwd_greater[i] = greater
            fwd_ties[i] = ties - 1


def query_scores(q: sp.csr_matrix, index: InvertedIndex, i: int) -> np.ndarray:
    """``[N]`` int64 S_ij of query row i of ``q`` (integer rows, :func:`fixed_point_rows`)
    against every gallery row j, by the kernel of :func:`sparse_pair_rank_counts` (0 where nothing
    is shared)."""
    out = np.zeros(index.N, dtype=np.int64)
    _scatter(i, *_query_arrays(q), index.ptr, index.rows, index.values, out)
    return out


def paired_scores(q: sp.csr_matrix | np.ndarray, g: sp.csr_matrix | np.ndarray) -> np.ndarray:
    """``[N]`` int64 S_ii = the score of row i of ``q`` with row i of ``g`` (integer rows of the
    same shape, :func:`fixed_point_rows`): the row sums of their elementwise product in int64."""
    if sp.issparse(q):
        prod = sp.csr_matrix(q, dtype=np.int64).multiply(sp.csr_matrix(g, dtype=np.int64))
        return np.asarray(prod.sum(axis=1), dtype=np.int64).ravel()
    return (np.asarray(q, dtype=np.int64) * np.asarray(g, dtype=np.int64)).sum(axis=1)


def sparse_pair_rank_counts(
    query: sp.csr_matrix, gallery: sp.csr_matrix, threads: int | None = None
) -> RankCounts:
    """:func:`pair_rank_counts` of ``[N, L]`` CSR codes by an inverted index on the CPU (module
    docstring): the compiled :func:`_count_kernel` over ``threads`` workers (default
    ``torch.get_num_threads()``; numba runs at most ``numba.config.NUMBA_NUM_THREADS`` at once).
    Counts equal :func:`dense_pair_rank_counts`'s on any device."""
    _check_pair(query, gallery)
    if not sp.issparse(query):
        raise ValueError("sparse retrieval: query and gallery must be sparse codes")
    q = fixed_point_rows(query)
    g = fixed_point_rows(gallery)
    N = q.shape[0]
    diag = paired_scores(q, g)
    index = InvertedIndex(g)
    workers = max(1, min(threads or torch.get_num_threads(), N))
    fwd_greater = np.zeros(N, dtype=np.int64)
    fwd_ties = np.zeros(N, dtype=np.int64)
    rev_greater = np.zeros((workers, N), dtype=np.int32)  # a worker's share is at most N
    rev_ties = np.zeros((workers, N), dtype=np.int32)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(workers, numba.config.NUMBA_NUM_THREADS))
    try:
        _count_kernel(
            *_query_arrays(q), index.ptr, index.rows, index.values, diag,
            fwd_greater, fwd_ties, rev_greater, rev_ties,
        )
    finally:
        numba.set_num_threads(previous)
    rev_g = rev_greater.sum(axis=0, dtype=np.int64)
    rev_t = rev_ties.sum(axis=0, dtype=np.int64) - 1  # S_jj tied with itself
    return (fwd_greater, fwd_ties), (rev_g, rev_t)


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
