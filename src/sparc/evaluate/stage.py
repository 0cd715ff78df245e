"""The `encode`, `concepts` and `evaluate` stages.

Two kinds of sparse codes are evaluated side by side:

* ``joint``: every stream encoded together with the model's own inference rule (Global TopK for
  ``topk: global``, each stream its own top-k for ``topk: local`` and for USAE, which params.py
  requires to be ``topk: local``). The paper's protocol for concepts, Jaccard, patterns and
  probes. Under Global TopK all streams share one index set per sample, so joint alignment
  metrics are close to perfect by construction, and the joint code of a source stream was chosen
  with the target stream's logits too (its cross reconstruction knows the target).
* ``per_stream``: each stream encoded alone (its own top-k), as a user with one modality would;
  the like-for-like way to compare TopK rules, and the leak-free cross reconstruction. Retrieval
  always uses these (the shared indices would leak the answer).

encode (``run_encode``) writes ``data/codes/``::

    joint/codes.npz, joint/codes.json            SparseCodes of every prepared row, joint
    per_stream/codes.npz, per_stream/codes.json  ... per-stream inference
    meta.json     model_sha256 (of model.safetensors), dataset, dataset_fingerprint, ids_sha256,
                  n, L, k, streams, joint_mode (the rule of the joint codes)

encode refuses a model whose streams, L, k or topk differ from params.yaml, and features that do
not match the prepared ids. concepts and evaluate refuse codes whose dataset fingerprint, id order,
L or streams do not match the prepared data and params; evaluate also refuses codes encoded by
another model (model_sha256 against data/sae) and concepts computed from other codes.

concepts (``run_concepts``) writes ``reports/concepts/``::

    concepts.csv   (joint codes) one row per latent: latent, per stream <s>_n_active (firings on
                   the split), <s>_label (dominant label id of the top-n samples), <s>_name (its
                   display name when purity >= purity_threshold, else empty), <s>_purity;
                   agreed_name (the name when every stream names the latent with the same label)
    concepts_per_stream.csv   the same from the per-stream codes
    summary.json   split, n_samples, top_n, purity_threshold, L; for each kind (joint,
                   per_stream): named_fraction{s}, mean_purity{s} (over latents firing in s),
                   agreeing, agreeing_fraction; codes (the identity of the codes used:
                   model_sha256, dataset_fingerprint, ids_sha256)

The split is ``concepts.split`` (default test, the paper's setting: names describe the same
samples the other metrics are computed on).

evaluate (``run_evaluate``) computes everything on the test split and writes ``reports/``:
``headline.json`` (the DVC metrics: a flat selection, sparc.evaluate.headline), ``plots/*.csv``
(the evaluation plots of dvc.yaml), and the full ``metrics.json``, ``<kind>`` being ``joint`` or
``per_stream``::

    n_eval                       number of test samples
    sparsity.l0_<kind>.<s>       mean non-zeros per sample (the real L0)
    concepts.<kind>.{named_fraction.<s>, mean_purity.<s>, agreeing, agreeing_fraction}
    jaccard.<kind>.depth_<d>.all hierarchical generalised Jaccard at depth d (0 = root), mean
                                 over all L latents
    jaccard.<kind>.depth_<d>.live  the same over live latents (firing in >= 1 stream on test)
    jaccard.<kind>.n_live        number of live latents
    patterns.<kind>.{alive_all,dead_all,mixed}      fractions of L
    patterns.<kind>.counts.{alive_all,dead_all,mixed}
    patterns.<kind>.combinations.<s1+s2..|none>     latents alive in exactly that set of streams
    patterns.<kind>.dead_fraction.<s>
    reconstruction.<kind>.{self_nmse_mean, cross_nmse_mean, self_fvu_mean, cross_fvu_mean}
    reconstruction.<kind>.nmse.<s>-><t>, .fvu.<s>-><t>   the M x M matrices; source s's code
                                 decoded by t's decoder (per_stream cross = leak-free)
    probes.mean_test_logloss.<s>, probes.mean_test_accuracy.<s>, probes.n_classes,
    probes.chance (= ln 2), probes.reason (why there are no probes; null when they ran)
                                 1-D probes on the joint codes (the paper's protocol)
    retrieval.n                  gallery size (the test samples, one caption per image)
    retrieval.chance.{R@1,R@5,R@10,median_rank,MRR}
    retrieval.<s>-><t>.{R@1,R@5,R@10,median_rank,MRR}       per-stream codes, query s, gallery t
    retrieval.raw.<s>-><t>.{...}  raw features, only for pairs sharing a space (same OpenCLIP
                                  model, image vs caption); other pairs are absent here and have
                                  a row with applicable=False (empty metrics) in retrieval.csv
    universality.<kind>.{firing_entropy_mean,cofire_mean,n_firing}   USAE metrics
    random_weights, warning      only when some streams' features come from random-weight
                                 models (sparc.features.random_weights): those streams, and
                                 that the numbers are no result

Undefined values (a mean over nothing) are ``null``. Retrieval and reconstruction run on
``evaluate.device``; retrieval ranks count ties as a uniformly random order. On the CPU, code
retrieval runs on an inverted index of the codes, with the counts of the dense computation
(sparc.evaluate.retrieval).

``latents.csv``: latent, agreed_name, per stream name_<s>, purity_<s> (from concepts), freq_<s>
(firing fraction on test, joint codes), jaccard_d<d> per depth, pattern (alive_all | dead_all |
mixed), alive_in (streams the latent fires in, '+'-joined, 'none'), firing_entropy, cofire
(joint codes; empty for latents that never fire), per_stream_jaccard_d<d>, per_stream_pattern,
per_stream_alive_in (per-stream codes).
``retrieval.csv``: query, gallery, representation (codes | raw | chance), applicable, n, R@1,
R@5, R@10, median_rank, MRR.
``probes.csv``: label, name, depth, n_positives, n_balanced, stream, latent, val_logloss,
test_logloss, test_accuracy.
``reconstruction.csv``: codes (joint | per_stream), source, target, kind (self | cross), nmse, fvu.

Protocol details are in the docstrings of sparc.evaluate.{metrics,concepts,jaccard,probes,
retrieval,reconstruction}.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sparc import paths
from sparc.data.prepared import (
    PreparedIndex,
    file_sha256,
    load_prepared,
    load_prepared_index,
)
from sparc.evaluate.concepts import assign_concepts, concept_rows, concept_summary
from sparc.evaluate.headline import headline, plot_tables
from sparc.evaluate.jaccard import hierarchical_jaccard, jaccard_summary
from sparc.evaluate.labels import LabelSpace
from sparc.evaluate.metrics import (
    activation_patterns,
    chance_retrieval,
    code_matrix,
    cofire_counts,
    cofire_proportion,
    firing_counts,
    firing_entropy,
    retrieval_metrics,
)
from sparc.evaluate.probes import (
    ProbeResult,
    no_probe_reason,
    probe_rows,
    probe_summary,
    run_probes,
)
from sparc.evaluate.reconstruction import reconstruction_matrix, reconstruction_summary
from sparc.evaluate.retrieval import pair_rank_counts, shares_space
from sparc.features.random_weights import WARNING as RANDOM_WARNING
from sparc.features.random_weights import random_streams
from sparc.model.codes import SparseCodes
from sparc.params import Params, ParamsError, check_concepts, check_evaluate

EVAL_SPLIT = "test"
HEADLINE = "headline.json"  # next to metrics.json: sparc.evaluate.headline
PLOTS_DIR = "plots"
MODEL_FILE = "model.safetensors"
CODES_META = "meta.json"
# The two kinds of codes (module docstring): the model's own inference rule, and each stream alone.
CODE_KINDS = ("joint", "per_stream")
CONCEPTS_CSV = {"joint": "concepts.csv", "per_stream": "concepts_per_stream.csv"}
CONCEPTS_SUMMARY = "summary.json"
RETRIEVAL_KS = (1, 5, 10)
RETRIEVAL_FIELDS = [
    "query", "gallery", "representation", "applicable", "n", *[f"R@{k}" for k in RETRIEVAL_KS], "median_rank", "MRR",
]


class EvaluateInputError(ValueError):
    """Codes, concepts, model or data that do not belong together (the message says which)."""


# errno values of a write refused for want of room: disk full, file-size limit (`ulimit -f`), quota.
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


# --------------------------------------------------------------------------- helpers


def ids_sha256(ids: list[str]) -> str:
    """SHA-256 of the ids joined by newlines (identifies the row order)."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def model_sha256(sae_dir: str | Path) -> str:
    """SHA-256 of ``<sae_dir>/model.safetensors``; FileNotFoundError when it is missing."""
    path = Path(sae_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"trained SAE not found: {path} is missing (run `dvc repro train`)")
    return file_sha256(path)


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _fresh_tmp(out: Path) -> Path:
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


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(_finite(obj), indent=2, ensure_ascii=False) + "\n")


