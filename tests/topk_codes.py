"""Checking sparse TopK codes that come from another float computation than the reference (issue 21).

Codes of the same rows encoded in other batch shapes (another GEMM blocking), in another process
or thread count, or on another CPU (MKL/oneDNN pick kernels by CPU) come from logits that may
differ in the last bits. A latent whose score ties the k-th largest within that rounding may then
be swapped for its rival, and chosen latents with near-equal scores may come in another order; a
bit-for-bit comparison of ``indices`` passes on one machine and fails on another. What is
invariant is checked instead: every latent whose reference score is clearly above the k-th largest
is chosen, none clearly below it is, and the values are the ReLU'd logits at the chosen ids. Where
the k-th and (k+1)-th scores are more than ``2 tol`` apart (almost every row) this pins the index
set exactly.
"""

from __future__ import annotations

import numpy as np
import torch

EPS32 = float(np.finfo(np.float32).eps)  # ~1.2e-7


def logit_tol(scores, terms: int) -> float:
    """Bound on the float32 rounding of logits that are sums of ``terms`` products (the input dim;
    for Global TopK the dims of the summed streams together), in any summation order:
    ``terms * eps32 * scale`` (the classic ``gamma_n`` bound on ``sum |x_i w_i|``) with ``scale``
    ``2 + max |score|``, which bounds ``sum |x_i w_i|`` for the unit-norm inputs and the weights of
    norm about 1 these tests use. E.g. 16 + 20 dims and scores below 3: 36 * 1.2e-7 * 5 ~ 2e-5.
    """
    s = scores.detach().double().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores, np.float64)
    return terms * EPS32 * (2.0 + float(np.abs(s).max()))


def _numpy(a) -> np.ndarray:
    return a.detach().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def assert_topk_code(indices, scores, k: int, tol: float, values=None, logits=None, msg: str = "") -> None:
    """``indices [n, k]`` are a top-k of the reference ``scores [n, L]`` up to ties within ``tol``;
    with ``values``: they equal ``ReLU(logits)`` at ``indices`` within ``tol`` (``logits``: the
    stream's own logits, default ``scores``; they differ under Global TopK)."""
    idx = _numpy(indices).astype(np.int64)
    s = _numpy(scores).astype(np.float64)
    n, L = s.shape
    assert idx.shape == (n, k), (msg, idx.shape, (n, k))
    chosen = np.zeros((n, L), dtype=bool)
    np.put_along_axis(chosen, idx, True, axis=1)
    assert (chosen.sum(1) == k).all(), f"{msg}: repeated latent ids"
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]
    missed = (s > kth + tol) & ~chosen  # clearly in the top-k, not chosen
    intruder = chosen & (s < kth - tol)  # clearly outside the top-k, chosen
    bad = np.flatnonzero((missed | intruder).any(1))
    assert bad.size == 0, f"{msg}: rows {bad[:10].tolist()} are not a top-{k} of the scores (tol {tol:.2g})"
    if values is not None:
        ref = s if logits is None else _numpy(logits).astype(np.float64)
        want = np.maximum(np.take_along_axis(ref, idx, axis=1), 0.0)
        np.testing.assert_allclose(_numpy(values).astype(np.float64), want, rtol=0, atol=tol, err_msg=msg)
