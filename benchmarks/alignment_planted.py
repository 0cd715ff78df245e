"""The per-stream alignment options on planted-concept data, where the concepts are known.

Why: docs/alignment.md asks whether SPARC's training options
(``train.subset_keep``, ``train.consistency``) recover the planted concepts better, or only make
the streams agree. This script trains each configuration of
:data:`sparc.report.experiments.ALIGNMENT` (and consistency weight 10) for each seed (SPARC, Global TopK, lambda 1, on the
planted data of ``tests/train/test_planted_claims.py``: 3 streams of 48/32/40 dims, 16 leaf
concepts in 4 families, stream-specific nuisance directions; 1000 training and 300 held-out rows,
L = 64, k = 4) and reports on the held-out rows, mean +- std over seeds:

- ``recovery``: mean over streams and concepts of the best cosine between a planted direction and
  a decoder column (:func:`sparc.evaluate.recovery.recovery`); ``same latent``: fraction of
  concepts whose best latent is the same latent in every stream (the dictionary is aligned on the
  truth);
- ``ps detect AUC``: per-stream codes (each stream encoded alone); for every concept, the
  activation of its best latent (majority over streams) in stream s scores the samples for the
  concept's presence; ROC AUC, mean over concepts and streams;
- ``ps Jaccard``: mean over sample and stream pairs of the Jaccard index of the firing latents of
  the per-stream codes (1 = each stream alone picks what the others pick);
- ``self`` / ``cross lf``: NMSE of per-stream codes decoded into their own stream / into the other
  streams (leak-free cross), and ``joint self``: NMSE of the joint codes.

    python benchmarks/alignment_planted.py                 # seeds 0 1 2, every configuration
    python benchmarks/alignment_planted.py --seeds 0 --only sparc,subset-0.5
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from sparc.data.planted import PlantedConfig, make_planted
from sparc.evaluate.recovery import model_decoders, recovery
from sparc.model.losses import nmse
from sparc.model.sae import MultiStreamSAE
from sparc.params import TrainParams
from sparc.report.ablation import COLUMN_TITLES
from sparc.report.experiments import ALIGNMENT
from sparc.train.loop import TrainSpec, train_arrays

DATA = make_planted(PlantedConfig(n_samples=1300, seed=0))
# The alignment grid plus a strong consistency weight (it shows what the term costs when it wins).
CONFIGS = ALIGNMENT | {"consistency-10": {"train.subset_keep": 1.0, "train.consistency": 10.0}}
TRAIN, HELD_OUT = np.arange(1000), np.arange(1000, 1300)


def spec(seed: int, overrides: dict[str, object]) -> TrainSpec:
    train = {k.removeprefix("train."): v for k, v in overrides.items()}
    params = TrainParams(batch_size=128, epochs=40, lr=3.0e-3, k_aux=16, dead_steps=50, revive_every=25,
                         log_every=40, device="cpu", **train)
    return TrainSpec(L=64, k=4, lam=1.0, topk="global", seed=seed, train=params)


def dense(model: MultiStreamSAE, codes: dict) -> dict[str, torch.Tensor]:
    """Per-stream codes as dense ``[N, L]`` activations."""
    out = {}
    for s, c in codes.items():
        z = torch.zeros(c.indices.shape[0], model.cfg.L, dtype=c.values.dtype)
        out[s] = z.scatter_(1, c.indices, c.values)
    return out


@torch.no_grad()
def measure(model: MultiStreamSAE) -> dict[str, float]:
    x = {s: torch.from_numpy(f[HELD_OUT]) for s, f in DATA.features.items()}
    xn = {s: v / v.norm(dim=1, keepdim=True) for s, v in x.items()}
    streams = list(x)
    per = model.encode(x, mode="local")
    joint = model.encode(x, mode="global")
    rec = recovery(DATA.directions, model_decoders(model))
    best = np.stack([r.latent for r in rec.values()])  # [streams, C]
    same = float((best == best[:1]).all(0).mean())
    majority = [int(np.bincount(best[:, c]).argmax()) for c in range(best.shape[1])]
    acts = dense(model, per)
    present = DATA.concepts[HELD_OUT]
    aucs = [
        roc_auc_score(present[:, c], acts[s][:, latent].numpy())
        for s in streams
        for c, latent in enumerate(majority)
        if 0 < present[:, c].sum() < len(HELD_OUT)
    ]
    fired = {s: a > 0 for s, a in acts.items()}
    jac = []
    for i, s in enumerate(streams):
        for t in streams[i + 1:]:
            inter = (fired[s] & fired[t]).sum(1).float()
            union = (fired[s] | fired[t]).sum(1).float().clamp_min(1)
            jac.append((inter / union).mean().item())
    self_ps = [nmse(model.decode(per[s], s), xn[s]).item() for s in streams]
    cross_ps = [nmse(model.decode(per[s], t), xn[t]).item() for s in streams for t in streams if t != s]
    joint_self = [nmse(model.decode(joint[s], s), xn[s]).item() for s in streams]
    return {
        "recovery": float(np.mean([r.mean_best for r in rec.values()])),
        "same latent": same,
        "ps detect AUC": float(np.mean(aucs)),
        "ps Jaccard": float(np.mean(jac)),
        "self (ps)": float(np.mean(self_ps)),
        "cross lf (ps)": float(np.mean(cross_ps)),
        "joint self": float(np.mean(joint_self)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="", help="comma-separated configurations of the alignment grid")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = [c for c in args.only.split(",") if c] or list(CONFIGS)
    torch.set_num_threads(1)
    rows: dict[str, dict[str, list[float]]] = {}
    for cfg in configs:
        for seed in seeds:
            model = train_arrays(DATA.features, spec(seed, CONFIGS[cfg]), rows=TRAIN).model
            for key, value in measure(model).items():
                rows.setdefault(cfg, {}).setdefault(key, []).append(value)
        print(f"trained {cfg} ({len(seeds)} seeds)", flush=True)
    keys = list(next(iter(rows.values())))
    print(f"\nplanted concepts, held-out rows, mean ± std over seeds {args.seeds}\n")
    print("| configuration | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for cfg, vals in rows.items():
        cells = [
            f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"
            for v in vals.values()
        ]
        print(f"| {COLUMN_TITLES.get(cfg, cfg)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
