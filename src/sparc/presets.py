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


def paper_overrides(csv: str, hierarchy: str = "") -> list[str]:
    """The paper setting (:data:`PAPER_SETTING`, DINOv2 ViT-L/14-reg + OpenCLIP ViT-L-14
    DataComp-XL image and text towers) on a folder-format dataset ``csv`` (see
    sparc.data.folder), as DVC ``-S`` overrides."""
    streams = ",".join(f"{name}:{{model:'{spec}',input:{inp}}}" for name, (spec, inp) in PAPER_MODELS.items())
    return [
        "~streams",
        f"+streams={{{streams}}}",
        *(f"{key}={override_literal(value)}" for key, value in PAPER_SETTING.items()),
        "data.dataset=folder",
        f"data.folder.csv={hydra_quote(csv)}",
        f"data.folder.hierarchy={hydra_quote(hierarchy)}",
    ]


def paper_command(csv: str, hierarchy: str = "", name: str = "paper") -> list[str]:
    """``dvc exp run -n <name> -S ...`` for the paper setting."""
    cmd = ["dvc", "exp", "run", "-n", name]
    for override in paper_overrides(csv, hierarchy):
        cmd += ["-S", override]
    return cmd
