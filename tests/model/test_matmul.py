"""The encoder matmul: oneDNN on CPU without autograd, F.linear otherwise, same numbers."""

import pytest
import torch
import torch.nn.functional as F

import sparc.model.sparse as sparse
from sparc.model.matmul import linear

pytestmark = pytest.mark.kernels  # run again under other CPU kernels (Makefile test-kernels)


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_linear_matches_f_linear(cpu_kernels, monkeypatch):
    monkeypatch.setattr(sparse, "CPU_KERNELS", cpu_kernels)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 24, generator=gen)
    W = torch.nn.Parameter(torch.randn(96, 24, generator=gen))
    b = torch.nn.Parameter(torch.randn(96, generator=gen))
    ref = F.linear(x, W, b).detach()
    with torch.no_grad():
        torch.testing.assert_close(linear(x, W, b), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x[:, ::2].contiguous(), W[:, ::2].contiguous()), F.linear(x[:, ::2], W[:, ::2]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x.double(), W.double()), F.linear(x.double(), W.double()))
    out = linear(x, W, b)  # a graph is needed: F.linear, gradients flow
    out.sum().backward()
    torch.testing.assert_close(W.grad, x.sum(0).expand(96, 24))
    torch.testing.assert_close(b.grad, torch.full((96,), 37.0))
