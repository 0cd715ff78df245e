"""train.precision (issue 26): what auto chooses, and that the run uses and records it."""

import dataclasses

import numpy as np
import pytest
import torch

import sparc.train.precision as precision
from sparc.params import TrainParams
from sparc.train.loop import TrainSpec, train_arrays
from sparc.train.stage import precision_metric

CPU = torch.device("cpu")
DIMS = {"a": 16, "b": 12}


@pytest.mark.parametrize("fixed", ["float32", "bf16"])
def test_fixed_precisions_are_used_as_they_are(monkeypatch, fixed):
    monkeypatch.setattr(precision, "encoder_seconds", lambda *a, **k: pytest.fail("timed a fixed precision"))
    assert precision.resolve_precision(fixed, DIMS, 64, 32, CPU) == fixed


@pytest.mark.parametrize(("native", "bf16_s", "expected"), [
    (False, 0.1, "float32"),  # no native bf16: never timed, float32
    (True, 0.5, "bf16"),      # native and twice as fast
    (True, 0.95, "float32"),  # native but less than MIN_SPEEDUP faster
])
def test_auto_takes_bf16_only_where_native_and_faster(monkeypatch, native, bf16_s, expected):
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    monkeypatch.setattr(precision, "encoder_seconds", lambda dims, L, B, device, bf16: bf16_s if bf16 else 1.0)
    assert precision.resolve_precision("auto", DIMS, 64, 32, CPU) == expected


def test_encoder_timing_runs_on_this_machine():
    assert precision.encoder_seconds(DIMS, 64, 8, CPU, bf16=False) > 0
    assert isinstance(precision.native_bf16(CPU), bool)


def test_the_run_uses_and_reports_its_choice(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.setattr(precision, "encoder_seconds", lambda dims, L, B, device, bf16: 0.5 if bf16 else 1.0)
    gen = np.random.default_rng(0)
    feats = {s: gen.standard_normal((40, d)).astype(np.float32) for s, d in DIMS.items()}
    spec = TrainSpec(L=32, k=4, train=TrainParams(batch_size=16, epochs=1, device="cpu", precision="auto"))
    result = train_arrays(feats, spec)
    assert result.precision == "bf16" and result.model.bf16
    assert precision_metric(spec, result.precision) == {"precision/bf16": 1.0}
    plain = dataclasses.replace(spec, train=dataclasses.replace(spec.train, precision="float32"))
    assert precision_metric(plain, "float32") == {}  # metrics.json of a float32 run as before


def _choose(monkeypatch, bf16_s: float) -> None:
    """Make auto find native bf16 taking ``bf16_s`` of float32's time."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.setattr(precision, "encoder_seconds", lambda dims, L, B, device, bf16: bf16_s if bf16 else 1.0)


def test_a_resumed_auto_run_keeps_its_checkpoints_format(monkeypatch, tmp_path, capsys):
    gen = np.random.default_rng(1)
    feats = {s: gen.standard_normal((64, d)).astype(np.float32) for s, d in DIMS.items()}
    spec = TrainSpec(L=32, k=4, train=TrainParams(batch_size=16, epochs=2, device="cpu", precision="auto"))
    _choose(monkeypatch, 0.5)
    whole = train_arrays(feats, spec)
    assert whole.precision == "bf16"
    train_arrays(feats, spec, checkpoint_dir=tmp_path, max_steps=3)  # interrupted after 3 of 8 steps
    _choose(monkeypatch, 1.0)  # auto would now choose float32 (another machine, another timing)
    resumed = train_arrays(feats, spec, checkpoint_dir=tmp_path)
    assert resumed.precision == "bf16" and resumed.model.bf16
    assert "resuming in bf16" in capsys.readouterr().err
    for name, value in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
