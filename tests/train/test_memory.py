"""The training memory estimate and the check that refuses an L too large for the device."""

import re

import pytest

from sparc.train import memory
from sparc.train.memory import check_train_memory, train_memory_bytes

DIMS = {"a": 1024, "b": 768, "c": 768}
GiB = 2**30


def test_estimate_holds_parameters_gradients_adam_state_and_logits():
    L, B = 8192, 256
    est = train_memory_bytes(DIMS, L, 64, 512, B, "cpu")
    per_latent = (train_memory_bytes(DIMS, 2 * L, 64, 512, B, "cpu") - est) / L
    params = 4 * sum(2 * d + 1 for d in DIMS.values())  # bytes per latent
    logits = 4 * B * len(DIMS)
    assert 4 * params + logits < per_latent < 4 * params + 3 * logits
    assert est > memory.RUNTIME + L * per_latent
    assert train_memory_bytes(DIMS, L, 64, 512, 2 * B, "cpu") > est
    assert train_memory_bytes(DIMS, L, 64, 512, B, "cuda") > est  # remove_parallel_grad's [L, d] product


def test_check_names_L_and_the_largest_L_that_fits(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 4 * GiB)
    with pytest.raises(ValueError) as info:
        check_train_memory(DIMS, 2_000_000, 64, 512, 256, "cpu")
    msg = str(info.value)
    m = re.fullmatch(r"L: 2000000 needs about (\d+\.\d) GiB to train \(model, gradients, Adam state, batch\) on cpu, "
                     r"4\.0 GiB available; set L <= (\d+) \(or train on a device with more memory\)", msg)
    assert m, msg
    assert float(m[1]) == round(train_memory_bytes(DIMS, 2_000_000, 64, 512, 256, "cpu") / GiB, 1)
    fit = int(m[2])
    assert train_memory_bytes(DIMS, fit, 64, 512, 256, "cpu") <= 4 * GiB
    assert train_memory_bytes(DIMS, fit * 11 // 10, 64, 512, 256, "cpu") > 4 * GiB


def test_check_returns_the_estimate_when_it_fits(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024 * GiB)
    assert check_train_memory(DIMS, 8192, 64, 512, 256, "cpu") == train_memory_bytes(DIMS, 8192, 64, 512, 256, "cpu")


def test_nothing_fits(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)
    with pytest.raises(ValueError, match=r"^L: 8192 needs about .* on cpu, 1\.0 MiB available; even L = k = 64 does not "
                       r"fit: lower train\.batch_size or free memory$"):
        check_train_memory(DIMS, 8192, 64, 512, 256, "cpu")


def test_available_cpu_memory_reads_meminfo(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       32000000 kB\nMemFree:         1000 kB\nMemAvailable:   2048000 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    assert memory.available_bytes("cpu") == 2048000 * 1024
    monkeypatch.setattr(memory, "MEMINFO", tmp_path / "missing")  # e.g. macOS: os.sysconf instead
    assert memory.available_bytes("cpu") > 0
