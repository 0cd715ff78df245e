"""Training on the device (``train.device``) against training on the CPU: batches through pinned
memory, the loop (with revival), checkpoints moving between the device and the CPU, the train
stage on stored features, and the bf16 / TF32 options (see tests/device.py for
``SPARC_TEST_DEVICE``).

Tolerances. One step agrees with the CPU's within float32 rounding (tests/model/test_cuda.py).
Over the 12 steps of these runs two rare, local effects add to that: an Adam update whose gradient
is within rounding of 0 (its sign, hence a move of up to lr, is then not fixed by float32) and a
top-k choice within rounding of a tie. So the logged losses are compared within 1e-3 relative and
the weights within 3 lr (lr = 3e-3; the weights move by up to 12 lr in these runs), the logged
dead and active fractions within 2 of the L = 32 latents and l0 within 2 picks in a batch of 64.
On the CPU (``SPARC_TEST_DEVICE=cpu``) the two paths agree to 1e-7. bf16 / TF32: the final loss
within 2e-2 / 5e-3 of float32's (bf16 on the CPU: 5e-4).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparc.features.store import write_stream
from sparc.model.sae import MultiStreamSAE
from sparc.train.checkpoint import latest_checkpoint
from sparc.train.loop import Trainer, TrainResult, TrainSpec, train_arrays
from sparc.train.sampler import FeatureSource
from tests.device import DEVICE, cpu_path, device_path, needs_device
from tests.train import test_stage
from tests.train.test_loop import DATA, make_spec

pytestmark = [needs_device, pytest.mark.kernels]

LR = 3.0e-3
WEIGHT_TOL = 3 * LR


def spec_on(device: torch.device | str, **train) -> TrainSpec:
    """The loop tests' small spec (planted data, L 32, k 3, 4 steps per epoch) on ``device``."""
    base = dict(epochs=3, dead_steps=2, revive_every=4, checkpoint_every=6, log_every=3, lr=LR)
    base.update(train)
    return make_spec(device=str(device), **base)


def device_of(on_device: bool) -> torch.device:
    return DEVICE if on_device else torch.device("cpu")


def train(on_device: bool, **kwargs) -> TrainResult:
    """``train_arrays`` on ``DEVICE`` (its code path) or the CPU reference (the CPU kernels)."""
    spec = kwargs.pop("spec", None) or spec_on(device_of(on_device))
    with (device_path() if on_device else cpu_path()):
        return train_arrays(DATA.features, spec, **kwargs)


def assert_history_close(got: list, want: list) -> None:
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, g), (_, w) in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for name in g:
            if name.startswith(("dead_fraction/", "active_fraction/")):
                assert g[name] == pytest.approx(w[name], abs=2 / 32), (step, name)
            elif name.startswith("l0/"):
                assert g[name] == pytest.approx(w[name], abs=2 / 64), (step, name)  # mean over 64 samples
            else:
                assert g[name] == pytest.approx(w[name], rel=1e-3, abs=1e-6), (step, name)


def assert_weights_close(got: MultiStreamSAE, want: MultiStreamSAE) -> None:
    """``got`` (on the device) within ``WEIGHT_TOL`` of ``want`` (on the CPU), tensor by tensor."""
    w = want.state_dict()
    for name, t in got.state_dict().items():
        assert t.device.type == DEVICE.type
        torch.testing.assert_close(t.cpu(), w[name].cpu(), rtol=0, atol=WEIGHT_TOL, msg=name)


@pytest.fixture(scope="module")
def reference() -> TrainResult:
    """The run on the CPU (CPU kernels)."""
    return train(on_device=False)


# ----------------------------------------------------------------------------- batches


def test_batches_reach_the_device_through_pinned_memory(tmp_path: Path, monkeypatch) -> None:
    """In memory (rows kept on the device, batch indices copied there) and out of core (rows
    read from a stored float16 memmap): the same float32 values as the CPU source, on the device;
    on CUDA each batch's host-to-device copies (indices or rows) go through pinned memory,
    elsewhere nothing is pinned."""
    stored = {}
    for s, x in DATA.features.items():
        path = tmp_path / f"{s}.f16"
        mm = np.memmap(path, dtype=np.float16, mode="w+", shape=x.shape)
        mm[:] = x
        mm.flush()
        stored[s] = np.memmap(path, dtype=np.float16, mode="r", shape=x.shape)
    rows = np.arange(3, 250, 2)
    positions = np.array([0, 5, 6, 40, 99, 123])
    pinned: list[bool] = []
    real_pin = torch.Tensor.pin_memory

    def spy(self, *args, **kwargs):
        out = real_pin(self, *args, **kwargs)
        pinned.append(out.is_pinned())
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    for arrays, budget in ((DATA.features, None), (stored, 0)):
        want = FeatureSource(arrays, rows, ram_budget_bytes=budget).gather(positions)
        pinned.clear()
        source = FeatureSource(arrays, rows, ram_budget_bytes=budget, device=DEVICE)
        assert source.in_memory == (budget is None)
        source.prefetch(positions)  # the out-of-core path reads ahead; a no-op in memory
        got = source.gather(positions)
        for s in arrays:
            assert got[s].device.type == DEVICE.type and got[s].dtype == torch.float32
            assert torch.equal(got[s].cpu(), want[s])  # copies are exact
        if DEVICE.type == "cuda":
            assert pinned and all(pinned)
        else:
            assert pinned == []


# ----------------------------------------------------------------------------- the loop


