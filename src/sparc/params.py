"""Typed, validated view of ``params.yaml``.

Every stage reads its parameters through :func:`load_params`, which parses the file with YAML 1.2
semantics (the same as DVC: ``1e-4`` is a float), checks every key against the dataclasses below
and raises :class:`ParamsError` with one line naming the offending parameter when a value is
unknown or out of range.

Longer than 500 lines because every group's dataclass and its value checks live in this one
module, the one place validation is promised to be (docs/development.md); a split by group would
scatter what one ``check`` reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from sparc.catalog import DATASETS, check_spec


class ParamsError(ValueError):
    """A parameter in params.yaml is missing, unknown or out of range; the message names it."""


@dataclasses.dataclass(frozen=True)
class EmojiOptions:
    skin_tones: bool = False
    size: int = 160


@dataclasses.dataclass(frozen=True)
class ClipartOptions:
    max_megapixels: float = 25.0
    min_title_chars: int = 3
    max_title_repeats: int = 20


@dataclasses.dataclass(frozen=True)
class FolderOptions:
    csv: str = ""
    hierarchy: str = ""
    strict: bool = False


OPENIMAGES_SPLITS = ("train", "validation", "test")
COCO_SPLITS = ("train2017", "val2017")


@dataclasses.dataclass(frozen=True)
class OpenImagesOptions:
    """``data.openimages``: which official splits, and the first ``max_images`` images of each
    (Localized Narratives order; 0 = all) with every narrative of those images."""

    splits: list[str] = dataclasses.field(default_factory=lambda: list(OPENIMAGES_SPLITS))
    max_images: int = 0


@dataclasses.dataclass(frozen=True)
class CocoOptions:
    """``data.coco``: which 2017 splits, the first ``max_images`` images of each (by image id;
    0 = all), and the captions: ``join`` (an image's captions joined, as the reference) or
    ``each`` (one sample per caption)."""

    splits: list[str] = dataclasses.field(default_factory=lambda: list(COCO_SPLITS))
    max_images: int = 0
    captions: Literal["join", "each"] = "join"


@dataclasses.dataclass(frozen=True)
class DataParams:
    """``data``: the dataset, its subset and split, and where its labels come from: ``labels_from``
    ``dataset`` (its own) or ``captions`` (WordNet pseudo-labels of the captions' nouns, cut to
    ``wordnet_depth`` levels below entity.n.01; any dataset, sparc.data.wordnet)."""

    dataset: str = "emoji"
    max_samples: int = 0
    split_seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    labels_from: Literal["dataset", "captions"] = "dataset"
    wordnet_depth: int = 6
    emoji: EmojiOptions = dataclasses.field(default_factory=EmojiOptions)
    clipart: ClipartOptions = dataclasses.field(default_factory=ClipartOptions)
    folder: FolderOptions = dataclasses.field(default_factory=FolderOptions)
    openimages: OpenImagesOptions = dataclasses.field(default_factory=OpenImagesOptions)
    coco: CocoOptions = dataclasses.field(default_factory=CocoOptions)


@dataclasses.dataclass(frozen=True)
class DownloadParams:
    """The `download` stage (openimages, coco): ``base_url`` '' = the real hosts, else a mirror
    of ``data/raw`` (``<base_url>/<dataset>/<path>``); ``workers`` parallel connections;
    ``cache`` the directory of the download cache ('' = ``data/raw/<dataset>.cache``, else
    ``<cache>/<dataset>``); ``checksums`` an md5sum/sha256sum file of the dataset's files ('' =
    none; sparc.data.download)."""

    base_url: str = ""
    workers: int = 16
    cache: str = ""
    checksums: str = ""


@dataclasses.dataclass(frozen=True)
class StreamParams:
    model: str
    input: Literal["image", "caption"]


@dataclasses.dataclass(frozen=True)
class ExtractParams:
    batch_size: int = 32
    num_workers: int = 1
    cpu_threads: int = 0
    device: str = "auto"
    nproc: int = 1  # processes (one per GPU on CUDA); > 1 relaunches under torchrun (sparc.distributed)


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """The `train` group; the top-level k, L, lambda, topk, method and seed also steer training."""

    batch_size: int = 256
    epochs: int = 200
    init: str = ""  # a trained SAE to start from (sparc.model.reference.load_initial); epochs 0: import only
    lr: float = 1.0e-3
    adam_eps: float = 1.0e-8
    k_aux: int = 64
    aux_coef: float = 0.03125
    dead_steps: int = 1000
    revive_every: int = 100
    checkpoint_every: int = 500
    log_every: int = 10
    ram_budget_mb: int = 4096
    cpu_threads: int = 1
    usae_update: Literal["source_only", "joint"] = "joint"
    device: str = "auto"
    nproc: int = 1  # data-parallel processes (one per GPU on CUDA); > 1 relaunches under torchrun
    precision: Literal["auto", "float32", "bf16"] = "float32"  # the dense encoder matmul (sparc.train.precision)
    tf32: bool = False
    subset_keep: float = 1.0
    consistency: float = 0.0


@dataclasses.dataclass(frozen=True)
class ConceptsParams:
    top_n: int = 50
    purity_threshold: float = 0.3
    split: Literal["train", "val", "test", "all"] = "test"
    text_words: int = 3           # caption terms kept per latent and stream (sparc.evaluate.text_names)
    text_min_score: float = 2.0   # text name only when the best term's log-odds z-score reaches this
    text_vocab: int = 20000       # the most frequent terms (uni- and bigrams) of the split's captions; 0 = all
    zero_shot_vocab: int = 0      # caption streams: name each latent by the best of this many terms; 0 = off


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 1024
    probe_min_positives: int = 20
    probe_candidates: int = 20
    probe_seed: int = 0
    device: str = "auto"


@dataclasses.dataclass(frozen=True)
class FiguresParams:
    """The `figures` stage: which latents to show and how much of each."""

    concepts: list[str] = dataclasses.field(default_factory=lambda: ["cat-face", "country-flag"])
    n_best: int = 4
    top_n: int = 6
    queries: int = 4
    thumb_px: int = 64


LOCALISE_TARGETS = ("code", "concept")
# Datasets whose prepared data keep instance masks (annotations.jsonl): localise.source auto = masks.
MASK_DATASETS = ("coco",)


@dataclasses.dataclass(frozen=True)
class LocaliseParams:
    """The `localise` stage: the composite benchmark with known masks, or a dataset's own instance
    masks (docs/localisation.md)."""

    queries: int = 200     # composite: canvases, one text query each; masks: images of the split (0 = all)
    grid: int = 2          # items per canvas side (grid x grid items)
    cell: int = 160        # cell side in pixels
    scale: float = 0.7     # item side as a fraction of the cell
    seed: int = 0          # draw of the items and queries
    split: Literal["train", "val", "test", "all"] = "test"
    target: Literal["code", "concept"] = "code"  # <z_text, z_image> | sum of the latents named after the class
    layers: int = 1        # ViT rollout over the last N layers (the paper: 1)
    overlays: int = 4      # queries drawn in the overlay figure (those with the highest targets)
    source: Literal["auto", "composite", "masks"] = "auto"  # auto: masks on MASK_DATASETS, else composite
    prompt: str = "a photo of a {}."  # masks: the query text, {} = the category name
    device: str = "auto"   # the SAE's and the localisers' device: auto (CUDA when present) | cpu | cuda | cuda:N


def localise_source(source: str, dataset: str) -> str:
    """What ``localise.source`` means on ``dataset``: ``auto`` is ``masks`` on a dataset with
    instance masks (:data:`MASK_DATASETS`) and ``composite`` otherwise; others are themselves."""
    if source == "auto":
        return "masks" if dataset in MASK_DATASETS else "composite"
    return source


@dataclasses.dataclass(frozen=True)
class Params:
    """The whole of params.yaml. ``lam`` is the YAML key ``lambda``."""

    seed: int = 0
    k: int = 16
    L: int = 512
    lam: float = 1.0
    topk: Literal["global", "local"] = "global"
    method: Literal["sparc", "usae", "usae_paper"] = "sparc"
    data: DataParams = dataclasses.field(default_factory=DataParams)
    download: DownloadParams = dataclasses.field(default_factory=DownloadParams)
    streams: dict[str, StreamParams] = dataclasses.field(default_factory=dict)
    extract: ExtractParams = dataclasses.field(default_factory=ExtractParams)
    train: TrainParams = dataclasses.field(default_factory=TrainParams)
    concepts: ConceptsParams = dataclasses.field(default_factory=ConceptsParams)
    evaluate: EvaluateParams = dataclasses.field(default_factory=EvaluateParams)
    figures: FiguresParams = dataclasses.field(default_factory=FiguresParams)
    localise: LocaliseParams = dataclasses.field(default_factory=LocaliseParams)

    @property
    def stream_names(self) -> list[str]:
        """Stream names in params.yaml order (the order every stage uses)."""
        return list(self.streams)


_YAML_KEYS = {"lam": "lambda"}


def _yaml_key(field_name: str) -> str:
    return _YAML_KEYS.get(field_name, field_name)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Convert one YAML value to the annotated type ``tp`` or raise ParamsError naming ``where``."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ParamsError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    return value


# Keys that were replaced: the full key -> how to write it now.
RENAMED = {
    "train.bf16": "replaced by train.precision (bf16: true -> precision: bf16; bf16: false -> precision: float32)",
}


def _build(cls: type, raw: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys (a :data:`RENAMED` key with
    its replacement)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{where or 'params'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {_yaml_key(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        renamed = next((f"{prefix}{key}" for key in unknown if f"{prefix}{key}" in RENAMED), None)
        if renamed is not None:
            raise ParamsError(f"{renamed}: {RENAMED[renamed]}")
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(fields)})"
        raise ParamsError(f"{prefix}{unknown[0]}: unknown parameter{hint}")
    kwargs = {}
    for key, field in fields.items():
        name = f"{where}.{key}" if where else key
        if key in raw:
            kwargs[field.name] = _convert(raw[key], hints[field.name], name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{name}: missing")
    return cls(**kwargs)


USAE_METHODS = ("usae", "usae_paper")
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def check_device_name(device: str, param: str) -> None:
    """Reject a device string torch cannot parse (``tpu``, ``gpu``...); availability is checked
    by :func:`sparc.device.resolve_device` when the stage runs."""
    import re

    if device in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", device):
        return
    raise ParamsError(f"{param}: unknown device {device!r} (use {DEVICE_HELP})")


def _positive(values: dict[str, float], group: str, minimum: float = 1) -> None:
    """ParamsError for the first ``group.name`` whose value is below ``minimum``."""
    for name, value in values.items():
        if not value >= minimum:
            raise ParamsError(f"{group}.{name}: must be >= {minimum}, got {value}")


def check_seeds(params: Params) -> None:
    """Every seed is a non-negative integer (NumPy's and PyTorch's generators refuse negative ones)."""
    seeds = {"seed": params.seed, "data.split_seed": params.data.split_seed,
             "evaluate.probe_seed": params.evaluate.probe_seed, "localise.seed": params.localise.seed}
    for name, value in seeds.items():
        if value < 0:
            raise ParamsError(f"{name}: must be a non-negative integer, got {value}")


def check_top_level(k: int, L: int, lam: float, topk: str, method: str) -> None:
    """The ablation knobs: ``1 <= k <= L``, ``lambda >= 0``, and USAE only with ``topk: local``."""
    if k <= 0:
        raise ParamsError(f"k: must be a positive integer, got {k}")
    if L <= 0:
        raise ParamsError(f"L: must be a positive integer, got {L}")
    if k > L:
        raise ParamsError(f"k: must be at most L ({L}), got {k}")
    if lam < 0:
        raise ParamsError(f"lambda: must be non-negative, got {lam}")
    if method in USAE_METHODS and topk != "local":
        raise ParamsError(
            f"topk: method {method} trains and is evaluated with each stream's own top-k, "
            f"so topk must be local, got {topk} (dvc exp run -S method={method} -S topk=local)"
        )


def check_data(data: DataParams) -> None:
    if data.dataset not in DATASETS:
        raise ParamsError(
            f"data.dataset: unknown dataset {data.dataset!r} (known: {', '.join(sorted(DATASETS))})"
        )
    if data.max_samples < 0:
        raise ParamsError(f"data.max_samples: must be >= 0, got {data.max_samples}")
    for key in ("val_fraction", "test_fraction"):
        value = getattr(data, key)
        if not 0.0 <= value < 1.0:
            raise ParamsError(f"data.{key}: must be in [0, 1), got {value}")
    if data.val_fraction + data.test_fraction >= 1.0:
        raise ParamsError("data.test_fraction: val_fraction + test_fraction must be below 1")
    if data.dataset == "folder" and not data.folder.csv.strip():
        raise ParamsError(
            "data.folder.csv: empty; set it to your CSV with columns id,image,caption,labels "
            "(docs/datasets.md, Bring your own data)"
        )
    _positive({"wordnet_depth": data.wordnet_depth}, "data")
    if data.labels_from == "captions" and data.dataset == "folder" and data.folder.hierarchy.strip():
        raise ParamsError(
            "data.folder.hierarchy: data.labels_from: captions replaces the labels and their hierarchy "
            "by WordNet's; set data.folder.hierarchy: '' (or data.labels_from: dataset)"
        )
    check_emoji_options(data.emoji)
    check_clipart_options(data.clipart)
    check_split_list(data.openimages.splits, OPENIMAGES_SPLITS, "data.openimages.splits")
    check_split_list(data.coco.splits, COCO_SPLITS, "data.coco.splits")
    _positive({"max_images": data.openimages.max_images}, "data.openimages", minimum=0)
    _positive({"max_images": data.coco.max_images}, "data.coco", minimum=0)


def check_split_list(splits: list[str], known: tuple[str, ...], param: str) -> None:
    """A non-empty list of distinct known official splits; "did you mean" for a misspelt one."""
    if not splits:
        raise ParamsError(f"{param}: empty; use some of {', '.join(known)}")
    for split in splits:
        if split not in known:
            close = difflib.get_close_matches(str(split), known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"
            raise ParamsError(f"{param}: unknown split {split!r} ({hint})")
    if len(set(splits)) != len(splits):
        raise ParamsError(f"{param}: {splits} lists a split twice")


def check_download(d: DownloadParams) -> None:
    """``download``: an http(s) mirror URL or '' (the real hosts), at least one worker, and
    local paths (not URLs) for ``cache`` and ``checksums`` (the checksum file itself is read by
    sparc.preflight and the stage)."""
    if d.base_url and not d.base_url.startswith(("http://", "https://")):
        raise ParamsError(
            f"download.base_url: {d.base_url!r} is not an http:// or https:// URL "
            "('' = the real hosts)"
        )
    _positive({"workers": d.workers}, "download")
    for name, value, meaning in (("cache", d.cache, "a directory ('' = data/raw/<dataset>.cache)"),
                                 ("checksums", d.checksums, "an md5sum or sha256sum file ('' = none)")):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value):
            raise ParamsError(f"download.{name}: {value!r} is a URL; give a local path of {meaning}")


def check_emoji_options(options: EmojiOptions) -> None:
    """``data.emoji``: the rendered side must be positive."""
    _positive({"size": options.size}, "data.emoji")


def check_clipart_options(options: ClipartOptions) -> None:
    """``data.clipart``: positive megapixel cap, non-negative title limits (0 = no repeat limit)."""
    if not options.max_megapixels > 0:
        raise ParamsError(f"data.clipart.max_megapixels: must be positive, got {options.max_megapixels}")
    _positive(
        {"min_title_chars": options.min_title_chars, "max_title_repeats": options.max_title_repeats},
        "data.clipart", minimum=0,
    )


def check_streams(streams: dict[str, StreamParams]) -> None:
    if len(streams) < 2:
        raise ParamsError(
            f"streams: SPARC aligns several models, so at least two streams are needed, got "
            f"{len(streams)} ({', '.join(streams) or 'none'}); add a stream (docs/models.md)"
        )
    for name, stream in streams.items():
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ParamsError(f"streams.{name}: stream names may use letters, digits, '-' and '_'")
        try:
            check_spec(stream.model, stream.input)
        except ValueError as err:
            raise ParamsError(f"streams.{name}.model: {err}") from None


def check_nproc(nproc: int, device: str, group: str) -> None:
    """``<group>.nproc`` is at least 1; several processes need a device each: ``auto``, ``cpu`` or
    ``cuda`` (process i takes GPU i), not one fixed ``cuda:N``."""
    _positive({"nproc": nproc}, group)
    if nproc > 1 and device.startswith("cuda:"):
        raise ParamsError(
            f"{group}.device: {device!r} would put all {nproc} processes ({group}.nproc) on one GPU; "
            "use cuda (process i takes GPU i), auto or cpu"
        )


def check_extract(e: ExtractParams) -> None:
    _positive({"batch_size": e.batch_size}, "extract")
    _positive({"num_workers": e.num_workers, "cpu_threads": e.cpu_threads}, "extract", minimum=0)
    check_device_name(e.device, "extract.device")
    check_nproc(e.nproc, e.device, "extract")


def check_train(t: TrainParams, topk: str = "global", method: str = "sparc") -> None:
    """The ``train`` group; ``topk`` and ``method`` (top level) for the Global TopK options."""
    _positive(
        {name: getattr(t, name) for name in (
            "batch_size", "k_aux", "dead_steps", "revive_every", "checkpoint_every", "log_every",
        )},
        "train",
    )
    _positive({"epochs": t.epochs}, "train", minimum=0 if t.init else 1)
    if t.init and method == "usae_paper":
        raise ParamsError("train.init: method usae_paper has the batchnorm encoder, which no imported SAE has; "
                          "use method sparc or usae")
    for name in ("lr", "adam_eps"):
        if not getattr(t, name) > 0:
            raise ParamsError(f"train.{name}: must be positive, got {getattr(t, name)}")
    _positive({"aux_coef": t.aux_coef, "cpu_threads": t.cpu_threads, "ram_budget_mb": t.ram_budget_mb}, "train", 0)
    check_device_name(t.device, "train.device")
    check_nproc(t.nproc, t.device, "train")
    if t.nproc > 1 and method == "usae_paper":
        raise ParamsError(
            "train.nproc: method usae_paper normalises its codes with the whole batch's statistics "
            "(BatchNorm), which no process of several sees; use train.nproc: 1"
        )
    if t.precision not in ("auto", "float32", "bf16"):
        raise ParamsError(f"train.precision: must be auto, float32 or bf16, got {t.precision!r}")
    if not 0.0 < t.subset_keep <= 1.0:
        raise ParamsError(f"train.subset_keep: must be in (0, 1] (1.0 = off), got {t.subset_keep}")
    if not t.consistency >= 0.0:
        raise ParamsError(f"train.consistency: must be >= 0 (0.0 = off), got {t.consistency}")
    for name, off in (("subset_keep", 1.0), ("consistency", 0.0)):
        if getattr(t, name) != off and (topk != "global" or method != "sparc"):
            raise ParamsError(
                f"train.{name}: a Global TopK training option (method sparc, topk global), "
                f"but method is {method} with topk {topk}; set train.{name}: {off}"
            )


def check_concepts(c: ConceptsParams) -> None:
    _positive({"top_n": c.top_n, "text_words": c.text_words}, "concepts")
    _positive({"text_vocab": c.text_vocab, "zero_shot_vocab": c.zero_shot_vocab}, "concepts", minimum=0)
    if not math.isfinite(c.text_min_score):
        raise ParamsError(f"concepts.text_min_score: must be a finite number, got {c.text_min_score}")
    if not 0.0 <= c.purity_threshold <= 1.0:
        raise ParamsError(f"concepts.purity_threshold: must be in [0, 1], got {c.purity_threshold}")


def check_evaluate(e: EvaluateParams) -> None:
    _positive(
        {"batch_size": e.batch_size, "probe_min_positives": e.probe_min_positives,
         "probe_candidates": e.probe_candidates},
        "evaluate",
    )
    check_device_name(e.device, "evaluate.device")


def check_figures(f: FiguresParams) -> None:
    _positive({"n_best": f.n_best, "top_n": f.top_n, "thumb_px": f.thumb_px}, "figures")
    _positive({"queries": f.queries}, "figures", minimum=0)
    for i, name in enumerate(f.concepts):
        if not name.strip():
            raise ParamsError(f"figures.concepts[{i}]: empty concept name")


def check_localise(c: LocaliseParams, dataset: str) -> None:
    """Value ranges, and the query source against ``dataset`` (``data.dataset``): ``masks`` needs a
    dataset with instance masks; ``queries: 0`` (every image) is for ``masks`` only; the prompt
    holds one ``{}``; ``device`` is a device name (its availability is checked when the stage runs)."""
    _positive({"grid": c.grid, "layers": c.layers, "overlays": c.overlays}, "localise")
    _positive({"queries": c.queries}, "localise", minimum=0)
    _positive({"cell": c.cell}, "localise", minimum=8)
    if not 0.0 < c.scale <= 1.0:
        raise ParamsError(f"localise.scale: must be in (0, 1], got {c.scale}")
    source = localise_source(c.source, dataset)
    if source == "masks" and dataset not in MASK_DATASETS:
        raise ParamsError(
            f"localise.source: masks needs a dataset with instance masks ({', '.join(MASK_DATASETS)}), "
            f"but data.dataset is {dataset}; use auto or composite"
        )
    if source == "composite" and c.queries == 0:
        raise ParamsError("localise.queries: 0 (every image) is for the masks source; composite canvases need >= 1")
    if c.prompt.count("{}") != 1 or "{" in c.prompt.replace("{}", "") or "}" in c.prompt.replace("{}", ""):
        raise ParamsError(f"localise.prompt: must hold one {{}} (the category name) and no other braces, got {c.prompt!r}")
    check_device_name(c.device, "localise.device")


def validate(params: Params) -> Params:
    """Check every value range and name in ``params`` (the one place stages and ``sparc check``
    validate parameters; nothing here touches files or devices). Returns ``params`` or raises
    ParamsError naming the parameter."""
    check_top_level(params.k, params.L, params.lam, params.topk, params.method)
    check_seeds(params)
    check_data(params.data)
    check_download(params.download)
    check_streams(params.streams)
    check_extract(params.extract)
    check_train(params.train, params.topk, params.method)
    check_concepts(params.concepts)
    check_evaluate(params.evaluate)
    check_figures(params.figures)
    check_localise(params.localise, params.data.dataset)
    return params


def read_yaml(path: str | Path) -> dict:
    """Parse a YAML file with YAML 1.2 rules (as DVC does). ParamsError with one line for a
    missing file, bytes that are not UTF-8 or a YAML syntax error (file, line and column)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        column = err.start - (err.object.rfind(b"\n", 0, err.start) + 1) + 1
        raise ParamsError(
            f"{path}:{line}:{column}: byte {err.object[err.start]:#04x} is not UTF-8; save the file as UTF-8"
        ) from None
    try:
        raw = YAML(typ="safe", pure=True).load(text)
    except YAMLError as err:
        raise ParamsError(yaml_error_line(path, err)) from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return raw


# Hints for YAML mistakes, by a word of the parser's message.
_YAML_HINTS = {
    "duplicate key": "remove or rename one of the two",
    "'\\t'": "indent with spaces, not tabs",
    "flow sequence": "close the [ list with ], or write it as a block list (one '- item' a line)",
    "flow mapping": "close the { mapping with }",
}


def yaml_error_line(path: Path, err: YAMLError) -> str:
    """One line for a YAML syntax error: ``<path>:<line>:<column>: <problem>`` (1-based, where the
    parser stopped), what it was reading and where that began, and a hint for common mistakes."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None:
        problem += f" ({context} that began at line {start.line + 1}, column {start.column + 1})"
    hints = [hint for word, hint in _YAML_HINTS.items() if word in problem]
    return f"{where}: {problem}" + (f"; {hints[0]}" if hints else "")


def params_from_dict(raw: dict) -> Params:
    """Build and validate :class:`Params` from an already parsed mapping."""
    return validate(_build(Params, raw, ""))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read, type-check and validate ``params.yaml``."""
    return params_from_dict(read_yaml(path))