def _write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    fields = fields or (list(rows[0]) if rows else [])
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(x) -> object:
    """CSV cell: floats rounded to 6 significant decimals, None/NaN as empty."""
    if x is None:
        return ""
    if isinstance(x, (float, np.floating)):
        return "" if not math.isfinite(x) else round(float(x), 6)
    return x


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


def _load_features(params: Params, features_root: Path, prepared: PreparedIndex):
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


def _load_model(params: Params, sae_dir: Path, device: str):
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


def _device(params: Params, device: str | None) -> str:
    from sparc.device import resolve_device

    try:
        return str(resolve_device(device or params.evaluate.device, "evaluate.device"))
    except ValueError as err:
        raise ParamsError(str(err)) from None


# --------------------------------------------------------------------------- encode


def run_encode(
    params: Params,
    *,
    sae_dir: str | Path | None = None,
    features_root: str | Path | None = None,
    prepared_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """The `encode` stage: joint and per-stream sparse codes of every prepared row (see module
    docstring). Writes ``out_dir`` (default ``data/codes``) atomically and returns it."""
    from sparc.model.io import encode_dataset

    check_evaluate(params.evaluate)
    dataset = params.data.dataset
    sae_dir = Path(sae_dir or paths.sae_dir())
    features_root = Path(features_root or paths.features_root(dataset))
    prepared = load_prepared_index(prepared_dir or paths.prepared_dir(dataset))
    out_dir = Path(out_dir or paths.codes_dir())
    dev = _device(params, device)

    model_hash = model_sha256(sae_dir)
    model = _load_model(params, sae_dir, dev)
    streams = _load_features(params, features_root, prepared)
    for s, fs in streams.items():
        if fs.dim != model.cfg.dims[s]:
            raise EvaluateInputError(f"stream {s}: features have dim {fs.dim}, the SAE expects {model.cfg.dims[s]}")
    features = {s: fs.features for s, fs in streams.items()}
    joint_mode = model.cfg.topk
    tmp = _fresh_tmp(out_dir)
    try:
        for kind, mode in (("joint", joint_mode), ("per_stream", "local")):
            codes = encode_dataset(
                model, features, prepared.ids, mode=mode, batch_size=params.evaluate.batch_size,
                device=dev, progress=progress,
            )
            codes.save(tmp / kind)
            del codes  # one kind's codes in memory at a time (2.8 GB each at the paper's 1.8M rows)
        meta = {
            "model_sha256": model_hash,
            "dataset": prepared.meta.get("dataset"),
            "dataset_fingerprint": prepared.fingerprint,
            "ids_sha256": ids_sha256(prepared.ids),
            "n": len(prepared.ids),
            "L": model.cfg.L,
            "k": model.cfg.k,
            "streams": list(model.streams),
            "joint_mode": joint_mode,
        }
        _write_json(tmp / CODES_META, meta)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left next to the old codes
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            raise EvaluateInputError(
                f"{tmp}: no room to write the codes ({err.strerror}): they need about "
                f"{_codes_bytes(len(prepared.ids), model.cfg.k, len(model.streams)) / 2**20:.1f} MiB "
                f"there; free disk space (or raise the file-size limit, `ulimit -f`) and run "
                f"`dvc repro encode` again ({out_dir} is unchanged)"
            ) from None
        raise
    _replace_dir(tmp, out_dir)
    return out_dir


def _codes_bytes(n: int, k: int, n_streams: int) -> int:
    """Bytes ``encode`` writes: two kinds of codes x ``n_streams`` x ``n`` rows x ``k`` latents x
    (int32 index + float32 value), plus two copies of the ids (about 16 bytes each)."""
    return 2 * n_streams * n * k * 8 + 2 * 16 * n


# --------------------------------------------------------------------------- concepts


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
    tmp = _fresh_tmp(out_dir)
    for kind, table in tables.items():
        _write_csv(tmp / CONCEPTS_CSV[kind], concept_rows(table))
    _write_json(tmp / CONCEPTS_SUMMARY, summary)
    _replace_dir(tmp, out_dir)
    return out_dir


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


# --------------------------------------------------------------------------- evaluate


def _universality(codes: dict[str, sp.csr_matrix]) -> tuple[dict, np.ndarray, np.ndarray]:
    counts = np.stack([firing_counts(m) for m in codes.values()])
    fe = firing_entropy(counts)
    cof = cofire_proportion(*cofire_counts(codes))
    firing = counts.sum(axis=0) > 0
    summary = {
        "firing_entropy_mean": float(fe[firing].mean()) if firing.any() else None,
        "cofire_mean": float(cof[firing].mean()) if firing.any() else None,
        "n_firing": int(firing.sum()),
    }
    return summary, fe, cof


def _retrieval(
    local: dict[str, sp.csr_matrix], streams: dict, rows: np.ndarray, device: str
) -> tuple[dict, list[dict]]:
    """Retrieval metrics for every ordered stream pair (codes, and raw features where applicable)."""
    names = list(local)
    N = rows.size
    codes: dict[tuple[str, str], dict] = {}
    raw: dict[tuple[str, str], dict] = {}
    for a, s in enumerate(names):
        for t in names[a + 1 :]:
            fwd, rev = pair_rank_counts(local[s], local[t], device=device)
            codes[(s, t)] = retrieval_metrics(*fwd, RETRIEVAL_KS)
            codes[(t, s)] = retrieval_metrics(*rev, RETRIEVAL_KS)
            if shares_space(streams[s].meta, streams[t].meta):
                xs = np.asarray(streams[s].features[rows], dtype=np.float32)
                xt = np.asarray(streams[t].features[rows], dtype=np.float32)
                fwd, rev = pair_rank_counts(xs, xt, device=device)
                raw[(s, t)] = retrieval_metrics(*fwd, RETRIEVAL_KS)
                raw[(t, s)] = retrieval_metrics(*rev, RETRIEVAL_KS)
    chance = chance_retrieval(N, RETRIEVAL_KS)
    summary: dict = {"n": N, "chance": chance}
    table = [{"query": "", "gallery": "", "representation": "chance", "applicable": True, "n": N, **chance}]
    for s in names:
        for t in names:
            if s == t:
                continue
            summary[f"{s}->{t}"] = codes[(s, t)]
            table.append({"query": s, "gallery": t, "representation": "codes", "applicable": True, "n": N, **codes[(s, t)]})
            if (s, t) in raw:
                table.append({"query": s, "gallery": t, "representation": "raw", "applicable": True, "n": N, **raw[(s, t)]})
            else:
                table.append({"query": s, "gallery": t, "representation": "raw", "applicable": False, "n": N})
    if raw:
        summary["raw"] = {f"{s}->{t}": raw[(s, t)] for s in names for t in names if (s, t) in raw}
    return summary, table


@dataclasses.dataclass
class Alignment:
    """Alignment metrics of one kind of codes on the evaluated rows: ``freq[s]`` ``[L]`` firing
    counts, ``jaccard[d]`` ``[L]`` per-latent hierarchical Jaccard at depth d, ``fe``/``cofire``
    ``[L]`` USAE universality per latent, and ``summary`` (the metrics.json entries)."""

    freq: dict[str, np.ndarray]
    jaccard: dict[int, np.ndarray]
    fe: np.ndarray
    cofire: np.ndarray
    summary: dict

    @property
    def alive(self) -> dict[str, np.ndarray]:
        return {s: f > 0 for s, f in self.freq.items()}


def alignment(codes: dict[str, sp.csr_matrix], labels: sp.csr_matrix, space: LabelSpace) -> Alignment:
    """Jaccard by depth, activation patterns and universality of ``codes`` (stream -> ``[N, L]``)."""
    freq = {s: firing_counts(m) for s, m in codes.items()}
    alive = {s: f > 0 for s, f in freq.items()}
    live = np.logical_or.reduce(list(alive.values()))
    jac = hierarchical_jaccard(codes, labels, space)
    uni, fe, cof = _universality(codes)
    summary = {
        "jaccard": {**jaccard_summary(jac, live), "n_live": int(live.sum())},
        "patterns": activation_patterns(alive),
        "universality": uni,
    }
    return Alignment(freq, jac, fe, cof, summary)


def _pattern(alive: dict[str, np.ndarray], i: int) -> tuple[str, str]:
    names = [s for s, a in alive.items() if a[i]]
    kind = "alive_all" if len(names) == len(alive) else "dead_all" if not names else "mixed"
    return kind, "+".join(names) or "none"


def _latent_rows(concepts: list[dict], names: list[str], N: int, kinds: dict[str, Alignment]) -> list[dict]:
    """Rows of latents.csv (module docstring), one per latent."""
    joint, per_stream = kinds["joint"], kinds["per_stream"]
    rows = []
    for i, concept in enumerate(concepts):
        row: dict = {"latent": i, "agreed_name": concept["agreed_name"]}
        for s in names:
            row[f"name_{s}"] = concept[f"{s}_name"]
            row[f"purity_{s}"] = concept[f"{s}_purity"]
        for s in names:
            row[f"freq_{s}"] = _fmt(joint.freq[s][i] / N)
        for d, v in joint.jaccard.items():
            row[f"jaccard_d{d}"] = _fmt(v[i])
        row["pattern"], row["alive_in"] = _pattern(joint.alive, i)
        row["firing_entropy"] = _fmt(joint.fe[i])
        row["cofire"] = _fmt(joint.cofire[i])
        for d, v in per_stream.jaccard.items():
            row[f"per_stream_jaccard_d{d}"] = _fmt(v[i])
        row["per_stream_pattern"], row["per_stream_alive_in"] = _pattern(per_stream.alive, i)
        rows.append(row)
    return rows


def run_evaluate(
    params: Params,
    *,
    codes_dir: str | Path | None = None,
    prepared_dir: str | Path | None = None,
    features_root: str | Path | None = None,
    sae_dir: str | Path | None = None,
    concepts_dir: str | Path | None = None,
    metrics_path: str | Path | None = None,
    device: str | None = None,
) -> Path:
    """The `evaluate` stage: every protocol of method.md section 4 except localisation, on the
    test split, on both kinds of codes. Writes ``metrics_path`` (default reports/metrics.json)
    and the CSVs next to it (module docstring); returns ``metrics_path``."""
    check_evaluate(params.evaluate)
    dataset = params.data.dataset
    prepared = load_prepared(prepared_dir or paths.prepared_dir(dataset))
    codes_dir = Path(codes_dir or paths.codes_dir())
    sae_dir = Path(sae_dir or paths.sae_dir())
    features_root = Path(features_root or paths.features_root(dataset))
    concepts_dir = Path(concepts_dir or paths.concepts_dir())
    metrics_path = Path(metrics_path or paths.metrics_path())
    dev = _device(params, device)

    model_hash = model_sha256(sae_dir)
    rows = split_rows(prepared, EVAL_SPLIT)
    codes = {}
    for kind in CODE_KINDS:  # the test split's codes only
        codes[kind], meta = load_codes(codes_dir, kind, prepared, params, model_hash, rows=rows)
    concept_tables, concept_sum = load_concepts(concepts_dir, meta, params.L)
    streams = _load_features(params, features_root, prepared)
    model = _load_model(params, sae_dir, dev)

    N = rows.size
    names = params.stream_names
    csr = {kind: codes_to_csr(c) for kind, c in codes.items()}
    space = LabelSpace(prepared.hierarchy)
    labels = space.matrix([prepared.labels[i] for i in rows])
    features = {s: fs.features for s, fs in streams.items()}

    kinds = {kind: alignment(csr[kind], labels, space) for kind in CODE_KINDS}
    recon = {
        kind: reconstruction_matrix(
            model, features, rows, codes[kind], batch_size=params.evaluate.batch_size, device=dev
        )
        for kind in CODE_KINDS
    }
    probes = run_probes(
        csr["joint"], labels, space,
        min_positives=params.evaluate.probe_min_positives,
        n_candidates=params.evaluate.probe_candidates,
        seed=params.evaluate.probe_seed,
    )
    reason = None
    if not probes:
        reason = no_probe_reason(labels, space, params.evaluate.probe_min_positives)
        print(f"warning: probes skipped: {reason}", file=sys.stderr)
    # Retrieval: one caption per image (the first test row of each group; all rows when no two
    # rows share an image), so a query's answer is one item and no other row shows its image.
    ret_rows = prepared.one_per_group(rows)
    local = csr["per_stream"]
    if ret_rows.size != rows.size:
        keep = np.searchsorted(rows, ret_rows)
        local = {s: m[keep] for s, m in local.items()}
    retrieval, retrieval_rows = _retrieval(local, streams, ret_rows, dev)

    metrics = {
        "n_eval": int(N),
        "sparsity": {f"l0_{kind}": {s: csr[kind][s].nnz / N for s in names} for kind in CODE_KINDS},
        "concepts": {
            kind: {k: concept_sum[kind][k] for k in ("named_fraction", "mean_purity", "agreeing", "agreeing_fraction")}
            for kind in CODE_KINDS
        },
        **{
            section: {kind: kinds[kind].summary[section] for kind in CODE_KINDS}
            for section in ("jaccard", "patterns")
        },
        "reconstruction": {kind: reconstruction_summary(recon[kind]) for kind in CODE_KINDS},
        "probes": probe_summary(probes, names, reason),
        "retrieval": retrieval,
        "universality": {kind: kinds[kind].summary["universality"] for kind in CODE_KINDS},
    }
    random = random_streams({s: fs.meta for s, fs in streams.items()})
    if random:  # features of random-weight models (sparc.features.random_weights): not a result
        metrics.update(random_weights=random, warning=RANDOM_WARNING)

    latent_rows = _latent_rows(concept_tables["joint"], names, N, kinds)
    recon_rows = [
        {"codes": kind, "source": s, "target": t, "kind": "self" if s == t else "cross",
         "nmse": _fmt(v["nmse"]), "fvu": _fmt(v["fvu"])}
        for kind in CODE_KINDS
        for (s, t), v in recon[kind].items()
    ]
    probe_csv = [{k: _fmt(v) for k, v in r.items()} for r in probe_rows(probes)]
    retrieval_csv = [{k: _fmt(r.get(k)) for k in RETRIEVAL_FIELDS} for r in retrieval_rows]

    out = metrics_path.parent
    out.mkdir(parents=True, exist_ok=True)
    tables = {
        "latents.csv": (latent_rows, list(latent_rows[0])),
        "retrieval.csv": (retrieval_csv, RETRIEVAL_FIELDS),
        "probes.csv": (probe_csv, [f.name for f in dataclasses.fields(ProbeResult)]),
        "reconstruction.csv": (recon_rows, ["codes", "source", "target", "kind", "nmse", "fvu"]),
    }
    for name, (rows_, fields) in tables.items():
        tmp = out / f".{name}.tmp"
        _write_csv(tmp, rows_, fields)
        os.replace(tmp, out / name)
    plots = out / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    for name, rows_ in plot_tables(metrics).items():
        tmp = plots / f".{name}.tmp"
        _write_csv(tmp, [{k: _fmt(v) for k, v in r.items()} for r in rows_])
        os.replace(tmp, plots / name)
    inputs = {s: params.streams[s].input for s in names}
    for path, obj in ((out / HEADLINE, headline(metrics, inputs)), (metrics_path, metrics)):
        tmp = path.with_name(f".{path.name}.tmp")
        _write_json(tmp, obj)
        os.replace(tmp, path)
    return metrics_path
