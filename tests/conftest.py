"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparc.params import read_yaml
from tests.e2e import build_pipeline_repo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def raw() -> dict:
    """The repository's params.yaml as DVC reads it (a fresh dict per test, free to edit)."""
    return read_yaml(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> Path:
    """The real pipeline (`dvc repro` with tiny params) run once per session in a copy of the
    repository. Read-only: the end-to-end modules work on copies (`tests.e2e.copy_repo`)."""
    return build_pipeline_repo(tmp_path_factory.mktemp("pipeline"))
