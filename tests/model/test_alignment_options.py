"""The Global TopK training options for per-stream alignment: the stream-subset rule and the
consistency term (README "Alignment when a stream is encoded alone")."""

import pytest
import torch
import torch.nn.functional as F

from sparc.model.sae import MultiStreamSAE, SAEConfig
from sparc.model.topk import global_topk, local_topk, subset_topk
from tests.model.test_sae_loss import DEAD, DIMS, K, batch, grads, make


def test_subset_topk_all_kept_is_global_and_one_kept_is_local():
    gen = torch.Generator().manual_seed(0)
    h = [torch.randn(6, 20, generator=gen) for _ in range(3)]
    everything = torch.ones(6, 3, dtype=torch.bool)
    assert torch.equal(subset_topk(h, everything, 4), global_topk(h, 4))
    one = torch.zeros(6, 3, dtype=torch.bool)
    one[torch.arange(6), torch.arange(6) % 3] = True
    got = subset_topk(h, one, 4)
    for b in range(6):
        assert torch.equal(got[b], local_topk(h[b % 3][b : b + 1], 4)[0])
    pair = torch.tensor([[True, False, True]] * 6)
    assert torch.equal(subset_topk(h, pair, 4), global_topk([h[0], h[2]], 4))


def test_subset_topk_rejects_empty_rows_and_bad_shapes():
    h = [torch.randn(2, 8) for _ in range(2)]
    with pytest.raises(ValueError, match="at least one stream"):
        subset_topk(h, torch.tensor([[True, False], [False, False]]), 2)
    with pytest.raises(ValueError, match=r"keep must be \[B, n\]"):
        subset_topk(h, torch.ones(2, 3, dtype=torch.bool), 2)


def test_loss_with_every_stream_kept_equals_the_plain_loss_bitwise():
    x = batch()
    plain, subset = make(), make()
    a = plain.loss(x, 1.0, dead=DEAD)
    a.total.backward()
    keep = torch.ones(12, len(DIMS), dtype=torch.bool)
    b = subset.loss(x, 1.0, dead=DEAD, keep=keep, consistency=0.0)
    b.total.backward()
    assert torch.equal(a.total, b.total)
    assert set(a.terms) == set(b.terms)  # no consistency term logged when it is off
    ga, gb = grads(plain), grads(subset)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)


def test_subset_decodes_every_stream_with_the_kept_streams_choice():
    x = batch()
    model = make()
    keep = torch.zeros(12, 3, dtype=torch.bool)
    keep[:, 1] = True  # stream b alone chooses
    out = model.loss(x, 1.0, keep=keep)
    with torch.no_grad():
        own_b = model.encode({"b": x["b"]}, mode="local")["b"]
        rec = model.decode(own_b, "a")
        xa = F.normalize(x["a"], dim=1)
        expected = ((rec - xa).pow(2).sum(1) / xa.pow(2).sum(1)).mean()
    assert torch.allclose(out.terms["cross_nmse/b->a"], expected)


def dense_consistency(model: MultiStreamSAE, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The consistency term with plain autograd over dense logits (the reference)."""
    k, terms = model.cfg.k, []
    h = {s: (F.normalize(x[s], dim=1) - model.b_pre[s]) @ model.W_enc[s].T + model.b_lat[s] for s in x}
    shared = global_topk([v.detach() for v in h.values()], k)
    for hs in h.values():
        top = torch.topk(hs.detach(), k + 1, dim=1)
        tau = top.values[:, k - 1 : k + 1].mean(1, keepdim=True)
        own = top.indices[:, :k]
        total = hs.new_zeros(hs.shape[0])
        for b in range(hs.shape[0]):
            own_b, shared_b = set(own[b].tolist()), set(shared[b].tolist())
            for i in shared_b - own_b:
                total[b] = total[b] + F.relu(tau[b, 0] - hs[b, i])
            for j in own_b - shared_b:
                total[b] = total[b] + F.relu(hs[b, j] - tau[b, 0])
        terms.append((total / k).mean())
    return torch.stack(terms).mean()


def test_consistency_term_value_and_gradients_match_dense_autograd():
    x = batch()
    model, ref = make(), make()
    out = model.loss(x, 1.0, dead=DEAD, consistency=0.7)
    plain = ref.loss(x, 1.0, dead=DEAD)
    dense = dense_consistency(ref, x)
    assert dense.item() > 0  # the streams disagree at initialisation
    torch.testing.assert_close(out.terms["consistency"], dense.detach())
    torch.testing.assert_close(out.total, plain.total + 0.7 * dense)
    out.total.backward()
    (plain.total + 0.7 * dense).backward()
    got, want = grads(model), grads(ref)
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=name)


def test_consistency_is_zero_for_one_stream_and_when_k_equals_L():
    one = MultiStreamSAE(SAEConfig(dims={"a": 8}, L=16, k=K), seed=0).double()
    out = one.loss({"a": batch()["a"]}, 1.0, consistency=1.0)
    assert out.terms["consistency"].item() == 0.0
    full = MultiStreamSAE(SAEConfig(dims=DIMS, L=K, k=K), seed=0).double()
    out = full.loss(batch(), 1.0, consistency=1.0)
    assert out.terms["consistency"].item() == 0.0
    out.total.backward()  # still a graph


def test_options_are_refused_with_local_topk():
    model = make("local")
    with pytest.raises(ValueError, match="Global TopK only"):
        model.loss(batch(), 1.0, consistency=1.0)
    with pytest.raises(ValueError, match="Global TopK only"):
        model.loss(batch(), 1.0, keep=torch.ones(12, 3, dtype=torch.bool))
