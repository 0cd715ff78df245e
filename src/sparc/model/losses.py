"""Loss terms of the multi-stream SAE (method.md section 2) and the container they are returned in.

NMSE is the *uncentred, per-sample* normalised squared error used everywhere in this project:
``NMSE(xhat, x) = mean_b ||xhat_b - x_b||^2 / ||x_b||^2``. It does not depend on the batch size
and equals 1 for the all-zero reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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


def sparc_objective(streams: list[str], M: Tensor, aux: dict[str, Tensor], lam: float, aux_coef: float,
                    l0: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """The SPARC objective and its logged terms from the NMSE matrix ``M [n, n]`` (row: source
    ``s``, column: target ``t``: ``NMSE(x^(s->t), x^t)``) and the AuxK terms ``aux`` (stream ->
    scalar, for the streams given a dead mask).

    ``total = L_self + aux_coef * L_aux + lam * L_cross`` with ``L_self`` the mean of the diagonal,
    ``L_cross`` the mean off it and ``L_aux = sum(aux) / n`` (the cross term left out when
    ``lam == 0``). ``terms`` (detached), in this order: per stream ``self_nmse/<s>``,
    ``cross_nmse/<s>-><t>``, ``l0/<s>`` (from ``l0``); ``aux/<s>``; ``self_nmse``, ``cross_nmse``,
    ``aux``. Shared by :meth:`sparc.model.sae.MultiStreamSAE.loss` and the fused CPU step.
    """
    n = len(streams)
    diag = torch.diagonal(M)
    l_self = diag.mean()
    l_cross = (M.sum() - diag.sum()) / (n * (n - 1)) if n > 1 else M.new_zeros(())
    l_aux = torch.stack(list(aux.values())).sum() / n if aux else M.new_zeros(())
    total = l_self + aux_coef * l_aux
    if lam != 0.0:
        total = total + lam * l_cross
    Md = M.detach()
    terms: dict[str, Tensor] = {}
    for i, s in enumerate(streams):
        terms[f"self_nmse/{s}"] = Md[i, i]
        for j, t in enumerate(streams):
            if t != s:
                terms[f"cross_nmse/{s}->{t}"] = Md[i, j]
        terms[f"l0/{s}"] = l0[s]
    for s, a in aux.items():
        terms[f"aux/{s}"] = a.detach()
    terms.update(self_nmse=l_self.detach(), cross_nmse=l_cross.detach(), aux=l_aux.detach())
    return total, terms
