"""Localisation queries: (image, text, ground-truth mask) pairs from one of two sources.

The `localise` stage scores one heat map per pair and image stream; which pairs it scores is
``localise.source`` (:func:`sparc.params.localise_source`: ``auto`` is ``masks`` on a dataset
with instance masks, coco, and ``composite`` otherwise):

* ``composite`` (:func:`composite_queries`): ``localise.queries`` canvases of
  :mod:`sparc.localise.composite` built from the rows of ``localise.split``; one pair per canvas,
  the text is the caption of the queried item and its feature the caption stream's stored feature
  of that item's row; the mask is the item's box on the canvas.
* ``masks`` (:func:`mask_queries`, method.md section 4: COCO val2017, one pair per image and
  present class): the images of ``localise.split`` (an image's first row stands for it), of which
  ``localise.queries`` spread evenly in row order (:func:`sparc.data.prepared.spread_subset`; 0 =
  every image); one pair per category present in the image (its instances, crowd regions
  included, in category id order; an image without instances gives none); the mask is
  :func:`sparc.data.coco.category_mask`, the union of the category's instances at the image's
  size; the text is ``localise.prompt.format(category)`` and its feature the caption stream's
  model run on that text (once per category, :func:`sparc.features.registry.caption_embedder`), rounded to float16 as the
  feature store keeps the stored caption features.

Either builder returns the pairs and, per caption stream asked for, the text features ``[P, d]``
(float32, row i = pair i), so the stage runs one loop over generic pairs. Masks and images of the ``masks`` source are decoded when
used (:meth:`QueryPair.load_image`, :meth:`QueryPair.load_mask`), so a whole val2017 (about 15,000
pairs of 640 x 480 images) never sits in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from sparc.data.prepared import PreparedData, spread_subset
from sparc.localise.composite import build_composites
from sparc.params import LocaliseParams

Embed = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class QueryPair:
    """One localisation query.

    ``text``: the query text (an item's caption, or the prompt); ``labels``: the classes it names
    (the ``concept`` target's latents); ``row``: the prepared row of the image (composite: of the
    queried item); ``image``: the RGB image or its file; ``mask``: the ``[H, W]`` bool ground truth
    at the image's size, or a function returning it; ``ids``: the pair's columns in ``pairs.csv``
    (composite: ``item_row``, ``caption``; masks: ``image``, ``category``, ``prompt``).
    """

    text: str
    labels: tuple[str, ...]
    row: int
    image: Image.Image | Path
    mask: np.ndarray | Callable[[], np.ndarray]
    ids: Mapping[str, object]

    def load_image(self) -> Image.Image:
        """The RGB image (opened now when the pair holds its file)."""
        if isinstance(self.image, Image.Image):
            return self.image
        with Image.open(self.image) as im:
            return im.convert("RGB")

    def load_mask(self) -> np.ndarray:
        """The ``[H, W]`` bool ground-truth mask (decoded now when the pair holds a function)."""
        return np.asarray(self.mask() if callable(self.mask) else self.mask, dtype=bool)


def query_pool(prepared: PreparedData, split: str) -> np.ndarray:
    """Row indices of ``split`` (``all``: every row), ascending."""
    return np.arange(len(prepared)) if split == "all" else prepared.indices(split)


def composite_queries(prepared: PreparedData, lp: LocaliseParams, caption_features: Mapping[str, np.ndarray],
                      ) -> tuple[list[QueryPair], dict[str, np.ndarray]]:
    """The composite source (module docstring): pairs and, per caption stream of
    ``caption_features`` (stream -> stored features ``[N, d]``), the text features ``[P, d]`` (the
    queried items' rows, as float32)."""
    composites = build_composites(query_pool(prepared, lp.split), prepared.images, prepared.captions,
                                  prepared.labels, lp.queries, lp.grid, lp.cell, lp.scale, lp.seed)
    pairs = [
        QueryPair(prepared.captions[c.query_row], prepared.labels[c.query_row], c.query_row, c.image,
                  c.query_mask, {"item_row": c.query_row, "caption": prepared.captions[c.query_row]})
        for c in composites
    ]
    rows = [p.row for p in pairs]
    return pairs, {s: np.asarray(f[rows], dtype=np.float32) for s, f in caption_features.items()}


def present_categories(image_annotations: Mapping) -> list[str]:
    """Distinct categories of an image's instances, in category id order."""
    found = {(int(i["category_id"]), str(i["category"])) for i in image_annotations.get("instances", [])}
    return [name for _, name in sorted(found)]


def image_rows(prepared: PreparedData, split: str, n_images: int) -> np.ndarray:
    """The first row of each image of ``split``, ``n_images`` of them spread evenly (0 = all)."""
    firsts = prepared.one_per_group(query_pool(prepared, split))
    return firsts[spread_subset(len(firsts), n_images)]


def _sized_mask(image_annotations: Mapping, category: str, path: Path) -> np.ndarray:
    """:func:`sparc.data.coco.category_mask`, checked against the image file's size."""
    from sparc.data.coco import category_mask

    size = (int(image_annotations["width"]), int(image_annotations["height"]))
    with Image.open(path) as im:
        if im.size != size:
            raise ValueError(f"{path}: the image is {im.size[0]} x {im.size[1]} but its annotations say "
                             f"{size[0]} x {size[1]}")
    return category_mask(image_annotations, category)


def mask_queries(prepared: PreparedData, annotations: Mapping[str, Mapping], lp: LocaliseParams,
                 embedders: Mapping[str, Embed]) -> tuple[list[QueryPair], dict[str, np.ndarray]]:
    """The masks source (module docstring): pairs and, per caption stream of ``embedders``
    (stream -> a function mapping texts to features ``[n, d]``, called once with each distinct
    prompt once), the text features ``[P, d]``. ``annotations`` is
    :func:`sparc.data.prepared.load_annotations`. ValueError when the dataset has no annotations
    or the images give no pair."""
    if not annotations:
        raise ValueError(f"localise: {prepared.root} has no instance annotations (annotations.jsonl); "
                         "localise.source masks needs them (re-run `dvc repro prepare` on coco)")
    pairs: list[QueryPair] = []
    rows = image_rows(prepared, lp.split, lp.queries)
    for row in rows:
        group = prepared.groups[int(row)]
        if group not in annotations:
            raise ValueError(f"localise: image {group} of {prepared.root} has no entry in annotations.jsonl")
        ann = annotations[group]
        path = prepared.images[int(row)]
        for category in present_categories(ann):
            text = lp.prompt.format(category)
            pairs.append(QueryPair(text, (category,), int(row), path, partial(_sized_mask, ann, category, path),
                                   {"image": group, "category": category, "prompt": text}))
    if not pairs:
        raise ValueError(f"localise: the {len(rows)} images of split {lp.split} hold no annotated instance")
    prompts = list(dict.fromkeys(p.text for p in pairs))
    index = {t: i for i, t in enumerate(prompts)}
    order = [index[p.text] for p in pairs]
    out = {}
    for stream, embed in embedders.items():
        feats = np.asarray(embed(prompts), dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] != len(prompts):
            raise ValueError(f"localise: stream {stream} gave features {feats.shape} for {len(prompts)} prompts")
        out[stream] = feats[order]
    return pairs, out
