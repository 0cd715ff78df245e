"""The folder dataset: a CSV of id, image, caption, labels plus an optional hierarchy JSON."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from sparc.data.folder import build_folder
from sparc.data.hierarchy import ROOT
from sparc.data.prepared import load_prepared, prepare_dataset
from sparc.params import DataParams, FolderOptions

HIERARCHY = {
    "labels": [
        {"id": "animal", "name": "Animal", "parent": None},
        {"id": "animal/cat", "name": "Cat", "parent": "animal"},
        {"id": "animal/dog", "name": "Dog", "parent": "animal"},
        {"id": "indoor"},
    ]
}


def write_csv(path: Path, rows: list[dict], header: list[str] | None = None) -> Path:
    header = header or ["id", "image", "caption", "labels"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """tmp/ds with images/ (two good, one corrupt) and an absolute-path image elsewhere."""
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(ds / "images/cat.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(ds / "images/dog.jpg")
    (ds / "images/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "elsewhere.png")
    (ds / "hierarchy.json").write_text(json.dumps(HIERARCHY))
    return ds


def good_rows(folder: Path) -> list[dict]:
    return [
        {"id": "cat1", "image": "images/cat.png", "caption": "A red cat, indoors", "labels": "animal/cat|indoor"},
        {"id": "dog1", "image": "images/dog.jpg", "caption": 'A "green" dog\non two lines', "labels": " animal/dog "},
        {"id": "abs1", "image": str(folder.parent / "elsewhere.png"), "caption": "Blue", "labels": ""},
        {"id": "inner", "image": "images/cat.png", "caption": "An animal", "labels": "animal"},
    ]


def test_good_rows_with_hierarchy(folder: Path, tmp_path: Path) -> None:
    csv_path = write_csv(folder / "data.csv", good_rows(folder), header=["caption", "extra", "labels", "image", "id"])
    build = build_folder(FolderOptions(csv=str(csv_path), hierarchy=str(folder / "hierarchy.json")), tmp_path / "w")
    assert [s.id for s in build.samples] == ["cat1", "dog1", "abs1", "inner"]
    assert build.skipped == []
    cat, dog, abs1, inner = build.samples
    assert cat.labels == ("animal/cat", "indoor") and cat.image == (folder / "images/cat.png").resolve()
    assert dog.caption == 'A "green" dog\non two lines' and dog.labels == ("animal/dog",)
    assert abs1.labels == () and abs1.image == (folder.parent / "elsewhere.png").resolve()
    assert inner.labels == ("animal",)
    assert build.hierarchy.parents["animal/cat"] == "animal"
    assert build.hierarchy.names["animal/cat"] == "Cat" and build.hierarchy.names["indoor"] == "indoor"
    assert build.info["n_rows"] == 4 and build.info["n_kept"] == 4


def test_flat_hierarchy_without_json(folder: Path, tmp_path: Path) -> None:
    csv_path = write_csv(folder / "data.csv", good_rows(folder))
    build = build_folder(FolderOptions(csv=str(csv_path)), tmp_path)
    assert build.hierarchy.labels == ["animal", "animal/cat", "animal/dog", "indoor"]
    assert all(build.hierarchy.parents[lab] == ROOT for lab in build.hierarchy.labels)


BAD_ROWS = [
    ({"id": "", "image": "images/cat.png", "caption": "c", "labels": ""}, "empty id"),
    ({"id": "cat1", "image": "images/dog.jpg", "caption": "again", "labels": ""}, "duplicate id (first used on line 2)"),
    ({"id": "nofile", "image": "images/missing.png", "caption": "c", "labels": ""}, "missing image file"),
    ({"id": "noimage", "image": " ", "caption": "c", "labels": ""}, "empty image path"),
    ({"id": "corrupt", "image": "images/corrupt.png", "caption": "c", "labels": ""}, "unreadable image"),
    ({"id": "nocap", "image": "images/cat.png", "caption": "  ", "labels": ""}, "empty caption"),
    ({"id": "badlabel", "image": "images/cat.png", "caption": "c", "labels": "animal|animal/fish"}, "label 'animal/fish' is not in the hierarchy"),
    ({"id": "rootlabel", "image": "images/cat.png", "caption": "c", "labels": ROOT}, "is reserved"),
]


def test_bad_rows_are_skipped_and_reported(folder: Path, tmp_path: Path, capsys) -> None:
    rows = good_rows(folder) + [row for row, _ in BAD_ROWS]
    csv_path = write_csv(folder / "data.csv", rows)
    build = build_folder(FolderOptions(csv=str(csv_path), hierarchy=str(folder / "hierarchy.json")), tmp_path)
    assert [s.id for s in build.samples] == ["cat1", "dog1", "abs1", "inner"]
    assert len(build.skipped) == len(BAD_ROWS)
    for (sample_id, reason), (row, problem) in zip(build.skipped, BAD_ROWS, strict=True):
        assert problem in reason
        assert sample_id == (row["id"] or sample_id)
    assert build.skipped[0][0].startswith("<empty id on line")
    # dog1's caption spans two CSV lines, so the first bad row starts on line 7
    assert build.skipped[0][1].startswith("line 7: ")
    err = capsys.readouterr().err
    assert f"12 rows, 4 kept, {len(BAD_ROWS)} skipped" in err
    assert "'nofile': line 9: missing image file" in err
    assert build.info["n_skipped"] == len(BAD_ROWS)


@pytest.mark.parametrize(("row", "problem"), BAD_ROWS, ids=[p for _, p in BAD_ROWS])
def test_strict_mode_raises_on_first_bad_row(folder: Path, tmp_path: Path, row: dict, problem: str) -> None:
    csv_path = write_csv(folder / "data.csv", good_rows(folder) + [row, {**row, "id": "later"}])
    options = FolderOptions(csv=str(csv_path), hierarchy=str(folder / "hierarchy.json"), strict=True)
    with pytest.raises(ValueError, match="strict") as info:
        build_folder(options, tmp_path)
    message = str(info.value)
    assert problem in message
    assert "line 7" in message and "later" not in message
    if row["id"]:
        assert f"id {row['id']!r}" in message


def test_missing_csv_and_columns(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.folder.csv: set it"):
        build_folder(FolderOptions(), tmp_path)
    with pytest.raises(FileNotFoundError, match="data.folder.csv: .*nope.csv not found"):
        build_folder(FolderOptions(csv=str(folder / "nope.csv")), tmp_path)
    bad = write_csv(folder / "cols.csv", [{"id": "a", "image": "x", "text": "t"}], header=["id", "image", "text"])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) caption, labels"):
        build_folder(FolderOptions(csv=str(bad)), tmp_path)
    (folder / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        build_folder(FolderOptions(csv=str(folder / "empty.csv")), tmp_path)


def test_bad_hierarchy_file(folder: Path, tmp_path: Path) -> None:
    csv_path = write_csv(folder / "data.csv", good_rows(folder))
    with pytest.raises(FileNotFoundError, match="data.folder.hierarchy"):
        build_folder(FolderOptions(csv=str(csv_path), hierarchy=str(folder / "nope.json")), tmp_path)
    (folder / "cyclic.json").write_text(json.dumps({"labels": [{"id": "a", "parent": "b"}, {"id": "b", "parent": "a"}]}))
    with pytest.raises(ValueError, match="data.folder.hierarchy: .*cycle"):
        build_folder(FolderOptions(csv=str(csv_path), hierarchy=str(folder / "cyclic.json")), tmp_path)


def test_bom_and_prepare_end_to_end(folder: Path, tmp_path: Path, any_split_sizes) -> None:
    csv_path = write_csv(folder / "data.csv", good_rows(folder))
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # spreadsheet export
    params = DataParams(dataset="folder", folder=FolderOptions(csv=str(csv_path)))
    data = load_prepared(prepare_dataset(params, tmp_path / "prep"))
    assert data.ids == ["cat1", "dog1", "abs1", "inner"]
    assert data.captions[1] == 'A "green" dog\non two lines'
    assert data.labels[0] == ("animal/cat", "indoor") and data.labels[2] == ()
    assert data.images[0] == (folder / "images/cat.png").resolve()
    assert data.meta["options"]["csv"] == str(csv_path)



def write_raw(folder: Path, *lines: bytes, header: bytes = b"id,image,caption,labels") -> Path:
    """A CSV written byte for byte, one physical line each."""
    csv_path = folder / "raw.csv"
    csv_path.write_bytes(b"".join(line + b"\n" for line in (header, *lines)))
    return csv_path


def test_non_utf8_bytes_skip_only_their_row(folder: Path, tmp_path: Path, capsys, any_split_sizes) -> None:
    csv_path = write_raw(
        folder,
        "cat1,images/cat.png,Café crème,,".encode(),
        b"latin,images/cat.png,caf\xe9,,",
        b"bad\xffid,images/cat.png,c,,",
        b"dog1,images/dog.jpg,A dog,,caf\xe9",  # a byte in an unused column is not read
        header=b"\xef\xbb\xbfid,image,caption,labels,notes",  # with a byte-order mark
    )
    build = build_folder(FolderOptions(csv=str(csv_path)), tmp_path)
    assert [(s.id, s.caption) for s in build.samples] == [("cat1", "Café crème"), ("dog1", "A dog")]
    assert build.skipped == [
        ("latin", "line 3: invalid UTF-8 byte 0xe9 in column caption: save the CSV as UTF-8"),
        ("bad\ufffdid", "line 4: invalid UTF-8 byte 0xff in column id: save the CSV as UTF-8"),
    ]
    err = capsys.readouterr().err
    assert f"folder: {csv_path}: 4 rows, 2 kept, 2 skipped" in err
    assert "'latin': line 3: invalid UTF-8 byte 0xe9 in column caption" in err
    with pytest.raises(ValueError) as info:
        build_folder(FolderOptions(csv=str(csv_path), strict=True), tmp_path)
    assert str(info.value) == (
        f"data.folder.csv: {csv_path} line 3, id 'latin': invalid UTF-8 byte 0xe9 in column caption: "
        "save the CSV as UTF-8 (data.folder.strict is true)"
    )
    meta = load_prepared(prepare_dataset(DataParams(dataset="folder", folder=FolderOptions(csv=str(csv_path))), tmp_path / "prep")).meta
    assert [(x["id"], x["reason"][:6]) for x in meta["skipped"]] == [("latin", "line 3"), ("bad\ufffdid", "line 4")]
    csv_path = write_raw(folder, b"cat1,images/cat.png,c,", header=b"id,image,caption,labels,l\xe9gende")
    with pytest.raises(ValueError, match=r"raw.csv line 1 \(header\): invalid UTF-8 byte 0xe9: save the CSV as UTF-8$"):
        build_folder(FolderOptions(csv=str(csv_path)), tmp_path)


def test_rows_with_too_few_or_unnamed_extra_fields(folder: Path, tmp_path: Path) -> None:
    csv_path = write_raw(
        folder,
        b"cat1,images/cat.png,A cat,animal,note",
        b"cat_3,images/cat.png",
        b"dog1,images/dog.jpg,A dog, grey,animal,note",
        b"dog2,images/dog.jpg,A dog,animal,",
        header=b"id,image,caption,labels,notes",
    )
    build = build_folder(FolderOptions(csv=str(csv_path)), tmp_path)
    assert [s.id for s in build.samples] == ["cat1", "dog2"]
    assert build.skipped == [
        ("cat_3", "line 3: 2 fields, expected 5 (id,image,caption,labels,notes): give every column a value, empty ones too"),
        ("dog1", "line 4: 6 fields, expected 5 (id,image,caption,labels,notes): quote a field that holds commas, or name the extra column in the header"),
    ]
    with pytest.raises(ValueError) as info:
        build_folder(FolderOptions(csv=str(csv_path), strict=True), tmp_path)
    assert str(info.value) == (
        f"data.folder.csv: {csv_path} line 3, id 'cat_3': 2 fields, expected 5 (id,image,caption,labels,notes): "
        "give every column a value, empty ones too (data.folder.strict is true)"
    )


UNTERMINATED = [
    # the quote runs to the end of the file: two rows read as one sample before
    ((b'cat1,images/cat.png,"A cat,animal', b"dog1,images/dog.jpg,A dog,animal"),
     "line 2: bad quoting (a quoted field opened in this row runs to the end of the file)"),
    # it ends at the opening quote of a later caption, which text follows
    ((b'cat1,images/cat.png,"A cat,animal', b"dog1,images/dog.jpg,A dog,animal", b'dog2,images/dog.jpg,"A dog, again",'),
     "line 2: bad quoting (',' expected after '\"' on line 4)"),
    # it ends cleanly at a stray quote two rows on: the row between reads as a row of its own
    ((b'cat1,images/cat.png,"A cat,animal', b"dog1,images/dog.jpg,A dog,animal", b'dog2,images/dog.jpg,A dog 5",'),
     "line 2: bad quoting (a quoted field opened in this row takes in line 3, which reads as a row)"),
    # an unescaped quote inside a quoted caption
    ((b'cat1,images/cat.png,"A "grey" cat",animal', b"dog1,images/dog.jpg,A dog,animal"),
     "line 2: bad quoting (',' expected after '\"' on line 2)"),
]


@pytest.mark.parametrize(("lines", "reason"), UNTERMINATED, ids=["to-eof", "to-next-quote", "swallows-a-row", "inner-quote"])
def test_bad_quoting_is_reported_and_later_rows_kept(folder: Path, tmp_path: Path, lines: tuple[bytes, ...], reason: str) -> None:
    csv_path = write_raw(folder, *lines)
    build = build_folder(FolderOptions(csv=str(csv_path)), tmp_path)
    assert [s.id for s in build.samples] == ["dog1", "dog2"][: len(lines) - 1]
    fix = ': close the quote, and write a quote inside a quoted field as ""'
    assert build.skipped == [("cat1", reason + fix)]
    with pytest.raises(ValueError) as info:
        build_folder(FolderOptions(csv=str(csv_path), strict=True), tmp_path)
    line, problem = reason.split(": ", 1)
    assert str(info.value) == f"data.folder.csv: {csv_path} {line}, id 'cat1': {problem}{fix} (data.folder.strict is true)"


def test_closed_quotes_may_span_lines(folder: Path, tmp_path: Path) -> None:
    csv_path = write_raw(
        folder,
        b'cat1,images/cat.png,"Three lines:',
        b"a grey cat, asleep, on a sofa",  # four fields, but not a row: no image file 'asleep'
        b'and a ""quote"",",animal',
        b"dog1,images/dog.jpg,A dog,animal",
    )
    build = build_folder(FolderOptions(csv=str(csv_path), strict=True), tmp_path)
    assert [(s.id, s.caption) for s in build.samples] == [
        ("cat1", 'Three lines:\na grey cat, asleep, on a sofa\nand a "quote",'), ("dog1", "A dog")
    ]


def test_group_column_keeps_an_images_captions_in_one_split(folder: Path, tmp_path: Path, any_split_sizes) -> None:
    """Rows of one group (captions of one image) share a split; the split hashes the group."""
    rows = [{"id": f"cat_{i}", "image": "images/cat.png", "caption": f"cat caption {i}", "labels": "",
             "group": "cat-photo"} for i in range(5)]
    rows += [{"id": f"dog_{i}", "image": "images/dog.jpg", "caption": f"dog {i}", "labels": "", "group": ""}
             for i in range(3)]
    csv_path = write_csv(folder / "grouped.csv", rows, ["id", "image", "caption", "labels", "group"])
    build = build_folder(FolderOptions(csv=str(csv_path)), tmp_path)
    assert [s.group_key for s in build.samples] == ["cat-photo"] * 5 + ["dog_0", "dog_1", "dog_2"]
    assert build.info["n_groups"] == 4
    params = DataParams(dataset="folder", folder=FolderOptions(csv=str(csv_path)), val_fraction=0.3, test_fraction=0.3)
    data = load_prepared(prepare_dataset(params, tmp_path / "prep"))
    assert len(set(data.splits[:5])) == 1 and data.groups[:5] == ["cat-photo"] * 5
    assert data.groups[5:] == ["dog_0", "dog_1", "dog_2"]
    # Without the column nothing changes: no group column, the id is the group.
    plain = write_csv(folder / "plain.csv", rows)
    plain_data = load_prepared(prepare_dataset(DataParams(dataset="folder", folder=FolderOptions(csv=str(plain))),
                                               tmp_path / "plain"))
    assert plain_data.groups == plain_data.ids
    assert "group" not in (tmp_path / "plain" / "samples.csv").read_text().splitlines()[0]
    assert "n_groups" not in plain_data.meta["info"]


def test_too_few_rows_per_split_fail_before_writing(folder: Path, tmp_path: Path) -> None:
    """Issue 22.10: 3 rows were split train 2 / val 0 / test 1 without a word, and evaluate then
    divided by zero (FVU of one test row). `prepare` now names the split sizes and writes nothing."""
    csv_path = write_csv(folder / "three.csv", good_rows(folder)[:3])
    params = DataParams(dataset="folder", folder=FolderOptions(csv=str(csv_path)))
    with pytest.raises(ValueError, match=r"^folder: 3 samples split train \d / val \d / test [01]; the pipeline "
                                         r"needs at least 2 test samples: add samples, or change data.val_fraction"):
        prepare_dataset(params, tmp_path / "prep")
    assert not (tmp_path / "prep").exists() and not (tmp_path / "prep.tmp").exists()


def test_empty_val_split_is_reported(folder: Path, tmp_path: Path, capsys) -> None:
    rows = [{"id": f"cat{i}", "image": "images/cat.png", "caption": f"cat {i}", "labels": ""} for i in range(12)]
    params = DataParams(dataset="folder", folder=FolderOptions(csv=str(write_csv(folder / "cats.csv", rows))),
                        val_fraction=0.0, test_fraction=0.5)
    data = load_prepared(prepare_dataset(params, tmp_path / "prep"))
    n = {sp: int((data.splits == sp).sum()) for sp in ("train", "val", "test")}
    assert n["val"] == 0 and n["train"] >= 1 and n["test"] >= 2
    assert (f"warning: folder: 12 samples split train {n['train']} / val 0 / test {n['test']}; the val split is "
            "empty, so training reports no val metrics") in capsys.readouterr().err


def test_high_bit_images_are_scaled_or_reported_with_their_row(folder: Path, tmp_path: Path) -> None:
    """Issue 22.5: a float image whose values cannot be scaled to 8 bits is reported with its line
    and id at `prepare` (16-bit and 0..1 float ones are read, scaled, by the extractors)."""
    import numpy as np

    Image.fromarray(np.full((8, 8), 3.0, dtype=np.float32)).save(folder / "images/depth.tif")
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(folder / "images/unit.tif")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(folder / "images/g16.png")
    rows = [{"id": name, "image": f"images/{name}", "caption": name, "labels": ""}
            for name in ("depth.tif", "unit.tif", "g16.png")]
    build = build_folder(FolderOptions(csv=str(write_csv(folder / "deep.csv", rows))), tmp_path)
    assert [s.id for s in build.samples] == ["unit.tif", "g16.png"]
    ((sample_id, reason),) = build.skipped
    assert sample_id == "depth.tif" and "line 2" in reason
    assert "float image (mode F) with values 3..3, where only 0..1 is understood" in reason


def test_csv_and_hierarchy_paths_expand_the_home_directory(folder: Path, tmp_path: Path, monkeypatch) -> None:
    """Issue 22 (minor): `csv: ~/data.csv` was read as a directory named `~`."""
    from sparc.params import params_from_dict
    from sparc.preflight import check_folder_files

    monkeypatch.setenv("HOME", str(folder))
    write_csv(folder / "data.csv", good_rows(folder))
    options = FolderOptions(csv="~/data.csv", hierarchy="~/hierarchy.json")
    build = build_folder(options, tmp_path)
    assert len(build.samples) == 4 and build.info["hierarchy"] == str((folder / "hierarchy.json").resolve())
    check_folder_files(params_from_dict({"data": {"dataset": "folder", "folder": vars(options)},
                                         "streams": {"a": {"model": "efficientnet:lite0", "input": "image"},
                                                     "b": {"model": "minilm:all-MiniLM-L6-v2", "input": "caption"}}}))
