"""Latent names from text: the caption terms that set a latent's top samples apart, and a
zero-shot name from the caption stream's encoder. Needs no labels.

Terms. The captions of the concepts split (N of them) are turned into a binary term matrix
``C`` ``[N, V]``: scikit-learn's ``CountVectorizer`` with its English stop-word list, lower case,
tokens of two or more word characters, unigrams and bigrams (bigrams of the words left after the
stop words are removed, so "cat with a hat" gives "cat hat"), ``binary=True`` (a term counts once
per caption), and at most ``max_terms`` terms (the most frequent, 0 = all).

Log-odds with an informative Dirichlet prior (Monroe, Colaresi and Quinn 2008, "Fightin' words").
``T`` ``[L, N]`` is the 0/1 indicator of each latent's top samples (the (up to) ``top_n`` samples of
:func:`sparc.evaluate.metrics.top_activating`, those the label-derived names of
:mod:`sparc.evaluate.concepts` come from). With

    y_lw = (T C)_lw          captions among latent l's top samples that hold term w
    y_w  = sum_n C_nw        captions of the split that hold w;   n = sum_w y_w
    n_l  = sum_w y_lw;       r_lw = y_w - y_lw;   m_l = n - n_l  (the other captions)
    a_w  = a0 * y_w / n      the prior: the split's own term rates, strength a0 = ``prior``

the log-odds difference of w between the top captions and the other captions, its variance and
its z-score are

    delta_lw = ln[(y_lw + a_w) / (n_l + a0 - y_lw - a_w)] - ln[(r_lw + a_w) / (m_l + a0 - r_lw - a_w)]
    var_lw   = 1 / (y_lw + a_w) + 1 / (r_lw + a_w)
    z_lw     = delta_lw / sqrt(var_lw)

A latent's terms are those with ``y_lw > 0`` in decreasing z (ties: the earlier term in the
vectoriser's alphabetical vocabulary); its text name is the first when ``z >= min_score``, else ''.
The prior keeps a term seen once in a small group from winning by chance: a term must be both
frequent among the top captions and rarer elsewhere.

Cost. z is computed on the support of ``T C`` only: ``nnz(T C) <= L * top_n * t`` for t distinct
terms per caption, a sparse product of that many multiply-adds, plus a sort of the support. At the
paper's size (L 8192, top_n 50, Localized Narratives' ~40 terms a caption) that is at most ~16M
entries (~0.4 GB of float64 + indices), independent of N; vectorising the N captions is linear in
their length (the split's, 126k captions at the paper's size, not the 1.8M of the whole dataset).

Zero-shot names (:func:`zero_shot_names`). Given the caption stream's pre-activations ``H``
``[W, L]`` of W vocabulary terms, each encoded alone as a caption by the stream's extractor and
the SAE's encoder for that stream (``h = W_enc (x/||x|| - b_pre) + b_lat``), a latent's zero-shot
name is ``argmax_w H_wl`` (ties: the earlier term) with score ``max_w H_wl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

PRIOR = 100.0  # a0: strength of the informative Dirichlet prior, in pseudo-counts of terms
TERM_SEP = "|"  # joins a latent's top terms in one CSV cell


@dataclass(frozen=True)
class TermMatrix:
    """The binary term matrix of N captions: ``counts`` ``[N, V]`` CSR (0/1, float64) and the
    ``terms`` (length V, alphabetical as the vectoriser orders them)."""

    counts: sp.csr_matrix
    terms: list[str]

    def most_frequent(self, n: int) -> list[int]:
        """Indices of the ``n`` terms held by the most captions (ties: the earlier term)."""
        df = np.asarray(self.counts.sum(axis=0)).ravel()
        order = np.lexsort((np.arange(df.size), -df))
        return order[:n].tolist()


def caption_terms(captions: Sequence[str], max_terms: int = 0) -> TermMatrix:
    """:class:`TermMatrix` of ``captions`` (module docstring: English stop words removed,
    unigrams and bigrams, binary, the ``max_terms`` most frequent terms; 0 = all). Captions
    without any term (empty, or stop words only) give an empty vocabulary, not an error."""
    from sklearn.feature_extraction.text import CountVectorizer

    if max_terms < 0:
        raise ValueError(f"max_terms must be >= 0, got {max_terms}")
    vectoriser = CountVectorizer(
        stop_words="english", ngram_range=(1, 2), binary=True, dtype=np.float64,
        max_features=max_terms or None,
    )
    try:
        counts = vectoriser.fit_transform(list(captions))
    except ValueError:  # "empty vocabulary": no caption holds a term
        return TermMatrix(sp.csr_matrix((len(captions), 0)), [])
    return TermMatrix(counts.tocsr(), vectoriser.get_feature_names_out().tolist())


def top_indicator(top: tuple[np.ndarray, np.ndarray], shape: tuple[int, int]) -> sp.csr_matrix:
    """``T`` ``[L, N]``: 1 where sample n is among latent l's top samples, given as the
    ``(latents, rows)`` pairs of :func:`sparc.evaluate.metrics.top_activating` on ``[N, L]``
    codes of ``shape``."""
    lat, rows = top
    N, L = shape
    return sp.csr_matrix((np.ones(lat.size), (lat, rows)), shape=(L, N))


def log_odds_z(top: sp.csr_matrix, counts: sp.csr_matrix, prior: float = PRIOR) -> sp.csr_matrix:
    """``z`` ``[L, V]`` (module docstring) on the support of ``top @ counts`` (``top`` ``[L, N]``
    0/1, ``counts`` ``[N, V]`` 0/1); other entries are not stored. Entries whose z is not finite
    (a vocabulary of one term held by every caption) are dropped."""
    if prior <= 0:
        raise ValueError(f"prior must be positive, got {prior}")
    y = (top @ counts).tocsr()
    y.sum_duplicates()
    y.eliminate_zeros()
    y_w = np.asarray(counts.sum(axis=0)).ravel()
    n = float(y_w.sum())
    n_l = np.asarray(y.sum(axis=1)).ravel()
    row = np.repeat(np.arange(y.shape[0]), np.diff(y.indptr))
    col = y.indices
    y_lw = y.data
    alpha = prior * y_w[col] / n if n > 0 else np.zeros_like(y_lw)
    r_lw = y_w[col] - y_lw
    m_l = n - n_l[row]
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = np.log((y_lw + alpha) / (n_l[row] + prior - y_lw - alpha)) - np.log(
            (r_lw + alpha) / (m_l + prior - r_lw - alpha)
        )
        z = delta / np.sqrt(1.0 / (y_lw + alpha) + 1.0 / (r_lw + alpha))
    keep = np.isfinite(z)
    return sp.csr_matrix((z[keep], (row[keep], col[keep])), shape=y.shape)


def top_terms(z: sp.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``z`` ``[L, V]`` its (up to) ``n`` stored columns of largest value (ties: the
    lower column). Returns ``terms`` ``[L, n]`` int64 (-1 past a row's entries) and ``scores``
    ``[L, n]`` float64 (NaN there)."""
    L = z.shape[0]
    coo = z.tocoo()
    order = np.lexsort((coo.col, -coo.data, coo.row))
    row, col, val = coo.row[order], coo.col[order], coo.data[order]
    rank = np.arange(row.size) - np.searchsorted(row, row, side="left")
    keep = rank < n
    terms = np.full((L, n), -1, dtype=np.int64)
    scores = np.full((L, n), np.nan)
    terms[row[keep], rank[keep]] = col[keep]
    scores[row[keep], rank[keep]] = val[keep]
    return terms, scores


