"""OpenCLIP image and text features through ``open_clip`` (``openclip:<model>[@<weights>]``).

The stream's input picks the tower: ``image`` -> ``encode_image``, ``caption`` -> ``encode_text``,
both with ``normalize=False`` (projected, un-normalised embeddings, ``[B, embed_dim]``; 768 for
ViT-L-14). Every form below ends in the same ``open_clip.create_model_and_transforms`` call:

==========================================  ==================================================
spec                                        what loads
==========================================  ==================================================
``openclip:ViT-L-14@datacomp_xl_s13b_b90k``  built-in architecture + pretrained tag (the paper's
                                            model; fetched through the Hugging Face cache)
``openclip:ViT-L-14@/path/weights.pt``       built-in architecture + local checkpoint file
``openclip:/path/cfg.json@/path/weights.pt``  local model config JSON + local checkpoint file
``openclip:/path/dir``                       ``local-dir:``: ``open_clip_config.json`` + weights
``openclip:hf-hub:org/repo``                 config and weights of a hub repository
``openclip:ViT-L-14@datacomp_xl_s13b_b90k``  the architecture and the tag's preprocessing, random
``?weights=random``                          weights (no download; ``@tag`` optional;
                                            :mod:`sparc.features.random_weights`)
==========================================  ==================================================

A config JSON holds an OpenCLIP model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) or an
``open_clip_config.json``-style ``{"model_cfg": ..., "preprocess_cfg": ...}``; it is registered
with open_clip under ``<file stem>-<content hash>`` so it never shadows a built-in architecture.

Images use the model's validation transform (for ViT-L-14: shorter side to 224 bicubic, centre
crop 224, OpenAI CLIP mean/std); captions use the model's tokenizer, truncated to its context
length (77 tokens for ViT-L-14), and how many were is counted into the stream's metadata
(``truncated_captions``, :func:`tokenize_counted`).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sparc.catalog import ModelSpec
from sparc.features.base import TRUNCATED, Extractor, hub_offline
from sparc.features.random_weights import seeded

HF_WEIGHTS = "open_clip_pytorch_model.bin"
PREPROCESS_KEYS = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
                   "resize_mode": "image_resize_mode"}


def register_config(path: Path) -> tuple[str, dict]:
    """Register the model config JSON at ``path`` with open_clip.

    Returns ``(architecture name, create_model_and_transforms keyword overrides)`` where the
    overrides carry the file's ``preprocess_cfg`` (mean, std, interpolation, resize_mode).
    """
    from open_clip import factory

    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"openclip: cannot read model config {path}: {err}") from err
    model_cfg = raw.get("model_cfg", raw) if isinstance(raw, dict) else None
    if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"openclip: {path} is not an OpenCLIP model config (needs embed_dim, vision_cfg, text_cfg)")
    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{path.stem}-{digest}".replace("/", "-")
    factory._MODEL_CONFIGS[name] = model_cfg
    overrides = {
        PREPROCESS_KEYS[k]: v for k, v in raw.get("preprocess_cfg", {}).items() if k in PREPROCESS_KEYS
    }
    return name, overrides


def tag_overrides(cfg: dict) -> dict:
    """A pretrained tag's preprocessing (mean, std, interpolation, resize mode) and QuickGELU, from
    its ``open_clip.get_pretrained_cfg``, as ``create_model_and_transforms`` keyword overrides."""
    overrides = {PREPROCESS_KEYS[k]: cfg[k] for k in PREPROCESS_KEYS if k in cfg}
    if cfg.get("quick_gelu"):
        overrides["force_quick_gelu"] = True
    return overrides


def cached_tag(arch: str, tag: str) -> tuple[str, str, dict]:
    """Resolve pretrained ``tag`` of built-in ``arch`` to its file in the Hugging Face cache.

    Returns ``(arch, checkpoint path, overrides)`` with the tag's preprocessing (mean, std,
    interpolation, resize mode, QuickGELU) as keyword overrides, so a cached checkpoint loads
    without touching the network. When it is not cached: ``(arch, tag, {})`` (open_clip downloads
    it), or ValueError when ``HF_HUB_OFFLINE`` is set.
    """
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = hub.rstrip("/"), HF_WEIGHTS
        if not hub.endswith("/"):
            repo, filename = hub.rsplit("/", 1)
        stem = filename.rsplit(".", 1)[0]
        for candidate in (f"{stem}.safetensors", filename):
            found = try_to_load_from_cache(repo, candidate)
            if isinstance(found, str):
                return arch, found, tag_overrides(cfg)
    if hub_offline():
        raise ValueError(
            f"openclip: weights {tag!r} of {arch} are not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download {hub or cfg.get('url')} elsewhere and give the file as openclip:{arch}@/path/to/file"
        )
    return arch, tag, {}


def check_architecture(name: str) -> None:
    """ValueError unless ``name`` is one of open_clip's built-in architectures (with close names)."""
    import open_clip

    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"openclip: unknown model {name!r}{hint}; use a built-in architecture or a config JSON")


def resolve_model(name: str, weights: str | None) -> tuple[str, str | None, dict]:
    """``(model_name, pretrained, overrides)`` for ``create_model_and_transforms`` from a spec's
    name and weights; ValueError naming an unknown architecture, tag or missing file."""
    import open_clip

    path = Path(name).expanduser()
    if name.startswith("hf-hub:") or path.is_dir():
        if weights:
            raise ValueError(f"openclip: {name!r} brings its own weights; drop '@{weights}'")
        return (name if name.startswith("hf-hub:") else f"local-dir:{path}"), None, {}
    if name.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ValueError(f"openclip: model config {name!r} does not exist")
        arch, overrides = register_config(path)
        known_tags: list[str] = []
    else:
        check_architecture(name)
        arch, overrides = name, {}
        known_tags = open_clip.list_pretrained_tags_by_model(name)
    if not weights:
        raise ValueError(
            f"openclip: {name!r} needs @weights: a pretrained tag ({', '.join(known_tags) or 'none known'}) "
            f"or a local checkpoint file"
        )
    if Path(weights).expanduser().is_file():
        return arch, str(Path(weights).expanduser()), overrides
    if weights in known_tags:
        return cached_tag(arch, weights)
    raise ValueError(
        f"openclip: weights {weights!r} for {name!r} are neither a local file nor a known pretrained tag "
        f"(known: {', '.join(known_tags) or 'none; give a checkpoint file'})"
    )


