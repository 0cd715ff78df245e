"""Data-parallel training (sparc.train.distributed): two gloo processes on the CPU against one,
through the trainer and through the train stage (as under torchrun: RANK, WORLD_SIZE... set).

Tolerance. Two processes compute the same maths as one, with the gradient of the full-batch mean
summed in another order (each process averages its half, DDP averages the halves), so weights
differ by float32 rounding that Adam carries forward: after 16 steps at lr 3e-3 the largest
difference measured is about 1e-7 (TOL = 1e-5 leaves two orders of magnitude). The replicas of
the two processes, their dead-latent counters, and a resumed two-process run against an
uninterrupted one agree bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from sparc.data.planted import PlantedConfig, make_planted
from sparc.distributed import World, launch_command, needs_launch
from sparc.features.store import write_stream
from sparc.model import sparse
from sparc.params import ParamsError, TrainParams, check_train
from sparc.train.checkpoint import latest_checkpoint
from sparc.train.distributed import DataParallel, Ranks
from sparc.train.loop import Trainer, TrainSpec, train_sae
from sparc.train.sampler import EpochSampler, FeatureSource
from sparc.train.stage import run_train
from tests.train import test_stage

TOL = 1e-5
DATA = make_planted(
    PlantedConfig(dims={"a": 12, "b": 10, "c": 8}, n_samples=250, n_parents=2, n_children=3, world_dim=8)
)
BASE = dict(batch_size=63, epochs=4, lr=3.0e-3, k_aux=8, dead_steps=5, revive_every=4, checkpoint_every=5,
            log_every=3, device="cpu")
# 250 rows in batches of 62 or 63 (4 steps per epoch): halves of 31/31 and 32/31 rows, so both the
# even and the uneven split occur; revival at steps 4, 8, 12.
CASES = {
    "sparc-subset": TrainSpec(L=32, k=3, topk="global", method="sparc",
                              train=TrainParams(**BASE, subset_keep=0.7, consistency=0.5)),
    "usae-source-only": TrainSpec(L=32, k=3, topk="local", method="usae",
                                  train=TrainParams(**BASE, usae_update="source_only")),
    # the other streams' encoders get no gradient on any process: grad None, no Adam step, as in one
    "usae-joint": TrainSpec(L=32, k=3, topk="local", method="usae", train=TrainParams(**BASE)),
}
STOP = 6  # the interrupted run stops here, between two checkpoints
# Cases whose [L, d] gradients live in the pooled CPU buffers (as at the paper's size) under DDP.
POOLED = {"usae-source-only"}


def run_case(name: str, ranks: Ranks, run_dir) -> dict:
    """Weights and counters after a whole run (trainer steps), then the same run through train_sae
    stopped at STOP and resumed from its checkpoint: its weights and logged history."""
    torch.set_num_threads(1)  # as tests/train/conftest.py (module fixtures run before it)
    spec, pool_bytes = CASES[name], sparse.POOL_MIN_BYTES
    source = FeatureSource(DATA.features, device="cpu")
    try:
        sparse.POOL_MIN_BYTES = 0 if name in POOLED else pool_bytes
        trainer = Trainer(source, spec, torch.device("cpu"), ranks)
        while trainer.step < trainer.total_steps:
            trainer.train_step()
        first = train_sae(source, spec, checkpoint_dir=run_dir, max_steps=STOP, ranks=ranks)
        resumed = train_sae(source, spec, checkpoint_dir=run_dir, ranks=ranks)
    finally:
        sparse.POOL_MIN_BYTES = pool_bytes
    return {
        "weights": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "since": {s: v.clone() for s, v in trainer.since.items()},
        "first_step": first.step,
        "resumed": {k: v.clone() for k, v in resumed.model.state_dict().items()},
        "history": resumed.history,
    }


def make_layout(root) -> None:
    """The train stage's inputs (tests/train/test_stage.py's planted store) under ``root``."""
    splits = ["train" if i % 5 else "val" for i in range(len(test_stage.DATA))]
    fp = test_stage.write_prepared(root / "prepared", test_stage.DATA.ids, splits)
    for s, x in test_stage.DATA.features.items():
        write_stream(root / "features" / s, test_stage.DATA.ids, x.astype(np.float16),
                     {"model": f"planted:{s}", "input": "image", "dataset_fingerprint": fp})


def run_stage(root, tag: str, nproc: int, **kw):
    """run_train on the layout; model and reports under ``root/tag``, shared checkpoints."""
    return run_train(
        test_stage.params(nproc=nproc), features_root=root / "features", prepared_dir=root / "prepared",
        out_dir=root / tag / "sae", reports_dir=root / tag / "reports", checkpoints_dir=root / "checkpoints",
        progress=False, **kw,
    )


def worker(rank: int, size: int, root: str) -> None:
    """One of ``size`` gloo processes, with torchrun's variables set: the train stage stopped at
    STOP and resumed (model and reports of rank r under ``root/rank-r``), then every case of
    CASES, saved to ``root/rank-<rank>.pt``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size))
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        stopped = run_stage(Path(root), f"rank-{rank}", size, max_steps=STOP)
        finished = run_stage(Path(root), f"rank-{rank}", size)
        ranks = DataParallel(World(rank, size, rank, size))
        results = {name: run_case(name, ranks, f"{root}/run-{name}") for name in CASES}
    finally:
        dist.destroy_process_group()
    torch.save(dict(results, stage=(stopped.name, finished.name)), f"{root}/rank-{rank}.pt")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Both processes' results (list by rank) and the directory they ran in."""
    root = tmp_path_factory.mktemp("ddp")
    make_layout(root)
    mp.spawn(worker, args=(2, str(root)), nprocs=2, join=True)
    return [torch.load(root / f"rank-{r}.pt") for r in range(2)], root


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out, threads = tmp_path_factory.mktemp("single"), torch.get_num_threads()
    try:
        return {name: run_case(name, Ranks(), out / name) for name in CASES}
    finally:
        torch.set_num_threads(threads)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(two_processes, one_process, case):
    r0, r1 = two_processes[0][0][case], two_processes[0][1][case]
    single = one_process[case]
    # the replicas stay identical, counters included
    assert max_difference(r0["weights"], r1["weights"]) == 0.0
    for s in single["since"]:
        assert torch.equal(r0["since"][s], r1["since"][s])
        assert torch.equal(r0["since"][s], single["since"][s])
    # two processes against one: float32 summation order only
    diff = max_difference(r0["weights"], single["weights"])
    assert diff < TOL, diff
    # resume under two processes: identical to the uninterrupted two-process run, same logged history
    assert r0["first_step"] == STOP
    assert max_difference(r0["resumed"], r0["weights"]) == 0.0
    assert r0["history"] == r1["history"]
    assert [s for s, _ in r0["history"]] == [s for s, _ in single["history"]]
    for (_, got), (_, want) in zip(r0["history"], single["history"], strict=True):
        assert got.keys() == want.keys()
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=TOL, abs=TOL), name


