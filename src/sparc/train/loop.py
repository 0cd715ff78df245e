"""The training loop: one loop for every data source (in-memory arrays or the feature store).

One step (global step t, 0-based):

1. when ``t > 0`` and ``t % revive_every == 0``: latents dead longer than ``dead_steps`` are
   revived with ``model.revive`` (a CPU generator seeded by ``counter_seed(seed, REVIVE, ...)``; a
   batchnorm encoder's BN rows are reset too), the Adam moments of the returned rows are zeroed
   and their counters restart at 0 (a revived latent is a new latent). Reviving before a step, never after the last one, keeps freshly
   re-initialised encoder rows out of the final model and out of the logged dead fractions;
2. batch = :class:`~sparc.train.sampler.EpochSampler` ``.batch(t)`` gathered from the source;
3. loss: ``model.loss(x, lam, dead)`` (SPARC, Global or Local TopK from the spec; with
   ``train.subset_keep < 1`` each sample's Global TopK index set is chosen by the streams of
   ``stream_subset(seed, t, B, n, subset_keep)``, and ``train.consistency`` weighs the
   consistency term, see ``MultiStreamSAE.loss``); for the USAE
   methods one source stream is drawn from ``counter_rng(seed, USAE_SOURCE, t)`` and the loss is
   ``model.usae_loss(x, source, dead, lam=lam)`` (``method == "usae"``, this project's variant:
   linear encoder, NMSE, AuxK on dead latents) or ``model.usae_paper_loss(x, source, lam=lam)``
   (``method == "usae_paper"``: the paper's BatchNorm encoder, L1 error + 0.1 x auxiliary term,
   bias-free dictionary; the model is in training mode, so BN uses batch statistics).
   ``dead[s] = since[s] > dead_steps`` feeds the AuxK term (not used by ``usae_paper``); a stream
   known to have no dead latent (every stream up to step ``dead_steps``; on CPU any stream whose
   mask is all False) gets no mask and its ``aux/<s>`` term is logged as the exact 0 the masked
   computation gives (``Trainer.none_dead``). For both
   USAE methods ``lam`` weights the cross-decoding terms (1: every target alike, 0: self only);
4. on a CPU (float32, one process, SPARC without ``train.subset_keep`` or ``train.consistency``)
   steps 3-5 are one fused step (:mod:`sparc.train.fused`: the same maths without autograd or
   dense gradients); elsewhere backward; for USAE with ``usae_update == "source_only"`` the gradients of every parameter not
   owned by the source stream are dropped (as in the USAE reference, where only the source
   model's optimizer steps); ``"joint"`` steps every parameter that received a gradient;
5. ``model.remove_parallel_grad()``, Adam step, ``model.normalise_decoder()`` (the SPARC
   reference renormalises before the projection instead: ``DECODER_NORMALISE``);
6. dead-latent counters (steps since each latent last fired, per stream) advance. Streams encoded
   this step: 0 where the latent fired, +1 elsewhere. Streams not encoded (USAE: all but the
   source) depend on the method:

   - ``usae_paper``: +1 as well, so counters count *global* steps and a latent is dead after
     ``dead_steps`` global steps without firing, whatever the number of streams;
   - ``usae``: unchanged (kept so that its runs stay bit-identical to earlier ones): the counters
     of stream s advance only on the steps where s is the source, about one step in M, so a
     latent of an M-stream USAE counts as dead only after about ``M x dead_steps`` global steps
     (and is revived on the same global ``revive_every`` grid as the other methods);

   the learning rate is constant (no schedule); the USAE reference's per-model cosine schedule
   advances only when its model is drawn, a schedule here would advance on the global step;
7. every ``log_every`` steps (and at the last step): the loss terms averaged over the steps since
   the previous log, per-stream dead fraction (``since > dead_steps``) and active fraction (fired
   at least once since the previous log) go to the logger; terms are accumulated on the device, so
   the only host synchronisations are the log and the revival;
8. every ``checkpoint_every`` steps (and when ``max_steps`` stops the run early), except after the
   last step: a checkpoint.

Every random choice is counter based (see :mod:`sparc.train.sampler`), so a checkpoint stores the
step and the run resumes exactly; the logged history is stored in the checkpoint and replayed into
the logger, so the resumed run's logs equal an uninterrupted run's logs.

Several processes (``train.nproc``, :mod:`sparc.train.distributed`): each trains on its slice of
the same global batch (and of any per-sample draw for it) under DistributedDataParallel; the
``fired`` flags and the logged terms of step 6 and 7 are the global batch's (one all-reduce),
so every process holds the same weights, counters and history, and rank 0 writes checkpoints.

About 500 lines because the steps above share one step state (counters, optimizer, generators);
what stands alone is already beside it (sampler.py, checkpoint.py, live.py, distributed.py).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from sparc.device import resolve_device
from sparc.model.sae import MultiStreamSAE, SAEConfig
from sparc.params import USAE_METHODS, Params, TrainParams, check_top_level, check_train
from sparc.train import fused
from sparc.train.checkpoint import (
    PREFIX,
    latest_checkpoint,
    load_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
)
from sparc.train.distributed import Ranks
from sparc.train.live import MetricLogger
from sparc.train.precision import resolve_precision
from sparc.train.sampler import (
    REVIVE,
    USAE_SOURCE,
    EpochSampler,
    FeatureSource,
    counter_rng,
    counter_seed,
    stream_subset,
)

# TrainParams fields that do not change the trained weights or the logged history beyond float
# rounding (device, nproc: summation order), so a checkpoint resumes under any of their values.
NOT_IN_KEY = ("device", "checkpoint_every", "ram_budget_mb", "cpu_threads", "nproc")
# Revival noise (see docs/differences.md): a re-initialised encoder row
# has norm REVIVE_ROW_NORM, or with REVIVE_ENTRY_STD set N(0, REVIVE_ENTRY_STD^2) entries (the SPARC
# reference: 0.01, a row norm of 0.01 sqrt(d_s)).
REVIVE_ROW_NORM = 0.01
REVIVE_ENTRY_STD: float | None = None
# Whether revival zeroes the Adam moments of the revived rows (method.md; the reference keeps them).
RESET_ADAM_ROWS = True
# Skip the AuxK work of streams without dead latents (Trainer.none_dead); False: pass every mask.
SKIP_EMPTY_AUXK = True
# When the decoder rows are renormalised: "after_step" (this project: project the gradient, Adam
# step, renormalise, so every forward pass sees unit rows) or "before_step" (the SPARC reference:
# renormalise after backward, then project and step, so the forward pass sees the rows as the
# last step left them, off the unit sphere; see docs/differences.md).
DECODER_NORMALISE: Literal["after_step", "before_step"] = "after_step"


@dataclass(frozen=True)
class TrainSpec:
    """Everything that determines a training run: the top-level knobs and the ``train`` group."""

    L: int
    k: int
    lam: float = 1.0
    topk: Literal["global", "local"] = "global"
    method: Literal["sparc", "usae", "usae_paper"] = "sparc"
    seed: int = 0
    train: TrainParams = field(default_factory=TrainParams)

    @classmethod
    def from_params(cls, params: Params) -> TrainSpec:
        return cls(
            L=params.L,
            k=params.k,
            lam=params.lam,
            topk=params.topk,
            method=params.method,
            seed=params.seed,
            train=params.train,
        )

    def check(self) -> None:
        """Raise ParamsError (a ValueError) naming the first out-of-range parameter: the same
        checks as params.yaml's validation (sparc.params)."""
        check_top_level(self.k, self.L, self.lam, self.topk, self.method)
        check_train(self.train, self.topk, self.method)

    def sae_config(self, dims: dict[str, int]) -> SAEConfig:
        """Model config for streams ``dims``; ``k_aux`` is capped at ``L``; ``usae_paper`` gets the
        batchnorm encoder."""
        k_aux = min(self.train.k_aux, self.L)
        encoder = "batchnorm" if self.method == "usae_paper" else "linear"
        return SAEConfig(dims=dict(dims), L=self.L, k=self.k, topk=self.topk, k_aux=k_aux, encoder=encoder)

    def key_payload(self) -> dict:
        """The spec as JSON-able data, without the fields that do not change the results."""
        out = dataclasses.asdict(self)
        for name in NOT_IN_KEY:
            out["train"].pop(name)
        return out


