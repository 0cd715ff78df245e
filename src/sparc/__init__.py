"""SPARC: concept-aligned sparse autoencoders across models and modalities.

``sparc.load_run(path)`` loads a trained run for notebooks (:mod:`sparc.api`); it is imported on
first use, so ``import sparc`` stays cheap (no torch).
"""

__version__ = "0.1.0"

__all__ = ["Run", "__version__", "load_run"]

_LAZY = {"load_run": "sparc.api", "Run": "sparc.api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