def resolve_random(name: str, weights: str | None) -> tuple[str, dict]:
    """``(model_name, overrides)`` for ``create_model_and_transforms(..., pretrained=None)`` with
    ``weights=random``: a built-in architecture or a config JSON, with the preprocessing of
    pretrained tag ``weights`` when one is given (its weights are not loaded); ValueError for a
    model directory or a hub model (they bring weights), a checkpoint file, or an unknown name."""
    import open_clip

    path = Path(name).expanduser()
    if name.startswith("hf-hub:") or path.is_dir():
        raise ValueError(f"openclip: weights=random takes a built-in architecture or a config JSON, not {name!r}")
    if name.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ValueError(f"openclip: model config {name!r} does not exist")
        arch, overrides = register_config(path)
    else:
        check_architecture(name)
        arch, overrides = name, {}
    if not weights:
        return arch, overrides
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if weights not in tags:
        raise ValueError(
            f"openclip: weights=random: @{weights} is not a pretrained tag of {name!r} (known: "
            f"{', '.join(tags) or 'none'}); with random weights a tag gives only its preprocessing"
        )
    return arch, {**overrides, **tag_overrides(open_clip.get_pretrained_cfg(arch, weights))}


def tokenize_counted(tokenizer, texts: list[str]) -> tuple[torch.Tensor, int]:
    """``(tokenizer(texts), how many texts were cut)``: token ids ``[B, C]`` at the tokenizer's
    context length C, and the number of texts longer than C tokens (start and end included).

    Such a text is cut to C with its end token in the last place, where at context C + 1 a text
    token still stands; a text that fits encodes to the same first C ids at either context. So a
    text was cut iff its first C ids at C + 1 differ from its ids at C. For open_clip's
    ``SimpleTokenizer`` (CLIP's: pads with 0, cuts to the first C ids and puts the end token last)
    the ids at C are the first C at C + 1 with the end token last where position C is not padding,
    so the texts are tokenised once; other tokenizers tokenise twice.
    """
    from open_clip.tokenizer import SimpleTokenizer

    context = int(tokenizer.context_length)
    longer = tokenizer(texts, context_length=context + 1)
    if type(tokenizer) is SimpleTokenizer and tokenizer.reduction_fn is None:
        cut = longer[:, context] != 0
        tokens = longer[:, :context].clone()
        tokens[cut, -1] = tokenizer.eot_token_id
        return tokens, int(cut.sum())
    tokens = tokenizer(texts)
    return tokens, int((longer[:, :context] != tokens).any(dim=1).sum())


class OpenClipExtractor(Extractor):
    """OpenCLIP image tower (input ``image``) or text tower (input ``caption``), un-normalised."""

    def __init__(self, spec: ModelSpec, input: str, device: str = "cpu") -> None:
        super().__init__(spec, input, device)
        import open_clip

        random = spec.option("weights") == "random"
        if random:
            (model_name, overrides), pretrained = resolve_random(spec.name, spec.weights), None
        else:
            model_name, pretrained, overrides = resolve_model(spec.name, spec.weights)
        try:
            with seeded() if random else nullcontext():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=pretrained, device=self.device, **overrides
                )
        except Exception as err:  # open_clip / torch.load raise many types for bad files
            raise ValueError(f"openclip: cannot load {spec}: {err}") from err
        if random:
            self.random_origin = f"open_clip architecture {model_name}"
        self.model = model.eval()
        self.model_name = model_name
        self.preprocess = preprocess
        self.preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}))
        self.tokenizer = open_clip.get_tokenizer(model_name) if input == "caption" else None
        self.dim = int(open_clip.get_model_config(model_name)["embed_dim"])

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)

    def collate(self, items: list[Any]) -> torch.Tensor:
        """Images -> ``[B, 3, H, W]``; captions -> token ids ``[B, context_length]`` (truncated)."""
        if self.input == "caption":
            return self.tokenizer(list(items))
        return torch.stack(items)

    def collate_counted(self, items: list[Any]) -> tuple[torch.Tensor, dict[str, int]]:
        """:meth:`collate`; for captions also ``{"truncated_captions": captions cut to the context}``."""
        if self.input != "caption":
            return self.collate(items), {}
        tokens, cut = tokenize_counted(self.tokenizer, list(items))
        return tokens, {TRUNCATED: cut}

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` or ``[B, context_length]`` -> ``[B, embed_dim]`` (not normalised)."""
        x = batch.to(self.device, non_blocking=True)
        if self.input == "caption":
            return self.model.encode_text(x, normalize=False).float().cpu()
        return self.model.encode_image(x, normalize=False).float().cpu()

    def preprocessing(self) -> dict:
        if self.input == "caption":
            return {
                "tokenizer": type(self.tokenizer).__name__,
                "context_length": int(getattr(self.tokenizer, "context_length", 0) or 0),
                "truncate": True,
                "normalised": False,
            }
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.preprocess_cfg.items()}
        return dict(cfg, transform=repr(self.preprocess), alpha="composited onto white", normalised=False)
