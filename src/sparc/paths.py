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
