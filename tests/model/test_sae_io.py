"""save_sae / load_sae round trip and batched encode_dataset."""

import json

import numpy as np
import pytest
import torch

from sparc.model.codes import SparseCodes
from sparc.model.io import encode_dataset, load_sae, save_sae
from sparc.model.sae import MultiStreamSAE, SAEConfig
from tests.topk_codes import assert_topk_code, logit_tol

DIMS = {"a": 8, "b": 6, "c": 5}


def trained_model(seed: int = 0) -> MultiStreamSAE:
    model = MultiStreamSAE(SAEConfig(dims=DIMS, L=32, k=4, topk="local", k_aux=8), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    return model


def test_save_load_round_trip_is_byte_identical_and_preserves_outputs(tmp_path):
    model = trained_model()
    out = save_sae(model, tmp_path / "m1")
    assert out == tmp_path / "m1"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp left
    assert json.loads((out / "config.json").read_text()) == model.cfg.to_dict()
    loaded = load_sae(out)
    assert loaded.cfg == model.cfg and loaded.streams == model.streams
    save_sae(loaded, tmp_path / "m2")
    save_sae(trained_model(), tmp_path / "m3")  # same weights built again
    for name in ("model.safetensors", "config.json"):
        b1 = (tmp_path / "m1" / name).read_bytes()
        assert b1 == (tmp_path / "m2" / name).read_bytes() == (tmp_path / "m3" / name).read_bytes()
    x = {s: torch.randn(7, d) for s, d in DIMS.items()}
    for mode in ("global", "local"):
        a, b = model.encode(x, mode), loaded.encode(x, mode)
        for s in DIMS:
            assert torch.equal(a[s].indices, b[s].indices) and torch.equal(a[s].values, b[s].values)
    torch.testing.assert_close(loaded.loss(x, lam=1.0).total, model.loss(x, lam=1.0).total, rtol=0, atol=0)
    assert load_sae(out / "model.safetensors").cfg == model.cfg  # the weights file path works too
    save_sae(MultiStreamSAE(model.cfg, seed=5), out)  # overwrite in place
    assert not torch.equal(load_sae(out).W_enc["a"], model.W_enc["a"])


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_sae(tmp_path)
    save_sae(trained_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["dims"]["d"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match config.json"):
        load_sae(tmp_path)


@pytest.mark.parametrize(
    ("file", "damage", "reason"),
    [  # issue 22.12: a SafetensorError traceback, or a JSON error naming no file, before
        ("model.safetensors", lambda b: b[: len(b) // 2], "unreadable \\(.*\\)"),
        ("model.safetensors", lambda b: b"", "unreadable \\(.*\\)"),
        ("config.json", lambda b: b[: len(b) // 2], "unreadable \\(Unterminated string|unreadable \\(Expecting"),
        ("config.json", lambda b: b"\xff" + b, "unreadable \\('utf-8' codec can't decode"),
        ("config.json", lambda b: b"[1, 2]", "unreadable \\(expected a JSON object, got list\\)"),
        ("config.json", lambda b: b'{"L": 32}', "unreadable \\(not an SAE configuration: SAEConfig: .*missing keys"),
    ],
)
def test_damaged_files_are_named_with_how_to_restore_them(tmp_path, file, damage, reason):
    from sparc.model.files import SAEFileError

    save_sae(trained_model(), tmp_path)
    path = tmp_path / file
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SAEFileError, match=f"^{path}: ({reason}).*; restore it with `dvc checkout data/sae` "
                                           "\\(or retrain: `dvc repro train`\\)$") as info:
        load_sae(tmp_path)
    assert "\n" not in str(info.value) and isinstance(info.value, ValueError)


@pytest.mark.kernels  # run again under other CPU kernels (Makefile test-kernels)
@pytest.mark.parametrize("mode", ["global", "local"])
def test_encode_dataset_matches_encode_in_bounded_batches(tmp_path, mode, monkeypatch):
    model = trained_model()
    n = 53
    rng = np.random.default_rng(0)
    feats = {}
    for s, d in DIMS.items():  # float16 memmaps, as the feature store gives them
        mm = np.lib.format.open_memmap(tmp_path / f"{s}.npy", mode="w+", dtype=np.float16, shape=(n, d))
        mm[:] = rng.standard_normal((n, d)).astype(np.float16)
        feats[s] = mm
    ids = [f"id{i}" for i in range(n)]
    seen_rows = []
    logits = model.logits

    def recording_logits(x):
        seen_rows.extend(v.shape[0] for v in x.values())
        return logits(x)

    monkeypatch.setattr(model, "logits", recording_logits)
    codes = encode_dataset(model, feats, ids, mode=mode, batch_size=10, progress=False)
    assert max(seen_rows) == 10  # never more than one batch of [batch, L] logits
    assert isinstance(codes, SparseCodes) and codes.ids == ids and codes.L == 32
    # The reference: the logits of all rows in one batch. Batches of 10 are another GEMM shape, so
    # logits may differ in the last bit (issue 21): the ids must be a top-k of these up to near-ties.
    with torch.no_grad():
        h = model.logits({s: torch.from_numpy(np.asarray(v, dtype=np.float32)) for s, v in feats.items()})
    if mode == "global":  # one index set from the summed logits
        total = sum(h.values())
        scores, tol = dict.fromkeys(DIMS, total), logit_tol(total, sum(DIMS.values()))
    else:
        scores, tol = h, max(logit_tol(h[s], d) for s, d in DIMS.items())
    for s in DIMS:
        assert codes.indices[s].dtype == np.int32 and codes.values[s].dtype == np.float32
        assert codes.indices[s].shape == (n, 4)
        assert_topk_code(codes.indices[s], scores[s], 4, tol, values=codes.values[s], logits=h[s], msg=s)
    # a subset of streams is encoded jointly over that subset
    sub = encode_dataset(model, {"a": feats["a"]}, ids, mode="global", batch_size=64, progress=False)
    assert sub.streams == ["a"]


def test_codes_load_reads_all_rows_or_only_the_asked_ones(tmp_path):
    rng = np.random.default_rng(3)
    n, ids = 40, [f"id{i}" for i in range(40)]
    codes = SparseCodes(ids, 32, {s: rng.integers(0, 32, (n, 4)).astype(np.int32) for s in DIMS},
                        {s: rng.random((n, 4)).astype(np.float32) for s in DIMS})
    codes.save(tmp_path / "codes")
    back = SparseCodes.load(tmp_path / "codes")
    assert back.ids == ids and back.streams == codes.streams
    rows = np.array([39, 3, 3, 17])
    some = SparseCodes.load(tmp_path / "codes", rows=rows)
    assert some.ids == [ids[i] for i in rows] and some.L == 32
    for s in DIMS:
        np.testing.assert_array_equal(back.indices[s], codes.indices[s])
        np.testing.assert_array_equal(some.indices[s], codes.indices[s][rows])
        np.testing.assert_array_equal(some.values[s], codes.values[s][rows])
    meta = SparseCodes.read_meta(tmp_path / "codes")
    meta["ids"] = ids[:-1]  # one id fewer than stored rows
    with pytest.raises(ValueError, match=f"expected {n - 1} rows"):
        SparseCodes.load(tmp_path / "codes", rows=rows, meta=meta)
    with pytest.raises(ValueError, match="rows 3..40 were asked for"):
        SparseCodes.load(tmp_path / "codes", rows=np.array([3, 40]))


def test_encode_dataset_rejects_misaligned_inputs():
    model = trained_model()
    feats = {"a": np.zeros((4, 8), np.float32), "b": np.zeros((3, 6), np.float32)}
    with pytest.raises(ValueError, match="stream 'b'"):
        encode_dataset(model, feats, ["x"] * 4, mode="global", progress=False)
    with pytest.raises(ValueError, match="mode"):
        encode_dataset(model, {"a": feats["a"]}, ["x"] * 4, mode="joint", progress=False)
    with pytest.raises(KeyError, match="unknown stream"):
        encode_dataset(model, {"q": feats["a"]}, ["x"] * 4, mode="local", progress=False)


def test_batchnorm_model_round_trip_keeps_running_statistics(tmp_path):
    model = MultiStreamSAE(SAEConfig(dims=DIMS, L=32, k=4, topk="local", encoder="batchnorm"), seed=3)
    x = {s: torch.randn(40, d, generator=torch.Generator().manual_seed(1)) for s, d in DIMS.items()}
    for s in DIMS:  # a few training-mode steps move the running statistics away from 0 / 1
        model.usae_paper_loss(x, s).total.backward()
    assert not torch.equal(model.bn["a"].running_var, torch.ones(32))
    out = save_sae(model, tmp_path / "m1")
    assert json.loads((out / "config.json").read_text())["encoder"] == "batchnorm"
    loaded = load_sae(out)
    assert not loaded.training and loaded.cfg == model.cfg
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    save_sae(loaded, tmp_path / "m2")
    assert (tmp_path / "m1" / "model.safetensors").read_bytes() == (tmp_path / "m2" / "model.safetensors").read_bytes()
    a, b = model.encode(x, "local"), loaded.encode(x, "local")
    for s in DIMS:
        assert torch.equal(a[s].indices, b[s].indices) and torch.equal(a[s].values, b[s].values)


def test_config_without_encoder_key_loads_as_the_linear_model(tmp_path):
    model = trained_model()
    save_sae(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["encoder"]  # as written before the key existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_sae(tmp_path)
    assert loaded.cfg.encoder == "linear" and torch.equal(loaded.b_pre["a"], model.b_pre["a"])
