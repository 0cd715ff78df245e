"""The device of the accelerator-path tests (``tests/*/test_cuda.py``).

``SPARC_TEST_DEVICE`` names it (default: ``cuda`` where CUDA is present, else ``cpu``). Where it
names a CUDA device and CUDA is absent, every test of those modules is skipped (``needs_device``).

On the CPU (the default of a CPU-only machine, so CI runs them) they still compare two code paths: the
"device" side (:func:`device_path`) runs with ``sparse.CPU_KERNELS = False``, the portable
kernels that an accelerator runs (``embedding_bag`` scatters, gathered-row ``bmm`` dots, one block
of rows, ``F.linear``, the masked AuxK selection), and the reference side (:func:`cpu_path`) with
the CPU kernels (MKL CSR products, ``sampled_addmm``, oneDNN, row blocks) on CPU tensors. That
checks the tests' own logic, and the accelerator code path, without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

import sparc.model.sparse as sparse

DEVICE = torch.device(os.environ.get("SPARC_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
needs_device = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(),
    reason=f"SPARC_TEST_DEVICE={DEVICE} but CUDA is not available (SPARC_TEST_DEVICE=cpu runs these on the CPU)",
)


@contextmanager
def _kernels(cpu: bool) -> Iterator[None]:
    before = sparse.CPU_KERNELS
    sparse.CPU_KERNELS = cpu
    try:
        yield
    finally:
        sparse.CPU_KERNELS = before


def device_path():
    """Run the block as it runs on ``DEVICE``: there with its own kernels; on the CPU with the
    portable kernels of the accelerators (``CPU_KERNELS`` off)."""
    return _kernels(False)


def cpu_path():
    """Run the block with the CPU kernels (the reference side of every comparison)."""
    return _kernels(True)


def to_device(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` copied to ``DEVICE``."""
    return {k: v.to(DEVICE) for k, v in tensors.items()}
