"""16-bit and float greyscale images are scaled to 8 bits, not clipped (issue 22.5)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sparc.data.images import to_8bit

RAMP16 = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (4, 1))  # [4, 256] 0..65535
RAMP_F = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (4, 1))  # [4, 256] 0..1
WANT = np.tile(np.arange(256, dtype=np.uint8), (4, 1))  # the same ramps in 8 bits


@pytest.mark.parametrize(
    "img",
    [Image.fromarray(RAMP16), Image.fromarray(RAMP16.astype(np.int32)), Image.fromarray(RAMP_F)],
    ids=["I;16", "I", "F"],
)
def test_high_bit_greyscale_is_scaled(img: Image.Image) -> None:
    out = to_8bit(img)
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), WANT)
    # what convert("RGB") gives instead: the 16-bit ramp clipped to white, the float ramp to black
    clipped = np.asarray(img.convert("RGB")).mean()
    assert clipped > 250 or clipped < 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (RAMP_F * 4 - 1, r"^float image \(mode F\) with values -1\.\.3, where only 0\.\.1 is understood; "
                         "save it as an 8- or 16-bit image$"),
        (np.where(RAMP_F > 0.5, np.nan, RAMP_F), r"float image \(mode F\) with values nan\.\.nan"),
        (RAMP16.astype(np.int32) * 2, r"^integer image \(mode I\) with values 0\.\.131070, where only 0\.\.65535"),
    ],
)
def test_values_of_unknown_meaning_are_refused(values: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_8bit(Image.fromarray(values))


def test_eight_bit_images_are_unchanged() -> None:
    for mode in ("L", "RGB", "RGBA", "P", "1"):
        img = Image.new(mode, (3, 2))
        assert to_8bit(img) is img
