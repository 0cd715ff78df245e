"""The `figures` stage: PNG figures of a run from the pipeline's outputs.

Reads the prepared dataset, ``data/codes`` (joint and per-stream SparseCodes), the concepts
stage's ``concepts.csv`` and the evaluate stage's ``metrics.json`` and ``latents.csv``, and
writes ``reports/figures/`` (atomically: ``figures.tmp`` then rename)::

    reconstruction.png      M x M NMSE / FVU heat maps, joint and per-stream codes
    jaccard_depth.png       hierarchical Jaccard against depth, joint / per-stream, all / live
    patterns.png            alive / mixed / dead latents per kind, dead fraction per stream
    retrieval.png           R@1/5/10 per ordered stream pair with chance (two streams or more)
    latent_<id>.png         a shown latent's top ``figures.top_n`` test samples per stream, each
                            column titled with its label-derived name and its text name
    retrieval_examples.png  ``figures.queries`` caption queries and the top images of each image
                            stream (needs a caption stream and an image stream)
    localisation.png        the localise stage's overlay queries: the image with its mask and the
                            query text, per method the heat map over it, its Otsu mask and IoU
                            (from ``reports/localise/overlays.npz``)
    localisation_scores.png AP@0.2 and mIoU per localisation method, chance dashed (from
                            ``reports/localise/metrics.json``)
    index.json              figures written, latents shown (and why), concepts and latents
                            skipped, retrieval queries, notes

Latents shown (all from the joint codes on the test split, the evaluate stage's protocol):

* the ``figures.n_best`` best-aligned: alive in every stream (``pattern == alive_all`` in
  latents.csv); those firing on at least ``figures.top_n`` test samples in every stream first
  (a full column of examples, not a purity of 1 from two samples), then by Jaccard at the
  deepest depth, mean purity over the streams, mean firing frequency, id; one latent per agreed
  name before a second latent of the same name (a showcase of different concepts);
* per entry of ``figures.concepts``, up to ``figures.n_best`` latents named after it: the
  concept matches (case-insensitively) the agreed name, a stream's name, or the label id (or the
  part after ``:``) of a stream that names the latent; latents named in more streams come first,
  then those with a full column of examples, then by mean purity and frequency. A concept no
  latent is named after is listed under ``skipped_concepts``.

Latents that fire on no test sample in any stream are skipped (``skipped_latents``). The retrieval
examples use the first caption stream as the query side and test samples evenly spread over the
test split as queries; each image stream ranks the test gallery by the cosine of L2-normalised
per-stream codes (ties: lower row first).

The localisation figures are skipped, with a printed message and a note in index.json, when the
localise stage's outputs are absent (a run of only part of the pipeline).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sparc import paths
from sparc.data.prepared import PreparedData, load_prepared
from sparc.evaluate.metrics import top_activating
from sparc.evaluate.retrieval import cosine_scores, spread_picks
from sparc.evaluate.run_files import (
    EVAL_SPLIT,
    codes_to_csr,
    csv_number,
    read_json_object,
    split_rows,
)
from sparc.localise.overlays import read_overlays
from sparc.params import Params, check_figures
from sparc.report import figures as F
from sparc.report import localise_figure as LF
from sparc.report.evaluation import METRICS, load_evaluation

INDEX = "index.json"
FIGURES_DIR = "figures"
LOCALISE_DIR = "localise"
OVERLAYS = "overlays.npz"


@dataclass
class Choice:
    """A latent to show and why (``best:<rank>`` and/or ``concept:<name>``)."""

    latent: int
    reasons: list[str] = field(default_factory=list)


def _deepest_jaccard(row: dict) -> tuple[int | None, float]:
    depths = sorted(int(k[len("jaccard_d"):]) for k in row if k.startswith("jaccard_d"))
    if not depths:
        return None, math.nan
    return depths[-1], csv_number(row[f"jaccard_d{depths[-1]}"], math.nan)


def _mean(values: list[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _key(x: float) -> float:
    """Sort key for 'larger first' with NaN last."""
    return -x if math.isfinite(x) else math.inf


def _norm(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def concept_matches(concept: str, latent_row: dict, concept_row: dict, streams: list[str]) -> int:
    """In how many streams the latent is named after ``concept`` (module docstring); the agreed
    name counts as every stream."""
    c = _norm(concept)
    if not c:
        return 0
    if latent_row.get("agreed_name") and _norm(latent_row["agreed_name"]) == c:
        return len(streams)
    n = 0
    for s in streams:
        name = latent_row.get(f"name_{s}", "") or concept_row.get(f"{s}_name", "")
        if not name:
            continue
        label = concept_row.get(f"{s}_label", "") or ""
        if c in {_norm(name), _norm(label), _norm(label.rsplit(":", 1)[-1])}:
            n += 1
    return n


def choose_latents(
    latent_rows: list[dict],
    concept_rows: list[dict],
    streams: list[str],
    fires: np.ndarray,
    n_best: int,
    concepts: list[str],
    supported: np.ndarray | None = None,
) -> tuple[list[Choice], list[dict], list[dict]]:
    """The latents to show (module docstring): ``(choices, skipped_concepts, skipped_latents)``.
    ``fires[l]``: latent l fires on some test sample in some stream (joint codes);
    ``supported[l]``: it fires on at least ``figures.top_n`` test samples in every stream (these
    come first among the best-aligned; all True when None)."""
    if supported is None:
        supported = np.ones(len(latent_rows), dtype=bool)
    choices: dict[int, Choice] = {}
    skipped_latents: dict[int, dict] = {}

    def purity(row: dict) -> float:
        return _mean([csv_number(row.get(f"purity_{s}"), math.nan) for s in streams])

    def freq(row: dict) -> float:
        return _mean([csv_number(row.get(f"freq_{s}"), math.nan) for s in streams])

    alive = [r for r in latent_rows if r.get("pattern") == "alive_all" and fires[int(r["latent"])]]
    alive.sort(key=lambda r: (
        not bool(supported[int(r["latent"])]), _key(_deepest_jaccard(r)[1]), _key(purity(r)), _key(freq(r)),
        int(r["latent"]),
    ))
    # One latent per agreed name first (a showcase of different concepts), then the rest in order.
    seen: set[str] = set()
    first, rest = [], []
    for row in alive:
        name = _norm(row.get("agreed_name", ""))
        (rest if name and name in seen else first).append(row)
        if name:
            seen.add(name)
    for rank, row in enumerate((first + rest)[:n_best], start=1):
        choices.setdefault(int(row["latent"]), Choice(int(row["latent"]))).reasons.append(f"best:{rank}")

    skipped_concepts = []
    for concept in concepts:
        matched = []
        for row, crow in zip(latent_rows, concept_rows, strict=True):
            n = concept_matches(concept, row, crow, streams)
            if n:
                matched.append((n, row))
        firing = [(n, r) for n, r in matched if fires[int(r["latent"])]]
        for _, r in matched:
            if not fires[int(r["latent"])]:
                skipped_latents.setdefault(int(r["latent"]), {
                    "latent": int(r["latent"]), "reason": "never fires on the test split", "concept": concept,
                })
        if not firing:
            reason = (f"no latent is named {concept!r} in any stream" if not matched
                      else f"the latents named {concept!r} never fire on the test split")
            skipped_concepts.append({"concept": concept, "reason": reason})
            continue
        firing.sort(key=lambda nr: (
            -nr[0], not bool(supported[int(nr[1]["latent"])]), _key(purity(nr[1])), _key(freq(nr[1])),
            int(nr[1]["latent"]),
        ))
        for _, row in firing[:n_best]:
            choices.setdefault(int(row["latent"]), Choice(int(row["latent"]))).reasons.append(f"concept:{concept}")
    return list(choices.values()), skipped_concepts, sorted(skipped_latents.values(), key=lambda d: d["latent"])


def top_samples(csr: sp.csr_matrix, latent: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (into ``csr``) and values of the ``n`` largest activations of ``latent`` (> 0), in
    the order of :func:`sparc.evaluate.metrics.top_activating` (the concepts stage's)."""
    col = csr[:, [latent]]
    col = col.multiply(col > 0).tocsr()
    _, rows = top_activating(col, n)
    return rows, np.asarray(col[rows, 0].todense(), dtype=np.float64).ravel()


