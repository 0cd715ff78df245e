"""The extractor registry: a stream's model spec (:mod:`sparc.catalog`, which documents the families
and their options) to the extractor that runs it."""

from __future__ import annotations

import importlib

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
