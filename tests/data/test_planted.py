"""The planted-concept generator: shapes, seeding, hierarchy, and that the planted directions are real."""

import numpy as np
import pytest

from sparc.data.planted import PlantedConfig, make_planted


def small(**kw) -> PlantedConfig:
    base = dict(dims={"a": 12, "b": 10}, n_samples=300, n_parents=2, n_children=3, world_dim=8)
    base.update(kw)
    return PlantedConfig(**base)


def test_shapes_and_types():
    d = make_planted(small())
    assert d.streams == ["a", "b"]
    assert d.features["a"].shape == (300, 12) and d.features["b"].shape == (300, 10)
    assert d.features["a"].dtype == np.float32
    assert d.concepts.shape == (300, 6) and d.concepts.dtype == bool
    assert d.concept_ids == ["p0.c0", "p0.c1", "p0.c2", "p1.c0", "p1.c1", "p1.c2"]
    assert d.directions["b"].shape == (6, 10)
    np.testing.assert_allclose(np.linalg.norm(d.directions["a"], axis=1), 1.0, rtol=1e-5)
    assert d.nuisance["a"].shape == (4, 12)
    assert len(d.ids) == len(set(d.ids)) == 300
    assert all(np.isfinite(f).all() for f in d.features.values())


def test_seeded_and_seed_sensitive():
    a, b = make_planted(small(seed=3)), make_planted(small(seed=3))
    c = make_planted(small(seed=4))
    np.testing.assert_array_equal(a.features["a"], b.features["a"])
    np.testing.assert_array_equal(a.concepts, b.concepts)
    assert not np.array_equal(a.features["a"], c.features["a"])


def test_active_counts_labels_and_hierarchy():
    d = make_planted(small(min_active=1, max_active=2))
    counts = d.concepts.sum(axis=1)
    assert counts.min() == 1 and counts.max() == 2
    assert [tuple(np.array(d.concept_ids)[row]) for row in d.concepts] == d.labels
    # every leaf's parent is its family, and lifting labels gives the parent indicator
    assert d.hierarchy.ancestor_at("p1.c2", 1) == "p1"
    ids, lifted = d.indicator_at_depth(1)
    assert ids == ["p0", "p1"]
    np.testing.assert_array_equal(lifted[:, 0], d.concepts[:, :3].any(axis=1))
    ids2, same = d.indicator_at_depth(2)
    assert ids2 == d.concept_ids
    np.testing.assert_array_equal(same, d.concepts)


def test_planted_direction_is_the_response_to_the_concept_alone():
    """With no nuisance and no noise, a sample holding one concept points along its direction."""
    d = make_planted(small(n_nuisance=0, noise=0.0, min_active=1, max_active=1))
    for s in d.streams:
        x = d.features[s]
        c = d.concepts.argmax(axis=1)
        cos = (x / np.linalg.norm(x, axis=1, keepdims=True) * d.directions[s][c]).sum(axis=1)
        np.testing.assert_allclose(cos, 1.0, atol=1e-5)


def test_nuisance_is_stream_specific():
    """Nuisance directions explain variance in their own stream only: the features projected on
    stream a's nuisance directions vary with the (known) nuisance switches, the concepts don't."""
    with_n = make_planted(small(noise=0.0, nuisance_prob=0.5))
    without = make_planted(small(noise=0.0, n_nuisance=0))
    diff = with_n.features["a"] - without.features["a"]
    # the difference lies in the span of stream a's nuisance directions
    basis, _ = np.linalg.qr(with_n.nuisance["a"].T)
    residual = diff - diff @ basis @ basis.T
    assert np.abs(residual).max() < 1e-4 * np.abs(diff).max()
    assert np.abs(diff).max() > 0.1


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(dims={}), "dims"),
        (dict(min_active=0), "min_active"),
        (dict(max_active=99), "min_active"),
        (dict(family_share=1.0), "family_share"),
        (dict(noise=-1.0), "noise"),
    ],
)
def test_bad_config_names_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        make_planted(small(**kw))
