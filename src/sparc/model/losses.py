"""Loss terms of the multi-stream SAE (method.md section 2) and the container they are returned in.

NMSE is the *uncentred, per-sample* normalised squared error used everywhere in this project:
``NMSE(xhat, x) = mean_b ||xhat_b - x_b||^2 / ||x_b||^2``. It does not depend on the batch size
and equals 1 for the all-zero reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

# Guards the denominator of NMSE against all-zero targets (e.g. a perfectly fitted AuxK residual).
NMSE_EPS = 1e-12


def nmse_per_sample(xhat: Tensor, x: Tensor) -> Tensor:
    """``||xhat_b - x_b||^2 / max(||x_b||^2, eps)`` for ``xhat, x [B, d]``: ``[B]``."""
    if xhat.shape != x.shape:
        raise ValueError(f"nmse: shapes differ, reconstruction {tuple(xhat.shape)} vs target {tuple(x.shape)}")
    err = (xhat - x).pow(2).sum(-1)
    return err / x.pow(2).sum(-1).clamp_min(NMSE_EPS)


def nmse(xhat: Tensor, x: Tensor) -> Tensor:
    """Batch mean of :func:`nmse_per_sample`: a scalar."""
    return nmse_per_sample(xhat, x).mean()


def nmse_sources(xhat: Tensor, x: Tensor) -> Tensor:
    """NMSE of several reconstructions of one target: ``xhat [B, S, d]``, ``x [B, d]`` -> ``[S]``.

    ``out[s] = NMSE(xhat[:, s], x)``, computed in one pass.
    """
    if xhat.dim() != 3 or xhat.shape[0] != x.shape[0] or xhat.shape[2] != x.shape[1]:
        raise ValueError(f"nmse_sources: reconstructions {tuple(xhat.shape)} do not match target {tuple(x.shape)}")
    err = (xhat - x.unsqueeze(1)).pow(2).sum(-1)
    return (err / x.pow(2).sum(-1, keepdim=True).clamp_min(NMSE_EPS)).mean(0)


@dataclass
class LossOutput:
    """What :meth:`MultiStreamSAE.loss` and :meth:`MultiStreamSAE.usae_loss` return.

    ``total``: differentiable scalar. ``terms``: detached scalars (no host sync): ``self_nmse``,
    ``cross_nmse``, ``aux``, ``self_nmse/<s>``, ``cross_nmse/<s>-><t>``, ``aux/<s>``, ``l0/<s>``
    (the real mean number of non-zeros per sample). ``fired``: stream -> bool ``[L]``, latents with
    a non-zero activation in this batch (only the streams that were encoded).
    """

    total: Tensor
    terms: dict[str, Tensor]
    fired: dict[str, Tensor]
