"""Sparse gathers/scatters against dense references, values and gradients (float64).

Every test runs the three kernel paths: CSR kernels writing into pooled buffers, CSR kernels with
ordinary outputs, and the portable path used off the CPU.
"""

import pytest
import torch

import sparc.model.sparse as sparse
from sparc.model.sparse import (
    CpuBufferPool,
    LatentPlan,
    gather_dot_bmm,
    gather_logits,
    row_dots,
    sampled_dots,
    scatter_rows,
    sparse_decode,
)

pytestmark = pytest.mark.kernels  # run again under other CPU kernels (Makefile test-kernels)

L, D = 40, 7


@pytest.fixture(params=["csr_pooled", "csr", "portable"], autouse=True)
def kernels(request, monkeypatch):
    monkeypatch.setattr(sparse, "CPU_KERNELS", request.param != "portable")
    monkeypatch.setattr(sparse, "POOL_MIN_BYTES", 0 if request.param == "csr_pooled" else 2**62)
    monkeypatch.setattr(sparse, "CPU_BUFFERS", CpuBufferPool())
    return request.param


def dense_code(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[n, S, m]`` values at ``[n, m]`` ids -> dense ``[n, S, L]`` (graph kept)."""
    n, S, m = values.shape
    return torch.zeros(n, S, L, dtype=values.dtype).scatter(2, idx.unsqueeze(1).expand(n, S, m), values)


def distinct_ids(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(L, generator=gen)[:m] for _ in range(n)])


def test_sparse_decode_matches_dense_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(L, D, dtype=torch.float64, generator=gen, requires_grad=True)
    # group 0: 3 sources sharing an index set (global self + cross); group 1: one source (AuxK)
    v0 = torch.rand(5, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    i0 = distinct_ids(5, 4, gen)
    v1 = torch.rand(5, 1, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    i1 = distinct_ids(5, 6, gen)
    g0 = torch.randn(5, 3, D, dtype=torch.float64, generator=gen)
    g1 = torch.randn(5, 1, D, dtype=torch.float64, generator=gen)

    o0, o1 = sparse_decode(W, [(v0, i0), (v1, i1)])
    ((o0 * g0).sum() + (o1 * g1).sum()).backward()
    sparse_grads = [t.grad.clone() for t in (W, v0, v1)]
    for t in (W, v0, v1):
        t.grad = None
    r0 = dense_code(v0, i0) @ W
    r1 = dense_code(v1, i1) @ W
    ((r0 * g0).sum() + (r1 * g1).sum()).backward()
    torch.testing.assert_close(o0, r0)
    torch.testing.assert_close(o1, r1)
    for got, t in zip(sparse_grads, (W, v0, v1), strict=True):
        torch.testing.assert_close(got, t.grad)
    # rows of W that no code touches get exactly zero gradient
    touched = torch.zeros(L, dtype=torch.bool)
    touched[i0.reshape(-1)] = True
    touched[i1.reshape(-1)] = True
    assert sparse_grads[0][~touched].abs().max() == 0
    assert sparse_grads[0][touched].abs().sum(1).min() > 0


def test_sparse_decode_repeated_ids_accumulate():
    W = torch.randn(L, D, dtype=torch.float64, requires_grad=True)
    v = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[3, 3]])
    (out,) = sparse_decode(W, [(v, idx)])
    torch.testing.assert_close(out[0, 0], 3.0 * W[3].detach())
    out.sum().backward()
    torch.testing.assert_close(W.grad[3], torch.full((D,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(v.grad[0, 0], W[3].detach().sum().repeat(2))


def test_plan_scatter_and_sampled_dots_match_references():
    gen = torch.Generator().manual_seed(2)
    # random ids: repeats within a row and across groups are allowed and must be summed
    idx = [torch.randint(0, L, (6, 4), generator=gen), torch.randint(0, L, (5, 3), generator=gen)]
    coef = [torch.randn(6, 2, 4, dtype=torch.float64, generator=gen), torch.randn(5, 1, 3, dtype=torch.float64, generator=gen)]
    table = [torch.randn(6, 2, D, dtype=torch.float64, generator=gen), torch.randn(5, 1, D, dtype=torch.float64, generator=gen)]
    W = torch.randn(L, D, dtype=torch.float64, generator=gen)
    plan = LatentPlan(L, idx, [2, 1])
    assert (plan.L, plan.R, plan.nnz) == (L, 6 * 2 + 5, 6 * 2 * 4 + 5 * 3)
    ref = torch.zeros(L, D, dtype=torch.float64)
    for ix, c, t in zip(idx, coef, table, strict=True):
        rows = torch.einsum("nsm,nsd->nmd", c, t)
        ref.index_add_(0, ix.reshape(-1), rows.reshape(-1, D))
    stacked = torch.cat([t.reshape(-1, D) for t in table])
    torch.testing.assert_close(scatter_rows(plan, coef, stacked), ref)
    dots = sampled_dots(plan, stacked, W)
    for got, ix, t in zip(dots, idx, table, strict=True):
        torch.testing.assert_close(got, torch.einsum("nsd,nmd->nsm", t, W[ix]))
    back = plan.unsort(plan.sort(coef))  # sort/unsort round trip
    for a, b in zip(back, coef, strict=True):
        assert torch.equal(a, b)


def test_gather_dot_bmm_chunks(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(L, D, dtype=torch.float64, generator=gen)
    g = torch.randn(9, 2, D, dtype=torch.float64, generator=gen)
    idx = distinct_ids(9, 5, gen)
    monkeypatch.setattr(sparse, "_CPU_GATHER_BYTES", 2 * 5 * D * 8)  # chunks of 2 samples, 1 left over
    torch.testing.assert_close(gather_dot_bmm(g, idx, W), torch.einsum("nsd,nmd->nsm", g, W[idx]))


def test_row_dots_chunks(monkeypatch):
    monkeypatch.setattr(sparse, "_CPU_DOT_ROWS", 7)
    a, b = torch.randn(L, D, dtype=torch.float64), torch.randn(L, D, dtype=torch.float64)
    torch.testing.assert_close(row_dots(a, b), (a * b).sum(1))


def test_row_wise_kernels_equal_the_whole_matrix_ops_to_the_bit(monkeypatch):
    monkeypatch.setattr(sparse, "_CPU_ROW_BLOCK_BYTES", 3 * D * 4)  # blocks of 3 rows, 1 left over
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(L, D, generator=gen)
    W[5] = 0.0  # a zero row: the eps guards
    g = torch.randn(L, D, generator=gen)
    sq = torch.linalg.vector_norm(W, dim=1).square().clamp_min(1e-8)
    want_g = g.clone().addcmul_(W, ((g * W).sum(1) / sq).unsqueeze(1), value=-1.0)  # whole matrix
    want_W = W / torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(1e-8)
    got_g, got_W = g.clone(), W.clone()
    sparse.remove_parallel_(got_g, got_W, 1e-8)
    sparse.normalise_rows_(got_W, 1e-8)
    assert torch.equal(got_g, want_g) and torch.equal(got_W, want_W)
    assert torch.allclose((got_g * W).sum(1), torch.zeros(L), atol=1e-5)


def test_buffer_pool_reuses_only_unreferenced_buffers():
    pool = CpuBufferPool(max_per_shape=2)
    a = pool.take((4, 3), torch.float32)
    b = pool.take((4, 3), torch.float32)
    assert a.data_ptr() != b.data_ptr()
    view = a[1:]  # a view keeps the buffer alive
    ptr_a = a.data_ptr()
    del a
    c = pool.take((4, 3), torch.float32)  # both pooled buffers in use, cap reached: a fresh tensor
    assert c.data_ptr() not in (ptr_a, b.data_ptr())
    del view
    assert pool.take((4, 3), torch.float32).data_ptr() == ptr_a
    assert pool.take((4, 3), torch.int64).dtype == torch.int64  # not poolable: plain tensor


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradients_fresh_per_step_and_accumulated_when_kept(set_to_none):
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(L, D, generator=gen, requires_grad=True)
    v = torch.rand(5, 2, 4, generator=gen)
    idx = distinct_ids(5, 4, gen)

    def grad_once() -> torch.Tensor:
        (out,) = sparse_decode(W, [(v, idx)])
        (out**2).sum().backward()
        return W.grad.clone()

    first = grad_once()
    kept = W.grad  # a reference held by the caller must never be overwritten
    snapshot = kept.clone()
    for _ in range(3):
        if set_to_none:
            W.grad = None
        else:
            W.grad.zero_()
        torch.testing.assert_close(grad_once(), first)
    if set_to_none:
        assert torch.equal(kept, snapshot)
    grad_once()  # no reset: accumulates
    torch.testing.assert_close(W.grad, 2 * first)


def test_gather_logits_gradients_match_dense_encoder():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, D, dtype=torch.float64, generator=gen)
    W = torch.randn(L, D, dtype=torch.float64, generator=gen, requires_grad=True)
    b_pre = torch.randn(D, dtype=torch.float64, generator=gen, requires_grad=True)
    b_lat = torch.randn(L, dtype=torch.float64, generator=gen, requires_grad=True)
    idx = torch.cat([distinct_ids(6, 4, gen), distinct_ids(6, 3, gen)], dim=1)  # top-k + aux, may share
    g = torch.randn(6, 7, dtype=torch.float64, generator=gen)
    for x_grad in (False, True):
        for split in (None, 4):
            xx = x.clone().requires_grad_(x_grad)
            with torch.no_grad():
                h = (xx - b_pre) @ W.T + b_lat
            out = gather_logits(h, xx, b_pre, W, b_lat, idx, split=split)
            (out * g).sum().backward()
            got = [t.grad.clone() for t in (W, b_pre, b_lat)] + ([xx.grad.clone()] if x_grad else [])
            for t in (W, b_pre, b_lat):
                t.grad = None
            xr = x.clone().requires_grad_(x_grad)
            ref = ((xr - b_pre) @ W.T + b_lat).gather(1, idx)
            (ref * g).sum().backward()
            torch.testing.assert_close(out, ref)
            want = [t.grad for t in (W, b_pre, b_lat)] + ([xr.grad] if x_grad else [])
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b)
            for t in (W, b_pre, b_lat):
                t.grad = None
