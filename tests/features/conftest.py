"""Shared fixtures: a tiny prepared dataset of drawn images with captions, and the offline models
(each loaded once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from sparc.data.base import DatasetBuild, Sample
from sparc.data.hierarchy import Hierarchy
from sparc.data.prepared import PreparedData, load_prepared, write_prepared
from sparc.features.extract import cpu_threads, model_threads
from sparc.features.registry import build_extractor

# (id, shape, colour, caption, label); some shapes repeat with other colours.
ITEMS = [
    ("red-disc", "disc", (220, 30, 30), "a red circle", "round"),
    ("blue-disc", "disc", (30, 60, 220), "a blue circle", "round"),
    ("green-box", "box", (30, 170, 60), "a green square", "square"),
    ("black-box", "box", (10, 10, 10), "a black square", "square"),
    ("orange-bar", "bar", (240, 140, 20), "an orange horizontal stripe", "stripe"),
    ("purple-bar", "bar", (130, 40, 160), "a purple horizontal stripe", "stripe"),
    ("teal-disc", "disc", (20, 150, 150), "a teal circle", "round"),
]


def draw(shape: str, colour: tuple[int, int, int], size: int = 96) -> Image.Image:
    """An RGBA image: one shape on a transparent background."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    if shape == "disc":
        d.ellipse((12, 12, size - 12, size - 12), fill=colour + (255,))
    elif shape == "box":
        d.rectangle((20, 20, size - 20, size - 20), fill=colour + (255,))
    else:
        d.rectangle((4, size // 2 - 10, size - 4, size // 2 + 10), fill=colour + (255,))
    return img


def make_prepared(root: Path) -> PreparedData:
    """Write the ITEMS as a prepared dataset under ``root/prepared`` and load it back."""
    out = root / "prepared"
    images = out.with_name(out.name + ".tmp") / "images"
    images.mkdir(parents=True)
    samples = []
    for sample_id, shape, colour, caption, label in ITEMS:
        path = images / f"{sample_id}.png"
        draw(shape, colour).save(path)
        samples.append(Sample(sample_id, path, caption, (label,)))
    build = DatasetBuild(samples, Hierarchy.flat(sorted({item[4] for item in ITEMS})))
    write_prepared(
        build, out, dataset="shapes", options={}, max_samples=0, split_seed=0,
        val_fraction=0.2, test_fraction=0.2,
    )
    return load_prepared(out)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> PreparedData:
    """Seven drawn shapes (RGBA PNGs) with captions, as the `prepare` stage writes them."""
    return make_prepared(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(autouse=True)
def stage_threads():
    """Tests run models with the thread count the extract stage uses (restored afterwards)."""
    with cpu_threads(model_threads(1)):
        yield


@pytest.fixture(scope="session")
def effnet():
    return build_extractor("efficientnet:lite0", "image", "cpu")


@pytest.fixture(scope="session")
def imgfocus():
    with cpu_threads(model_threads(1)):  # ONNX Runtime fixes its thread count here
        return build_extractor("imgfocus:vit-s14", "image", "cpu")


@pytest.fixture(scope="session")
def minilm():
    return build_extractor("minilm:all-MiniLM-L6-v2", "caption", "cpu")
