"""The one place that picks a device: every stage (extract, train, encode, evaluate, localise), the
preflight checks and the notebook API resolve their ``*.device`` parameter here.

* :func:`resolve_device`: a ``device`` parameter (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``) to a
  ``torch.device``; ``auto`` is CUDA when present, else the CPU; CUDA asked for where there is
  none is a ValueError naming the parameter.
* :func:`rank_device`: the device of one process of a multi-process stage (``extract.nproc``,
  ``train.nproc``): GPU ``local_rank`` on CUDA without an index.

Bottom floor: imports nothing from sparc (torch only when called, so the CLI's relaunching
process never loads it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sparc.distributed import World


def resolve_device(device: str, param: str = "extract.device") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; otherwise ``torch.device(device)``.

    ``param`` names the parameter in the error raised when CUDA is asked for but absent."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{param}: {device!r} requested but CUDA is not available")
    return dev


def rank_device(device: torch.device, world: World) -> torch.device:
    """The device of this process: on CUDA without an index, GPU ``local_rank`` (ValueError when
    this machine has fewer GPUs than processes); otherwise ``device`` unchanged."""
    import torch

    if device.type != "cuda" or world.size == 1 or device.index is not None:
        return device
    count = torch.cuda.device_count()
    if world.local_size > count:
        raise ValueError(f"{world.local_size} processes per machine but {count} visible GPUs: "
                         "set nproc to at most the GPU count (or CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", world.local_rank)
