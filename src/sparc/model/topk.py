"""TopK selection rules of the multi-stream SAE (method.md section 1).

All functions take raw logits ``h^s [B, L]`` (no ReLU) and return int64 latent ids; the ReLU is
applied by the caller *after* gathering, so a stream can keep fewer than ``k`` non-zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sparc.model import sparse


def global_topk(logits: Sequence[Tensor], k: int) -> Tensor:
    """SPARC Global TopK: ``top-k(sum_s h^s)`` over the given streams, ``[B, k]`` int64.

    The sum is of the raw logits (no ReLU, no weighting); every stream then uses the same index
    set. With one stream this is :func:`local_topk` of that stream.
    """
    if len(logits) == 0:
        raise ValueError("global_topk needs the logits of at least one stream")
    agg = logits[0]
    if len(logits) > 1:
        with torch.no_grad():  # the same sums, added in place in one buffer (reused on CPU)
            first = logits[0]
            out = sparse.CPU_BUFFERS.take(tuple(first.shape), first.dtype) if sparse.cpu_path(first) else None
            agg = torch.add(first, logits[1], out=out)
            for h in logits[2:]:
                agg.add_(h)
    return torch.topk(agg, k, dim=1).indices


def subset_topk(logits: Sequence[Tensor], keep: Tensor, k: int) -> Tensor:
    """Global TopK over a per-sample subset of streams (the stream-subset training rule).

    ``logits``: ``n`` tensors ``h^s [B, L]``; ``keep [B, n]`` bool, at least one True per row.
    Returns ``top-k(sum_s keep[b, s] h^s_b)`` ``[B, k]`` int64: every stream then uses the index
    set that the kept streams of the sample choose together. All rows kept equals
    :func:`global_topk`; a row keeping one stream gets that stream's :func:`local_topk`.
    """
    if len(logits) == 0 or keep.shape != (logits[0].shape[0], len(logits)):
        raise ValueError(
            f"subset_topk: keep must be [B, n] = [{logits[0].shape[0] if logits else '?'}, {len(logits)}], "
            f"got {tuple(keep.shape)}"
        )
    if keep.device.type == "cpu" and not bool(keep.any(1).all()):  # no host read on accelerators
        raise ValueError("subset_topk: every sample must keep at least one stream")
    agg = torch.where(keep[:, :1], logits[0], 0.0)
    for s, h in enumerate(logits[1:], start=1):
        agg = agg + torch.where(keep[:, s : s + 1], h, 0.0)
    return torch.topk(agg, k, dim=1).indices


def local_topk(logits: Tensor, k: int) -> Tensor:
    """Local TopK: the stream's own top-k latent ids, ``[B, L] -> [B, k]`` int64."""
    return torch.topk(logits, k, dim=1).indices


def aux_topk(logits: Tensor, dead: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """AuxK selection: the ``k_aux`` largest logits among the dead latents of one stream.

    ``logits [B, L]``, ``dead [L]`` bool. Returns ``(idx [B, k_aux] int64, valid [B, k_aux]
    bool)``; ``valid`` is False where fewer than ``k_aux`` latents are dead and the pick is a live
    latent (its activation must be zeroed).

    On accelerators the live logits are masked to ``-inf`` and the top-k runs over all ``L``
    columns (no host synchronisation). On CPU, where there is no device to wait for, the dead
    columns are gathered first when there are at least ``k_aux`` of them, so the top-k runs over
    the dead latents only (several times faster while few latents are dead).
    """
    k_aux = min(k_aux, logits.shape[1])
    if sparse.cpu_path(logits):
        ids = dead.nonzero().view(-1)
        if ids.numel() >= k_aux:
            local = torch.topk(logits.index_select(1, ids), k_aux, dim=1).indices
            return ids[local], torch.ones(local.shape, dtype=torch.bool)
    masked = logits.masked_fill(~dead, float("-inf"))
    idx = torch.topk(masked, k_aux, dim=1).indices
    return idx, dead[idx]
