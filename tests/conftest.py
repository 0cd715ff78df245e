"""Fixtures shared across test modules."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from sparc.params import read_yaml

if TYPE_CHECKING:
    from sparc.data.base import Sample
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


# --------------------------------------------------------------------------- tiny stage inputs


@dataclass
class TinyInputs:
    """What `prepare`, `extract` and `train` would leave for a tiny planted run: the prepared
    dataset, the feature store (one folder per stream) and an untrained SAE (seed 1)."""

    prepared: Path
    features: Path
    sae: Path


def caption_sample(i: int, sid: str, labels: tuple[str, ...], images: Path) -> Sample:
    """The default sample: a stand-in image file (a few bytes, never decoded) and ``caption <i>``."""
    from sparc.data.base import Sample

    img = images / f"{sid}.png"
    img.write_bytes(f"image {i}".encode())
    return Sample(sid, img, f"caption {i}", labels)


def write_tiny_inputs(
    root: Path,
    streams: dict[str, dict],
    dims: dict[str, int],
    *,
    L: int,
    k: int,
    n_samples: int,
    sample: Callable[[int, str, tuple[str, ...], Path], Sample] = caption_sample,
    leaf_names: list[str] | None = None,
    dataset: str = "planted",
    prepared_dir: Path | None = None,
    features_root: Path | None = None,
    sae_dir: Path | None = None,
) -> TinyInputs:
    """Planted concepts (:mod:`sparc.data.planted`, one feature space per stream of ``dims``, in
    its order; ``streams`` has the same names) written as the stages' inputs under ``root`` (``prepared/``, ``features/<s>/``, ``sae/``
    unless given): images under ``root/images`` made by ``sample(i, id, labels, images_dir)``,
    40% test and 10% val rows, features recording the prepared data's fingerprint; ``leaf_names``
    renames the planted leaves. (Imports torch on first use, not when pytest starts.)"""
    from sparc.data.base import DatasetBuild
    from sparc.data.hierarchy import Hierarchy
    from sparc.data.planted import PlantedConfig, make_planted
    from sparc.data.prepared import write_prepared
    from sparc.features.store import write_stream
    from sparc.model.io import save_sae
    from sparc.model.sae import MultiStreamSAE, SAEConfig

    planted = make_planted(PlantedConfig(dims=dict(dims), n_samples=n_samples))  # streams in the order of dims
    hierarchy = planted.hierarchy
    if leaf_names is not None:
        hierarchy = Hierarchy.from_parents(dict(hierarchy.parents), dict(zip(planted.concept_ids, leaf_names, strict=True)))
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    samples = [sample(i, sid, labels, images) for i, (sid, labels) in enumerate(zip(planted.ids, planted.labels, strict=True))]
    prepared = write_prepared(
        DatasetBuild(samples, hierarchy), prepared_dir or root / "prepared", dataset=dataset, options={},
        max_samples=0, split_seed=0, val_fraction=0.1, test_fraction=0.4,
    )
    fingerprint = json.loads((prepared / "meta.json").read_text())["fingerprint"]
    features = features_root or root / "features"
    for name, spec in streams.items():
        write_stream(features / name, planted.ids, planted.features[name], {**spec, "dataset_fingerprint": fingerprint})
    sae = save_sae(MultiStreamSAE(SAEConfig(dims=dims, L=L, k=k), seed=1), sae_dir or root / "sae")
    return TinyInputs(prepared, features, sae)


@pytest.fixture(scope="session")
def tiny_inputs() -> Callable[..., TinyInputs]:
    """:func:`write_tiny_inputs`, the one builder of the encode / concepts / evaluate / report /
    API tests' tiny planted runs (each module calls it with its streams, size and layout)."""
    return write_tiny_inputs
