"""Metric definitions on hand-computed fixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from sparc.evaluate import metrics as m


def csr(rows: list[list[float]]) -> sp.csr_matrix:
    return sp.csr_matrix(np.array(rows, dtype=np.float64))


# ---------------------------------------------------------------- sparse building blocks


def test_code_matrix_drops_zero_activations_and_checks_range() -> None:
    idx = np.array([[2, 0], [1, 3]])
    val = np.array([[0.5, 0.0], [1.0, 2.0]], dtype=np.float32)
    mat = m.code_matrix(idx, val, L=4)
    assert mat.nnz == 3
    np.testing.assert_array_equal(mat.toarray(), [[0, 0, 0.5, 0], [0, 1.0, 0, 2.0]])
    with pytest.raises(ValueError, match="out of range"):
        m.code_matrix(idx, val, L=3)


def test_label_matrix_and_lift() -> None:
    y = m.label_matrix([("a", "b", "a"), (), ("c",)], ["a", "b", "c"])
    np.testing.assert_array_equal(y.toarray(), [[1, 1, 0], [0, 0, 0], [0, 0, 1]])
    lifted = y @ m.lift_matrix([0, 0, 1], 2)  # a, b -> node 0; c -> node 1
    np.testing.assert_array_equal(lifted.toarray(), [[2, 0], [0, 0], [0, 1]])
    with pytest.raises(KeyError, match="'z'"):
        m.label_matrix([("z",)], ["a"])


def test_latent_label_counts() -> None:
    firing = csr([[1, 0], [1, 1], [0, 1]])
    labels = csr([[1, 0], [1, 1], [0, 1]])
    counts = m.latent_label_counts(firing, labels).toarray()
    # latent 0 fires on samples 0, 1 -> label 0 twice, label 1 once
    np.testing.assert_array_equal(counts, [[2, 1], [1, 2]])


# ---------------------------------------------------------------- Jaccard


def test_generalised_jaccard_identical_disjoint_and_partial() -> None:
    u = csr([[3, 1, 0], [2, 0, 0], [1, 2, 0], [0, 0, 0]])
    v = csr([[3, 1, 0], [0, 0, 5], [2, 1, 1], [0, 0, 0]])
    gj = m.generalised_jaccard(u, v)
    # identical -> 1; disjoint -> 0; (min 1+1+0)/(max 2+2+1) = 2/5; both empty -> 0
    np.testing.assert_allclose(gj, [1.0, 0.0, 0.4, 0.0])


def test_latent_jaccard_pairs_and_single_stream() -> None:
    counts = {
        "a": csr([[1, 1], [1, 0], [2, 0]]),
        "b": csr([[1, 1], [0, 1], [0, 0]]),
        "c": csr([[1, 0], [0, 0], [0, 0]]),
    }
    alive = {
        "a": np.array([True, True, True]),
        "b": np.array([True, True, False]),
        "c": np.array([True, False, False]),
    }
    score = m.latent_jaccard(counts, alive)
    # latent 0: pairs ab=1, ac=1/2, bc=1/2 -> 2/3; latent 1: only ab alive, disjoint -> 0;
    # latent 2: alive in one stream -> 0
    np.testing.assert_allclose(score, [2 / 3, 0.0, 0.0])


# ---------------------------------------------------------------- patterns and universality


def test_activation_patterns() -> None:
    alive = {
        "x": np.array([True, False, True, False]),
        "y": np.array([True, False, False, True]),
    }
    pat = m.activation_patterns(alive)
    assert pat["counts"] == {"alive_all": 1, "dead_all": 1, "mixed": 2}
    assert pat["alive_all"] == 0.25 and pat["mixed"] == 0.5
    assert pat["combinations"] == {"none": 1, "x": 1, "x+y": 1, "y": 1}
    assert pat["dead_fraction"] == {"x": 0.5, "y": 0.5}


def test_firing_entropy_universal_single_and_dead() -> None:
    counts = np.array([[5, 4, 0, 2], [5, 0, 0, 2], [5, 0, 0, 0]])
    fe = m.firing_entropy(counts)
    assert fe[0] == pytest.approx(1.0)
    assert fe[1] == 0.0
    assert math.isnan(fe[2])
    assert fe[3] == pytest.approx(1.0 / math.log2(3))  # two of three streams equally


def test_cofire_proportion() -> None:
    a = m.code_matrix(np.array([[0, 1], [0, 1], [1, 2]]), np.ones((3, 2), np.float32), L=4)
    b = m.code_matrix(np.array([[0, 2], [1, 3], [1, 2]]), np.ones((3, 2), np.float32), L=4)
    any_c, all_c = m.cofire_counts({"a": a, "b": b})
    np.testing.assert_array_equal(any_c, [2, 3, 2, 1])
    np.testing.assert_array_equal(all_c, [1, 2, 1, 0])
    prop = m.cofire_proportion(any_c, all_c)
    np.testing.assert_allclose(prop, [0.5, 2 / 3, 0.5, 0.0])
    assert math.isnan(m.cofire_proportion(np.array([0]), np.array([0]))[0])


# ---------------------------------------------------------------- reconstruction


def test_fvu_mean_prediction_is_one_and_perfect_is_zero() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    assert m.fvu(np.broadcast_to(x.mean(axis=0), x.shape), x) == pytest.approx(1.0)
    assert m.fvu(x, x) == 0.0
    assert m.nmse(x, x) == 0.0
    assert m.nmse(np.zeros_like(x), x) == pytest.approx(1.0)


def test_nmse_hand_computed() -> None:
    x = np.array([[1.0, 0.0], [0.0, 2.0]])
    xhat = np.array([[0.0, 0.0], [0.0, 1.0]])
    # errors 1/1 and 1/4 -> mean 0.625
    assert m.nmse(xhat, x) == pytest.approx(0.625)


def test_reconstruction_accumulator_matches_whole_batch() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(37, 3)) + 2.0
    xhat = x + rng.normal(scale=0.3, size=x.shape)
    acc = m.ReconstructionErrors()
    for start in range(0, 37, 10):
        acc.add_target("t", x[start : start + 10])
        acc.add("s", "t", xhat[start : start + 10], x[start : start + 10])
    res = acc.result()[("s", "t")]
    assert res["nmse"] == pytest.approx(m.nmse(xhat, x), rel=1e-12)
    assert res["fvu"] == pytest.approx(m.fvu(xhat, x), rel=1e-9)


def test_reconstruction_accumulator_given_row_norms_is_bit_identical() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(37, 5)).astype(np.float32)
    xhat = (x + rng.normal(scale=0.3, size=x.shape)).astype(np.float32)
    plain, given = m.ReconstructionErrors(), m.ReconstructionErrors()
    for start in range(0, 37, 10):
        part = x[start : start + 10]
        x64 = part.astype(np.float64)
        for acc in (plain, given):
            acc.add_target("t", part)
        plain.add("s", "t", xhat[start : start + 10], part)
        given.add("s", "t", xhat[start : start + 10], x64, (x64**2).sum(axis=1))
    assert given.result() == plain.result()


# ---------------------------------------------------------------- retrieval


def test_retrieval_identity_case() -> None:
    sim = np.eye(3)
    g, e = m.rank_counts(sim, np.arange(3))
    np.testing.assert_array_equal(g, [0, 0, 0])
    np.testing.assert_array_equal(e, [0, 0, 0])
    res = m.retrieval_metrics(g, e)
    assert res == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.0, "MRR": pytest.approx(1.0)}


def test_retrieval_with_ties_and_misses() -> None:
    # query 0: answer tied with one other item -> rank 1 or 2; query 1: one item above;
    # query 2: shares nothing with anything -> all three tied at 0
    sim = np.array([[0.5, 0.5, 0.0], [0.9, 0.3, 0.0], [0.0, 0.0, 0.0]])
    g, e = m.rank_counts(sim, np.arange(3))
    np.testing.assert_array_equal(g, [0, 1, 0])
    np.testing.assert_array_equal(e, [1, 0, 2])
    res = m.retrieval_metrics(g, e, ks=(1, 2))
    assert res["R@1"] == pytest.approx((0.5 + 0.0 + 1 / 3) / 3)
    assert res["R@2"] == pytest.approx((1.0 + 1.0 + 2 / 3) / 3)
    # expected ranks 1.5, 2, 2 -> median 2
    assert res["median_rank"] == 2.0
    # reciprocal ranks: (1 + 1/2)/2, 1/2, (1 + 1/2 + 1/3)/3
    assert res["MRR"] == pytest.approx((0.75 + 0.5 + 11 / 18) / 3)


def test_chance_matches_all_tied() -> None:
    N = 7
    g, e = m.rank_counts(np.zeros((N, N)), np.arange(N))
    assert m.retrieval_metrics(g, e) == pytest.approx(m.chance_retrieval(N))
    ch = m.chance_retrieval(N)
    assert ch["R@1"] == pytest.approx(1 / 7)
    assert ch["MRR"] == pytest.approx(sum(1 / j for j in range(1, 8)) / 7)
    assert ch["median_rank"] == 4.0


def test_l2_normalise_rows_keeps_zero_rows() -> None:
    out = m.l2_normalise_rows(csr([[3, 4], [0, 0]])).toarray()
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0]])


# ---------------------------------------------------------------- concepts


def test_top_activating_and_dominant_labels() -> None:
    codes = csr([[0.9, 0.0, 0.0], [0.5, 0.2, 0.0], [0.7, 0.2, 0.0], [0.1, 0.0, 0.0]])
    lat, rows = m.top_activating(codes, n=2)
    np.testing.assert_array_equal(lat, [0, 0, 1, 1])
    np.testing.assert_array_equal(rows, [0, 2, 1, 2])  # tie on latent 1 -> lower row first
    labels = csr([[1, 0], [0, 1], [1, 1], [0, 1]])
    dom, purity, n_top = m.dominant_labels(lat, rows, labels, L=3)
    np.testing.assert_array_equal(dom, [0, 1, -1])
    np.testing.assert_allclose(purity, [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(n_top, [2, 2, 0])


def test_dominant_label_ties_take_lowest_column() -> None:
    labels = csr([[1, 1], [0, 0]])
    dom, purity, _ = m.dominant_labels(np.array([0, 0]), np.array([0, 1]), labels, L=1)
    assert dom[0] == 0 and purity[0] == 0.5


# ---------------------------------------------------------------- probes


def test_log_loss_chance() -> None:
    y = np.array([0, 1, 0, 1])
    assert float(m.log_loss(np.full(4, 0.5), y)) == pytest.approx(math.log(2))
    np.testing.assert_allclose(m.log_loss(np.array([[0.5, 0.9]] * 4), y)[0], math.log(2))


def test_fit_logistic_matches_sklearn() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=200)
    x = np.stack([y * 1.5 + rng.normal(size=200), rng.normal(size=200), np.zeros(200)], axis=1)
    w, b = m.fit_logistic_1d(x, y)
    for j in range(3):
        ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=1000).fit(x[:, j : j + 1], y)
        assert w[j] == pytest.approx(ref.coef_[0, 0], abs=1e-5)
        assert b[j] == pytest.approx(ref.intercept_[0], abs=1e-5)


def test_fit_logistic_separable_stays_finite() -> None:
    x = np.array([[0.0], [0.0], [5.0], [6.0]])
    y = np.array([0, 0, 1, 1])
    w, b = m.fit_logistic_1d(x, y)
    assert np.isfinite(w).all() and w[0] > 0


def test_stratified_split_fractions() -> None:
    y = np.array([1] * 20 + [0] * 20)
    tr, va, te = m.stratified_split(y, np.random.default_rng(0))
    assert len(tr) == 28 and len(va) == 6 and len(te) == 6
    assert y[tr].sum() == 14 and y[va].sum() == 3 and y[te].sum() == 3
    assert len(np.unique(np.concatenate([tr, va, te]))) == 40


def test_fit_logistic_sparse_feature_matches_sklearn() -> None:
    """Mostly-zero features (as single latents are) take the counts path for the zeros."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, size=300)
    fires = rng.random(300) < np.where(y == 1, 0.4, 0.05)
    x = np.stack([np.where(fires, rng.exponential(size=300), 0.0), np.zeros(300)], axis=1)
    x[:3, 1] = [1.0, 2.0, 0.5]
    w, b = m.fit_logistic_1d(x, y)
    for j in range(2):
        ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=1000).fit(x[:, j : j + 1], y)
        assert w[j] == pytest.approx(ref.coef_[0, 0], abs=1e-5)
        assert b[j] == pytest.approx(ref.intercept_[0], abs=1e-5)
