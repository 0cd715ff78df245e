"""Datasets: each yields aligned (id, image, caption, labels) samples and a label hierarchy.

``DATASETS`` maps the ``data.dataset`` parameter to ``module:function`` of a
:class:`~sparc.data.base.DatasetBuilder`; modules are imported only when used.
"""

from __future__ import annotations

import importlib

from sparc.data.base import DatasetBuild, Sample
from sparc.data.hierarchy import Hierarchy

DATASETS: dict[str, str] = {
    "emoji": "sparc.data.emoji:build_emoji",
    "clipart": "sparc.data.clipart:build_clipart",
    "folder": "sparc.data.folder:build_folder",
}


def get_builder(name: str):
    """The builder function for dataset ``name``; ValueError naming known datasets otherwise."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (known: {', '.join(sorted(DATASETS))})")
    module, func = DATASETS[name].split(":")
    return getattr(importlib.import_module(module), func)


__all__ = ["DATASETS", "DatasetBuild", "Hierarchy", "Sample", "get_builder"]