def test_stage_under_two_processes(two_processes, tmp_path):
    """The train stage as two torchrun processes, stopped and resumed: rank 0 alone writes the
    checkpoints, the model and the reports, which match one process's within TOL."""
    (r0, r1), root = two_processes
    assert r0["stage"] == r1["stage"] == (f"step-{STOP:08d}", "sae")
    assert not (root / "rank-1").exists() and not any((root / "checkpoints").iterdir())
    make_layout(tmp_path)
    run_stage(tmp_path, "single", 1)
    got = load_file(root / "rank-0/sae/model.safetensors")
    want = load_file(tmp_path / "single/sae/model.safetensors")
    assert max_difference(got, want) < TOL
    assert (root / "rank-0/sae/config.json").read_bytes() == (tmp_path / "single/sae/config.json").read_bytes()
    for tsv in ("loss/total.tsv", "dead_fraction/a.tsv", "val/loss/total.tsv"):
        rows = [(root / "rank-0/reports/plots/metrics" / tsv).read_text().split("\n"),
                (tmp_path / "single/reports/plots/metrics" / tsv).read_text().split("\n")]
        assert [r.split("\t")[0] for r in rows[0]] == [r.split("\t")[0] for r in rows[1]]
        for a, b in zip(rows[0][1:], rows[1][1:], strict=True):
            if a:
                assert float(a.split("\t")[1]) == pytest.approx(float(b.split("\t")[1]), rel=TOL, abs=TOL)


