"""Per-stream heat-map models for localisation: the image stream's model with gradients.

A :class:`Localiser` preprocesses an image as the stream's extractor does, computes the stream's
feature ``[1, d]`` with autograd, calls ``target(feature)`` (a scalar), and turns the gradient into
a heat map on the model's input grid; :meth:`Localiser.view_box` says which image region that
grid covers, so :func:`sparc.localise.maps.place_map` can put it back onto the image.

* ViTs through ``transformers`` (:class:`ViTRollout`): ``dinov2:`` models (CLS after the final
  norm, eager attention) and ``imgfocus:vit-s14`` converted from its ONNX file
  (:mod:`sparc.features.vit_convert`, whose CLS matches ONNX Runtime's within 1e-4 of its norm):
  gradient-weighted attention rollout over the last ``layers`` layers
  (:func:`sparc.localise.maps.gradient_rollout`).
* OpenCLIP ViTs (:class:`OpenClipRollout`): ``openclip:`` image towers that are an open_clip
  ``VisionTransformer`` with a class token read out (``pool_type='tok'``, no attentional pooler)
  and standard residual blocks. The feature is the stream's stored one,
  ``encode_image(x, normalize=False)`` (projected, not normalised), on the extractor's own
  transform; the last ``layers`` blocks' ``nn.MultiheadAttention`` (called with
  ``need_weights=False``) are replaced by :class:`ExplicitAttention`, the same attention computed
  step by step so that the probabilities stay in the autograd graph; then gradient-weighted
  rollout as above (token 0 is the class token, then the patches row by row).
* CNNs (:class:`GradCAM`): ``efficientnet:lite0``, Grad-CAM on the head's ReLU6 map
  ``[1, 1280, 7, 7]`` whose spatial mean is the stream's feature.

:func:`build_localiser` picks one from a stream's model spec (ValueError for families without one).
Localisers are built on the CPU; :meth:`Localiser.to` moves their model to another device, after
which :meth:`Localiser.heat` takes its input (and the target's tensors) on that device and still
returns the map as a CPU numpy array. :func:`float32_convolutions` keeps CUDA convolutions in
full float32 (cuDNN's default is TF32), so such maps match the CPU's to float32 rounding.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from sparc.catalog import parse_spec
from sparc.localise.maps import cls_patch_map, grad_cam, gradient_rollout

Target = Callable[[Tensor], Tensor]
SUPPORTED = ("imgfocus", "dinov2", "efficientnet", "openclip")


@contextmanager
def float32_convolutions() -> Iterator[None]:
    """cuDNN convolutions in full float32 (``torch.backends.cudnn.conv.fp32_precision = "ieee"``)
    inside the block, the previous setting restored after. cuDNN's default is TF32 (a 10-bit
    mantissa) on Ampere and later GPUs; float32 matmuls already are full float32 unless a caller
    enabled TF32. No effect on the CPU."""
    conv = torch.backends.cudnn.conv
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = previous


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
    """A stream's differentiable feature and the heat map of a scalar target over its input.

    ``model`` is the module holding the weights (None when there is none to move) and ``device``
    where they are; :meth:`heat` expects ``x`` and the target's tensors there.
    """

    model: nn.Module | None = None
    device: torch.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> Localiser:
        """Move ``model`` to ``device`` (in place) and return ``self``."""
        self.device = torch.device(device)
        if self.model is not None:
            self.model.to(self.device)
        return self

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
        return cls_patch_map(r, self.prefix, grid)[0].detach().cpu().numpy(), float(value.detach())


class GradCAM(Localiser):
    """Grad-CAM on a CNN: ``feature_map(x) -> [1, C, h, w]``, feature = its spatial mean;
    ``model`` is the module whose weights ``feature_map`` uses (what :meth:`to` moves)."""

    def __init__(self, feature_map: Callable[[Tensor], Tensor], preprocess: Callable[[Image.Image], Tensor],
                 box: Callable[[int, int], tuple[float, float, float, float]], model: nn.Module | None = None) -> None:
        self.feature_map, self._preprocess, self._box, self.model = feature_map, preprocess, box, model

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
        return grad_cam(fmap.detach(), grad)[0].detach().cpu().numpy(), float(value.detach())


class ExplicitAttention(nn.Module):
    """An ``nn.MultiheadAttention`` computed step by step, keeping its attention probabilities.

    Called as the wrapped module is (``(query, key, value, need_weights=..., attn_mask=...)``,
    batch first or not) and returning ``(out, None)``: with ``d_head = embed_dim / heads``,
    ``q, k, v`` from ``in_proj_weight``/``in_proj_bias``, ``P = softmax(q k^T / sqrt(d_head) +
    mask)`` ``[B, H, T, S]`` (kept in :attr:`probs`, with autograd) and
    ``out = out_proj(concat_heads(P v))``: the module's own output (dropout is off in eval mode).
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.bias_k is not None or mha.bias_v is not None or mha.add_zero_attn:
            raise ValueError("ExplicitAttention: add_bias_kv / add_zero_attn attention is not supported")
        self.mha = mha
        self.probs: Tensor | None = None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None, **_: object) -> tuple[Tensor, None]:
        m = self.mha
        if key_padding_mask is not None:
            raise ValueError("ExplicitAttention: key_padding_mask is not supported")
        if not m.batch_first:  # [T, B, E] -> [B, T, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if m._qkv_same_embed_dim:
            w_q, w_k, w_v = m.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        b_q, b_k, b_v = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)
        b, t, e = query.shape
        heads = m.num_heads
        d = e // heads
        q = nn.functional.linear(query, w_q, b_q).view(b, t, heads, d).transpose(1, 2)
        k = nn.functional.linear(key, w_k, b_k).view(b, -1, heads, d).transpose(1, 2)
        v = nn.functional.linear(value, w_v, b_v).view(b, -1, heads, d).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # [B, H, T, S]
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(b, heads, t, -1)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        self.probs = scores.softmax(dim=-1)
        out = m.out_proj((self.probs @ v).transpose(1, 2).reshape(b, t, e))
        return (out if m.batch_first else out.transpose(0, 1)), None


