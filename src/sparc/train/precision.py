"""``train.precision``: the number format of the dense encoder matmul, and what ``auto`` chooses.

``float32`` (the default) computes every logit in float32; ``bf16`` casts the encoder matmul's
inputs and weights to bfloat16 (float32 output, gradients and sparse work in float32; see
:class:`sparc.model.sae.MultiStreamSAE`); ``auto`` chooses bf16 where the device computes it
natively (a CPU with AVX512-BF16 or AMX, a CUDA GPU with bf16 support) *and* a short timing of
the run's own encoder matmuls shows it faster by :data:`MIN_SPEEDUP`, float32 otherwise. The
default stays float32 because ``auto`` makes the trained weights depend on the machine (its
instruction set, and a timing), while float32 gives the same results on every CPU of the
project's tests. The stage records the choice in ``reports/train/metrics.json``
(``precision/bf16``: 1 or 0) whenever ``train.precision`` is not float32.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from sparc.model.matmul import linear

# auto takes bf16 only when its timed encoder matmuls take at most this fraction of float32's.
MIN_SPEEDUP = 0.9
# Timed repetitions (after one warm-up) of the encoder matmuls in each format.
TIMING_REPEATS = 5


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (CPU: AVX512-BF16 or AMX tiles)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_seconds(dims: Mapping[str, int], L: int, batch_size: int, device: torch.device, bf16: bool) -> float:
    """Median seconds of one step's encoder matmuls (every stream, ``[batch_size, d] x [L, d]``,
    the weights cast once each in bf16) on random data, over :data:`TIMING_REPEATS` repetitions."""
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch_size, d, generator=gen).to(device), torch.randn(L, d, generator=gen).to(device))
            for d in dims.values()]
    bias = torch.zeros(L, device=device)

    def once() -> None:
        with torch.no_grad():
            for x, W in data:
                if bf16:
                    F.linear(x.to(torch.bfloat16), W.to(torch.bfloat16)).float() + bias
                else:
                    linear(x, W, bias)
        _sync(device)

    once()
    times = []
    for _ in range(TIMING_REPEATS):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def resolve_precision(precision: str, dims: Mapping[str, int], L: int, batch_size: int,
                      device: torch.device) -> str:
    """``"float32"`` or ``"bf16"`` for ``train.precision`` (module docstring): ``auto`` times the
    encoder matmuls of the run's shapes in both formats where the device has native bf16."""
    if precision != "auto":
        return precision
    if not native_bf16(device):
        return "float32"
    bf16 = encoder_seconds(dims, L, batch_size, device, bf16=True)
    fp32 = encoder_seconds(dims, L, batch_size, device, bf16=False)
    return "bf16" if bf16 <= MIN_SPEEDUP * fp32 else "float32"