@dataclass
class TrainResult:
    """Outcome of :func:`train_sae`: the model, how far it got, and the last logged metrics."""

    model: MultiStreamSAE
    step: int
    total_steps: int
    metrics: dict[str, float]
    history: list[tuple[int, dict[str, float]]]
    checkpoint: Path | None = None
    precision: str = "float32"  # the encoder matmul's format the run used (train.precision resolved)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps


def metric_name(term: str) -> str:
    """Logger name of a model loss term: the scalar terms go under ``loss/``, per-stream and
    per-pair terms keep their group (``cross_nmse/a->b`` -> ``cross_nmse/a_to_b``)."""
    if "/" not in term:
        return {"self_nmse": "loss/self", "cross_nmse": "loss/cross"}.get(term, f"loss/{term}")
    return term.replace("->", "_to_")


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, eps: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass per parameter; at the paper's size on the CPU 19.5 vs
    77 ms per step for the default), falling back to the default where this torch build has no
    fused kernel for the parameters' device."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr, eps=eps)


class Trainer:
    """State of one run (:func:`train_sae` drives it).

    ``since[s]`` ``[L]`` int64: training steps since latent l last fired in stream s (only
    :meth:`train_step` and :meth:`revive` change it); ``window_fired[s]`` ``[L]`` bool: fired since
    the last log; ``sums``/``counts``: loss terms accumulated on the device since the last log;
    ``history``: every logged ``(step, metrics)``; ``step``: completed global steps. ``ranks``:
    the processes sharing each batch (:mod:`sparc.train.distributed`; default one process).
    """

    def __init__(self, source: FeatureSource, spec: TrainSpec, device: torch.device,
                 ranks: Ranks | None = None, init: MultiStreamSAE | None = None) -> None:
        self.source, self.spec, self.device = source, spec, device
        t = spec.train
        self.sampler = EpochSampler(len(source), t.batch_size, spec.seed)
        self.ranks = ranks or Ranks()
        self.ranks.check(spec.method, self.sampler)
        self.total_steps = t.epochs * self.sampler.steps_per_epoch
        # train.precision resolved to "float32" or "bf16" (auto: by this machine, sparc.train.precision)
        self.precision = resolve_precision(t.precision, source.dims, spec.L, t.batch_size, device)
        self.ranks.agree("train.precision auto's choice", self.precision)
        self.model = MultiStreamSAE(
            spec.sae_config(source.dims), seed=spec.seed, bf16=self.precision == "bf16", tf32=t.tf32
        )
        if init is not None:  # train.init: start from these weights (a fresh optimizer and counters)
            self.model.load_state_dict(init.state_dict(), strict=True)
        self.model.to(device)
        self.model.train()
        self.param_by_name = dict(self.model.named_parameters())
        self.name_of = {p: n for n, p in self.param_by_name.items()}
        self.optimizer = make_adam(self.model.parameters(), lr=t.lr, eps=t.adam_eps)
        self.objective = self.ranks.objective(self.model, spec.method)  # the model, or its DDP wrapper
        self.streams = list(source.dims)
        L = spec.L
        self.since = {s: torch.zeros(L, dtype=torch.int64, device=device) for s in self.streams}
        self.window_fired = {s: torch.zeros(L, dtype=torch.bool, device=device) for s in self.streams}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.history: list[tuple[int, dict[str, float]]] = []
        self.step = 0
        # USAE source-only rule: for each source, the parameters whose gradients are dropped.
        self.frozen: dict[str, list[torch.nn.Parameter]] | None = None
        if spec.method in USAE_METHODS and t.usae_update == "source_only":
            self.frozen = {
                src: [p for o in self.streams if o != src for p in self.model.stream_parameters(o)]
                for src in self.streams
            }

    # -- one step -----------------------------------------------------------------------------
    def train_step(self) -> None:
        spec, t, step = self.spec, self.spec.train, self.step
        if step > 0 and step % t.revive_every == 0:
            self.revive()
        batch = self.sampler.batch(step)  # the global batch; this process trains on batch[part]
        part = self.ranks.part(len(batch))
        x = self.source.gather(batch[part])
        if step + 1 < self.total_steps:  # a store read batch by batch reads the next one meanwhile
            following = self.sampler.batch(step + 1)
            self.source.prefetch(following[self.ranks.part(len(following))])
        dead = {s: self.since[s] > t.dead_steps for s in self.streams}
        none_dead = self.none_dead(dead)
        dead = {s: m for s, m in dead.items() if s not in none_dead}
        updated = False  # whether the fused step has already updated the model
        if spec.method in USAE_METHODS:
            src = self.streams[int(counter_rng(spec.seed, USAE_SOURCE, step).integers(len(self.streams)))]
            if spec.method == "usae":
                out = self.objective.usae_loss(x, src, dead=dead, aux_coef=t.aux_coef, lam=spec.lam)
            else:
                out = self.objective.usae_paper_loss(x, src, lam=spec.lam)
        else:
            src = None
            keep = None
            if t.subset_keep < 1.0:  # drawn for the global batch, sliced as the rows
                draw = stream_subset(spec.seed, step, len(batch), len(self.streams), t.subset_keep)
                keep = torch.from_numpy(draw[part]).to(self.device)
            if self.fused_step_ok():
                out = fused.fused_step(self.model, self.optimizer, x, spec.lam, dead, t.aux_coef)
                updated = True
            else:
                out = self.objective.loss(x, spec.lam, dead=dead, aux_coef=t.aux_coef, keep=keep,
                                          consistency=t.consistency)
        if not updated:
            self.optimizer.zero_grad(set_to_none=True)
            self.ranks.backward(out.total, len(batch))
            if self.frozen is not None and src is not None:
                for p in self.frozen[src]:
                    p.grad = None
            if DECODER_NORMALISE == "before_step":
                self.model.normalise_decoder()
            self.model.remove_parallel_grad()
            self.optimizer.step()
            if DECODER_NORMALISE == "after_step":
                self.model.normalise_decoder()
        terms = {"loss/total": out.total.detach(), **{metric_name(k): v for k, v in out.terms.items()}}
        if spec.method != "usae_paper":  # the AuxK term of a stream without dead latents: exactly 0
            terms.update({f"aux/{s}": out.total.new_zeros(()) for s in none_dead if src in (None, s)})
        terms, fired_by_stream = self.ranks.reduce(terms, out.fired, len(batch))  # global-batch values
        for s in self.streams:
            fired = fired_by_stream.get(s)
            if fired is not None:
                self.since[s] = torch.where(fired, torch.zeros_like(self.since[s]), self.since[s] + 1)
                self.window_fired[s] |= fired
            elif spec.method == "usae_paper":  # global-step counters (module docstring, step 6)
                self.since[s] = self.since[s] + 1
        for name, value in terms.items():
            self._accumulate(name, value.float())
        self.step += 1

    def fused_step_ok(self) -> bool:
        """Whether this step runs :func:`sparc.train.fused.fused_step` (a CPU float32 SPARC run in
        one process without the stream-subset or consistency options, under the project's
        decoder order; see :func:`sparc.train.fused.supports`) instead of autograd."""
        t = self.spec.train
        return fused.supports(self.model, self.optimizer, method=self.spec.method, keep=t.subset_keep < 1.0,
                              consistency=t.consistency, processes=self.ranks.size,
                              decoder_order=DECODER_NORMALISE)

    def none_dead(self, dead: dict[str, torch.Tensor]) -> set[str]:
        """Streams whose ``dead`` mask is known to hold no dead latent without waiting for a device:
        all of them while ``step <= dead_steps`` (a counter is at most the step), and on CPU those
        whose mask has no True (``SKIP_EMPTY_AUXK``). Their masks are not passed to the loss, so
        the AuxK selection and decode, whose term would be multiplied by 0, are skipped; the
        results equal the masked computation's to the bit (tests/train/test_loop.py)."""
        if not SKIP_EMPTY_AUXK:
            return set()
        if self.step <= self.spec.train.dead_steps:
            return set(dead)
        return {s for s, m in dead.items() if m.device.type == "cpu" and not bool(m.any())}

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        if name in self.sums:
            self.sums[name] = self.sums[name] + value
            self.counts[name] += 1
        else:
            self.sums[name] = value.clone()
            self.counts[name] = 1

    def revive(self) -> None:
        """Revive latents dead longer than ``dead_steps`` and reset their Adam moments.

        Adam's step count is one per parameter tensor, so after the reset a revived row is updated
        with the bias corrections of the whole tensor (about 1 after many steps): its first update
        is about ``0.1 / sqrt(0.001) = 3.2`` times the learning rate per entry (see
        docs/differences.md).
        """
        t = self.spec.train
        for i, s in enumerate(self.streams):
            dead = torch.nonzero(self.since[s] > t.dead_steps).flatten()
            if dead.numel() == 0:
                continue
            gen = torch.Generator()  # on the CPU: the same new rows whatever the training device
            gen.manual_seed(counter_seed(self.spec.seed, REVIVE, self.step * len(self.streams) + i))
            d = self.source.dims[s]
            scale = REVIVE_ROW_NORM if REVIVE_ENTRY_STD is None else REVIVE_ENTRY_STD * d**0.5
            for param, rows in self.model.revive(s, dead, gen, scale=scale):
                st = self.optimizer.state.get(param)
                if st and RESET_ADAM_ROWS:
                    st["exp_avg"][rows] = 0
                    st["exp_avg_sq"][rows] = 0
            self.since[s][dead] = 0

    # -- logging ------------------------------------------------------------------------------
    def collect_metrics(self) -> dict[str, float]:
        """Averages since the last log plus dead/active fractions; one host sync. Resets the window."""
        names = sorted(self.sums)
        values = [self.sums[n] / self.counts[n] for n in names]
        t = self.spec.train
        for s in self.streams:
            names += [f"dead_fraction/{s}", f"active_fraction/{s}"]
            values += [(self.since[s] > t.dead_steps).float().mean(), self.window_fired[s].float().mean()]
        numbers = torch.stack([v.float() for v in values]).tolist()
        names.append("epoch")
        numbers.append(float(self.step / self.sampler.steps_per_epoch))
        # sorted names: the same order whether logged live or replayed from a checkpoint
        metrics = dict(sorted(zip(names, numbers, strict=True)))
        self.sums, self.counts = {}, {}
        for s in self.streams:
            self.window_fired[s].zero_()
        return metrics

    # -- checkpoints --------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        trainer = optimizer_tensors(self.optimizer, self.name_of)
        for s in self.streams:
            trainer[f"since/{s}"] = self.since[s]
            trainer[f"window_fired/{s}"] = self.window_fired[s].to(torch.uint8)
        for name, value in self.sums.items():
            trainer[f"sums/{name}"] = value.reshape(1)
        return {"model": self.model.state_dict(), "trainer": trainer}

    def state_json(self) -> dict:
        return {
            "spec": self.spec.key_payload(),
            "dims": self.source.dims,
            "precision": self.precision,
            "n_rows": len(self.source),
            "epoch": self.sampler.epoch_of(self.step),
            "batch_in_epoch": self.step % self.sampler.steps_per_epoch,
            "total_steps": self.total_steps,
            "counts": self.counts,
            "history": [[s, m] for s, m in self.history],
        }

    def save(self, run_dir: Path) -> Path:
        """Write a checkpoint (rank 0 alone; the other processes return the path it writes)."""
        if not self.ranks.main:
            return run_dir / f"{PREFIX}{self.step:08d}"
        return save_checkpoint(run_dir, self.step, self.state_tensors(), self.state_json())

    def load(self, path: Path) -> None:
        ck = load_checkpoint(path)
        st = ck.state
        if st.get("dims") != self.source.dims:
            saved, now = st.get("dims", {}), self.source.dims
            diff = next(
                (f"stream {s} has dim {saved.get(s)} in the checkpoint but {now.get(s)} in the features"
                 for s in {**saved, **now} if saved.get(s) != now.get(s)),
                f"streams {list(saved)} in the checkpoint vs {list(now)} in the features",
            )
            raise ValueError(f"checkpoint {path}: {diff}; delete it or train with matching features")
        if st.get("spec") != self.spec.key_payload():
            raise ValueError(f"checkpoint {path} was written with other training parameters; delete it to start over")
        if st.get("n_rows") != len(self.source):
            raise ValueError(f"checkpoint {path}: {st.get('n_rows')} training rows there, {len(self.source)} now")
        # train.precision auto is decided by the machine (and a timing): a resumed run keeps the
        # format its checkpoint was trained in, so one run never mixes two
        saved = st.get("precision", self.precision)
        if saved != self.precision:
            print(f"train: resuming in {saved}, the format of checkpoint {path} "
                  f"(train.precision auto chose {self.precision} on this machine)", file=sys.stderr)
            self.precision = saved
            self.model.bf16 = saved == "bf16"
        self.model.load_state_dict({k: v.to(self.device) for k, v in ck.tensors["model"].items()})
        trainer = ck.tensors["trainer"]
        restore_optimizer(self.optimizer, trainer, self.param_by_name, copy=False)
        for s in self.streams:
            self.since[s] = trainer[f"since/{s}"].to(self.device)
            self.window_fired[s] = trainer[f"window_fired/{s}"].to(self.device).bool()
        self.sums = {k[len("sums/"):]: v.to(self.device).reshape(()) for k, v in trainer.items() if k.startswith("sums/")}
        self.counts = {k: int(v) for k, v in st["counts"].items()}
        self.history = [(int(s), dict(m)) for s, m in st["history"]]
        self.step = ck.step


