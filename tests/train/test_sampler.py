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


def test_stored_rows_read_memmap_rows_views_and_column_slices(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((30, 5)).astype(np.float16)
    mm = open_stream(write_stream(tmp_path / "a", [f"x{i}" for i in range(30)], a, {})).features
    assert sampler.StoredRows.of(a) is None  # not a memmap: read by indexing
    rows = np.array([3, 4, 5, 6, 0, 29, 29, 7, 12, 11])  # runs, unsorted, a repeat
    for view, ref in ((mm, a), (mm[4:], a[4:]), (mm[::3], a[::3]), (mm[:, 1:4], a[:, 1:4])):
        reader = sampler.StoredRows.of(view)
        assert reader is not None
        ids = rows[rows < len(ref)]
        out = np.empty((len(ids), ref.shape[1]), np.float16)
        reader.read(ids, out)
        np.testing.assert_array_equal(out, ref[ids])


def test_stored_rows_finish_short_reads_and_name_a_cut_file(tmp_path, monkeypatch):
    a = np.arange(60, dtype=np.float16).reshape(12, 5)
    mm = open_stream(write_stream(tmp_path / "a", [f"x{i}" for i in range(12)], a, {})).features
    reader = sampler.StoredRows.of(mm)
    preadv = sampler.os.preadv
    monkeypatch.setattr(sampler.os, "preadv", lambda fd, bufs, pos: preadv(fd, [bufs[0][:3]], pos))
    out = np.empty((4, 5), np.float16)
    reader.read(np.array([8, 9, 10, 11]), out)  # one run of 40 bytes, 3 bytes per call
    np.testing.assert_array_equal(out, a[8:])
    monkeypatch.setattr(sampler.os, "preadv", preadv)
    cut = sampler.StoredRows(mm.filename, reader.position + 10 * reader.row_stride, reader.row_stride, 5, mm.dtype)
    with pytest.raises(FeatureStoreError, match="unexpected end of the feature file"):
        cut.read(np.array([1, 2]), out[:2])  # rows 11 and 12 of the file: 12 is past its end


class NoIndexing(np.memmap):
    """A memmap whose elements must not be read by indexing (so only StoredRows reads it)."""

    def __getitem__(self, key):
        raise AssertionError("the memmap was indexed")


def test_memmap_source_reads_batches_through_the_file_in_parallel_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(sampler, "READ_THREADS", 3)
    monkeypatch.setattr(sampler, "READ_PARALLEL_MIN_ROWS", 2)
    rng = np.random.default_rng(2)
    data = {"a": rng.standard_normal((50, 6)).astype(np.float16), "b": rng.standard_normal((50, 3)).astype(np.float16)}
    ids = [f"x{i}" for i in range(50)]
    mm = {s: open_stream(write_stream(tmp_path / s, ids, x, {})).features.view(NoIndexing) for s, x in data.items()}
    rows = np.arange(50)[::-1][:40]  # training rows in any order
    ram = FeatureSource(data, rows)
    loaded = FeatureSource(mm, rows)  # in memory, copied through StoredRows (finite check too)
    streamed = FeatureSource(mm, rows, ram_budget_bytes=0)
    assert ram.in_memory and loaded.in_memory and not streamed.in_memory
    pos = np.array([0, 1, 2, 5, 6, 7, 20, 33, 39])
    want = ram.gather(pos)
    for got in (loaded.gather(pos), streamed.gather(pos)):
        for s in data:
            assert got[s].dtype == torch.float32
            torch.testing.assert_close(got[s], want[s], rtol=0, atol=0)


def test_first_nonfinite_row_of_a_memmap(tmp_path, monkeypatch):
    monkeypatch.setattr(sampler, "SCAN_BYTES", 3 * 4 * 2)  # blocks of 3 rows
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=(20, 4))
    x[:] = 1.0
    x[13, 3] = np.inf
    x.flush()
    mm = np.load(tmp_path / "x.npy", mmap_mode="r").view(NoIndexing)
    assert sampler.first_nonfinite_row(mm, np.array([0, 5, 12, 13, 17])) == 13
    assert sampler.first_nonfinite_row(mm, np.array([17, 5])) is None


def test_prefetch_serves_the_next_gather_of_the_same_positions_only(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 4)).astype(np.float16)
    mm = open_stream(write_stream(tmp_path / "a", [f"x{i}" for i in range(30)], x, {})).features
    source = FeatureSource({"a": mm}, ram_budget_bytes=0)
    reads = []
    read = source._read
    monkeypatch.setattr(source, "_read", lambda positions: reads.append(positions.tolist()) or read(positions))
    source.prefetch(np.array([1, 5, 7]))
    np.testing.assert_array_equal(source.gather(np.array([1, 5, 7]))["a"].numpy(), x[[1, 5, 7]].astype(np.float32))
    assert reads == [[1, 5, 7]]  # read once, in the background
    source.prefetch(np.array([2, 3]))
    np.testing.assert_array_equal(source.gather(np.array([4, 9]))["a"].numpy(), x[[4, 9]].astype(np.float32))
    assert [4, 9] in reads  # other positions: read by the gather
    np.testing.assert_array_equal(source.gather(np.array([2, 3]))["a"].numpy(), x[[2, 3]].astype(np.float32))
    ram = FeatureSource({"a": mm})
    ram.prefetch(np.array([0]))  # rows in memory: nothing to read ahead
    assert ram.in_memory and ram.gather(np.array([0]))["a"].shape == (1, 4)
