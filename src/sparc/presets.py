"""Named parameter presets, applied as DVC experiments (``dvc exp run -S ...``).

A preset is a list of DVC ``--set-param`` overrides (Hydra syntax: ``~key`` deletes, ``+key=``
adds), so running it never edits the committed params.yaml and its results sit next to the
default run in ``dvc exp show``.
"""

from __future__ import annotations

PAPER_MODELS = {
    "dino": ("dinov2:facebook/dinov2-with-registers-large", "image"),
    "clip_img": ("openclip:ViT-L-14@datacomp_xl_s13b_b90k", "image"),
    "clip_txt": ("openclip:ViT-L-14@datacomp_xl_s13b_b90k", "caption"),
}


def paper_overrides(csv: str, hierarchy: str = "") -> list[str]:
    """The paper setting (DINOv2 ViT-L/14-reg + OpenCLIP ViT-L-14 DataComp-XL image and text
    towers, L=8192, k=64, lambda=1, batch 256, Adam 1e-4, 50 epochs, seed 42) on a folder-format
    dataset ``csv`` (see sparc.data.folder), as DVC ``-S`` overrides."""
    streams = ",".join(f"{name}:{{model:'{spec}',input:{inp}}}" for name, (spec, inp) in PAPER_MODELS.items())
    return [
        "~streams",
        f"+streams={{{streams}}}",
        "L=8192",
        "k=64",
        "lambda=1.0",
        "seed=42",
        "topk=global",
        "method=sparc",
        "train.batch_size=256",
        "train.epochs=50",
        "train.lr=1.0e-4",
        "train.adam_eps=1.0e-8",
        "data.dataset=folder",
        "data.max_samples=0",
        f"data.folder.csv='{csv}'",
        f"data.folder.hierarchy='{hierarchy}'",
    ]


def paper_command(csv: str, hierarchy: str = "", name: str = "paper") -> list[str]:
    """``dvc exp run -n <name> -S ...`` for the paper setting."""
    cmd = ["dvc", "exp", "run", "-n", name]
    for override in paper_overrides(csv, hierarchy):
        cmd += ["-S", override]
    return cmd
