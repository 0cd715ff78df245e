"""Initialisation, configuration, decode and the per-step maintenance of the decoder."""

import pytest
import torch

from sparc.model.sae import Code, MultiStreamSAE, SAEConfig

DIMS = {"a": 8, "b": 6}


def make(seed: int = 0) -> MultiStreamSAE:
    return MultiStreamSAE(SAEConfig(dims=DIMS, L=16, k=3, k_aux=4), seed=seed)


def test_init_is_deterministic_and_follows_the_method():
    a, b, c = make(1), make(1), make(2)
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name
    assert not torch.equal(a.W_enc["a"], c.W_enc["a"])
    for s, d in DIMS.items():
        assert a.W_enc[s].shape == (16, d) and a.W_dec[s].shape == (16, d)
        torch.testing.assert_close(a.W_dec[s].norm(dim=1), torch.ones(16))
        # decoder = encoder transpose (in the stored [L, d] layout: the same rows), column-normalised
        torch.testing.assert_close(a.W_dec[s], a.W_enc[s] / a.W_enc[s].norm(dim=1, keepdim=True))
        assert a.W_enc[s].abs().max() <= d**-0.5
        assert a.b_pre[s].abs().max() == 0 and a.b_lat[s].abs().max() == 0
    assert a.streams == ["a", "b"]


def test_config_validation():
    with pytest.raises(ValueError, match="SAEConfig.k"):
        SAEConfig(dims=DIMS, L=4, k=5)
    with pytest.raises(ValueError, match="stream name"):
        SAEConfig(dims={"a.b": 3}, L=4, k=1)
    with pytest.raises(ValueError, match="stream name"):
        SAEConfig(dims={"keys": 3}, L=4, k=1)
    with pytest.raises(ValueError, match="input dim"):
        SAEConfig(dims={"a": 0}, L=4, k=1)
    with pytest.raises(ValueError, match="topk"):
        SAEConfig(dims=DIMS, L=4, k=1, topk="both")
    cfg = SAEConfig(dims=DIMS, L=16, k=3, topk="local", k_aux=5)
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        SAEConfig.from_dict({**cfg.to_dict(), "lam": 1.0})


def test_decode_is_sparse_gather_plus_pre_bias():
    model = make()
    with torch.no_grad():
        model.b_pre["b"].fill_(0.5)
    code = Code(torch.tensor([[1, 4, 7]]), torch.tensor([[2.0, 0.0, 1.0]]))
    out = model.decode(code, "b")
    want = 2.0 * model.W_dec["b"][1] + model.W_dec["b"][7] + 0.5
    torch.testing.assert_close(out[0], want.detach())
    x = {s: torch.randn(5, d) for s, d in DIMS.items()}
    codes = model.encode(x)
    dense = torch.zeros(5, 16).scatter(1, codes["a"].indices, codes["a"].values)
    torch.testing.assert_close(model.decode(codes["a"], "b"), dense @ model.W_dec["b"] + model.b_pre["b"])
    with pytest.raises(ValueError, match="indices"):
        model.decode(Code(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2)), "a")


def test_normalise_decoder_gives_unit_rows():
    model = make()
    with torch.no_grad():
        for W in model.W_dec.values():
            W.mul_(torch.rand(W.shape[0], 1) * 3 + 0.1)
    model.normalise_decoder()
    for W in model.W_dec.values():
        torch.testing.assert_close(W.norm(dim=1), torch.ones(W.shape[0]))


def test_remove_parallel_grad_leaves_grad_orthogonal_to_each_direction():
    model = make()
    x = {s: torch.randn(10, d) for s, d in DIMS.items()}
    model.loss(x, lam=1.0).total.backward()
    before = {s: W.grad.clone() for s, W in model.W_dec.items()}
    model.remove_parallel_grad()
    for s, W in model.W_dec.items():
        dots = (W.grad * W).sum(1)
        assert dots.abs().max() < 1e-7
        parallel = before[s] - W.grad  # the removed part is parallel to the row
        torch.testing.assert_close(parallel, (before[s] * W).sum(1, keepdim=True) * W.detach())
    model.W_dec["a"].grad = None  # a decoder without gradient is skipped
    model.remove_parallel_grad()


def test_revive_resets_rows_and_returns_them():
    model = make()
    with torch.no_grad():
        model.b_lat["a"].fill_(1.0)
    before = model.W_enc["a"].detach().clone()
    dec_before = model.W_dec["a"].detach().clone()
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[2, 9]] = True
    pairs = model.revive("a", mask, torch.Generator().manual_seed(0))
    assert [p is q for (p, _), q in zip(pairs, (model.W_enc["a"], model.b_lat["a"]), strict=True)] == [True, True]
    for _, rows in pairs:
        assert rows.tolist() == [2, 9]
    W = model.W_enc["a"].detach()
    assert not torch.equal(W[[2, 9]], before[[2, 9]])
    assert W[[2, 9]].norm(dim=1).max() < 0.05  # small noise
    keep = ~mask
    assert torch.equal(W[keep], before[keep])
    assert model.b_lat["a"][[2, 9]].abs().max() == 0 and (model.b_lat["a"][keep] == 1).all()
    assert torch.equal(model.W_dec["a"].detach(), dec_before)
    # integer ids work too and the draw is reproducible from the generator
    other = make()
    other.revive("a", torch.tensor([2, 9]), torch.Generator().manual_seed(0))
    assert torch.equal(other.W_enc["a"][[2, 9]], W[[2, 9]])
    with pytest.raises(ValueError, match="latent ids"):
        model.revive("a", torch.tensor([16]), torch.Generator())
    with pytest.raises(KeyError):
        model.revive("zz", mask, torch.Generator())
