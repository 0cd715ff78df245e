"""Compiled CPU kernels: ``numba.njit`` with its machine code cached outside the source tree.

Kernels of the project (the retrieval counts, :mod:`sparc.evaluate.retrieval`; the fused training
step, :mod:`sparc.train.fused`) are compiled on first use and cached in :func:`kernel_cache_dir`,
so later processes load them in a fraction of a second.
"""

from __future__ import annotations

import os
import tempfile

import numba


def kernel_cache_dir() -> str | None:
    """Where the compiled kernels are cached: ``$NUMBA_CACHE_DIR`` when set, else
    ``$XDG_CACHE_HOME/sparc/numba`` (``~/.cache/sparc/numba``); None when it cannot be written.
    Never numba's default ``__pycache__`` beside the source: ``src/sparc`` folders are dependencies
    of DVC stages (dvc.yaml), whose hashes would change with the files written there."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = numba.config.CACHE_DIR or os.path.join(base, "sparc", "numba")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return None
    return path


def jit(**options):
    """``numba.njit(**options)``, its machine code cached in :func:`kernel_cache_dir` (compiled
    again by each process where that is None)."""

    def wrap(fn):
        cache_dir = kernel_cache_dir()
        if cache_dir is None:
            return numba.njit(**options)(fn)
        previous = numba.config.CACHE_DIR  # numba picks the cache location when decorating
        numba.config.CACHE_DIR = cache_dir
        try:
            return numba.njit(cache=True, **options)(fn)
        finally:
            numba.config.CACHE_DIR = previous

    return wrap
