"""USAE: lambda in this project's variant, and the paper's SAE (BatchNorm encoder, L1 + 0.1 x aux)."""

import math

import pytest
import torch
from torch import nn

from sparc.model.sae import LatentBatchNorm, MultiStreamSAE, SAEConfig
from tests.model.dense_sae import dense_usae_loss, dense_usae_paper_loss

DIMS = {"a": 8, "b": 6, "c": 5}
L, K = 32, 4


def batch(n: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {s: torch.randn(n, d, generator=gen, dtype=torch.float64) for s, d in DIMS.items()}


def grads(model: MultiStreamSAE) -> dict[str, torch.Tensor]:
    out = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def linear_model(seed: int = 0) -> MultiStreamSAE:
    model = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K, topk="local", k_aux=3), seed=seed).double()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for s in model.streams:
            model.b_pre[s].copy_(0.1 * torch.randn(DIMS[s], generator=gen))
    return model


def paper_model(seed: int = 0) -> MultiStreamSAE:
    """A batchnorm SAE with non-trivial BN parameters and running statistics."""
    model = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K, topk="local", encoder="batchnorm"), seed=seed).double()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for s in model.streams:
            bn = model.bn[s]
            bn.weight.copy_(1 + 0.3 * torch.randn(L, generator=gen))
            bn.bias.copy_(0.2 * torch.randn(L, generator=gen))
            bn.running_mean.copy_(0.1 * torch.randn(L, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(L, generator=gen))
    return model


# ---------------------------------------------------------------- lambda in method: usae


def test_usae_lambda_one_is_the_plain_mean_and_zero_trains_self_only():
    model, x = linear_model(), batch()
    dead = {s: torch.arange(L) % 4 == 1 for s in DIMS}
    default = model.usae_loss(x, "b", dead=dead, aux_coef=0.5)
    default.total.backward()
    g_default = grads(model)
    one = model.usae_loss(x, "b", dead=dead, aux_coef=0.5, lam=1.0)
    one.total.backward()
    g_one = grads(model)
    t = one.terms
    # the loss as it was before lambda applied to USAE: mean over all targets + aux. Exact: the
    # same terms (x 1.0 is exact) averaged in the same order (stream order, as usae_loss does); a
    # mean of three float64 terms in another order may differ in the last bit.
    plain_mean = torch.stack([t["cross_nmse/b->a"], t["self_nmse/b"], t["cross_nmse/b->c"]]).mean()
    assert torch.equal(one.total.detach(), plain_mean + 0.5 * t["aux"])
    assert torch.equal(one.total, default.total)  # the same call (lam defaults to 1.0): determinism
    assert all(torch.equal(g_one[n], g_default[n]) for n in g_one)

    for lam in (0.0, 0.3):
        out = model.usae_loss(x, "b", dead=dead, aux_coef=0.5, lam=lam)
        out.total.backward()
        got = grads(model)
        want_total = dense_usae_loss(model, x, "b", dead, 0.5, lam=lam)
        want_total.backward()
        want = grads(model)
        torch.testing.assert_close(out.total, want_total)
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)
        assert not torch.equal(out.total, one.total)
        torch.testing.assert_close(out.terms["cross_nmse"], t["cross_nmse"])  # still measured
    model.usae_loss(x, "b", lam=0.0).total.backward()
    for s in ("a", "c"):  # self only: the other streams' decoders and pre-biases get no gradient
        assert model.W_dec[s].grad is None and model.b_pre[s].grad is None
    assert model.W_dec["b"].grad.abs().sum() > 0


# ---------------------------------------------------------------- the batchnorm encoder


def test_latent_batchnorm_matches_batchnorm1d_in_train_and_eval_mode():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(20, L, generator=gen) * 3 + 1
    ours, ref = LatentBatchNorm(L), nn.BatchNorm1d(L)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2.0, L))
            m.bias.copy_(torch.linspace(-1.0, 1.0, L))
    torch.testing.assert_close(ours(h, batch_stats=True), ref.train()(h))  # batch statistics ...
    torch.testing.assert_close(ours.running_mean, ref.running_mean)  # ... and the same running update
    torch.testing.assert_close(ours.running_var, ref.running_var)
    torch.testing.assert_close(ours.running_mean, 0.1 * h.mean(0))
    before = ours.running_mean.clone(), ours.running_var.clone()
    torch.testing.assert_close(ours(h, batch_stats=False), ref.eval()(h))  # running statistics, unchanged
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
    with pytest.raises(ValueError, match="at least 2 samples"):
        ours(h[:1], batch_stats=True)


