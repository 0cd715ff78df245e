"""Precomputed feature streams (sparc.features.precomputed): h5: and npy: files, rows matched by id."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from sparc.catalog import check_spec
from sparc.features.precomputed import coco_row_ids, import_stream, openimages_row_ids
from sparc.features.registry import build_extractor
from sparc.features.store import FeatureStoreError, open_stream

META = {"stream": "s", "model": "", "input": "image"}


def write_h5(path: Path, features: np.ndarray, indices: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("features", data=features)
        if indices is not None:
            fh.create_dataset("indices", data=indices)
    return path


def test_npy_rows_are_matched_to_the_prepared_ids(tmp_path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "features.npy", x)
    (tmp_path / "ids.txt").write_text("a\nb\nc\nd\n")
    out = import_stream(check_spec(f"npy:{tmp_path}/features.npy", "image"), ["c", "a"], tmp_path / "out", META,
                        tmp_path, progress=False)
    stream = open_stream(out)
    assert stream.ids == ["c", "a"]
    np.testing.assert_array_equal(stream.features, x[[2, 0]].astype(np.float16))
    assert stream.meta["source"][0]["size"] == (tmp_path / "features.npy").stat().st_size


def test_h5_split_files_with_indices_and_an_ids_option(tmp_path) -> None:
    """{split} expands over the files that exist; indices[r] names the sample of row r."""
    write_h5(tmp_path / "train" / "f.h5", np.array([[1.0, 0], [2, 0]], np.float32), np.array([1, 0]))
    write_h5(tmp_path / "test" / "f.h5", np.array([[3.0, 0]], np.float32))
    for split, ids in (("train", "t0\nt1\n"), ("test", "x0\n")):
        (tmp_path / f"{split}.txt").write_text(ids)
    spec = check_spec(f"h5:{tmp_path}/{{split}}/f.h5?ids={tmp_path}/{{split}}.txt", "caption")
    stream = open_stream(import_stream(spec, ["x0", "t0", "t1"], tmp_path / "out", META, tmp_path, progress=False))
    np.testing.assert_array_equal(stream.features[:, 0], [3, 2, 1])
    assert [f["split"] for f in stream.meta["source"]] == ["train", "test"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, r"1 of the 2 prepared samples have no row in .* \(first: 'zz'\)"),
        (lambda d: write_h5(d / "f.h5", np.array([[np.nan, 0]] * 3, np.float32)),
         r"f.h5 row 0 \(sample 'a'\) holds NaN or infinite features"),
        (lambda d: (d / "ids.txt").write_text("a\nb\n"), "has 3 rows, but rows=ids gives 2 sample ids"),
    ],
)
def test_missing_ids_nan_and_wrong_row_counts_are_one_error(tmp_path, setup, message) -> None:
    write_h5(tmp_path / "f.h5", np.ones((3, 2), np.float32))
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")
    setup(tmp_path)
    with pytest.raises((ValueError, FeatureStoreError), match=message):
        import_stream(check_spec(f"h5:{tmp_path}/f.h5", "image"), ["a", "zz"] if "zz" in message else ["a"],
                      tmp_path / "out", META, tmp_path, progress=False)
    assert not (tmp_path / "out").exists()


def test_files_of_another_dimension_and_a_missing_key_are_named(tmp_path) -> None:
    write_h5(tmp_path / "train" / "f.h5", np.ones((1, 2), np.float32))
    write_h5(tmp_path / "test" / "f.h5", np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="differ in dimension"):
        import_stream(check_spec(f"h5:{tmp_path}/{{split}}/f.h5", "image"), ["a"], tmp_path / "o", META, tmp_path)
    with pytest.raises(ValueError, match="has no dataset 'feats'"):
        import_stream(check_spec(f"h5:{tmp_path}/train/f.h5?key=feats", "image"), ["a"], tmp_path / "o", META, tmp_path)
    with pytest.raises(ValueError, match=r"feature file .*val/f.h5 does not exist \(splits=val\)"):
        import_stream(check_spec(f"h5:{tmp_path}/{{split}}/f.h5?splits=val", "image"), ["a"], tmp_path / "o", META, tmp_path)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("h5:/f.h5?layer=3", "unknown option 'layer'"),
        ("npy:/f.npy?key=x", "unknown option 'key'"),
        ("h5:/f.h5?rows=nope", "rows='nope' is not one of ids, openimages, coco"),
        ("h5:/f.h5?rows=coco", r"rows=coco needs \{split\} in the path"),
        ("h5:/f.h5?splits=a", r"option splits needs \{split\} in the path"),
        ("h5:/{split}/f.h5?rows=coco&ids=/x", "option ids applies to rows=ids"),
    ],
)
def test_spec_options_are_checked_without_reading_files(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_spec(spec, "image")


def test_precomputed_features_are_not_a_model_to_run() -> None:
    with pytest.raises(ValueError, match="precomputed features"):
        build_extractor("npy:/f.npy", "image")


def test_reference_row_orders_of_open_images_and_coco(tmp_path) -> None:
    """Open Images: (image, narrative) pairs, images in order of first narrative; COCO: images by id."""
    from sparc.data.coco import captions_path
    from sparc.data.openimages import narratives_path

    lines = [{"image_id": i, "caption": "c"} for i in ("b", "a", "b", "c")]
    path = tmp_path / narratives_path("validation")
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert openimages_row_ids(tmp_path, "val") == ["b_0", "b_1", "a_0", "c_0"]
    images = [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 1, "file_name": "000000000001.jpg"}]
    path = tmp_path / captions_path("train2017")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": []}))
    assert coco_row_ids(tmp_path, "train") == ["000000000001", "000000000009"]
