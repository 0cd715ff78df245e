"""The concept browser: a static HTML report of every live latent, opened from the file system.

:func:`build_browser` writes ``reports/browser/``::

    index.html     the page: HTML, CSS, plain JavaScript and all its data (one JSON blob in a
                   ``<script type="application/json">``); no server, no network, no CDN, no fonts
                   (the page's HTML, CSS and JavaScript are the package files
                   ``browser_page/{index.html,style.css,app.js}``: :func:`page_template`)
    thumbs/<row>.jpg   one small JPEG (side <= ``figures.thumb_px``, white background) per image
                   the page shows, written once whatever the number of latents showing it
    localise/q<i>.png, localise/q<i>_m<j>.png   per overlay query of the localise stage, its
                   image with the mask outlined, and per method j the heat map blended over it
                   (side <= :data:`LOCALISE_PX`; only when reports/localise/overlays.npz exists)

It reads the prepared dataset (captions, labels, images), the codes (``data/codes/{joint,
per_stream}``), the concepts stage's tables and summary, and the evaluate stage's
``latents.csv``, ``metrics.json`` and ``retrieval.csv``; it refuses codes, concepts or latents
that do not belong together (the checks of :mod:`sparc.evaluate.run_files`, and ``latents.csv``'s
firing frequencies and names against the codes and concepts).

The page:

* **Latent table**: the live latents (firing on the test split in at least one stream under the
  joint codes: ``alive_in != none`` in latents.csv, ``jaccard.joint.n_live`` of metrics.json), one
  row each: latent, agreed name, per stream its name and purity, per stream its text name
  (joint codes; :mod:`sparc.evaluate.text_names`: the caption term that best sets its top samples
  apart, there with labels or without), the per-latent hierarchical
  Jaccard at the deepest depth (joint and per-stream codes), activation pattern, firing frequency
  per stream. A click on a header sorts by it (again: reverse; empty cells last). The search box
  keeps the latents one of whose concept names contains the query (case-insensitive substring of
  the agreed name, any stream's name, text name, top terms or zero-shot name under either kind of
  codes; :func:`search_matches` is the same rule in Python).
* **Latent panel** (``#latent-<i>``, opened by clicking a row; Escape or the close button goes
  back; titled with its agreed name, else its text names): its statistics (per stream name, dominant label, purity, text name and top terms with
  the best term's z-score, zero-shot name, firings, frequency, under both kinds of codes; Jaccard at every depth; pattern; firing entropy and co-firing), its top
  ``figures.top_n`` samples per stream on the concepts split (thumbnails for image streams,
  captions for caption streams, with activations; joint or per-stream codes, a toggle), and its
  label distributions: the counts of the labels among the top ``concepts.top_n`` samples (the
  samples its name comes from, so the dominant count / top samples is its purity) and among all
  its firings on the concepts split.
* **Cross-stream retrieval**: the retrieval metrics of retrieval.csv, and examples: for
  ``figures.queries`` test captions (evenly spread over the test split's rows that the retrieval
  metric ranks: one caption per image), per caption stream and image stream, the top images by
  cosine similarity of the per-stream codes (the correct image outlined, and its rank).
* **Random weights**: when metrics.json lists ``random_weights`` streams (models built with
  ``weights=random``), the title says so and a red banner opens the header.
* **Text-guided localisation** (linked from the header): the localise stage's AP@0.2 and mIoU per
  method and the chance baseline (``reports/localise/metrics.json``), and its overlay queries
  (``overlays.npz``): the query text, the image with the ground-truth mask (green), per method the
  heat map blended over the image with its Otsu mask (white) and its IoU. Absent localise outputs
  (a run of part of the pipeline) leave the section with a note, printed too, not an error.

Longer than 500 lines because every section of the page has its data function here, beside the
stage that writes them, and they share the page's JSON shape; the page itself is browser_page/
and the inputs are loaded by :mod:`sparc.report.evaluation`.
"""

from __future__ import annotations

import html
import importlib.resources
import json
import re
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sparc import paths
from sparc.data.prepared import PreparedData, load_prepared
from sparc.evaluate.labels import LabelSpace
from sparc.evaluate.metrics import firing_matrix, top_activating
from sparc.evaluate.retrieval import cosine_scores, spread_picks
from sparc.evaluate.run_files import (
    CODE_KINDS,
    EVAL_SPLIT,
    codes_to_csr,
    csv_number,
    load_concepts,
    read_codes_meta,
    read_json_object,
    split_rows,
)
from sparc.evaluate.text_names import TERM_SEP
from sparc.localise.overlays import CHANCE, Overlays, read_overlays
from sparc.params import Params, check_figures
from sparc.report import localise_figure as LF
from sparc.report.evaluation import RETRIEVAL_CSV, load_evaluation, read_csv_rows