def test_training_loop_on_device_matches_cpu(reference: TrainResult, monkeypatch) -> None:
    revived: list[int] = []
    real_revive = MultiStreamSAE.revive

    def spy(self, stream, latents, generator, scale=0.01):
        assert generator.device.type == "cpu"  # the new rows do not depend on the device
        revived.append(int(latents.numel()))
        return real_revive(self, stream, latents, generator, scale=scale)

    monkeypatch.setattr(MultiStreamSAE, "revive", spy)
    res = train(on_device=True)
    assert res.finished and res.step == 12
    assert sum(revived) > 0  # revival ran (and on the device's run the same rows were drawn)
    assert all(p.device.type == DEVICE.type for p in res.model.parameters())
    assert_history_close(res.history, reference.history)
    assert_weights_close(res.model, reference.model)


def optimizer_state_devices(trainer: Trainer) -> set[str]:
    return {f"{t.device.type}/{key}" for st in trainer.optimizer.state.values() for key, t in st.items()}


def test_checkpoints_move_between_device_and_cpu(reference: TrainResult, tmp_path: Path) -> None:
    """A run checkpointed on the device resumes on the CPU and one checkpointed on the CPU resumes
    on the device (train.device is not part of the checkpoint key); both end close to the
    uninterrupted runs, with the history before the checkpoint replayed as it was logged."""
    uninterrupted = {True: train(on_device=True), False: reference}
    for first_on_device in (True, False):
        then_on_device = not first_on_device
        then = device_of(then_on_device)
        run = tmp_path / ("device-then-cpu" if first_on_device else "cpu-then-device")
        part = train(first_on_device, checkpoint_dir=run, max_steps=6)
        assert part.checkpoint == latest_checkpoint(run) and part.checkpoint.name == "step-00000006"
        # the checkpoint loads onto the other device, Adam's state (its step counters too: the
        # fused kernel reads them on the parameters' device) included
        trainer = Trainer(FeatureSource(DATA.features, device=then), spec_on(then), then)
        trainer.load(part.checkpoint)
        assert trainer.optimizer.param_groups[0]["fused"] is True
        assert optimizer_state_devices(trainer) == {f"{then.type}/{k}" for k in ("step", "exp_avg", "exp_avg_sq")}
        assert all(t.device.type == then.type for t in trainer.since.values())
        resumed = train(then_on_device, checkpoint_dir=run)
        assert resumed.finished and all(p.device.type == then.type for p in resumed.model.parameters())
        assert resumed.history[:2] == part.history  # replayed from the checkpoint
        full = uninterrupted[then_on_device]
        assert_history_close(resumed.history, full.history)
        torch.testing.assert_close(
            {k: v.cpu() for k, v in resumed.model.state_dict().items()},
            {k: v.cpu() for k, v in full.model.state_dict().items()}, rtol=0, atol=WEIGHT_TOL,
        )


# ----------------------------------------------------------------------------- the train stage


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """The train stage tests' layout: a prepared split and float16 feature stores (planted data)."""
    data = test_stage.DATA
    splits = ["train" if i % 5 else "val" for i in range(len(data))]
    fp = test_stage.write_prepared(tmp_path / "prepared", data.ids, splits)
    for s, x in data.features.items():
        write_stream(tmp_path / "features" / s, data.ids, x.astype(np.float16),
                     {"model": f"planted:{s}", "input": "image", "dataset_fingerprint": fp})
    return tmp_path


def test_train_stage_on_device_reads_the_store_out_of_core(store: Path) -> None:
    """``train.device`` set and ``ram_budget_mb: 0`` (batches read from the memmapped store):
    the stage trains on the device and writes a model and metrics close to the CPU run's."""
    with cpu_path():
        test_stage.run(store, test_stage.params(ram_budget_mb=0), "cpu")
    with device_path():
        test_stage.run(store, test_stage.params(ram_budget_mb=0, device=str(DEVICE)), "device")
    got, want = (load_file(str(store / tag / "sae/model.safetensors")) for tag in ("device", "cpu"))
    torch.testing.assert_close(got, want, rtol=0, atol=WEIGHT_TOL)
    got_m, want_m = (json.loads((store / tag / "reports/metrics.json").read_text()) for tag in ("device", "cpu"))
    assert got_m["step"] == want_m["step"] == 15
    for losses in (lambda m: m["loss"], lambda m: m["val"]["loss"]):  # training log, validation pass
        got_l, want_l = losses(got_m), losses(want_m)
        assert got_l.keys() == want_l.keys() >= {"total", "self", "cross"}
        assert got_l == pytest.approx(want_l, rel=1e-3, abs=1e-6)


# ----------------------------------------------------------------------------- precision options


@pytest.mark.parametrize(("option", "tol"), [("bf16", 2e-2), ("tf32", 5e-3)])
def test_precision_options_train_on_device_close_to_float32(option: str, tol: float) -> None:
    spec = spec_on(DEVICE, epochs=2)
    plain = train(True, spec=spec)
    change = {"precision": "bf16"} if option == "bf16" else {"tf32": True}
    other = train(True, spec=dataclasses.replace(spec, train=dataclasses.replace(spec.train, **change)))
    assert other.model.bf16 == (option == "bf16") and other.model.tf32 == (option == "tf32")
    assert other.metrics["loss/total"] == pytest.approx(plain.metrics["loss/total"], rel=tol)
    assert all(torch.isfinite(p).all() for p in other.model.parameters())
