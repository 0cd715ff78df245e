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
    concepts_per_stream.csv   the same from the per-stream codes
    summary.json   split, n_samples, top_n, purity_threshold, L; for each kind (joint,
                   per_stream): named_fraction{s}, mean_purity{s} (over latents firing in s),
                   agreeing, agreeing_fraction; codes (the identity of the codes used:
                   model_sha256, dataset_fingerprint, ids_sha256)
"""

from __future__ import annotations

from pathlib import Path

from sparc import paths
from sparc.data.prepared import load_prepared
from sparc.evaluate.concepts import assign_concepts, concept_rows, concept_summary
from sparc.evaluate.labels import LabelSpace
from sparc.evaluate.run_files import (
    CODE_KINDS,
    CONCEPTS_CSV,
    CONCEPTS_SUMMARY,
    codes_to_csr,
    fresh_tmp,
    load_codes,
    replace_dir,
    split_rows,
    write_csv,
    write_json,
)
from sparc.params import Params, check_concepts


def run_concepts(
    params: Params,
    *,
    codes_dir: str | Path | None = None,
    prepared_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> Path:
    """The `concepts` stage: name every latent per stream (sparc.evaluate.concepts) on
    ``concepts.split``; writes ``concepts.csv`` and ``summary.json`` to ``out_dir``."""
    check_concepts(params.concepts)
    prepared = load_prepared(prepared_dir or paths.prepared_dir(params.data.dataset))
    codes_dir = Path(codes_dir or paths.codes_dir())
    out_dir = Path(out_dir or paths.concepts_dir())
    split = params.concepts.split
    rows = split_rows(prepared, split)
    space = LabelSpace(prepared.hierarchy)
    labels = space.matrix([prepared.labels[i] for i in rows])
    summary: dict = {
        "split": split,
        "n_samples": int(rows.size),
        "top_n": params.concepts.top_n,
        "purity_threshold": params.concepts.purity_threshold,
        "L": params.L,
    }
    tables = {}
    for kind in CODE_KINDS:
        codes, meta = load_codes(codes_dir, kind, prepared, params, rows=rows)
        tables[kind] = assign_concepts(
            codes_to_csr(codes), labels, space, params.concepts.top_n, params.concepts.purity_threshold
        )
        summary[kind] = concept_summary(tables[kind])
    summary["codes"] = {k: meta.get(k) for k in ("model_sha256", "dataset_fingerprint", "ids_sha256")}
    tmp = fresh_tmp(out_dir)
    for kind, table in tables.items():
        write_csv(tmp / CONCEPTS_CSV[kind], concept_rows(table))
    write_json(tmp / CONCEPTS_SUMMARY, summary)
    replace_dir(tmp, out_dir)
    return out_dir
