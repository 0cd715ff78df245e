"""The model's accelerator paths against the CPU kernels: sparse kernels, one training step with
fused Adam, and the bf16 / TF32 options (see tests/device.py for ``SPARC_TEST_DEVICE``).

Tolerances. Float32 work summed in another order (``embedding_bag`` or cuBLAS instead of the MKL
CSR / oneDNN kernels) differs by a few units in the last place of each sum: relative ~1e-6 to
1e-5 of the summed magnitudes, so values and gradients are compared with ``rtol = 1e-5`` and an
``atol`` of 1e-5 of the tensor's scale (entries that are sums with cancellation). bf16 keeps 8
significant bits (relative 2^-9 per input) and TF32 11: a loss within 1e-2 (bf16) and 2e-3
(TF32) of float32's.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import sparc.model.sae as sae_module
import sparc.model.sparse as sparse
from sparc.model.matmul import linear
from sparc.model.sae import MultiStreamSAE, SAEConfig
from sparc.model.sparse import CpuBufferPool, gather_logits, sparse_decode
from sparc.train.loop import make_adam
from tests.device import DEVICE, cpu_path, device_path, needs_device, to_device

pytestmark = [needs_device, pytest.mark.kernels]

L, D = 64, 16
CFG = SAEConfig(dims={"a": 24, "b": 16, "c": 12}, L=L, k=4, k_aux=8)
LR = 1e-3


@pytest.fixture(autouse=True)
def csr_reference(monkeypatch):
    """The CPU reference takes the MKL CSR kernel for every ``[L, d]`` gradient (not only large
    ones), so that it differs from the portable path in algorithm, not only in device."""
    monkeypatch.setattr(sparse, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(sparse, "CPU_BUFFERS", CpuBufferPool())


def close(got: Tensor, want: Tensor, rtol: float = 1e-5) -> None:
    """``got`` (any device) equals ``want`` (CPU) within ``rtol`` and 1e-5 of ``want``'s scale."""
    got, want = got.detach(), want.detach()
    assert got.dtype == want.dtype
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=1e-5 * max(scale, 1e-6))


def distinct_ids(n: int, m: int, gen: torch.Generator, below: int = L) -> Tensor:
    """``[n, m]`` latent ids, distinct within a row, all ``< below``."""
    return torch.stack([torch.randperm(below, generator=gen)[:m] for _ in range(n)])


# ----------------------------------------------------------------------------- sparse kernels


