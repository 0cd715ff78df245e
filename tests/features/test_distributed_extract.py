"""Extraction over several processes (sparc.features.distributed): shards of whole batches, merged
by rank 0 into the stream one process writes. With the same batches and one model thread per
process the merged stream equals the single-process one byte for byte (features.npy, ids.txt and
meta.json), so the comparisons here are exact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from sparc.cli import main
from sparc.features.distributed import (
    merge_shards,
    merged_meta,
    shard_of,
    shard_path,
    shard_rows,
    shards_dir,
)
from sparc.features.extract import extract_stream
from sparc.features.registry import build_extractor
from sparc.features.store import FeatureStoreError

FILES = ("features.npy", "ids.txt", "meta.json")


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    """A DINOv2 with random weights, 2 layers of width 32, saved locally."""
    root = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=56)
    Dinov2Model(config).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def single(prepared, tiny_dinov2, tmp_path_factory) -> Path:
    """The stream as one process writes it: batches of 2, one model thread."""
    extractor = build_extractor(f"dinov2:{tiny_dinov2}", "image", "cpu")
    out = tmp_path_factory.mktemp("single") / "tiny"
    return extract_stream(prepared, extractor, out, batch_size=2, num_workers=0, stream="tiny", progress=False,
                          threads=1)


def same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in FILES)


def test_shards_are_whole_batches_in_order():
    for n, batch, world in [(7, 2, 2), (7, 4, 3), (100, 8, 4), (5, 10, 2)]:
        parts = [shard_rows(n, batch, r, world) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))  # contiguous, in rank order, every row once
        assert all(p.start % batch == 0 for p in parts if len(p))  # each starts a batch of one process
    assert [len(shard_rows(7, 4, r, 3)) for r in range(3)] == [0, 4, 3]  # 2 batches, 3 processes


def test_two_processes_under_torchrun_equal_one(prepared, tiny_dinov2, single, tmp_path, monkeypatch, capsys):
    """`python -m sparc extract tiny` with extract.nproc 2 relaunches under torchrun; rank 0's
    merged stream equals the single-process one byte for byte, and the shards are gone."""
    (tmp_path / "data/prepared").mkdir(parents=True)
    (tmp_path / "data/prepared/emoji").symlink_to(prepared.root)
    (tmp_path / "params.yaml").write_text(
        "data:\n  dataset: emoji\n"
        f"streams:\n  tiny:\n    model: dinov2:{tiny_dinov2}\n    input: image\n"
        f"  other:\n    model: dinov2:{tiny_dinov2}\n    input: image\n"  # SPARC needs two streams
        "extract:\n  batch_size: 2\n  num_workers: 0\n  cpu_threads: 1\n  device: cpu\n  nproc: 2\n"
    )
    for var in ("RANK", "WORLD_SIZE", "PET_NNODES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["extract", "tiny"]) == 0, capsys.readouterr().err
    out = tmp_path / "data/features/emoji/tiny"
    assert same_files(out, single)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_merge_with_an_empty_shard_equals_one_process(prepared, tiny_dinov2, single, tmp_path):
    """Five ranks over the 4 batches of 2 (rank 0 gets none), merged in process: byte-identical
    to one process; the shards are removed."""
    extractor = build_extractor(f"dinov2:{tiny_dinov2}", "image", "cpu")
    out = tmp_path / "tiny"
    parts = [shard_rows(len(prepared), 2, r, 5) for r in range(5)]
    assert [len(p) for p in parts] == [0, 2, 2, 2, 1]
    for rank, rows in enumerate(parts):
        if len(rows):
            extract_stream(shard_of(prepared, rows), extractor, shard_path(out, rank), batch_size=2,
                           num_workers=0, stream="tiny", progress=False, threads=1)
    merge_shards(out, prepared.ids, parts, "tiny")
    assert same_files(out, single)
    assert not shards_dir(out).exists()


def test_merge_names_a_missing_or_foreign_shard(prepared, single, tmp_path):
    out = tmp_path / "tiny"
    parts = [shard_rows(len(prepared), 4, r, 2) for r in range(2)]  # rows 0-3 and 4-6
    shard_path(out, 0).parent.mkdir(parents=True)
    shutil.copytree(single, shard_path(out, 0))  # all 7 rows where rows 0-3 belong
    with pytest.raises(FeatureStoreError, match=r"shard 0 at .* does not hold rows 0-3"):
        merge_shards(out, prepared.ids, parts, "tiny")
    shutil.rmtree(shard_path(out, 0))
    with pytest.raises(FeatureStoreError, match=r"the shard of process 0 is missing at .*rank-00000 \(with "
                                                r"several machines, data/features must be on a file system"):
        merge_shards(out, prepared.ids, parts, "tiny")
    assert not out.exists()


def test_merged_meta_sums_counts_and_refuses_disagreement():
    a = {"model": "m", "n": 3, "dim": 4, "dtype": "float16", "counts": {"truncated_captions": 1}}
    b = {"model": "m", "n": 5, "dim": 4, "dtype": "float16", "counts": {"truncated_captions": 2, "other": 1}}
    assert merged_meta([a, b], "s") == {"model": "m", "counts": {"truncated_captions": 3, "other": 1}}
    assert merged_meta([{"model": "m"}, {"model": "m"}], "s") == {"model": "m"}
    with pytest.raises(FeatureStoreError, match="stream s: shard 1 has model='x', the first shard 'm'"):
        merged_meta([a, dict(b, model="x")], "s")
