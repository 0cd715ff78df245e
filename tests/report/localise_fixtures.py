"""Tiny outputs of the `localise` stage made in code: overlays.npz and metrics.json, for the
tests of the overlay storage, the figures stage and the browser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparc.localise.overlays import OverlayQuery, write_overlays

METHODS = ["vit", "effnet", "chance"]
METRICS = {"ap_vit": 0.25, "miou_vit": 0.31, "ap_effnet": 0.5, "miou_effnet": 0.42,
           "ap_chance": 0.0, "miou_chance": 0.07}
SIZES = [(48, 64), (40, 40)]  # (H, W): the queries' images differ in size
TEXTS = ["a red $5 square", "a small blue disc"]


def tiny_queries() -> list[OverlayQuery]:
    """Two queries of different sizes: a coloured box on grey, its mask, per method a map
    (``vit``: a blob on the item, ``effnet``: noise, ``chance``: a centred blob)."""
    rng = np.random.default_rng(0)
    out = []
    for (h, w), text in zip(SIZES, TEXTS, strict=True):
        image = np.full((h, w, 3), 200, dtype=np.uint8)
        y0, x0 = h // 4, w // 2
        image[y0 : y0 + h // 3, x0 : x0 + w // 3] = (220, 40, 40)
        mask = np.zeros((h, w), dtype=bool)
        mask[y0 : y0 + h // 3, x0 : x0 + w // 3] = True
        yy, xx = np.mgrid[0:h, 0:w]
        cy, cx = y0 + h / 6, x0 + w / 6
        heats = {
            "vit": 1e-6 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 30.0),  # tiny values: float16 would lose them unscaled
            "effnet": rng.random((h, w)),
            "chance": np.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (2 * (h / 4) ** 2)),
        }
        ious = {"vit": 0.61, "effnet": 0.12, "chance": 0.05}
        out.append(OverlayQuery(text, image, mask, heats, ious))
    return out


def write_localise_outputs(folder: Path, *, overlays: bool = True, metrics: bool = True) -> Path:
    """``folder`` with the localise stage's overlays.npz and / or metrics.json."""
    folder.mkdir(parents=True, exist_ok=True)
    if overlays:
        write_overlays(folder / "overlays.npz", METHODS, tiny_queries(), 0.2)
    if metrics:
        (folder / "metrics.json").write_text(json.dumps(METRICS, indent=2) + "\n")
    return folder
