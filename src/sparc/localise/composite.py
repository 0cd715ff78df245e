"""Composite localisation benchmark with known masks, built from a prepared image dataset.

Each canvas is a ``grid x grid`` array of white cells of ``cell`` pixels; one sample's image,
scaled to ``scale * cell`` (bilinear), is pasted at the centre of each cell. The ground-truth mask
of an item is the bounding box of its non-background pixels (any channel below
:data:`BACKGROUND`) on the canvas. The query is the caption of one item (drawn at random).

Items of one canvas are distinct samples with distinct captions and, when the pool allows, no
label in common, so the query names one item only. Everything is a deterministic function of the
pool, the parameters and ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND = 250  # a pixel is background when all three channels are >= this (white emoji cells)


@dataclass(frozen=True)
class Composite:
    """One canvas: ``rows`` (prepared rows of the items, cell order), ``query`` (index into rows),
    ``masks`` (one ``[side, side]`` bool mask per item)."""

    image: Image.Image
    rows: tuple[int, ...]
    query: int
    masks: tuple[np.ndarray, ...]

    @property
    def query_row(self) -> int:
        return self.rows[self.query]

    @property
    def query_mask(self) -> np.ndarray:
        return self.masks[self.query]


def content_box(image: Image.Image) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the pixels with a channel below :data:`BACKGROUND` (the whole image
    when it has none)."""
    arr = np.asarray(image.convert("RGB"))
    fg = (arr < BACKGROUND).any(axis=2)
    ys, xs = np.nonzero(fg)
    if len(xs) == 0:
        return 0, 0, image.width, image.height
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def compose(images: Sequence[Image.Image], grid: int, cell: int, scale: float) -> tuple[Image.Image, list[np.ndarray]]:
    """Paste ``grid * grid`` images at the cell centres of a white canvas; return it and the masks."""
    if len(images) != grid * grid:
        raise ValueError(f"compose: {len(images)} images for a {grid} x {grid} grid")
    side = grid * cell
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    inner = max(1, int(round(scale * cell)))
    masks = []
    for i, im in enumerate(images):
        small = im.convert("RGB").resize((inner, inner), Image.Resampling.BILINEAR)
        x = (i % grid) * cell + (cell - inner) // 2
        y = (i // grid) * cell + (cell - inner) // 2
        canvas.paste(small, (x, y))
        x0, y0, x1, y1 = content_box(small)
        mask = np.zeros((side, side), dtype=bool)
        mask[y + y0 : y + y1, x + x0 : x + x1] = True
        masks.append(mask)
    return canvas, masks


def pick_items(pool: Sequence[int], captions: Sequence[str], labels: Sequence[tuple[str, ...]],
               n_items: int, rng: np.random.Generator, tries: int = 50) -> list[int]:
    """``n_items`` rows of ``pool`` with distinct captions and (after ``tries`` draws without
    success, only distinct captions) disjoint labels."""
    if len(pool) < n_items:
        raise ValueError(f"composite: {len(pool)} samples cannot fill a canvas of {n_items} items")
    for attempt in range(tries + 1):
        rows = [int(r) for r in rng.choice(pool, size=n_items, replace=False)]
        caps = {captions[r] for r in rows}
        labs = [set(labels[r]) for r in rows]
        disjoint = all(not (labs[i] & labs[j]) for i in range(n_items) for j in range(i))
        if len(caps) == n_items and (disjoint or attempt == tries):
            return rows
    raise ValueError("composite: could not draw items with distinct captions")


def build_composites(
    pool: Sequence[int], images: Sequence[Path], captions: Sequence[str], labels: Sequence[tuple[str, ...]],
    n: int, grid: int = 2, cell: int = 160, scale: float = 0.7, seed: int = 0,
) -> list[Composite]:
    """``n`` composites drawn from the rows ``pool`` (see the module docstring)."""
    if n < 0 or grid < 1 or cell < 8 or not 0.0 < scale <= 1.0:
        raise ValueError(f"composite: bad sizes n={n} grid={grid} cell={cell} scale={scale}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        rows = pick_items(pool, captions, labels, grid * grid, rng)
        imgs = []
        for r in rows:
            with Image.open(images[r]) as im:
                imgs.append(im.convert("RGB"))
        canvas, masks = compose(imgs, grid, cell, scale)
        out.append(Composite(canvas, tuple(rows), int(rng.integers(len(rows))), tuple(masks)))
    return out
