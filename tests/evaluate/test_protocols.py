"""Evaluation protocols (labels, Jaccard, concepts, probes, retrieval) on small hand-made fixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from sparc.data.hierarchy import Hierarchy
from sparc.evaluate import metrics as m
from sparc.evaluate.concepts import assign_concepts, concept_rows, concept_summary
from sparc.evaluate.jaccard import hierarchical_jaccard, jaccard_summary
from sparc.evaluate.labels import LabelSpace
from sparc.evaluate.probes import probe_classes, probe_summary, run_probes
from sparc.evaluate.retrieval import dense_pair_rank_counts, pair_rank_counts, shares_space
from tests.evaluate.test_retrieval import formula_counts


@pytest.fixture
def space() -> LabelSpace:
    # root > animal > {dog, cat}; root > vehicle > {car}
    h = Hierarchy.from_parents(
        {"animal": None, "dog": "animal", "cat": "animal", "vehicle": None, "car": "vehicle"},
        {"dog": "Dog", "cat": "Cat", "animal": "Animal", "vehicle": "Vehicle", "car": "Car"},
    )
    return LabelSpace(h)


def codes(rows: list[list[float]]) -> sp.csr_matrix:
    return sp.csr_matrix(np.array(rows, dtype=np.float32))


def test_label_space_lift_and_closure(space: LabelSpace) -> None:
    y = space.matrix([("dog",), ("cat", "car"), ("animal",)])
    assert space.nodes == ["__root__", "animal", "dog", "cat", "vehicle", "car"]
    np.testing.assert_array_equal((y @ space.lift(0)).toarray()[:, 0], [1, 2, 1])
    np.testing.assert_array_equal((y @ space.lift(1)).toarray(), [[0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0]])
    # depth 2: the inner label 'animal' stays itself
    np.testing.assert_array_equal((y @ space.lift(2)).toarray(), [[0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0]])
    members = ((y @ space.closure()) > 0).toarray()
    np.testing.assert_array_equal(members[:, 1:], [[1, 1, 0, 0, 0], [1, 0, 1, 1, 1], [1, 0, 0, 0, 0]])


def test_hierarchical_jaccard_by_depth(space: LabelSpace) -> None:
    labels = space.matrix([("dog",), ("cat",), ("car",), ("dog",)])
    joint = {
        # latent 0: stream a fires on the dog samples, b on the cat one -> same parent, other leaf
        # latent 1: both fire on the car sample; latent 2: only stream a fires
        "a": codes([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 0, 0]]),
        "b": codes([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]]),
    }
    scores = hierarchical_jaccard(joint, labels, space)
    assert sorted(scores) == [0, 1, 2]
    # depth 0: totals 2 vs 1 -> 1/2; depth 1: animal 2 vs 1 -> 1/2; depth 2: dog 2 vs cat 1 -> 0
    np.testing.assert_allclose(scores[0], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(scores[1], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(scores[2], [0.0, 1.0, 0.0])
    live = np.array([True, True, False])
    summ = jaccard_summary(scores, live)
    assert summ["depth_0"]["all"] == pytest.approx(0.5)
    assert summ["depth_0"]["live"] == pytest.approx(0.75)


def test_assign_concepts_names_and_agreement(space: LabelSpace) -> None:
    labels = space.matrix([("dog",), ("dog",), ("cat",), ("car",)])
    joint = {
        "a": codes([[0.9, 0.1], [0.8, 0.0], [0.1, 0.0], [0.0, 0.5]]),
        "b": codes([[0.7, 0.0], [0.9, 0.0], [0.0, 0.0], [0.0, 0.3]]),
    }
    table = assign_concepts(joint, labels, space, top_n=2, threshold=0.6)
    # latent 1 in a: top-2 = car (0.5), dog (0.1): a tie, won by the label listed first (dog)
    assert table.label["a"] == ["dog", "dog"]
    np.testing.assert_allclose(table.purity["a"], [1.0, 0.5])
    assert table.name["a"] == ["Dog", ""]
    assert table.name["b"] == ["Dog", "Car"]
    assert table.agreed() == ["Dog", ""]
    rows = concept_rows(table)
    assert rows[0]["a_n_active"] == 3 and rows[0]["agreed_name"] == "Dog"
    summ = concept_summary(table)
    assert summ["named_fraction"] == {"a": 0.5, "b": 1.0}
    assert summ["agreeing"] == 1 and summ["agreeing_fraction"] == 0.5


def test_probe_classes_include_inner_nodes(space: LabelSpace) -> None:
    labels = space.matrix([("dog",)] * 4 + [("cat",)] * 3 + [("car",)] * 5)
    classes = dict(probe_classes(labels, space, min_positives=3))
    # animal: 7 pos / 5 neg; vehicle and car: 5 / 7; dog: 4 / 8; cat: 3 positives -> left out
    assert sorted(classes) == ["animal", "car", "dog", "vehicle"]
    np.testing.assert_array_equal(classes["dog"], [0, 1, 2, 3])


def test_probes_find_the_predictive_latent(space: LabelSpace) -> None:
    rng = np.random.default_rng(0)
    n = 400
    is_dog = rng.random(n) < 0.5
    labels = space.matrix([("dog",) if d else ("car",) for d in is_dog])
    dense = np.zeros((n, 6), dtype=np.float32)
    dense[:, 0] = np.where(is_dog, rng.uniform(1, 2, n), 0.0)  # the dog latent
    dense[:, 1:] = rng.random((n, 5)) < 0.5  # noise latents firing on everything
    joint = {"a": sp.csr_matrix(dense), "b": sp.csr_matrix(dense[:, ::-1].copy())}
    results = run_probes(joint, labels, space, min_positives=20, n_candidates=6, seed=0)
    dog = {r.stream: r for r in results if r.label == "dog"}
    assert dog["a"].latent == 0 and dog["b"].latent == 5
    assert dog["a"].test_logloss < 0.1 and dog["a"].test_accuracy == 1.0
    assert dog["a"].n_balanced == min(is_dog.sum(), n - is_dog.sum())
    again = run_probes(joint, labels, space, min_positives=20, n_candidates=6, seed=0)
    assert again == results
    summ = probe_summary(results, ["a", "b"])
    assert summ["n_classes"] == 4 and summ["chance"] == pytest.approx(math.log(2))


def test_probe_without_candidates_predicts_prior(space: LabelSpace) -> None:
    labels = space.matrix([("dog",)] * 30 + [("car",)] * 30)
    joint = {"a": sp.csr_matrix((60, 3), dtype=np.float32)}
    res = run_probes(joint, labels, space, min_positives=20, n_candidates=2, seed=1)
    assert all(r.latent == -1 for r in res)
    assert all(r.test_logloss == pytest.approx(math.log(2)) for r in res)


@pytest.mark.kernels
def test_code_retrieval_matches_brute_force_in_blocks() -> None:
    rng = np.random.default_rng(0)
    N, L, k = 60, 12, 3
    idx = np.stack([rng.choice(L, k, replace=False) for _ in range(N)])
    val = rng.integers(0, 3, size=(N, k)).astype(np.float32)  # small integers: many exact ties
    q = m.code_matrix(idx, val, L)
    shifted = np.where(rng.random((N, k)) < 0.7, idx, (idx + 1) % L)
    idx2 = np.stack([r if len(set(r)) == k else idx[i] for i, r in enumerate(shifted)])
    g = m.code_matrix(idx2, val, L)
    want = formula_counts(q, g)
    assert (want[0][1] > 0).any()  # the fixture has ties
    for block_bytes in (8 * N, 8 * N * 7, 1 << 20):  # 1 row, 7 rows, all rows per block
        got = dense_pair_rank_counts(q, g, block_bytes=block_bytes)
        for direction in (0, 1):
            np.testing.assert_array_equal(got[direction][0], want[direction][0])
            np.testing.assert_array_equal(got[direction][1], want[direction][1])


@pytest.mark.kernels
def test_dense_retrieval_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    q = rng.normal(size=(30, 5)).astype(np.float32)
    g = q + rng.normal(scale=0.5, size=q.shape).astype(np.float32)
    got = pair_rank_counts(q, g, block_bytes=8 * 30 * 7)
    want = formula_counts(q, g)
    for direction in (0, 1):
        np.testing.assert_array_equal(got[direction][0], want[direction][0])
        np.testing.assert_array_equal(got[direction][1], want[direction][1])
    with pytest.raises(ValueError, match="differ"):
        pair_rank_counts(q, g[:5])


def test_shares_space() -> None:
    clip = "openclip:ViT-L-14@datacomp_xl_s13b_b90k"
    img = {"model": clip, "input": "image", "dim": 768}
    assert shares_space(img, {"model": clip, "input": "caption", "dim": 768})
    assert not shares_space(img, {"model": clip, "input": "image", "dim": 768})
    assert not shares_space(img, {"model": clip, "input": "caption", "dim": 512})
    assert not shares_space(img, {"model": "openclip:RN50", "input": "caption", "dim": 768})
    dino = {"model": "dinov2:x", "input": "image", "dim": 768}
    assert not shares_space(dino, {**dino, "input": "caption"})
