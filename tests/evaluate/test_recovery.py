"""Planted-concept recovery metric: best cosines, the chance threshold, the summary."""

import numpy as np
import pytest

from sparc.evaluate.recovery import (
    best_cosines,
    chance_best_cosine,
    model_decoders,
    recovery,
    recovery_summary,
)
from sparc.model.sae import MultiStreamSAE, SAEConfig


def test_best_cosines_hand_computed():
    directions = np.array([[1.0, 0.0], [0.0, 1.0]])
    decoder = np.array([[2.0, 0.0, 1.0], [0.0, -3.0, 1.0]])  # columns: e1, -e2, (1,1)
    best, arg = best_cosines(directions, decoder)
    np.testing.assert_allclose(best, [1.0, np.sqrt(0.5)])
    np.testing.assert_array_equal(arg, [0, 2])  # signed: -e2 does not recover e2


def test_zero_columns_never_win_and_shapes_are_checked():
    best, arg = best_cosines(np.array([[0.0, 1.0]]), np.array([[0.0, 1.0], [0.0, -1.0]]))
    assert arg[0] == 1 and best[0] == pytest.approx(-np.sqrt(0.5))
    with pytest.raises(ValueError, match="dim 3"):
        best_cosines(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="zero"):
        best_cosines(np.zeros((1, 2)), np.ones((2, 4)))


def test_chance_threshold_matches_monte_carlo():
    """The exact quantile agrees with simulated random dictionaries."""
    d, L, q = 16, 32, 0.9
    rng = np.random.default_rng(0)
    v = rng.standard_normal((4000, d))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    atoms = rng.standard_normal((4000, L, d))
    atoms /= np.linalg.norm(atoms, axis=2, keepdims=True)
    best = np.einsum("nd,nld->nl", v, atoms).max(axis=1)
    t = chance_best_cosine(d, L, q)
    assert np.mean(best > t) == pytest.approx(1 - q, abs=0.015)
    # larger dictionaries and smaller dims are easier to hit by chance
    assert chance_best_cosine(d, 4 * L, q) > t > chance_best_cosine(4 * d, L, q)


def test_chance_threshold_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        chance_best_cosine(1, 10)
    with pytest.raises(ValueError, match="quantile"):
        chance_best_cosine(8, 10, 1.0)


def test_recovery_perfect_and_random_dictionaries():
    rng = np.random.default_rng(1)
    planted = rng.standard_normal((6, 20))
    planted /= np.linalg.norm(planted, axis=1, keepdims=True)
    perfect = np.concatenate([planted.T, rng.standard_normal((20, 26))], axis=1)
    random = rng.standard_normal((20, 32))
    res = recovery({"a": planted, "b": planted}, {"a": perfect, "b": random})
    assert res["a"].mean_best == pytest.approx(1.0)
    assert res["a"].fraction_recovered == 1.0
    np.testing.assert_array_equal(res["a"].latent, np.arange(6))
    assert res["b"].fraction_recovered <= 1 / 6  # chance level: at most one lucky concept
    summary = recovery_summary(res)
    assert summary["recovered/a"] == 1.0
    assert summary["threshold/a"] == pytest.approx(chance_best_cosine(20, 32))
    assert summary["mean_best_cos"] == pytest.approx((res["a"].mean_best + res["b"].mean_best) / 2)
    with pytest.raises(ValueError, match="no decoder for stream 'c'"):
        recovery({"c": planted}, {"a": perfect})


def test_model_decoders_are_the_transposed_rows():
    model = MultiStreamSAE(SAEConfig(dims={"a": 5, "b": 3}, L=7, k=2), seed=0)
    dec = model_decoders(model)
    assert dec["a"].shape == (5, 7) and dec["b"].shape == (3, 7)
    np.testing.assert_allclose(dec["b"][:, 4], model.W_dec["b"][4].detach().numpy(), rtol=1e-6)
    best, arg = best_cosines(model.W_dec["a"][[2, 6]].detach().numpy(), dec["a"])
    np.testing.assert_allclose(best, 1.0, rtol=1e-6)
    np.testing.assert_array_equal(arg, [2, 6])
