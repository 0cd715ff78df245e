"""Open Images: the hierarchy converter, the files' formats, and download + build from a local
server serving the real formats (captions JSONL, labels and class CSVs, hierarchy JSON, JPEGs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sparc.data import openimages as oi
from sparc.data.download import cache_dir, state_path
from sparc.data.hierarchy import ROOT
from sparc.data.prepared import load_prepared, write_prepared
from sparc.params import OpenImagesOptions
from tests.data.remote_fixtures import (
    OI_CLASSES,
    OI_HIERARCHY,
    OI_LEAVES,
    OI_SPLIT_SIZES,
    oi_image_id,
    openimages_files,
    serve_mirror,
)

FAST = {"retries": 1, "backoff_s": 0.0, "timeout_s": 10.0, "progress": False}


def test_a_label_in_several_places_takes_its_deepest_occurrence() -> None:
    hierarchy, info = oi.convert_hierarchy(OI_HIERARCHY, OI_CLASSES)
    # Teddy bear: under Toy (depth 2) and under Animal > Mammal (depth 3): Mammal wins.
    assert hierarchy.parents["/m/teddy"] == "/m/mammal" and hierarchy.depth("/m/teddy") == 3
    assert info["multi_placed"] == {"/m/teddy": [2, 3]}
    # The file's root is the hierarchy's root: its children are at depth 1, as in method.md.
    assert hierarchy.parents["/m/toy"] == ROOT and hierarchy.depth("/m/toy") == 1
    assert "/m/0bl9f" not in hierarchy.labels
    # A Part places nothing: Wheel (a class listed only as a part) hangs from the root.
    assert hierarchy.parents["/m/wheel"] == ROOT and info["outside_tree"] == ["/m/wheel"]
    assert hierarchy.names["/m/teddy"] == "Teddy bear"
    assert hierarchy.ancestor_at("/m/cat", 1) == "/m/animal"
    assert sorted(hierarchy.labels) == sorted(k for k in OI_CLASSES if k != "/m/0bl9f")


def test_equally_deep_occurrences_keep_the_first() -> None:
    tree = {"LabelName": "/m/r", "Subcategory": [
        {"LabelName": "/m/a", "Subcategory": [{"LabelName": "/m/x"}]},
        {"LabelName": "/m/b", "Subcategory": [{"LabelName": "/m/x"}]},
    ]}
    hierarchy, _ = oi.convert_hierarchy(tree)
    assert hierarchy.parents["/m/x"] == "/m/a"


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ([], "expected an object"),
        ({"LabelName": "/m/r", "Subcategory": [{"Name": "x"}]}, "has no LabelName"),
        ({"LabelName": "/m/r", "Subcategory": [{"LabelName": "/m/a", "Subcategory": {}}]}, "is not a list"),
        ({"LabelName": "/m/r", "Subcategory": [{"LabelName": "/m/r"}]}, "listed again"),
    ],
)
def test_malformed_hierarchy_is_named(tree, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        oi.convert_hierarchy(tree)


@pytest.mark.parametrize("header", [True, False])
def test_class_descriptions_with_or_without_header(tmp_path: Path, header: bool) -> None:
    path = tmp_path / "classes.csv"
    path.write_bytes(openimages_files(label_header=header)[oi.CLASSES_PATH])
    assert oi.read_class_descriptions(path) == OI_CLASSES


def test_narratives_name_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "n.jsonl"
    path.write_text('{"image_id": "ab12", "caption": "x"}\n{"image_id": "../etc", "caption": "y"}\n')
    with pytest.raises(ValueError, match="line 2: image_id '../etc' is not a plain id"):
        oi.read_narratives(path)
    path.write_text('{"image_id": "ab12"}\n')
    with pytest.raises(ValueError, match="line 1: not a Localized Narrative"):
        oi.read_narratives(path)


def test_real_file_names_and_urls() -> None:
    files = {f.path: f.url for f in oi.metadata_files(["train", "test"])}
    gcs = "https://storage.googleapis.com"
    assert files["narratives/open_images_train_v6_captions.jsonl"] == (
        f"{gcs}/localized-narratives/annotations/open_images_train_v6_captions.jsonl")
    assert files["narratives/open_images_test_captions.jsonl"] == (
        f"{gcs}/localized-narratives/annotations/open_images_test_captions.jsonl")
    assert files["labels/test-annotations-human-imagelabels-boxable.csv"] == (
        f"{gcs}/openimages/v5/test-annotations-human-imagelabels-boxable.csv")
    assert files[oi.CLASSES_PATH] == f"{gcs}/openimages/v7/oidv7-class-descriptions-boxable.csv"
    assert files[oi.HIERARCHY_PATH].endswith("/bbox_labels_600_hierarchy.json")


@pytest.fixture()
def served():
    tree = openimages_files()
    with serve_mirror({"openimages": tree}) as server:
        yield server, tree


def download(server, raw: Path, **options) -> dict:
    oi.download_openimages(OpenImagesOptions(**options), raw, base_url=server.url, workers=4, **FAST)
    return json.loads((raw / "manifest.json").read_text())


def test_subset_downloads_the_first_images_and_builds_their_narratives(served, tmp_path: Path) -> None:
    server, tree = served
    raw = tmp_path / "openimages"
    manifest = download(server, raw, max_images=3)
    fetched_images = sorted(p for p, _ in server.log if p.endswith(".jpg"))
    expected = sorted(f"/openimages/{oi.image_path(s, oi_image_id(s, i))}" for s in OI_SPLIT_SIZES for i in range(3))
    assert fetched_images == expected
    assert manifest["info"]["images"] == {"train": 3, "validation": 3, "test": 3}
    build = oi.build_openimages(OpenImagesOptions(max_images=3), tmp_path / "work", raw=raw)
    by_id = {s.id: s for s in build.samples}
    # 3 images per split, the second with two narratives: 4 samples per split.
    assert len(build.samples) == 12
    second = oi_image_id("test", 1)
    assert by_id[f"{second}_0"].group == by_id[f"{second}_1"].group == second
    assert by_id[f"{second}_1"].caption == "In this image we can see a dog number 1, take 1."
    assert {s.split for s in build.samples if s.id.startswith(oi_image_id("validation", 0))} == {"val"}
    # Labels: Confidence 1 only (Car is a Confidence 0 row on every image), in the hierarchy.
    first = by_id[f"{oi_image_id('train', 0)}_0"]
    assert first.labels == (OI_LEAVES[0],)
    assert build.portable_paths and build.info["splits"]["test"]["label_rows"]["negative"] == 3


def test_prepared_openimages_keeps_an_images_narratives_together(served, tmp_path: Path) -> None:
    server, _ = served
    raw = tmp_path / "raw" / "openimages"
    download(server, raw)
    build = oi.build_openimages(OpenImagesOptions(), tmp_path / "work", raw=raw)
    out = write_prepared(build, tmp_path / "prepared" / "openimages", dataset="openimages", options={},
                         max_samples=0, split_seed=0, val_fraction=0.5, test_fraction=0.5)
    data = load_prepared(out)
    assert len(data) == sum(n + 1 for n in OI_SPLIT_SIZES.values())
    # The official splits, whatever the fractions say.
    counts = {sp: int((data.splits == sp).sum()) for sp in ("train", "val", "test")}
    assert counts == {"train": 13, "val": 4, "test": 7}
    with (out / "samples.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["id", "image", "caption", "labels", "split", "image_sha256", "group"]
    assert rows[0]["image"].startswith("../../raw/openimages/train/")  # moves with the repository
    assert all(p.is_file() for p in data.images)
    unlabeled = next(r for r in rows if r["group"] == oi_image_id("test", OI_SPLIT_SIZES["test"] - 1))
    assert unlabeled["labels"] == ""
    assert json.loads((out / "meta.json").read_text())["n_groups"] == sum(OI_SPLIT_SIZES.values())


def test_unavailable_images_are_left_out_missing_ones_are_an_error(served, tmp_path: Path) -> None:
    server, _ = served
    gone = oi.image_path("test", oi_image_id("test", 1))
    del server.files[f"/openimages/{gone}"]
    raw = tmp_path / "openimages"
    manifest = download(server, raw, splits=["test"])
    assert manifest["unavailable"] == {gone: "HTTP 404 not here"}
    build = oi.build_openimages(OpenImagesOptions(splits=["test"]), tmp_path / "work", raw=raw)
    assert [r for _, r in build.skipped] == [f"image {gone} unavailable on the server (HTTP 404 not here)"] * 2
    (raw / oi.image_path("test", oi_image_id("test", 2))).unlink()
    with pytest.raises(FileNotFoundError, match="1 image.* not in .*run the download stage"):
        oi.build_openimages(OpenImagesOptions(splits=["test"]), tmp_path / "work", raw=raw)


def test_second_download_fetches_nothing_and_a_bigger_subset_only_the_rest(served, tmp_path: Path) -> None:
    server, _ = served
    raw = tmp_path / "openimages"
    first = download(server, raw, splits=["test"], max_images=2)
    n = len(server.log)
    assert download(server, raw, splits=["test"], max_images=2) == first and len(server.log) == n
    download(server, raw, splits=["test"], max_images=4)
    assert sorted(p for p, _ in server.log[n:]) == sorted(
        f"/openimages/{oi.image_path('test', oi_image_id('test', i))}" for i in (2, 3))
    assert state_path(cache_dir(raw)).is_file()
