"""open_rgb: the one image reader of the image extractors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparc.features.base import open_rgb


def test_16_bit_png_and_float_tiff_keep_their_grey_levels(tmp_path: Path) -> None:
    """Issue 22.5: a 16-bit gradient PNG came out 99.6% white (mean 254.4), a 0..1 float TIFF black."""
    ramp = np.linspace(0, 1, 256)
    Image.fromarray(np.tile((ramp * 65535).round().astype(np.uint16), (8, 1))).save(tmp_path / "g16.png")
    Image.fromarray(np.tile(ramp.astype(np.float32), (8, 1))).save(tmp_path / "f.tif")
    for name in ("g16.png", "f.tif"):
        img = open_rgb(tmp_path / name)
        pixels = np.asarray(img)
        assert img.mode == "RGB" and pixels.mean() == pytest.approx(127.5, abs=0.5)
        np.testing.assert_array_equal(pixels[0, :, 0], np.arange(256))


def test_values_it_cannot_scale_are_refused_naming_the_file(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4), 7.5, dtype=np.float32)).save(tmp_path / "depth.tif")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'depth.tif'}: float image \\(mode F\\) with values 7.5..7.5"):
        open_rgb(tmp_path / "depth.tif")
