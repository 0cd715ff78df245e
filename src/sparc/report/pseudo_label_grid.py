"""Do WordNet pseudo-labels order the ablation's methods as the real labels do?

``python -m sparc validate-text --part hierarchy`` trains the ablation grid (Global/Local TopK x
lambda in {0, 1}, :data:`CONFIGS`, seeds 0, 1, 2; every other parameter from params.yaml) in
this process from the extracted features of ``data/features/<dataset>`` and the prepared rows
of ``data/prepared/<dataset>`` (nothing of DVC's is run or written), encodes the test split both
ways (joint and per-stream, as the `encode` stage does), and computes hierarchical Jaccard by
depth (:func:`sparc.evaluate.jaccard.hierarchical_jaccard`) three times: with the dataset's own
labels, with WordNet pseudo-labels of the same captions (:func:`sparc.data.wordnet.pseudo_labels`,
``data.wordnet_depth``), and, as a control, with those pseudo-labels shuffled across the samples
(:func:`shuffled`: the same labels, hierarchy and label frequencies, unrelated to the content). An
ordering the shuffled labels reproduce as well says nothing about concepts: it comes from which
latents fire in which stream. It reports:

* the Jaccard rows of the ablation table (:data:`sparc.report.ablation.TABLE_ROWS`) under each
  label set, mean +- std over seeds;
* Spearman's rho and Kendall's tau between the real labels' values and each other label set's,
  over the 12 runs, per row, and over the 4 configuration means (the ordering of the methods);
* the label-dependent claims of :data:`sparc.report.ablation.CLAIMS` with their verdicts under
  every label set (:func:`sparc.report.ablation.verdict`);

and writes them between ``<!-- pseudo-labels:begin -->`` and ``<!-- pseudo-labels:end -->`` of
the docs page that holds those markers (docs/unlabeled.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sparc.data.prepared import PreparedData
from sparc.evaluate.labels import LabelSpace
from sparc.params import Params
from sparc.report.ablation import (
    CLAIMS,
    COLUMN_TITLES,
    TABLE_ROWS,
    ablation_table,
    mean_std,
    summarise,
    verdict,
)
from sparc.report.experiments import Record

CONFIGS = ("sparc", "global-lam0", "local-lam1", "local-lam0")
SEEDS = (0, 1, 2)
LABEL_SETS = ("real", "wordnet", "shuffled")
TITLES = {"real": "real labels", "wordnet": "WordNet pseudo-labels", "shuffled": "shuffled pseudo-labels"}
SHUFFLE_SEED = 0
# The rows of the ablation table that depend on the labels.
JACCARD_ROWS = [row for row in TABLE_ROWS if row[0].startswith("Jaccard")]
BLOCK = "pseudo-labels"


@dataclasses.dataclass(frozen=True)
class GridRun:
    """One trained cell: its configuration, seed, training seconds and, per label set, the
    headline Jaccard metrics (``jaccard_d<d>``, ``jaccard_live``, ``jaccard_ps``,
    ``jaccard_ps_live``, as :func:`sparc.evaluate.headline.headline` names them)."""

    config: str
    seed: int
    seconds: float
    metrics: dict[str, dict[str, float]]


def cell_params(params: Params, config: str, seed: int) -> Params:
    """``params`` with the ablation overrides of ``config`` (sparc.report.experiments.ABLATION)
    and ``seed``."""
    from sparc.report.experiments import ABLATION

    o = ABLATION[config]
    return dataclasses.replace(params, topk=o["topk"], lam=float(o["lambda"]), method=o["method"], seed=seed)


def jaccard_headline(codes: dict[str, dict[str, sp.csr_matrix]], labels: sp.csr_matrix, space: LabelSpace) -> dict[str, float]:
    """Headline Jaccard numbers of ``codes`` (kind -> stream -> ``[N, L]`` CSR, kinds ``joint``
    and ``per_stream``) against ``labels`` ``[N, B]``: ``jaccard_d<d>`` (joint, all latents) for
    every depth, ``jaccard_live`` (joint, deepest, live latents), ``jaccard_ps`` and
    ``jaccard_ps_live`` (per-stream codes, deepest)."""
    from sparc.evaluate.jaccard import hierarchical_jaccard, jaccard_summary
    from sparc.evaluate.metrics import firing_counts

    out: dict[str, float] = {}
    for kind, mats in codes.items():
        live = np.logical_or.reduce([firing_counts(m) > 0 for m in mats.values()])
        summary = jaccard_summary(hierarchical_jaccard(mats, labels, space), live)
        deepest = summary[f"depth_{space.hierarchy.max_depth}"]
        if kind == "joint":
            out.update({f"jaccard_d{k.split('_')[1]}": v["all"] for k, v in summary.items()})
            out["jaccard_live"] = deepest["live"]
        else:
            out["jaccard_ps"], out["jaccard_ps_live"] = deepest["all"], deepest["live"]
    return out


def run_grid(
    params: Params,
    prepared: PreparedData,
    features: dict[str, np.ndarray],
    spaces: dict[str, tuple[LabelSpace, Sequence[Sequence[str]]]],
    *,
    configs: Sequence[str] = CONFIGS,
    seeds: Sequence[int] = SEEDS,
    log: Callable[[str], None] = print,
) -> list[GridRun]:
    """Train every (config, seed) on the train split of ``features`` (stream -> ``[N, d_s]``,
    rows aligned with ``prepared``), encode the test split and score it against each label set
    of ``spaces`` (name -> (label space, labels of every prepared row))."""
    import torch

    from sparc.evaluate.run_files import codes_to_csr
    from sparc.model.io import encode_dataset
    from sparc.train.loop import TrainSpec, train_sae
    from sparc.train.sampler import FeatureSource

    train_rows, test_rows = prepared.indices("train"), prepared.indices("test")
    test = {s: np.asarray(a[test_rows], dtype=np.float32) for s, a in features.items()}
    ids = [prepared.ids[i] for i in test_rows]
    matrices = {name: (space, space.matrix([labels[i] for i in test_rows])) for name, (space, labels) in spaces.items()}
    threads = torch.get_num_threads()
    if params.train.cpu_threads > 0:
        torch.set_num_threads(params.train.cpu_threads)
    runs = []
    try:
        for config in configs:
            for seed in seeds:
                spec = TrainSpec.from_params(cell_params(params, config, seed))
                source = FeatureSource(features, train_rows, device="cpu", check_finite=False)
                start = time.perf_counter()
                model = train_sae(source, spec).model
                seconds = time.perf_counter() - start
                codes = {
                    kind: codes_to_csr(encode_dataset(model, test, ids, mode=mode, batch_size=params.evaluate.batch_size,
                                                      device="cpu", progress=False))
                    for kind, mode in (("joint", model.cfg.topk), ("per_stream", "local"))
                }
                metrics = {name: jaccard_headline(codes, y, space) for name, (space, y) in matrices.items()}
                runs.append(GridRun(config, seed, seconds, metrics))
                log(f"{config} seed {seed}: trained in {seconds:.1f} s; "
                    + "; ".join(f"{n} Jaccard per-stream deepest {m['jaccard_ps']:.3f}" for n, m in metrics.items()))
    finally:
        torch.set_num_threads(threads)
    return runs


def groups_of(runs: Sequence[GridRun], label_set: str) -> dict[str, list[Record]]:
    """The runs as :class:`Record` groups by configuration (sparc.report.ablation's input), with
    the metrics of ``label_set``."""
    groups: dict[str, list[Record]] = {}
    for r in runs:
        groups.setdefault(r.config, []).append(Record(f"{r.config}-s{r.seed}", {}, dict(r.metrics[label_set])))
    return groups


def shuffled(labels: Sequence[Sequence[str]], seed: int = SHUFFLE_SEED) -> list[Sequence[str]]:
    """``labels`` (one tuple per sample) permuted across the samples by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(len(labels))
    return [labels[i] for i in order]


def rank_agreement(runs: Sequence[GridRun], label_set: str = "wordnet") -> str:
    """Markdown table: per Jaccard row, Spearman's rho and Kendall's tau between the real values
    and those of ``label_set``, over the runs and over the configuration means, and both orderings
    of the configurations (highest first)."""
    from scipy.stats import kendalltau, spearmanr

    real, wn = summarise(groups_of(runs, "real"), JACCARD_ROWS), summarise(groups_of(runs, label_set), JACCARD_ROWS)
    configs = list(real)
    lines = ["| row | runs | Spearman ρ (runs) | Kendall τ (runs) | Spearman ρ (4 means) | Kendall τ (4 means) "
             f"| order, real labels | order, {TITLES[label_set]} |", "|---|---|---|---|---|---|---|---|"]
    for label, _, _ in JACCARD_ROWS:
        a = [v for c in configs for v in real[c][label]]
        b = [v for c in configs for v in wn[c][label]]
        ma = [mean_std(real[c][label])[0] for c in configs]
        mb = [mean_std(wn[c][label])[0] for c in configs]
        cells = [_corr(spearmanr, a, b), _corr(kendalltau, a, b), _corr(spearmanr, ma, mb), _corr(kendalltau, ma, mb)]
        order = [" > ".join(COLUMN_TITLES[c] for c, _ in sorted(zip(configs, m, strict=True), key=lambda t: -t[1]))
                 for m in (ma, mb)]
        lines.append(f"| {label} | {len(a)} | " + " | ".join(cells) + f" | {order[0]} | {order[1]} |")
    return "\n".join(lines) + "\n"


def _corr(func: Callable, a: Sequence[float], b: Sequence[float]) -> str:
    """``func(a, b)``'s statistic (p-value) as a cell; ``n/a`` when either side is constant."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return "n/a"
    res = func(a, b)
    return f"{res.statistic:+.2f} (p={res.pvalue:.2g})"


def claims_table(runs: Sequence[GridRun]) -> str:
    """Markdown table: each label-dependent ablation claim, its verdict under every label set of
    the runs (:data:`LABEL_SETS` order), and whether each other set's verdict is the real labels'."""
    sets = [ls for ls in LABEL_SETS if ls in runs[0].metrics]
    values = {ls: summarise(groups_of(runs, ls), JACCARD_ROWS) for ls in sets}
    rows = {label for label, _, _ in JACCARD_ROWS}
    others = sets[1:]
    lines = ["| claim | " + " | ".join(TITLES[ls] for ls in sets) + " | "
             + " | ".join(f"same verdict ({ls})" for ls in others) + " |",
             "|---|" + "---|" * (len(sets) + len(others))]
    for text, label, high, low in CLAIMS:
        if label not in rows or high not in values["real"] or low not in values["real"]:
            continue
        v = {ls: verdict(values[ls][high][label], values[ls][low][label]) for ls in sets}
        cells = [f"{v[ls]} ({mean_std(values[ls][high][label])[0]:.3f} vs {mean_std(values[ls][low][label])[0]:.3f})"
                 for ls in sets]
        same = ["yes" if v["real"] == v[ls] else "**no**" for ls in others]
        lines.append(f"| {text} | " + " | ".join(cells) + " | " + " | ".join(same) + " |")
    return "\n".join(lines) + "\n"


def report(runs: Sequence[GridRun], *, dataset: str, depth: int, real_depth: int, coverage: float,
           n_test: int, command: str) -> str:
    """The generated markdown block: settings, tables under both label sets, rank agreement,
    claims and the training time per cell."""
    seconds = [r.seconds for r in runs]
    mean, std = mean_std(seconds)
    seeds = sorted({r.seed for r in runs})
    return "\n".join([
        f"_Generated by `{command}`: {dataset}, {len(runs)} runs ({len(set(r.config for r in runs))} configurations x "
        f"seeds {', '.join(map(str, seeds))}), test split ({n_test} samples); real labels {real_depth} levels deep, "
        f"WordNet pseudo-labels {depth} levels (data.wordnet_depth), {coverage:.1%} of the captions with a noun label. "
        f"Training: {mean:.1f} ± {std:.1f} s per run on this machine's CPU ({sum(seconds) / 60:.1f} min in all)._",
        "",
        "Real labels:",
        "",
        ablation_table(groups_of(runs, "real"), JACCARD_ROWS),
        "WordNet pseudo-labels from the same captions:",
        "",
        ablation_table(groups_of(runs, "wordnet"), JACCARD_ROWS),
        f"The control: the same pseudo-labels shuffled across the samples (seed {SHUFFLE_SEED}):",
        "",
        ablation_table(groups_of(runs, "shuffled"), JACCARD_ROWS),
        "Agreement of the orderings with the real labels' (Spearman and Kendall), WordNet pseudo-labels:",
        "",
        rank_agreement(runs, "wordnet"),
        "... and shuffled pseudo-labels (the control):",
        "",
        rank_agreement(runs, "shuffled"),
        "The label-dependent claims of the ablation under each label set:",
        "",
        claims_table(runs),
    ])


def validate_hierarchy(params: Params, *, root: Path = Path("."), configs: Sequence[str] = CONFIGS,
                       seeds: Sequence[int] = SEEDS, write: bool = True) -> str:
    """The whole check on ``params``' dataset under ``root`` (a repository with
    ``data/prepared/<dataset>`` and ``data/features/<dataset>``): returns the markdown block and,
    with ``write``, puts it between the markers of the docs page of the working directory that
    holds them (:func:`sparc.report.ablation.block_file`). ValueError when
    the prepared data have no labels of their own to compare with."""
    from sparc import paths
    from sparc.data.prepared import load_prepared
    from sparc.data.wordnet import pseudo_labels
    from sparc.features.store import load_streams
    from sparc.report.ablation import block_file, readme_markers, replace_block

    dataset = params.data.dataset
    prepared = load_prepared(root / paths.prepared_dir(dataset))
    if prepared.meta.get("labels", {}).get("from") == "captions" or not any(prepared.labels):
        raise ValueError(f"{prepared.root}: no labels of the dataset's own to compare the pseudo-labels with "
                         "(prepare it with data.labels_from: dataset)")
    streams = load_streams(root / paths.features_root(dataset), params.stream_names)
    if streams[params.stream_names[0]].ids != prepared.ids:
        raise ValueError(f"{root / paths.features_root(dataset)}: feature rows do not match the prepared ids")
    pseudo = pseudo_labels(prepared.captions, params.data.wordnet_depth)
    spaces = {"real": (LabelSpace(prepared.hierarchy), prepared.labels),
              "wordnet": (LabelSpace(pseudo.hierarchy), pseudo.labels),
              "shuffled": (LabelSpace(pseudo.hierarchy), shuffled(pseudo.labels))}
    runs = run_grid(params, prepared, {s: fs.features for s, fs in streams.items()}, spaces,
                    configs=configs, seeds=seeds)
    block = report(runs, dataset=dataset, depth=pseudo.depth, real_depth=prepared.hierarchy.max_depth,
                   coverage=pseudo.coverage(), n_test=int(prepared.indices("test").size),
                   command="python -m sparc validate-text --part hierarchy")
    if write:
        path = block_file(BLOCK)
        begin, end = readme_markers(BLOCK)
        path.write_text(replace_block(path.read_text(encoding="utf-8"), block, begin, end, str(path)), encoding="utf-8")
        print(f"updated {path}")
    return block
