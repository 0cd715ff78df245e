"""The `localise` stage: text-guided localisation on composite canvases with known masks.

For each of ``localise.queries`` canvases (:mod:`sparc.evaluate.composite`; items from
``localise.split``), the query is the caption of one item. Its text code ``z_t`` is the trained
SAE's code of the caption stream's stored feature of that item (the stream encoded alone, i.e.
per-stream inference). For every image stream with a heat-map method
(:mod:`sparc.evaluate.heatmaps`) the canvas goes through the stream's model with gradients, the
SAE encodes the stream's feature alone (``z_i``), and the target is

* ``code``: ``<z_t, z_i>`` (dense dot product over the L latents), or
* ``concept``: ``sum_l z_i[l]`` over the latents the concepts stage named after the query item's
  label(s) for that stream (per-stream table); pairs without such a latent get an all-zero map.

The heat map (rollout for ViTs, Grad-CAM for CNNs) is put back onto the canvas, binarised with
Otsu and scored against the query item's mask: AP at IoU 0.2 (pairs ranked by the target value),
mIoU and the hit rate. The chance baseline is a centred Gaussian map (equal scores).

Outputs (``reports/localise``): ``metrics.json`` (DVC metrics: ``ap_<stream>``, ``miou_<stream>``,
``ap_chance``, ``miou_chance``), ``details.json`` (hit rates, counts, parameters), ``pairs.csv``
(one row per query and stream) and ``overlays.png`` (heat maps of the first ``localise.overlays``
queries).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparc import paths
from sparc.data.prepared import load_prepared
from sparc.evaluate.composite import Composite, build_composites
from sparc.evaluate.heatmaps import SUPPORTED, build_localiser
from sparc.evaluate.localise import gaussian_map, place_map, score_pairs
from sparc.features.registry import parse_spec
from sparc.params import Params, check_localise

IOU_THRESHOLD = 0.2
OUT_DIR = "localise"
CHANCE = "chance"


def localise_dir() -> Path:
    """``reports/localise``."""
    return paths.REPORTS / OUT_DIR


def image_streams(params: Params) -> list[str]:
    """Image streams whose model family has a heat-map method, in params order."""
    return [s for s, p in params.streams.items() if p.input == "image" and parse_spec(p.model).family in SUPPORTED]


def text_stream(params: Params) -> str:
    """The first caption stream (ValueError when there is none)."""
    for s, p in params.streams.items():
        if p.input == "caption":
            return s
    raise ValueError("localise: no caption stream in params.yaml streams (the query needs a text stream)")


def dense_code(model, stream: str, x: torch.Tensor) -> torch.Tensor:
    """``[1, L]`` dense code of ``x [1, d]`` with the stream encoded alone (differentiable)."""
    code = model.encode({stream: x}, mode="local")[stream]
    dense = torch.zeros(x.shape[0], model.cfg.L, dtype=code.values.dtype)
    return dense.scatter(1, code.indices, code.values)


def named_latents(concepts_dir: Path, stream: str) -> dict[str, list[int]]:
    """label -> latents the per-stream concepts table names after it for ``stream``."""
    path = concepts_dir / "concepts_per_stream.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (run `dvc repro concepts`); localise.target=concept needs it")
    out: dict[str, list[int]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get(f"{stream}_name"):
                out.setdefault(row[f"{stream}_label"], []).append(int(row["latent"]))
    return out


def run_localise(
    params: Params, *, sae_dir: str | Path | None = None, features_root: str | Path | None = None,
    prepared_dir: str | Path | None = None, concepts_dir: str | Path | None = None,
    out_dir: str | Path | None = None, progress: bool = True,
) -> Path:
    """Run the stage (module docstring); returns ``out_dir`` (default ``reports/localise``)."""
    from sparc.evaluate.stage import _load_features, _load_model

    lp = params.localise
    check_localise(lp)
    dataset = params.data.dataset
    prepared = load_prepared(prepared_dir or paths.prepared_dir(dataset))
    model = _load_model(params, Path(sae_dir or paths.sae_dir()), "cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    features = _load_features(params, Path(features_root or paths.features_root(dataset)), prepared)
    text = text_stream(params)
    streams = image_streams(params)
    if not streams:
        raise ValueError(f"localise: no image stream has a heat-map method (supported: {', '.join(SUPPORTED)})")
    pool = np.arange(len(prepared)) if lp.split == "all" else prepared.indices(lp.split)
    composites = build_composites(pool, prepared.images, prepared.captions, prepared.labels,
                                  lp.queries, lp.grid, lp.cell, lp.scale, lp.seed)
    with torch.no_grad():
        rows = [c.query_row for c in composites]
        x_text = torch.from_numpy(np.asarray(features[text].features[rows], dtype=np.float32)) if rows else None
        z_text = dense_code(model, text, x_text) if rows else torch.zeros(0, model.cfg.L)

    side = lp.grid * lp.cell
    results: dict[str, dict] = {}
    maps: dict[str, list[np.ndarray]] = {}
    values: dict[str, list[float]] = {}
    for s in streams:
        named = named_latents(Path(concepts_dir or paths.concepts_dir()), s) if lp.target == "concept" else {}
        localiser = build_localiser(params.streams[s].model, lp.layers)
        maps[s], values[s] = [], []
        for i, comp in enumerate(tqdm(composites, desc=f"localise {s}", disable=not progress)):
            target = _target(model, s, z_text[i], comp, prepared.labels, named, lp.target)
            x = localiser.preprocess(comp.image).unsqueeze(0)
            heat, value = localiser.heat(x, target)
            maps[s].append(place_map(heat, localiser.view_box(side, side), (side, side)))
            values[s].append(value)
        results[s] = score_pairs(maps[s], [c.query_mask for c in composites], values[s], IOU_THRESHOLD)
    chance = gaussian_map(side, side)
    results[CHANCE] = score_pairs([chance] * len(composites), [c.query_mask for c in composites],
                                  [0.0] * len(composites), IOU_THRESHOLD)
    out = Path(out_dir or localise_dir())
    out.mkdir(parents=True, exist_ok=True)
    _write_outputs(out, params, composites, prepared.captions, results, values, text)
    if lp.overlays and composites:
        from sparc.report.figures import save_png
        from sparc.report.localise_figure import overlay_figure

        shown = composites[: lp.overlays]
        panels = {s: maps[s][: len(shown)] for s in streams}
        panels[CHANCE] = [chance] * len(shown)
        ious = {k: results[k]["ious"][: len(shown)] for k in panels}
        fig = overlay_figure(shown, [prepared.captions[c.query_row] for c in shown], panels, ious)
        save_png(fig, out / "overlays.png")
    return out


def _target(model, stream, z_text, comp: Composite, labels, named: dict[str, list[int]], kind: str):
    """The scalar target of one query as a function of the image feature ``[1, d]``."""
    if kind == "code":
        return lambda feat: (dense_code(model, stream, feat)[0] * z_text).sum()
    latents = sorted({lat for lab in labels[comp.query_row] for lat in named.get(lab, [])})
    index = torch.as_tensor(latents, dtype=torch.long)
    return lambda feat: dense_code(model, stream, feat)[0, index].sum()


def _write_outputs(out: Path, params: Params, composites, captions, results: dict, values: dict, text: str) -> None:
    """metrics.json (flat DVC metrics), details.json and pairs.csv."""
    metrics = {}
    for key, r in results.items():
        metrics[f"ap_{key}"] = round(r["ap"], 6)
        metrics[f"miou_{key}"] = round(r["miou"], 6)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    details = {
        "iou_threshold": IOU_THRESHOLD,
        "text_stream": text,
        "n_queries": len(composites),
        "canvas_px": params.localise.grid * params.localise.cell,
        "params": {k: getattr(params.localise, k) for k in params.localise.__dataclass_fields__},
        "results": {k: {m: round(v, 6) if isinstance(v, float) else v for m, v in r.items() if m != "ious"}
                    for k, r in results.items()},
        # pairs whose target is 0 (no latent shared by the text and image codes): their map is empty
        "zero_target": {k: int(sum(v == 0.0 for v in vals)) for k, vals in values.items()},
    }
    (out / "details.json").write_text(json.dumps(details, indent=2) + "\n")
    with (out / "pairs.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["query", "item_row", "caption", "method", "iou", "target"])
        for key, r in results.items():
            for i, comp in enumerate(composites):
                score = values[key][i] if key in values else ""
                writer.writerow([i, comp.query_row, captions[comp.query_row], key, f"{r['ious'][i]:.6f}",
                                 f"{score:.6g}" if score != "" else ""])
