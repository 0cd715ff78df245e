"""The files of a saved SAE (``model.safetensors``, ``config.json``) and the error for one that
cannot be read. Imports no torch, so :mod:`sparc.api` reads a run's configuration without it."""

from __future__ import annotations

import json
from pathlib import Path

from sparc import paths

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class SAEFileError(ValueError):
    """A saved SAE's file is truncated or corrupt; the message names it and how to restore it."""


def unreadable(path: Path, reason: object) -> SAEFileError:
    """The one-line error for SAE file ``path`` that cannot be read because of ``reason``."""
    why = " ".join(str(reason).split())
    return SAEFileError(
        f"{path}: unreadable ({why}); restore it with `dvc checkout {paths.sae_dir()}` "
        "(or retrain: `dvc repro train`)"
    )


def read_sae_config(directory: str | Path) -> dict:
    """``config.json`` of SAE directory ``directory`` as a dict; :class:`SAEFileError` naming the
    file when it is not UTF-8 JSON holding a mapping."""
    path = Path(directory) / CONFIG_FILE
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise unreadable(path, err) from None
    if not isinstance(cfg, dict):
        raise unreadable(path, f"expected a JSON object, got {type(cfg).__name__}")
    return cfg