def latent_view(
    choice: Choice,
    row: dict,
    concept_row: dict,
    params: Params,
    csr: dict[str, sp.csr_matrix],
    test_rows: np.ndarray,
    prepared: PreparedData,
) -> F.LatentView:
    """The :class:`figures.LatentView` of one chosen latent (joint codes on the test split)."""
    i = choice.latent
    columns = []
    for s, spec in params.streams.items():
        rows, vals = top_samples(csr[s], i, params.figures.top_n)
        label = concept_row.get(f"{s}_label", "") or ""
        samples = []
        for r, v in zip(rows, vals, strict=True):
            g = int(test_rows[r])
            hit = (label in prepared.labels[g]) if label else None
            samples.append(F.TopSample(prepared.ids[g], float(v), prepared.captions[g],
                                       prepared.images[g] if spec.input == "image" else None, hit))
        columns.append(F.LatentColumn(
            stream=s, input=spec.input, name=row.get(f"name_{s}", "") or "", purity=csv_number(row.get(f"purity_{s}"), math.nan),
            n_active=int(csr[s][:, i].count_nonzero()), samples=samples,
            text=concept_row.get(f"{s}_text_name", "") or "",
        ))
    name = row.get("agreed_name") or ""
    title = f"latent {i}" + (f" — {name}" if name else "")
    notes = []
    for reason in choice.reasons:
        kind, _, arg = reason.partition(":")
        if kind == "best":
            d, j = _deepest_jaccard(row)
            notes.append(f"best-aligned #{arg} (Jaccard {F._fmt(j)} at depth {d})")
        else:
            notes.append(f"named {arg}")
    if not name:
        notes.append("no agreed name")
    return F.LatentView(latent=i, title=title, note="; ".join(notes), columns=columns)


