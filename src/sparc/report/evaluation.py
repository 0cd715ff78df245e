"""The evaluation outputs the figures and browser stages draw, loaded and checked in one place.

:func:`load_evaluation` reads the codes of both kinds (``data/codes/``, of the prepared rows asked
for only), the concepts stage's tables and summary, and the evaluate stage's ``metrics.json`` and
``latents.csv``; it refuses outputs that do not belong together: the checks of
:mod:`sparc.evaluate.run_files` (codes against the prepared data and params, concepts against the
codes), ``metrics.json``'s ``n_eval`` against the test split, and ``latents.csv`` against the
codes (one row per latent, the firing frequencies of the joint codes on the test split) and the
concepts (the names).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparc.data.prepared import PreparedIndex
from sparc.evaluate.metrics import firing_counts
from sparc.evaluate.run_files import (
    CODE_KINDS,
    EVAL_SPLIT,
    EvaluateInputError,
    codes_to_csr,
    csv_number,
    load_codes,
    load_concepts,
    read_codes_meta,
    read_json_object,
    split_rows,
)
from sparc.model.codes import SparseCodes
from sparc.params import Params

METRICS = "metrics.json"
LATENTS_CSV = "latents.csv"
RETRIEVAL_CSV = "retrieval.csv"
FREQ_TOLERANCE = 1e-6  # latents.csv rounds to 6 decimals


@dataclass
class Evaluation:
    """One run's evaluation outputs: ``codes`` kind -> SparseCodes of the prepared rows ``rows``
    (ascending), ``codes_meta`` (data/codes/meta.json), ``concepts`` kind -> rows of the concepts
    CSVs and ``concept_summary``, ``metrics`` (metrics.json) and ``latents`` (latents.csv rows)."""

    rows: np.ndarray
    codes: dict[str, SparseCodes]
    codes_meta: dict
    concepts: dict[str, list[dict]]
    concept_summary: dict
    metrics: dict
    latents: list[dict]


def read_csv_rows(path: Path) -> list[dict]:
    """The rows of one of the evaluate stage's CSVs; FileNotFoundError naming the stage."""
    if not path.is_file():
        raise FileNotFoundError(f"evaluation outputs incomplete: {path} is missing (run `dvc repro evaluate`)")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def check_latents(
    latents: list[dict], path: Path, streams: list[str], joint_freq: dict[str, np.ndarray], n_eval: int,
    concepts: list[dict],
) -> None:
    """latents.csv must have one row per latent and agree with the codes and concepts."""
    L = len(concepts)
    if [r.get("latent") for r in latents] != [str(i) for i in range(L)]:
        raise EvaluateInputError(f"{path}: expected one row per latent 0..{L - 1}; run `dvc repro evaluate`")
    need = {"agreed_name", "pattern", "alive_in", "per_stream_pattern", "per_stream_alive_in"}
    need |= {f"{c}_{s}" for s in streams for c in ("name", "purity", "freq")}
    missing = sorted(need - set(latents[0]))
    if missing:
        raise EvaluateInputError(f"{path}: columns {', '.join(missing)} are missing; run `dvc repro evaluate`")
    for s in streams:
        got = np.array([csv_number(r[f"freq_{s}"]) or 0.0 for r in latents])
        if np.abs(got - joint_freq[s] / n_eval).max() > FREQ_TOLERANCE:
            raise EvaluateInputError(
                f"{path}: firing frequencies of stream {s} do not match the codes (stale evaluation); "
                "run `dvc repro evaluate`"
            )
    for r, c in zip(latents, concepts, strict=True):
        if r["agreed_name"] != c["agreed_name"] or any(r[f"name_{s}"] != c[f"{s}_name"] for s in streams):
            raise EvaluateInputError(
                f"{path}: latent {r['latent']} is named differently from the concepts (stale evaluation); "
                "run `dvc repro evaluate`"
            )


def load_evaluation(
    params: Params,
    prepared: PreparedIndex,
    rows: np.ndarray,
    *,
    codes_dir: Path,
    concepts_dir: Path,
    reports_dir: Path,
) -> Evaluation:
    """The outputs of encode, concepts and evaluate (module docstring), with the codes of the
    prepared rows ``rows`` only (ascending; they must include the test split's)."""
    meta = read_codes_meta(codes_dir)
    concepts, concept_summary = load_concepts(concepts_dir, meta, params.L)
    codes = {kind: load_codes(codes_dir, kind, prepared, params, rows=rows)[0] for kind in CODE_KINDS}
    metrics = read_json_object(reports_dir / METRICS, "evaluate", "evaluation outputs")
    test_rows = split_rows(prepared, EVAL_SPLIT)
    if metrics.get("n_eval") != int(test_rows.size):
        raise EvaluateInputError(
            f"{reports_dir / METRICS}: n_eval {metrics.get('n_eval')} but the prepared data has "
            f"{test_rows.size} test samples; run `dvc repro evaluate`"
        )
    latents = read_csv_rows(reports_dir / LATENTS_CSV)
    joint = codes_to_csr(codes["joint"], np.searchsorted(rows, test_rows))
    freq = {s: firing_counts(m) for s, m in joint.items()}
    check_latents(latents, reports_dir / LATENTS_CSV, params.stream_names, freq, int(test_rows.size), concepts["joint"])
    return Evaluation(rows, codes, meta, concepts, concept_summary, metrics, latents)
