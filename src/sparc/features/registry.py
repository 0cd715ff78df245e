"""The extractor registry: a stream's model spec (:mod:`sparc.catalog`, which documents the families
and their options) to the extractor that runs it."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np

from sparc.catalog import FAMILIES, check_spec


def build_extractor(spec: str, input: str, device: str = "cpu"):
    """Instantiate the extractor for ``spec`` reading ``input`` on ``device`` (auto | cpu | cuda[:N]).

    Returns a :class:`sparc.features.base.Extractor`; ValueError for an unknown model, weights that
    cannot be found, or an input the model cannot read.
    """
    parsed = check_spec(spec, input)
    if FAMILIES[parsed.family].precomputed:
        raise ValueError(f"model spec {spec!r}: precomputed features, not a model that can be run")
    module, cls = FAMILIES[parsed.family].target.split(":")
    return getattr(importlib.import_module(module), cls)(parsed, input=input, device=device)


def caption_embedder(spec: str, batch_size: int = 256, device: str = "cpu") -> Callable[[Sequence[str]], np.ndarray]:
    """Texts -> ``[n, d]`` float32 features of the caption model ``spec`` on ``device``, computed as
    the extract stage does (``embed(collate(texts))``, inference mode, in batches of
    ``batch_size``) and rounded to float16 as the feature store keeps them."""
    import torch

    extractor = build_extractor(spec, "caption", device=device)

    def embed(texts: Sequence[str]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = extractor.collate(list(texts[start : start + batch_size]))
                out.append(extractor.embed(batch).float().cpu().numpy())
        return np.concatenate(out).astype(np.float16).astype(np.float32)

    return embed
