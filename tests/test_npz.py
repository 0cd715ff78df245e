"""sparc.npz: deterministic .npz files."""

import zipfile

import numpy as np
import pytest

from sparc.npz import ZIP_DATE, save_npz


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
