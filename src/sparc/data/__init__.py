"""Datasets: each yields aligned (id, image, caption, labels) samples and a label hierarchy.

``DATASETS`` and ``DOWNLOADS`` (:mod:`sparc.catalog`) name each dataset's builder and downloader;
:func:`get_builder` and :func:`get_downloader` import them when used.
"""

from __future__ import annotations

import importlib

from sparc.catalog import DATASETS, DOWNLOADS
from sparc.data.base import DatasetBuild, Sample
from sparc.data.hierarchy import Hierarchy


def get_builder(name: str):
    """The builder function for dataset ``name``; ValueError naming known datasets otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (known: {', '.join(sorted(DATASETS))})")
    module, func = DATASETS[name].split(":")
    return getattr(importlib.import_module(module), func)


def get_downloader(name: str):
    """The downloader of dataset ``name``, or None when it has nothing to download."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (known: {', '.join(sorted(DATASETS))})")
    if name not in DOWNLOADS:
        return None
    module, func = DOWNLOADS[name].split(":")
    return getattr(importlib.import_module(module), func)


__all__ = ["DATASETS", "DOWNLOADS", "DatasetBuild", "Hierarchy", "Sample", "get_builder", "get_downloader"]
