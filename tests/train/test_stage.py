"""The `train` stage on a small feature store written in code: outputs, determinism, resume, errors."""

import csv
import json

import numpy as np
import pytest

from sparc.data.hierarchy import Hierarchy
from sparc.data.planted import PlantedConfig, make_planted
from sparc.data.prepared import file_sha256
from sparc.features.store import FeatureStoreError, write_stream
from sparc.model.io import load_sae
from sparc.params import Params, StreamParams, TrainParams
from sparc.train import stage
from sparc.train.stage import run_train

DATA = make_planted(
    PlantedConfig(dims={"a": 12, "b": 10}, n_samples=200, n_parents=2, n_children=2, world_dim=6)
)


def write_prepared(root, ids, splits) -> str:
    root.mkdir(parents=True)
    with (root / "samples.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "image", "caption", "labels", "split", "image_sha256"])
        w.writeheader()
        for i, split in zip(ids, splits, strict=True):
            w.writerow({"id": i, "image": f"{i}.png", "caption": i, "labels": "", "split": split, "image_sha256": ""})
    Hierarchy.flat(["x"]).save(root / "hierarchy.json")
    fp = file_sha256(root / "samples.csv")
    (root / "meta.json").write_text(json.dumps({"dataset": "planted", "fingerprint": fp}))
    return fp


@pytest.fixture
def layout(tmp_path):
    splits = ["train" if i % 5 else "val" for i in range(len(DATA))]
    fp = write_prepared(tmp_path / "prepared", DATA.ids, splits)
    for s, x in DATA.features.items():
        write_stream(tmp_path / "features" / s, DATA.ids, x.astype(np.float16),
                     {"model": f"planted:{s}", "input": "image", "dataset_fingerprint": fp})
    return tmp_path


def params(**train) -> Params:
    base = dict(batch_size=32, epochs=3, lr=3.0e-3, k_aux=8, dead_steps=5, revive_every=4,
                checkpoint_every=4, log_every=4, device="cpu")
    base.update(train)
    streams = {s: StreamParams(model=f"planted:{s}", input="image") for s in DATA.streams}
    return Params(seed=0, k=3, L=24, lam=1.0, streams=streams, train=TrainParams(**base))


def run(root, p, tag, **kw):
    return run_train(
        p, features_root=root / "features", prepared_dir=root / "prepared", out_dir=root / tag / "sae",
        reports_dir=root / tag / "reports", checkpoints_dir=root / "checkpoints", progress=False, **kw,
    )


def test_outputs_metrics_and_checkpoint_cleanup(layout):
    out = run(layout, params(), "a")
    model = load_sae(out)
    assert model.cfg.dims == {"a": 12, "b": 10} and model.cfg.L == 24
    metrics = json.loads((layout / "a/reports/metrics.json").read_text())
    assert metrics["step"] == 15  # 160 train rows, batch 32 -> 5 steps per epoch, 3 epochs
    assert set(metrics["loss"]) >= {"total", "self", "cross", "aux"}
    assert set(metrics["cross_nmse"]) == {"a_to_b", "b_to_a"}
    assert set(metrics["val"]["loss"]) >= {"total", "self", "cross"}
    plots = layout / "a/reports/plots/metrics"
    rows = (plots / "loss/total.tsv").read_text().splitlines()
    assert rows[0] == "step\ttotal" and [r.split("\t")[0] for r in rows[1:]] == ["4", "8", "12", "15"]
    assert (plots / "l0/a.tsv").is_file() and (plots / "dead_fraction/b.tsv").is_file()
    assert not any((layout / "checkpoints").iterdir())  # finished run: checkpoints removed


def test_byte_identical_and_resumed_runs(layout):
    run(layout, params(), "full")
    ckpt = run(layout, params(), "part", max_steps=6)
    assert ckpt.parent.parent == layout / "checkpoints" and ckpt.name == "step-00000006"
    assert not (layout / "part/sae/model.safetensors").exists()
    run(layout, params(), "part")
    run(layout, params(), "again")
    full = layout / "full"
    for other in ("part", "again"):
        for f in ("sae/model.safetensors", "sae/config.json", "reports/metrics.json",
                  "reports/plots/metrics/loss/self.tsv", "reports/plots/metrics/cross_nmse/a_to_b.tsv"):
            assert (layout / other / f).read_bytes() == (full / f).read_bytes(), (other, f)


def test_memmap_path_gives_the_same_model(layout):
    run(layout, params(), "ram")
    run(layout, params(ram_budget_mb=0), "memmap")
    assert (layout / "ram/sae/model.safetensors").read_bytes() == (layout / "memmap/sae/model.safetensors").read_bytes()


def test_misaligned_or_foreign_features_are_rejected(layout):
    ids = list(DATA.ids)
    ids[3], ids[4] = ids[4], ids[3]
    x = DATA.features["b"].astype(np.float16)
    fp = json.loads((layout / "prepared/meta.json").read_text())["fingerprint"]
    write_stream(layout / "features/b", ids, x, {"dataset_fingerprint": fp})
    write_stream(layout / "features/a", ids, DATA.features["a"].astype(np.float16), {"dataset_fingerprint": fp})
    with pytest.raises(FeatureStoreError, match="stream a: row 3 has id 'planted004'"):
        run(layout, params(), "x")
    write_stream(layout / "features/a", DATA.ids, DATA.features["a"].astype(np.float16), {"dataset_fingerprint": "f" * 64})
    write_stream(layout / "features/b", DATA.ids, x, {"dataset_fingerprint": "f" * 64})
    with pytest.raises(FeatureStoreError, match="stream a: extracted from dataset fingerprint ffff"):
        run(layout, params(), "x")


def corrupt(layout, stream: str, row: int, value: float) -> None:
    """Write ``value`` into one feature of ``row`` behind the store's back (its writer refuses it)."""
    arr = np.load(layout / "features" / stream / "features.npy", mmap_mode="r+")
    arr[row, 2] = value
    arr.flush()
    del arr


def test_non_finite_training_row_is_named(layout):
    corrupt(layout, "b", 7, np.inf)  # row 7 is a training row (7 % 5 != 0)
    with pytest.raises(FeatureStoreError, match=r"^stream b: sample id 'planted007' \(row 7, train split\) has "
                       r"infinite features; re-extract it \(dvc repro extract@b\) or remove the sample$"):
        run(layout, params(), "x")


def test_non_finite_validation_row_is_named_before_training(layout, monkeypatch):
    corrupt(layout, "a", 5, np.nan)  # row 5 is a validation row, read only after training

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the validation rows were checked")

    monkeypatch.setattr(stage, "train_sae", no_training)
    with pytest.raises(FeatureStoreError, match=r"^stream a: sample id 'planted005' \(row 5, val split\) has NaN "
                       r"features; re-extract it \(dvc repro extract@a\) or remove the sample$"):
        run(layout, params(), "x")


def test_reports_appear_only_when_training_finished(layout):
    reports = layout / "r/reports"
    run(layout, params(), "r")  # an earlier, finished run
    assert json.loads((reports / "metrics.json").read_text())["step"] == 15
    ckpt = run(layout, params(epochs=4), "r", max_steps=6)  # a new run, stopped early like a kill
    # neither the partial metrics nor the previous run's results stand in reports/train
    assert not (reports / "metrics.json").exists() and not (reports / "plots").exists()
    live = json.loads((ckpt.parent / "live/metrics.json").read_text())  # progress sits with the checkpoints
    assert live["step"] == 4 and "val" not in live
    run(layout, params(epochs=4), "r")
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["step"] == 20 and set(metrics["val"]["loss"]) >= {"total", "self", "cross"}
    assert (reports / "plots/metrics/loss/total.tsv").read_text().splitlines()[1:] != []
    assert not (layout / "checkpoints").exists() or not any((layout / "checkpoints").iterdir())


def test_missing_stream_is_named(layout):
    p = params()
    p = Params(seed=0, k=3, L=24, streams={**p.streams, "c": StreamParams("planted:c", "image")}, train=p.train)
    with pytest.raises(FeatureStoreError, match="stream c"):
        run(layout, p, "x")


def test_too_large_L_is_refused_before_training(layout, monkeypatch):
    from sparc.train import memory

    def no_training(*args, **kwargs):
        raise AssertionError("training started although the model does not fit")

    monkeypatch.setattr(memory, "available_bytes", lambda device: 300 * 2**20)
    monkeypatch.setattr(stage, "train_sae", no_training)
    p = params()
    p = Params(seed=0, k=3, L=100_000, streams=p.streams, train=p.train)
    with pytest.raises(ValueError, match=r"^L: 100000 needs about \d+\.\d MiB to train \(.*\) on cpu, 300\.0 MiB "
                       r"available; set L <= \d+ \(or train on a device with more memory\)$"):
        run(layout, p, "x")
