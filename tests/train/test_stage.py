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


def test_non_finite_training_row_is_named(layout):
    fp = json.loads((layout / "prepared/meta.json").read_text())["fingerprint"]
    x = DATA.features["b"].astype(np.float16)
    x[7, 2] = np.inf  # row 7 is a training row (7 % 5 != 0)
    # the store's writer refuses non-finite values, so patch the file behind its back
    write_stream(layout / "features/b", DATA.ids, DATA.features["b"].astype(np.float16), {"dataset_fingerprint": fp})
    arr = np.load(layout / "features/b/features.npy", mmap_mode="r+")
    arr[7, 2] = np.inf
    arr.flush()
    del arr
    with pytest.raises(FeatureStoreError, match="stream b: non-finite features at row 7"):
        run(layout, params(), "x")


def test_missing_stream_is_named(layout):
    p = params()
    p = Params(seed=0, k=3, L=24, streams={**p.streams, "c": StreamParams("planted:c", "image")}, train=p.train)
    with pytest.raises(FeatureStoreError, match="stream c"):
        run(layout, p, "x")
