"""What every dataset yields: aligned samples and a label hierarchy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from sparc.data.hierarchy import Hierarchy


@dataclass(frozen=True)
class Sample:
    """One aligned sample: an image file, its caption and its label ids (leaves or inner nodes).

    ``group`` names what samples sharing an image have in common (the image id); samples of one
    group always fall in the same split. Empty = the sample is its own group (its id).
    ``split`` is the dataset's own split where it has one: ``train``, ``val`` or ``test`` as is,
    ``trainval`` for "train or val, never test" (hashed with ``data.val_fraction``); empty = hashed
    into all three (see :func:`sparc.data.prepared.split_of`).
    """

    id: str
    image: Path
    caption: str
    labels: tuple[str, ...]
    group: str = ""
    split: str = ""

    @property
    def group_key(self) -> str:
        """The key the split hashes: the group, or the id when there is none."""
        return self.group or self.id


@dataclass
class DatasetBuild:
    """Result of building a dataset: samples in a fixed order, their hierarchy, skipped rows.

    ``skipped`` lists ``(id, reason)`` for every source item that was left out, so the prepare
    stage can report them; ``info`` is free-form provenance written to the prepared metadata.
    ``annotations`` maps a group (image id) to JSON-able per-image annotations kept with the
    prepared data (``annotations.jsonl``; COCO's instance masks). ``portable_paths``: images
    outside the prepared directory are written relative to it (downloaded data under
    ``data/raw``), so the prepared data moves with the repository.
    """

    samples: list[Sample]
    hierarchy: Hierarchy
    skipped: list[tuple[str, str]] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    annotations: dict[str, dict] = field(default_factory=dict)
    portable_paths: bool = False


class DatasetBuilder(Protocol):
    """A dataset: ``build(options, work_dir)`` renders or locates images and returns the samples.

    ``work_dir`` is an empty directory the builder may write images into (they become part of the
    prepared output); builders that read images in place return absolute paths instead.
    """

    def __call__(self, options: object, work_dir: Path) -> DatasetBuild: ...


def require_package_path(path: Path, dataset: str, package: str, *, directory: bool = False) -> Path:
    """``path`` when it is an existing file (a directory when ``directory``), else a
    ``FileNotFoundError`` naming the dataset and the Debian package that provides it."""
    if not (path.is_dir() if directory else path.is_file()):
        raise FileNotFoundError(
            f"{dataset} dataset: {path} not found; install the Debian package {package!r} "
            f"(apt-get install {package})"
        )
    return path
