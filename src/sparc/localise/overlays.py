"""The overlay data of the `localise` stage (``reports/localise/overlays.npz``): its writer and reader.

The `localise` stage stores the overlay data of its first ``localise.overlays`` queries
(:func:`write_overlays`; :func:`read_overlays` reads it back; the figures and browser stages draw
it with :mod:`sparc.report.localise_figure`), a zip of ``.npy`` arrays (``np.load`` opens it)
with, for query ``i`` and method ``j`` (the ``j``-th name of ``methods``)::

    index         0-d str   JSON {"version", "methods": [names], "queries": [texts], "iou_threshold"}
    image_<i>     uint8     [H_i, W_i, 3]  the image the query was asked of (sizes may differ per query)
    mask_<i>      bool      [H_i, W_i]     its ground-truth mask
    heat_<i>_<j>  float16   [H_i, W_i]     method j's heat map placed on the image, scaled to [0, 1]
                                           ((h - min) / (max - min), so float16 neither under- nor overflows)
    iou           float64   [Q, M]         the IoU the stage scored (from the full-precision map)

The zip entries carry a fixed date, so the same overlays give the same bytes. :data:`CHANCE` is
the chance baseline's method name (the stage's centred Gaussian map; the figures draw it apart).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparc.localise.maps import normalise_map
from sparc.npz import save_npz

FORMAT_VERSION = 1
CHANCE = "chance"  # the chance baseline's method name


@dataclass(frozen=True)
class OverlayQuery:
    """One query of the overlay data: ``image`` uint8 ``[H, W, 3]``, ``mask`` bool ``[H, W]``,
    per method its heat map ``[H, W]`` (placed on the image) and its scored IoU."""

    text: str
    image: np.ndarray
    mask: np.ndarray
    heats: Mapping[str, np.ndarray]
    ious: Mapping[str, float]


@dataclass(frozen=True)
class Overlays:
    """The contents of ``overlays.npz``: ``methods`` in panel order, the queries (heat maps read
    back as float32 in [0, 1]), and the IoU threshold of the stage's AP."""

    methods: list[str]
    queries: list[OverlayQuery]
    iou_threshold: float


def _checked(q: OverlayQuery, i: int, methods: Sequence[str]) -> OverlayQuery:
    """``q`` with its arrays converted and checked against each other (ValueError naming the problem)."""
    image = np.asarray(q.image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"overlays: query {i}: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    hw = image.shape[:2]
    mask = np.asarray(q.mask, dtype=bool)
    if mask.shape != hw:
        raise ValueError(f"overlays: query {i}: mask {mask.shape} does not match the image {hw}")
    if list(q.heats) != list(methods) or set(q.ious) != set(methods):
        raise ValueError(f"overlays: query {i}: heat maps / IoUs of {sorted(q.heats)} / {sorted(q.ious)}, "
                         f"expected the methods {list(methods)}")
    heats = {}
    for m in methods:
        heat = np.asarray(q.heats[m])
        if heat.shape != hw:
            raise ValueError(f"overlays: query {i}: heat map of {m} is {heat.shape}, the image {hw}")
        heats[m] = heat
    return OverlayQuery(str(q.text), image, mask, heats, {m: float(q.ious[m]) for m in methods})


def write_overlays(path: str | Path, methods: Sequence[str], queries: Sequence[OverlayQuery],
                   iou_threshold: float) -> Path:
    """Write ``overlays.npz`` (module docstring) atomically (``<path>.tmp`` then rename); every
    query must have a heat map and an IoU for each of ``methods``. Returns ``path``."""
    methods = [str(m) for m in methods]
    if len(set(methods)) != len(methods):
        raise ValueError(f"overlays: duplicate method names in {methods}")
    checked = [_checked(q, i, methods) for i, q in enumerate(queries)]
    index = {"version": FORMAT_VERSION, "methods": methods, "queries": [q.text for q in checked],
             "iou_threshold": float(iou_threshold)}
    arrays: dict[str, np.ndarray] = {"index": np.array(json.dumps(index, ensure_ascii=False))}
    for i, q in enumerate(checked):
        arrays[f"image_{i}"] = q.image
        arrays[f"mask_{i}"] = q.mask
        for j, m in enumerate(methods):
            arrays[f"heat_{i}_{j}"] = normalise_map(q.heats[m]).astype(np.float16)
    arrays["iou"] = np.array([[q.ious[m] for m in methods] for q in checked], dtype=np.float64).reshape(
        len(checked), len(methods))
    return save_npz(path, arrays, compress=True)


def read_overlays(path: str | Path) -> Overlays:
    """The overlay data of ``path`` (FileNotFoundError when missing, ValueError when it is not a
    complete overlays file of this version)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (run `dvc repro localise`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        index = json.loads(str(arrays["index"][()]))
        methods, texts = list(index["methods"]), list(index["queries"])
        version, threshold = index["version"], float(index["iou_threshold"])
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable overlays file ({type(err).__name__}: {err}); "
                         "run `dvc repro localise`") from None
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: overlays format version {version}, this code reads {FORMAT_VERSION}; "
                         "run `dvc repro localise`")
    ious = arrays.get("iou")
    if ious is None or ious.shape != (len(texts), len(methods)):
        raise ValueError(f"{path}: iou array {None if ious is None else ious.shape}, expected "
                         f"({len(texts)}, {len(methods)})")
    queries = []
    for i, text in enumerate(texts):
        keys = [f"image_{i}", f"mask_{i}", *(f"heat_{i}_{j}" for j in range(len(methods)))]
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise ValueError(f"{path}: arrays {missing} are missing")
        q = OverlayQuery(text, arrays[f"image_{i}"], arrays[f"mask_{i}"],
                         {m: arrays[f"heat_{i}_{j}"].astype(np.float32) for j, m in enumerate(methods)},
                         {m: float(ious[i, j]) for j, m in enumerate(methods)})
        try:
            queries.append(_checked(q, i, methods))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return Overlays(methods, queries, threshold)
