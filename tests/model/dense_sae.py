"""Dense reference of the multi-stream SAE for the tests: masked dense codes, plain autograd.

It reads the parameters of a :class:`MultiStreamSAE` and recomputes the SPARC / USAE losses with
``[B, L]`` codes and dense matmuls, following method.md sections 1-3 line by line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparc.model.sae import MultiStreamSAE


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def dense_logits(model: MultiStreamSAE, xn: dict) -> dict:
    return {s: (v - model.b_pre[s]) @ model.W_enc[s].T + model.b_lat[s] for s, v in xn.items()}


def dense_codes(model: MultiStreamSAE, h: dict, mode: str) -> dict:
    """Dense ``[B, L]`` codes with ReLU after the gather."""
    k = model.cfg.k
    if mode == "global":
        agg = sum(v.detach() for v in h.values())
        idx = {s: agg.topk(k, dim=1).indices for s in h}
    else:
        idx = {s: v.detach().topk(k, dim=1).indices for s, v in h.items()}
    return {s: torch.zeros_like(v).scatter(1, idx[s], F.relu(v.gather(1, idx[s]))) for s, v in h.items()}


def nmse(xhat, x):
    return (((xhat - x) ** 2).sum(1) / (x**2).sum(1)).mean()


def dense_aux(model, s, h, xn, xhat_self, dead):
    k_aux = min(model.cfg.k_aux, model.cfg.L)
    masked = h.detach().masked_fill(~dead, float("-inf"))
    aux_idx = masked.topk(k_aux, dim=1).indices
    vals = F.relu(h.gather(1, aux_idx)) * dead[aux_idx]
    zaux = torch.zeros_like(h).scatter(1, aux_idx, vals)
    e = zaux @ model.W_dec[s]
    return nmse(e, (xn - xhat_self).detach()) * dead.any()


def dense_loss(model: MultiStreamSAE, x: dict, lam: float, dead: dict | None, aux_coef: float):
    """(total, self, cross, aux) of the SPARC loss."""
    streams = model.streams
    xn = {s: normalise(x[s]) for s in streams}
    h = dense_logits(model, xn)
    z = dense_codes(model, h, model.cfg.topk)
    xhat = {(s, t): z[s] @ model.W_dec[t] + model.b_pre[t] for s in streams for t in streams}
    l_self = torch.stack([nmse(xhat[s, s], xn[s]) for s in streams]).mean()
    pairs = [(s, t) for s in streams for t in streams if s != t]
    l_cross = torch.stack([nmse(xhat[p], xn[p[1]]) for p in pairs]).mean() if pairs else l_self * 0
    dead = dead or {}
    aux = [dense_aux(model, s, h[s], xn[s], xhat[s, s], dead[s]) for s in streams if s in dead]
    l_aux = torch.stack(aux).sum() / len(streams) if aux else l_self * 0
    return l_self + aux_coef * l_aux + lam * l_cross, l_self, l_cross, l_aux


def dense_usae_loss(model: MultiStreamSAE, x: dict, source: str, dead: dict | None, aux_coef: float,
                    lam: float = 1.0):
    """(self + lam * sum of cross NMSE) / M + aux_coef * AuxK of the source."""
    xn = {s: normalise(x[s]) for s in model.streams}
    h = dense_logits(model, {source: xn[source]})[source]
    z = dense_codes(model, {source: h}, "local")[source]
    xhat = {t: z @ model.W_dec[t] + model.b_pre[t] for t in model.streams}
    errors = [nmse(xhat[t], xn[t]) * (1.0 if t == source else lam) for t in model.streams]
    total = sum(errors) / len(errors)
    if dead and source in dead:
        total = total + aux_coef * dense_aux(model, source, h, xn[source], xhat[source], dead[source])
    return total


def dense_batchnorm(model: MultiStreamSAE, s: str, h: torch.Tensor) -> torch.Tensor:
    """BatchNorm1d by hand: batch statistics (biased variance) in training mode, running ones in eval."""
    bn = model.bn[s]
    if model.training:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return (h - mean) / torch.sqrt(var + 1e-5) * bn.weight + bn.bias


def dense_usae_paper_loss(model: MultiStreamSAE, x: dict, source: str, lam: float):
    """The USAE reference's step, written as its code does: inputs of norm sqrt(d), codes = ReLU(BN(linear)),
    top-k of the codes; per target ``|A - A_hat|.mean() + 0.1 |(A - A_hat) - u D|.mean()`` with ``u``
    the top L // 2 of ``ReLU(pre) - codes`` (residual not detached); targets summed, cross ones x lam."""
    xs = {s: normalise(x[s]) * model.cfg.dims[s] ** 0.5 for s in model.streams}
    pre = dense_batchnorm(model, source, xs[source] @ model.W_enc[source].T + model.b_lat[source])
    codes = F.relu(pre)
    top = codes.topk(model.cfg.k, dim=1)
    z = torch.zeros_like(codes).scatter(1, top.indices, top.values)
    rest = (F.relu(pre) - z).topk(model.cfg.L // 2, dim=1)
    u = torch.zeros_like(codes).scatter(1, rest.indices, rest.values)
    total = 0.0
    for t in model.streams:
        D = model.W_dec[t]
        residual = xs[t] - z @ D
        term = residual.abs().mean() + 0.1 * (residual - u @ D).abs().mean()
        total = total + (term if t == source else lam * term)
    return total
