"""Image helpers shared by dataset preparation, feature extraction and the reports (no torch)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_8bit(img: Image.Image) -> Image.Image:
    """``img`` with more than 8 bits per value scaled into an 8-bit ``L`` image, which
    ``convert("RGB")`` would clip instead (a 16-bit gradient turned white, a 0..1 float one black):
    16-bit greyscale (modes ``I;16*``, and ``I`` holding 0..65535, as Pillow reads some 16-bit
    files) as ``round(v * 255 / 65535)``, float greyscale (``F`` holding 0..1) as ``round(v * 255)``.
    Other modes are returned unchanged. ValueError (the reason, for the caller to name the image)
    for ``I`` or ``F`` values outside those ranges, whose meaning is unknown."""
    if not (img.mode.startswith("I;16") or img.mode in ("I", "F")):
        return img
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top, kind = 1.0, "float image (mode F)"
    else:
        top, kind = 65535.0, f"integer image (mode {img.mode})"
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= top):
        raise ValueError(
            f"{kind} with values {values.min():g}..{values.max():g}, where only 0..{top:g} is understood; "
            "save it as an 8- or 16-bit image"
        )
    return Image.fromarray(np.rint(values * (255.0 / top)).astype(np.uint8), mode="L")
