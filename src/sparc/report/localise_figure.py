"""Heat-map overlays of the `localise` stage drawn: its figures and the browser's images.

The overlay data (``reports/localise/overlays.npz``) is written and read by
:mod:`sparc.localise.overlays` (:class:`~sparc.localise.overlays.Overlays`); this module only draws.

Figures (matplotlib, :mod:`sparc.report.figures` style) and images:

* :func:`overlay_figure`: one row per query: the image with its mask outlined (green) and the
  query text, then one panel per method: the heat map blended over the image, its Otsu mask
  outlined (white), the ground-truth mask (green) and the IoU;
* :func:`scores_figure`: AP at the IoU threshold and mIoU per method (``ap_<method>`` /
  ``miou_<method>`` of ``reports/localise/metrics.json``), the chance baseline as dashed lines;
* :func:`overlay_image`: the same panel as a small RGB image (the concept browser's PNGs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image
from scipy import ndimage

from sparc.localise.maps import binarise, normalise_map
from sparc.localise.overlays import CHANCE, Overlays
from sparc.report.figures import new_figure, style, wrap

HEAT_CMAP = "jet"
HEAT_ALPHA = 0.5
MASK_RGB = (0, 255, 0)  # ground-truth mask outline (lime)
OTSU_RGB = (255, 255, 255)  # Otsu mask outline (white)
SCORE_COLORS = {"ap": "#4292c6", "miou": "#fd8d3c"}


# --------------------------------------------------------------------------- images


def blend(image: np.ndarray, heat: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """``(1 - alpha) image + alpha jet(heat)`` as uint8 ``[H, W, 3]``; ``heat`` ``[H, W]`` is
    scaled to [0, 1] first (:func:`normalise_map`)."""
    rgb = colormaps[HEAT_CMAP](normalise_map(heat))[..., :3]
    out = (1.0 - alpha) * np.asarray(image, dtype=np.float64) / 255.0 + alpha * rgb
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask (in the mask, next to a pixel outside it or to the
    image border): ``mask & ~erode(mask)``."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _fit(size: tuple[int, int], px: int) -> tuple[int, int]:
    """``(w, h)`` scaled so the longer side is ``px`` (never upscaled, at least 1)."""
    w, h = size
    f = min(1.0, px / max(w, h))
    return max(1, round(w * f)), max(1, round(h * f))


def overlay_image(image: np.ndarray, mask: np.ndarray, heat: np.ndarray | None, px: int) -> np.ndarray:
    """A browser panel as uint8 ``[h, w, 3]`` with the longer side at most ``px``: the image with
    ``heat`` blended over it (when given) and its Otsu mask outlined in white, the ground-truth
    ``mask`` outlined in green. Otsu runs on the full-size map; masks are resized nearest."""
    base = Image.fromarray(np.asarray(image, dtype=np.uint8))
    size = _fit(base.size, px)
    small = np.asarray(base.resize(size, Image.Resampling.LANCZOS))

    def shrink(m: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(np.asarray(m, dtype=np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0

    out = small.copy()
    if heat is not None:
        h = Image.fromarray(normalise_map(heat).astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
        out = blend(small, np.asarray(h))
        otsu = binarise(heat)
        if otsu.any() and not otsu.all():
            out[outline(shrink(otsu))] = OTSU_RGB
    out[outline(shrink(mask))] = MASK_RGB
    return out


# --------------------------------------------------------------------------- figures


def overlay_figure(overlays: Overlays) -> Figure:
    """``len(queries)`` rows x ``1 + len(methods)`` panels (see the module docstring)."""
    methods, queries = overlays.methods, overlays.queries
    n = len(queries)
    if n == 0:
        raise ValueError("overlay_figure: no queries to draw")
    cols = 1 + len(methods)
    with style():
        fig = new_figure(1.9 * cols, 2.1 * n)
        for i, q in enumerate(queries):
            ax = fig.add_subplot(n, cols, i * cols + 1)
            ax.imshow(q.image)
            ax.contour(q.mask, levels=[0.5], colors="lime", linewidths=1.2)
            ax.set_title(wrap(f"“{q.text}”", 28, 2), fontsize=7, parse_math=False)
            ax.axis("off")
            for j, m in enumerate(methods):
                ax = fig.add_subplot(n, cols, i * cols + 2 + j)
                heat = q.heats[m]
                ax.imshow(blend(q.image, heat))
                otsu = binarise(heat)
                if otsu.any() and not otsu.all():
                    ax.contour(otsu, levels=[0.5], colors="white", linewidths=0.8)
                ax.contour(q.mask, levels=[0.5], colors="lime", linewidths=0.8)
                ax.set_title(f"{m}  IoU {q.ious[m]:.2f}", fontsize=7, parse_math=False)
                ax.axis("off")
        fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.01, wspace=0.05, hspace=0.3)
    return fig


def localisation_scores(metrics: Mapping[str, object]) -> dict[str, tuple[float, float]]:
    """method -> ``(AP, mIoU)`` from the flat metrics of the localise stage (``ap_<method>`` and
    ``miou_<method>``, file order); ValueError when no method has both."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("ap_") and f"miou_{key[3:]}" in metrics:
            ap, miou = value, metrics[f"miou_{key[3:]}"]
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in (ap, miou)):
                raise ValueError(f"localisation metrics: {key} / miou_{key[3:]} are not numbers: {ap!r}, {miou!r}")
            out[key[3:]] = (float(ap), float(miou))
    if not out:
        raise ValueError(f"localisation metrics: no ap_<method> / miou_<method> pair among {sorted(metrics)}")
    return out


def ap_label(iou_threshold: float | None) -> str:
    """``AP@0.2`` (or ``AP`` when the threshold is unknown)."""
    return "AP" if iou_threshold is None else f"AP@{iou_threshold:g}"


def scores_figure(metrics: Mapping[str, object], iou_threshold: float | None = None) -> Figure:
    """Grouped bars of AP and mIoU per method (:func:`localisation_scores`), values on the bars;
    the chance method's values are also drawn as dashed lines across the plot."""
    scores = localisation_scores(metrics)
    methods = list(scores)
    x = np.arange(len(methods))
    width = 0.38
    top = max(max(v) for v in scores.values())
    with style():
        fig = new_figure(max(3.2, 1.0 + 0.9 * len(methods)), 3.0, constrained=True)
        ax = fig.add_subplot(1, 1, 1)
        for k, (key, label) in enumerate((("ap", ap_label(iou_threshold)), ("miou", "mIoU"))):
            vals = [scores[m][k] for m in methods]
            bars = ax.bar(x + (k - 0.5) * width, vals, width, label=label, color=SCORE_COLORS[key])
            ax.bar_label(bars, [f"{v:.3f}" for v in vals], fontsize=7, padding=1)
            if CHANCE in scores:
                ax.axhline(scores[CHANCE][k], color=SCORE_COLORS[key], linestyle="--", linewidth=0.8)
        ax.set_xticks(x, methods, rotation=20 if len(methods) > 4 else 0)
        ax.set_ylim(0, max(top * 1.2, 0.05))
        ax.set_ylabel("score")
        ax.set_title("Text-guided localisation" + (" (dashed: chance)" if CHANCE in scores else ""))
        ax.legend(loc="upper right", frameon=False)
    return fig