def retrieval_examples(
    params: Params, local: dict[str, sp.csr_matrix], test_rows: np.ndarray, prepared: PreparedData,
) -> tuple[list[F.RetrievalExample], str | None, list[str]]:
    """``(examples, query_stream, image_streams)``; no examples without a caption stream, an
    image stream or ``figures.queries``. Queries and gallery are the test rows the retrieval metric
    ranks: one caption per image (:meth:`PreparedData.one_per_group`), so no image appears twice in
    a result list; ``local`` holds the per-stream codes of ``test_rows``."""
    captions = [s for s, p in params.streams.items() if p.input == "caption"]
    images = [s for s, p in params.streams.items() if p.input == "image"]
    n_q = params.figures.queries
    if not captions or not images or n_q <= 0:
        return [], (captions[0] if captions else None), images
    q = captions[0]
    keep = np.searchsorted(test_rows, prepared.one_per_group(test_rows))
    test_rows, local = test_rows[keep], {s: m[keep] for s, m in local.items()}
    N = test_rows.size
    picks = spread_picks(N, n_q)
    scores = {s: cosine_scores(local[q][picks], local[s]) for s in images}  # [N, Q]
    examples = []
    for j, r in enumerate(picks):
        results, ranks = {}, {}
        for s in images:
            col = scores[s][:, j]
            order = np.argsort(-col, kind="stable")
            ranks[s] = int(np.flatnonzero(order == r)[0]) + 1
            results[s] = [
                F.Retrieved(prepared.ids[int(test_rows[o])], prepared.images[int(test_rows[o])], float(col[o]), bool(o == r))
                for o in order[: params.figures.top_n]
            ]
        g = int(test_rows[r])
        examples.append(F.RetrievalExample(q, prepared.ids[g], prepared.captions[g], results, ranks, int(N)))
    return examples, q, images


def localisation_figures(localise: Path, save: Callable[..., None], notes: list[str]) -> None:
    """``localisation.png`` from ``<localise>/overlays.npz`` and ``localisation_scores.png`` from
    ``<localise>/metrics.json`` through ``save(fig, name, what, **extra)``; each is skipped, with a
    printed message and a line in ``notes``, when its input is absent (a corrupt one raises)."""
    overlays_path, metrics_path = localise / OVERLAYS, localise / METRICS
    hint = "run `dvc repro localise` or `python -m sparc localise`"

    def skip(message: str) -> None:
        print(f"figures: {message}")
        notes.append(message)

    threshold = None
    if overlays_path.is_file():
        overlays = read_overlays(overlays_path)
        threshold = overlays.iou_threshold
        if overlays.queries:
            save(LF.overlay_figure(overlays), "localisation.png", "localisation",
                 queries=[q.text for q in overlays.queries], methods=overlays.methods)
        else:
            skip(f"no localisation.png: {overlays_path} holds no query (localise.overlays)")
    else:
        skip(f"no localisation.png: {overlays_path} is missing ({hint})")
    if metrics_path.is_file():
        metrics = read_json_object(metrics_path, "localise", "localisation outputs")
        save(LF.scores_figure(metrics, threshold), "localisation_scores.png", "localisation_scores",
             methods=list(LF.localisation_scores(metrics)))
    else:
        skip(f"no localisation_scores.png: {metrics_path} is missing ({hint})")


