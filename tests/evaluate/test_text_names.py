"""Latent names from captions (log-odds with an informative Dirichlet prior) and zero-shot names,
on hand-made codes and captions with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from sparc.evaluate.metrics import top_activating
from sparc.evaluate.text_names import (
    PRIOR,
    caption_terms,
    log_odds_z,
    text_columns,
    text_names,
    top_indicator,
    top_terms,
    zero_shot_names,
)

# Three themes of 6 captions each, plus filler; latent 0 fires on the apple captions, latent 1 on
# the sky captions, latent 2 on the car captions (and, weaker, one sky caption), latent 3 never.
APPLES = ["a red apple on a table", "red apple pie", "a red apple tree", "sliced red apple",
          "one red apple", "red apple and a knife"]
SKIES = ["blue sky with clouds", "the blue sky", "clouds in a blue sky", "a blue sky at noon",
         "blue sky over hills", "wide blue sky"]
CARS = ["a fast car", "a red car on the road", "an old car", "a car in the rain", "car keys", "a car park"]
FILLER = ["a table and a chair", "a knife", "hills at noon", "the road home", "a tree", "rain on the table"]
CAPTIONS = APPLES + SKIES + CARS + FILLER


def codes() -> sp.csr_matrix:
    z = np.zeros((len(CAPTIONS), 4))
    z[0:6, 0] = np.arange(6, 0, -1)
    z[6:12, 1] = 1.0 + np.arange(6)
    z[12:18, 2] = 2.0
    z[6, 2] = 0.5  # a weak firing on a sky caption: the seventh sample of latent 2
    return sp.csr_matrix(z)


def tops(codes: sp.csr_matrix, top_n: int) -> sp.csr_matrix:
    """``[L, N]`` indicator of each latent's ``top_n`` strongest samples, as the stage builds it."""
    return top_indicator(top_activating(codes, top_n), codes.shape)


def test_caption_terms_drop_stop_words_and_keep_bigrams() -> None:
    terms = caption_terms(["a red apple on the table", "the red apple"])
    assert terms.terms == sorted(terms.terms)
    assert {"red", "apple", "table", "red apple", "apple table"} == set(terms.terms)
    col = terms.terms.index("red apple")
    assert terms.counts[:, col].toarray().ravel().tolist() == [1.0, 1.0]


def test_caption_terms_without_any_term_are_empty() -> None:
    terms = caption_terms(["", "the a of", "a"])
    assert terms.terms == [] and terms.counts.shape == (3, 0)
    named = text_names(tops(sp.csr_matrix(np.eye(3)), 2), terms, n_words=3, min_score=0.0)
    assert named.name == ["", "", ""] and named.words == [[], [], []] and np.isnan(named.score).all()


def test_max_terms_keeps_the_most_frequent() -> None:
    terms = caption_terms(CAPTIONS, max_terms=3)
    assert len(terms.terms) == 3 and terms.counts.shape == (len(CAPTIONS), 3)
    assert "red" in terms.terms  # held by 7 captions, more than any other term


def test_text_names_find_the_theme_of_each_latent() -> None:
    terms = caption_terms(CAPTIONS)
    named = text_names(tops(codes(), 6), terms, n_words=3, min_score=1.0)
    # equal z (the same counts everywhere): the alphabetical order; "red" is also on a car caption
    assert named.words[0] == ["apple", "red apple", "red"] and named.name[0] == "apple"
    assert named.words[1] == ["blue", "blue sky", "sky"] and named.name[1] == "blue"
    assert named.name[2] == "car" and named.score[2] > named.score[0]
    assert named.name[3] == "" and named.words[3] == [] and np.isnan(named.score[3])
    # top_n = 6 keeps latent 2's six strongest samples: the weak sky caption is not among them
    assert "sky" not in named.words[2]
    assert (named.score[:3] > 1.0).all()


def test_min_score_only_hides_the_name() -> None:
    terms = caption_terms(CAPTIONS)
    named = text_names(tops(codes(), 6), terms, n_words=2, min_score=1e9)
    assert named.name == ["", "", "", ""]
    assert named.words[2][0] == "car" and len(named.words[2]) == 2


def test_log_odds_matches_the_formula_entry_by_entry() -> None:
    terms = caption_terms(CAPTIONS)
    top = tops(codes(), 6)
    z = log_odds_z(top, terms.counts)
    C = terms.counts.toarray()
    T = top.toarray()
    y = T @ C
    y_w = C.sum(axis=0)
    n = y_w.sum()
    a = PRIOR * y_w / n
    checked = 0
    for lat in range(3):
        n_l = y[lat].sum()
        for w in np.flatnonzero(y[lat]):
            r = y_w[w] - y[lat, w]
            delta = np.log((y[lat, w] + a[w]) / (n_l + PRIOR - y[lat, w] - a[w])) - np.log(
                (r + a[w]) / (n - n_l + PRIOR - r - a[w]))
            want = delta / np.sqrt(1 / (y[lat, w] + a[w]) + 1 / (r + a[w]))
            assert z[lat, w] == pytest.approx(want, rel=1e-12)
            checked += 1
    assert checked == z.nnz  # nothing stored off the support


def test_top_indicator_takes_the_strongest_samples() -> None:
    top = tops(codes(), 6).toarray()
    assert top.shape == (4, len(CAPTIONS))
    assert np.flatnonzero(top[2]).tolist() == list(range(12, 18))
    assert top[3].sum() == 0


def test_top_terms_order_and_padding() -> None:
    z = sp.csr_matrix(np.array([[0.0, 2.0, 5.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    idx, scores = top_terms(z, 3)
    assert idx.tolist() == [[2, 1, 3], [-1, -1, -1], [0, -1, -1]]  # tie 2.0: the lower column first
    assert scores[0].tolist() == [5.0, 2.0, 2.0] and np.isnan(scores[1]).all()


def test_zero_shot_names_pick_the_largest_preactivation() -> None:
    logits = np.array([[0.1, 3.0, -1.0], [2.0, 3.0, -2.0], [0.5, -1.0, -0.5]])
    names, scores = zero_shot_names(logits, ["cat", "dog", "sun"])
    assert names == ["dog", "cat", "sun"]  # latent 1: a tie, the earlier term
    assert scores.tolist() == [2.0, 3.0, -0.5]
    with pytest.raises(ValueError, match="one row per term"):
        zero_shot_names(logits, ["cat"])


def test_text_columns_cells() -> None:
    terms = caption_terms(CAPTIONS)
    named = {s: text_names(tops(codes(), 6), terms, 2, 1.0) for s in ("img", "txt")}
    rows = text_columns(["img", "txt"], named)
    assert list(rows[2]) == ["img_text_name", "img_text_score", "img_text_words",
                             "txt_text_name", "txt_text_score", "txt_text_words"]
    assert rows[2]["img_text_name"] == "car" and rows[2]["img_text_words"].startswith("car|")
    assert rows[3]["txt_text_score"] == "" and rows[3]["txt_text_words"] == ""
