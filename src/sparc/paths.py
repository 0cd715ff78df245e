"""Where each stage reads and writes, relative to the repository root (mirrors dvc.yaml)."""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
REPORTS = Path("reports")


def prepared_dir(dataset: str) -> Path:
    """Output of `prepare`: the samples table, hierarchy and rendered images."""
    return DATA / "prepared" / dataset


def features_root(dataset: str) -> Path:
    """Parent of the per-stream feature directories written by `extract`."""
    return DATA / "features" / dataset


def features_dir(dataset: str, stream: str) -> Path:
    return features_root(dataset) / stream


def sae_dir() -> Path:
    """Output of `train`: the trained SAE (model.safetensors + config.json)."""
    return DATA / "sae"


def checkpoints_dir() -> Path:
    """Training checkpoints for resuming; not a DVC output (keyed by the training config)."""
    return DATA / "checkpoints"


def train_reports_dir() -> Path:
    """DVCLive directory of `train` (metrics.json, plots)."""
    return REPORTS / "train"


def codes_dir() -> Path:
    """Output of `encode`: sparse codes of every sample (joint and per-stream inference)."""
    return DATA / "codes"


def concepts_dir() -> Path:
    """Output of `concepts`: per-latent concept names and purities."""
    return REPORTS / "concepts"


def metrics_path() -> Path:
    """The full evaluation of `evaluate` (its headline selection, headline.json beside it, is the DVC metrics)."""
    return REPORTS / "metrics.json"
