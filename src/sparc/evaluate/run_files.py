"""The files of the encode, concepts and evaluate stages: their names, the loaders every reader
shares (the stages, :mod:`sparc.localise.stage`, :mod:`sparc.report`), and the atomic writers.

Written by ``encode`` (:mod:`sparc.evaluate.encode_stage`): ``data/codes/{joint,per_stream}/``
(SparseCodes) and ``data/codes/meta.json``; by ``concepts`` (:mod:`sparc.evaluate.concepts_stage`):
``reports/concepts/{concepts.csv,concepts_per_stream.csv,summary.json}``; by ``evaluate``
(:mod:`sparc.evaluate.evaluate_stage`): ``reports/metrics.json``, ``headline.json``, the CSVs and
``plots/``. The formats are in those modules' docstrings.

The loaders check that what they read belongs together: codes whose dataset fingerprint, id order,
L or streams do not match the prepared data and params, codes of another model (``model_sha256``),
concepts computed from other codes, a model or features that do not match params.yaml raise
:class:`EvaluateInputError` naming the file and the stage to re-run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sparc.data.prepared import PreparedIndex, file_sha256
from sparc.evaluate.metrics import code_matrix
from sparc.model.codes import SparseCodes
from sparc.params import Params, ParamsError

EVAL_SPLIT = "test"
HEADLINE = "headline.json"  # next to metrics.json: sparc.evaluate.headline
PLOTS_DIR = "plots"
MODEL_FILE = "model.safetensors"
CODES_META = "meta.json"
# The two kinds of codes (sparc.evaluate.encode_stage): the model's own inference rule, and each stream alone.
CODE_KINDS = ("joint", "per_stream")
CONCEPTS_CSV = {"joint": "concepts.csv", "per_stream": "concepts_per_stream.csv"}
CONCEPTS_SUMMARY = "summary.json"


class EvaluateInputError(ValueError):
    """Codes, concepts, model or data that do not belong together (the message says which)."""


# --------------------------------------------------------------------------- identities


def ids_sha256(ids: list[str]) -> str:
    """SHA-256 of the ids joined by newlines (identifies the row order)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def model_sha256(sae_dir: str | Path) -> str:
    """SHA-256 of ``<sae_dir>/model.safetensors``; FileNotFoundError when it is missing."""
    path = Path(sae_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"trained SAE not found: {path} is missing (run `dvc repro train`)")
    return file_sha256(path)


# --------------------------------------------------------------------------- writers


def replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def fresh_tmp(out: Path) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _finite(obj):
    """Replace NaN / inf by None so the JSON is valid for every reader."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(_finite(obj), indent=2, ensure_ascii=False) + "\n")


def write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    fields = fields or (list(rows[0]) if rows else [])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def csv_cell(x) -> object:
    """CSV cell: floats rounded to 6 significant decimals, None/NaN as empty."""
    if x is None:
        return ""
    if isinstance(x, (float, np.floating)):
        return "" if not math.isfinite(x) else round(float(x), 6)
    return x



def csv_number(cell: object, missing: float | None = None) -> float | None:
    """A CSV cell (or a JSON value) as a float, the reader's side of :func:`csv_cell`: ``missing``
    for an empty, absent, non-numeric or non-finite one (None, or NaN for arithmetic)."""
    if cell is None or cell == "":
        return missing
    try:
        x = float(cell)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return missing
    return x if math.isfinite(x) else missing


# --------------------------------------------------------------------------- readers


def split_rows(prepared: PreparedIndex, split: str) -> np.ndarray:
    """Row indices of ``split`` (train | val | test | all); EvaluateInputError when empty."""
    rows = np.arange(len(prepared)) if split == "all" else prepared.indices(split)
    if rows.size == 0:
        raise EvaluateInputError(f"the prepared dataset has no {split!r} samples to evaluate on")
    return rows


def codes_to_csr(codes: SparseCodes, rows: np.ndarray | None = None) -> dict[str, sp.csr_matrix]:
    """Per stream ``[n, L]`` CSR of the given rows (all rows when None)."""
    out = {}
    for s in codes.streams:
        idx, val = codes.indices[s], codes.values[s]
        if rows is not None:
            idx, val = idx[rows], val[rows]
        out[s] = code_matrix(idx, val, codes.L)
    return out


def read_json_object(path: str | Path, stage: str, what: str) -> dict:
    """``path`` read as a JSON object. FileNotFoundError when missing, EvaluateInputError when
    unreadable or not an object; both name ``what`` / the file and the stage to re-run."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} incomplete: {path} is missing (run `dvc repro {stage}`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvaluateInputError(f"{path}: unreadable ({err}); run `dvc repro {stage}`") from None
    if not isinstance(data, dict):
        raise EvaluateInputError(f"{path}: expected a JSON object; run `dvc repro {stage}`")
    return data


