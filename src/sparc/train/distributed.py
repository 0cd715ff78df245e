"""Data-parallel training over several processes (``train.nproc``; launch in :mod:`sparc.distributed`).

Every process builds the same :class:`~sparc.train.loop.Trainer` (same seed, so the same initial
weights, sampler and revival noise) and draws the same global batch ``EpochSampler.batch(t)`` of
``B`` rows; process ``r`` of ``W`` trains on the contiguous slice
``[round(r B / W), round((r + 1) B / W))`` of it (:meth:`DataParallel.part`: sizes differ by at
most one, each at least one row). A per-sample random draw made for the global batch (e.g. the
streams each sample keeps) is sliced the same way.

Gradients: the model runs under ``torch.nn.parallel.DistributedDataParallel`` (DDP; NCCL on
CUDA, gloo on the CPU). Every term of the SAE losses is a mean over samples, so the full-batch
loss is ``sum_r (b_r / B) loss_r`` with ``loss_r`` the mean over the ``b_r`` rows of process
``r``. DDP averages gradients over the ``W`` processes, so each process back-propagates
``(W b_r / B) loss_r`` (exactly ``loss_r`` when the batch splits evenly) and the averaged gradient
is the gradient of the full-batch mean loss: only the float summation order differs from one
process. DDP needs one ``forward``: a small module dispatches ``forward(method, ...)`` to
``MultiStreamSAE.loss`` / ``usae_loss`` (the sparse kernels are ordinary custom autograd
Functions to DDP: their gradients reach the parameters through the usual accumulation hooks, each
parameter once per backward). ``find_unused_parameters`` for the USAE methods only: a USAE step
leaves the other streams' encoders without gradient (a parameter no process used keeps
``grad = None``, as in one process); a SPARC step uses every parameter.

Everything else stays identical on every process without communication: the decoder
projection and renormalisation, Adam (same averaged gradients, bit for bit on every process),
revival (counter-based noise) and the USAE source draw. One all-reduce per step carries the rest:
the ``fired`` flags (a latent fired in the global batch if it fired in any slice), so the
dead-latent counters agree, and the logged terms (``sum_r (b_r / B) term_r``, the global batch
mean), so the log accumulators, and the checkpoints rank 0 writes from them, are global.

Not supported: ``method: usae_paper`` (its BatchNorm encoder normalises with the whole batch's
statistics, which no process sees); refused by the params checks and by :meth:`DataParallel.check`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sparc.device import rank_device
from sparc.distributed import World
from sparc.model.losses import LossOutput
from sparc.model.sae import MultiStreamSAE
from sparc.params import USAE_METHODS
from sparc.train.sampler import EpochSampler


class Ranks:
    """The processes that train one model, seen from one of them; this base class is the single
    process, where every hook is the identity (the trainer's results are byte-identical to a
    trainer without hooks)."""

    size = 1
    rank = 0

    @property
    def main(self) -> bool:
        """Whether this process writes checkpoints, logs and outputs (rank 0)."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This process's device for the configured ``device``."""
        return device

    def check(self, method: str, sampler: EpochSampler) -> None:
        """Raise ValueError when the run cannot be split over the processes."""

    def objective(self, model: MultiStreamSAE, method: str) -> MultiStreamSAE:
        """What the trainer of ``method`` calls ``loss`` / ``usae_loss`` / ``usae_paper_loss`` on."""
        return model

    def part(self, n: int) -> slice:
        """This process's rows of a global batch of ``n`` rows."""
        return slice(None)

    def backward(self, total: Tensor, n: int) -> None:
        """Back-propagate this process's loss ``total`` (a global batch of ``n`` rows)."""
        total.backward()

    def reduce(
        self, terms: dict[str, Tensor], fired: dict[str, Tensor], n: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Global-batch values of the step's logged ``terms`` (scalars) and ``fired`` flags (bool ``[L]``)."""
        return terms, fired

    def agree(self, what: str, value: object) -> None:
        """Raise ValueError naming ``what`` when the processes hold different ``value``s."""


class _LossForward(nn.Module):
    """The model's loss methods behind one ``forward`` for DDP: ``forward(method, *args, **kwargs)``
    returns ``(total, terms, fired)`` of ``model.<method>(*args, **kwargs)``."""

    def __init__(self, model: MultiStreamSAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        out = getattr(self.model, method)(*args, **kwargs)
        return out.total, out.terms, out.fired


class _DdpObjective:
    """``objective.loss(...)`` (any loss method) through the DDP wrapper, returning a LossOutput."""

    def __init__(self, ddp: DistributedDataParallel) -> None:
        self._ddp = ddp

    def __getattr__(self, method: str):
        def call(*args, **kwargs) -> LossOutput:
            total, terms, fired = self._ddp(method, *args, **kwargs)
            return LossOutput(total=total, terms=terms, fired=fired)

        return call


class DataParallel(Ranks):
    """Process ``world.rank`` of ``world.size`` in an initialised default process group
    (:func:`sparc.distributed.process_group`); see the module docstring."""

    def __init__(self, world: World) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DataParallel: the default process group is not initialised "
                               "(sparc.distributed.process_group)")
        if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
            raise RuntimeError(f"DataParallel: process group rank {dist.get_rank()} of {dist.get_world_size()}, "
                               f"world says {world.rank} of {world.size}")
        self.world = world
        self.size, self.rank = world.size, world.rank

    def device(self, device: torch.device) -> torch.device:
        return rank_device(device, self.world)

    def check(self, method: str, sampler: EpochSampler) -> None:
        if method == "usae_paper":
            raise ValueError("train.nproc: method usae_paper normalises its codes with the whole batch's "
                             "statistics (BatchNorm), which no process of several sees; train with one process")
        smallest = sampler.n // sampler.steps_per_epoch  # batch sizes differ by at most one
        if smallest < self.size:
            raise ValueError(f"train.batch_size: batches of {smallest} rows cannot give each of the "
                             f"{self.size} processes a row; use a larger batch or fewer processes")

    def objective(self, model: MultiStreamSAE, method: str) -> _DdpObjective:
        device = next(model.parameters()).device
        ddp = DistributedDataParallel(
            _LossForward(model),
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=method in USAE_METHODS,
        )
        return _DdpObjective(ddp)

    def bounds(self, n: int) -> tuple[int, int]:
        """``(lo, hi)``: rows ``[round(r n / W), round((r + 1) n / W))`` of a batch of ``n`` rows
        (half to even, as ``np.round``)."""
        return round(self.rank * n / self.size), round((self.rank + 1) * n / self.size)

    def part(self, n: int) -> slice:
        return slice(*self.bounds(n))

    def backward(self, total: Tensor, n: int) -> None:
        lo, hi = self.bounds(n)
        scale = self.size * (hi - lo) / n  # DDP averages: sum_r (W b_r / B) g_r / W = sum_r (b_r / B) g_r
        (total if scale == 1.0 else total * scale).backward()

    def reduce(
        self, terms: dict[str, Tensor], fired: dict[str, Tensor], n: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One all-reduce (sum) of ``[(b_r / B) terms, fired as 0/1]``: terms become global-batch
        means, fired flags their logical OR (sum > 0)."""
        lo, hi = self.bounds(n)
        names, streams = list(terms), list(fired)
        weighted = torch.stack([terms[k].detach().float() for k in names]) * ((hi - lo) / n)
        flat = torch.cat([weighted, *(fired[s].float() for s in streams)])
        dist.all_reduce(flat)
        out_terms = dict(zip(names, flat[: len(names)].unbind(), strict=True))
        sizes = [fired[s].numel() for s in streams]
        out_fired = {s: f > 0 for s, f in zip(streams, flat[len(names) :].split(sizes), strict=True)}
        return out_terms, out_fired

    def agree(self, what: str, value: object) -> None:
        values: list[object] = [None] * self.size
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            seen = ", ".join(f"process {r}: {v!r}" for r, v in enumerate(values))
            raise ValueError(f"the processes disagree on {what} ({seen}); with several machines, "
                             "data/ must be on a file system all of them share")
