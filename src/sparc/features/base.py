"""The one interface every feature extractor implements, and helpers the extractors share.

Extraction runs in two halves so data loading overlaps the model:

* :meth:`Extractor.load` runs in DataLoader worker processes: it reads one sample (an image file or
  a caption) and returns a model-ready item (e.g. a ``[3, H, W]`` float tensor, or the caption);
* :meth:`Extractor.collate` stacks items into a batch (tokenising captions, for text models); it
  runs in the workers too;
* :meth:`Extractor.embed` runs the model on one batch and returns ``[B, d]`` float32 features on CPU.

Everything the forward pass needs lives in ``self.model``; it is left out when the extractor is
pickled for worker processes (spawn / forkserver start methods), so workers only carry the
preprocessing state (transforms, tokenizers).
"""

from __future__ import annotations

import importlib.metadata
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sparc.features.registry import ModelSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(device: str, param: str = "extract.device") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; otherwise ``torch.device(device)``.

    ``param`` names the parameter in the error raised when CUDA is asked for but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{param}: {device!r} requested but CUDA is not available")
    return dev


def open_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, compositing transparency onto white (emoji and clip art are RGBA)."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "P", "PA"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, img).convert("RGB")
        return img.convert("RGB")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: use only cached files."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def package_file(distribution: str, relpath: str) -> Path:
    """The file ``relpath`` inside installed distribution ``distribution`` (not imported).

    ValueError naming the distribution when it is not installed or lacks the file.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"package {distribution!r} is not installed (pip install {distribution})") from None
    path = Path(str(dist.locate_file(relpath)))
    if not path.exists():
        raise ValueError(f"package {distribution!r} has no {relpath} (looked at {path})")
    return path


def center_crop_transform(
    resize: int, crop: int, mean: tuple[float, ...], std: tuple[float, ...], interpolation: str = "bicubic"
):
    """PIL RGB -> ``[3, crop, crop]`` float32: shorter side to ``resize``, centre crop ``crop``,
    ``(x / 255 - mean) / std`` per channel. Returns a torchvision transform (picklable)."""
    from torchvision import transforms as T

    modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    return T.Compose(
        [
            T.Resize(resize, interpolation=modes[interpolation]),
            T.CenterCrop(crop),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def describe_center_crop(resize: int, crop: int, mean, std, interpolation: str = "bicubic") -> dict:
    """The metadata record of :func:`center_crop_transform` with the same arguments."""
    return {
        "resize_shorter_side": resize,
        "interpolation": interpolation,
        "center_crop": crop,
        "mean": list(mean),
        "std": list(std),
        "alpha": "composited onto white",
    }


class Extractor(ABC):
    """A pretrained model that maps images or captions to feature vectors.

    Subclasses set ``dim`` (feature dimension) and ``self.model`` in ``__init__``, implement
    :meth:`embed`, and either :meth:`preprocess_image` (image models) or :meth:`collate` (text
    models); :meth:`preprocessing` describes the preprocessing for the feature metadata.
    """

    dim: int
    model: Any = None

    def __init__(self, spec: ModelSpec, input: str, device: str = "cpu") -> None:
        self.spec = spec
        self.input = input
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            # Deterministic cuBLAS (extraction runs with deterministic algorithms); must be set
            # before the first matmul creates the cuBLAS handle.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    def __getstate__(self) -> dict:
        """Pickled state for DataLoader workers: everything except ``model``."""
        state = dict(self.__dict__)
        state["model"] = None
        return state

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
