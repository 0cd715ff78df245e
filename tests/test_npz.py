"""sparc.npz: deterministic .npz files."""

import zipfile

import numpy as np
import pytest

from sparc.npz import ZIP_DATE, load_npz_rows, save_npz


@pytest.mark.parametrize("compress", [False, True])
def test_same_arrays_same_bytes_and_np_load_reads_them(tmp_path, compress):
    arrays = {"a": np.arange(12, dtype=np.int32).reshape(3, 4), "b": np.linspace(0, 1, 5, dtype=np.float32)}
    first = save_npz(tmp_path / "x.npz", arrays, compress).read_bytes()
    with zipfile.ZipFile(tmp_path / "x.npz") as zf:
        assert [i.date_time for i in zf.infolist()] == [ZIP_DATE, ZIP_DATE]
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED}
    assert save_npz(tmp_path / "x.npz", arrays, compress).read_bytes() == first
    with np.load(tmp_path / "x.npz") as z:
        assert sorted(z.files) == ["a", "b"]
        np.testing.assert_array_equal(z["a"], arrays["a"])
        np.testing.assert_array_equal(z["b"], arrays["b"])


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = save_npz(tmp_path / "x.npz", {"a": np.zeros(3)})
    before = path.read_bytes()
    with pytest.raises(ValueError):  # object arrays are refused (no pickles)
        save_npz(path, {"a": np.ones(3), "b": np.array([{"x": 1}], dtype=object)})
    assert path.read_bytes() == before and not (tmp_path / "x.npz.tmp").exists()


def _arrays(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "ids": rng.integers(0, 1000, (n, 5)).astype(np.int32),
        "vals": rng.random((n, 3, 2)).astype(np.float32),
        "vec": rng.random(n),
        "big_endian": rng.random((n, 2)).astype(">f8"),
    }


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("block_bytes", [1, 40, 1 << 24])
def test_load_npz_rows_gives_the_asked_rows_of_every_array(tmp_path, compress, block_bytes):
    rng = np.random.default_rng(0)
    arrays = _arrays(rng, 300)
    path = save_npz(tmp_path / "x.npz", arrays, compress)
    for rows in (np.array([7, 2, 2, 299, 0]), rng.permutation(300)[:50], np.arange(300), np.array([], dtype=np.int64)):
        got = load_npz_rows(path, rows, n_rows=300, block_bytes=block_bytes)
        assert sorted(got) == sorted(arrays)
        for name, arr in arrays.items():
            assert got[name].dtype == arr.dtype
            np.testing.assert_array_equal(got[name], arr[rows])
    whole = load_npz_rows(path)
    for name, arr in arrays.items():
        np.testing.assert_array_equal(whole[name], arr)


def test_load_npz_rows_reads_np_savez_files(tmp_path):
    arrays = _arrays(np.random.default_rng(1), 20)
    np.savez(tmp_path / "x.npz", **arrays)
    got = load_npz_rows(tmp_path / "x.npz", np.array([19, 3]), block_bytes=16)
    for name, arr in arrays.items():
        np.testing.assert_array_equal(got[name], arr[[19, 3]])


def test_load_npz_rows_errors_name_the_problem(tmp_path):
    path = save_npz(tmp_path / "x.npz", {"a": np.zeros((4, 2)), "b": np.zeros((5, 2))})
    with pytest.raises(ValueError, match=r"x.npz: a has shape \(4, 2\), expected 5 rows"):
        load_npz_rows(path, np.array([0]), n_rows=5)
    with pytest.raises(ValueError, match=r"a has 4 rows, rows 1\.\.4 were asked for"):
        load_npz_rows(path, np.array([1, 4]))
    with pytest.raises(ValueError, match=r"a has 4 rows, rows -1\.\.-1 were"):
        load_npz_rows(path, np.array([-1]))
    (tmp_path / "bad.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="bad.npz: not a readable .npz"):
        load_npz_rows(tmp_path / "bad.npz", np.array([0]))
