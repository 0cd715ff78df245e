"""Retrieval rank counts: the inverted-index path and the dense path against the score formula (exact
integers, so every path, CPU and BLAS must agree bit for bit)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from sparc.evaluate import metrics as m
from sparc.evaluate import retrieval as r

pytestmark = pytest.mark.kernels  # run again under other CPU kernels (Makefile test-kernels)

SEEDS = range(4)


def formula_rows(x: sp.csr_matrix | np.ndarray) -> np.ndarray:
    """``[N, L]`` int64 rows written from the module docstring alone: unit rows in float64
    (``metrics.l2_normalise_rows``), each entry fixed to ``round(x * 2**24)``."""
    unit = m.l2_normalise_rows(sp.csr_matrix(x, dtype=np.float64)).toarray()
    return np.rint(unit * 2.0**24).astype(np.int64)


def formula_scores(query: sp.csr_matrix | np.ndarray, gallery: sp.csr_matrix | np.ndarray) -> np.ndarray:
    """``[N, N]`` int64 S_ij, the exact integer dot products of the fixed rows (NumPy's integer
    matmul: no BLAS, no rounding)."""
    return formula_rows(query) @ formula_rows(gallery).T


def formula_counts(query: sp.csr_matrix | np.ndarray, gallery: sp.csr_matrix | np.ndarray) -> r.RankCounts:
    S = formula_scores(query, gallery)
    answers = np.arange(S.shape[0])
    return m.rank_counts(S, answers), m.rank_counts(S.T, answers)


def assert_counts_equal(got: r.RankCounts, want: r.RankCounts) -> None:
    for direction in (0, 1):
        for what in (0, 1):  # greater, ties
            np.testing.assert_array_equal(got[direction][what], want[direction][what])


def random_codes(rng: np.random.Generator, N: int, L: int, k: int, integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """``[N, k]`` distinct latent ids and values (small integers give many exact ties; 0 = not stored)."""
    idx = np.stack([rng.choice(L, k, replace=False) for _ in range(N)])
    val = rng.integers(0, 3, size=(N, k)) if integer else rng.exponential(size=(N, k))
    return idx, val.astype(np.float32)


def hard_pair(seed: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Query and gallery codes with every case the tie rule has to get right: answers sharing no
    latent (score 0, tied with most of the gallery), empty codes, duplicate gallery items and
    duplicate queries, an answer equal to its query, and (even seeds) integer values."""
    rng = np.random.default_rng(seed)
    N, L, k = 80, 24, 4  # k^2 / L = 2/3: pairs sharing none, one and several latents
    q_idx, q_val = random_codes(rng, N, L, k, integer=seed % 2 == 0)
    g_idx, g_val = random_codes(rng, N, L, k, integer=seed % 2 == 0)
    keep = rng.random((N, k)) < 0.5  # answers keep about half of the query's latents
    for i in range(N):
        row = np.where(keep[i], q_idx[i], g_idx[i])
        if len(set(row)) == k:
            g_idx[i] = row
    g_idx[3], g_val[3] = g_idx[4], g_val[4]  # two identical gallery items
    q_idx[5], q_val[5] = q_idx[6], q_val[6]  # two identical queries
    q_val[7] = 0.0  # an empty query code
    g_val[8] = 0.0  # an empty gallery code
    g_idx[9] = rng.choice(np.setdiff1d(np.arange(L), q_idx[9]), k, replace=False)  # answer shares nothing
    g_idx[10], g_val[10] = q_idx[10], q_val[10]  # answer equal to the query
    return m.code_matrix(q_idx, q_val, L), m.code_matrix(g_idx, g_val, L)