def read_codes_meta(codes_dir: str | Path) -> dict:
    """``<codes_dir>/meta.json``; FileNotFoundError / EvaluateInputError when missing or unreadable."""
    return read_json_object(Path(codes_dir) / CODES_META, "encode", "sparse codes")


def load_codes(
    codes_dir: str | Path,
    kind: str,
    prepared: PreparedIndex,
    params: Params,
    model_hash: str | None = None,
    rows: np.ndarray | None = None,
) -> tuple[SparseCodes, dict]:
    """Load ``<codes_dir>/<kind>`` (joint | local) and check it belongs to ``prepared``, ``params``
    and (when given) the model with SHA-256 ``model_hash``. Returns ``(codes, meta)``: the codes of
    every prepared row, or of the prepared rows ``rows`` only (e.g. one split; the other rows are
    not read, so a stage holds the split's codes, not the whole dataset's). The ids of every row are
    checked; the values of the rows returned."""
    codes_dir = Path(codes_dir)
    meta = read_codes_meta(codes_dir)
    if model_hash is not None and meta.get("model_sha256") != model_hash:
        raise EvaluateInputError(
            f"{codes_dir}: codes were encoded by another model (sha256 {str(meta.get('model_sha256'))[:12]}..., "
            f"the trained SAE is {model_hash[:12]}...); run `dvc repro encode`"
        )
    if meta.get("dataset_fingerprint") != prepared.fingerprint:
        raise EvaluateInputError(
            f"{codes_dir}: codes belong to another prepared dataset (fingerprint "
            f"{str(meta.get('dataset_fingerprint'))[:12]}..., prepared data {prepared.fingerprint[:12]}...)"
        )
    try:
        stored = SparseCodes.read_meta(codes_dir / kind)
        ids = stored["ids"]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EvaluateInputError(f"{codes_dir / kind}: cannot read the codes ({err}); run `dvc repro encode`") from None
    if ids != prepared.ids:
        if len(ids) != len(prepared.ids):
            raise EvaluateInputError(f"{codes_dir / kind}: {len(ids)} rows, the prepared dataset has {len(prepared.ids)}")
        row = next(i for i, (a, b) in enumerate(zip(ids, prepared.ids, strict=True)) if a != b)
        raise EvaluateInputError(
            f"{codes_dir / kind}: row {row} has id {ids[row]!r}, the prepared dataset has "
            f"{prepared.ids[row]!r} (id order mismatch)"
        )
    try:
        codes = SparseCodes.load(codes_dir / kind, rows=rows, meta=stored)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise EvaluateInputError(f"{codes_dir / kind}: cannot read the codes ({err}); run `dvc repro encode`") from None
    if codes.L != params.L:
        raise EvaluateInputError(f"{codes_dir / kind}: codes have L={codes.L}, params.yaml has L={params.L}")
    if codes.streams != params.stream_names:
        raise EvaluateInputError(
            f"{codes_dir / kind}: codes have streams {codes.streams}, params.yaml has {params.stream_names}"
        )
    n = len(codes.ids)
    for s in codes.streams:
        idx, val = codes.indices[s], codes.values[s]
        if idx.ndim != 2 or idx.shape != val.shape or idx.shape[0] != n:
            raise EvaluateInputError(
                f"{codes_dir / kind}: stream {s} has indices {idx.shape} and values {val.shape} for {n} ids"
            )
        if idx.size and (idx.min() < 0 or idx.max() >= codes.L):
            raise EvaluateInputError(f"{codes_dir / kind}: stream {s} has latent ids outside [0, {codes.L})")
        if not np.isfinite(val).all():
            raise EvaluateInputError(f"{codes_dir / kind}: stream {s} has non-finite activations")
    return codes, meta


