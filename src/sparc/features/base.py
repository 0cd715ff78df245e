"""The one interface every feature extractor implements, and helpers the extractors share.

Extraction runs in two halves so data loading overlaps the model:

* :meth:`Extractor.load` runs in DataLoader worker processes: it reads one sample (an image file or
  a caption) and returns a model-ready item (e.g. a ``[3, H, W]`` float tensor, or the caption);
* :meth:`Extractor.collate` stacks items into a batch (tokenising captions, for text models); it
  runs in the workers too;
* :meth:`Extractor.embed` runs the model on one batch and returns ``[B, d]`` float32 features on CPU.

The extract stage calls :meth:`Extractor.collate_counted`, which also returns counts that are summed
over the stream into the ``counts`` object of its ``meta.json``: every text extractor reports
``truncated_captions``, the number of captions longer than the model's token limit (cut to it; see
:func:`count_truncated`).

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

from sparc.catalog import ModelSpec
from sparc.data.images import to_8bit
from sparc.device import resolve_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def open_rgb(path: Path) -> Image.Image:
    """Open an image as RGB, compositing transparency onto white (emoji and clip art are RGBA);
    16-bit and float greyscale scaled by :func:`to_8bit` (ValueError naming ``path`` for values
    it cannot scale)."""
    with Image.open(path) as img:
        img.load()
        try:
            img = to_8bit(img)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
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


def hub_source(name: str, family: str) -> tuple[str, bool]:
    """``(source, local_files_only)`` for ``from_pretrained`` of model ``name`` of ``family``.

    A directory loads as it is; a hub name loads from the local Hugging Face cache when its
    ``config.json`` is cached there or ``HF_HUB_OFFLINE`` is set, and is downloaded otherwise.
    ValueError naming ``family`` for a missing directory or a malformed hub name.
    """
    from huggingface_hub import try_to_load_from_cache

    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), True
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ValueError(f"{family}: model directory {name!r} does not exist")
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError as err:  # huggingface_hub rejects malformed repository ids
        raise ValueError(f"{family}: {name!r} is neither a directory nor a valid hub name: {err}") from None
    return name, cached or hub_offline()


def source_description(source: str, local_only: bool) -> str:
    """Where :func:`hub_source`'s result loads from, for error messages."""
    if Path(source).is_dir():
        return "the directory"
    return "the local Hugging Face cache" if local_only else "the cache or the hub"


TRUNCATED = "truncated_captions"


def count_truncated(tokenizer, texts: list[str], encoded, max_length: int) -> int:
    """How many of ``texts`` have more than ``max_length`` tokens (special tokens included), i.e.
    were cut when ``tokenizer`` encoded them into ``encoded`` with ``truncation=True``.

    A tokenizers-backed (fast) tokenizer keeps what it cut in ``encoded.encodings[i].overflowing``,
    so nothing is tokenised twice; otherwise the texts are encoded again without truncation.
    """
    encodings = getattr(encoded, "encodings", None)
    if encodings is not None and len(encodings) == len(texts):
        return sum(1 for encoding in encodings if encoding.overflowing)
    full = tokenizer(list(texts), truncation=False, padding=False, verbose=False)["input_ids"]
    return sum(len(ids) > max_length for ids in full)


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
    ``random_origin`` is set by extractors built with random weights (spec option
    ``weights=random``, :mod:`sparc.features.random_weights`): where their architecture came from.
    """

    dim: int
    model: Any = None
    random_origin: str = ""

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

    def collate_counted(self, items: list[Any]) -> tuple[Any, dict[str, int]]:
        """:meth:`collate`, plus counts the extract stage sums over the stream into its metadata
        (e.g. ``{"truncated_captions": 2}``; text extractors override this). Default: no counts."""
        return self.collate(items), {}

    @abstractmethod
    def embed(self, batch: Any) -> torch.Tensor:
        """Features ``[B, dim]`` float32 on CPU for one collated batch."""

    def preprocessing(self) -> dict:
        """A JSON-able description of the preprocessing, for the feature metadata."""
        return {}
