"""Training step time with 1 and with N CPU threads, on data the size of the default emoji run.

Why: ``train.cpu_threads`` (params.yaml) fixes the number of PyTorch CPU threads of the `train`
stage. On a busy 2-core machine, 2 threads were many times slower than 1 under libgomp's default
wait policy (threads spinning at the end of every small parallel region, on cores other processes
need); :mod:`sparc.train` sets the passive policy, which this script runs under too (it imports
that package before torch; ``OMP_WAIT_POLICY=`` in the environment gives the default policy back
for comparison). On an idle machine more threads may help. This script
times full training steps (:meth:`sparc.train.loop.Trainer.train_step`) of two identical trainers,
one per thread count, in alternation (so machine load affects both alike), checks that both end
with identical weights, and prints the ratio of their median step times.

Data: planted-concept features with the emoji streams' dims (1280, 384, 384) and train size (1300
rows); model L = 512, k = 16, batch 256 (the defaults).

    python benchmarks/train_threads.py              # 1 vs 2 threads, 40 steps each
    python benchmarks/train_threads.py --threads 4 --steps 100
    python benchmarks/train_threads.py --record     # also rewrite its row of docs/benchmarks.md
"""

from __future__ import annotations

import sparc.train  # noqa: F401  (first: the training's OpenMP wait policy, set before torch loads OpenMP)

# isort: split
import argparse
import statistics
import time

import numpy as np
import torch

from sparc.data.planted import PlantedConfig, make_planted
from sparc.params import TrainParams
from sparc.train.loop import Trainer, TrainSpec
from sparc.train.sampler import FeatureSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="thread count compared with 1")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--L", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--record", action="store_true", help="also write the figure into docs/benchmarks.md")
    args = parser.parse_args()

    data = make_planted(PlantedConfig(dims={"effnet": 1280, "vit": 384, "minilm": 384}, n_samples=1300,
                                      world_dim=64, n_parents=8, n_children=8))
    source = FeatureSource({s: f.astype(np.float16) for s, f in data.features.items()})
    spec = TrainSpec(L=args.L, k=args.k, train=TrainParams(batch_size=256, dead_steps=20, revive_every=10**9,
                                                           device="cpu"))
    trainers = {1: Trainer(source, spec, torch.device("cpu")),
                args.threads: Trainer(source, spec, torch.device("cpu"))}
    times: dict[int, list[float]] = {n: [] for n in trainers}
    before = torch.get_num_threads()
    for _ in range(args.steps):
        for n, trainer in trainers.items():
            torch.set_num_threads(n)
            start = time.perf_counter()
            trainer.train_step()
            times[n].append(time.perf_counter() - start)
    torch.set_num_threads(before)
    a, b = trainers.values()
    same = all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(),
                                                   strict=True))
    med = {n: statistics.median(t[3:]) for n, t in times.items()}
    for n, m in med.items():
        print(f"{n} thread(s): median {1000 * m:.1f} ms/step")
    print(f"ratio {args.threads} threads / 1 thread: {med[args.threads] / med[1]:.2f}   identical weights: {same}")
    if args.record:
        from record import record

        record(f"training step time, {args.threads} threads against 1 (`train.cpu_threads`)",
               f"{1000 * med[args.threads]:.1f} against {1000 * med[1]:.1f} ms/step "
               f"({med[args.threads] / med[1]:.2f}x), identical weights: {same}",
               "python benchmarks/train_threads.py" + (f" --threads {args.threads}" if args.threads != 2 else ""))


if __name__ == "__main__":
    main()