class OpenClipRollout(Localiser):
    """Gradient-weighted attention rollout on an open_clip CLIP model's ViT image tower.

    The feature is ``model.encode_image(x, normalize=False)`` ``[1, embed_dim]`` (the stored
    stream feature: the class token after ``ln_post``, times ``proj``); the last ``layers``
    residual blocks' attention is replaced by :class:`ExplicitAttention` (same outputs) to read
    ``A [1, H, T, T]`` with ``T = 1 + gh * gw`` (class token first). ValueError naming ``name``
    for towers this does not apply to (ModifiedResNet, timm, no class-token readout, attentional
    pooling, custom blocks).
    """

    def __init__(self, model, preprocess: Callable[[Image.Image], Tensor],
                 box: Callable[[int, int], tuple[float, float, float, float]], layers: int = 1,
                 name: str = "openclip") -> None:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        if layers < 1:
            raise ValueError(f"OpenClipRollout: layers must be >= 1, got {layers}")
        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"localise: {name}: the image tower is {type(visual).__name__}, not an open_clip "
                             "VisionTransformer; attention rollout needs a ViT (no heat-map method for it)")
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.output_tokens:
            raise ValueError(f"localise: {name}: the ViT's feature is not its class token (pool_type="
                             f"{visual.pool_type!r}, attentional pooler: {visual.attn_pool is not None}); "
                             "rollout reads the class token's row")
        blocks = list(visual.transformer.resblocks)
        if not all(type(b) is ResidualAttentionBlock for b in blocks):
            kinds = sorted({type(b).__name__ for b in blocks})
            raise ValueError(f"localise: {name}: blocks {', '.join(kinds)} are not supported (only open_clip's "
                             "ResidualAttentionBlock with nn.MultiheadAttention)")
        if layers > len(blocks):
            raise ValueError(f"localise: {name}: layers={layers} but the ViT has {len(blocks)} blocks")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.attentions: list[ExplicitAttention] = []
        for block in blocks[-layers:]:
            block.attn = ExplicitAttention(block.attn)
            self.attentions.append(block.attn)
        self.patch = tuple(int(v) for v in visual.patch_size)
        self._preprocess, self._box, self.layers = preprocess, box, layers

    def preprocess(self, image: Image.Image) -> Tensor:
        return self._preprocess(image)

    def view_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        return self._box(width, height)

    def feature(self, x: Tensor) -> Tensor:
        """``x [B, 3, H, W]`` -> ``[B, embed_dim]``: ``encode_image(x, normalize=False)`` as float32."""
        return self.model.encode_image(x, normalize=False).float()

    def heat(self, x: Tensor, target: Target) -> tuple[np.ndarray, float]:
        x = x.detach().requires_grad_(True)  # the weights are frozen: the graph starts at the input
        value = target(self.feature(x))
        attentions = [a.probs for a in self.attentions]
        grads = torch.autograd.grad(value, attentions, allow_unused=True)
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(attentions, grads, strict=True)]
        r = gradient_rollout([a.detach() for a in attentions], grads)
        grid = (x.shape[2] // self.patch[0], x.shape[3] // self.patch[1])
        return cls_patch_map(r, 1, grid)[0].detach().cpu().numpy(), float(value.detach())


def openclip_box(size: tuple[int, int], resize_mode: str, name: str = "openclip"
                 ) -> Callable[[int, int], tuple[float, float, float, float]]:
    """The view box of open_clip's validation transform for a square input ``size``:
    ``shortest`` (shorter side to the size, centre crop: :func:`centre_crop_box`), ``longest``
    (longer side to the size, centred padding: :func:`letterbox_box`) or ``squash`` (the whole
    image resized)."""
    h, w = (int(v) for v in size)
    if h != w:
        raise ValueError(f"localise: {name}: non-square input size {h} x {w} is not supported")
    if resize_mode == "shortest":
        return lambda width, height: centre_crop_box(width, height, h, h)
    if resize_mode == "longest":
        return letterbox_box
    if resize_mode == "squash":
        return lambda width, height: (0.0, 0.0, float(width), float(height))
    raise ValueError(f"localise: {name}: unknown open_clip resize_mode {resize_mode!r}")


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
    return GradCAM(model.extract_features, ex.preprocess_image, lambda w, h: centre_crop_box(w, h, R, C), model=model)


def _openclip(spec: str, layers: int) -> OpenClipRollout:
    from sparc.features.registry import build_extractor

    ex = build_extractor(spec, "image")
    cfg = ex.preprocess_cfg
    size = cfg.get("size", ex.model.visual.image_size)
    size = (size, size) if isinstance(size, int) else tuple(size)
    box = openclip_box(size, str(cfg.get("resize_mode", "shortest")), spec)
    return OpenClipRollout(ex.model.cpu(), ex.preprocess_image, box, layers=layers, name=spec)


def build_localiser(spec: str, layers: int = 1) -> Localiser:
    """The localiser of an image stream's model spec (see the module docstring), on the CPU
    (:meth:`Localiser.to` moves it)."""
    family = parse_spec(spec).family
    if family == "imgfocus":
        return _imgfocus(layers)
    if family == "dinov2":
        return _dinov2(spec, layers)
    if family == "efficientnet":
        return _efficientnet(spec)
    if family == "openclip":
        return _openclip(spec, layers)
    raise ValueError(f"localise: no heat-map method for {spec!r} (supported families: {', '.join(SUPPORTED)})")
