"""The `concepts` stage: a name for every latent in every stream.

Reads ``data/codes/`` (both kinds, :mod:`sparc.evaluate.encode_stage`) and
``data/prepared/<dataset>/`` (labels and hierarchy); computes the concept assignment of
:mod:`sparc.evaluate.concepts` on the split ``concepts.split`` (default test, the paper's setting:
names describe the same samples the other metrics are computed on); refuses codes whose dataset
fingerprint, id order, L or streams do not match the prepared data and params; and writes
``reports/concepts/``::

    concepts.csv   (joint codes) one row per latent: latent, per stream <s>_n_active (firings on
                   the split), <s>_label (dominant label id of the top-n samples), <s>_name (its
                   display name when purity >= purity_threshold, else empty), <s>_purity;
                   agreed_name (the name when every stream names the latent with the same label)
                   then per stream the text names of :mod:`sparc.evaluate.text_names` (from the
                   captions of the same top-n samples, no labels needed): <s>_text_name (the
                   best caption term when its log-odds z-score >= concepts.text_min_score, else
                   empty), <s>_text_score (that z), <s>_text_words (the best concepts.text_words
                   terms, '|'-joined); then, when concepts.zero_shot_vocab > 0, per caption
                   stream whose model can run <s>_zero_shot_name, <s>_zero_shot_score (the same
                   in both files: they come from the encoder, not the codes)
    concepts_per_stream.csv   the same from the per-stream codes
    summary.json   split, n_samples, top_n, purity_threshold, L; for each kind (joint,
                   per_stream): named_fraction{s}, mean_purity{s} (over latents firing in s),
                   agreeing, agreeing_fraction, text_named_fraction{s}; codes (the identity of
                   the codes used: model_sha256, dataset_fingerprint, ids_sha256); text (words,
                   min_score, vocab: terms in the vocabulary, prior); zero_shot (vocab: terms
                   encoded, streams named, skipped: stream -> why)

The label columns come first and are the same whatever the text settings, so a reader of the
label names sees the same cells as before the text names existed.

Zero-shot names (concepts.zero_shot_vocab > 0) also read the trained SAE (``data/sae``, checked
to be the model that encoded the codes) and run each caption stream's extractor on the
vocabulary's most frequent terms, on ``evaluate.device``: :func:`zero_shot_logits`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparc import paths
from sparc.catalog import FAMILIES, parse_spec
from sparc.data.prepared import load_prepared
from sparc.evaluate.concepts import assign_concepts, concept_rows, concept_summary
from sparc.evaluate.labels import LabelSpace
from sparc.evaluate.run_files import (
    CODE_KINDS,
    CONCEPTS_CSV,
    CONCEPTS_SUMMARY,
    EvaluateInputError,
    codes_to_csr,
    evaluate_device,
    fresh_tmp,
    load_codes,
    load_model,
    model_sha256,
    replace_dir,
    split_rows,
    write_csv,
    write_json,
)
from sparc.evaluate.text_names import (
    PRIOR,
    TermMatrix,
    caption_terms,
    text_columns,
    text_names,
    top_indicator,
    zero_shot_names,
)
from sparc.params import Params, check_concepts


def zero_shot_streams(params: Params) -> tuple[list[str], dict[str, str]]:
    """The caption streams that get zero-shot names, and the others that could not (stream ->
    why: precomputed features have no model to encode words with)."""
    named, skipped = [], {}
    for s, spec in params.streams.items():
        if spec.input != "caption":
            continue
        if FAMILIES[parse_spec(spec.model).family].precomputed:
            skipped[s] = "precomputed features: no model to encode the terms"
        else:
            named.append(s)
    return named, skipped


def zero_shot_logits(
    params: Params, sae_dir: Path, streams: list[str], terms: list[str], model_hash: str, device: str,
) -> dict[str, np.ndarray]:
    """Per caption stream ``[W, L]`` pre-activations of the SAE's encoder for that stream on the
    ``terms``, each embedded alone as a caption by the stream's extractor (float16-rounded as the
    feature store keeps captions). EvaluateInputError when ``sae_dir`` is not the model of
    ``model_hash`` (the one that encoded the codes)."""
    import torch

    from sparc.features.registry import caption_embedder

    if model_sha256(sae_dir) != model_hash:
        raise EvaluateInputError(
            f"{sae_dir}: not the model that encoded the codes (concepts.zero_shot_vocab needs both); "
            "run `dvc repro encode`"
        )
    model = load_model(params, sae_dir, device)
    out = {}
    for s in streams:
        feats = caption_embedder(params.streams[s].model, device=device)(terms)
        with torch.no_grad():
            out[s] = model.logits({s: torch.from_numpy(feats).to(device)})[s].float().cpu().numpy()
    return out


def run_concepts(
    params: Params,
    *,
    codes_dir: str | Path | None = None,
    prepared_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    sae_dir: str | Path | None = None,
    device: str | None = None,
) -> Path:
    """The `concepts` stage: name every latent per stream from labels (sparc.evaluate.concepts)
    and from captions (sparc.evaluate.text_names) on ``concepts.split``; writes the CSVs and
    ``summary.json`` to ``out_dir``. ``sae_dir`` and ``device`` (default ``evaluate.device``) are
    read only for zero-shot names."""
    check_concepts(params.concepts)
    cp = params.concepts
    prepared = load_prepared(prepared_dir or paths.prepared_dir(params.data.dataset))
    codes_dir = Path(codes_dir or paths.codes_dir())
    out_dir = Path(out_dir or paths.concepts_dir())
    split = cp.split
    rows = split_rows(prepared, split)
    space = LabelSpace(prepared.hierarchy)
    labels = space.matrix([prepared.labels[i] for i in rows])
    terms = caption_terms([prepared.captions[i] for i in rows], cp.text_vocab)
    summary: dict = {
        "split": split,
        "n_samples": int(rows.size),
        "top_n": cp.top_n,
        "purity_threshold": cp.purity_threshold,
        "L": params.L,
    }
    tables, texts = {}, {}
    for kind in CODE_KINDS:
        codes, meta = load_codes(codes_dir, kind, prepared, params, rows=rows)
        csr = codes_to_csr(codes)
        tables[kind] = assign_concepts(csr, labels, space, cp.top_n, cp.purity_threshold)
        texts[kind] = {
            s: text_names(top_indicator(tables[kind].top[s], csr[s].shape), terms, cp.text_words, cp.text_min_score)
            for s in csr
        }
        summary[kind] = concept_summary(tables[kind])
        summary[kind]["text_named_fraction"] = {s: float(np.mean([bool(n) for n in t.name])) for s, t in texts[kind].items()}
    summary["codes"] = {k: meta.get(k) for k in ("model_sha256", "dataset_fingerprint", "ids_sha256")}
    summary["text"] = {"words": cp.text_words, "min_score": cp.text_min_score, "vocab": len(terms.terms), "prior": PRIOR}
    zero_shot = zero_shot_columns(params, terms, summary, Path(sae_dir or paths.sae_dir()), device)
    tmp = fresh_tmp(out_dir)
    for kind, table in tables.items():
        out = concept_rows(table)
        for row, text, zs in zip(out, text_columns(params.stream_names, texts[kind]), zero_shot, strict=True):
            row.update(text)
            row.update(zs)
        write_csv(tmp / CONCEPTS_CSV[kind], out)
    write_json(tmp / CONCEPTS_SUMMARY, summary)
    replace_dir(tmp, out_dir)
    return out_dir


def zero_shot_columns(params: Params, terms: TermMatrix, summary: dict, sae_dir: Path, device: str | None) -> list[dict]:
    """Per latent the cells ``<s>_zero_shot_name``, ``<s>_zero_shot_score`` of every caption
    stream :func:`zero_shot_streams` names (empty dicts when ``concepts.zero_shot_vocab`` is 0);
    records ``summary["zero_shot"]``."""
    cells: list[dict] = [{} for _ in range(params.L)]
    n = params.concepts.zero_shot_vocab
    if n == 0:
        return cells
    streams, skipped = zero_shot_streams(params)
    words = [terms.terms[j] for j in terms.most_frequent(n)]
    summary["zero_shot"] = {"vocab": len(words), "streams": streams, "skipped": skipped}
    if not streams or not words:
        return cells
    logits = zero_shot_logits(params, sae_dir, streams, words, summary["codes"]["model_sha256"],
                              evaluate_device(params, device))
    for s in streams:
        names, scores = zero_shot_names(logits[s], words)
        for row, name, score in zip(cells, names, scores, strict=True):
            row[f"{s}_zero_shot_name"] = name
            row[f"{s}_zero_shot_score"] = round(float(score), 6)
    return cells
