"""Sampler (sample-level shuffling, seeded, per-epoch permutations) and FeatureSource."""

import numpy as np
import pytest
import torch

from sparc.features.store import FeatureStoreError, open_stream, write_stream
from sparc.train import sampler
from sparc.train.sampler import EpochSampler, FeatureSource, counter_seed


def test_every_sample_once_per_epoch_in_near_equal_batches():
    s = EpochSampler(n=103, batch_size=25, seed=0)
    assert s.steps_per_epoch == 5
    for epoch in range(3):
        batches = [s.batch(epoch * 5 + j) for j in range(5)]
        assert sorted(len(b) for b in batches) == [20, 20, 21, 21, 21]
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(103))
        assert all(np.all(np.diff(b) > 0) for b in batches)  # sorted, no repeats


def test_new_permutation_each_epoch_and_seeded():
    a, b, c = EpochSampler(50, 10, 1), EpochSampler(50, 10, 1), EpochSampler(50, 10, 2)
    np.testing.assert_array_equal(a.batch(7), b.batch(7))
    assert not np.array_equal(a.batch(0), a.batch(5))  # epoch 0 vs epoch 1, same slot
    assert not np.array_equal(a.batch(0), c.batch(0))
    # sample-level shuffling: a batch is not a contiguous block of rows
    assert np.diff(a.batch(0)).max() > 1
    assert EpochSampler(5, 64, 0).batch(0).tolist() == [0, 1, 2, 3, 4]


def test_counter_seed_is_stable_and_distinct():
    assert counter_seed(0, 3, 10) == counter_seed(0, 3, 10)
    assert len({counter_seed(0, 3, i) for i in range(100)}) == 100
    assert 0 <= counter_seed(5, 1, 2) < 2**63


def test_source_in_memory_and_memmap_give_identical_batches(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 6)).astype(np.float16)
    b = rng.standard_normal((40, 3)).astype(np.float16)
    ids = [f"x{i}" for i in range(40)]
    fa = open_stream(write_stream(tmp_path / "a", ids, a, {})).features
    fb = open_stream(write_stream(tmp_path / "b", ids, b, {})).features
    rows = np.arange(0, 40, 2)
    ram = FeatureSource({"a": fa, "b": fb}, rows)
    mm = FeatureSource({"a": fa, "b": fb}, rows, ram_budget_bytes=100)
    assert ram.in_memory and not mm.in_memory
    assert len(ram) == 20 and ram.dims == {"a": 6, "b": 3}
    pos = np.array([1, 4, 9])
    x, y = ram.gather(pos), mm.gather(pos)
    for s in ("a", "b"):
        assert x[s].dtype == torch.float32
        torch.testing.assert_close(x[s], y[s], rtol=0, atol=0)
    np.testing.assert_array_equal(x["a"].numpy(), a[[2, 8, 18]].astype(np.float32))


def test_source_rejects_bad_input():
    good = np.zeros((5, 2), np.float32)
    bad = good.copy()
    bad[3, 1] = np.nan
    with pytest.raises(FeatureStoreError, match="stream b: non-finite features at row 3"):
        FeatureSource({"a": good, "b": bad})
    # a non-finite row outside the training rows is not an error
    FeatureSource({"a": good, "b": bad}, rows=np.array([0, 1, 2]))
    with pytest.raises(FeatureStoreError, match="stream b: 4 rows, but stream a has 5"):
        FeatureSource({"a": good, "b": good[:4]})
    with pytest.raises(FeatureStoreError, match="expected a \\[N, d\\] array"):
        FeatureSource({"a": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match="out of range"):
        FeatureSource({"a": good}, rows=np.array([7]))
    with pytest.raises(ValueError, match="batch_size"):
        EpochSampler(10, 0, 0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_first_nonfinite_row_across_blocks(dtype, value, monkeypatch):
    monkeypatch.setattr(sampler, "SCAN_BYTES", 3 * 4 * np.dtype(dtype).itemsize)  # blocks of 3 rows
    x = np.full((20, 4), 65504, dtype)  # the largest finite float16 is not taken for inf
    x[4, 0] = value  # not selected below: ignored
    x[13, 3] = value
    rows = np.array([0, 1, 2, 3, 5, 12, 13, 17])
    assert sampler.first_nonfinite_row(x, rows) == 13
    assert sampler.first_nonfinite_row(x, np.array([17, 5])) is None
    assert sampler.first_nonfinite_row(x, np.array([19, 4, 13])) == 4
    assert sampler.first_nonfinite_row(x, np.array([], dtype=np.int64)) is None


def test_stream_subset_draw_is_non_empty_seeded_and_has_the_conditional_keep_rate():
    from sparc.train.sampler import stream_subset

    p, n = 0.3, 3
    a = stream_subset(0, 7, 20000, n, p)
    assert a.shape == (20000, n) and a.dtype == bool
    assert a.any(axis=1).all()
    assert np.array_equal(a, stream_subset(0, 7, 20000, n, p))  # a pure function of (seed, step)
    assert not np.array_equal(a, stream_subset(0, 8, 20000, n, p))
    assert not np.array_equal(a, stream_subset(1, 7, 20000, n, p))
    # P(kept | non-empty) = p / (1 - (1 - p)^n), the same for every stream
    expected = p / (1 - (1 - p) ** n)
    assert np.allclose(a.mean(axis=0), expected, atol=0.015)
    assert stream_subset(0, 0, 5, 2, 1.0).all()
    assert stream_subset(0, 0, 5, 1, 0.1).all()  # one stream: always kept
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        stream_subset(0, 0, 5, 2, 0.0)
