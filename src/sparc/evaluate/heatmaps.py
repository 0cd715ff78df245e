"""Per-stream heat-map models for localisation: the image stream's model with gradients.

A :class:`Localiser` preprocesses an image as the stream's extractor does, computes the stream's
feature ``[1, d]`` with autograd, calls ``target(feature)`` (a scalar), and turns the gradient into
a heat map on the model's input grid; :meth:`Localiser.view_box` says which image region that
grid covers, so :func:`sparc.evaluate.localise.place_map` can put it back onto the image.

* ViTs through ``transformers`` (:class:`ViTRollout`): ``dinov2:`` models (CLS after the final
  norm, eager attention) and ``imgfocus:vit-s14`` converted from its ONNX file
  (:mod:`sparc.features.vit_convert`, whose CLS matches ONNX Runtime's within 1e-4 of its norm):
  gradient-weighted attention rollout over the last ``layers`` layers
  (:func:`sparc.evaluate.localise.gradient_rollout`).
* CNNs (:class:`GradCAM`): ``efficientnet:lite0``, Grad-CAM on the head's ReLU6 map
  ``[1, 1280, 7, 7]`` whose spatial mean is the stream's feature.

:func:`build_localiser` picks one from a stream's model spec (ValueError for families without one).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sparc.evaluate.localise import cls_patch_map, grad_cam, gradient_rollout
from sparc.features.registry import parse_spec

Target = Callable[[Tensor], Tensor]
SUPPORTED = ("imgfocus", "dinov2", "efficientnet")


def centre_crop_box(width: int, height: int, resize: int, crop: int) -> tuple[float, float, float, float]:
    """Image region seen after "shorter side to ``resize``, centre crop ``crop``": a centred square
    of side ``min(w, h) * crop / resize``."""
    side = min(width, height) * crop / resize
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def letterbox_box(width: int, height: int) -> tuple[float, float, float, float]:
    """Image region seen after letterboxing (longest side to the input, centred): a centred square
    of side ``max(w, h)`` (partly outside the image when it is not square)."""
    side = max(width, height)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


class Localiser(ABC):
    """A stream's differentiable feature and the heat map of a scalar target over its input."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> Tensor:
        """RGB image -> ``[3, H, W]`` model input, as the stream's extractor prepares it."""

    @abstractmethod
    def view_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)``: the image region (pixels) the model input covers."""

    @abstractmethod
    def heat(self, x: Tensor, target: Target) -> tuple[np.ndarray, float]:
        """``x [1, 3, H, W]`` -> (heat map on the model grid ``[gh, gw]``, target value)."""


class ViTRollout(Localiser):
    """Gradient-weighted attention rollout on a ``transformers`` ViT with eager attention.

    ``model(pixel_values, output_attentions=True)`` must return ``last_hidden_state``
    ``[1, prefix + P, d]`` and ``attentions`` (one ``[1, H, T, T]`` per layer); the feature is the
    CLS token (row 0).
    """

    def __init__(self, model, preprocess: Callable[[Image.Image], Tensor],
                 box: Callable[[int, int], tuple[float, float, float, float]],
                 patch: int, prefix: int = 1, layers: int = 1) -> None:
        if layers < 1:
            raise ValueError(f"ViTRollout: layers must be >= 1, got {layers}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._preprocess, self._box = preprocess, box
        self.patch, self.prefix, self.layers = patch, prefix, layers

    def preprocess(self, image: Image.Image) -> Tensor:
        return self._preprocess(image)

    def view_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        return self._box(width, height)

    def heat(self, x: Tensor, target: Target) -> tuple[np.ndarray, float]:
        x = x.detach().requires_grad_(True)  # the weights are frozen: the graph starts at the input
        out = self.model(pixel_values=x, output_attentions=True)
        attentions = list(out.attentions)[-self.layers:]
        value = target(out.last_hidden_state[:, 0])
        grads = torch.autograd.grad(value, attentions, allow_unused=True)
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(attentions, grads, strict=True)]
        r = gradient_rollout([a.detach() for a in attentions], grads)
        grid = (x.shape[2] // self.patch, x.shape[3] // self.patch)
        return cls_patch_map(r, self.prefix, grid)[0].numpy(), float(value.detach())


class GradCAM(Localiser):
    """Grad-CAM on a CNN: ``feature_map(x) -> [1, C, h, w]``, feature = its spatial mean."""

    def __init__(self, feature_map: Callable[[Tensor], Tensor], preprocess: Callable[[Image.Image], Tensor],
                 box: Callable[[int, int], tuple[float, float, float, float]]) -> None:
        self.feature_map, self._preprocess, self._box = feature_map, preprocess, box

    def preprocess(self, image: Image.Image) -> Tensor:
        return self._preprocess(image)

    def view_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        return self._box(width, height)

    def heat(self, x: Tensor, target: Target) -> tuple[np.ndarray, float]:
        fmap = self.feature_map(x.detach().requires_grad_(True))
        if fmap.dim() != 4:
            raise ValueError(f"GradCAM: the feature map must be [B, C, h, w], got {tuple(fmap.shape)}")
        value = target(fmap.mean(dim=(2, 3)))
        (grad,) = torch.autograd.grad(value, fmap)
        return grad_cam(fmap.detach(), grad)[0].numpy(), float(value.detach())


def _imgfocus(layers: int) -> ViTRollout:
    from torchvision import transforms as T

    from sparc.features.base import IMAGENET_MEAN, IMAGENET_STD
    from sparc.features.offline import ImgFocusExtractor, letterbox
    from sparc.features.vit_convert import dinov2_from_onnx

    to_tensor = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    model = dinov2_from_onnx()
    return ViTRollout(model, lambda im: to_tensor(letterbox(im, ImgFocusExtractor.SIZE)), letterbox_box,
                      patch=int(model.config.patch_size), prefix=1, layers=layers)


def _dinov2(spec: str, layers: int) -> ViTRollout:
    from sparc.features.dinov2 import CROP, RESIZE
    from sparc.features.registry import build_extractor

    ex = build_extractor(spec, "image")
    if ex.pool != "cls":
        raise ValueError(f"localise: {spec}: rollout needs the CLS feature (pool=cls), not pool={ex.pool}")
    model = ex.model.cpu()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = "eager"
    proc = getattr(ex, "processor", None)
    resize, crop = RESIZE, CROP
    if proc is not None:
        resize = int(getattr(proc, "size", {}).get("shortest_edge", RESIZE))
        crop = int(getattr(proc, "crop_size", {}).get("height", CROP))
    return ViTRollout(model, ex.preprocess_image, lambda w, h: centre_crop_box(w, h, resize, crop),
                      patch=int(model.config.patch_size), prefix=1 + ex.num_registers, layers=layers)


def _efficientnet(spec: str) -> GradCAM:
    from sparc.features.offline import EfficientNetExtractor
    from sparc.features.registry import build_extractor

    ex = build_extractor(spec, "image")
    model = ex.model.cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    R, C = EfficientNetExtractor.RESIZE, EfficientNetExtractor.CROP
    return GradCAM(model.extract_features, ex.preprocess_image, lambda w, h: centre_crop_box(w, h, R, C))


def build_localiser(spec: str, layers: int = 1) -> Localiser:
    """The localiser of an image stream's model spec (see the module docstring)."""
    family = parse_spec(spec).family
    if family == "imgfocus":
        return _imgfocus(layers)
    if family == "dinov2":
        return _dinov2(spec, layers)
    if family == "efficientnet":
        return _efficientnet(spec)
    raise ValueError(f"localise: no heat-map method for {spec!r} (supported families: {', '.join(SUPPORTED)})")
