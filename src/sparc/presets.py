"""Named parameter presets, applied as DVC experiments (``dvc exp run -S ...``).

A preset is a list of DVC ``--set-param`` overrides (Hydra syntax: ``~key`` deletes, ``+key=``
adds), so running it never edits the committed params.yaml and its results sit next to the
default run in ``dvc exp show``.
"""

from __future__ import annotations

import re

PAPER_MODELS = {
    "dino": ("dinov2:facebook/dinov2-with-registers-large", "image"),
    "clip_img": ("openclip:ViT-L-14@datacomp_xl_s13b_b90k", "image"),
    "clip_txt": ("openclip:ViT-L-14@datacomp_xl_s13b_b90k", "caption"),
}

# The paper setting (method.md sections 1, 2 and 4), every value the pipeline reads from
# params.yaml, as dotted params.yaml keys. The probes use classes with more than 50 positives.
PAPER_SETTING: dict[str, object] = {
    "L": 8192,
    "k": 64,
    "lambda": 1.0,
    "seed": 42,
    "topk": "global",
    "method": "sparc",
    "train.batch_size": 256,
    "train.epochs": 50,
    "train.lr": 1.0e-4,
    "train.adam_eps": 1.0e-8,
    "train.k_aux": 64,
    "train.aux_coef": 0.03125,
    "train.dead_steps": 1000,
    "train.revive_every": 100,
    "concepts.top_n": 50,
    "concepts.purity_threshold": 0.3,
    "concepts.split": "test",
    "evaluate.probe_min_positives": 51,
    "evaluate.probe_candidates": 20,
    "data.max_samples": 0,
}


def hydra_quote(value: str) -> str:
    """``value`` as a single-quoted Hydra override string that DVC's ``-S`` reads back unchanged
    (quotes and the backslashes before them or at the end are escaped)."""
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
    return f"'{escaped}'"


def override_literal(value: object) -> str:
    """An override value: floats with a dot and a signed exponent (as params.yaml writes them)."""
    if not isinstance(value, float):
        return str(value)
    mantissa, _, exponent = repr(value).partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{int(exponent):+d}" if exponent else mantissa


WEIGHTS = ("pretrained", "random")


