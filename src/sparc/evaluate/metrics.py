"""Metric definitions used by the evaluation protocols (method.md section 4), one function each.

Everything works on sparse codes or on their SciPy sparse forms; no function builds an ``N x L``
dense matrix. Notation: ``N`` samples, ``L`` latents, ``M`` streams, ``z^s_{il}`` the activation of
latent ``l`` on sample ``i`` in stream ``s``; a latent *fires* on a sample when ``z > 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.special import digamma, expit

EULER_GAMMA = 0.5772156649015329


# --------------------------------------------------------------------------- sparse building blocks


def code_matrix(indices: np.ndarray, values: np.ndarray, L: int) -> sp.csr_matrix:
    """The ``[N, L]`` CSR matrix of one stream's codes; zero activations are not stored.

    ``indices`` ``[N, k]`` int latent ids (unique per row), ``values`` ``[N, k]`` float >= 0.
    """
    indices = np.asarray(indices)
    values = np.asarray(values, dtype=np.float32)
    if indices.shape != values.shape or indices.ndim != 2:
        raise ValueError(f"codes: indices {indices.shape} and values {values.shape} must be equal [N, k]")
    n = indices.shape[0]
    keep = values > 0
    counts = keep.sum(axis=1)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    cols = indices[keep].astype(np.int32)
    if cols.size and (cols.min() < 0 or cols.max() >= L):
        raise ValueError(f"codes: latent index out of range [0, {L})")
    mat = sp.csr_matrix((values[keep], cols, indptr), shape=(n, L))
    mat.sort_indices()
    return mat


def firing_matrix(codes: sp.csr_matrix) -> sp.csr_matrix:
    """Binary ``[N, L]`` float64 CSR: 1 where the latent fires."""
    out = codes.copy().astype(np.float64)
    out.data[:] = 1.0
    return out


def label_matrix(labels: Sequence[Sequence[str]], label_ids: Sequence[str]) -> sp.csr_matrix:
    """Multi-hot ``[N, B]`` float64 CSR of each sample's label ids over ``label_ids`` (columns).

    A label listed twice on one sample counts once. KeyError names an unknown label.
    """
    col = {lab: j for j, lab in enumerate(label_ids)}
    indptr = [0]
    cols: list[int] = []
    for i, labs in enumerate(labels):
        try:
            row = sorted({col[lab] for lab in labs})
        except KeyError as err:
            raise KeyError(f"sample row {i}: label {err.args[0]!r} is not in the label set") from None
        cols.extend(row)
        indptr.append(len(cols))
    data = np.ones(len(cols), dtype=np.float64)
    return sp.csr_matrix(
        (data, np.asarray(cols, dtype=np.int32), np.asarray(indptr, dtype=np.int64)),
        shape=(len(labels), len(label_ids)),
    )


def lift_matrix(target: Sequence[int], n_nodes: int) -> sp.csr_matrix:
    """``[B, n_nodes]`` 0/1 CSR mapping label column ``j`` to node column ``target[j]``.

    ``counts @ lift_matrix(...)`` sums the counts of all labels that map to the same node.
    """
    target = np.asarray(target, dtype=np.int64)
    return sp.csr_matrix(
        (np.ones(target.size), (np.arange(target.size), target)), shape=(target.size, n_nodes)
    )


def latent_label_counts(firing: sp.csr_matrix, labels: sp.csr_matrix) -> sp.csr_matrix:
    """``C = F^T Y``: ``C[l, b]`` = number of samples where latent ``l`` fires and label ``b`` is on.

    ``firing`` ``[N, L]`` binary, ``labels`` ``[N, B]`` multi-hot; result ``[L, B]`` CSR.
    """
    if firing.shape[0] != labels.shape[0]:
        raise ValueError(f"firing has {firing.shape[0]} rows, labels {labels.shape[0]}")
    return (firing.T.tocsr() @ labels).tocsr()


# --------------------------------------------------------------------------- Jaccard


def generalised_jaccard(u: sp.spmatrix, v: sp.spmatrix) -> np.ndarray:
    """Row-wise generalised Jaccard of two non-negative ``[L, B]`` count matrices.

    GJ(u, v) = sum_b min(u_b, v_b) / sum_b max(u_b, v_b); a row where both are all zero gets 0.
    Returns ``[L]`` float64.
    """
    u = sp.csr_matrix(u, dtype=np.float64)
    v = sp.csr_matrix(v, dtype=np.float64)
    if u.shape != v.shape:
        raise ValueError(f"generalised_jaccard: shapes {u.shape} and {v.shape} differ")
    num = np.asarray(u.minimum(v).sum(axis=1)).ravel()
    den = np.asarray(u.maximum(v).sum(axis=1)).ravel()
    out = np.zeros(u.shape[0])
    np.divide(num, den, out=out, where=den > 0)
    return out


def latent_jaccard(counts: dict[str, sp.spmatrix], alive: dict[str, np.ndarray]) -> np.ndarray:
    """Per-latent score: the mean of GJ over unordered stream pairs in which both streams fire.

    ``counts[s]`` ``[L, B]`` label counts of stream ``s`` (already lifted to one depth),
    ``alive[s]`` ``[L]`` bool (the latent fires on at least one sample in ``s``). A latent alive in
    fewer than two streams scores 0. Returns ``[L]`` float64.
    """
    streams = list(counts)
    L = next(iter(counts.values())).shape[0]
    total = np.zeros(L)
    pairs = np.zeros(L)
    for a in range(len(streams)):
        for b in range(a + 1, len(streams)):
            s, t = streams[a], streams[b]
            both = alive[s] & alive[t]
            gj = generalised_jaccard(counts[s], counts[t])
            total += np.where(both, gj, 0.0)
            pairs += both
    out = np.zeros(L)
    np.divide(total, pairs, out=out, where=pairs > 0)
    return out


# --------------------------------------------------------------------------- firing statistics


def firing_counts(codes: sp.csr_matrix) -> np.ndarray:
    """``[L]`` int64: on how many samples each latent fires (stored entries are the firings)."""
    return np.bincount(codes.indices, minlength=codes.shape[1]).astype(np.int64)


def activation_patterns(alive: dict[str, np.ndarray]) -> dict:
    """Classify each latent as alive in all streams, dead in all, or mixed.

    ``alive[s]`` ``[L]`` bool. Returns ``{"alive_all", "dead_all", "mixed"}`` (fractions of L),
    ``"counts"`` (the same as integers), ``"combinations"`` (for every set of streams a latent is
    alive in, e.g. ``"clip_img+dino"``, how many latents; ``"none"`` = dead in all) and
    ``"dead_fraction"`` per stream.
    """
    streams = list(alive)
    stack = np.stack([np.asarray(alive[s], dtype=bool) for s in streams])  # [M, L]
    L = stack.shape[1]
    n_alive = stack.sum(axis=0)
    counts = {
        "alive_all": int((n_alive == len(streams)).sum()),
        "dead_all": int((n_alive == 0).sum()),
        "mixed": int(((n_alive > 0) & (n_alive < len(streams))).sum()),
    }
    codes = np.zeros(L, dtype=np.int64)
    for m in range(len(streams)):
        codes |= stack[m].astype(np.int64) << m
    combinations = {}
    for code, n in zip(*np.unique(codes, return_counts=True), strict=True):
        name = "+".join(s for m, s in enumerate(streams) if code >> m & 1) or "none"
        combinations[name] = int(n)
    out: dict = {key: n / L for key, n in counts.items()}
    out["counts"] = counts
    out["combinations"] = dict(sorted(combinations.items()))
    out["dead_fraction"] = {s: float(1.0 - stack[m].mean()) for m, s in enumerate(streams)}
    return out


def firing_entropy(counts: np.ndarray) -> np.ndarray:
    """USAE firing entropy per latent from ``counts`` ``[M, L]`` (firings per stream).

    p_m = counts_m / sum_m counts_m, FE = -sum_m p_m log2 p_m / log2 M (0 log 0 = 0), in [0, 1]:
    1 = fires equally often in every stream, 0 = in one stream only. NaN where a latent never fires.
    """
    counts = np.asarray(counts, dtype=np.float64)
    M = counts.shape[0]
    if M < 2:
        raise ValueError("firing_entropy needs at least two streams")
    total = counts.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts / total
        terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    fe = terms.sum(axis=0) / math.log2(M)
    fe[total == 0] = np.nan
    return fe


def cofire_counts(codes: dict[str, sp.csr_matrix]) -> tuple[np.ndarray, np.ndarray]:
    """Per latent: samples where it fires in any stream, and in every stream (``[L]`` each).

    Each firing is keyed ``i * L + l``; a key present in all M streams is a co-firing.
    """
    mats = list(codes.values())
    N, L = mats[0].shape
    keys = []
    for mat in mats:
        rows = np.repeat(np.arange(N, dtype=np.int64), np.diff(mat.indptr))
        keys.append(rows * L + mat.indices)
    uniq, times = np.unique(np.concatenate(keys), return_counts=True)
    latent = uniq % L
    any_count = np.bincount(latent, minlength=L)
    all_count = np.bincount(latent[times == len(mats)], minlength=L)
    return any_count.astype(np.int64), all_count.astype(np.int64)


def cofire_proportion(any_count: np.ndarray, all_count: np.ndarray) -> np.ndarray:
    """USAE co-fire proportion per latent: all_count / any_count (NaN where it never fires)."""
    out = np.full(any_count.shape, np.nan)
    np.divide(all_count, any_count, out=out, where=any_count > 0)
    return out


# --------------------------------------------------------------------------- reconstruction


def nmse(xhat: np.ndarray, x: np.ndarray) -> float:
    """NMSE = mean_b ||xhat_b - x_b||^2 / ||x_b||^2 (uncentred, as the training loss)."""
    xhat = np.asarray(xhat, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean(((xhat - x) ** 2).sum(axis=1) / (x**2).sum(axis=1)))


def fvu(xhat: np.ndarray, x: np.ndarray) -> float:
    """FVU = sum_b ||xhat_b - x_b||^2 / sum_b ||x_b - mean(x)||^2 (1 - R^2; predicting the mean = 1)."""
    xhat = np.asarray(xhat, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    return float(((xhat - x) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum())


class ReconstructionErrors:
    """Accumulates NMSE and FVU over batches for every (source, target) stream pair.

    :meth:`add` takes one batch of a target's inputs ``x`` and its reconstruction from a source.
    FVU's denominator uses sum ||x - mu||^2 = sum ||x||^2 - n ||mu||^2, accumulated in float64
    per target over the batches given by :meth:`add_target` (call it once per batch and target).
    """

    def __init__(self) -> None:
        self.sq_err: dict[tuple[str, str], float] = {}
        self.nmse_sum: dict[tuple[str, str], float] = {}
        self.n: dict[tuple[str, str], int] = {}
        self.x_sum: dict[str, np.ndarray] = {}
        self.x_sq: dict[str, float] = {}
        self.x_n: dict[str, int] = {}

    def add_target(self, target: str, x: np.ndarray) -> None:
        """Record a batch ``[B, d]`` of the target's inputs for the FVU denominator."""
        x = np.asarray(x, dtype=np.float64)
        self.x_sum[target] = self.x_sum.get(target, 0.0) + x.sum(axis=0)
        self.x_sq[target] = self.x_sq.get(target, 0.0) + float((x**2).sum())
        self.x_n[target] = self.x_n.get(target, 0) + len(x)

    def add(
        self, source: str, target: str, xhat: np.ndarray, x: np.ndarray, x_sq: np.ndarray | None = None
    ) -> None:
        """Record reconstructions ``xhat`` ``[B, d_t]`` of target inputs ``x`` ``[B, d_t]``.
        ``x_sq`` ``[B]``: ``(x**2).sum(axis=1)`` of the float64 ``x`` when the caller already has it
        (one computation per target and batch instead of one per source; the same numbers)."""
        x = np.asarray(x, dtype=np.float64)
        sq = np.subtract(xhat, x, dtype=np.float64)  # (xhat - x)^2 in float64, one array
        np.square(sq, out=sq)
        err = sq.sum(axis=1)
        key = (source, target)
        self.sq_err[key] = self.sq_err.get(key, 0.0) + float(err.sum())
        norms = (x**2).sum(axis=1) if x_sq is None else x_sq
        self.nmse_sum[key] = self.nmse_sum.get(key, 0.0) + float((err / norms).sum())
        self.n[key] = self.n.get(key, 0) + len(x)

    def result(self) -> dict[tuple[str, str], dict[str, float]]:
        """``{(source, target): {"nmse", "fvu"}}``."""
        out = {}
        for key, err in self.sq_err.items():
            t = key[1]
            if self.x_n.get(t, 0) != self.n[key]:
                raise ValueError(f"reconstruction {key}: {self.n[key]} rows, target has {self.x_n.get(t, 0)}")
            mu = self.x_sum[t] / self.x_n[t]
            total_var = self.x_sq[t] - self.x_n[t] * float(mu @ mu)
            out[key] = {"nmse": self.nmse_sum[key] / self.n[key], "fvu": err / total_var}
        return out


