"""The one dense operation of the SAE: the encoder matmul ``x W^T + b`` (``[B, d] x [L, d]``).

On CPU, without autograd and in float32, it runs through oneDNN (``torch.ops.mkldnn.
_linear_pointwise``, the kernel PyTorch's compiler uses for CPU linears, reading the plain
``[L, d]`` weight directly): on the AVX-512 AMD CPU of the benchmark it is 2-3x faster than the
MKL ``sgemm`` behind ``F.linear`` (MKL does not use AVX-512 on AMD), with float32 accuracy
(relative difference ~1e-6). Everywhere else, and if that operator is missing, ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sparc.model import sparse


def _onednn_ok(x: Tensor, W: Tensor, b: Tensor | None) -> bool:
    if not (sparse.cpu_path(W) and x.dtype == W.dtype == torch.float32 and torch.backends.mkldnn.is_available()):
        return False
    if b is not None and b.dtype != torch.float32:
        return False
    needs_graph = torch.is_grad_enabled() and (x.requires_grad or W.requires_grad or (b is not None and b.requires_grad))
    return not needs_graph and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """``x @ W.T + b``: ``x [B, d]``, ``W [L, d]``, ``b [L]`` -> ``[B, L]`` (see module docstring)."""
    if _onednn_ok(x, W, b):
        try:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), W, b, "none", [], "")
        except RuntimeError:  # operator signature changed in another torch version
            pass
    return F.linear(x, W, b)
