"""The `localise` stage: text-guided localisation, (image, text, mask) pairs scored per image stream.

The pairs come from ``localise.source`` (:mod:`sparc.localise.queries`;
:func:`sparc.params.localise_source`): ``composite`` canvases (:mod:`sparc.localise.composite`;
items from ``localise.split``; the query is the caption of one item, the mask its box), or on a
dataset with instance masks (coco; ``auto`` picks it) one pair per image of ``localise.split`` and
category present in it (the query ``localise.prompt`` with the category's name, the mask the union
of its instances; method.md section 4). The text code ``z_t`` is the trained SAE's code of the
caption stream's feature of the query (the stored feature of the queried item; for a prompt, the
caption stream's model run on it), the stream encoded alone (per-stream inference). For every image
stream with a heat-map method (:mod:`sparc.localise.heatmaps`) the image goes through the stream's
model with gradients, the SAE encodes the stream's feature alone (``z_i``), and the target is

* ``code``: ``<z_t, z_i>`` (dense dot product over the L latents), or
* ``concept``: ``sum_l z_i[l]`` over the latents the concepts stage named after the query's
  label(s) (the item's labels; the category) for that stream (per-stream table); pairs without
  such a latent get an all-zero map.

The heat map (rollout for ViTs, Grad-CAM for CNNs) is put back onto the image at its own size
(the localiser's view box), binarised with Otsu and scored against the pair's mask: AP at IoU 0.2
(all pairs ranked by the target value), mIoU and the hit rate. The chance baseline is a centred
Gaussian map (equal scores). Maps are scored one at a time; only the overlays' are kept.

CLIP-similarity baseline (method ``clipsim_<stream>``): for every image stream whose model is the
same OpenCLIP model as a caption stream's (:func:`clipsim_streams`: equal ``openclip:`` specs), the
same localiser maps the target ``cos(t, f)``: ``t`` that caption stream's feature of the query
(as ``z_t``'s, before the SAE), ``f`` the image stream's feature of the image (no SAE). Its scores go into
``metrics.json`` as ``ap_clipsim_<stream>`` / ``miou_clipsim_<stream>``, and into details and pairs
like the other methods; without such a pair of streams (the default data) there is none.

Device (``localise.device``, resolved as ``evaluate.device`` is: ``auto`` is CUDA when present):
the SAE, the localisers' models, the model inputs and the text codes live there; heat maps come
back to the CPU for placing and scoring. On a GPU, with convolutions kept in full float32
(:func:`sparc.localise.heatmaps.float32_convolutions`, no TF32), the maps and targets agree with
the CPU's to float32 rounding (other kernels sum in other orders), so an IoU near an Otsu cut may
differ. The device is not written to ``details.json``. The prompts' text features (masks) are
computed on the CPU.

Outputs (``reports/localise``): ``metrics.json`` (DVC metrics: ``ap_<stream>``, ``miou_<stream>``,
``ap_chance``, ``miou_chance``), ``details.json`` (hit rates, counts, the parameters the source
uses), ``pairs.csv`` (one row per query and method; the pair's columns: ``item_row, caption``, or
for masks ``image, category, prompt``) and ``overlays.npz`` (image, mask, heat maps and IoUs of the
``localise.overlays`` queries with the highest targets, :func:`overlay_picks`, :mod:`sparc.localise.overlays`; the figures and browser stages
draw them, :mod:`sparc.report.localise_figure`).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sparc import paths
from sparc.catalog import parse_spec
from sparc.data.prepared import load_annotations, load_prepared
from sparc.features.registry import caption_embedder
from sparc.localise.heatmaps import SUPPORTED, build_localiser, float32_convolutions
from sparc.localise.maps import binarise, gaussian_map, iou, place_map, summarise_ious
from sparc.localise.overlays import CHANCE, OverlayQuery, write_overlays
from sparc.localise.queries import QueryPair, composite_queries, mask_queries
from sparc.params import LocaliseParams, Params, ParamsError, check_localise, localise_source

IOU_THRESHOLD = 0.2
OUT_DIR = "localise"
CLIPSIM = "clipsim"
# localise parameters left out of details.json: those one source does not read, and the device
# (where it ran, not what it computed)
UNUSED_PARAMS = {"composite": ("source", "prompt", "device"), "masks": ("grid", "cell", "scale", "seed", "device")}


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


def same_clip_model(spec_a: str, spec_b: str) -> bool:
    """True when two model specs name one OpenCLIP model: both ``openclip:`` with equal name,
    weights and options (so one's image and the other's caption features share CLIP's space)."""
    a, b = parse_spec(spec_a), parse_spec(spec_b)
    return a.family == "openclip" and a == b


def clipsim_streams(params: Params) -> dict[str, str]:
    """image stream -> the first caption stream with the same OpenCLIP model
    (:func:`same_clip_model`), for the image streams with a heat-map method, in params order."""
    captions = [s for s, p in params.streams.items() if p.input == "caption"]
    out: dict[str, str] = {}
    for s in image_streams(params):
        match = [c for c in captions if same_clip_model(params.streams[s].model, params.streams[c].model)]
        if match:
            out[s] = match[0]
    return out


def clip_similarity(caption_feature: torch.Tensor):
    """The CLIP-similarity target: ``feat [1, d] -> cos(t, feat[0])`` for a caption feature
    ``t [d]`` (a zero vector gives 0)."""
    t = torch.nn.functional.normalize(caption_feature.float(), dim=0)
    return lambda feat: (torch.nn.functional.normalize(feat, dim=-1)[0] * t).sum()


def localise_device(lp: LocaliseParams) -> torch.device:
    """``localise.device`` resolved (:func:`sparc.device.resolve_device`: ``auto`` is CUDA
    when present, else the CPU); ParamsError when it names CUDA on a machine without it."""
    from sparc.device import resolve_device

    try:
        return resolve_device(lp.device, "localise.device")
    except ValueError as err:
        raise ParamsError(f"{err} (set localise.device: auto or cpu)") from None


def dense_code(model, stream: str, x: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` dense code of ``x [B, d]`` with the stream encoded alone (differentiable), on
    ``x``'s device."""
    code = model.encode({stream: x}, mode="local")[stream]
    dense = torch.zeros(x.shape[0], model.cfg.L, dtype=code.values.dtype, device=code.values.device)
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
    from sparc.evaluate.run_files import load_features, load_model

    lp = params.localise
    dataset = params.data.dataset
    check_localise(lp, dataset)
    device = localise_device(lp)
    prepared = load_prepared(prepared_dir or paths.prepared_dir(dataset))
    model = load_model(params, Path(sae_dir or paths.sae_dir()), str(device))
    for p in model.parameters():
        p.requires_grad_(False)
    features = load_features(params, Path(features_root or paths.features_root(dataset)), prepared)
    text = text_stream(params)
    streams = image_streams(params)
    if not streams:  # e.g. precomputed (h5:/npy:) streams: no model to take a heat map from
        print(f"localise: no image stream has a heat-map method (supported: {', '.join(SUPPORTED)}); "
              "only the chance baseline is scored", file=sys.stderr)
    clip_streams = clipsim_streams(params)
    source = localise_source(lp.source, dataset)
    pairs, text_features = query_pairs(params, source, prepared, features, [text, *clip_streams.values()])
    with torch.no_grad():
        z_text = dense_code(model, text, torch.from_numpy(text_features[text]).to(device))
        clip_text = {s: torch.from_numpy(text_features[c]).to(device) for s, c in clip_streams.items()}

    results: dict[str, dict] = {}
    values: dict[str, list[float]] = {}

    def heat_maps(s: str, localiser, named: dict[str, list[int]], i: int) -> dict[str, tuple[np.ndarray, float]]:
        """Method -> (heat map placed on pair i's image, target value) for image stream ``s``."""
        pair = pairs[i]
        image = pair.load_image()
        x = localiser.preprocess(image).unsqueeze(0).to(device)
        targets = {s: _target(model, s, z_text[i], pair.labels, named, lp.target)}
        if s in clip_text:  # the CLIP-similarity baseline: same image, same localiser
            targets[f"{CLIPSIM}_{s}"] = clip_similarity(clip_text[s][i])
        out = {}
        for k, target in targets.items():
            with float32_convolutions():  # no TF32 on CUDA: the CPU's maps to float32 rounding
                heat, value = localiser.heat(x, target)
            out[k] = (place_map(heat, localiser.view_box(image.width, image.height), image.size), value)
        return out

    def stream_setup(s: str):
        named = named_latents(Path(concepts_dir or paths.concepts_dir()), s) if lp.target == "concept" else {}
        return build_localiser(params.streams[s].model, lp.layers).to(device), named

    for s in streams:
        localiser, named = stream_setup(s)
        ious: dict[str, list[float]] = {}
        for i, pair in enumerate(tqdm(pairs, desc=f"localise {s}", disable=not progress)):
            mask = pair.load_mask()
            for k, (placed, value) in heat_maps(s, localiser, named, i).items():
                ious.setdefault(k, []).append(iou(binarise(placed), mask))
                values.setdefault(k, []).append(value)
        for k in ious:
            results[k] = summarise_ious(ious[k], values[k], IOU_THRESHOLD)
    chance = _ChanceMaps()
    chance_ious = []
    for pair in pairs:
        mask = pair.load_mask()
        chance_ious.append(iou(chance.mask(mask.shape), mask))
    results[CHANCE] = summarise_ious(chance_ious, [0.0] * len(pairs), IOU_THRESHOLD)
    out = Path(out_dir or localise_dir())
    out.mkdir(parents=True, exist_ok=True)
    _write_outputs(out, params, source, pairs, results, values, text)
    # overlay data of the most confident queries (drawn by the figures and browser stages): their
    # heat maps again, one stream at a time (keeping every map would not fit a COCO run in memory)
    shown = overlay_picks([values[s] for s in streams], lp.overlays)
    panels: dict[str, list[np.ndarray]] = {}
    for s in streams:
        localiser, named = stream_setup(s)
        for i in shown:
            for k, (placed, _) in heat_maps(s, localiser, named, i).items():
                panels.setdefault(k, []).append(placed)
    panels[CHANCE] = [chance.map(pairs[i].load_mask().shape) for i in shown]
    write_overlays(out / "overlays.npz", list(panels), [
        OverlayQuery(pairs[i].text, np.asarray(pairs[i].load_image().convert("RGB")), pairs[i].load_mask(),
                     {k: panels[k][j] for k in panels}, {k: results[k]["ious"][i] for k in panels})
        for j, i in enumerate(shown)
    ], IOU_THRESHOLD)
    return out


def overlay_picks(targets: list[list[float]], n: int) -> list[int]:
    """The ``n`` pairs shown in the overlays: those SPARC is most confident about across the image
    streams (the top of AP's ranking), i.e. the smallest sum over streams of the pair's rank by
    decreasing target (``targets``: one list per image stream, one value per pair); ties by
    pair order."""
    if not targets or not targets[0]:
        return []
    ranks = np.zeros(len(targets[0]))
    for t in targets:
        ranks += np.argsort(np.argsort(-np.asarray(t, dtype=np.float64), kind="stable"), kind="stable")
    return [int(i) for i in np.argsort(ranks, kind="stable")[:n]]


def query_pairs(params: Params, source: str, prepared, features, caption_streams: list[str],
                ) -> tuple[list[QueryPair], dict[str, np.ndarray]]:
    """The pairs of ``source`` (composite | masks) and, per caption stream of ``caption_streams``,
    the text features ``[P, d]`` of their queries (:mod:`sparc.localise.queries`)."""
    streams = list(dict.fromkeys(caption_streams))
    if source == "masks":
        embedders = {c: caption_embedder(params.streams[c].model) for c in streams}
        return mask_queries(prepared, load_annotations(prepared.root), params.localise, embedders)
    return composite_queries(prepared, params.localise, {c: features[c].features for c in streams})


class _ChanceMaps:
    """The chance baseline's centred Gaussian map and its Otsu mask per image size (computed once)."""

    def __init__(self) -> None:
        self._maps: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _get(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if shape not in self._maps:
            heat = gaussian_map(*shape)
            self._maps[shape] = (heat, binarise(heat))
        return self._maps[shape]

    def map(self, shape: tuple[int, int]) -> np.ndarray:
        """``[H, W]`` Gaussian map for an image of ``shape`` ``(H, W)``."""
        return self._get(shape)[0]

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Its Otsu mask."""
        return self._get(shape)[1]


def _target(model, stream, z_text, labels: tuple[str, ...], named: dict[str, list[int]], kind: str):
    """The scalar target of one query as a function of the image feature ``[1, d]``."""
    if kind == "code":
        return lambda feat: (dense_code(model, stream, feat)[0] * z_text).sum()
    latents = sorted({lat for lab in labels for lat in named.get(lab, [])})
    index = torch.as_tensor(latents, dtype=torch.long, device=z_text.device)
    return lambda feat: dense_code(model, stream, feat)[0, index].sum()


def _write_outputs(out: Path, params: Params, source: str, pairs: list[QueryPair], results: dict, values: dict,
                   text: str) -> None:
    """metrics.json (flat DVC metrics), details.json and pairs.csv."""
    metrics = {}
    for key, r in results.items():
        metrics[f"ap_{key}"] = round(r["ap"], 6)
        metrics[f"miou_{key}"] = round(r["miou"], 6)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lp = params.localise
    if source == "composite":
        about: dict = {"canvas_px": lp.grid * lp.cell}
    else:  # images with at least one pair
        about = {"source": source, "n_images": len({p.row for p in pairs})}
    details = {
        "iou_threshold": IOU_THRESHOLD,
        "text_stream": text,
        "n_queries": len(pairs),
        **about,
        "params": {k: getattr(lp, k) for k in lp.__dataclass_fields__ if k not in UNUSED_PARAMS[source]},
        "results": {k: {m: round(v, 6) if isinstance(v, float) else v for m, v in r.items() if m != "ious"}
                    for k, r in results.items()},
        # pairs whose target is 0 (no latent shared by the text and image codes): their map is empty
        "zero_target": {k: int(sum(v == 0.0 for v in vals)) for k, vals in values.items()},
    }
    (out / "details.json").write_text(json.dumps(details, indent=2) + "\n")
    with (out / "pairs.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["query", *pairs[0].ids, "method", "iou", "target"])
        for key, r in results.items():
            for i, pair in enumerate(pairs):
                score = values[key][i] if key in values else ""
                writer.writerow([i, *pair.ids.values(), key, f"{r['ious'][i]:.6f}",
                                 f"{score:.6g}" if score != "" else ""])
