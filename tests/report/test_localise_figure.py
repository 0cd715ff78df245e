"""The figures and browser images of the localise stage's overlay data, on tiny queries made in
code (tests/report/localise_fixtures.py); the overlays.npz storage: tests/localise/test_overlays.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparc.localise.overlays import Overlays, read_overlays
from sparc.report import figures as F
from sparc.report import localise_figure as LF
from tests.report.localise_fixtures import METHODS, METRICS, tiny_queries, write_localise_outputs

PNG = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def test_overlay_figure_and_scores_figure(tmp_path: Path) -> None:
    overlays = read_overlays(write_localise_outputs(tmp_path) / "overlays.npz")
    w, h = png_size(F.save_png(LF.overlay_figure(overlays), tmp_path / "o.png").read_bytes())
    assert w == round(1.9 * 4 * F.DPI) and h == round(2.1 * 2 * F.DPI)  # 1 + 3 panels, 2 rows
    w, h = png_size(F.save_png(LF.scores_figure(METRICS, 0.2), tmp_path / "s.png").read_bytes())
    assert 300 <= w <= 1000 and 200 <= h <= 400
    with pytest.raises(ValueError, match="no queries"):
        LF.overlay_figure(Overlays(METHODS, [], 0.2))


def test_localisation_scores_and_label() -> None:
    assert LF.localisation_scores({**METRICS, "n": 3}) == {
        "vit": (0.25, 0.31), "effnet": (0.5, 0.42), "chance": (0.0, 0.07)}
    with pytest.raises(ValueError, match="no ap_<method>"):
        LF.localisation_scores({"ap_vit": 0.1})
    with pytest.raises(ValueError, match="not numbers"):
        LF.localisation_scores({"ap_vit": None, "miou_vit": 0.1})
    assert LF.ap_label(0.2) == "AP@0.2" and LF.ap_label(None) == "AP"


def test_overlay_image_blends_and_outlines() -> None:
    q = tiny_queries()[0]  # 48 x 64
    plain = LF.overlay_image(q.image, q.mask, None, 32)
    assert plain.shape == (24, 32, 3) and plain.dtype == np.uint8
    lime = (plain == LF.MASK_RGB).all(axis=2)
    assert lime.any() and not lime[0].any()  # the mask's outline, away from the top edge
    heat = LF.overlay_image(q.image, q.mask, q.heats["vit"], 200)  # never upscaled
    assert heat.shape == (48, 64, 3)
    assert (heat == LF.OTSU_RGB).all(axis=2).any()  # the Otsu mask's outline
    assert not np.array_equal(heat[~LF.outline(q.mask)], q.image[~LF.outline(q.mask)])  # blended
    flat = LF.overlay_image(q.image, q.mask, np.ones(q.mask.shape), 64)
    assert not (flat == LF.OTSU_RGB).all(axis=2).any()  # an all-equal map has no Otsu mask


def test_outline_is_the_mask_boundary() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[1:5, 1:5] = True
    edge = LF.outline(mask)
    assert edge.sum() == 12 and not edge[2:4, 2:4].any()
    full = LF.outline(np.ones((3, 3), dtype=bool))
    assert full.sum() == 8  # the image border counts as outside
