"""The extraction stage on a tiny prepared dataset, with the real offline models."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sparc.features.extract import (
    cpu_threads,
    extract_stream,
    make_loader,
    model_threads,
    run_extract,
    usable_cores,
)
from sparc.features.store import load_streams, open_stream
from sparc.params import params_from_dict, read_yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def extracted(prepared, effnet, minilm, tmp_path_factory) -> Path:
    """Both streams extracted once: ``img`` with a worker process, ``txt`` in the main process."""
    root = tmp_path_factory.mktemp("features")
    extract_stream(prepared, effnet, root / "img", batch_size=3, num_workers=1, progress=False)
    extract_stream(prepared, minilm, root / "txt", batch_size=3, num_workers=0, progress=False)
    return root


def test_extract_stream_rows_match_samples(prepared, effnet, extracted):
    s = open_stream(extracted / "img")
    assert s.ids == prepared.ids and s.features.shape == (len(prepared), 1280)
    with torch.inference_mode():
        direct = torch.cat([effnet.embed(b) for b in make_loader(prepared, effnet, 4, 0)]).numpy()
    np.testing.assert_allclose(s.features, direct.astype(np.float16), rtol=2e-3, atol=2e-3)
    meta = s.meta
    assert meta["stream"] == "img" and meta["model"] == "efficientnet:lite0" and meta["input"] == "image"
    assert meta["dataset"] == "shapes" and meta["dataset_fingerprint"] == prepared.fingerprint
    assert meta["dim"] == 1280 and meta["n"] == len(prepared) and meta["dtype"] == "float16"
    assert meta["preprocessing"]["center_crop"] == 224 and meta["device"] == "cpu"
    assert sorted(p.name for p in extracted.iterdir()) == ["img", "txt"]


@pytest.mark.parametrize("fixture, stream", [("effnet", "img"), ("minilm", "txt")])
def test_extraction_is_byte_deterministic(request, prepared, extracted, tmp_path, fixture, stream):
    """Two runs with the same thread count (and different worker counts) write the same bytes."""
    extractor = request.getfixturevalue(fixture)
    threads = torch.get_num_threads()
    first, again = (
        extract_stream(prepared, extractor, tmp_path / f"{stream}{workers}", batch_size=3,
                       num_workers=workers, progress=False, threads=1)
        for workers in (0, 1)
    )
    assert (again / "features.npy").read_bytes() == (first / "features.npy").read_bytes()
    assert (again / "ids.txt").read_bytes() == (extracted / stream / "ids.txt").read_bytes()
    assert torch.are_deterministic_algorithms_enabled() is False  # restored after extraction
    assert torch.get_num_threads() == threads


def test_text_streams_count_truncated_captions(extracted):
    """meta.json of a text stream counts the captions cut to the model's limit (none of the short
    shape captions); image streams count nothing."""
    assert open_stream(extracted / "txt").meta["counts"] == {"truncated_captions": 0}
    assert "counts" not in open_stream(extracted / "img").meta


def test_streams_from_one_dataset_are_aligned(prepared, extracted):
    streams = load_streams(extracted, ["img", "txt"])
    assert streams["img"].dim == 1280 and streams["txt"].dim == 384
    # Captions of the same shape are closer to each other than to other shapes.
    f = np.asarray(streams["txt"].features, dtype=np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    ids = prepared.ids
    red, blue, bar = (f[ids.index(i)] for i in ("red-disc", "blue-disc", "orange-bar"))
    assert red @ blue > red @ bar


def test_failed_loading_leaves_no_stream(prepared, effnet, tmp_path):
    images = list(prepared.images)
    images[1] = tmp_path / "missing.png"  # in the first batch: fails before the model runs
    broken = dataclasses.replace(prepared, images=images)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        extract_stream(broken, effnet, tmp_path / "out" / "effnet", batch_size=2, num_workers=0, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_empty_data_and_bad_loader_settings(prepared, effnet, tmp_path):
    empty = dataclasses.replace(prepared, ids=[], images=[], captions=[], labels=[], splits=np.array([]))
    with pytest.raises(ValueError, match="no samples"):
        extract_stream(empty, effnet, tmp_path / "e", progress=False)
    with pytest.raises(ValueError, match="batch_size: must be positive"):
        extract_stream(prepared, effnet, tmp_path / "e", batch_size=0, progress=False)
    with pytest.raises(ValueError, match="num_workers: must be >= 0"):
        extract_stream(prepared, effnet, tmp_path / "e", num_workers=-1, progress=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.tmp").exists()


def test_run_extract_reads_params(prepared, tmp_path):
    raw = read_yaml(ROOT / "params.yaml")
    raw["streams"] = {s: {"model": "minilm:all-MiniLM-L6-v2", "input": "caption"} for s in ("txt", "txt2")}
    raw["extract"].update(batch_size=4, num_workers=0, device="cpu")
    params = params_from_dict(raw)
    out = run_extract(params, "txt", prepared.root, tmp_path / "txt")
    s = open_stream(out)
    assert s.meta["stream"] == "txt" and s.meta["model"] == "minilm:all-MiniLM-L6-v2" and s.dim == 384
    with pytest.raises(ValueError, match="unknown stream 'img' \\(configured: txt, txt2\\)"):
        run_extract(params, "img", prepared.root, tmp_path / "img")


def test_model_threads_leave_cores_to_workers():
    cores = usable_cores()
    assert model_threads(0) == model_threads(1) == max(1, cores - 1)
    assert model_threads(2) == max(1, cores - 2) and model_threads(10**6) == 1
    assert model_threads(1, requested=3) == 3  # extract.cpu_threads > 0 is taken as given
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads: must be positive"):
        with cpu_threads(0):
            pass
