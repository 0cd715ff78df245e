"""Cross-stream retrieval (method.md section 4).

Codes come from per-stream inference (each stream its own top-k), so a shared index set cannot
leak the answer. Query i (row i of stream s) should find gallery item i (row i of stream t) among
all N rows of the evaluated split. Similarity: cosine of the L2-normalised code vectors (or of the
L2-normalised raw features for the baseline). Ranks treat ties as a uniformly random order
(:func:`sparc.evaluate.metrics.retrieval_metrics`).

Computation: S = Q G^T is never held whole. For a block of b query rows, the block is densified
(``[L, b]``, small) and ``S_block^T = G @ Q_block^T`` (``[N, b]``) is a sparse x dense product with
the gallery kept as a CSR matrix (at paper scale a similarity row touches most of the gallery, so
a dense ``[N, b]`` block is cheaper than a sparse one). One pass gives both directions: the columns
of the block rank the gallery for queries s -> t, its rows rank the queries for the reverse
direction t -> s (``S^{t->s} = S^T``), compared with the diagonal S_jj computed beforehand by the
same kernel on the same rows (so exact ties stay exact). The raw-feature baseline (dense features)
uses the same code path; it applies where two streams share an embedding space: the same OpenCLIP
model reading the image in one stream and the caption in the other.

Cost: the product is nnz(codes) x N multiply-adds per stream pair; at the paper's scale (N = 126k,
L = 8192, k = 64) about 8 minutes per pair on 2 CPU cores (benchmarks/evaluate_memory.py), with
peak memory of one ``[N, b]`` block; a CUDA ``evaluate.device`` takes larger blocks.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from sparc.evaluate.metrics import l2_normalise_rows

DEFAULT_BLOCK_BYTES = 1 << 27  # one [N, b] float32 similarity block (128 MiB)
CPU_MAX_ROWS = 128  # measured best block width for the CPU sparse x dense product


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


def _normalise(x: sp.csr_matrix | np.ndarray) -> sp.csr_matrix | np.ndarray:
    """Unit rows (zero rows stay zero), float32: CSR for codes, ndarray for raw features."""
    if sp.issparse(x):
        return sp.csr_matrix(l2_normalise_rows(x), dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


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


def pair_rank_counts(
    query: sp.csr_matrix | np.ndarray,
    gallery: sp.csr_matrix | np.ndarray,
    device: str = "cpu",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Rank counts in both directions between two aligned representations of the same N items.

    ``query`` and ``gallery``: ``[N, L]`` CSR codes or ``[N, d]`` dense features (same kind).
    Returns ``((greater, ties) for query->gallery, (greater, ties) for gallery->query)``, each
    ``[N]`` int64: greater_i = #{j : S_ij > S_ii}, ties_i = #{j != i : S_ij = S_ii} (row-wise for
    the first direction, column-wise for the second), as in :func:`metrics.rank_counts`.
    """
    if query.shape != gallery.shape:
        raise ValueError(f"retrieval: query {query.shape} and gallery {gallery.shape} differ")
    if sp.issparse(query) != sp.issparse(gallery):
        raise ValueError("retrieval: query and gallery must both be sparse codes or both dense")
    q = _normalise(query)
    gal = _Gallery(_normalise(gallery), device)
    N = q.shape[0]
    on_cpu = torch.device(device).type == "cpu"
    b = max(1, block_bytes // (4 * max(N, 1)))
    if on_cpu:
        b = min(b, CPU_MAX_ROWS)
    blocks = [slice(a, min(a + b, N)) for a in range(0, N, b)]

    # S_jj for every j, from the same kernel on the same gallery rows as the main pass.
    diag = torch.empty(N, dtype=torch.float32, device=device)
    for rows in blocks:
        diag[rows] = torch.diagonal(gal.times(_dense_block_t(q, rows, device), rows))

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
