"""Text-guided localisation: heat maps (gradient-weighted attention rollout, Grad-CAM) and their
scores (Otsu binarisation, IoU, AP at an IoU threshold), method.md section 4.

Heat maps (``target``: a scalar per image whose gradient weights the maps, e.g. the dot product
of the text stream's latent code with the image stream's code):

* :func:`gradient_rollout` (ViTs): with the attention probabilities ``A_l`` ``[B, H, T, T]`` of
  the layers used and their gradients ``dA_l = d target / d A_l``, start from ``R = I`` and for
  each layer in order ``R <- R + mean_heads(clamp(dA_l * A_l, min=0)) R``. The paper uses the
  last layer only. The heat map is the CLS row of ``R`` over the patch tokens
  (:func:`cls_patch_map`).
* :func:`grad_cam` (CNNs): ``ReLU(sum_c w_c F_c)`` with ``w_c`` the spatial mean of
  ``d target / d F_c`` over a feature map ``F`` ``[B, C, h, w]``.

Scores against a ground-truth mask (one prediction per image-query pair):

* :func:`otsu_threshold` / :func:`binarise`: the heat map is scaled to ``[0, 1]`` and cut at
  Otsu's threshold (the one of 256 histogram bins maximising the between-class variance);
* :func:`iou`: ``|P & G| / |P | G|`` (0 when both are empty);
* :func:`average_precision`: detection AP at an IoU threshold: pairs ranked by a confidence
  score (ties form one rank), a pair is a true positive when its IoU reaches the threshold, every
  pair has one ground truth, ``AP = sum_r (R_r - R_{r-1}) P_r`` over the distinct scores. A
  perfect map gives 1, an empty one 0; with equal scores AP is the squared hit rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

OTSU_BINS = 256


def gradient_rollout(attentions: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """``R [B, T, T]`` from ``R = I`` and ``R <- R + mean_h(clamp(dA * A, 0)) R`` over the layers
    given (in forward order); each ``A``/``dA`` is ``[B, H, T, T]``."""
    if not attentions or len(attentions) != len(grads):
        raise ValueError(f"gradient_rollout: {len(attentions)} attention maps and {len(grads)} gradients")
    b, _, t, _ = attentions[0].shape
    r = torch.eye(t, dtype=attentions[0].dtype, device=attentions[0].device).expand(b, t, t).clone()
    for a, g in zip(attentions, grads, strict=True):
        if a.shape != g.shape or a.dim() != 4:
            raise ValueError(f"gradient_rollout: attention {tuple(a.shape)} and gradient {tuple(g.shape)} differ")
        cam = (g * a).clamp(min=0).mean(dim=1)
        r = r + torch.bmm(cam, r)
    return r


def cls_patch_map(r: Tensor, prefix: int, grid: tuple[int, int]) -> Tensor:
    """The CLS row of ``r [B, T, T]`` over the patch tokens (after ``prefix`` CLS/register tokens),
    as ``[B, gh, gw]``."""
    gh, gw = grid
    row = r[:, 0, prefix:]
    if row.shape[1] != gh * gw:
        raise ValueError(f"cls_patch_map: {row.shape[1]} patch tokens do not fill a {gh} x {gw} grid")
    return row.reshape(-1, gh, gw)


def grad_cam(features: Tensor, grads: Tensor) -> Tensor:
    """``ReLU(sum_c mean_hw(dF_c) F_c)``: ``[B, C, h, w]`` feature map and its gradient -> ``[B, h, w]``."""
    if features.shape != grads.shape or features.dim() != 4:
        raise ValueError(f"grad_cam: features {tuple(features.shape)} and gradients {tuple(grads.shape)} differ")
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return (weights * features).sum(dim=1).clamp(min=0)


def normalise_map(heat: np.ndarray) -> np.ndarray:
    """``(h - min) / (max - min)`` as float64; an all-equal map becomes all zeros."""
    heat = np.asarray(heat, dtype=np.float64)
    lo, hi = float(heat.min()), float(heat.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("normalise_map: the heat map holds non-finite values")
    return (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)


def otsu_threshold(values: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of values in ``[0, 1]``: the bin edge ``t`` maximising
    ``w0(t) w1(t) (mu0(t) - mu1(t))^2``; pixels ``> t`` are foreground."""
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins=bins, range=(0.0, 1.0))
    p = hist / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    total = m0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[1:][int(np.argmax(between))])