def load_features(params: Params, features_root: Path, prepared: PreparedIndex):
    """The feature store of every stream in params.yaml (stream -> FeatureStream, memory-mapped),
    checked against the prepared ids and fingerprint."""
    from sparc.features.store import load_streams

    streams = load_streams(features_root, params.stream_names)
    first = streams[params.stream_names[0]]
    if first.ids != prepared.ids:
        raise EvaluateInputError(
            f"{features_root}: feature rows do not match the prepared dataset's ids (re-run `dvc repro extract`)"
        )
    fp = first.meta.get("dataset_fingerprint")
    if fp is not None and fp != prepared.fingerprint:
        raise EvaluateInputError(
            f"{features_root}: features were extracted from another prepared dataset (re-run `dvc repro extract`)"
        )
    return streams


def load_model(params: Params, sae_dir: Path, device: str):
    """The trained SAE on ``device``, checked against params.yaml's streams, L, k and topk."""
    from sparc.model.io import load_sae

    model = load_sae(sae_dir, device=device)
    if list(model.streams) != params.stream_names:
        raise EvaluateInputError(
            f"{sae_dir}: the SAE has streams {list(model.streams)}, params.yaml has {params.stream_names}"
        )
    for key, have, want in (("L", model.cfg.L, params.L), ("k", model.cfg.k, params.k), ("topk", model.cfg.topk, params.topk)):
        if have != want:
            raise EvaluateInputError(
                f"{sae_dir}: the SAE has {key}={have}, params.yaml has {key}={want} (run `dvc repro train`)"
            )
    return model


def evaluate_device(params: Params, device: str | None) -> str:
    """``device`` or ``evaluate.device``, resolved (ParamsError when unavailable)."""
    from sparc.device import resolve_device

    try:
        return str(resolve_device(device or params.evaluate.device, "evaluate.device"))
    except ValueError as err:
        raise ParamsError(str(err)) from None


def load_concepts(concepts_dir: str | Path, codes_meta: dict, L: int) -> tuple[dict[str, list[dict]], dict]:
    """Read the concepts stage's CSVs (kind -> rows) and summary; EvaluateInputError when they
    were computed from other codes or for another L."""
    concepts_dir = Path(concepts_dir)
    for name in (*CONCEPTS_CSV.values(), CONCEPTS_SUMMARY):
        if not (concepts_dir / name).is_file():
            raise FileNotFoundError(f"concepts incomplete: {concepts_dir / name} is missing (run `dvc repro concepts`)")
    tables: dict[str, list[dict]] = {}
    try:
        summary = json.loads((concepts_dir / CONCEPTS_SUMMARY).read_text())
        used = summary["codes"]
        latents = {}
        for kind, name in CONCEPTS_CSV.items():
            with (concepts_dir / name).open(newline="") as fh:
                tables[kind] = list(csv.DictReader(fh))
            latents[name] = [int(r["latent"]) for r in tables[kind]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise EvaluateInputError(f"{concepts_dir}: unreadable concepts ({err!r}); run `dvc repro concepts`") from None
    for name, ids in latents.items():
        if ids != list(range(L)):
            raise EvaluateInputError(f"{concepts_dir / name}: expected one row per latent 0..{L - 1}")
    for key in ("model_sha256", "dataset_fingerprint", "ids_sha256"):
        if used.get(key) != codes_meta.get(key):
            raise EvaluateInputError(
                f"{concepts_dir}: concepts were computed from other codes ({key} differs); run `dvc repro concepts`"
            )
    return tables, summary