def test_sparse_decode_forward_and_backward_on_device_match_cpu() -> None:
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(L, D, generator=gen)
    # 3 sources sharing one index set, and an AuxK-like group; latents from 48 on are never used
    v0, i0 = torch.rand(24, 3, 5, generator=gen), distinct_ids(24, 5, gen, below=48)
    v1, i1 = torch.rand(24, 1, 8, generator=gen), distinct_ids(24, 8, gen, below=48)
    g0, g1 = torch.randn(24, 3, D, generator=gen), torch.randn(24, 1, D, generator=gen)

    def run(device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
        w, a, b = (t.to(device, copy=True).requires_grad_() for t in (W, v0, v1))
        o0, o1 = sparse_decode(w, [(a, i0.to(device)), (b, i1.to(device))])
        ((o0 * g0.to(device)).sum() + (o1 * g1.to(device)).sum()).backward()
        return [o0, o1], [w.grad, a.grad, b.grad]

    with cpu_path():
        want_out, want_grad = run(torch.device("cpu"))
    with device_path():
        got_out, got_grad = run(DEVICE)
    for got, want in zip(got_out + got_grad, want_out + want_grad, strict=True):
        assert got.device.type == DEVICE.type
        close(got, want)
    assert float(got_grad[0][48:].abs().max()) == 0.0  # rows no code touches: exact zeros


@pytest.mark.parametrize("x_grad", [False, True], ids=["params", "params-and-input"])
def test_gather_logits_forward_and_backward_on_device_match_cpu(x_grad: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x, b_pre = torch.randn(24, D, generator=gen), 0.1 * torch.randn(D, generator=gen)
    W, b_lat = torch.randn(L, D, generator=gen) / 4, 0.1 * torch.randn(L, generator=gen)
    h = (x - b_pre) @ W.T + b_lat
    idx = torch.cat([h.topk(4, dim=1).indices, distinct_ids(24, 6, gen)], dim=1)  # top-k + AuxK (may overlap)
    g = torch.randn(24, 10, generator=gen)

    def run(device: torch.device) -> list[Tensor]:
        xs, bp, w, bl = (t.to(device, copy=True).requires_grad_() for t in (x, b_pre, W, b_lat))
        xs.requires_grad_(x_grad)
        with torch.no_grad():
            logits = linear(xs - bp, w, bl)
        out = gather_logits(logits, xs, bp, w, bl, idx.to(device), split=4)
        (out * g.to(device)).sum().backward()
        return [out, bp.grad, w.grad, bl.grad] + ([xs.grad] if x_grad else [])

    with cpu_path():
        want = run(torch.device("cpu"))
    with device_path():
        got = run(DEVICE)
    for a, b in zip(got, want, strict=True):
        assert a.device.type == DEVICE.type
        close(a, b)


# ----------------------------------------------------------------------------- one training step


def batch(seed: int = 0, n: int = 32) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Raw features ``[n, d_s]`` and dead masks (every third latent, a different third per stream)."""
    gen = torch.Generator().manual_seed(seed)
    x = {s: torch.randn(n, d, generator=gen) for s, d in CFG.dims.items()}
    dead = {s: torch.arange(L) % 3 == i for i, s in enumerate(CFG.dims)}
    return x, dead


def selection_gaps(model: MultiStreamSAE, x: dict[str, Tensor], dead: dict[str, Tensor]) -> float:
    """Smallest gap, over the samples, between the k-th and (k+1)-th logit of every selection the
    step makes (Global TopK of the summed logits, AuxK among each stream's dead latents)."""
    with torch.no_grad():
        h = model.logits(x)
    k, k_aux = CFG.k, CFG.k_aux
    top = sum(h.values()).topk(k + 1, dim=1).values
    gaps = [top[:, k - 1] - top[:, k]]
    for s, v in h.items():
        aux = v.masked_fill(~dead[s], float("-inf")).topk(k_aux + 1, dim=1).values
        gaps.append(aux[:, k_aux - 1] - aux[:, k_aux])
    return float(torch.cat(gaps).min())


def train_step(model: MultiStreamSAE, x: dict[str, Tensor], dead: dict[str, Tensor]) -> tuple[Tensor, dict, torch.optim.Adam]:
    """The trainer's step (sparc.train.loop, steps 3-5): loss, backward, projected decoder
    gradient, Adam (make_adam), unit decoder rows. Returns (loss, gradients after projection, optimizer)."""
    opt = make_adam(model.parameters(), lr=LR, eps=1e-8)
    out = model.loss(x, 1.0, dead=dead)
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    model.remove_parallel_grad()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    model.normalise_decoder()
    return out.total.detach(), grads, opt


def test_training_step_with_fused_adam_on_device_matches_cpu() -> None:
    x, dead = batch()
    with cpu_path():
        ref = MultiStreamSAE(CFG, seed=0)
        # both sides must choose the same latents: no near-tie at any selection boundary
        assert selection_gaps(ref, x, dead) > 1e-4
        want_loss, want_grads, _ = train_step(ref, x, dead)
    with device_path():
        model = MultiStreamSAE(CFG, seed=0).to(DEVICE)
        loss, grads, opt = train_step(model, to_device(x), to_device(dead))
    assert opt.param_groups[0]["fused"] is True  # the fused kernel exists for this device
    for p, st in opt.state.items():
        assert all(t.device == p.device for t in st.values())  # fused Adam keeps its step there too
    close(loss, want_loss)
    for name, p in model.named_parameters():
        close(grads[name], want_grads[name], rtol=1e-4)
        # Adam's first step moves an entry by lr * g / (|g| + eps): +-lr wherever |g| is well
        # above eps and the gradients' tolerance; where g is within rounding of 0 its sign is not
        # defined by float32, and one step moves the entry by at most lr
        g = want_grads[name]
        sure = g.abs() > 1e-5 * float(g.abs().max()) + 1e-7
        got, want = p.detach().cpu(), dict(ref.named_parameters())[name].detach()
        torch.testing.assert_close(got[sure], want[sure], rtol=1e-5, atol=1e-6)
        assert float((got - want).abs().max()) <= LR * 1.01
    assert all(p.device.type == DEVICE.type for p in model.parameters())
    norms = torch.linalg.vector_norm(model.W_dec["a"].detach(), dim=1)
    torch.testing.assert_close(norms.cpu(), torch.ones(L), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- bf16 and TF32


def test_bf16_and_tf32_run_on_device_close_to_float32(monkeypatch) -> None:
    x, dead = to_device(batch()[0]), to_device(batch()[1])
    with device_path():
        base = MultiStreamSAE(CFG, seed=0).to(DEVICE).loss(x, 1.0, dead=dead).total.detach()
        matmul = torch.backends.cuda.matmul
        before = matmul.fp32_precision
        seen: list[tuple[str, object]] = []
        real_linear, real_F_linear = sae_module.linear, torch.nn.functional.linear

        def spy_linear(*args, **kwargs):  # the float32 encoder matmul: which precision is allowed
            seen.append(("linear", matmul.fp32_precision))
            return real_linear(*args, **kwargs)

        def spy_F_linear(inp, weight, *args, **kwargs):  # the bf16 encoder matmul: its inputs
            seen.append(("F.linear", (inp.dtype, weight.dtype)))
            return real_F_linear(inp, weight, *args, **kwargs)

        monkeypatch.setattr(sae_module, "linear", spy_linear)
        monkeypatch.setattr(torch.nn.functional, "linear", spy_F_linear)
        for option, tol in (("bf16", 1e-2), ("tf32", 2e-3)):
            seen.clear()
            model = MultiStreamSAE(CFG, seed=0, **{option: True}).to(DEVICE)
            loss, _, _ = train_step(model, x, dead)
            assert abs(float(loss) - float(base)) <= tol * float(base), option
            assert all(torch.isfinite(p).all() for p in model.parameters())
            if option == "bf16":
                assert seen and all(v == (torch.bfloat16, torch.bfloat16) for kind, v in seen if kind == "F.linear")
                assert not [v for kind, v in seen if kind == "linear"]
            else:  # TF32 only inside the encoder matmul on CUDA, the setting restored afterwards
                want = "tf32" if DEVICE.type == "cuda" else before
                assert [v for kind, v in seen if kind == "linear"] == [want] * len(CFG.dims)
                assert matmul.fp32_precision == before