INDEX = "index.html"
THUMBS = "thumbs"
N_DIST_LABELS = 8  # labels listed per label distribution (the rest are summed as "other")
N_RETRIEVED = 5  # gallery images shown per retrieval query
LOCALISE = "localise"  # the localise stage's folder under reports/, and the images' folder here
LOCALISE_PX = 160  # longer side of the localisation images
PAGE_FILES = "browser_page"  # the page as package files under sparc/report/: index.html, style.css, app.js


# --------------------------------------------------------------------------- inputs


def _depths(latents: list[dict], prefix: str) -> list[int]:
    out = []
    for key in latents[0]:
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            out.append(int(key[len(prefix):]))
    return sorted(out)


# --------------------------------------------------------------------------- data of the page


def _top_samples(mat: sp.csr_matrix, rows: np.ndarray, n: int) -> dict[int, list[list]]:
    """latent -> ``[[row, activation], ...]``: the (up to) n largest activations, as
    :func:`sparc.evaluate.metrics.top_activating` orders them; rows are dataset rows."""
    lat, local = top_activating(mat, n)
    vals = np.asarray(mat[local, lat]).ravel() if lat.size else np.zeros(0)
    out: dict[int, list[list]] = {}
    for latent, r, v in zip(lat.tolist(), local.tolist(), vals.tolist(), strict=True):
        out.setdefault(latent, []).append([int(rows[r]), round(float(v), 4)])
    return out


