"""Planted-concept recovery: how well a learned dictionary contains the planted directions.

For stream s with planted unit directions ``P_s`` (``[C, d_s]``) and decoder ``W_dec^s``
(``[d_s, L]``, columns = latent directions), the best cosine of concept c is

    best_c = max_l cos(P_s[c], W_dec^s[:, l])      (signed: a latent adds its column, never subtracts it)

and the stream's recovery is the mean of ``best_c`` over concepts, plus the fraction of concepts
with ``best_c`` above a threshold.

Threshold (chance level): a fixed unit vector and L independent uniform unit vectors in R^d have
cosines ``t_l`` with ``(t_l + 1) / 2 ~ Beta((d - 1) / 2, (d - 1) / 2)``, so the best of L cosines is
below ``t`` with probability ``F(t)^L``. :func:`chance_best_cosine` returns the ``q`` quantile of that
maximum, ``t_q = 2 * BetaPPF(q^(1/L); (d-1)/2, (d-1)/2) - 1``: a random dictionary of the same size
reaches ``t_q`` for a given concept with probability only ``1 - q``. A concept counts as recovered
when its best cosine exceeds ``t_q`` (default q = 0.99).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta

from sparc.model.sae import MultiStreamSAE

DEFAULT_QUANTILE = 0.99


def chance_best_cosine(dim: int, n_atoms: int, quantile: float = DEFAULT_QUANTILE) -> float:
    """The ``quantile`` of max over ``n_atoms`` random unit vectors of their cosine with a fixed unit
    vector in R^dim (exact, from the Beta law of one cosine; see the module docstring)."""
    if dim < 2:
        raise ValueError(f"dim: need at least 2, got {dim}")
    if n_atoms < 1:
        raise ValueError(f"n_atoms: need at least 1, got {n_atoms}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile: must be in (0, 1), got {quantile}")
    a = (dim - 1) / 2.0
    # q ** (1 / n) computed as exp(log1p(q - 1) / n) keeps precision when n is large.
    per_atom = float(np.exp(np.log(quantile) / n_atoms))
    return float(2.0 * beta.ppf(per_atom, a, a) - 1.0)


def best_cosines(directions: np.ndarray, decoder: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best signed cosine of each planted direction with any decoder column.

    ``directions`` ``[C, d]``, ``decoder`` ``[d, L]`` (columns need not be unit norm; zero columns
    never win). Returns ``(best [C] float64, argbest [C] int64)``.
    """
    directions = np.asarray(directions, dtype=np.float64)
    decoder = np.asarray(decoder, dtype=np.float64)
    if directions.ndim != 2 or decoder.ndim != 2:
        raise ValueError(f"expected directions [C, d] and decoder [d, L], got {directions.shape} and {decoder.shape}")
    if directions.shape[1] != decoder.shape[0]:
        raise ValueError(
            f"directions have dim {directions.shape[1]} but the decoder has {decoder.shape[0]} rows"
        )
    p_norm = np.linalg.norm(directions, axis=1, keepdims=True)
    if (p_norm == 0).any():
        raise ValueError(f"planted direction {int(np.argmin(p_norm[:, 0]))} is zero")
    d_norm = np.linalg.norm(decoder, axis=0, keepdims=True)
    cos = (directions / p_norm) @ np.divide(decoder, d_norm, out=np.zeros_like(decoder), where=d_norm > 0)
    cos[:, d_norm[0] == 0] = -np.inf
    arg = cos.argmax(axis=1)
    return cos[np.arange(len(cos)), arg], arg.astype(np.int64)


@dataclass(frozen=True)
class StreamRecovery:
    """Recovery in one stream: ``best[c]`` is concept c's best cosine, won by latent ``latent[c]``."""

    best: np.ndarray
    latent: np.ndarray
    threshold: float

    @property
    def mean_best(self) -> float:
        return float(self.best.mean())

    @property
    def fraction_recovered(self) -> float:
        return float((self.best > self.threshold).mean())


def model_decoders(model: MultiStreamSAE) -> dict[str, np.ndarray]:
    """Decoder matrices ``[d_s, L]`` float64 (columns = latent directions) of every stream of an SAE.

    The model stores ``W_dec[s]`` as ``[L, d_s]`` (one row per latent); this is its transpose.
    """
    return {s: model.W_dec[s].detach().to("cpu", torch.float64).numpy().T for s in model.streams}


def recovery(
    directions: dict[str, np.ndarray],
    decoders: dict[str, np.ndarray],
    quantile: float = DEFAULT_QUANTILE,
) -> dict[str, StreamRecovery]:
    """Per-stream recovery of planted ``directions[s]`` ``[C, d_s]`` by ``decoders[s]`` ``[d_s, L]``.

    The threshold of stream s is :func:`chance_best_cosine` ``(d_s, L, quantile)``.
    """
    missing = [s for s in directions if s not in decoders]
    if missing:
        raise ValueError(f"no decoder for stream {missing[0]!r} (decoders: {', '.join(decoders)})")
    out = {}
    for s, planted in directions.items():
        best, arg = best_cosines(planted, decoders[s])
        d, n_atoms = np.asarray(decoders[s]).shape
        out[s] = StreamRecovery(best=best, latent=arg, threshold=chance_best_cosine(d, n_atoms, quantile))
    return out


def recovery_summary(result: dict[str, StreamRecovery]) -> dict[str, float]:
    """Flat metrics: ``mean_best_cos/<s>``, ``recovered/<s>``, ``threshold/<s>`` and the means over
    streams ``mean_best_cos`` and ``recovered``."""
    out: dict[str, float] = {}
    for s, r in result.items():
        out[f"mean_best_cos/{s}"] = r.mean_best
        out[f"recovered/{s}"] = r.fraction_recovered
        out[f"threshold/{s}"] = r.threshold
    out["mean_best_cos"] = float(np.mean([r.mean_best for r in result.values()]))
    out["recovered"] = float(np.mean([r.fraction_recovered for r in result.values()]))
    return out
