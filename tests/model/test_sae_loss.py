"""SPARC / USAE losses against the dense reference (values and every gradient), and by hand."""

import pytest
import torch

import sparc.model.sparse as sparse
from sparc.model.losses import nmse, nmse_per_sample, nmse_sources
from sparc.model.sae import MultiStreamSAE, SAEConfig
from tests.model.dense_sae import dense_loss, dense_usae_loss

DIMS = {"a": 8, "b": 6, "c": 5}
L, K, K_AUX = 32, 4, 3


def make(topk: str = "global", seed: int = 0) -> MultiStreamSAE:
    model = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K, topk=topk, k_aux=K_AUX), seed=seed).double()
    with torch.no_grad():  # non-zero biases so that every path is exercised
        gen = torch.Generator().manual_seed(seed + 1)
        for s in model.streams:
            model.b_pre[s].copy_(0.1 * torch.randn(DIMS[s], generator=gen))
            model.b_lat[s].copy_(0.1 * torch.randn(L, generator=gen))
    return model


def batch(n: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {s: torch.randn(n, d, generator=gen, dtype=torch.float64) for s, d in DIMS.items()}


def grads(model: MultiStreamSAE) -> dict[str, torch.Tensor]:
    out = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


DEAD = {s: torch.arange(L) % 4 == 1 for s in DIMS}


def test_nmse_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    xhat = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    # row 0: (0.25 + 0.25) / 1 = 0.5 ; row 1: 4 / 4 = 1.0
    torch.testing.assert_close(nmse_per_sample(xhat, x), torch.tensor([0.5, 1.0]))
    assert nmse(xhat, x).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shapes differ"):
        nmse(xhat[:, :1], x)
    # several reconstructions of one target at once: [B, S, d] -> [S]
    stacked = torch.stack([xhat, x, torch.zeros_like(x)], dim=1)
    torch.testing.assert_close(nmse_sources(stacked, x), torch.tensor([0.75, 0.0, 1.0]))


@pytest.mark.parametrize("topk", ["global", "local"])
@pytest.mark.parametrize("lam", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("with_dead", [True, False])
@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_loss_and_gradients_match_dense_reference(topk, lam, with_dead, cpu_kernels, monkeypatch):
    monkeypatch.setattr(sparse, "CPU_KERNELS", cpu_kernels)
    model, x = make(topk), batch()
    dead = DEAD if with_dead else None
    out = model.loss(x, lam=lam, dead=dead, aux_coef=0.25)
    out.total.backward()
    got = grads(model)
    total, l_self, l_cross, l_aux = dense_loss(model, x, lam, dead, 0.25)
    total.backward()
    want = grads(model)
    torch.testing.assert_close(out.total, total)
    torch.testing.assert_close(out.terms["self_nmse"], l_self.detach())
    torch.testing.assert_close(out.terms["cross_nmse"], l_cross.detach())
    torch.testing.assert_close(out.terms["aux"], l_aux.detach())
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    if with_dead:
        assert out.terms["aux"] > 0


def test_total_is_self_plus_weighted_aux_and_cross():
    model, x = make(), batch()
    out = model.loss(x, lam=0.7, dead=DEAD, aux_coef=0.125)
    t = out.terms
    torch.testing.assert_close(out.total.detach(), t["self_nmse"] + 0.125 * t["aux"] + 0.7 * t["cross_nmse"])
    torch.testing.assert_close(t["self_nmse"], torch.stack([t[f"self_nmse/{s}"] for s in DIMS]).mean())
    pairs = [t[f"cross_nmse/{s}->{u}"] for s in DIMS for u in DIMS if s != u]
    assert len(pairs) == 6
    torch.testing.assert_close(t["cross_nmse"], torch.stack(pairs).mean())
    torch.testing.assert_close(t["aux"], torch.stack([t[f"aux/{s}"] for s in DIMS]).mean())
    assert all(not v.requires_grad for v in t.values())


def test_aux_is_zero_without_dead_latents():
    model, x = make(), batch()
    none_dead = {s: torch.zeros(L, dtype=torch.bool) for s in DIMS}
    for dead in (None, none_dead):
        out = model.loss(x, lam=1.0, dead=dead)
        assert out.terms["aux"].item() == 0.0


def test_lam_zero_sends_no_cross_gradient_to_decoders():
    # Local TopK: decoder rows used only by other streams' codes get gradient only via cross terms
    model, x = make("local"), batch()
    out = model.loss(x, lam=0.0)
    out.total.backward()
    g0 = grads(model)
    codes = model.encode(x)
    for t in DIMS:
        own = torch.zeros(L, dtype=torch.bool)
        own[codes[t].indices.reshape(-1)] = True
        assert g0[f"W_dec.{t}"][~own].abs().max() == 0
        assert g0[f"W_dec.{t}"][own].abs().sum() > 0
    model.loss(x, lam=1.0).total.backward()
    g1 = grads(model)
    for t in DIMS:
        own = torch.zeros(L, dtype=torch.bool)
        own[codes[t].indices.reshape(-1)] = True
        assert g1[f"W_dec.{t}"][~own].abs().sum() > 0
    # and the lam = 0 cross metric is still measured
    assert out.terms["cross_nmse"] > 0


def test_aux_gradient_reaches_the_encoder():
    model, x = make(), batch()
    dead = {s: torch.zeros(L, dtype=torch.bool) for s in DIMS}
    fired = model.loss(x, lam=1.0).fired
    for s in DIMS:  # dead latents that do not fire in this batch: only AuxK can move them
        dead[s][:] = ~fired[s]
        assert dead[s].sum() >= K_AUX
    model.loss(x, lam=1.0, dead=dead, aux_coef=0.0).total.backward()
    g_without = grads(model)
    model.loss(x, lam=1.0, dead=dead, aux_coef=1.0).total.backward()
    g_with = grads(model)
    for s in DIMS:
        rows = dead[s]
        assert g_without[f"W_enc.{s}"][rows].abs().max() == 0
        assert g_without[f"b_lat.{s}"][rows].abs().max() == 0
        assert (g_with[f"W_enc.{s}"][rows].abs().sum(1) > 0).sum() >= K_AUX
        assert (g_with[f"b_lat.{s}"][rows] != 0).sum() >= K_AUX
        assert g_with[f"W_dec.{s}"][rows].abs().sum() > 0


@pytest.mark.parametrize("with_dead", [True, False])
def test_usae_loss_matches_dense_reference_and_touches_documented_params(with_dead):
    model, x = make(), batch()
    dead = DEAD if with_dead else None
    out = model.usae_loss(x, source="b", dead=dead, aux_coef=0.5)
    out.total.backward()
    got = grads(model)
    dense_usae_loss(model, x, "b", dead, 0.5).backward()
    want = grads(model)
    torch.testing.assert_close(out.total, dense_usae_loss(model, x, "b", dead, 0.5))
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    for s in ("a", "c"):  # other encoders untouched, their decoders and pre-biases trained
        assert got[f"W_enc.{s}"].abs().max() == 0 and got[f"b_lat.{s}"].abs().max() == 0
        assert got[f"W_dec.{s}"].abs().sum() > 0 and got[f"b_pre.{s}"].abs().sum() > 0
    assert set(out.fired) == {"b"}
    t = out.terms
    torch.testing.assert_close(t["usae_nmse"], torch.stack([t["self_nmse/b"], t["cross_nmse/b->a"], t["cross_nmse/b->c"]]).mean())
    expected = (model.b_pre["b"], model.W_enc["b"], model.b_lat["b"], model.W_dec["b"])
    assert all(p is q for p, q in zip(model.stream_parameters("b"), expected, strict=True))


def test_bf16_logits_close_to_float32():
    model = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K), seed=0)
    x = {s: v.float() for s, v in batch().items()}
    ref = model.logits(x)
    model.bf16 = True
    low = model.logits(x)
    for s in DIMS:
        torch.testing.assert_close(low[s], ref[s], atol=2e-2, rtol=2e-2)
    out = model.loss(x, lam=1.0, dead=DEAD)
    out.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_inputs_are_named():
    model = make()
    x = batch()
    with pytest.raises(ValueError, match="missing"):
        model.loss({"a": x["a"]}, lam=1.0)
    with pytest.raises(ValueError, match="stream 'b'"):
        model.loss({**x, "b": x["b"][:, :3]}, lam=1.0)
    with pytest.raises(KeyError, match="unknown streams"):
        model.encode({"zz": x["a"]})
    with pytest.raises(ValueError, match=r"dead\['a'\]"):
        model.loss(x, lam=1.0, dead={"a": torch.zeros(L)})
    with pytest.raises(ValueError, match="topk mode"):
        model.encode(x, mode="both")
    with pytest.raises(KeyError, match="unknown stream"):
        model.usae_loss(x, source="zz")
