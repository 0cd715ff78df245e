"""Measured effect of each remaining difference from the SPARC reference code, one switch at a time.

Why: docs/differences.md keeps or aligns each behaviour below; this script
prints what each one changes. Every switch turns one behaviour of this project into the
reference's, all else equal (module constants, restored afterwards):

- ``revive_noise``: revived encoder rows drawn N(0, 0.01^2) per entry (row norm 0.01 sqrt(d_s))
  instead of a row norm of 0.01 (``sparc.train.loop.REVIVE_ENTRY_STD``);
- ``fire_threshold``: a latent counts as fired when an activation exceeds 1e-3 instead of 0
  (``sparc.model.sae.FIRE_THRESHOLD``);
- ``adam_keep``: revival keeps the rows' Adam moments instead of zeroing them
  (``sparc.train.loop.RESET_ADAM_ROWS``);
- ``aux_denominator``: the AuxK NMSE divided by ``||x - W_dec z||^2 = ||residual + b_pre||^2``
  instead of ``||residual||^2`` (``sparc.model.sae.AUX_DENOMINATOR``);
- ``decoder_order``: the decoder rows renormalised after backward, before the gradient
  projection and the Adam step (the reference's order), instead of after the step
  (``sparc.train.loop.DECODER_NORMALISE``);
- ``float32`` (planted data only, the feature store holds float16): training features kept in
  float32 instead of rounded to float16 (every planted variant is evaluated on float32 rows).

Each variant trains SPARC with params.yaml's model and ``train`` settings (on the CPU, one
thread) for each seed and reports, on held-out rows: self / cross NMSE (the training objective's
terms, :func:`sparc.train.loop.evaluate_loss`), the dead fraction of the dead-latent counters at
the end of training, and the fraction of latents that never fire on the held-out rows (mean over
streams). Data: the emoji features under ``data/features/emoji`` (train / test split of
``data/prepared/emoji``) when every stream is extracted, and planted-concept data with the emoji
streams' dims (1300 train, 400 held-out rows). It also prints the size of Adam's updates of a row
whose moments were zeroed after 5000 steps, against a fresh optimiser.

    python benchmarks/reference_differences.py                 # seeds 0 1, both data sets
    python benchmarks/reference_differences.py --seeds 0 --data planted
    python benchmarks/reference_differences.py --seeds 0 1 2 --variants ours decoder_order
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from sparc import paths
from sparc.data.planted import PlantedConfig, make_planted
from sparc.data.prepared import load_prepared
from sparc.features.store import load_streams
from sparc.model import sae
from sparc.params import load_params
from sparc.train import loop
from sparc.train.sampler import FeatureSource

# variant -> (module, constant, reference value); "float32" changes the data instead
SWITCHES = {
    "revive_noise": (loop, "REVIVE_ENTRY_STD", 0.01),
    "fire_threshold": (sae, "FIRE_THRESHOLD", 1e-3),
    "adam_keep": (loop, "RESET_ADAM_ROWS", False),
    "aux_denominator": (sae, "AUX_DENOMINATOR", "reference"),
    "decoder_order": (loop, "DECODER_NORMALISE", "before_step"),
}


@contextmanager
def switched(variant: str) -> Iterator[None]:
    """Set the variant's constant to the reference's value inside the block."""
    if variant not in SWITCHES:
        yield
        return
    module, name, value = SWITCHES[variant]
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


def never_fire(model: sae.MultiStreamSAE, source: FeatureSource) -> float:
    """Mean over streams of the fraction of latents with no positive activation on ``source``."""
    x = source.gather(np.arange(len(source)))
    with torch.no_grad():
        codes = model.encode(x)
    fractions = []
    for code in codes.values():
        fired = torch.zeros(model.cfg.L, dtype=torch.bool)
        fired[code.indices[code.values > 0]] = True
        fractions.append(1.0 - fired.float().mean().item())
    return statistics.mean(fractions)


def run(train_features: dict[str, np.ndarray], eval_features: dict[str, np.ndarray], train_rows: np.ndarray,
        test_rows: np.ndarray, spec: loop.TrainSpec, variant: str) -> dict[str, float]:
    with switched(variant):
        res = loop.train_arrays(train_features, spec, rows=train_rows)
    held = FeatureSource(eval_features, test_rows)
    val = loop.evaluate_loss(res.model, held, spec)
    dead = [v for k, v in res.metrics.items() if k.startswith("dead_fraction/")]
    return {"self": val["loss/self"], "cross": val["loss/cross"], "dead": statistics.mean(dead),
            "never": never_fire(res.model, held)}


def emoji_data() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray] | None:
    params = load_params()
    try:
        prepared = load_prepared(paths.prepared_dir("emoji"))
        streams = load_streams(paths.features_root("emoji"), params.stream_names)
    except (FileNotFoundError, ValueError) as err:
        print(f"emoji features not available ({err}); skipped")
        return None
    if any(s.ids != prepared.ids for s in streams.values()):
        print("emoji features do not match the prepared dataset; skipped")
        return None
    return {n: np.asarray(s.features) for n, s in streams.items()}, prepared.indices("train"), prepared.indices("test")


def planted_data() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    data = make_planted(PlantedConfig(dims={"effnet": 1280, "vit": 384, "minilm": 384}, n_samples=1700,
                                      world_dim=64, n_parents=8, n_children=8))
    return data.features, np.arange(1300), np.arange(1300, 1700)


def adam_after_reset(lr: float = 1e-3, before: int = 5000, after: int = 100) -> None:
    """Per-entry update / lr of a row whose Adam moments were zeroed after ``before`` steps, vs a
    fresh Adam, for a constant gradient (the direction a revived row keeps being pushed in) and
    for Gaussian noise gradients."""
    gen = torch.Generator().manual_seed(0)
    d = 1000
    rows: dict[str, list[float]] = {}
    for kind in ("constant", "noise"):
        g_const = torch.randn(d, generator=gen)
        for label in ("reset row", "fresh Adam"):
            p = torch.nn.Parameter(torch.zeros(2, d))
            opt = torch.optim.Adam([p], lr=lr)
            if label == "reset row":
                for _ in range(before):
                    p.grad = torch.randn(2, d, generator=gen)
                    opt.step()
                opt.state[p]["exp_avg"][1] = 0
                opt.state[p]["exp_avg_sq"][1] = 0
            ratios = []
            for _ in range(after):
                row = p[1].detach().clone()
                g = g_const if kind == "constant" else torch.randn(d, generator=gen)
                p.grad = torch.stack([torch.randn(d, generator=gen), g])
                opt.step()
                ratios.append(((p[1].detach() - row).abs().mean() / lr).item())
            rows[f"{label}, {kind} gradient"] = ratios
    marks = [1, 2, 5, 10, 20, 50, 100]
    print("\nAdam: mean |update| / lr of one row, n steps after its moments were zeroed (step count kept)")
    print(f"{'':32s}" + "".join(f"{'n=' + str(n):>8s}" for n in marks))
    for label, ratios in rows.items():
        print(f"{label:32s}" + "".join(f"{ratios[n - 1]:8.2f}" for n in marks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--data", choices=["emoji", "planted", "both"], default="both")
    parser.add_argument("--variants", nargs="+", choices=["ours", *SWITCHES, "float32"],
                        help="the rows to train (default: every variant of each data set)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = load_params()
    train = dataclasses.replace(params.train, device="cpu", log_every=10**9)
    adam_after_reset(lr=train.lr)

    sets = {}
    if args.data in ("emoji", "both") and (emoji := emoji_data()) is not None:
        sets["emoji"] = emoji
    if args.data in ("planted", "both"):
        sets["planted"] = planted_data()
    for name, (features, train_rows, test_rows) in sets.items():
        variants = ["ours", *SWITCHES] + (["float32"] if name == "planted" else [])
        variants = [v for v in variants if args.variants is None or v in args.variants]
        print(f"\n{name}: {len(train_rows)} train / {len(test_rows)} held-out rows, L={params.L} k={params.k} "
              f"lambda={params.lam} topk={params.topk}, {train.epochs} epochs, dead_steps={train.dead_steps}, "
              f"revive_every={train.revive_every}; mean over seeds {args.seeds} (min-max)")
        print(f"{'variant':16s}{'self NMSE':>22s}{'cross NMSE':>22s}{'dead (counters)':>22s}{'never fire (test)':>22s}")
        for variant in variants:
            data = features
            if name == "planted" and variant != "float32":  # the store's float16, as training sees it
                data = {s: f.astype(np.float16) for s, f in features.items()}
            results = []
            for seed in args.seeds:
                spec = loop.TrainSpec(L=params.L, k=params.k, lam=params.lam, topk=params.topk, method="sparc",
                                      seed=seed, train=train)
                results.append(run(data, features, train_rows, test_rows, spec, variant))
            cells = []
            for key in ("self", "cross", "dead", "never"):
                v = [r[key] for r in results]
                cells.append(f"{statistics.mean(v):.4f} ({min(v):.3f}-{max(v):.3f})")
            print(f"{variant:16s}" + "".join(f"{c:>22s}" for c in cells))


if __name__ == "__main__":
    main()
