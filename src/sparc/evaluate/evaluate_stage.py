"""The `evaluate` stage: every metric of method.md section 4 except localisation.

Reads ``data/codes/`` (both kinds, test split only; refused when encoded by another model than
``data/sae``'s), ``reports/concepts/`` (refused when computed from other codes), ``data/sae/``,
``data/features/<dataset>/`` and ``data/prepared/<dataset>/``; computes concepts, Jaccard,
patterns, reconstruction, probes, retrieval and universality on both kinds of codes (the kinds:
:mod:`sparc.evaluate.encode_stage`); and writes ``reports/``:
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

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sparc import paths
from sparc.data.prepared import load_prepared
from sparc.evaluate.headline import headline, plot_tables
from sparc.evaluate.jaccard import hierarchical_jaccard, jaccard_summary
from sparc.evaluate.labels import LabelSpace
from sparc.evaluate.metrics import (
    activation_patterns,
    chance_retrieval,
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
from sparc.evaluate.run_files import (
    CODE_KINDS,
    EVAL_SPLIT,
    HEADLINE,
    PLOTS_DIR,
    codes_to_csr,
    csv_cell,
    evaluate_device,
    load_codes,
    load_concepts,
    load_features,
    load_model,
    model_sha256,
    split_rows,
    write_csv,
    write_json,
)
from sparc.features.random_weights import WARNING as RANDOM_WARNING
from sparc.features.random_weights import random_streams
from sparc.params import Params, check_evaluate

RETRIEVAL_KS = (1, 5, 10)
RETRIEVAL_FIELDS = [
    "query", "gallery", "representation", "applicable", "n", *[f"R@{k}" for k in RETRIEVAL_KS], "median_rank", "MRR",
]


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
            row[f"freq_{s}"] = csv_cell(joint.freq[s][i] / N)
        for d, v in joint.jaccard.items():
            row[f"jaccard_d{d}"] = csv_cell(v[i])
        row["pattern"], row["alive_in"] = _pattern(joint.alive, i)
        row["firing_entropy"] = csv_cell(joint.fe[i])
        row["cofire"] = csv_cell(joint.cofire[i])
        for d, v in per_stream.jaccard.items():
            row[f"per_stream_jaccard_d{d}"] = csv_cell(v[i])
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
    dev = evaluate_device(params, device)

    model_hash = model_sha256(sae_dir)
    rows = split_rows(prepared, EVAL_SPLIT)
    codes = {}
    for kind in CODE_KINDS:  # the test split's codes only
        codes[kind], meta = load_codes(codes_dir, kind, prepared, params, model_hash, rows=rows)
    concept_tables, concept_sum = load_concepts(concepts_dir, meta, params.L)
    streams = load_features(params, features_root, prepared)
    model = load_model(params, sae_dir, dev)

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
         "nmse": csv_cell(v["nmse"]), "fvu": csv_cell(v["fvu"])}
        for kind in CODE_KINDS
        for (s, t), v in recon[kind].items()
    ]
    probe_csv = [{k: csv_cell(v) for k, v in r.items()} for r in probe_rows(probes)]
    retrieval_csv = [{k: csv_cell(r.get(k)) for k in RETRIEVAL_FIELDS} for r in retrieval_rows]

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
        write_csv(tmp, rows_, fields)
        os.replace(tmp, out / name)
    plots = out / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    for name, rows_ in plot_tables(metrics).items():
        tmp = plots / f".{name}.tmp"
        write_csv(tmp, [{k: csv_cell(v) for k, v in r.items()} for r in rows_])
        os.replace(tmp, plots / name)
    inputs = {s: params.streams[s].input for s in names}
    for path, obj in ((out / HEADLINE, headline(metrics, inputs)), (metrics_path, metrics)):
        tmp = path.with_name(f".{path.name}.tmp")
        write_json(tmp, obj)
        os.replace(tmp, path)
    return metrics_path