# --------------------------------------------------------------------------- retrieval


def l2_normalise_rows(mat: sp.csr_matrix) -> sp.csr_matrix:
    """Rows scaled to unit L2 norm (all-zero rows stay zero); float64 CSR."""
    mat = sp.csr_matrix(mat, dtype=np.float64)
    norms = np.sqrt(np.asarray(mat.multiply(mat).sum(axis=1)).ravel())
    scale = np.zeros_like(norms)
    np.divide(1.0, norms, out=scale, where=norms > 0)
    return sp.csr_matrix(sp.diags(scale) @ mat)


def rank_counts(sim: np.ndarray, answer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, how many gallery items score above and how many tie with its answer.

    ``sim`` ``[b, N]`` similarities of ``b`` queries to the whole gallery, ``answer`` ``[b]`` the
    gallery column of each query's answer. Returns ``greater`` ``[b]`` = #{j : S_ij > S_i,a} and
    ``ties`` ``[b]`` = #{j != a : S_ij = S_i,a}. (The blocked computation at scale is
    :func:`sparc.evaluate.retrieval.pair_rank_counts`; this is its definition.)
    """
    sim = np.asarray(sim)
    answer = np.asarray(answer, dtype=np.int64)
    v = sim[np.arange(sim.shape[0]), answer]
    greater = (sim > v[:, None]).sum(axis=1)
    ties = (sim == v[:, None]).sum(axis=1) - 1
    return greater.astype(np.int64), ties.astype(np.int64)


def harmonic(n: np.ndarray) -> np.ndarray:
    """H_n = sum_{j=1}^n 1/j (H_0 = 0), via digamma: H_n = psi(n + 1) + gamma."""
    return digamma(np.asarray(n, dtype=np.float64) + 1.0) + EULER_GAMMA


def retrieval_metrics(greater: np.ndarray, ties: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Retrieval metrics, in expectation over a uniformly random order among tied items.

    With ``g`` items above the answer and ``e`` others tied with it, the answer's rank is
    ``1 + g + U`` with U uniform on {0..e}:
    R@k = mean_i clip((k - g_i) / (e_i + 1), 0, 1); MRR = mean_i (H_{g+e+1} - H_g) / (e + 1);
    median rank = median_i of the expected rank 1 + g_i + e_i / 2. With every item tied (no
    information) these are the chance values R@k = k/N, MRR = H_N/N, median rank = (N+1)/2.
    """
    g = np.asarray(greater, dtype=np.float64)
    e = np.asarray(ties, dtype=np.float64)
    out = {f"R@{k}": float(np.clip((k - g) / (e + 1.0), 0.0, 1.0).mean()) for k in ks}
    out["median_rank"] = float(np.median(1.0 + g + e / 2.0))
    out["MRR"] = float(((harmonic(g + e + 1.0) - harmonic(g)) / (e + 1.0)).mean())
    return out