@dataclass(frozen=True)
class TextNames:
    """One stream's text names, per latent (length L): ``name`` (the top term when its z-score
    reaches the threshold, else ''), ``score`` (the top term's z, NaN without terms) and ``words``
    (the top terms, best first, whatever their score)."""

    name: list[str]
    score: np.ndarray
    words: list[list[str]]


def text_names(
    top: sp.csr_matrix, terms: TermMatrix, n_words: int, min_score: float, prior: float = PRIOR,
) -> TextNames:
    """Name every latent from the captions of its top samples, ``top`` ``[L, N]``
    (:func:`top_indicator`; ``terms`` holds the same N captions' terms; module docstring),
    keeping ``n_words`` terms."""
    if top.shape[1] != terms.counts.shape[0]:
        raise ValueError(f"codes have {top.shape[1]} rows, the term matrix {terms.counts.shape[0]}")
    z = log_odds_z(top, terms.counts, prior)
    idx, scores = top_terms(z, n_words)
    words = [[terms.terms[j] for j in row if j >= 0] for row in idx]
    best = scores[:, 0] if n_words else np.full(top.shape[0], np.nan)
    name = [w[0] if w and s >= min_score else "" for w, s in zip(words, best, strict=True)]
    return TextNames(name, best, words)


def zero_shot_names(logits: np.ndarray, terms: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Per latent the term of largest pre-activation and that value: ``logits`` ``[W, L]`` (row w:
    term ``terms[w]`` encoded as a caption); ties go to the earlier term. Empty names (score NaN)
    when there are no terms."""
    if logits.ndim != 2 or logits.shape[0] != len(terms):
        raise ValueError(f"logits {logits.shape} do not have one row per term ({len(terms)})")
    if not len(terms):
        return [""] * logits.shape[1], np.full(logits.shape[1], np.nan)
    best = np.argmax(logits, axis=0)
    return [terms[j] for j in best], logits[best, np.arange(logits.shape[1])].astype(np.float64)


def text_columns(streams: Sequence[str], names: dict[str, TextNames]) -> list[dict]:
    """Per latent the CSV cells ``<s>_text_name``, ``<s>_text_score`` (6 decimals, '' without
    terms) and ``<s>_text_words`` (:data:`TERM_SEP`-joined) of every stream."""
    L = len(names[streams[0]].name)
    rows: list[dict] = [{} for _ in range(L)]
    for s in streams:
        t = names[s]
        for i, row in enumerate(rows):
            row[f"{s}_text_name"] = t.name[i]
            row[f"{s}_text_score"] = round(float(t.score[i]), 6) if np.isfinite(t.score[i]) else ""
            row[f"{s}_text_words"] = TERM_SEP.join(t.words[i])
    return rows
