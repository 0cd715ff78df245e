"""Several processes for one stage: the relaunch under ``torchrun`` and the process group.

``extract.nproc`` / ``train.nproc`` = N > 1 makes ``python -m sparc extract <stream>`` /
``python -m sparc train`` start itself again as N processes on this machine::

    python -m torch.distributed.run --nproc-per-node N --standalone -m sparc --params P <stage> ...

and wait for them (the ``dvc.yaml`` commands stay as they are). ``--standalone`` picks a free
port, so several runs (``dvc queue start -j 2``) do not collide. Each process finds its place in
the environment torchrun sets (:class:`World`: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``); a process started by torchrun (or any launcher setting those variables)
never relaunches itself.

Several machines: torchrun reads its own options from ``PET_<OPTION>`` environment variables. Run
the same command on every machine with ``PET_NNODES`` (number of machines), ``PET_NODE_RANK``
(0 on the machine that writes the outputs), ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` (where
machine 0 listens) set; with ``PET_NNODES`` other than 1 the relaunch leaves out
``--standalone`` and torchrun's static rendezvous uses those variables, so global rank 0 (which
alone writes outputs) runs on machine 0. The repository with its ``data/`` must be on a file
system every machine sees (the extraction shards and the training checkpoints are exchanged
through it); the stages check this and name the missing file otherwise.

Backends: NCCL when the processes run on CUDA (process ``LOCAL_RANK`` on GPU ``LOCAL_RANK``), gloo
on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the relaunching process never needs it
    import torch


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run: global ``rank`` of ``size``, and
    ``local_rank`` of ``local_size`` on this machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes outputs, logs and checkpoints."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """From torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``);
        one process when they are absent."""
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        size = int(env["WORLD_SIZE"])
        return cls(int(env["RANK"]), size, int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", size)))


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting ``RANK`` and
    ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def nnodes_from_env() -> str:
    """torchrun's node count as ``PET_NNODES`` gives it (``"1"`` when unset; ``"2"``, or a range
    ``"1:4"`` for elastic runs)."""
    return os.environ.get("PET_NNODES", "1").strip() or "1"


def needs_launch(nproc: int) -> bool:
    """True when the stage must relaunch itself: not yet under torchrun, and ``nproc > 1`` or
    several machines (``PET_NNODES`` other than 1)."""
    return not launched() and (nproc > 1 or nnodes_from_env() != "1")


def launch_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run --nproc-per-node nproc [--standalone] -m sparc *argv``;
    ``--standalone`` (a local rendezvous on a free port) only for one machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes_from_env() == "1":
        cmd.append("--standalone")
    return [*cmd, "-m", "sparc", *argv]


def launch(nproc: int, argv: Sequence[str]) -> None:
    """Run ``python -m sparc *argv`` as ``nproc`` processes per machine under torchrun and wait;
    ValueError naming the exit status when a process failed (torchrun stops the others)."""
    status = subprocess.run(launch_command(nproc, argv)).returncode
    if status != 0:
        raise ValueError(f"`python -m sparc {' '.join(argv)}` under torchrun with {nproc} processes per "
                         f"machine failed (status {status}); the failing process's error is printed above")


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextmanager
def process_group(world: World, device: torch.device, timeout: timedelta | None = None) -> Iterator[None]:
    """The default process group of ``world`` for the block (nothing for one process, or when the
    caller initialised one already: it is used as it is, and left open).

    Joins through ``MASTER_ADDR``/``MASTER_PORT`` (set by torchrun) with :func:`backend_for`
    ``device``; on CUDA the process's GPU becomes the current device first. ``timeout``: how long
    a collective waits for the slowest process (None: PyTorch's default).
    """
    import torch
    import torch.distributed as dist

    if world.size == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend_for(device), rank=world.rank, world_size=world.size, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()