def binarise(heat: np.ndarray) -> np.ndarray:
    """Boolean mask of a heat map: scaled to ``[0, 1]`` and cut at Otsu's threshold (an all-equal
    map gives an empty mask)."""
    h = normalise_map(heat)
    if not h.any():
        return np.zeros(h.shape, dtype=bool)
    return h > otsu_threshold(h)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """``|P & G| / |P | G|`` of two boolean masks of one shape (0.0 when both are empty)."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"iou: mask shapes differ: {pred.shape} vs {gt.shape}")
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 0.0


def average_precision(ious: Sequence[float], scores: Sequence[float], threshold: float = 0.2) -> float:
    """Detection AP at IoU ``threshold`` with one prediction and one ground truth per pair (see
    the module docstring); pairs with equal scores share one rank. 0.0 for no pairs."""
    ious_a, scores_a = np.asarray(ious, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if ious_a.shape != scores_a.shape or ious_a.ndim != 1:
        raise ValueError(f"average_precision: {ious_a.shape} IoUs and {scores_a.shape} scores")
    n = len(ious_a)
    if n == 0:
        return 0.0
    order = np.argsort(-scores_a, kind="stable")
    hits = (ious_a[order] >= threshold).astype(np.float64)
    tp = np.cumsum(hits)
    rank = np.arange(1, n + 1)
    # the last position of each run of equal scores closes one rank
    last = np.r_[scores_a[order][1:] != scores_a[order][:-1], True]
    precision = tp[last] / rank[last]
    recall = tp[last] / n
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def gaussian_map(height: int, width: int, sigma: float = 0.25) -> np.ndarray:
    """Chance baseline: a centred Gaussian ``exp(-(dx^2 + dy^2) / (2 (sigma * side)^2))`` with
    ``side = min(height, width)``, ``[height, width]``."""
    y = (np.arange(height) + 0.5 - height / 2) / (sigma * min(height, width))
    x = (np.arange(width) + 0.5 - width / 2) / (sigma * min(height, width))
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))


def place_map(heat: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
    """A model-grid heat map ``[gh, gw]`` resized (bilinear) onto the image region ``box``
    ``(x0, y0, x1, y1)`` its input covers, in an image of ``size`` ``(width, height)``; 0 elsewhere."""
    width, height = size
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"place_map: empty box {box}")
    t = torch.as_tensor(np.asarray(heat, dtype=np.float32))[None, None]
    resized = torch.nn.functional.interpolate(t, size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0, 0]
    out = np.zeros((height, width), dtype=np.float32)
    sx0, sy0 = max(0, -x0), max(0, -y0)
    dx0, dy0 = max(0, x0), max(0, y0)
    dx1, dy1 = min(width, x1), min(height, y1)
    if dx1 > dx0 and dy1 > dy0:
        out[dy0:dy1, dx0:dx1] = resized.numpy()[sy0 : sy0 + dy1 - dy0, sx0 : sx0 + dx1 - dx0]
    return out


def score_pairs(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], scores: Sequence[float],
                threshold: float = 0.2) -> dict:
    """``{"ap": AP@threshold, "miou": mean IoU, "hit": share with IoU >= threshold, "n": pairs,
    "ious": per-pair IoUs}`` of heat maps against ground-truth masks (Otsu binarisation)."""
    if len(maps) != len(masks) or len(maps) != len(scores):
        raise ValueError(f"score_pairs: {len(maps)} maps, {len(masks)} masks, {len(scores)} scores")
    return summarise_ious([iou(binarise(m), g) for m, g in zip(maps, masks, strict=True)], scores, threshold)


def summarise_ious(ious: Sequence[float], scores: Sequence[float], threshold: float = 0.2) -> dict:
    """:func:`score_pairs`'s dict from per-pair IoUs (``iou(binarise(map), mask)``) and scores, for
    callers that score one map at a time instead of holding them all."""
    ious = [float(v) for v in ious]
    return {
        "ap": average_precision(ious, scores, threshold),
        "miou": float(np.mean(ious)) if ious else 0.0,
        "hit": float(np.mean([v >= threshold for v in ious])) if ious else 0.0,
        "n": len(ious),
        "ious": ious,
    }
