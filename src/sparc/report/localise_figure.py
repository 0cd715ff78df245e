"""Heat-map overlays of the `localise` stage: one row per query, the canvas with the query item's
mask outlined, then one panel per method (heat map over the canvas, its Otsu mask outlined, IoU)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from sparc.evaluate.composite import Composite
from sparc.evaluate.localise import binarise, normalise_map
from sparc.report.figures import new_figure, style, wrap


def overlay_figure(composites: Sequence[Composite], captions: Sequence[str],
                   maps: Mapping[str, Sequence[np.ndarray]], ious: Mapping[str, Sequence[float]]) -> Figure:
    """``len(composites)`` rows x ``1 + len(maps)`` panels (see the module docstring)."""
    methods = list(maps)
    n = len(composites)
    if n == 0:
        raise ValueError("overlay_figure: no queries to draw")
    cols = 1 + len(methods)
    with style():
        fig = new_figure(1.9 * cols, 2.1 * n)
        for i, comp in enumerate(composites):
            img = np.asarray(comp.image)
            ax = fig.add_subplot(n, cols, i * cols + 1)
            ax.imshow(img)
            ax.contour(comp.query_mask, levels=[0.5], colors="lime", linewidths=1.2)
            ax.set_title(wrap(f"“{captions[i]}”", 28, 2), fontsize=7)
            ax.axis("off")
            for j, m in enumerate(methods):
                ax = fig.add_subplot(n, cols, i * cols + 2 + j)
                heat = maps[m][i]
                ax.imshow(img)
                ax.imshow(normalise_map(heat), cmap="jet", alpha=0.5, vmin=0, vmax=1)
                mask = binarise(heat)
                if mask.any() and not mask.all():
                    ax.contour(mask, levels=[0.5], colors="white", linewidths=0.8)
                ax.contour(comp.query_mask, levels=[0.5], colors="lime", linewidths=0.8)
                ax.set_title(f"{m}  IoU {ious[m][i]:.2f}", fontsize=7)
                ax.axis("off")
        fig.subplots_adjust(left=0.01, right=0.99, top=0.95, bottom=0.01, wspace=0.05, hspace=0.3)
    return fig