def _label_counts(sel: sp.csr_matrix, labels: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """``[L, B]`` label counts of the samples selected by ``sel`` (``[L, N]`` 0/1) and ``[L]`` their
    number."""
    counts = (sel @ labels).tocsr()
    return counts, np.asarray(sel.sum(axis=1)).ravel().astype(np.int64)


def _top_labels(counts: sp.csr_matrix, i: int, label_index: dict[int, int]) -> list[list[int]]:
    """``[[label index, count], ...]`` of latent i: the largest counts (ties: hierarchy order)."""
    row = counts.getrow(i)
    cols, vals = row.indices, row.data.astype(np.int64)
    order = np.lexsort((cols, -vals))
    out = []
    for j in order[:N_DIST_LABELS]:
        col = int(cols[j])
        label_index.setdefault(col, len(label_index))
        out.append([label_index[col], int(vals[j])])
    return out


def _retrieval_examples(
    local: dict[str, sp.csr_matrix], eval_rows: np.ndarray, query_streams: list[str], gallery_streams: list[str],
    n_queries: int,
) -> list[dict]:
    """Per (caption stream, image stream): ``queries`` evenly spread over the evaluated rows, each
    with the rank of its own image (1 + gallery items scoring higher; ``ties`` others scoring the
    same) and the top images by cosine similarity of the per-stream codes."""
    N = eval_rows.size
    picks = spread_picks(N, n_queries)
    if picks.size == 0:
        return []
    out = []
    for q in query_streams:
        for g in gallery_streams:
            sims = cosine_scores(local[q][picks], local[g])  # [N, n_queries]
            items = []
            for c, p in enumerate(picks.tolist()):
                s = sims[:, c]
                order = np.lexsort((np.arange(N), -s))[:N_RETRIEVED]
                own = s[p]
                items.append({
                    "row": int(eval_rows[p]),
                    "rank": int((s > own).sum()) + 1,
                    "ties": int((s == own).sum()) - 1,
                    "top": [[int(eval_rows[j]), round(float(s[j]), 4)] for j in order],
                })
            out.append({"query": q, "gallery": g, "items": items})
    return out


def _retrieval_table(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r.get("applicable") not in ("True", "true", True):
            continue
        out.append({
            "query": r["query"], "gallery": r["gallery"], "representation": r["representation"],
            **{k: csv_number(r.get(k)) for k in ("R@1", "R@5", "R@10", "median_rank", "MRR")},
        })
    return out


def concepts_split(params: Params, concept_summary: dict) -> str:
    """The split the concepts were named on, as the concepts stage recorded it."""
    return concept_summary.get("split", params.concepts.split)


def shown_splits(params: Params, prepared: PreparedData, concept_summary: dict) -> tuple[np.ndarray, np.ndarray]:
    """Prepared rows the page draws on: the concepts' split (:func:`concepts_split`) and the
    evaluation split."""
    return split_rows(prepared, concepts_split(params, concept_summary)), split_rows(prepared, EVAL_SPLIT)


def browser_data(
    params: Params,
    prepared: PreparedData,
    codes: dict,
    rows: np.ndarray,
    concept_tables: dict[str, list[dict]],
    concept_summary: dict,
    latents: list[dict],
    metrics: dict,
    retrieval_rows: list[dict],
    codes_meta: dict | None = None,
) -> dict:
    """Everything the page shows, as one JSON-able dict (module docstring). ``codes`` is kind ->
    SparseCodes of the prepared rows ``rows`` (ascending; at least those of :func:`shown_splits`);
    ``concept_tables`` kind -> rows of the concepts CSVs.

    Image thumbnails are not made here: ``data["thumbs"]`` lists the rows whose image the page
    shows, and ``samples[row]["img"]`` is filled in by :func:`build_browser`.
    """
    streams = params.stream_names
    inputs = {s: params.streams[s].input for s in streams}
    image_streams = [s for s in streams if inputs[s] == "image"]
    caption_streams = [s for s in streams if inputs[s] == "caption"]
    space = LabelSpace(prepared.hierarchy)
    label_ids = space.label_ids
    col_of = {lab: j for j, lab in enumerate(label_ids)}

    split = concepts_split(params, concept_summary)
    top_n_names = int(concept_summary.get("top_n", params.concepts.top_n))
    c_rows, e_rows = shown_splits(params, prepared, concept_summary)
    c_labels = space.matrix([prepared.labels[i] for i in c_rows])
    n_eval = int(e_rows.size)

    live = [i for i, r in enumerate(latents) if r["alive_in"] != "none"]
    j_depths = _depths(latents, "jaccard_d")
    p_depths = _depths(latents, "per_stream_jaccard_d")

    label_index: dict[int, int] = {}
    shown_rows: set[int] = set()
    thumb_rows: set[int] = set()
    per_kind: dict[str, dict] = {}
    for kind in CODE_KINDS:
        mats = codes_to_csr(codes[kind], np.searchsorted(rows, c_rows))
        per_kind[kind] = {}
        for s in streams:
            mat = mats[s]
            L = mat.shape[1]
            lat, local = top_activating(mat, top_n_names)
            top_sel = sp.csr_matrix((np.ones(lat.size), (lat, local)), shape=(L, mat.shape[0]))
            per_kind[kind][s] = {
                "top": _top_samples(mat, c_rows, params.figures.top_n),
                "dist_top": _label_counts(top_sel, c_labels),
                "dist_all": _label_counts(firing_matrix(mat).T.tocsr(), c_labels),
            }

    entries = []
    for i in live:
        r = latents[i]
        entry: dict = {
            "l": i,
            "agreed": r["agreed_name"],
            "name": {s: r[f"name_{s}"] for s in streams},
            "text": {s: concept_tables["joint"][i].get(f"{s}_text_name", "") for s in streams},
            "purity": {s: csv_number(r[f"purity_{s}"]) for s in streams},
            "freq": {s: csv_number(r[f"freq_{s}"]) for s in streams},
            "jac": {
                "joint": [csv_number(r[f"jaccard_d{d}"]) for d in j_depths],
                "per_stream": [csv_number(r[f"per_stream_jaccard_d{d}"]) for d in p_depths],
            },
            "pattern": {"joint": r["pattern"], "per_stream": r["per_stream_pattern"]},
            "alive_in": {"joint": r["alive_in"], "per_stream": r["per_stream_alive_in"]},
            "fe": csv_number(r.get("firing_entropy")),
            "cofire": csv_number(r.get("cofire")),
            "kinds": {},
        }
        for kind in CODE_KINDS:
            c = concept_tables[kind][i]
            k_entry: dict = {"stream": {}}
            for s in streams:
                data = per_kind[kind][s]
                top = data["top"].get(i, [])
                shown_rows.update(row for row, _ in top)
                if inputs[s] == "image":
                    thumb_rows.update(row for row, _ in top)
                (ct, nt), (ca, na) = data["dist_top"], data["dist_all"]
                dominant = c[f"{s}_label"]
                if dominant in col_of:
                    label_index.setdefault(col_of[dominant], len(label_index))
                k_entry["stream"][s] = {
                    "name": c[f"{s}_name"],
                    **text_entry(c, s),
                    "label": label_index[col_of[dominant]] if dominant in col_of else None,
                    "purity": csv_number(c[f"{s}_purity"]),
                    "n_active": int(c[f"{s}_n_active"]),
                    "top": top,
                    "dist_top": {"n": int(nt[i]), "labels": _top_labels(ct, i, label_index)},
                    "dist_all": {"n": int(na[i]), "labels": _top_labels(ca, i, label_index)},
                }
            k_entry["agreed"] = c["agreed_name"]
            entry["kinds"][kind] = k_entry
        entry["search"] = search_key(entry)
        entries.append(entry)

    ret_rows = prepared.one_per_group(e_rows)  # one caption per image, the rows the retrieval metric ranks
    local = codes_to_csr(codes["per_stream"], np.searchsorted(rows, ret_rows))
    examples = _retrieval_examples(local, ret_rows, caption_streams, image_streams, params.figures.queries)
    for ex in examples:
        for item in ex["items"]:
            shown_rows.add(item["row"])
            thumb_rows.add(item["row"])
            for row, _ in item["top"]:
                shown_rows.add(row)
                thumb_rows.add(row)

    # The label table holds the labels the page refers to: distributions and samples' own labels.
    samples = {}
    for row in sorted(shown_rows):
        labs = []
        for lab in prepared.labels[row]:
            if lab in col_of:
                label_index.setdefault(col_of[lab], len(label_index))
                labs.append(label_index[col_of[lab]])
        samples[str(row)] = {"id": prepared.ids[row], "caption": prepared.captions[row], "labels": labs, "img": ""}
    labels = [None] * len(label_index)
    for col, idx in label_index.items():
        lab = label_ids[col]
        labels[idx] = [lab, space.name(lab)]

    jac = metrics.get("jaccard", {})
    summary = {
        "n_eval": metrics.get("n_eval", n_eval),
        "n_live": {k: jac.get(k, {}).get("n_live") for k in CODE_KINDS},
        "jaccard_live": {
            k: {str(d): jac.get(k, {}).get(f"depth_{d}", {}).get("live") for d in j_depths} for k in CODE_KINDS
        },
        "agreeing": {k: metrics.get("concepts", {}).get(k, {}).get("agreeing") for k in CODE_KINDS},
        "l0": {k: metrics.get("sparsity", {}).get(f"l0_{k}") for k in CODE_KINDS},
    }
    meta = codes_meta or {}
    random = metrics.get("random_weights") or []
    extra = {"random_weights": random} if random else {}
    return {
        **extra,
        "title": ("RANDOM WEIGHTS, not a result: " if random else "")
        + f"SPARC concept browser: {prepared.meta.get('dataset', '')}",
        "dataset": prepared.meta.get("dataset", ""),
        "L": params.L,
        "k": params.k,
        "topk": params.topk,
        "method": params.method,
        "model_sha256": meta.get("model_sha256", ""),
        "joint_mode": meta.get("joint_mode", params.topk),
        "streams": [{"name": s, "input": inputs[s]} for s in streams],
        "concepts_split": split,
        "n_concepts_split": int(c_rows.size),
        "eval_split": EVAL_SPLIT,
        "top_n_names": top_n_names,
        "purity_threshold": concept_summary.get("purity_threshold", params.concepts.purity_threshold),
        "top_n": params.figures.top_n,
        "thumb_px": params.figures.thumb_px,
        "depths": j_depths,
        "summary": summary,
        "latents": entries,
        "labels": labels,
        "samples": samples,
        "thumbs": sorted(thumb_rows),
        "retrieval": {"metrics": _retrieval_table(retrieval_rows), "examples": examples},
    }


def text_entry(concept_row: dict, s: str) -> dict:
    """Stream ``s``'s text names in a concepts CSV row (:mod:`sparc.evaluate.text_names`):
    ``text`` (name, '' below the score threshold), ``text_score`` (its z, None without terms),
    ``words`` (the top terms) and, for caption streams with zero-shot names, ``zero_shot``."""
    words = concept_row.get(f"{s}_text_words", "")
    out = {
        "text": concept_row.get(f"{s}_text_name", ""),
        "text_score": csv_number(concept_row.get(f"{s}_text_score")),
        "words": words.split(TERM_SEP) if words else [],
    }
    if f"{s}_zero_shot_name" in concept_row:
        out["zero_shot"] = concept_row[f"{s}_zero_shot_name"]
    return out


def search_key(entry: dict) -> str:
    """The text the search box matches: every concept name of a latent entry (label-derived,
    text names, their top terms, zero-shot names), lower-cased, newline-joined (the page's
    ``search`` field)."""
    names = [entry["agreed"], *entry["name"].values(), *entry.get("text", {}).values()]
    for k in entry.get("kinds", {}).values():
        names.append(k.get("agreed", ""))
        for v in k["stream"].values():
            names.extend([v["name"], v.get("text", ""), *v.get("words", []), v.get("zero_shot", "")])
    seen: list[str] = []
    for n in names:
        n = n.strip().lower()
        if n and n not in seen:
            seen.append(n)
    return "\n".join(seen)


def search_matches(data: dict, query: str) -> list[int]:
    """Latents the search box keeps for ``query`` (the page's rule): all for a blank query, else
    those with a concept name containing it, case-insensitively."""
    q = query.strip().lower()
    return [e["l"] for e in data["latents"] if not q or q in e["search"]]


def localisation_image(i: int, j: int | None = None) -> str:
    """Page-relative path of overlay query ``i``'s image (``j`` None) or of method ``j``'s panel."""
    return f"{LOCALISE}/q{i}.png" if j is None else f"{LOCALISE}/q{i}_m{j}.png"


def localisation_section(metrics: dict | None, overlays: Overlays | None, notes: list[str]) -> dict | None:
    """The page's localisation data (module docstring): ``metrics`` the localise stage's flat
    metrics.json, ``overlays`` its overlay data, either None when absent (``notes`` says why);
    None when both are."""
    if metrics is None and overlays is None:
        return None
    table = []
    if metrics is not None:
        for m, (ap, miou) in LF.localisation_scores(metrics).items():
            table.append({"method": m, "ap": ap, "miou": miou, "chance": m == CHANCE})
    queries = []
    for i, q in enumerate(overlays.queries if overlays else []):
        queries.append({
            "text": q.text, "img": localisation_image(i),
            "panels": [{"method": m, "iou": round(q.ious[m], 4), "img": localisation_image(i, j)}
                       for j, m in enumerate(overlays.methods)],
        })
    return {
        "ap_label": LF.ap_label(overlays.iou_threshold if overlays else None),
        "metrics": table,
        "queries": queries,
        "notes": list(notes),
    }


# --------------------------------------------------------------------------- writing


def write_localisation_images(overlays: Overlays, out: Path, px: int = LOCALISE_PX) -> list[Path]:
    """The PNGs of :func:`localisation_section` under ``out`` (:func:`localisation_image` names,
    :func:`sparc.report.localise_figure.overlay_image` panels); returns their paths."""
    from PIL import Image

    (out / LOCALISE).mkdir(parents=True, exist_ok=True)
    written = []
    for i, q in enumerate(overlays.queries):
        panels = [(localisation_image(i), None), *((localisation_image(i, j), q.heats[m])
                                                   for j, m in enumerate(overlays.methods))]
        for name, heat in panels:
            Image.fromarray(LF.overlay_image(q.image, q.mask, heat, px)).save(out / name, "PNG", optimize=True)
            written.append(out / name)
    return written


def read_localisation(localise: Path) -> tuple[dict | None, Overlays | None, list[str]]:
    """``(metrics, overlays, notes)`` of the localise stage's outputs in ``localise``; a missing
    file gives None and a note (printed), a corrupt one raises."""
    hint = "run `dvc repro localise` or `python -m sparc localise`"
    notes = []
    metrics_path, overlays_path = localise / "metrics.json", localise / "overlays.npz"
    metrics = read_json_object(metrics_path, "localise", "localisation outputs") if metrics_path.is_file() else None
    overlays = read_overlays(overlays_path) if overlays_path.is_file() else None
    for path, value, what in ((metrics_path, metrics, "scores"), (overlays_path, overlays, "overlays")):
        if value is None:
            notes.append(f"no localisation {what}: {path} is missing ({hint})")
            print(f"browser: {notes[-1]}")
    return metrics, overlays, notes


def make_thumb(src: Path, dst: Path, px: int) -> bool:
    """Write a JPEG of ``src`` fitting ``px`` x ``px`` (transparency on white, 16-bit and float
    greyscale scaled by :func:`~sparc.data.images.to_8bit`); False when the image cannot be read."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from sparc.data.images import to_8bit

    try:
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im)
            im.draft("RGB", (px, px))
            rgba = to_8bit(im).convert("RGBA")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False
    rgba.thumbnail((px, px), Image.Resampling.LANCZOS)
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    flat.save(dst, "JPEG", quality=85, optimize=True)
    return True


def _json_for_script(data: dict) -> str:
    """JSON safe inside ``<script>``: no ``<``, ``>`` or ``&`` (escaped), no NaN."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def random_weights_banner(streams: list[str]) -> str:
    """The warning shown first in the page's header when ``streams`` had random-weight models."""
    names = html.escape(", ".join(streams))
    return (
        '<p id="random-weights" style="background:#b00020;color:#fff;padding:6px 10px;font-weight:bold">'
        f"Random weights ({names}): these streams were extracted by randomly initialised models; "
        "every number and concept on this page is meaningless.</p>\n"
    )


def page_template() -> str:
    """The page with its style and script in place, ``{{TITLE}}``, ``{{THUMB}}`` and ``{{DATA}}``
    still to fill: the package files ``sparc/report/browser_page/`` (index.html with
    ``{{STYLE}}`` and ``{{SCRIPT}}`` where style.css and app.js go), read with importlib.resources."""
    files = importlib.resources.files("sparc.report") / PAGE_FILES

    def read(name: str) -> str:
        return (files / name).read_text(encoding="utf-8")

    return read("index.html").replace("{{STYLE}}", read("style.css")).replace("{{SCRIPT}}", read("app.js"))


def render_html(data: dict) -> str:
    """The page with its title, thumbnail size and data filled in (and, for a run with
    random-weight streams, :func:`random_weights_banner` at the top of its header)."""
    fill = {
        "TITLE": html.escape(data["title"]),
        "THUMB": str(int(data["thumb_px"])),
        "DATA": _json_for_script(data),
    }
    page = re.sub(r"\{\{(TITLE|THUMB|DATA)\}\}", lambda m: fill[m.group(1)], page_template())
    if data.get("random_weights"):
        page = page.replace("<header>\n", "<header>\n" + random_weights_banner(data["random_weights"]), 1)
    return page


def embedded_data(index_html: str | Path) -> dict:
    """The JSON blob of a written ``index.html`` (for tests and tools)."""
    text = Path(index_html).read_text(encoding="utf-8")
    start = text.index('<script type="application/json" id="data">') + len('<script type="application/json" id="data">')
    return json.loads(text[start : text.index("</script>", start)])


def build_browser(
    params: Params,
    *,
    prepared_dir: str | Path | None = None,
    codes_dir: str | Path | None = None,
    concepts_dir: str | Path | None = None,
    reports_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    localise_dir: str | Path | None = None,
) -> Path:
    """Write the concept browser (module docstring) to ``out_dir`` (default ``reports/browser``)
    atomically (``<out_dir>.tmp`` then rename) and return ``out_dir``. ``reports_dir`` (default
    ``reports``) holds latents.csv, metrics.json and retrieval.csv; ``localise_dir`` (default
    ``<reports_dir>/localise``) the localise stage's metrics.json and overlays.npz."""
    check_figures(params.figures)
    prepared = load_prepared(prepared_dir or paths.prepared_dir(params.data.dataset))
    codes_dir = Path(codes_dir or paths.codes_dir())
    concepts_dir = Path(concepts_dir or paths.concepts_dir())
    reports_dir = Path(reports_dir or paths.metrics_path().parent)
    out_dir = Path(out_dir or paths.REPORTS / "browser")

    concept_summary = load_concepts(concepts_dir, read_codes_meta(codes_dir), params.L)[1]
    rows = np.union1d(*shown_splits(params, prepared, concept_summary))  # the codes of these rows only
    retrieval_rows = read_csv_rows(reports_dir / RETRIEVAL_CSV)
    ev = load_evaluation(params, prepared, rows, codes_dir=codes_dir, concepts_dir=concepts_dir, reports_dir=reports_dir)

    data = browser_data(
        params, prepared, ev.codes, rows, ev.concepts, ev.concept_summary, ev.latents, ev.metrics,
        retrieval_rows, ev.codes_meta,
    )
    loc_metrics, overlays, loc_notes = read_localisation(Path(localise_dir or reports_dir / LOCALISE))
    data["localisation"] = localisation_section(loc_metrics, overlays, loc_notes)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / THUMBS).mkdir(parents=True)
    px = params.figures.thumb_px
    for row in data["thumbs"]:
        name = f"{row}.jpg"
        if make_thumb(prepared.images[row], tmp / THUMBS / name, px):
            data["samples"][str(row)]["img"] = f"{THUMBS}/{name}"
    if overlays is not None and overlays.queries:
        write_localisation_images(overlays, tmp)
    (tmp / INDEX).write_text(render_html(data), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
