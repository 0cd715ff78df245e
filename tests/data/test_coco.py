"""COCO 2017 from a local server serving the annotations zip (captions and instances JSON) and
JPEGs: captions joined or one per caption, labels, hierarchy, splits, kept instance masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sparc.data import coco
from sparc.data.prepared import load_annotations, load_prepared, write_prepared
from sparc.params import CocoOptions
from tests.data.remote_fixtures import COCO_SPLIT_SIZES, coco_files, coco_image_id, serve_mirror

FAST = {"retries": 1, "backoff_s": 0.0, "timeout_s": 10.0, "progress": False}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """The fixture COCO downloaded once from the local server (data/raw/coco layout)."""
    raw = tmp_path_factory.mktemp("raw") / "coco"
    with serve_mirror({"coco": coco_files()}) as server:
        coco.download_coco(CocoOptions(), raw, base_url=server.url, workers=4, **FAST)
        assert sorted({p.split("/")[2] for p, _ in server.log}) == ["annotations", "train2017", "val2017"]
    return raw


def prepare(build, out: Path):
    return load_prepared(write_prepared(build, out, dataset="coco", options={}, max_samples=0, split_seed=0,
                                        val_fraction=0.3, test_fraction=0.2))


def stem(split: str, i: int) -> str:
    return f"{coco_image_id(split, i):012d}"


def test_joined_captions_one_sample_per_image(raw: Path, tmp_path: Path) -> None:
    build = coco.build_coco(CocoOptions(), tmp_path / "work", raw=raw)
    # The last image of each split has no caption: left out.
    assert len(build.samples) == sum(n - 1 for n in COCO_SPLIT_SIZES.values())
    first = build.samples[0]
    assert first.id == stem("train2017", 0)  # id order, not file order
    assert first.caption == " ".join(f"A train2017 photo 0, caption {c}." for c in range(5))
    assert first.labels == ("person", "dog")  # category id order, the crowd dog included
    assert {s.split for s in build.samples} == {"trainval", "test"}
    data = prepare(build, tmp_path / "prep")
    assert {data.splits[i] for i, g in enumerate(data.ids) if int(g) >= 1000} == {"train", "val"}  # train2017
    assert {data.splits[i] for i, g in enumerate(data.ids) if int(g) < 1000} == {"test"}  # val2017
    with (data.root / "samples.csv").open(newline="") as fh:
        assert "group" not in next(csv.reader(fh))  # one sample per image: no groups


def test_hierarchy_is_supercategory_then_category(raw: Path, tmp_path: Path) -> None:
    hierarchy = coco.build_coco(CocoOptions(splits=["val2017"]), tmp_path / "work", raw=raw).hierarchy
    assert hierarchy.parents["car"] == "supercategory:vehicle"
    assert hierarchy.parents["person"] == "supercategory:person"  # a category and its supercategory
    assert hierarchy.depth("dog") == 2 and hierarchy.names["supercategory:animal"] == "animal"


def test_each_caption_is_a_sample_and_an_images_captions_share_a_split(raw: Path, tmp_path: Path) -> None:
    build = coco.build_coco(CocoOptions(captions="each", max_images=3), tmp_path / "work", raw=raw)
    assert len(build.samples) == 2 * 3 * 5
    data = prepare(build, tmp_path / "prep")
    for group in set(data.groups):
        assert len({data.splits[i] for i, g in enumerate(data.groups) if g == group}) == 1
    image_0 = [i for i, g in enumerate(data.groups) if g == stem("train2017", 0)]
    assert [data.ids[i] for i in image_0] == [f"{stem('train2017', 0)}_{coco_image_id('train2017', 0) * 10 + c}"
                                              for c in range(5)]
    assert data.captions[image_0[2]] == "A train2017 photo 0, caption 2."
    # Retrieval keeps one caption per image.
    test_rows = data.indices("test")
    assert [data.groups[i] for i in data.one_per_group(test_rows)] == [stem("val2017", i) for i in range(3)]


def test_instance_masks_are_kept_and_decode(raw: Path, tmp_path: Path) -> None:
    build = coco.build_coco(CocoOptions(splits=["train2017"], max_images=2), tmp_path / "work", raw=raw)
    data = prepare(build, tmp_path / "prep")
    annotations = load_annotations(data.root)
    assert sorted(annotations) == sorted(set(data.groups))
    image = annotations[stem("train2017", 0)]
    assert (image["width"], image["height"]) == (40, 32)
    person = coco.category_mask(image, "person")  # polygon (4,4)-(20,16)
    assert person.shape == (32, 40) and person[10, 10] and not person[20, 30]
    assert 150 <= person.sum() <= 240
    crowd = coco.category_mask(image, "dog")  # uncompressed RLE: columns 30 and 31
    assert crowd.sum() == 64 and crowd[:, 30:32].all()
    assert not coco.category_mask(image, "car").any()
    with pytest.raises(ValueError, match="compressed RLE"):
        coco.instance_mask({"id": 1, "segmentation": {"counts": "abc", "size": [2, 2]}}, 2, 2)


def test_zip_members_are_extracted_once(raw: Path) -> None:
    manifest = json.loads((raw / "manifest.json").read_text())
    member = coco.captions_path("val2017")
    assert member in manifest["files"] and coco.ANNOTATIONS_ZIP in manifest["files"]
    before = (raw / member).stat().st_mtime_ns
    coco.extract_annotations(raw, ["val2017"])
    assert (raw / member).stat().st_mtime_ns == before
    assert manifest["info"]["images"] == {s: n - 1 for s, n in COCO_SPLIT_SIZES.items()}
