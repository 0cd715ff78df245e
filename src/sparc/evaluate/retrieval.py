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
  an inverted index and a kernel compiled by numba (:func:`_count_kernel`). The gallery is held
  by columns (latent -> the samples where it is active and their values); for query i, each
  stored (latent l, value q_il), in the query's stored order, adds ``y[j] += g_jl * q_il`` over
  the postings of l: a float32 product, then a float32 sum (compiled without ``fastmath``, so
  with no fused multiply-add and no reassociation), about k * (k / L) * N entries instead of the
  N * k of a dense column. ``y`` is a full ``[N]`` row of the worker's scratch, so samples sharing
  no latent with the query score exactly 0 and are ranked (and tied) exactly as in the dense
  computation, whatever the sign of the values; one vectorised pass over ``y`` counts it against
  S_ii (forward) and against the diagonal S_jj (the worker's reverse counts) and zeroes it again.
  (Visiting only the rows a query touches, with a touched list, was measured slower, even than
  the SciPy mat-vec this replaced: at the paper's sizes a query meets about 0.5 N postings, 40%
  of the rows, and scattered updates of per-row counters cost more than the pass.) The diagonal
  comes from :func:`paired_scores` (the formula, vectorised) and every query checks its own kernel
  score against it: where the kernel rounds otherwise, the counts come from the dense computation
  instead, with a warning. Queries are interleaved over numba's threads (``prange``); the machine
  code is cached on disk (:func:`kernel_cache_dir`).
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
N * k^2 / L * N scattered adds (128x fewer, about 1.8 ns each) plus one pass over N scores per
query (about 0.4 ns per score): about 20 CPU seconds per pair (10-12 s wall on 2 threads), where
the SciPy mat-vec and four NumPy comparisons it replaced took about 40 (benchmarks/evaluate_memory.py,
same machine and load). Compiling the kernels takes about 4 CPU seconds, once per machine and
version of this file (0.3 s to load them from the cache). Memory: the sparse path holds the
gallery twice (rows and columns), an ``[N]`` float32 scratch and two ``[N]`` int32 counters per
worker, and numba adds about 0.1 GiB; the dense path one ``[N, b]`` block.
"""

from __future__ import annotations

import os
import tempfile
import warnings

import numba
import numpy as np
import scipy.sparse as sp
import torch

from sparc.evaluate.metrics import l2_normalise_rows

DEFAULT_BLOCK_BYTES = 1 << 27  # one [N, b] float32 similarity block (128 MiB)
CPU_MAX_ROWS = 128  # measured best block width for the CPU sparse x dense product
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


def kernel_cache_dir() -> str | None:
    """Where the compiled kernels are cached: ``$NUMBA_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/sparc/numba`` (``~/.cache/sparc/numba``); None when it cannot be written.
    Never numba's default ``__pycache__`` beside this file: ``src/sparc/evaluate`` is a dependency
    of DVC stages (dvc.yaml), whose hash would change with the files written there."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = numba.config.CACHE_DIR or os.path.join(base, "sparc", "numba")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return None
    return path


def _jit(**options):
    """``numba.njit(**options)``, its machine code cached in :func:`kernel_cache_dir` (compiled
    again by each process where that is None). Never ``fastmath``: the scores must round as the
    module docstring says (no fused multiply-add, no reassociation)."""

    def wrap(fn):
        cache_dir = kernel_cache_dir()
        if cache_dir is None:
            return numba.njit(**options)(fn)
        previous = numba.config.CACHE_DIR  # numba picks the cache location when decorating
        numba.config.CACHE_DIR = cache_dir
        try:
            return numba.njit(cache=True, **options)(fn)
        finally:
            numba.config.CACHE_DIR = previous

    return wrap


class InvertedIndex:
    """The gallery by latent (its CSC form): ``rows[ptr[l]:ptr[l + 1]]`` are the samples where
    latent l is active (the posting list of l) and ``values[ptr[l]:ptr[l + 1]]`` (float32) their
    values. Indices are unsigned (``ptr`` uint64, ``rows`` uint32), which spares the compiled loops
    the handling of negative indices (a quarter of the scatter's time)."""

    def __init__(self, gallery: sp.csr_matrix) -> None:
        cols = sp.csc_matrix(gallery, dtype=np.float32)
        if cols.shape[0] >= 2**32:
            raise ValueError(f"sparse retrieval: {cols.shape[0]} gallery rows do not fit uint32 indices")
        self.ptr = cols.indptr.astype(np.uint64)
        self.rows = _as_uint32(cols.indices)
        self.values = np.ascontiguousarray(cols.data, dtype=np.float32)
        self.N = cols.shape[0]


def _as_uint32(indices: np.ndarray) -> np.ndarray:
    """Non-negative CSR/CSC indices as uint32: a view of int32 ones (no copy), else a copy."""
    if indices.dtype == np.int32 and indices.flags.c_contiguous:
        return indices.view(np.uint32)
    return indices.astype(np.uint32)


def _query_arrays(q: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indptr uint64, latents uint32, values float32)`` of CSR query codes, as the kernels take
    them."""
    values = np.ascontiguousarray(q.data, dtype=np.float32)
    return q.indptr.astype(np.uint64), _as_uint32(q.indices), values


@_jit(nogil=True)
def _scatter(i, q_ptr, q_lat, q_val, g_ptr, g_row, g_val, y):
    """Adds query i's scores against the gallery into ``y`` (``[N]`` float32 holding 0s): for each
    stored (latent l, value v) of query row i, in stored order, and each posting (j, g) of l,
    ``y[j] += g * v`` in float32, one rounding for the product and one for the sum (compiled
    without fastmath: no fused multiply-add). Rows sharing no latent with i stay exactly 0."""
    for p in range(q_ptr[i], q_ptr[i + 1]):
        lat = q_lat[p]
        v = q_val[p]
        for e in range(g_ptr[lat], g_ptr[lat + 1]):
            y[g_row[e]] += g_val[e] * v


@_jit(nogil=True, parallel=True)
def _count_kernel(
    q_ptr, q_lat, q_val, g_ptr, g_row, g_val, diag, fwd_greater, fwd_ties, rev_greater, rev_ties, mismatch
):
    """Rank counts of all queries by W = ``mismatch.size`` workers run in parallel (numba prange;
    worker w takes queries w, w + W, ... with its own ``[N]`` float32 scratch ``y``).

    Query i's scores y_j = S_ij (:func:`_scatter`), then one pass over j that zeroes ``y`` again and
    counts: ``fwd_greater[i]`` = #{j : y_j > S_ii}, ``fwd_ties[i]`` = #{j : y_j = S_ii} - 1 (the
    answer itself), and worker w's share of the reverse direction ``rev_greater[w, j]`` +=
    [y_j > S_jj], ``rev_ties[w, j]`` += [y_j = S_jj] (S_jj = ``diag[j]``; the caller takes the
    answers off). A query whose own score y_i differs from ``diag[i]`` stops the computation with
    ``mismatch[w] = i`` (``mismatch`` starts at -1)."""
    N = diag.size
    workers = mismatch.size
    y = np.zeros((workers, N), dtype=np.float32)
    for w in numba.prange(workers):
        yw, rg, rt = y[w], rev_greater[w], rev_ties[w]
        for i in range(w, N, workers):
            if mismatch.max() >= 0:
                break
            _scatter(i, q_ptr, q_lat, q_val, g_ptr, g_row, g_val, yw)
            s = diag[i]
            if yw[i] != s:
                mismatch[w] = i
                break
            greater = 0
            ties = 0
            for j in range(N):
                yj = yw[j]
                yw[j] = 0.0
                greater += yj > s
                ties += yj == s
                d = diag[j]
                rg[j] += yj > d
                rt[j] += yj == d
            fwd_greater[i] = greater
            fwd_ties[i] = ties - 1


def query_scores(q: sp.csr_matrix, index: InvertedIndex, i: int) -> np.ndarray:
    """``[N]`` float32 S_ij of query row i of ``q`` against every gallery row j, by the kernel of
    :func:`sparse_pair_rank_counts` (:func:`_scatter`; 0 where nothing is shared)."""
    out = np.zeros(index.N, dtype=np.float32)
    _scatter(i, *_query_arrays(q), index.ptr, index.rows, index.values, out)
    return out


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


def sparse_pair_rank_counts(
    query: sp.csr_matrix, gallery: sp.csr_matrix, threads: int | None = None
) -> RankCounts:
    """:func:`pair_rank_counts` of ``[N, L]`` CSR codes by an inverted index on the CPU (module
    docstring): the compiled :func:`_count_kernel` over ``threads`` workers (default
    ``torch.get_num_threads()``; numba runs at most ``numba.config.NUMBA_NUM_THREADS`` at once).
    Counts equal :func:`dense_pair_rank_counts` on the CPU; where a query's own kernel score is
    not :func:`paired_scores`'s, the dense computation gives them instead, with a RuntimeWarning."""
    _check_pair(query, gallery)
    if not sp.issparse(query):
        raise ValueError("sparse retrieval: query and gallery must be sparse codes")
    q = _normalise(query)
    g = _normalise(gallery)
    N = q.shape[0]
    diag = paired_scores(q, g)
    index = InvertedIndex(g)
    workers = max(1, min(threads or torch.get_num_threads(), N))
    fwd_greater = np.zeros(N, dtype=np.int64)
    fwd_ties = np.zeros(N, dtype=np.int64)
    rev_greater = np.zeros((workers, N), dtype=np.int32)  # a worker's share is at most N
    rev_ties = np.zeros((workers, N), dtype=np.int32)
    mismatch = np.full(workers, -1, dtype=np.int64)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(workers, numba.config.NUMBA_NUM_THREADS))
    try:
        _count_kernel(
            *_query_arrays(q), index.ptr, index.rows, index.values, diag,
            fwd_greater, fwd_ties, rev_greater, rev_ties, mismatch,
        )
    finally:
        numba.set_num_threads(previous)
    if mismatch.max() >= 0:
        i = int(mismatch[mismatch >= 0][0])
        warnings.warn(
            f"sparse retrieval: the compiled kernel does not round as the score formula here (query {i}: "
            f"kernel score {query_scores(q, index, i)[i]!r}, formula {diag[i]!r}); using the dense computation",
            RuntimeWarning,
            stacklevel=2,
        )
        return dense_pair_rank_counts(query, gallery)
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
