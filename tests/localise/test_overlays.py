"""The localise stage's overlay data: the overlays.npz writer and reader (format, deterministic
bytes, the checks that name the problem), on tiny queries made in code
(tests/report/localise_fixtures.py)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sparc.localise import overlays as OV
from sparc.localise.maps import normalise_map
from sparc.npz import ZIP_DATE
from tests.report.localise_fixtures import (
    METHODS,
    SIZES,
    TEXTS,
    tiny_queries,
    write_localise_outputs,
)


def test_overlays_round_trip(tmp_path: Path) -> None:
    queries = tiny_queries()
    path = write_localise_outputs(tmp_path, metrics=False) / "overlays.npz"
    got = OV.read_overlays(path)
    assert got.methods == METHODS and got.iou_threshold == 0.2
    assert [q.text for q in got.queries] == TEXTS
    for q, want, (h, w) in zip(got.queries, queries, SIZES, strict=True):
        assert q.image.dtype == np.uint8 and q.image.shape == (h, w, 3)
        np.testing.assert_array_equal(q.image, want.image)
        assert q.mask.dtype == bool and np.array_equal(q.mask, want.mask)
        assert list(q.heats) == METHODS and q.ious == want.ious
        for m in METHODS:
            # stored scaled to [0, 1] in float16: the tiny-valued map keeps its shape
            np.testing.assert_allclose(q.heats[m], normalise_map(want.heats[m]), atol=1e-3)
            assert q.heats[m].max() == 1.0
    # plain numpy reads it too: float16 heat maps, one array per query and method
    with np.load(path, allow_pickle=False) as z:
        assert z["heat_1_2"].dtype == np.float16 and z["heat_1_2"].shape == SIZES[1]
        assert json.loads(str(z["index"][()]))["queries"] == TEXTS
        assert z["iou"].shape == (2, 3)


def test_overlays_bytes_are_deterministic(tmp_path: Path) -> None:
    a = OV.write_overlays(tmp_path / "a.npz", METHODS, tiny_queries(), 0.2)
    b = OV.write_overlays(tmp_path / "b.npz", METHODS, tiny_queries(), 0.2)
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
    with zipfile.ZipFile(a) as zf:
        assert {i.date_time for i in zf.infolist()} == {ZIP_DATE}


def test_overlays_without_queries(tmp_path: Path) -> None:
    got = OV.read_overlays(OV.write_overlays(tmp_path / "o.npz", ["vit"], [], 0.5))
    assert got.methods == ["vit"] and got.queries == [] and got.iou_threshold == 0.5


def test_writer_refuses_inconsistent_queries(tmp_path: Path) -> None:
    q = tiny_queries()[0]
    with pytest.raises(ValueError, match="heat map of vit"):
        OV.write_overlays(tmp_path / "o.npz", METHODS, [OV.OverlayQuery(q.text, q.image, q.mask,
                          {**q.heats, "vit": np.zeros((3, 3))}, q.ious)], 0.2)
    with pytest.raises(ValueError, match="expected the methods"):
        OV.write_overlays(tmp_path / "o.npz", ["vit"], [q], 0.2)
    with pytest.raises(ValueError, match="mask"):
        OV.write_overlays(tmp_path / "o.npz", METHODS, [OV.OverlayQuery(q.text, q.image, q.mask[:5], q.heats, q.ious)], 0.2)
    with pytest.raises(ValueError, match="uint8"):
        OV.write_overlays(tmp_path / "o.npz", METHODS, [OV.OverlayQuery(q.text, q.image[..., 0], q.mask, q.heats, q.ious)], 0.2)
    assert not (tmp_path / "o.npz").exists()


def test_reader_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dvc repro localise"):
        OV.read_overlays(tmp_path / "missing.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable overlays file"):
        OV.read_overlays(tmp_path / "bad.npz")
    path = OV.write_overlays(tmp_path / "o.npz", METHODS, tiny_queries(), 0.2)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    index = json.loads(str(arrays["index"][()]))
    np.savez(tmp_path / "v2.npz", **{**arrays, "index": np.array(json.dumps({**index, "version": 2}))})
    with pytest.raises(ValueError, match="format version 2"):
        OV.read_overlays(tmp_path / "v2.npz")
    np.savez(tmp_path / "cut.npz", **{k: v for k, v in arrays.items() if k != "mask_1"})
    with pytest.raises(ValueError, match="mask_1"):
        OV.read_overlays(tmp_path / "cut.npz")
