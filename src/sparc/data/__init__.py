"""Datasets: each yields aligned (id, image, caption, labels) samples and a label hierarchy.

``DATASETS`` maps the ``data.dataset`` parameter to ``module:function`` of a
:class:`~sparc.data.base.DatasetBuilder`; ``DOWNLOADS`` maps the datasets the `download` stage
fetches to their downloader (``(options, raw_dir, base_url=, workers=) -> manifest path``, see
:mod:`sparc.data.download`). Modules are imported only when used.
"""

from __future__ import annotations

import importlib

from sparc.data.base import DatasetBuild, Sample
from sparc.data.hierarchy import Hierarchy

DATASETS: dict[str, str] = {
    "emoji": "sparc.data.emoji:build_emoji",
    "clipart": "sparc.data.clipart:build_clipart",
    "folder": "sparc.data.folder:build_folder",
    "openimages": "sparc.data.openimages:build_openimages",
    "coco": "sparc.data.coco:build_coco",
}

DOWNLOADS: dict[str, str] = {
    "openimages": "sparc.data.openimages:download_openimages",
    "coco": "sparc.data.coco:download_coco",
}


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