def test_revival_happened(one_process):
    """The runs exercise revival (dead latents are revived and their counters restart)."""
    history = one_process["sparc-subset"]["history"]
    assert any(m[f"dead_fraction/{s}"] > 0 for _, m in history for s in DATA.streams)


def test_batch_parts_tile_the_batch():
    class Rank(DataParallel):
        def __init__(self, rank: int, size: int) -> None:  # no process group needed for bounds
            self.rank, self.size = rank, size

    for n, size in [(63, 2), (62, 2), (7, 3), (3, 3)]:
        parts = [Rank(r, size).bounds(n) for r in range(size)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
        sizes = [hi - lo for lo, hi in parts]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_too_small_batches_and_usae_paper_are_refused():
    class Two(DataParallel):
        def __init__(self) -> None:
            self.rank, self.size = 0, 2

    with pytest.raises(ValueError, match="train.batch_size: batches of 1 rows"):
        Two().check("sparc", EpochSampler(5, 1, 0))
    with pytest.raises(ValueError, match="usae_paper"):
        Two().check("usae_paper", EpochSampler(64, 32, 0))
    with pytest.raises(ParamsError, match="train.nproc: method usae_paper"):
        check_train(TrainParams(nproc=2), topk="local", method="usae_paper")
    with pytest.raises(ParamsError, match=r"train.device: 'cuda:1' would put all 2 processes"):
        check_train(TrainParams(nproc=2, device="cuda:1"))
    with pytest.raises(ParamsError, match="train.nproc: must be >= 1"):
        check_train(TrainParams(nproc=0))


def test_only_rank_0_writes_checkpoints(tmp_path):
    class Rank1(Ranks):
        rank = 1

    spec = CASES["sparc-subset"]
    source = FeatureSource(DATA.features, device="cpu")
    result = train_sae(source, spec, checkpoint_dir=tmp_path, max_steps=5, ranks=Rank1())
    assert result.step == 5 and result.checkpoint == tmp_path / "step-00000005"
    assert latest_checkpoint(tmp_path) is None and not any(tmp_path.iterdir())


def test_nproc_is_not_in_the_run_key():
    """A checkpoint written under one process count resumes under another (and nproc 1 keeps
    the keys of runs from before the parameter existed)."""
    spec = CASES["sparc-subset"]
    two = dataclasses.replace(spec, train=dataclasses.replace(spec.train, nproc=2))
    assert two.key_payload() == spec.key_payload() and "nproc" not in spec.key_payload()["train"]


def test_relaunch_command(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "PET_NNODES"):
        monkeypatch.delenv(var, raising=False)
    assert not needs_launch(1) and needs_launch(2)
    cmd = launch_command(2, ["--params", "p.yaml", "train"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                       "-m", "sparc", "--params", "p.yaml", "train"]
    monkeypatch.setenv("PET_NNODES", "2")  # several machines: torchrun's static rendezvous, no --standalone
    assert needs_launch(1) and "--standalone" not in launch_command(1, ["train"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")  # already under torchrun: never again
    assert not needs_launch(2)
    assert World.from_env() == World(0, 4, 0, 4)
