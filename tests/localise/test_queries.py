"""Localisation query pairs: the masks source on a tiny COCO-like prepared dataset made here (one
pair per image and present category, mask = union of its instances, the prompt), the composite
source's text features, the choice of source and its parameter checks, and a run of the stage in
masks mode with a stand-in localiser and text model."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparc.data.base import DatasetBuild, Sample
from sparc.data.coco import instance_mask
from sparc.data.hierarchy import Hierarchy
from sparc.data.prepared import load_annotations, load_prepared, write_prepared
from sparc.localise.heatmaps import Localiser
from sparc.localise.queries import composite_queries, image_rows, mask_queries, present_categories
from sparc.params import (
    LocaliseParams,
    ParamsError,
    check_localise,
    localise_source,
    params_from_dict,
)

W, H = 40, 32  # image size (not square, so a swapped width and height shows)
CATEGORIES = {1: "person", 18: "dog", 17: "cat"}


def rle(x0: int, x1: int) -> dict:
    """Uncompressed RLE (column-major) of the columns ``x0 <= x < x1``, all rows."""
    return {"counts": [x0 * H, (x1 - x0) * H, (W - x1) * H], "size": [H, W]}


def box(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def inst(i: int, cat: int, seg, crowd: int = 0) -> dict:
    return {"id": i, "category": CATEGORIES[cat], "category_id": cat, "bbox": None, "area": None,
            "iscrowd": crowd, "segmentation": seg}


# group -> (split, instances); test images in row order: t0 (person + two dogs, one of them a
# crowd), t1 (cat), t2 (nothing), t3 (dog); a train image that never counts.
IMAGES = {
    "t0": ("test", [inst(1, 18, rle(30, 34)), inst(2, 1, rle(2, 10)), inst(3, 18, rle(20, 24), crowd=1)]),
    "t1": ("test", [inst(4, 17, rle(12, 28))]),
    "t2": ("test", []),
    "t3": ("test", [inst(5, 18, box(4, 4, 20, 16))]),
    "r0": ("train", [inst(6, 1, rle(0, 5))]),
}


def paint(instances: list[dict]) -> Image.Image:
    """White image, the instances of the first instance's category red (what the stand-in
    localiser finds)."""
    arr = np.full((H, W, 3), 255, dtype=np.uint8)
    for i in instances:
        if i["category"] == instances[0]["category"]:
            arr[instance_mask(i, W, H)] = (255, 0, 0)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory) -> Path:
    """A prepared dataset with two captions per image (groups) and COCO-style annotations."""
    root = tmp_path_factory.mktemp("coco_like")
    samples, annotations = [], {}
    for group, (split, instances) in IMAGES.items():
        path = root / f"{group}.png"
        paint(instances).save(path)
        labels = tuple(CATEGORIES[c] for c in sorted({i["category_id"] for i in instances}))
        samples += [Sample(f"{group}_{c}", path, f"{group} caption {c}", labels, group=group, split=split)
                    for c in range(2)]
        annotations[group] = {"split": split, "file_name": path.name, "width": W, "height": H,
                              "instances": instances}
    hierarchy = Hierarchy.from_parents({name: None for name in CATEGORIES.values()})
    return write_prepared(DatasetBuild(samples, hierarchy, annotations=annotations), root / "prepared",
                          dataset="coco", options={}, max_samples=0, split_seed=0, val_fraction=0.0,
                          test_fraction=0.0)


class FakeEmbed:
    """Texts -> ``[n, 3]`` features ``(len, number of a's, 1)``; records its calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32)


def test_one_pair_per_image_and_present_category_with_the_union_mask_and_the_prompt(coco_like: Path) -> None:
    prepared, annotations = load_prepared(coco_like), load_annotations(coco_like)
    embed = FakeEmbed()
    lp = LocaliseParams(queries=0, prompt="an image of {} here")
    pairs, feats = mask_queries(prepared, annotations, lp, {"txt": embed})
    # category id order within an image (person 1 < dog 18; the crowd dog is a dog); t2 gives none
    assert [(p.ids["image"], p.ids["category"]) for p in pairs] == [
        ("t0", "person"), ("t0", "dog"), ("t1", "cat"), ("t3", "dog")]
    assert [p.text for p in pairs] == [f"an image of {c} here" for c in ("person", "dog", "cat", "dog")]
    assert [p.labels for p in pairs] == [("person",), ("dog",), ("cat",), ("dog",)]
    assert [prepared.groups[p.row] for p in pairs] == ["t0", "t0", "t1", "t3"]
    assert all(prepared.ids[p.row].endswith("_0") for p in pairs)  # an image's first row stands for it
    dogs = pairs[1].load_mask()
    assert dogs.shape == (H, W) and dogs.sum() == 8 * H  # two 4-column instances, crowd included
    assert dogs[:, 20:24].all() and dogs[:, 30:34].all() and not dogs[:, :20].any()
    assert np.array_equal(pairs[0].load_mask(), instance_mask(IMAGES["t0"][1][1], W, H))
    polygon = instance_mask(IMAGES["t3"][1][0], W, H)
    assert np.array_equal(pairs[3].load_mask(), polygon) and polygon[10, 10] and not polygon[20, 30]
    assert pairs[2].load_image().size == (W, H)
    # the text model ran once, each distinct prompt once; row i is pair i's prompt's feature
    assert embed.calls == [["an image of person here", "an image of dog here", "an image of cat here"]]
    assert feats["txt"].dtype == np.float32
    assert np.array_equal(feats["txt"], FakeEmbed()([p.text for p in pairs]))


def test_queries_take_images_spread_over_the_split(coco_like: Path) -> None:
    prepared, annotations = load_prepared(coco_like), load_annotations(coco_like)
    assert [prepared.groups[r] for r in image_rows(prepared, "test", 0)] == ["t0", "t1", "t2", "t3"]
    assert [prepared.groups[r] for r in image_rows(prepared, "test", 2)] == ["t0", "t3"]
    assert [prepared.groups[r] for r in image_rows(prepared, "all", 0)] == ["t0", "t1", "t2", "t3", "r0"]
    pairs, _ = mask_queries(prepared, annotations, LocaliseParams(queries=2), {"txt": FakeEmbed()})
    assert [p.text for p in pairs] == ["a photo of a person.", "a photo of a dog.", "a photo of a dog."]
    assert present_categories({"instances": []}) == []


def test_masks_source_refuses_missing_annotations_and_a_wrong_image_size(coco_like: Path) -> None:
    prepared, annotations = load_prepared(coco_like), load_annotations(coco_like)
    with pytest.raises(ValueError, match="no instance annotations"):
        mask_queries(prepared, {}, LocaliseParams(queries=0), {"txt": FakeEmbed()})
    wrong = {g: {**a, "width": W + 1} for g, a in annotations.items()}
    pairs, _ = mask_queries(prepared, wrong, LocaliseParams(queries=0), {"txt": FakeEmbed()})
    with pytest.raises(ValueError, match="40 x 32 but its annotations say 41 x 32"):
        pairs[0].load_mask()
    with pytest.raises(ValueError, match="hold no annotated instance"):
        mask_queries(prepared, annotations, LocaliseParams(queries=0, split="val"), {"txt": FakeEmbed()})


def test_composite_pairs_carry_the_queried_items_stored_caption_features(coco_like: Path) -> None:
    prepared = load_prepared(coco_like)
    stored = np.arange(len(prepared) * 2, dtype=np.float16).reshape(-1, 2)
    lp = LocaliseParams(queries=3, grid=1, cell=16, split="all")
    pairs, feats = composite_queries(prepared, lp, {"txt": stored})
    assert [p.ids for p in pairs] == [{"item_row": p.row, "caption": prepared.captions[p.row]} for p in pairs]
    assert [p.text for p in pairs] == [prepared.captions[p.row] for p in pairs]
    assert np.array_equal(feats["txt"], stored[[p.row for p in pairs]].astype(np.float32))
    assert pairs[0].load_mask().shape == (16, 16) and pairs[0].load_image().size == (16, 16)


def test_source_auto_follows_the_dataset_and_the_checks_name_the_problem(raw: dict) -> None:
    assert localise_source("auto", "coco") == "masks"
    assert localise_source("auto", "emoji") == "composite"
    assert localise_source("composite", "coco") == "composite"
    assert localise_source("masks", "coco") == "masks"
    check_localise(LocaliseParams(queries=0), "coco")  # every val2017 image
    check_localise(LocaliseParams(source="composite"), "coco")
    with pytest.raises(ParamsError, match="localise.source: masks needs a dataset with instance masks .*emoji"):
        check_localise(LocaliseParams(source="masks"), "emoji")
    with pytest.raises(ParamsError, match="localise.queries: 0 .* composite"):
        check_localise(LocaliseParams(queries=0), "emoji")
    with pytest.raises(ParamsError, match="localise.queries: must be >= 0"):
        check_localise(LocaliseParams(queries=-1), "coco")
    for prompt in ("a photo", "{} and {}", "a {0} photo", "{a} {}"):
        with pytest.raises(ParamsError, match="localise.prompt: must hold one"):
            check_localise(LocaliseParams(prompt=prompt), "coco")
    assert params_from_dict(raw).localise.source == "auto"  # params.yaml
    raw["localise"]["source"] = "masks"
    with pytest.raises(ParamsError, match="localise.source: masks needs"):
        params_from_dict(raw)  # on params.yaml's dataset, emoji
    raw["data"]["dataset"] = "coco"
    assert params_from_dict(raw).localise.source == "masks"
    raw["localise"]["source"] = "mask"
    with pytest.raises(ParamsError, match="localise.source: 'mask' is not one of auto, composite, masks"):
        params_from_dict(raw)


# ----------------------------------------------------------------------------- the stage


class RedLocaliser(Localiser):
    """Stand-in localiser: the heat map is the image's red-minus-green channel on a grid of the
    image's size (the painted category), the feature ``[1, d]`` a fixed linear function of the
    input's mean colour."""

    def __init__(self, dim: int) -> None:
        self.proj = torch.linspace(-1.0, 1.0, 3 * dim).reshape(3, dim)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def view_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        return 0.0, 0.0, float(width), float(height)

    def heat(self, x: torch.Tensor, target) -> tuple[np.ndarray, float]:
        feat = (x.mean(dim=(2, 3)) @ self.proj).requires_grad_(True)
        value = target(feat)
        return (x[0, 0] - x[0, 1]).numpy(), float(value.detach())


def test_the_stage_scores_every_image_and_category_pair_in_masks_mode(coco_like: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    from sparc.features.store import write_stream
    from sparc.localise import stage as localise_stage
    from sparc.model.io import save_sae
    from sparc.model.sae import MultiStreamSAE, SAEConfig

    dims = {"effnet": 6, "minilm": 3}
    params = params_from_dict({
        "L": 8, "k": 3, "data": {"dataset": "coco"},
        "streams": {"effnet": {"model": "efficientnet:lite0", "input": "image"},
                    "minilm": {"model": "minilm:all-MiniLM-L6-v2", "input": "caption"}},
        "localise": {"queries": 0, "overlays": 2},
    })
    prepared = load_prepared(coco_like)
    rng = np.random.default_rng(0)
    for name, d in dims.items():
        write_stream(tmp_path / "features" / name, prepared.ids, rng.normal(size=(len(prepared), d)).astype(np.float32),
                     {**asdict(params.streams[name]), "dataset_fingerprint": prepared.fingerprint})
    sae = save_sae(MultiStreamSAE(SAEConfig(dims=dims, L=8, k=3), seed=0), tmp_path / "sae")
    embed = FakeEmbed()
    monkeypatch.setattr(localise_stage, "build_localiser", lambda spec, layers: RedLocaliser(dims["effnet"]))
    monkeypatch.setattr(localise_stage, "caption_embedder", lambda spec: embed)
    out = localise_stage.run_localise(params, sae_dir=sae, features_root=tmp_path / "features",
                                      prepared_dir=coco_like, concepts_dir=tmp_path, out_dir=tmp_path / "out",
                                      progress=False)
    assert embed.calls == [["a photo of a person.", "a photo of a dog.", "a photo of a cat."]]
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics) == ["ap_chance", "ap_effnet", "miou_chance", "miou_effnet"]
    details = json.loads((out / "details.json").read_text())
    assert (details["source"], details["n_queries"], details["n_images"]) == ("masks", 4, 3)
    assert "canvas_px" not in details and "grid" not in details["params"]
    assert details["params"]["prompt"] == "a photo of a {}."
    with (out / "pairs.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["query", "image", "category", "prompt", "method", "iou", "target"]
    assert len(rows) == 2 * 4
    ious = {(r["method"], r["image"], r["category"]): float(r["iou"]) for r in rows}
    # the red pixels are each image's first category (both dogs of t0, the crowd one included)
    assert ious[("effnet", "t0", "dog")] == ious[("effnet", "t1", "cat")] == ious[("effnet", "t3", "dog")] == 1.0
    assert ious[("effnet", "t0", "person")] == 0.0
    assert metrics["miou_effnet"] > metrics["miou_chance"]
    assert (out / "overlays.npz").is_file()
