"""Any Hugging Face ``transformers`` model as a stream: ``transformers:<hub name or directory>[?options]``.

The model loads with ``AutoModel.from_pretrained`` in float32, from a hub name or a directory
written by ``save_pretrained`` (the same call either way; hub names are read from the local cache
first, see :func:`sparc.features.base.hub_source`), with its own preprocessing from the same place:
``AutoImageProcessor`` for image streams, ``AutoTokenizer`` for caption streams. What runs:

* a dual encoder (a model with ``get_image_features`` and ``get_text_features``: CLIP, SigLIP,
  ALIGN...): the stream's input picks the tower, ``image`` -> ``vision_model`` /
  ``get_image_features``, ``caption`` -> ``text_model`` / ``get_text_features``;
* any other model reads its ``main_input_name``: ``pixel_values`` (ViT, DINOv2...) for image
  streams, ``input_ids`` (BERT, RoBERTa, GPT-2...) for caption streams.

Options (``python -m sparc check`` validates them without loading anything):

==============  ===================================================================================
``pool``        ``auto`` (default): ``embed`` for a dual encoder without ``layer``; otherwise ``cls``
                for an image model with a CLS token, else ``mean``.
                ``cls``: token 0 (images: the CLS token, which the model must have; captions: the
                first token, which must be a special token such as BERT's [CLS]).
                ``mean``: the mean of the content tokens: the patch tokens of an image (CLS and
                register tokens excluded), the tokens of a caption that are neither special tokens
                nor padding.
                ``pooler``: the tower's ``pooler_output``, unprojected (BERT's and ViT's tanh head,
                CLIP's final-norm CLS / end token, SigLIP's attention-pooling head).
                ``embed``: ``get_image_features`` / ``get_text_features`` of a dual encoder (CLIP:
                the projected embedding; SigLIP: the pooled output).
``layer=N``     ``hidden_states[N]`` as ``output_hidden_states=True`` returns it (0 = the embedding
                output, N = the output of block N; the last block's is before any final norm)
                instead of ``last_hidden_state``; with ``pool`` auto, cls or mean. N at most the
                number of blocks (checked when the model loads).
``norm``        ``false`` (default) | ``true``: apply the tower's final norm (its child module
                ``layernorm``, ``post_layernorm``, ``final_layer_norm``, ``final_layernorm``,
                ``ln_f`` or ``norm``) to ``hidden_states[N]`` before pooling; only with ``layer``.
``max_length``  captions only: tokens kept, special tokens included (default: the model's limit,
                the smaller of the tokenizer's ``model_max_length`` and ``max_position_embeddings``).
                Longer captions are cut, and counted in the stream's ``meta.json``
                (``counts.truncated_captions``).
``weights``     ``pretrained`` (default) | ``random``: the model's architecture, processor and tokenizer
                from the directory, the cache or a built-in copy of the hub config, randomly
                initialised, with no network (:mod:`sparc.features.random_weights`).
==============  ===================================================================================

Without ``layer``, tokens are ``last_hidden_state`` as the model returns it: after the final norm
for ViT, DINOv2, SigLIP and CLIP's text tower; CLIP's vision tower applies its ``post_layernorm``
to the pooled CLS token only (``pool=pooler``). For ViT and DINOv2, ``layer=<last>&norm=true``
gives the same tokens as no ``layer``.

Image token layout: with patch size p and H x W pixels the model has P = (H / p)(W / p) patch
tokens and T - P leading tokens; T - P = 1 + R (R = the config's ``num_register_tokens``, as in
DINOv2 with registers) is a CLS token then R registers, T - P = R is no CLS token (SigLIP). Other
layouts (no patch size, or hierarchical models such as Swin): ``mean`` over all tokens and no
``cls``. Convolutional feature maps ``[B, C, h, w]``: ``mean`` over the positions.

Captions are padded to the longest in the batch, except for SigLIP text towers, which pool the
last position and were trained on captions padded to the full length: padded to ``max_length``.
A tokenizer without a padding token (decoder-only models such as GPT-2) pads with its end token,
which the attention mask and ``mean`` leave out.

The feature dimension is read from the model: the width of the feature of one probe input (a grey
image or a short caption), embedded when the extractor is built; the probe also checks the options
against the model, so a wrong option fails before the first batch.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from PIL import Image

from sparc.catalog import ModelSpec
from sparc.features.base import (
    TRUNCATED,
    Extractor,
    count_truncated,
    hub_source,
    source_description,
)
from sparc.features.random_weights import config_source, seeded

TOWERS = {"image": "vision_model", "caption": "text_model"}
FEATURES = {"image": "get_image_features", "caption": "get_text_features"}
MAIN_INPUTS = {"image": "pixel_values", "caption": "input_ids"}
NORM_NAMES = ("layernorm", "post_layernorm", "final_layer_norm", "final_layernorm", "ln_f", "norm")
# Text towers that pool a fixed position and were trained on captions padded to the full length.
PAD_TO_MAX_LENGTH = ("siglip", "siglip_text_model", "siglip2", "siglip2_text_model")
# Limits above this are "no limit" sentinels (transformers uses 1e30 for model_max_length).
NO_LIMIT = 10**6
PROBE_CAPTION = "a photo of a cat"
PROBE_IMAGE = (224, 224, (128, 128, 128))


def is_dual_encoder(model: torch.nn.Module) -> bool:
    """True for models with both ``get_image_features`` and ``get_text_features`` (CLIP, SigLIP...)."""
    return all(callable(getattr(model, name, None)) for name in FEATURES.values())


def patch_grid(config: Any, height: int, width: int) -> int | None:
    """Patch tokens of an ``height x width`` input, ``(height // p) * (width // p)`` for the
    config's ``patch_size`` p (an int or a pair); None when the config has none."""
    size = getattr(config, "patch_size", None)
    if isinstance(size, int) and size > 0:
        return (height // size) * (width // size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return (height // size[0]) * (width // size[1])
    return None


class TransformersExtractor(Extractor):
    """A ``transformers`` model (or one tower of a dual encoder) pooled as the spec's options say
    (module docstring); ``dim`` is the probed feature width."""

    def __init__(self, spec: ModelSpec, input: str, device: str = "cpu") -> None:
        super().__init__(spec, input, device)
        if spec.option("weights") == "random":
            with config_source(spec.name, "transformers") as (self.source, origin):
                self.local_only = True
                self._build(origin)
        else:
            self.source, self.local_only = hub_source(spec.name, "transformers")
            self._build("")

    def _build(self, random_origin: str) -> None:
        """Load the config, the model (pretrained, or random weights when ``random_origin`` names
        where the config came from) and its processor or tokenizer from ``self.source``; probe it."""
        from transformers import AutoConfig, AutoModel

        spec, input = self.spec, self.input
        config = self._load("model", AutoConfig)
        if random_origin:
            with seeded():
                model = AutoModel.from_config(config, dtype=torch.float32)
            self.random_origin = random_origin
        else:
            model = self._load("weights", AutoModel, dtype=torch.float32)
        self.model = model.eval().to(self.device)
        self.model_type = str(config.model_type)
        self.dual = is_dual_encoder(model)
        self.layer = spec.int_option("layer")
        self.norm = spec.option("norm") == "true"
        requested = spec.option("pool")
        self.pool = "embed" if requested == "auto" and self.dual and self.layer is None else requested
        self.tower_name = self._find_tower()
        tower = self._tower()
        self.norm_name = self._find_norm(tower) if self.norm else ""
        self.processor = self.tokenizer = None
        self.max_length, self.padding = 0, ""
        if input == "image":
            from transformers import AutoImageProcessor

            self.processor = self._load("image processor", AutoImageProcessor)
        else:
            from transformers import AutoTokenizer

            self.tokenizer = self._load("tokenizer", AutoTokenizer)
            if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
                self.tokenizer.pad_token = self.tokenizer.eos_token  # decoder-only models (GPT-2)
            self.max_length = self._max_length(tower.config)
            pad_full = {self.model_type, str(getattr(tower.config, "model_type", ""))} & set(PAD_TO_MAX_LENGTH)
            self.padding = "max_length" if pad_full else "longest"
        self.skip_tokens, self.has_cls = 0, False
        self.registers = int(getattr(tower.config, "num_register_tokens", 0) or 0)
        probe = self.collate([self._probe_item()])
        with torch.inference_mode():
            if self.pool != "embed":
                self._inspect(probe)
            self.dim = int(self.embed(probe).shape[1])

    # -- loading -----------------------------------------------------------------------------

    def _load(self, what: str, loader: Any, **kwargs: Any) -> Any:
        """``loader.from_pretrained`` of this model's source; ValueError naming what and where."""
        try:
            return loader.from_pretrained(self.source, local_files_only=self.local_only, **kwargs)
        except Exception as err:  # transformers / huggingface_hub raise many types here
            where = source_description(self.source, self.local_only)
            raise ValueError(f"transformers: cannot load the {what} of {self.spec.name!r} from {where}: {err}") from err

    def _find_tower(self) -> str:
        """The attribute of the module that reads this stream's input ('' = the model itself)."""
        if self.dual:
            name = TOWERS[self.input]
            if isinstance(getattr(self.model, name, None), torch.nn.Module):
                return name
            if self.pool != "embed":
                raise ValueError(
                    f"transformers: {self.spec.name!r} ({self.model_type}) has no {name} module; "
                    f"only pool=embed ({FEATURES[self.input]}) reads it"
                )
            return ""
        reads = getattr(self.model, "main_input_name", "")
        if reads != MAIN_INPUTS[self.input]:
            raise ValueError(
                f"transformers: {self.spec.name!r} is a {self.model_type!r} model that reads {reads!r}, "
                f"not {MAIN_INPUTS[self.input]!r}: it cannot read {self.input} streams"
            )
        if self.pool == "embed":
            raise ValueError(
                f"transformers: pool=embed needs a dual encoder (get_image_features and get_text_features); "
                f"{self.spec.name!r} ({self.model_type}) is not one: use pool=cls, mean or pooler"
            )
        return ""

    def _tower(self) -> torch.nn.Module:
        return getattr(self.model, self.tower_name) if self.tower_name else self.model

    def _find_norm(self, tower: torch.nn.Module) -> str:
        children = dict(tower.named_children())
        for name in NORM_NAMES:
            if isinstance(children.get(name), torch.nn.Module):
                return name
        raise ValueError(
            f"transformers: norm=true but {self.spec.name!r} ({self.model_type}) has no final norm "
            f"(no child module named {', '.join(NORM_NAMES)}); use norm=false"
        )

    def _max_length(self, tower_config: Any) -> int:
        """The ``max_length`` option, or the model's token limit; ValueError when the option
        exceeds it or no limit is known."""
        limits = [
            n for n in (getattr(self.tokenizer, "model_max_length", None),
                        getattr(tower_config, "max_position_embeddings", None))
            if isinstance(n, int) and 0 < n < NO_LIMIT
        ]
        given = self.spec.int_option("max_length")
        if limits and given is not None and given > min(limits):
            raise ValueError(f"transformers: max_length={given} exceeds the {min(limits)} tokens of {self.spec.name!r}")
        if given is not None:
            return given
        if not limits:
            raise ValueError(f"transformers: {self.spec.name!r} states no token limit; set max_length=N in the spec")
        return min(limits)

    # -- probing -----------------------------------------------------------------------------

    def _probe_item(self) -> Any:
        if self.input == "image":
            width, height, colour = PROBE_IMAGE
            return self.preprocess_image(Image.new("RGB", (width, height), colour))
        return PROBE_CAPTION

    def _inspect(self, probe: Any) -> None:
        """Read the token layout from one forward pass of ``probe``, resolve ``pool=auto`` and
        check ``pool``, ``layer`` and the output kinds against the model (ValueError otherwise)."""
        inputs, special = self._model_inputs(probe)
        out = self._tower()(**inputs, output_hidden_states=self.layer is not None)
        name = f"{self.spec.name!r} ({self.model_type})"
        if self.layer is not None:
            states = getattr(out, "hidden_states", None)
            if not states:
                raise ValueError(f"transformers: {name} returns no hidden states; drop layer")
            if self.layer >= len(states):
                raise ValueError(f"transformers: layer={self.layer} but {name} has hidden states 0..{len(states) - 1}")
        tokens = out.last_hidden_state
        if self.input == "image" and tokens.ndim == 3:
            height, width = probe.shape[-2:]
            patches = patch_grid(self._tower().config, height, width)
            lead = None if patches is None else tokens.shape[1] - patches
            self.has_cls = lead == self.registers + 1
            self.skip_tokens = lead if lead in (self.registers, self.registers + 1) else 0
        elif self.input == "caption":
            self.has_cls = bool(special[0, 0])
        if self.pool == "auto":
            self.pool = "cls" if self.input == "image" and self.has_cls else "mean"
        if self.pool == "pooler" and not isinstance(getattr(out, "pooler_output", None), torch.Tensor):
            raise ValueError(f"transformers: {name} has no pooler_output; use pool=cls or pool=mean")
        if self.pool == "cls" and (tokens.ndim != 3 or not self.has_cls):
            what = "its first token is not a special token" if self.input == "caption" else "it has no CLS token"
            raise ValueError(f"transformers: pool=cls but {name}: {what}; use pool=mean")

    # -- extraction --------------------------------------------------------------------------

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def collate(self, items: list[Any]) -> Any:
        """Images -> ``[B, 3, H, W]``; captions -> the tokenizer's tensors (padded, truncated to
        ``max_length``) plus ``special_tokens_mask``."""
        return self.collate_counted(items)[0]

    def collate_counted(self, items: list[Any]) -> tuple[Any, dict[str, int]]:
        """:meth:`collate`; for captions also ``{"truncated_captions": captions cut to max_length}``."""
        if self.input == "image":
            return torch.stack(items), {}
        texts = list(items)
        encoded = self.tokenizer(
            texts, padding=self.padding, truncation=True, max_length=self.max_length,
            return_tensors="pt", return_special_tokens_mask=True,
        )
        return dict(encoded), {TRUNCATED: count_truncated(self.tokenizer, texts, encoded, self.max_length)}

    def _model_inputs(self, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """(keyword inputs of the forward pass on the device, the captions' special-token mask)."""
        if self.input == "image":
            return {"pixel_values": batch.to(self.device, non_blocking=True)}, None
        tensors = dict(batch)
        special = tensors.pop("special_tokens_mask")
        return {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}, special

    def embed(self, batch: Any) -> torch.Tensor:
        """One batch -> ``[B, dim]`` float32 on CPU, as ``pool``, ``layer`` and ``norm`` say."""
        inputs, special = self._model_inputs(batch)
        if self.pool == "embed":
            out = getattr(self.model, FEATURES[self.input])(**inputs)
            return (out if isinstance(out, torch.Tensor) else out.pooler_output).float().cpu()
        tower = self._tower()
        out = tower(**inputs, output_hidden_states=self.layer is not None)
        if self.pool == "pooler":
            return out.pooler_output.flatten(1).float().cpu()
        tokens = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
        if self.norm_name:
            tokens = getattr(tower, self.norm_name)(tokens)
        return self._pool_tokens(tokens, inputs, special).float().cpu()

    def _pool_tokens(
        self, tokens: torch.Tensor, inputs: dict[str, torch.Tensor], special: torch.Tensor | None
    ) -> torch.Tensor:
        """``[B, T, d]`` tokens (or ``[B, d, h, w]`` maps) -> ``[B, d]``: token 0 (``cls``) or the mean
        of the content tokens, ``sum_t m_t x_t / max(sum_t m_t, 1)`` for captions with ``m_t`` = 1 on
        tokens that are attended and not special."""
        if tokens.ndim == 4:
            return tokens.mean(dim=(2, 3))
        if self.pool == "cls":
            return tokens[:, 0]
        if self.input == "image":
            return tokens[:, self.skip_tokens :].mean(dim=1)
        mask = 1 - special.to(tokens.device)
        if "attention_mask" in inputs:
            mask = mask * inputs["attention_mask"]
        mask = mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    def preprocessing(self) -> dict:
        base = {
            "model_type": self.model_type,
            "tower": self.tower_name or None,
            "pool": self.pool,
            "layer": self.layer,
            "norm": self.norm_name or None,
            "dtype": "float32",
        }
        if self.input == "caption":
            return dict(
                base, tokenizer=type(self.tokenizer).__name__, max_length=self.max_length,
                padding=self.padding, truncate=True,
            )
        return dict(
            base, leading_tokens=self.skip_tokens, cls_token=self.has_cls, register_tokens=self.registers,
            image_processor=json.loads(self.processor.to_json_string()), alpha="composited onto white",
        )
