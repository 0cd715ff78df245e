from __future__ import annotations

import json

import numpy as np
import pytest

from sparc.features.store import (
    FeatureStoreError,
    StreamWriter,
    check_aligned,
    load_streams,
    open_stream,
    write_stream,
)

IDS = ["a", "b", "c", "d", "e"]


def features(n: int = 5, d: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_round_trip_memmapped_read_only(tmp_path):
    x = features()
    write_stream(tmp_path / "s1", IDS, x, {"model": "m", "dataset_fingerprint": "f"})
    s = open_stream(tmp_path / "s1")
    assert s.name == "s1" and s.ids == IDS and s.dim == 3 and len(s) == 5
    assert isinstance(s.features, np.memmap) and s.features.dtype == np.float16
    np.testing.assert_array_equal(s.features, x.astype(np.float16))
    assert s.meta["dim"] == 3 and s.meta["n"] == 5 and s.meta["model"] == "m"
    assert s.meta == json.loads((tmp_path / "s1" / "meta.json").read_text())
    with pytest.raises(ValueError, match="read-only"):
        s.features[0, 0] = 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1"]


def test_writer_blocks_and_unicode_ids(tmp_path):
    ids = ["1f600", "flag: Côte d’Ivoire", "x\u2028y"]  # \u2028 is a line break to splitlines()
    x = features(3, 4)
    with StreamWriter(tmp_path / "s", ids, 4, {}) as w:
        w.write(x[:2])
        w.write(x[2:])
    s = open_stream(tmp_path / "s")
    assert s.ids == ids
    np.testing.assert_array_equal(s.features, x.astype(np.float16))


def test_rewrite_replaces_previous_stream(tmp_path):
    write_stream(tmp_path / "s", IDS, features(seed=1), {})
    write_stream(tmp_path / "s", IDS[:2], features(2, 2, seed=2), {})
    s = open_stream(tmp_path / "s")
    assert s.ids == IDS[:2] and s.dim == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_exception_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="model crashed"):
        with StreamWriter(tmp_path / "s", IDS, 3, {}) as w:
            w.write(features(2))
            raise RuntimeError("model crashed")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_stream_and_no_tmp(tmp_path):
    write_stream(tmp_path / "s", IDS, features(), {"model": "old"})
    with pytest.raises(FeatureStoreError, match="3 rows written, 5 expected"):
        with StreamWriter(tmp_path / "s", IDS, 3, {"model": "new"}) as w:
            w.write(features(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert open_stream(tmp_path / "s").meta["model"] == "old"


def test_writer_rejects_bad_blocks_and_ids(tmp_path):
    x = features()
    x[3, 1] = np.nan
    with pytest.raises(FeatureStoreError, match=r"non-finite features at row 3 \(id 'd'\)"):
        write_stream(tmp_path / "s", IDS, x, {})
    writer = StreamWriter(tmp_path / "s", IDS, 3, {})
    with pytest.raises(FeatureStoreError, match=r"block shape \(5, 2\) != \(b, 3\)"):
        writer.write(features(5, 2))
    writer.abort()
    with pytest.raises(FeatureStoreError, match="more rows written than ids"):
        with StreamWriter(tmp_path / "s", IDS[:2], 3, {}) as w:
            w.write(features(3))
    with pytest.raises(FeatureStoreError, match="duplicate id 'a' at row 2"):
        StreamWriter(tmp_path / "s", ["a", "b", "a"], 3, {})
    with pytest.raises(FeatureStoreError, match="line break"):
        StreamWriter(tmp_path / "s", ["a", "b\nc"], 3, {})
    assert not (tmp_path / "s").exists()


def test_open_stream_names_missing_file(tmp_path):
    write_stream(tmp_path / "s", IDS, features(), {})
    (tmp_path / "s" / "ids.txt").unlink()
    with pytest.raises(FeatureStoreError, match=r"stream s: .*ids.txt is missing"):
        open_stream(tmp_path / "s")


def truncate(path):
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 4)


# (what breaks the stream directory, the problem named in the error; {s} is the directory)
BROKEN = {
    "truncated": (lambda s: truncate(s / "features.npy"), "{s}/features.npy is 154 bytes, but its header ((5, 3) array) needs 158"),
    "not-npy": (lambda s: (s / "features.npy").write_bytes(b"x" * 200), "{s}/features.npy is not a NumPy .npy file (the magic string is not correct"),
    "empty-npy": (lambda s: (s / "features.npy").write_bytes(b""), "{s}/features.npy is not a NumPy .npy file (EOF: reading magic string"),
    "1d": (lambda s: np.save(s / "features.npy", np.zeros(5, np.float16)), "{s}/features.npy holds a (5,) array, expected rows x dim"),
    "no-ids": (lambda s: (s / "ids.txt").unlink(), "{s}/ids.txt is missing"),
    "no-meta": (lambda s: (s / "meta.json").unlink(), "{s}/meta.json is missing"),
    "no-npy": (lambda s: (s / "features.npy").unlink(), "{s}/features.npy is missing"),
    "few-ids": (lambda s: (s / "ids.txt").write_text("a\nb\n"), "{s}/features.npy has 5 rows but {s}/ids.txt has 2 ids"),
    "ids-not-utf8": (lambda s: (s / "ids.txt").write_bytes(b"a\n\xe9\nc\nd\ne\n"), "{s}/ids.txt is not UTF-8 ('utf-8' codec can't decode byte 0xe9"),
    "bad-meta": (lambda s: (s / "meta.json").write_text("{oops"), "{s}/meta.json is not valid JSON (Expecting property name"),
    "meta-list": (lambda s: (s / "meta.json").write_text("[]"), "{s}/meta.json holds a JSON list, expected an object"),
    "meta-n": (lambda s: (s / "meta.json").write_text('{"n": 4, "dim": 3}'), "{s}/meta.json says n=4, dim=3 but {s}/features.npy is (5, 3)"),
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_open_stream_broken_directory_one_line_with_the_fix(tmp_path, how):
    s = write_stream(tmp_path / "s", IDS, features(), {})
    breaker, problem = BROKEN[how]
    breaker(s)
    with pytest.raises(FeatureStoreError) as info:
        load_streams(tmp_path, ["s"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"stream s: {problem.format(s=s)}")
    assert message.endswith(f"; restore it with `dvc checkout {s}`, or extract it again with `dvc repro extract@s`")


def write_two(tmp_path, ids_b, x_b=None, fp_b="f"):
    write_stream(tmp_path / "a", IDS, features(), {"dataset_fingerprint": "f"})
    x_b = features(len(ids_b), 2, seed=3) if x_b is None else x_b
    write_stream(tmp_path / "b", ids_b, x_b, {"dataset_fingerprint": fp_b})


def test_load_streams_aligned(tmp_path):
    write_two(tmp_path, IDS)
    streams = load_streams(tmp_path, ["a", "b"])
    assert list(streams) == ["a", "b"] and streams["b"].dim == 2


def test_check_aligned_names_stream_and_first_mismatched_row(tmp_path):
    write_two(tmp_path, ["a", "b", "x", "d", "y"])
    with pytest.raises(FeatureStoreError, match="stream b: row 2 has id 'x', stream a has 'c'"):
        load_streams(tmp_path, ["a", "b"])


@pytest.mark.parametrize(
    "ids_b, message",
    [
        (IDS[:3], "stream b: 3 rows, but stream a has 5 (first unmatched row 3: id 'd' only in stream a)"),
        (IDS + ["f"], "stream b: 6 rows, but stream a has 5 (first unmatched row 5: id 'f' only in stream b)"),
    ],
)
def test_check_aligned_different_lengths(tmp_path, ids_b, message):
    write_two(tmp_path, ids_b)
    with pytest.raises(FeatureStoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_streams(tmp_path, ["a", "b"])


def test_check_aligned_nan_row_names_stream_and_row(tmp_path):
    write_two(tmp_path, IDS)
    # Corrupt a stored row (a writer never stores NaN): open the .npy writable and poke it.
    arr = np.load(tmp_path / "b" / "features.npy", mmap_mode="r+")
    arr[4, 0] = np.nan
    arr.flush()
    del arr
    with pytest.raises(FeatureStoreError, match=r"stream b: non-finite features at row 4 \(id 'e'\)"):
        load_streams(tmp_path, ["a", "b"])
    assert load_streams(tmp_path, ["a", "b"], check_finite=False)["b"].dim == 2


def test_check_aligned_different_datasets(tmp_path):
    write_two(tmp_path, IDS, fp_b="other")
    with pytest.raises(FeatureStoreError, match="different datasets"):
        load_streams(tmp_path, ["a", "b"])
    with pytest.raises(FeatureStoreError, match="no streams"):
        check_aligned({})