def chance_retrieval(N: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Chance level for a gallery of N: R@k = k/N, median rank (N+1)/2, MRR = H_N / N."""
    out = {f"R@{k}": min(k / N, 1.0) for k in ks}
    out["median_rank"] = (N + 1) / 2
    out["MRR"] = float(harmonic(N) / N)
    return out


# --------------------------------------------------------------------------- concepts


def top_activating(codes: sp.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The (up to) ``n`` samples with the largest activation of every latent.

    Returns parallel ``latents``, ``rows`` (int64), sorted by latent, then by decreasing value,
    ties broken by the lower row. Latents firing on fewer than ``n`` samples keep all of them.
    """
    coo = codes.tocoo()
    order = np.lexsort((coo.row, -coo.data, coo.col))
    lat = coo.col[order].astype(np.int64)
    rows = coo.row[order].astype(np.int64)
    starts = np.searchsorted(lat, lat, side="left")
    keep = np.arange(lat.size) - starts < n
    return lat[keep], rows[keep]


def dominant_labels(
    latents: np.ndarray, rows: np.ndarray, labels: sp.csr_matrix, L: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dominant label of each latent's top samples and its purity.

    ``(latents, rows)`` pairs from :func:`top_activating`, ``labels`` ``[N, B]`` multi-hot.
    Every label of a multi-label sample counts. dominant = argmax_b count_b (ties: lowest column),
    purity = count_dominant / (number of top samples) = the share of the top samples carrying it.
    Returns ``dominant`` ``[L]`` int (-1 without top samples or labels), ``purity`` ``[L]``,
    ``n_top`` ``[L]``.
    """
    n_top = np.bincount(latents, minlength=L).astype(np.int64)
    top = sp.csr_matrix((np.ones(latents.size), (latents, rows)), shape=(L, labels.shape[0]))
    counts = (top @ labels).tocsr()
    dominant = np.asarray(counts.argmax(axis=1)).ravel().astype(np.int64)
    best = np.asarray(counts.max(axis=1).todense()).ravel()
    purity = np.zeros(L)
    np.divide(best, n_top, out=purity, where=n_top > 0)
    dominant[best <= 0] = -1
    return dominant, purity, n_top


# --------------------------------------------------------------------------- probes


def log_loss(p: np.ndarray, y: np.ndarray, eps: float = 1e-15) -> np.ndarray:
    """Mean binary cross-entropy -[y ln p + (1-y) ln(1-p)] over axis 0 (p clipped to [eps, 1-eps]).

    ``p`` ``[n]`` or ``[n, c]`` predicted probabilities, ``y`` ``[n]`` in {0, 1}; returns a scalar
    array or ``[c]``.
    """
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(y, dtype=np.float64)
    if p.ndim == 2:
        y = y[:, None]
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean(axis=0)


def fit_logistic_1d(
    x: np.ndarray, y: np.ndarray, C: float = 1.0, max_iter: int = 100, tol: float = 1e-10
) -> tuple[np.ndarray, np.ndarray]:
    """Fit one single-feature logistic regression per column of ``x``, all at once.

    ``x`` ``[n, c]``, ``y`` ``[n]`` in {0, 1}. Minimises, per column,
    f(w, b) = 0.5 w^2 / C + sum_i [log(1 + exp(w x_i + b)) - y_i (w x_i + b)]
    (the objective of scikit-learn's ``LogisticRegression(C=C)``; the intercept is not penalised)
    by Newton's method with Armijo step halving, until the Newton decrement g^T H^-1 g < ``tol``.
    Samples with x_i = 0 (most of them, for sparse codes) enter through their counts only.
    Returns ``(w, b)``, each ``[c]``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, c = x.shape
    # Non-zero entries of each column first, padded to the longest column with weight 0.
    nonzero = x != 0
    nnz = nonzero.sum(axis=0)
    m = max(int(nnz.max()) if c else 0, 1)
    order = np.argsort(~nonzero, axis=0, kind="stable")[:m]
    xs = np.take_along_axis(x, order, axis=0)
    weight = (np.arange(m)[:, None] < nnz).astype(np.float64)
    ys = y[order] * weight
    n0 = n - nnz  # samples at x = 0 ...
    n0_pos = y.sum() - ys.sum(axis=0)  # ... and how many of them are positive

    def objective(w: np.ndarray, b: np.ndarray) -> np.ndarray:
        z = xs * w + b
        f = (weight * np.logaddexp(0.0, z) - ys * z).sum(axis=0)
        return f + n0 * np.logaddexp(0.0, b) - n0_pos * b + 0.5 * w**2 / C

    prior = np.clip(y.mean(), 1e-6, 1 - 1e-6)
    w = np.zeros(c)
    b = np.full(c, math.log(prior / (1 - prior)))
    f = objective(w, b)
    for _ in range(max_iter):
        p = expit(xs * w + b)
        p0 = expit(b)
        r = weight * p - ys
        h = weight * p * (1 - p)
        gw = (r * xs).sum(axis=0) + w / C
        gb = r.sum(axis=0) + n0 * p0 - n0_pos
        hww = (h * xs * xs).sum(axis=0) + 1.0 / C
        hwb = (h * xs).sum(axis=0)
        hbb = h.sum(axis=0) + n0 * p0 * (1 - p0) + 1e-12
        det = hww * hbb - hwb**2
        dw = (hbb * gw - hwb * gb) / det
        db = (hww * gb - hwb * gw) / det
        decrement = gw * dw + gb * db
        active = decrement > tol
        if not active.any():
            break
        # Armijo condition where the decrement is above the objective's rounding noise.
        checked = active & (decrement > 1e-9 * np.maximum(np.abs(f), 1.0))
        step = np.ones(c)
        for _ in range(40):
            f_new = objective(w - step * dw, b - step * db)
            bad = checked & (f_new > f - 0.25 * step * decrement)
            if not bad.any():
                break
            step = np.where(bad, step / 2, step)
        step = np.where(active, step, 0.0)
        w, b = w - step * dw, b - step * db
        f = np.where(active, f_new, f)
    return w, b


def stratified_split(
    y: np.ndarray, rng: np.random.Generator, fractions: tuple[float, float] = (0.70, 0.15)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split sample positions into train / val / test within each class of ``y``.

    Per class of size m (shuffled by ``rng``): round(0.70 m) to train, round(0.15 m) to val, the
    rest to test. Returns three sorted position arrays.
    """
    y = np.asarray(y)
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == cls))
        n_train = int(round(fractions[0] * members.size))
        n_val = int(round(fractions[1] * members.size))
        parts[0].append(members[:n_train])
        parts[1].append(members[n_train : n_train + n_val])
        parts[2].append(members[n_train + n_val :])
    train, val, test = (np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts)
    return train, val, test
