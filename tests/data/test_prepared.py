"""The prepared dataset: deterministic splits, subsets, atomic writes, round trip, fingerprint."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sparc.data
from sparc.data.base import DatasetBuild, Sample
from sparc.data.hierarchy import Hierarchy
from sparc.data.prepared import (
    load_annotations,
    load_prepared,
    load_prepared_index,
    prepare_dataset,
    split_of,
    spread_subset,
    write_prepared,
)
from sparc.params import DataParams

HIER = Hierarchy.from_parents({"a": None, "a/x": "a", "a/y": "a", "b": None})


def make_image(path: Path, color: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def make_build(root: Path, n: int = 12, captions: dict[str, str] | None = None) -> DatasetBuild:
    """n samples with images under ``root`` (absolute paths), labels cycling through HIER."""
    labels = [("a/x",), ("a/y",), ("b",), ("a/x", "b"), ()]
    samples = []
    for i in range(n):
        sid = f"s{i:03d}"
        img = make_image(root / f"{sid}.png", (i * 20 % 256, 0, 0))
        cap = (captions or {}).get(sid, f"caption {i}")
        samples.append(Sample(sid, img, cap, labels[i % len(labels)]))
    return DatasetBuild(samples, HIER, skipped=[("bad1", "why")], info={"source": "test"})


def write(build: DatasetBuild, out: Path, **kw) -> Path:
    args = dict(dataset="t", options={"o": 1}, max_samples=0, split_seed=0, val_fraction=0.1, test_fraction=0.2)
    args.update(kw)
    return write_prepared(build, out, **args)


def test_split_of_is_a_function_of_seed_and_id() -> None:
    ids = [f"id{i}" for i in range(20000)]
    splits = [split_of(i, 0, 0.1, 0.2) for i in ids]
    frac = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
    assert abs(frac["test"] - 0.2) < 0.015 and abs(frac["val"] - 0.1) < 0.015
    assert splits == [split_of(i, 0, 0.1, 0.2) for i in ids]
    other_seed = [split_of(i, 1, 0.1, 0.2) for i in ids]
    assert other_seed != splits
    assert {split_of(i, 0, 0.0, 0.0) for i in ids[:100]} == {"train"}


def test_split_does_not_depend_on_other_samples(tmp_path: Path) -> None:
    full = load_prepared(write(make_build(tmp_path / "img", 40), tmp_path / "full"))
    small_build = make_build(tmp_path / "img", 40)
    small_build.samples = small_build.samples[::3]
    small = load_prepared(write(small_build, tmp_path / "small"))
    full_split = dict(zip(full.ids, full.splits, strict=True))
    assert len(small) == 14
    assert all(full_split[i] == s for i, s in zip(small.ids, small.splits, strict=True))


def test_spread_subset() -> None:
    assert spread_subset(10, 0).tolist() == list(range(10))
    assert spread_subset(10, 10).tolist() == list(range(10))
    assert spread_subset(10, 50).tolist() == list(range(10))
    sub = spread_subset(100, 7)
    assert len(sub) == 7 and sub[0] == 0 and sub[-1] == 99
    assert np.all(np.diff(sub) > 0)
    gaps = np.diff(sub)
    assert gaps.max() - gaps.min() <= 1  # evenly spread
    assert spread_subset(5, 1).tolist() == [0]


def test_round_trip(tmp_path: Path) -> None:
    build = make_build(tmp_path / "img")
    out = write(build, tmp_path / "prep")
    data = load_prepared(out)
    assert data.ids == [s.id for s in build.samples]
    assert data.captions == [s.caption for s in build.samples]
    assert data.labels == [s.labels for s in build.samples]
    assert [p.resolve() for p in data.images] == [s.image.resolve() for s in build.samples]
    assert data.hierarchy.parents == HIER.parents
    assert data.meta["dataset"] == "t" and data.meta["options"] == {"o": 1}
    assert data.meta["skipped"] == [{"id": "bad1", "reason": "why"}]
    assert data.meta["info"] == {"source": "test"}
    assert sum(data.meta["splits"].values()) == len(data) == 12
    for split in ("train", "val", "test"):
        idx = data.indices(split)
        assert np.all(data.splits[idx] == split)
    assert sorted(np.concatenate([data.indices(s) for s in ("train", "val", "test")]).tolist()) == list(range(12))
    with pytest.raises(ValueError, match="unknown split"):
        data.indices("dev")
    assert not (tmp_path / "prep.tmp").exists()


def test_index_holds_the_ids_splits_and_meta_of_the_full_read(tmp_path: Path) -> None:
    out = write(make_build(tmp_path / "img"), tmp_path / "prep")
    data, index = load_prepared(out), load_prepared_index(out)
    assert index.ids == data.ids and np.array_equal(index.splits, data.splits) and index.meta == data.meta
    assert index.fingerprint == data.fingerprint and len(index) == len(data) == 12
    for split in ("train", "val", "test"):
        assert np.array_equal(index.indices(split), data.indices(split))
    (out / "hierarchy.json").unlink()  # not needed to align and split rows
    assert load_prepared_index(out).ids == data.ids
    (out / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        load_prepared_index(out)


def test_subset_keeps_builder_order(tmp_path: Path) -> None:
    build = make_build(tmp_path / "img", 12)
    data = load_prepared(write(build, tmp_path / "prep", max_samples=4))
    assert data.ids == [build.samples[i].id for i in spread_subset(12, 4)]
    assert data.meta["n_source"] == 12 and data.meta["n_samples"] == 4


def test_fingerprint_tracks_captions_and_image_bytes(tmp_path: Path) -> None:
    out = tmp_path / "prep"
    build = make_build(tmp_path / "img")
    fp = load_prepared(write(build, out)).fingerprint
    assert load_prepared(write(build, out)).fingerprint == fp  # same input, same fingerprint

    changed = make_build(tmp_path / "img", captions={"s003": "caption 3!"})
    fp_caption = load_prepared(write(changed, out)).fingerprint
    assert fp_caption != fp

    build = make_build(tmp_path / "img")
    assert load_prepared(write(build, out)).fingerprint == fp
    img = Image.open(build.samples[5].image).convert("RGB")
    img.putpixel((0, 0), (1, 2, 3))
    img.save(build.samples[5].image)
    fp_image = load_prepared(write(build, out)).fingerprint
    assert fp_image not in (fp, fp_caption)


def test_duplicate_ids_rejected(tmp_path: Path) -> None:
    build = make_build(tmp_path / "img", 5)
    build.samples.append(build.samples[2])
    with pytest.raises(ValueError, match="duplicate sample id 's002'"):
        write(build, tmp_path / "prep")
    assert not (tmp_path / "prep").exists() and not (tmp_path / "prep.tmp").exists()


def test_label_not_in_hierarchy_rejected(tmp_path: Path) -> None:
    build = make_build(tmp_path / "img", 5)
    build.samples[3] = Sample("s003", build.samples[3].image, "c", ("a/z",))
    with pytest.raises(ValueError, match="sample 's003' has label 'a/z' not in the hierarchy"):
        write(build, tmp_path / "prep")
    assert not (tmp_path / "prep").exists()


def test_no_samples_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no usable samples"):
        write(DatasetBuild([], HIER), tmp_path / "prep")


def _rendering_builder(n: int, fail: bool = False, duplicate: bool = False):
    """A builder that renders n images into work_dir (like emoji), optionally failing."""

    def build(options, work_dir: Path) -> DatasetBuild:
        samples = []
        for i in range(n):
            img = make_image(work_dir / f"r{i}.png", (0, 10 * i, 0))
            samples.append(Sample(f"r{i}", img, f"render {i}", ("b",)))
        if fail:
            raise RuntimeError("builder broke halfway")
        if duplicate:
            samples.append(samples[0])
        return DatasetBuild(samples, HIER)

    return build


@pytest.fixture()
def fake_builder(monkeypatch):
    def install(builder) -> None:
        monkeypatch.setattr(sparc.data, "get_builder", lambda name: builder)

    return install


def test_prepare_rendered_images_are_relative(tmp_path: Path, fake_builder, any_split_sizes) -> None:
    fake_builder(_rendering_builder(6))
    data_params = DataParams(dataset="emoji", max_samples=3)
    out = prepare_dataset(data_params, tmp_path / "prep")
    data = load_prepared(out)
    with (out / "samples.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == ["images/r0.png", "images/r2.png", "images/r5.png"]
    assert all(p.is_file() for p in data.images)
    # images that did not make the subset are not kept
    assert sorted(p.name for p in (out / "images").iterdir()) == ["r0.png", "r2.png", "r5.png"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["options"] == {"skin_tones": False, "size": 160}
    # relative paths: the same data prepared elsewhere has the same fingerprint
    again = load_prepared(prepare_dataset(data_params, tmp_path / "elsewhere" / "prep"))
    assert again.fingerprint == data.fingerprint
    assert not (tmp_path / "prep.tmp").exists()


@pytest.mark.parametrize("kind", ["builder", "writer"])
def test_failure_leaves_no_output(tmp_path: Path, fake_builder, kind: str) -> None:
    out = tmp_path / "prep"
    fake_builder(_rendering_builder(4, fail=kind == "builder", duplicate=kind == "writer"))
    with pytest.raises((RuntimeError, ValueError)):
        prepare_dataset(DataParams(dataset="emoji"), out)
    assert not out.exists()
    assert not (tmp_path / "prep.tmp").exists()


def test_failure_keeps_previous_output(tmp_path: Path, fake_builder, any_split_sizes) -> None:
    out = tmp_path / "prep"
    fake_builder(_rendering_builder(4))
    before = load_prepared(prepare_dataset(DataParams(dataset="emoji"), out)).fingerprint
    fake_builder(_rendering_builder(4, fail=True))
    with pytest.raises(RuntimeError, match="builder broke halfway"):
        prepare_dataset(DataParams(dataset="emoji"), out)
    assert load_prepared(out).fingerprint == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]


def test_load_prepared_names_missing_file(tmp_path: Path) -> None:
    out = write(make_build(tmp_path / "img", 3), tmp_path / "prep")
    (out / "hierarchy.json").unlink()
    with pytest.raises(FileNotFoundError, match="hierarchy.json is missing"):
        load_prepared(out)


def grouped_build(root: Path, n_images: int = 40, per_image: int = 3) -> DatasetBuild:
    """``per_image`` captions of each of ``n_images`` images (one group per image)."""
    samples = []
    for g in range(n_images):
        img = make_image(root / f"img{g:03d}.png", (g * 6 % 256, 40, 0))
        samples += [Sample(f"g{g:03d}_{c}", img, f"image {g} caption {c}", ("b",), group=f"g{g:03d}")
                    for c in range(per_image)]
    return DatasetBuild(samples, HIER)


def test_split_is_by_group_so_an_image_never_straddles_splits(tmp_path: Path) -> None:
    data = load_prepared(write(grouped_build(tmp_path / "img"), tmp_path / "prep", val_fraction=0.3, test_fraction=0.3))
    by_group: dict[str, set[str]] = {}
    for group, split in zip(data.groups, data.splits, strict=True):
        by_group.setdefault(group, set()).add(str(split))
    assert all(len(s) == 1 for s in by_group.values())
    assert {split_of(g, 0, 0.3, 0.3) for g in by_group} == {"train", "val", "test"}
    assert all(by_group[g] == {split_of(g, 0, 0.3, 0.3)} for g in by_group)
    with (data.root / "samples.csv").open(newline="") as fh:
        assert next(csv.reader(fh))[-1] == "group"
    assert json.loads((data.root / "meta.json").read_text())["n_groups"] == 40
    # One caption per image for retrieval: the first row of each group.
    rows = data.indices("test")
    assert [data.ids[i] for i in data.one_per_group(rows)] == sorted(
        {data.ids[i].split("_")[0] + "_0" for i in rows})


def test_without_groups_the_split_and_columns_are_unchanged(tmp_path: Path) -> None:
    """Datasets without groups (emoji, clipart, folder without a group column) keep their bytes:
    no group column, the split hashes the sample id exactly as before."""
    build = make_build(tmp_path / "img", 30)
    same_group = DatasetBuild([Sample(s.id, s.image, s.caption, s.labels, group=s.id) for s in build.samples],
                              HIER, skipped=build.skipped, info=build.info)
    out = write(build, tmp_path / "prep")
    assert (out / "samples.csv").read_text().splitlines()[0] == "id,image,caption,labels,split,image_sha256"
    assert write(same_group, tmp_path / "prep2").joinpath("samples.csv").read_bytes() == (
        out / "samples.csv").read_bytes()
    data = load_prepared(out)
    assert list(data.splits) == [split_of(i, 0, 0.1, 0.2) for i in data.ids]
    assert data.groups == data.ids and "n_groups" not in json.loads((out / "meta.json").read_text())
    assert list(data.one_per_group(data.indices("test"))) == list(data.indices("test"))
    assert not (out / "annotations.jsonl").exists()


def test_official_and_trainval_splits(tmp_path: Path) -> None:
    build = make_build(tmp_path / "img", 40)
    fixed = [Sample(s.id, s.image, s.caption, s.labels, split="test" if i < 10 else "trainval")
             for i, s in enumerate(build.samples)]
    data = load_prepared(write(DatasetBuild(fixed, HIER), tmp_path / "prep", val_fraction=0.25, test_fraction=0.5))
    assert set(data.splits[:10]) == {"test"}
    assert set(data.splits[10:]) == {"train", "val"}
    assert list(data.splits[10:]) == [split_of(i, 0, 0.25, 0.0) for i in data.ids[10:]]
    bad = [Sample("x", fixed[0].image, "c", (), split="validation")]
    with pytest.raises(ValueError, match="sample 'x' has split 'validation'"):
        write(DatasetBuild(bad, HIER), tmp_path / "bad")


def test_portable_paths_and_annotations(tmp_path: Path) -> None:
    """Downloaded images are named relative to the prepared directory; annotations of kept groups
    are written in row order."""
    build = grouped_build(tmp_path / "raw" / "ds", n_images=6, per_image=2)
    build.portable_paths = True
    build.annotations = {f"g{g:03d}": {"width": 8, "instances": [{"category": "b"}]} for g in range(6)}
    out = write(build, tmp_path / "prepared" / "ds", max_samples=4)
    with (out / "samples.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["image"] == "../../raw/ds/img000.png"
    assert all(p.is_file() for p in load_prepared(out).images)
    kept = list(dict.fromkeys(r["group"] for r in rows))
    assert list(load_annotations(out)) == kept
    assert load_annotations(out)[kept[0]] == {"width": 8, "instances": [{"category": "b"}]}
