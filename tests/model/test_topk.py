"""TopK rules on hand-computed logits (method.md section 1)."""

import pytest
import torch

import sparc.model.sparse as sparse
from sparc.model.sae import MultiStreamSAE, SAEConfig
from sparc.model.topk import aux_topk, global_topk, local_topk

pytestmark = pytest.mark.kernels  # run again under other CPU kernels (Makefile test-kernels)

# Two streams, two samples, L = 4, k = 2. Sums of the raw logits:
#   row 0: [0.5, 1.0, 1.7, 1.3] -> global {2, 3};  local a {0, 3}, local b {1, 2}
#   row 1: [-1.5, 0.2, 0.4, 0.3] -> global {2, 3}; local a {1, 2}, local b {3, 2}
H_A = torch.tensor([[3.0, -1.0, -0.2, 1.2], [-1.0, 0.4, 0.3, -0.6]])
H_B = torch.tensor([[-2.5, 2.0, 1.9, 0.1], [-0.5, -0.2, 0.1, 0.9]])


def as_sets(idx: torch.Tensor) -> list[set[int]]:
    return [set(r) for r in idx.tolist()]


def test_global_topk_uses_the_sum_of_raw_logits():
    assert as_sets(global_topk([H_A, H_B], 2)) == [{2, 3}, {2, 3}]
    # a ReLU before summing would pick {0, 1} in row 0 (3.0 and 2.0)
    relu_sum = H_A.clamp_min(0) + H_B.clamp_min(0)
    assert as_sets(relu_sum.topk(2, dim=1).indices)[0] == {0, 1}


def test_global_topk_sums_in_a_reused_buffer_without_touching_the_inputs(monkeypatch):
    monkeypatch.setattr(sparse, "CPU_BUFFERS", sparse.CpuBufferPool())
    gen = torch.Generator().manual_seed(0)
    h = [torch.randn(5, 40, generator=gen, requires_grad=True) for _ in range(3)]  # as in encode()
    before = [t.detach().clone() for t in h]
    for scale in (1.0, -1.0):  # the second call reuses the first call's buffer
        logits = [t * scale for t in h]
        want = torch.topk(logits[0] + logits[1] + logits[2], 7, dim=1).indices
        assert torch.equal(global_topk(logits, 7), want)
    assert all(torch.equal(t.detach(), b) for t, b in zip(h, before, strict=True))
    assert len(sparse.CPU_BUFFERS._arrays[((5, 40), torch.float32)]) == 1


def test_local_topk_per_stream():
    assert as_sets(local_topk(H_A, 2)) == [{0, 3}, {1, 2}]
    assert as_sets(local_topk(H_B, 2)) == [{1, 2}, {2, 3}]


def test_global_topk_of_one_stream_is_local():
    assert torch.equal(global_topk([H_A], 2), local_topk(H_A, 2))


def test_aux_topk_only_dead_latents_and_flags_live_fillers():
    dead = torch.tensor([False, True, False, True])
    idx, valid = aux_topk(H_A, dead, 3)
    # two dead latents only: both picked first, the third pick is a live latent marked invalid
    assert [set(r[:2]) for r in idx.tolist()] == [{1, 3}, {1, 3}]
    assert valid[:, :2].all() and not valid[:, 2].any()


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_aux_topk_many_dead_picks_largest_dead_logits(cpu_kernels, monkeypatch):
    monkeypatch.setattr(sparse, "CPU_KERNELS", cpu_kernels)  # gathered dead columns / masked logits
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(5, 20, generator=gen)
    dead = torch.arange(20) % 3 == 0  # 7 dead latents >= k_aux: the gathered-columns path on CPU
    idx, valid = aux_topk(h, dead, 4)
    expected = h.masked_fill(~dead, float("-inf")).topk(4, dim=1).indices
    assert as_sets(idx) == as_sets(expected)
    assert valid.all() and dead[idx].all()


def hand_model(mode: str) -> MultiStreamSAE:
    """W_enc = 0, so the logits are the latent biases: row 0 of H_A / H_B for every sample."""
    model = MultiStreamSAE(SAEConfig(dims={"a": 3, "b": 5}, L=4, k=2, topk=mode))
    with torch.no_grad():
        for s, row in (("a", H_A[0]), ("b", H_B[0])):
            model.W_enc[s].zero_()
            model.b_lat[s].copy_(row)
    return model


def test_global_code_relu_after_gather_and_real_l0():
    model = hand_model("global")
    x = {"a": torch.randn(2, 3), "b": torch.randn(2, 5)}
    code = model.encode(x)
    for s in ("a", "b"):
        assert as_sets(code[s].indices) == [{2, 3}, {2, 3}]
    vals_a = dict(zip(code["a"].indices[0].tolist(), code["a"].values[0].tolist(), strict=True))
    assert vals_a == {2: 0.0, 3: 1.2000000476837158}  # h^a_2 = -0.2 cut by the ReLU
    vals_b = dict(zip(code["b"].indices[0].tolist(), code["b"].values[0].tolist(), strict=True))
    assert vals_b == {2: 1.899999976158142, 3: 0.10000000149011612}
    out = model.loss(x, lam=1.0)
    assert out.terms["l0/a"].item() == 1.0 < model.cfg.k
    assert out.terms["l0/b"].item() == 2.0
    assert out.fired["a"].tolist() == [False, False, False, True]
    assert out.fired["b"].tolist() == [False, False, True, True]


def test_local_code_and_l0():
    model = hand_model("local")
    x = {"a": torch.randn(2, 3), "b": torch.randn(2, 5)}
    code = model.encode(x)
    assert as_sets(code["a"].indices) == [{0, 3}, {0, 3}]
    assert as_sets(code["b"].indices) == [{1, 2}, {1, 2}]
    out = model.loss(x, lam=1.0)
    assert out.terms["l0/a"].item() == 2.0 and out.terms["l0/b"].item() == 2.0
    # per-stream inference on a global model gives the local codes
    code_local = hand_model("global").encode(x, mode="local")
    assert as_sets(code_local["a"].indices) == [{0, 3}, {0, 3}]


def test_one_stream_global_equals_local():
    torch.manual_seed(0)
    x = {"a": torch.randn(16, 6)}
    models = {m: MultiStreamSAE(SAEConfig(dims={"a": 6}, L=32, k=4, topk=m), seed=3) for m in ("global", "local")}
    codes = {m: models[m].encode(x) for m in models}
    assert torch.equal(codes["global"]["a"].indices, codes["local"]["a"].indices)
    assert torch.equal(codes["global"]["a"].values, codes["local"]["a"].values)
    dead = {"a": torch.arange(32) % 3 == 0}
    losses = {m: models[m].loss(x, lam=1.0, dead=dead) for m in models}
    assert torch.equal(losses["global"].total, losses["local"].total)
    for m in models:
        losses[m].total.backward()
    for name, p in models["global"].named_parameters():
        assert torch.equal(p.grad, dict(models["local"].named_parameters())[name].grad), name


def test_encode_subset_of_streams_is_global_over_those_given():
    torch.manual_seed(1)
    model = MultiStreamSAE(SAEConfig(dims={"a": 6, "b": 5, "c": 4}, L=32, k=4), seed=0)
    x = {"a": torch.randn(8, 6), "c": torch.randn(8, 4)}
    code = model.encode(x)
    assert set(code) == {"a", "c"}
    h = model.logits(x)
    expected = (h["a"] + h["c"]).topk(4, dim=1).indices
    assert torch.equal(code["a"].indices, expected) and torch.equal(code["c"].indices, expected)