def test_batchnorm_model_layout_and_config():
    model = paper_model()
    keys = set(model.state_dict())
    for s in DIMS:
        assert {f"W_enc.{s}", f"b_lat.{s}", f"W_dec.{s}", f"bn.{s}.weight", f"bn.{s}.bias",
                f"bn.{s}.running_mean", f"bn.{s}.running_var"} <= keys
    assert not any(k.startswith("b_pre.") for k in keys)  # bias-free dictionary
    # same seed: the same encoder and dictionary as the linear model
    linear = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K), seed=0).double()
    assert torch.equal(model.W_enc["a"], linear.W_enc["a"]) and torch.equal(model.W_dec["a"], linear.W_dec["a"])
    bn = model.bn["b"]
    assert model.stream_parameters("b") == [model.W_enc["b"], model.b_lat["b"], bn.weight, bn.bias, model.W_dec["b"]]
    cfg = model.cfg
    assert cfg.to_dict()["encoder"] == "batchnorm" and SAEConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k != "encoder"}  # a config.json from before the key
    assert SAEConfig.from_dict(old).encoder == "linear"
    with pytest.raises(ValueError, match="SAEConfig.encoder"):
        SAEConfig(dims=DIMS, L=L, k=K, encoder="mlp")
    x = batch()
    with pytest.raises(ValueError, match="needs the linear encoder"):
        model.loss(x, lam=1.0)
    with pytest.raises(ValueError, match="needs the linear encoder"):
        model.usae_loss(x, "a")
    with pytest.raises(ValueError, match="needs the batchnorm encoder"):
        linear.usae_paper_loss(x, "a")


def test_inference_uses_running_statistics_in_either_mode_and_decodes_to_unit_space():
    model, x = paper_model(), batch()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    for mode in (True, False):
        model.train(mode)
        h = model.logits(x)
        for s in DIMS:
            lin = (x[s] / x[s].norm(dim=1, keepdim=True) * math.sqrt(DIMS[s])) @ model.W_enc[s].T + model.b_lat[s]
            bn = model.bn[s]
            want = (lin - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5) * bn.weight + bn.bias
            torch.testing.assert_close(h[s], want)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # never changed
    code = model.encode(x)["a"]
    dense = torch.zeros(12, L, dtype=torch.float64).scatter(1, code.indices, code.values)
    torch.testing.assert_close(model.decode(code, "c"), dense @ model.W_dec["c"] / math.sqrt(DIMS["c"]))


@pytest.mark.parametrize("lam", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("training", [True, False])
def test_usae_paper_loss_matches_the_reference_criterion(lam, training):
    model, x = paper_model(), batch()
    model.train(training)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    want_total = dense_usae_paper_loss(model, x, "b", lam)  # before the running statistics move
    want_total.backward()
    want = grads(model)
    out = model.usae_paper_loss(x, "b", lam=lam)
    out.total.backward()
    got = grads(model)
    torch.testing.assert_close(out.total, want_total)
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    moved = {k for k, v in stats.items() if not torch.equal(v, model.state_dict()[k])}
    # training mode: batch statistics, and only the source's running statistics move
    assert moved == ({"bn.b.running_mean", "bn.b.running_var"} if training else set())
    for s in ("a", "c"):  # never encoded
        assert got[f"W_enc.{s}"].abs().max() == 0 and got[f"bn.{s}.weight"].abs().max() == 0
        assert (got[f"W_dec.{s}"].abs().sum() > 0) == (lam != 0)
    assert got["W_enc.b"].abs().sum() > 0 and got["bn.b.weight"].abs().sum() > 0
    t = out.terms
    assert set(out.fired) == {"b"} and t["l0/b"] <= K
    torch.testing.assert_close(t["usae_nmse"], torch.stack([t["self_nmse/b"], t["cross_nmse/b->a"], t["cross_nmse/b->c"]]).mean())
    if lam == 1.0:
        torch.testing.assert_close(out.total.detach(), t["l1"] + 0.1 * t["aux"])
    if lam == 0.0:
        assert model.W_dec["a"].grad is None  # cross terms measured without a graph


def test_revive_resets_the_batchnorm_rows():
    model = paper_model()
    rows = torch.tensor([3, 7])
    pairs = model.revive("a", rows, torch.Generator().manual_seed(0))
    bn = model.bn["a"]
    assert [p for p, _ in pairs] == [model.W_enc["a"], model.b_lat["a"], bn.weight, bn.bias]
    assert torch.all(bn.weight[rows] == 1) and torch.all(bn.bias[rows] == 0)
    assert torch.all(bn.running_mean[rows] == 0) and torch.all(bn.running_var[rows] == 1)
    assert (bn.weight[[0, 1]] != 1).all()  # other latents untouched