def run_figures(
    params: Params,
    *,
    prepared_dir: str | Path | None = None,
    codes_dir: str | Path | None = None,
    concepts_dir: str | Path | None = None,
    reports_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    localise_dir: str | Path | None = None,
) -> Path:
    """The `figures` stage (module docstring). ``reports_dir`` (default ``reports``) holds
    metrics.json and latents.csv; ``out_dir`` defaults to ``<reports_dir>/figures``,
    ``localise_dir`` (the localise stage's outputs) to ``<reports_dir>/localise``. Returns
    ``out_dir``."""
    check_figures(params.figures)
    fp = params.figures
    prepared = load_prepared(prepared_dir or paths.prepared_dir(params.data.dataset))
    codes_dir = Path(codes_dir or paths.codes_dir())
    concepts_dir = Path(concepts_dir or paths.concepts_dir())
    reports_dir = Path(reports_dir or paths.REPORTS)
    out_dir = Path(out_dir or reports_dir / FIGURES_DIR)
    streams = params.stream_names

    test_rows = split_rows(prepared, EVAL_SPLIT)
    ev = load_evaluation(params, prepared, test_rows, codes_dir=codes_dir, concepts_dir=concepts_dir, reports_dir=reports_dir)
    meta, concept_tables, metrics, latent_rows = ev.codes_meta, ev.concepts, ev.metrics, ev.latents
    csr = codes_to_csr(ev.codes["joint"])
    local = codes_to_csr(ev.codes["per_stream"])

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    written: list[dict] = []
    notes: list[str] = []

    def save(fig, name: str, what: str, **extra) -> None:
        F.save_png(fig, tmp / name)
        written.append({"file": name, "figure": what, **extra})

    if metrics.get("reconstruction"):
        save(F.reconstruction_figure(metrics["reconstruction"], streams), "reconstruction.png", "reconstruction")
    if metrics.get("jaccard"):
        save(F.jaccard_figure(metrics["jaccard"]), "jaccard_depth.png", "jaccard_depth")
    if metrics.get("patterns"):
        save(F.patterns_figure(metrics["patterns"], streams), "patterns.png", "patterns")
    if len(streams) > 1 and metrics.get("retrieval"):
        save(F.retrieval_figure(metrics["retrieval"], streams), "retrieval.png", "retrieval")
    else:
        notes.append("one stream: no retrieval figure")

    counts = np.stack([np.bincount(m.indices, minlength=params.L) for m in csr.values()])
    fires = counts.max(axis=0) > 0
    supported = counts.min(axis=0) >= min(fp.top_n, test_rows.size)
    choices, skipped_concepts, skipped_latents = choose_latents(
        latent_rows, concept_tables["joint"], streams, fires, fp.n_best, list(fp.concepts), supported
    )
    thumbs = F.Thumbnails(fp.thumb_px)
    width = len(str(params.L - 1))
    shown = []
    for choice in choices:
        i = choice.latent
        view = latent_view(choice, latent_rows[i], concept_tables["joint"][i], params, csr, test_rows, prepared)
        if not view.fires:  # choose_latents only picks firing latents; kept for safety
            skipped_latents.append({"latent": i, "reason": "never fires on the test split"})
            continue
        name = f"latent_{i:0{width}d}.png"
        save(F.latent_figure(view, fp.top_n, fp.thumb_px, thumbs), name, "latent", latent=i)
        shown.append({
            "latent": i, "file": name, "reasons": choice.reasons,
            "agreed_name": latent_rows[i].get("agreed_name", ""),
            "names": {c.stream: c.name for c in view.columns},
            "text_names": {c.stream: c.text for c in view.columns},
            "purity": {c.stream: (c.purity if math.isfinite(c.purity) else None) for c in view.columns},
            "n_active": {c.stream: c.n_active for c in view.columns},
            "jaccard_deepest": (lambda j: j if math.isfinite(j) else None)(_deepest_jaccard(latent_rows[i])[1]),
            "top_samples": {c.stream: [t.sample_id for t in c.samples] for c in view.columns},
        })
    for sc in skipped_concepts:
        notes.append(f"concept {sc['concept']!r} skipped: {sc['reason']}")

    examples, q, image_streams = retrieval_examples(params, local, test_rows, prepared)
    retrieval_index: dict | None = None
    if examples:
        save(F.retrieval_examples_figure(examples, image_streams, fp.top_n, fp.thumb_px, thumbs),
             "retrieval_examples.png", "retrieval_examples")
        retrieval_index = {
            "query_stream": q, "image_streams": image_streams, "gallery_size": examples[0].gallery_size,
            "queries": [{"id": e.sample_id, "caption": e.caption, "correct_rank": e.correct_rank} for e in examples],
        }
    elif q is None:
        notes.append("no caption stream: no retrieval example grid")
    elif not image_streams:
        notes.append("no image stream: no retrieval example grid")
    else:
        notes.append("figures.queries is 0: no retrieval example grid")
    localisation_figures(Path(localise_dir or reports_dir / LOCALISE_DIR), save, notes)

    index = {
        "split": EVAL_SPLIT,
        "n_eval": int(test_rows.size),
        "streams": {s: p.input for s, p in params.streams.items()},
        "codes": {k: meta.get(k) for k in ("model_sha256", "dataset_fingerprint", "ids_sha256")},
        "figures": written,
        "latents": shown,
        "skipped_concepts": skipped_concepts,
        "skipped_latents": skipped_latents,
        "retrieval_examples": retrieval_index,
        "notes": notes,
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