def with_weights(models: dict[str, tuple[str, str]], weights: str) -> dict[str, tuple[str, str]]:
    """``models`` with option ``weights=<weights>`` in every spec (``random``: the architectures
    at their real size with random weights and no network, sparc.features.random_weights);
    unchanged for ``pretrained``. ValueError for another value."""
    from dataclasses import replace

    from sparc.catalog import parse_spec

    if weights not in WEIGHTS:
        raise ValueError(f"--weights: must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if weights == "pretrained":
        return models
    out = {}
    for name, (spec, inp) in models.items():
        parsed = parse_spec(spec)
        options = tuple(sorted({**dict(parsed.options), "weights": weights}.items()))
        out[name] = (str(replace(parsed, options=options)), inp)
    return out


def run_name(name: str, max_images: int = 0, weights: str = "pretrained") -> str:
    """A preset's experiment name: ``<name>[-random][-<max_images>]``."""
    return name + ("-random" if weights == "random" else "") + (f"-{max_images}" if max_images else "")


def mirror_override(base_url: str) -> list[str]:
    """``download.base_url`` set to ``base_url`` (a mirror of data/raw, e.g. a local fixture
    server) as a DVC ``-S`` override; nothing when empty (the params.yaml value stands)."""
    return [f"download.base_url={hydra_quote(base_url)}"] if base_url else []


# The paper's data (method.md section 6): every Open Images split with every narrative, and
# COCO 2017 with an image's captions joined (the reference); see sparc.data.openimages / .coco.
OPENIMAGES_DATA: dict[str, object] = {
    "data.dataset": "openimages",
    "data.openimages.splits": ["train", "validation", "test"],
    "data.openimages.max_images": 0,
}
# The fewest Open Images images per split (max_images) that the whole pipeline runs on: the
# localise stage's composite queries draw localise.grid^2 = 4 distinct test samples (on COCO it
# uses the images' own masks, any number of them).
MIN_OPENIMAGES_QUICK_LOOK = 4
COCO_DATA: dict[str, object] = {
    "data.dataset": "coco",
    "data.coco.splits": ["train2017", "val2017"],
    "data.coco.max_images": 0,
    "data.coco.captions": "join",
}
# Localisation on COCO (method.md section 4): every val2017 image (the test split), one pair per
# image and present class, mask = the union of its instances (sparc.localise.queries).
COCO_LOCALISE: dict[str, object] = {
    "localise.source": "masks",
    "localise.split": "test",
    "localise.queries": 0,
}


def _setting_overrides(
    data: dict[str, object],
    models: dict[str, tuple[str, str]] = PAPER_MODELS,
    setting: dict[str, object] = PAPER_SETTING,
) -> list[str]:
    """The streams ``models`` and ``setting`` (default: the paper's), then ``data``, as DVC ``-S``
    overrides (lists as ``[a,b]``)."""
    streams = ",".join(f"{name}:{{model:'{spec}',input:{inp}}}" for name, (spec, inp) in models.items())

    def literal(value: object) -> str:
        if isinstance(value, list):
            return "[" + ",".join(override_literal(v) for v in value) + "]"
        return override_literal(value)

    return [
        "~streams",
        f"+streams={{{streams}}}",
        *(f"{key}={literal(value)}" for key, value in {**setting, **data}.items()),
    ]


def _data_overrides(
    csv: str, hierarchy: str, models: dict[str, tuple[str, str]], setting: dict[str, object],
    max_images: int = 0,
) -> list[str]:
    """``models`` and ``setting`` on the ``openimages`` dataset (:data:`OPENIMAGES_DATA`;
    ``max_images`` > 0: only the first images of each split, a quick look), or with ``csv`` on a
    folder-format dataset (see sparc.data.folder), as DVC ``-S`` overrides."""
    if not csv:
        if 0 < max_images < MIN_OPENIMAGES_QUICK_LOOK:
            raise ValueError(
                f"max_images {max_images}: the localise stage draws {MIN_OPENIMAGES_QUICK_LOOK} test images "
                f"into each composite query (a 2 x 2 grid), so a quick look needs at least "
                f"{MIN_OPENIMAGES_QUICK_LOOK} images per split (0 = all)"
            )
        return _setting_overrides({**OPENIMAGES_DATA, "data.openimages.max_images": max_images}, models, setting)
    if max_images:
        raise ValueError("max_images applies to Open Images, not to a folder CSV (set data.max_samples)")
    return [
        *_setting_overrides({"data.dataset": "folder"}, models, setting),
        f"data.folder.csv={hydra_quote(csv)}",
        f"data.folder.hierarchy={hydra_quote(hierarchy)}",
    ]


def paper_overrides(csv: str = "", hierarchy: str = "", max_images: int = 0, weights: str = "pretrained") -> list[str]:
    """The paper setting (:data:`PAPER_SETTING`, DINOv2 ViT-L/14-reg + OpenCLIP ViT-L-14
    DataComp-XL image and text towers; ``weights``: see :func:`with_weights`) as DVC ``-S``
    overrides: on the ``openimages`` dataset (:data:`OPENIMAGES_DATA`), or with ``csv`` on a
    folder-format dataset (see sparc.data.folder)."""
    return _data_overrides(csv, hierarchy, with_weights(PAPER_MODELS, weights), PAPER_SETTING, max_images)


def coco_overrides(max_images: int = 0, weights: str = "pretrained") -> list[str]:
    """The COCO setting: the paper's streams (``weights``: see :func:`with_weights`) and
    :data:`PAPER_SETTING` on ``coco`` (:data:`COCO_DATA`: train2017 to train on, val2017 to
    evaluate on, captions joined; ``max_images`` > 0: only the first images of each split),
    localised on every val2017 image and present class (:data:`COCO_LOCALISE`)."""
    return _setting_overrides({**COCO_DATA, "data.coco.max_images": max_images, **COCO_LOCALISE},
                              with_weights(PAPER_MODELS, weights))


def experiment_command(name: str, overrides: list[str]) -> list[str]:
    """``dvc exp run -n <name> -S <override> -S ...``."""
    cmd = ["dvc", "exp", "run", "-n", name]
    for override in overrides:
        cmd += ["-S", override]
    return cmd


def aligned(name: str, overrides: list[str], subset_keep: float) -> tuple[str, list[str]]:
    """With ``subset_keep < 1``: the name ``<name>-subset<p>`` and the stream-subset training rule
    added (docs/alignment.md); else both unchanged (the paper's
    own SPARC)."""
    if not 0.0 < subset_keep <= 1.0:
        raise ValueError(f"--subset-keep: must be in (0, 1], got {subset_keep}")
    if subset_keep == 1.0:
        return name, overrides
    return f"{name}-subset{subset_keep:g}", [*overrides, f"train.subset_keep={override_literal(float(subset_keep))}"]


def paper_command(csv: str = "", hierarchy: str = "", name: str = "paper", max_images: int = 0,
                  subset_keep: float = 1.0, weights: str = "pretrained", base_url: str = "") -> list[str]:
    """``dvc exp run -n <name> -S ...`` for the paper setting (:func:`run_name`: ``-<max_images>``
    for a quick look at the first images of each split, ``-random`` for random weights;
    ``subset_keep`` < 1: see :func:`aligned`; ``base_url``: :func:`mirror_override`)."""
    overrides = [*paper_overrides(csv, hierarchy, max_images, weights), *mirror_override(base_url)]
    return experiment_command(*aligned(run_name(name, max_images, weights), overrides, subset_keep))


def coco_command(name: str = "coco", max_images: int = 0, subset_keep: float = 1.0,
                 weights: str = "pretrained", base_url: str = "") -> list[str]:
    """``dvc exp run -n <name> -S ...`` for the COCO setting (name, ``subset_keep``, ``weights``
    and ``base_url`` as :func:`paper_command`)."""
    overrides = [*coco_overrides(max_images, weights), *mirror_override(base_url)]
    return experiment_command(*aligned(run_name(name, max_images, weights), overrides, subset_keep))


# The USAE paper's setting (method.md section 3): its three vision models, all reading the images
# (ViT-B/16 supervised on ImageNet, DINOv2 ViT-S/14 with registers, SigLIP ViT-B/16; the
# transformers family, sparc.features.hf: the final-norm CLS token of ViT and DINOv2, SigLIP's
# image embedding), 6144 latents, k = 32, the paper's SAE (method usae_paper: Linear ->
# BatchNorm -> ReLU -> TopK encoders, a row-normalised bias-free dictionary) with each stream's own
# top-k, a random source model per step whose code every decoder reconstructs (lambda 1.0), and
# only the source's parameters updated as in the reference code. method.md gives no USAE training
# schedule or evaluation protocol: those are the paper setting's (PAPER_SETTING).
USAE_MODELS = {
    "vit": ("transformers:google/vit-base-patch16-224?pool=cls", "image"),
    "dino": ("transformers:facebook/dinov2-with-registers-small?pool=cls", "image"),
    "siglip": ("transformers:google/siglip-base-patch16-224?pool=embed", "image"),
}
USAE_SETTING: dict[str, object] = {
    **PAPER_SETTING,
    "L": 6144,
    "k": 32,
    "lambda": 1.0,
    "topk": "local",
    "method": "usae_paper",
    "train.usae_update": "source_only",
    "train.subset_keep": 1.0,  # the Global TopK training options, off (USAE has no shared top-k)
    "train.consistency": 0.0,
}


def usae_overrides(csv: str = "", hierarchy: str = "", max_images: int = 0, weights: str = "pretrained") -> list[str]:
    """The USAE paper's setting (:data:`USAE_MODELS`, :data:`USAE_SETTING`; ``weights``: see
    :func:`with_weights`) as DVC ``-S`` overrides, on Open Images or with ``csv`` on a
    folder-format dataset (as :func:`paper_overrides`)."""
    return _data_overrides(csv, hierarchy, with_weights(USAE_MODELS, weights), USAE_SETTING, max_images)


def usae_command(csv: str = "", hierarchy: str = "", name: str = "usae", max_images: int = 0,
                 weights: str = "pretrained", base_url: str = "") -> list[str]:
    """``dvc exp run -n <name> -S ...`` for the USAE paper's setting (name, ``weights`` and
    ``base_url`` as :func:`paper_command`)."""
    overrides = [*usae_overrides(csv, hierarchy, max_images, weights), *mirror_override(base_url)]
    return experiment_command(run_name(name, max_images, weights), overrides)
