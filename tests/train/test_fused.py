"""The fused CPU training step (sparc.train.fused) against the autograd path it replaces."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from sparc.model import sae
from sparc.model.sae import MultiStreamSAE, SAEConfig
from sparc.train import fused
from sparc.train.loop import make_adam

pytestmark = pytest.mark.kernels  # compared with the autograd path, whose kernels vary with the CPU

DIMS = {"a": 48, "b": 32, "c": 24}
L, K = 256, 8


def batches(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{s: torch.randn(64, d, generator=gen) for s, d in DIMS.items()} for _ in range(n)]


def train(topk: str, lam: float, dead_every: int | None, use_fused: bool, steps: int = 5, **cfg):
    """A few steps of one path; returns the model, its optimizer and every step's LossOutput."""
    model = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K, topk=topk, k_aux=16, **cfg), seed=0)
    opt = make_adam(model.parameters(), lr=1e-3, eps=1e-8)
    dead = {s: torch.arange(L) % dead_every == 0 for s in DIMS} if dead_every else None
    outs = []
    for x in batches(steps):
        if use_fused:
            assert fused.supports(model, opt)
            out = fused.fused_step(model, opt, x, lam, dead, 1 / 32)
        else:
            out = model.loss(x, lam, dead, 1 / 32)
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            model.remove_parallel_grad()
            opt.step()
            model.normalise_decoder()
        outs.append(out)
    return model, opt, outs


@pytest.mark.parametrize("topk", ["global", "local"])
@pytest.mark.parametrize("lam", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("dead_every", [None, 4, 300])  # none dead; many; one dead latent (< k_aux)
def test_fused_step_equals_the_autograd_step(topk, lam, dead_every):
    ref, ref_opt, ref_outs = train(topk, lam, dead_every, use_fused=False)
    got, got_opt, got_outs = train(topk, lam, dead_every, use_fused=True)
    for (name, p), q in zip(ref.named_parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=3e-6, msg=name)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got_opt.state[q][key], ref_opt.state[p][key], rtol=1e-4, atol=1e-9, msg=name)
    for r, g in zip(ref_outs, got_outs, strict=True):
        assert r.terms.keys() == g.terms.keys()
        for key, value in r.terms.items():
            assert float(g.terms[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), key
        assert float(g.total) == pytest.approx(float(r.total.detach()), rel=1e-5)
        for s in DIMS:
            assert torch.equal(g.fired[s], r.fired[s])
    for s in DIMS:  # unit decoder rows after every step
        norms = torch.linalg.vector_norm(got.W_dec[s], dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))


def test_fused_step_with_the_reference_aux_denominator(monkeypatch):
    monkeypatch.setattr(sae, "AUX_DENOMINATOR", "reference")
    ref, _, ref_outs = train("global", 1.0, 4, use_fused=False)
    got, _, got_outs = train("global", 1.0, 4, use_fused=True)
    assert float(got_outs[-1].terms["aux"]) == pytest.approx(float(ref_outs[-1].terms["aux"]), rel=1e-5)
    for p, q in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=0, atol=3e-6)


def test_fused_step_does_not_depend_on_the_thread_count():
    runs = []
    previous = numba.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS):
            numba.set_num_threads(threads)
            model, _, outs = train("global", 1.0, 4, use_fused=True)
            runs.append(([p.detach().clone() for p in model.parameters()], float(outs[-1].total)))
    finally:
        numba.set_num_threads(previous)
    assert runs[0][1] == runs[1][1]
    for p, q in zip(runs[0][0], runs[1][0], strict=True):
        assert torch.equal(p, q)


def test_supports_only_what_it_computes():
    model = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K), seed=0)
    opt = make_adam(model.parameters(), lr=1e-3, eps=1e-8)
    assert fused.supports(model, opt)
    assert not fused.supports(model, opt, method="usae")
    assert not fused.supports(model, opt, keep=True)
    assert not fused.supports(model, opt, consistency=0.5)
    assert not fused.supports(model, opt, processes=2)
    assert not fused.supports(model, opt, decoder_order="before_step")
    assert not fused.supports(model, torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.1))
    assert not fused.supports(model, torch.optim.SGD(model.parameters(), lr=1e-3))
    assert not fused.supports(model, make_adam(list(model.parameters())[:2], lr=1e-3, eps=1e-8))
    bn = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K, topk="local", encoder="batchnorm"), seed=0)
    assert not fused.supports(bn, make_adam(bn.parameters(), lr=1e-3, eps=1e-8))
    double = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K), seed=0).double()
    assert not fused.supports(double, make_adam(double.parameters(), lr=1e-3, eps=1e-8))


@pytest.mark.parametrize(("n", "k"), [(8192, 64), (1024, 64), (100, 10), (5000, 7), (70, 64), (8192, 1), (64, 64)])
def test_select_returns_the_top_k_ties_by_position(n, k):
    """The sampled-threshold selection picks what a full sort (value descending, position
    ascending) puts first, on random rows and on rows full of ties (where the fallback to the
    whole row is taken)."""
    rng = np.random.default_rng(n + k)
    keys, out, heap = np.empty(n, np.int64), np.empty(k, np.int64), np.empty(n, np.int64)
    for trial in range(12):
        row = rng.standard_normal(n).astype(np.float32)
        if trial % 3 == 1:
            row = np.round(row * 2).astype(np.float32)  # a handful of distinct values
        if trial % 3 == 2:
            row = np.zeros(n, np.float32)
            row[::3] = -0.5
        fused._select(row, n, k, out, keys, heap)
        np.testing.assert_array_equal(np.sort(out), np.sort(np.lexsort((np.arange(n), -row))[:k]))


@pytest.mark.parametrize(
    ("method", "train", "expected"),
    [("sparc", {}, True), ("sparc", {"subset_keep": 0.5}, False), ("sparc", {"consistency": 1.0}, False),
     ("usae", {}, False), ("usae_paper", {}, False)],
)
def test_the_trainer_takes_the_fused_step_where_it_applies(method, train, expected):
    """A CPU SPARC run trains with the fused step; the options it does not compute keep autograd,
    and both train (the loss falls)."""
    from sparc.data.planted import PlantedConfig, make_planted
    from sparc.params import TrainParams
    from sparc.train.loop import Trainer, TrainSpec
    from sparc.train.sampler import FeatureSource

    data = make_planted(PlantedConfig(dims={"a": 12, "b": 10}, n_samples=128, n_parents=2, n_children=3, world_dim=8))
    params = dict(batch_size=64, epochs=20, lr=3.0e-3, k_aux=8, dead_steps=5, device="cpu", **train)
    spec = TrainSpec(L=32, k=3, method=method, topk="local" if method != "sparc" else "global",
                     train=TrainParams(**params))
    trainer = Trainer(FeatureSource(data.features), spec, torch.device("cpu"))
    assert trainer.fused_step_ok() is expected
    first = None
    while trainer.step < trainer.total_steps:
        trainer.train_step()
        metrics = trainer.collect_metrics()
        first = first if first is not None else metrics["loss/total"]
    assert metrics["loss/total"] < first
