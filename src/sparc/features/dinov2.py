"""DINOv2 image features through ``transformers`` (``dinov2:<hub name or directory>[?pool=...]``).

The model loads with ``AutoModel.from_pretrained`` from a Hugging Face hub name (e.g.
``facebook/dinov2-with-registers-large``, the paper's model, or ``facebook/dinov2-large``) or a
directory written by ``save_pretrained``: the same call either way. Hub names are read from the
local cache; a download is tried only when ``HF_HUB_OFFLINE`` is not set.

Features come from ``last_hidden_state``, which is already after the final layer norm
(``[B, 1 + R + P, hidden]``: CLS, R register tokens, P patch tokens):

* ``pool=cls`` (default): the CLS token, ``[B, hidden]`` (1024 for ViT-L/14);
* ``pool=mean``: the mean of the P patch tokens (registers excluded), ``[B, hidden]``;
* ``pool=cls+mean``: both concatenated, ``[B, 2 * hidden]``.

Preprocessing: the model's ``AutoImageProcessor`` when its preprocessor config is present, else the
standard DINOv2 evaluation transform (shorter side to 256 bicubic, centre crop 224, ImageNet
mean/std).

``weights=random``: the architecture from the directory, the cache or a built-in copy of the hub
config (:mod:`sparc.features.random_weights`), randomly initialised; no network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from sparc.catalog import ModelSpec
from sparc.features.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Extractor,
    center_crop_transform,
    describe_center_crop,
    hub_source,
    source_description,
)
from sparc.features.random_weights import config_source, seeded

DINOV2_TYPES = ("dinov2", "dinov2_with_registers")
RESIZE, CROP = 256, 224


def model_source(name: str) -> tuple[str, bool]:
    """``(source, local_files_only)`` for ``from_pretrained`` (:func:`sparc.features.base.hub_source`)."""
    return hub_source(name, "dinov2")


class Dinov2Extractor(Extractor):
    """DINOv2 / DINOv2-with-registers: CLS token, patch mean, or both (spec option ``pool``)."""

    def __init__(self, spec: ModelSpec, input: str, device: str = "cpu") -> None:
        super().__init__(spec, input, device)
        if spec.option("weights") == "random":
            with config_source(spec.name, "dinov2") as (source, origin):
                self._build(source, True, origin)
        else:
            self._build(*model_source(spec.name), "")

    def _build(self, source: str, local_only: bool, random_origin: str) -> None:
        """Load the config, the model (pretrained, or random weights when ``random_origin`` names
        where the config came from) and the image processor from ``source``."""
        from transformers import AutoConfig, AutoModel

        name = self.spec.name
        where = source_description(source, local_only)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=local_only)
        except Exception as err:  # transformers / huggingface_hub raise many types here
            raise ValueError(f"dinov2: cannot load model {name!r} from {where}: {err}") from err
        if config.model_type not in DINOV2_TYPES:
            raise ValueError(
                f"dinov2: {name!r} is a {config.model_type!r} model, not one of {', '.join(DINOV2_TYPES)}"
            )
        if random_origin:
            with seeded():
                model = AutoModel.from_config(config)
            self.random_origin = random_origin
        else:
            try:
                model = AutoModel.from_pretrained(source, local_files_only=local_only)
            except Exception as err:
                raise ValueError(f"dinov2: cannot load the weights of {name!r} from {where}: {err}") from err
        self.model = model.eval().to(self.device)
        self.pool = self.spec.option("pool")
        self.num_registers = int(getattr(config, "num_register_tokens", 0) or 0)
        hidden = int(config.hidden_size)
        self.dim = 2 * hidden if self.pool == "cls+mean" else hidden
        self.processor = self._image_processor(source, local_only)
        self.transform = None if self.processor is not None else center_crop_transform(
            RESIZE, CROP, IMAGENET_MEAN, IMAGENET_STD
        )

    @staticmethod
    def _image_processor(source: str, local_only: bool):
        """The model's AutoImageProcessor, or None when it ships no preprocessor config."""
        from transformers import AutoImageProcessor

        if Path(source).is_dir() and not (Path(source) / "preprocessor_config.json").is_file():
            return None
        try:
            return AutoImageProcessor.from_pretrained(source, local_files_only=local_only)
        except OSError:
            return None

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        if self.processor is not None:
            return self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return self.transform(image)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> ``[B, dim]`` from the final-norm tokens (see module docstring)."""
        x = batch.to(self.device, non_blocking=True)
        tokens = self.model(pixel_values=x).last_hidden_state
        cls = tokens[:, 0]
        if self.pool == "cls":
            return cls.float().cpu()
        patch_mean = tokens[:, 1 + self.num_registers :].mean(dim=1)
        if self.pool == "mean":
            return patch_mean.float().cpu()
        return torch.cat([cls, patch_mean], dim=1).float().cpu()

    def preprocessing(self) -> dict:
        base = {"pool": self.pool, "register_tokens": self.num_registers, "alpha": "composited onto white"}
        if self.processor is not None:
            return dict(base, image_processor=json.loads(self.processor.to_json_string()))
        return dict(base, **describe_center_crop(RESIZE, CROP, IMAGENET_MEAN, IMAGENET_STD))
