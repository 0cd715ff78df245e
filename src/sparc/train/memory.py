"""Will training fit? An estimate of the training memory, checked against the device's free memory.

:func:`train_memory_bytes` counts what a training step of :class:`~sparc.model.sae.MultiStreamSAE`
holds, in float32 (4 bytes) unless noted, for streams of dims ``d_s`` (``n`` streams, ``D = sum
d_s``), ``L`` latents, batch ``B``, ``k`` and ``k_aux``:

- state, all step long: parameters ``W_enc, W_dec [L, d_s]``, ``b_lat [L]``, ``b_pre [d_s]``;
  their gradients (dense ``[L, d_s]`` tensors, see :mod:`sparc.model.sparse`); Adam's two moments;
  the trainer's per-latent counters (int64 steps since fired, bool fired flags and dead masks);
- the batch: gathered, normalised and centred rows ``[B, D]``;
- dense encode: the logits ``[B, L]`` of every stream, held at once to choose the Global TopK,
  plus their running sum (two while adding a third stream) or the AuxK selection; with ``bf16``
  a bfloat16 copy of the widest encoder and the logits' bf16 and float32 intermediates;
- sparse decode and backward: per target the ``[B, n + 1, d_t]`` reconstructions (``n`` sources
  and the AuxK code) with their differences and gradients, and the int64 index plans of the
  ``B (n k + k_aux)`` latent occurrences; on accelerators also the ``[L, d]`` product of
  ``remove_parallel_grad`` (the CPU computes it in small blocks);
- ``RUNTIME``: what the first step adds whatever the sizes (PyTorch's kernels and code pages,
  oneDNN/MKL state; 170 MiB on CPU).

The two step phases follow each other, but they are added: the allocator keeps the decode's
freed blocks (glibc returns blocks under its 32 MiB mmap threshold only from the top of the heap,
PyTorch's CUDA allocator caches them), and the next encode comes on top. Measured peak RSS of
the train loop on CPU (dims 1024/768/768, k 64, k_aux 64, B 256): 905 MiB at L = 8192 (estimate
987), 1606 MiB at L = 16384 (1668); logits-heavy (dims 256/192/192, L 32768, k_aux 512, B 2048):
2338 MiB (2340).

Not counted: the feature rows (check after they are loaded, as the train stage does: the free
memory then excludes them) and the rows read for the validation pass. An upper bound for Local
TopK and USAE (fewer logits).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from sparc.device import resolve_device
from sparc.params import ParamsError

FLOAT = 4
INDEX = 8
RUNTIME = 256 * 2**20
MEMINFO = Path("/proc/meminfo")


def train_memory_bytes(
    dims: Mapping[str, int],
    L: int,
    k: int,
    k_aux: int,
    batch_size: int,
    device_type: str = "cpu",
    *,
    bf16: bool = False,
) -> int:
    """Estimated peak bytes of training (see the module docstring for what is counted).

    ``device_type``: ``"cpu"`` or an accelerator type (``"cuda"``); ``k_aux`` is capped at ``L``
    as in :meth:`~sparc.train.loop.TrainSpec.sae_config`.
    """
    n, D, d_max = len(dims), sum(dims.values()), max(dims.values())
    B, k_aux = batch_size, min(k_aux, L)
    params = FLOAT * (2 * L * D + n * L + D)
    counters = n * L * (INDEX + 2) + INDEX * L
    state = 4 * params + counters  # parameters, gradients, Adam's exp_avg and exp_avg_sq
    batch = 3 * FLOAT * B * D
    encode = FLOAT * B * L * (n + (2 if n >= 3 else 1))
    if bf16:
        encode += 2 * L * d_max + 6 * B * L
    occurrences = B * (n * k + k_aux)
    backward = 4 * FLOAT * B * (n + 1) * D + 6 * INDEX * occurrences + 2 * INDEX * L
    if device_type != "cpu":
        backward += FLOAT * L * d_max
    return state + batch + encode + backward + RUNTIME


def available_bytes(device: str | torch.device) -> int | None:
    """Memory free for a new allocation on ``device``; None where it cannot be told (e.g. MPS).

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (free memory plus reclaimable caches), else
    ``os.sysconf`` free pages (no cgroup limit is looked at). CUDA: ``torch.cuda.mem_get_info``
    plus what PyTorch's caching allocator holds unused.
    """
    device = torch.device(device)
    if device.type == "cpu":
        if MEMINFO.is_file():
            for line in MEMINFO.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return None


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def _round_down(n: int) -> int:
    """``n`` rounded down to two significant digits (734512 -> 730000)."""
    scale = 10 ** max(0, len(str(n)) - 2)
    return n // scale * scale


def check_train_memory(
    dims: Mapping[str, int],
    L: int,
    k: int,
    k_aux: int,
    batch_size: int,
    device: str | torch.device,
    *,
    bf16: bool = False,
) -> int:
    """Return :func:`train_memory_bytes` for ``device`` (``auto`` resolved as for ``train.device``),
    raising :class:`~sparc.params.ParamsError` naming ``L`` and the largest ``L`` that fits when it
    exceeds :func:`available_bytes` (not compared where that is unknown)."""
    dev = resolve_device(str(device), "train.device")
    need = train_memory_bytes(dims, L, k, k_aux, batch_size, dev.type, bf16=bf16)
    have = available_bytes(dev)
    if have is None or need <= have:
        return need
    head = (f"L: {L} needs about {_size(need)} to train (model, gradients, Adam state, batch) on {dev}, "
            f"{_size(have)} available")

    def fits(n: int) -> bool:
        return train_memory_bytes(dims, n, k, k_aux, batch_size, dev.type, bf16=bf16) <= have

    if not fits(k):
        raise ParamsError(f"{head}; even L = k = {k} does not fit: lower train.batch_size or free memory")
    lo, hi = k, L  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    raise ParamsError(f"{head}; set L <= {max(k, _round_down(lo))} (or train on a device with more memory)")
