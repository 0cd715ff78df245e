"""1-D probes: how well one latent alone predicts a class (method.md section 4).

Samples: the evaluated split (test). Classes: every node of the label hierarchy except the root;
a sample is a positive of node c when it carries c or a label below c (so inner nodes are classes
too, as in Open Images where image labels include parents). A class is probed when it has more
than ``min_positives`` positives and more than ``min_positives`` negatives.

Per class (randomness from ``numpy.random.default_rng([seed, crc32(class id)])``, so a class's
samples do not depend on which other classes exist):

1. balance: m = min(#positives, #negatives); draw m positives and m negatives without replacement;
2. split 70/15/15 stratified (:func:`sparc.evaluate.metrics.stratified_split`); the same samples
   and split serve every stream;
3. per stream s, candidates: the ``n_candidates`` latents firing on the most *training* positives
   (ties: lower latent id; latents that never fire on a training positive are not candidates);
4. fit a logistic regression p = sigmoid(w z^s_l + b) on the training part for each candidate
   (:func:`sparc.evaluate.metrics.fit_logistic_1d`, L2 on w with C = 1), keep the candidate with
   the lowest validation log-loss (ties: the more co-occurring one), report its test log-loss.
   Without any candidate the probe predicts the training prior (about ln 2 on balanced data).

Chance level: ln 2 (a balanced class predicted at 0.5).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
from scipy.special import expit

from sparc.evaluate.labels import LabelSpace
from sparc.evaluate.metrics import fit_logistic_1d, log_loss, stratified_split

CHANCE = math.log(2.0)


@dataclass(frozen=True)
class ProbeResult:
    """One (class, stream) probe. ``latent`` is -1 when no candidate latent existed."""

    label: str
    name: str
    depth: int
    n_positives: int
    n_balanced: int
    stream: str
    latent: int
    val_logloss: float
    test_logloss: float
    test_accuracy: float


def class_members(labels: sp.csr_matrix, space: LabelSpace) -> sp.csc_matrix:
    """``[N, 1 + B]`` bool CSC: sample i is a positive of node j (carries it or a label below)."""
    return ((labels @ space.closure()) > 0).tocsc()


def probe_classes(labels: sp.csr_matrix, space: LabelSpace, min_positives: int) -> list[tuple[str, np.ndarray]]:
    """Classes with more than ``min_positives`` positives and negatives, with their positive rows,
    in hierarchy order."""
    members = class_members(labels, space)
    N = labels.shape[0]
    out = []
    for j, node in enumerate(space.nodes):
        if j == 0:  # the root
            continue
        rows = members.indices[members.indptr[j] : members.indptr[j + 1]].astype(np.int64)
        rows.sort()
        if rows.size > min_positives and N - rows.size > min_positives:
            out.append((node, rows))
    return out


def no_probe_reason(labels: sp.csr_matrix, space: LabelSpace, min_positives: int) -> str:
    """Why :func:`probe_classes` found no class: the sizes it needed and the largest class seen."""
    members = class_members(labels, space)
    N = labels.shape[0]
    sizes = np.diff(members.indptr)[1:]
    usable = np.minimum(sizes, N - sizes)
    largest = int(usable.max()) if usable.size else 0
    return (
        f"no class has more than {min_positives} positives and as many negatives among the {N} "
        f"evaluated samples (the best has {largest}); lower evaluate.probe_min_positives or use more data"
    )


def _best_probe(x: np.ndarray, y: np.ndarray, parts: tuple[np.ndarray, np.ndarray, np.ndarray]):
    """Fit every column of ``x`` ``[n, c]`` on train, pick by val log-loss; (column, val, test, acc)."""
    tr, va, te = parts
    w, b = fit_logistic_1d(x[tr], y[tr])
    val = log_loss(expit(x[va] * w + b), y[va])
    best = int(np.argmin(val))
    p_test = expit(x[te, best] * w[best] + b[best])
    acc = float(((p_test >= 0.5) == (y[te] == 1)).mean())
    return best, float(val[best]), float(log_loss(p_test, y[te])), acc


def run_probes(
    codes: dict[str, sp.csr_matrix],
    labels: sp.csr_matrix,
    space: LabelSpace,
    *,
    min_positives: int,
    n_candidates: int,
    seed: int,
    max_classes: int | None = None,
) -> list[ProbeResult]:
    """Probe every eligible class in every stream (module docstring).

    ``codes[s]`` ``[N, L]`` CSR of the evaluated split, ``labels`` ``[N, B]`` multi-hot of the
    same rows. ``max_classes`` keeps only the first classes (benchmarks).
    """
    N = labels.shape[0]
    classes = probe_classes(labels, space, min_positives)[:max_classes]
    results = []
    for node, pos in classes:
        rng = np.random.default_rng([seed, zlib.crc32(node.encode())])
        neg = np.setdiff1d(np.arange(N), pos, assume_unique=True)
        m = min(pos.size, neg.size)
        rows = np.concatenate([np.sort(rng.choice(pos, m, replace=False)), np.sort(rng.choice(neg, m, replace=False))])
        y = np.repeat([1.0, 0.0], m)
        parts = stratified_split(y, rng)
        train_pos = rows[parts[0][y[parts[0]] == 1]]
        for s, mat in codes.items():
            sub = mat[rows]
            fires = np.bincount(mat[train_pos].indices, minlength=mat.shape[1])
            order = np.lexsort((np.arange(fires.size), -fires))
            cand = order[: n_candidates]
            cand = cand[fires[cand] > 0]
            if cand.size:
                x = sub[:, cand].toarray().astype(np.float64)
                col, val, test, acc = _best_probe(x, y, parts)
                latent = int(cand[col])
            else:
                prior = float(y[parts[0]].mean())
                val = float(log_loss(np.full(parts[1].size, prior), y[parts[1]]))
                test = float(log_loss(np.full(parts[2].size, prior), y[parts[2]]))
                acc = float(((prior >= 0.5) == (y[parts[2]] == 1)).mean())
                latent = -1
            results.append(
                ProbeResult(
                    label=node,
                    name=space.name(node),
                    depth=space.hierarchy.depth(node),
                    n_positives=int(pos.size),
                    n_balanced=int(m),
                    stream=s,
                    latent=latent,
                    val_logloss=val,
                    test_logloss=test,
                    test_accuracy=acc,
                )
            )
    return results


def probe_rows(results: list[ProbeResult]) -> list[dict]:
    """CSV rows, one per (class, stream)."""
    return [asdict(r) for r in results]


def probe_summary(results: list[ProbeResult], streams: list[str], reason: str | None = None) -> dict:
    """``mean_test_logloss`` and ``mean_test_accuracy`` per stream (over classes), ``n_classes``,
    ``chance`` = ln 2, and ``reason``: why the means are null (``None`` when probes ran)."""
    out: dict = {"mean_test_logloss": {}, "mean_test_accuracy": {}}
    for s in streams:
        mine = [r for r in results if r.stream == s]
        out["mean_test_logloss"][s] = float(np.mean([r.test_logloss for r in mine])) if mine else None
        out["mean_test_accuracy"][s] = float(np.mean([r.test_accuracy for r in mine])) if mine else None
    out["n_classes"] = len({r.label for r in results})
    out["chance"] = CHANCE
    out["reason"] = reason if not results else None
    return out