def train_sae(
    source: FeatureSource,
    spec: TrainSpec,
    *,
    checkpoint_dir: str | Path | None = None,
    logger: MetricLogger | None = None,
    max_steps: int | None = None,
    callback: Callable[[int, MultiStreamSAE], None] | None = None,
    progress: bool = False,
    ranks: Ranks | None = None,
    init: MultiStreamSAE | None = None,
) -> TrainResult:
    """Train a multi-stream SAE on ``source`` (see the module docstring for one step).

    ``checkpoint_dir``: this run's checkpoint directory; when it holds a checkpoint the run resumes
    from it (after checking dims, spec and row count; ValueError otherwise), and checkpoints are
    written there every ``checkpoint_every`` steps. ``max_steps``: stop after this global step
    (a checkpoint is written there), e.g. to split a run; the epoch schedule is unchanged.
    ``callback(step, model)`` runs after every completed step (after any checkpoint of that step).
    ``init``: a model with the spec's configuration to start from instead of the seeded
    initialisation (``train.init``); with ``train.epochs`` 0 it is returned as it is.
    Runs ``train.epochs * ceil(N / batch_size)`` steps in total. The model is on the spec's device
    (with ``ranks``, the process's own: :mod:`sparc.train.distributed`; every process resumes
    from the same checkpoint, rank 0 alone writes them and shows progress; give the logger to
    rank 0 only).
    """
    spec.check()
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps: must be >= 1, got {max_steps}")
    ranks = ranks or Ranks()
    device = ranks.device(resolve_device(spec.train.device, "train.device"))
    if source.device != device:
        raise ValueError(f"the feature source yields tensors on {source.device}, training runs on {device}")
    trainer = Trainer(source, spec, device, ranks, init)
    run_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if run_dir is not None and (last := latest_checkpoint(run_dir)) is not None:
        trainer.load(last)
    ranks.agree(f"the step to resume from (checkpoints in {run_dir})", trainer.step)
    if logger is not None:
        for step, metrics in trainer.history:
            logger.log(step, metrics)
    stop = trainer.total_steps if max_steps is None else min(max_steps, trainer.total_steps)
    t = spec.train
    last_ckpt: Path | None = None
    bar = tqdm(total=trainer.total_steps, initial=trainer.step, desc="train", unit="step",
               disable=not (progress and ranks.main))
    try:
        while trainer.step < stop:
            trainer.train_step()
            step = trainer.step
            if step % t.log_every == 0 or step == trainer.total_steps:
                metrics = trainer.collect_metrics()
                trainer.history.append((step, metrics))
                if logger is not None:
                    logger.log(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss/total']:.4f}")
            if run_dir is not None and step < trainer.total_steps and (step % t.checkpoint_every == 0 or step == stop):
                last_ckpt = trainer.save(run_dir)
            bar.update(1)
            if callback is not None:
                callback(step, trainer.model)
    finally:
        bar.close()
    if last_ckpt is None and run_dir is not None and trainer.step < trainer.total_steps:
        last_ckpt = latest_checkpoint(run_dir)
    return TrainResult(
        model=trainer.model,
        step=trainer.step,
        total_steps=trainer.total_steps,
        metrics=trainer.history[-1][1] if trainer.history else {},
        history=list(trainer.history),
        checkpoint=last_ckpt,
        precision=trainer.precision,
    )


@torch.no_grad()
def evaluate_loss(
    model: MultiStreamSAE, source: FeatureSource, spec: TrainSpec, batch_size: int = 1024
) -> dict[str, float]:
    """The training objective's terms over every row of ``source`` (no gradient, no counters).

    SPARC: ``model.loss(x, lam)`` per batch; USAE: ``model.usae_loss(x, s, lam=lam)`` or
    ``model.usae_paper_loss(x, s, lam=lam)`` for every source s. The model is in eval mode
    meanwhile (a batchnorm encoder uses its running statistics and leaves them unchanged; its mode
    is restored afterwards). Terms are averaged over samples (batch means weighted by batch size),
    named as in the training log (:func:`metric_name`), plus ``loss/total`` (``L_self + lam *
    L_cross`` for SPARC); the AuxK terms are left out (no latent counts as dead outside training;
    ``usae_paper``'s auxiliary term does not depend on dead latents and stays in its total).
    """
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, int] = {}
    n = len(source)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            x = source.gather(np.arange(start, min(n, start + batch_size)))
            b = min(n, start + batch_size) - start
            if spec.method == "usae":
                outs = [model.usae_loss(x, s, lam=spec.lam) for s in model.streams]
            elif spec.method == "usae_paper":
                outs = [model.usae_paper_loss(x, s, lam=spec.lam) for s in model.streams]
            else:
                outs = [model.loss(x, spec.lam)]
            for out in outs:
                items = [("loss/total", out.total)] + [
                    (metric_name(k), v) for k, v in out.terms.items() if k != "aux" and not k.startswith("aux/")
                ]
                for name, value in items:
                    sums[name] = sums.get(name, 0) + value.detach().float() * b
                    weights[name] = weights.get(name, 0) + b
    finally:
        model.train(was_training)
    names = sorted(sums)
    values = torch.stack([sums[k] / weights[k] for k in names]).tolist()
    return dict(zip(names, values, strict=True))


def train_arrays(
    features: dict[str, np.ndarray],
    spec: TrainSpec,
    *,
    rows: np.ndarray | None = None,
    **kwargs,
) -> TrainResult:
    """:func:`train_sae` on in-memory arrays ``features[s]`` ``[N, d_s]`` (rows aligned); keyword
    arguments as for :func:`train_sae`."""
    source = FeatureSource(features, rows, device=resolve_device(spec.train.device, "train.device"))
    return train_sae(source, spec, **kwargs)
