"""The one interface every feature extractor implements.

Extraction runs in two halves so data loading overlaps the model:

* :meth:`Extractor.load` runs in DataLoader worker processes: it reads one sample (an image file or
  a caption) and returns a model-ready item (e.g. a ``[3, H, W]`` float tensor, or the caption);
* :meth:`Extractor.collate` stacks items into a batch (tokenising captions, for text models);
* :meth:`Extractor.embed` runs the model on one batch and returns ``[B, d]`` float32 features on CPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sparc.features.registry import ModelSpec


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"extract.device: {device!r} requested but CUDA is not available")
    return dev


def open_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, compositing transparency onto white (emoji and clip art are RGBA)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "P"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, img).convert("RGB")
        return img.convert("RGB")


class Extractor(ABC):
    """A pretrained model that maps images or captions to feature vectors.

    Subclasses set ``dim`` (feature dimension) in ``__init__`` and describe their preprocessing in
    :meth:`preprocessing` (stored in the feature metadata).
    """

    dim: int

    def __init__(self, spec: ModelSpec, input: str, device: str = "cpu") -> None:
        self.spec = spec
        self.input = input
        self.device = resolve_device(device)

    def load(self, image: Path, caption: str) -> Any:
        """Read one sample; default: the preprocessed image or the raw caption."""
        if self.input == "caption":
            return caption
        return self.preprocess_image(open_rgb(image))

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> ``[3, H, W]`` float tensor. Image extractors override this."""
        raise TypeError(f"{self.spec} does not read images")

    def collate(self, items: list[Any]) -> Any:
        """Stack loaded items into a batch; captions stay a list of strings."""
        if self.input == "caption":
            return list(items)
        return torch.stack(items)

    @abstractmethod
    def embed(self, batch: Any) -> torch.Tensor:
        """Features ``[B, dim]`` float32 on CPU for one collated batch."""

    def preprocessing(self) -> dict:
        """A JSON-able description of the preprocessing, for the feature metadata."""
        return {}