@pytest.mark.parametrize("seed", SEEDS)
def test_sparse_counts_equal_formula_and_dense(seed: int) -> None:
    q, g = hard_pair(seed)
    S = formula_scores(q, g)
    want = formula_counts(q, g)
    diag = np.diag(S)
    assert (diag == 0).sum() >= 3 and (diag > 0).any()
    assert ((want[0][1] > 0) & (diag > 0)).any()  # ties above zero too
    for threads in (1, 2, 3):
        assert_counts_equal(r.sparse_pair_rank_counts(q, g, threads=threads), want)
    assert_counts_equal(r.dense_pair_rank_counts(q, g), want)
    assert_counts_equal(r.pair_rank_counts(q, g), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_every_path_computes_the_exact_scores(seed: int) -> None:
    """The kernel's, the diagonal's and the dense path's (a float64 BLAS product, here with the
    latents in two different orders) scores are the formula's integers, whatever the order."""
    q, g = hard_pair(seed)
    qn, gn = r.fixed_point_rows(q), r.fixed_point_rows(g)
    np.testing.assert_array_equal(qn.toarray(), formula_rows(q))
    want = formula_scores(q, g)
    index = r.InvertedIndex(gn)
    sparse = np.stack([r.query_scores(qn, index, i) for i in range(q.shape[0])])
    np.testing.assert_array_equal(sparse, want)
    np.testing.assert_array_equal(r.paired_scores(qn, gn), np.diag(want))
    for order in (slice(None), slice(None, None, -1)):  # a permutation of the latents
        dense = r._Gallery(sp.csr_matrix(gn[:, order]), "cpu").times(r._dense_block_t(qn[:, order], slice(0, 80), "cpu"))
        np.testing.assert_array_equal(dense.numpy().T, want)


def test_ties_that_summation_order_would_break() -> None:
    """Query 0 = (1, 1, 1): its answer (a, b, c) and a gallery item (c, a, b) score a + b + c
    either way, a tie, although float32 sums of the two orders differ here (what made the counts
    depend on the machine's BLAS)."""
    rng = np.random.default_rng(5)
    for _ in range(10000):
        a, b, c = rng.random(3, dtype=np.float32) / np.float32(3)
        if (a + b) + c != (c + a) + b:
            break
    else:
        pytest.fail("no float32 triple whose sum depends on the order")
    q = sp.csr_matrix(np.array([[1, 1, 1], [0, 0, 1], [0, 1, 0]], dtype=np.float32))
    g = sp.csr_matrix(np.array([[a, b, c], [c, a, b], [0, 1, 0]], dtype=np.float32))
    want = formula_counts(q, g)
    assert want[0][1][0] == 1  # the tie with gallery item 1
    for got in (r.sparse_pair_rank_counts(q, g), r.dense_pair_rank_counts(q, g), r.pair_rank_counts(q.toarray(), g.toarray())):
        assert_counts_equal(got, want)


def test_scores_exact_at_the_largest_values() -> None:
    """The bound of the docstring: one-latent rows score 2^48, and a long dense row against
    itself (every partial sum near 2^48) is exact in float64 whatever the order."""
    one = sp.csr_matrix(np.array([[0, 3.0, 0], [0, 5.0, 0]], dtype=np.float32))
    fixed = r.fixed_point_rows(one)
    assert fixed.data.tolist() == [2.0**24, 2.0**24]
    assert r.paired_scores(fixed, fixed).tolist() == [2**48, 2**48]
    x = np.random.default_rng(0).random((3, 4096)).astype(np.float32)
    fx = r.fixed_point_rows(x)
    exact = formula_scores(x, x)
    assert exact.max() > 2**47
    np.testing.assert_array_equal(r._Gallery(fx, "cpu").times(r._dense_block_t(fx, slice(0, 3), "cpu")).numpy(), exact)
    np.testing.assert_array_equal(r.paired_scores(fx, fx), np.diag(exact))


def test_negative_values_and_unsorted_rows() -> None:
    rng = np.random.default_rng(7)
    N, L = 60, 15
    mats = []
    for _ in range(2):
        dense = np.where(rng.random((N, L)) < 0.3, rng.integers(-2, 3, size=(N, L)), 0).astype(np.float32)
        mat = sp.csr_matrix(dense)
        for i in range(N):  # each row's entries stored in a random order
            part = slice(mat.indptr[i], mat.indptr[i + 1])
            order = rng.permutation(part.stop - part.start)
            mat.indices[part], mat.data[part] = mat.indices[part][order], mat.data[part][order]
        mat.has_sorted_indices = False
        mats.append(mat)
    q, g = mats
    assert (q.data < 0).any() and (np.diff(q.indices[q.indptr[0] : q.indptr[1]]) > 0).any()
    want = formula_counts(q, g)
    assert_counts_equal(r.sparse_pair_rank_counts(q, g, threads=2), want)
    assert_counts_equal(r.dense_pair_rank_counts(q, g), want)


def test_default_data_shape_all_stream_pairs() -> None:
    """The default run's test split: N = 374, L = 512, k = 16, three streams whose per-stream codes
    share part of a sample's latents (retrieval well above chance)."""
    rng = np.random.default_rng(11)
    N, L, k = 374, 512, 16
    base = np.stack([rng.choice(L, 2 * k, replace=False) for _ in range(N)])
    streams = []
    for _ in range(3):
        idx = np.stack([rng.choice(row, k, replace=False) for row in base])
        noise = rng.random((N, k)) < 0.3
        idx = np.where(noise, rng.integers(0, L, size=(N, k)), idx)
        idx = np.stack([row if len(set(row)) == k else rng.choice(L, k, replace=False) for row in idx])
        streams.append(m.code_matrix(idx, rng.exponential(size=(N, k)).astype(np.float32), L))
    for a in range(3):
        for b in range(a + 1, 3):
            want = formula_counts(streams[a], streams[b])
            got = r.pair_rank_counts(streams[a], streams[b])
            assert_counts_equal(got, want)
            assert_counts_equal(r.dense_pair_rank_counts(streams[a], streams[b]), want)
            assert m.retrieval_metrics(*got[0])["R@1"] > 10 / N


def signed_codes(rng: np.random.Generator, N: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """``[N, L]`` stored-entry mask (density 0.15: many pairs share no latent, score exactly 0) and
    ``[N, L]`` values in {-2, -1, 0, 1, 2} (exact ties, negative and zero scores)."""
    return rng.random((N, L)) < 0.15, rng.integers(-2, 3, size=(N, L)).astype(np.float32)


def stored(mask: np.ndarray, vals: np.ndarray) -> sp.csr_matrix:
    """CSR codes of the masked entries, zeros among them stored explicitly."""
    rows, cols = np.nonzero(mask)
    return sp.csr_matrix((vals[rows, cols], (rows, cols)), shape=mask.shape)


@pytest.mark.parametrize("seed", range(2))
def test_kernel_counts_with_negatives_zeros_duplicates_and_ties(seed: int) -> None:
    """Untouched rows (score exactly 0) against negative, zero and positive S_ii, in both
    directions: duplicate queries and gallery rows, answers equal to their query and to its
    negation; every worker count, including more workers than queries."""
    rng = np.random.default_rng(100 + seed)
    N, L = 150, 40
    (qm, qv), (gm, gv) = signed_codes(rng, N, L), signed_codes(rng, N, L)
    qm[10], qv[10], gm[10], gv[10] = qm[11], qv[11], gm[11], gv[11]  # duplicate query and gallery item
    qv[20:22] = np.where(qv[20:22] == 0, 1, qv[20:22])
    gm[20:22], gv[20], gv[21] = qm[20:22], qv[20], -qv[21]  # answers equal to the query and its negation
    q, g = stored(qm, qv), stored(gm, gv)
    assert (q.data == 0).any() and (q.data < 0).any()
    S = formula_scores(q, g)
    diag = np.diag(S)
    assert (diag < 0).any() and (diag == 0).any() and (diag > 0).any()
    shares_none = (q.astype(bool) @ g.astype(bool).T).toarray() == 0
    assert (shares_none & (diag < 0)[:, None]).any()  # untouched rows above a negative S_ii
    assert (shares_none & (diag < 0)[None, :]).any()  # untouched queries above a negative S_jj
    want = formula_counts(q, g)
    for threads in (1, 2, 4):
        assert_counts_equal(r.sparse_pair_rank_counts(q, g, threads=threads), want)
    assert_counts_equal(r.dense_pair_rank_counts(q, g), want)
    assert_counts_equal(r.sparse_pair_rank_counts(q[:3], g[:3], threads=8), formula_counts(q[:3], g[:3]))


def test_kernel_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Kernels are cached outside the source tree (a DVC dependency), uncached where that fails."""
    from sparc.model import jit as j

    calls = []

    def njit(**options):
        calls.append((options, j.numba.config.CACHE_DIR))
        return lambda fn: fn

    monkeypatch.setattr(j.numba, "njit", njit)
    monkeypatch.setattr(j.numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert j.kernel_cache_dir() == str(tmp_path / "sparc" / "numba")
    assert j.jit(nogil=True)(len) is len
    assert calls.pop() == ({"cache": True, "nogil": True}, str(tmp_path / "sparc" / "numba"))
    assert j.numba.config.CACHE_DIR == ""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # not a directory
    assert j.kernel_cache_dir() is None
    assert j.jit(nogil=True)(len) is len
    assert calls.pop() == ({"nogil": True}, "")
    monkeypatch.setattr(j.numba.config, "CACHE_DIR", str(tmp_path / "mine"))
    assert j.kernel_cache_dir() == str(tmp_path / "mine")
    monkeypatch.undo()
    q, g = hard_pair(0)
    r.sparse_pair_rank_counts(q, g)  # compiled, or loaded from the cache
    assert not list(Path(r.__file__).parent.glob("__pycache__/*.nb[ic]"))  # numba's default place


def test_dispatch_and_input_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    q, g = hard_pair(2)
    features = np.random.default_rng(0).normal(size=(80, 5)).astype(np.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("CPU codes must not take the dense path")

    with monkeypatch.context() as patch:
        patch.setattr(r, "dense_pair_rank_counts", refuse)
        assert_counts_equal(r.pair_rank_counts(q, g), formula_counts(q, g))
    got = r.pair_rank_counts(features, features + 0.1)
    assert_counts_equal(got, r.dense_pair_rank_counts(features, features + 0.1))
    with pytest.raises(ValueError, match="sparse codes"):
        r.sparse_pair_rank_counts(features, features)
    with pytest.raises(ValueError, match="differ"):
        r.sparse_pair_rank_counts(q, g[:5])


def test_near_ties_that_float32_cannot_separate() -> None:
    """Gallery rows a few grid steps from the answer: their exact scores differ from S_ii by a
    few units while float32 sums of them (24-bit mantissa, scores near 2^48) round to the same
    value, so the kernel's float32 scores cannot decide them and the exact path must."""
    rng = np.random.default_rng(3)
    N, L = 120, 6
    base = rng.random(L) + 0.5
    q = sp.csr_matrix(np.tile(base, (N, 1)) * (1.0 + 1e-7 * rng.integers(-3, 4, size=(N, L))))
    g = sp.csr_matrix(np.tile(base, (N, 1)) * (1.0 + 1e-7 * rng.integers(-3, 4, size=(N, L))))
    S = formula_scores(q, g)
    float32 = np.stack([formula_rows(q)[i].astype(np.float32) * formula_rows(g).astype(np.float32) for i in range(N)])
    float32 = float32.sum(axis=2, dtype=np.float32)
    collisions = (float32 == np.diag(float32)[:, None]) & (S != np.diag(S)[:, None])
    assert collisions.sum() > N  # float32 ties many pairs the integers order
    want = formula_counts(q, g)
    for threads in (1, 2):
        assert_counts_equal(r.sparse_pair_rank_counts(q, g, threads=threads), want)
    assert_counts_equal(r.dense_pair_rank_counts(q, g), want)
