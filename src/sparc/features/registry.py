"""Model specs and the extractor registry.

A stream's model is a spec string ``family:name[@weights]``:

=============  ===========================================  ==================
family         example                                      inputs
=============  ===========================================  ==================
dinov2         dinov2:facebook/dinov2-with-registers-large  image
               dinov2:/path/to/saved/model  (local dir)
openclip       openclip:ViT-L-14@datacomp_xl_s13b_b90k      image, caption
               openclip:/path/cfg.json@/path/weights.pt
efficientnet   efficientnet:lite0                           image
imgfocus       imgfocus:vit-s14                             image
minilm         minilm:all-MiniLM-L6-v2  (or a local dir)    caption
=============  ===========================================  ==================

Modules are imported only when an extractor is built, so validating params stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    target: str  # "module:Class"
    inputs: frozenset[str]


FAMILIES: dict[str, Family] = {
    "dinov2": Family("sparc.features.dinov2:Dinov2Extractor", frozenset({"image"})),
    "openclip": Family("sparc.features.openclip:OpenClipExtractor", frozenset({"image", "caption"})),
    "efficientnet": Family("sparc.features.offline:EfficientNetExtractor", frozenset({"image"})),
    "imgfocus": Family("sparc.features.offline:ImgFocusExtractor", frozenset({"image"})),
    "minilm": Family("sparc.features.offline:MiniLMExtractor", frozenset({"caption"})),
}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``family:name[@weights]`` spec."""

    family: str
    name: str
    weights: str | None = None

    def __str__(self) -> str:
        return f"{self.family}:{self.name}" + (f"@{self.weights}" if self.weights else "")


def parse_spec(spec: str) -> ModelSpec:
    """Parse ``family:name[@weights]``; ValueError naming the problem otherwise."""
    family, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"model spec {spec!r} is not of the form family:name[@weights]")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} in {spec!r} (known: {', '.join(sorted(FAMILIES))})")
    name, _, weights = rest.partition("@")
    if not name:
        raise ValueError(f"model spec {spec!r} has no model name")
    return ModelSpec(family, name, weights or None)


def check_spec(spec: str, input: str) -> ModelSpec:
    """Parse ``spec`` and check its family can read ``input`` (image | caption)."""
    parsed = parse_spec(spec)
    inputs = FAMILIES[parsed.family].inputs
    if input not in inputs:
        raise ValueError(
            f"model family {parsed.family!r} reads {' or '.join(sorted(inputs))}, not {input!r}"
        )
    return parsed


def build_extractor(spec: str, input: str, device: str = "cpu"):
    """Instantiate the extractor for ``spec`` reading ``input`` on ``device``."""
    parsed = check_spec(spec, input)
    module, cls = FAMILIES[parsed.family].target.split(":")
    return getattr(importlib.import_module(module), cls)(parsed, input=input, device=device)
