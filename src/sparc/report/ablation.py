"""Tables, claims and the comparison figure of multi-seed ablations run as DVC experiments.

The grids and their experiments (starting them, reading them back as :class:`Record` s) are
:mod:`sparc.report.experiments`; :func:`ablation_table` groups the
records by configuration (every parameter but the seed), and reports mean +- sample std over the
seeds of the metrics in :data:`TABLE_ROWS`; :func:`claims` checks the paper's claims on those
means. ``python -m sparc compare`` tabulates every experiment (one column each);
``python -m sparc compare --grid ablation --readme`` averages the grid's seeds and rewrites the
block between ``<!-- ablation:begin -->`` and ``<!-- ablation:end -->`` of the file that holds
those markers (:func:`block_file`: README.md for the ablation, docs/alignment.md and
docs/localisation.md for the other grids); both also draw :func:`comparison_figure`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from sparc.report.experiments import GRIDS, Record, grid_of

COLUMN_TITLES = {
    "sparc": "Global, λ=1 (SPARC)",
    "global-lam0": "Global, λ=0",
    "local-lam1": "Local, λ=1",
    "local-lam0": "Local, λ=0",
    "usae": "USAE",
    "usae-paper": "USAE (paper variant)",
    "subset-0.25": "subset, keep 0.25",
    "subset-0.5": "subset, keep 0.5",
    "subset-0.75": "subset, keep 0.75",
    "consistency-1": "consistency 1",
}


def readme_markers(grid: str) -> tuple[str, str]:
    """The README lines that enclose the generated block of ``grid``: ``<!-- grid:begin -->`` ..."""
    return f"<!-- {grid}:begin -->", f"<!-- {grid}:end -->"


README_BEGIN, README_END = readme_markers("ablation")
# Where the generated blocks live: the front page and the documentation beside it.
BLOCK_FILES = ("README.md", "docs/*.md")


def block_file(prefix: str, root: Path = Path(".")) -> Path:
    """The file of :data:`BLOCK_FILES` under ``root`` that holds the markers of ``prefix``'s block
    (``<!-- prefix:begin -->``); ValueError, naming the marker, where none does."""
    begin, _ = readme_markers(prefix)
    for pattern in BLOCK_FILES:
        for path in sorted(root.glob(pattern)):
            if begin in path.read_text(encoding="utf-8"):
                return path
    raise ValueError(
        f"no file of {', '.join(BLOCK_FILES)} holds {begin}: add the lines {begin} and "
        f"{readme_markers(prefix)[1]} where the table belongs, or name the file (--readme PATH)"
    )


# --------------------------------------------------------------------------- tables


def _key(name: str) -> Callable[[Record], float | None]:
    def read(rec: Record) -> float | None:
        value = rec.metrics.get(name)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return read


def _deepest(rec: Record) -> float | None:
    depths = [int(m.group(1)) for k in rec.metrics if (m := re.fullmatch(r"jaccard_d(\d+)", k))]
    return _key(f"jaccard_d{max(depths)}")(rec) if depths else None


# Rows of the table: label, how to read the value from one experiment's headline metrics
# (sparc.evaluate.headline), and the format.
TABLE_ROWS: list[tuple[str, Callable[[Record], float | None], str]] = [
    ("Jaccard depth 0, all latents (joint)", _key("jaccard_d0"), ".3f"),
    ("Jaccard deepest level, all latents (joint)", _deepest, ".3f"),
    ("Jaccard deepest level, live latents (joint)", _key("jaccard_live"), ".3f"),
    ("Jaccard deepest level, all latents (per-stream)", _key("jaccard_ps"), ".3f"),
    ("Jaccard deepest level, live latents (per-stream)", _key("jaccard_ps_live"), ".3f"),
    ("alive in all streams (joint)", _key("alive"), ".1%"),
    ("dead in all streams (joint)", _key("dead"), ".1%"),
    ("mixed latents (joint)", _key("mixed"), ".1%"),
    ("mixed latents (per-stream)", _key("mixed_ps"), ".1%"),
    ("named alike in all streams (joint)", _key("agree"), ".1%"),
    ("named alike in all streams (per-stream)", _key("agree_ps"), ".1%"),
    ("firing entropy (joint; 1 = fires in every stream alike)", _key("entropy"), ".3f"),
    ("firing entropy (per-stream)", _key("entropy_ps"), ".3f"),
    ("self NMSE (joint)", _key("nmse_self"), ".3f"),
    ("cross NMSE (joint, the training loss's)", _key("nmse_cross"), ".3f"),
    ("cross NMSE (per-stream, leak-free)", _key("nmse_cross_lf"), ".3f"),
    ("1-D probe test log-loss, mean of streams (chance 0.693)", _key("probe_logloss"), ".3f"),
    ("retrieval R@1 caption→image (per-stream codes)", _key("r1_cap2img"), ".3f"),
    ("retrieval R@1 image→caption (per-stream codes)", _key("r1_img2cap"), ".3f"),
    ("L0 per stream (joint)", _key("l0"), ".2f"),
]


# Rows of the alignment grid's table: the per-stream metrics that decide, and reconstruction.
ALIGNMENT_ROWS: list[tuple[str, Callable[[Record], float | None], str]] = [
    ("Jaccard deepest level, all latents (per-stream)", _key("jaccard_ps"), ".3f"),
    ("Jaccard deepest level, live latents (per-stream)", _key("jaccard_ps_live"), ".3f"),
    ("mixed latents (per-stream)", _key("mixed_ps"), ".1%"),
    ("named alike in all streams (per-stream)", _key("agree_ps"), ".1%"),
    ("firing entropy (per-stream)", _key("entropy_ps"), ".3f"),
    ("retrieval R@1 caption→image (per-stream codes)", _key("r1_cap2img"), ".3f"),
    ("retrieval R@1 image→caption (per-stream codes)", _key("r1_img2cap"), ".3f"),
    ("self NMSE (per-stream)", _key("nmse_self_ps"), ".3f"),
    ("cross NMSE (per-stream, leak-free)", _key("nmse_cross_lf"), ".3f"),
    ("Jaccard deepest level, live latents (joint)", _key("jaccard_live"), ".3f"),
    ("alive in all streams (joint)", _key("alive"), ".1%"),
    ("self NMSE (joint)", _key("nmse_self"), ".3f"),
    ("cross NMSE (joint, the training loss's)", _key("nmse_cross"), ".3f"),
    ("1-D probe test log-loss, mean of streams (chance 0.693)", _key("probe_logloss"), ".3f"),
]
ROWS = {"ablation": TABLE_ROWS, "alignment": ALIGNMENT_ROWS}
LOCALISE_CHANCE = "chance"


def localise_methods(records: Iterable[Record]) -> list[str]:
    """Methods scored by the `localise` stage in ``records`` (metric keys ``ap_<method>``), the
    chance map last."""
    found = {k[3:] for r in records for k in r.metrics if k.startswith("ap_")}
    return sorted(found - {LOCALISE_CHANCE}) + ([LOCALISE_CHANCE] if LOCALISE_CHANCE in found else [])


def localise_rows(records: Iterable[Record]) -> list[tuple[str, Callable[[Record], float | None], str]]:
    """Rows of the localisation grid: AP at IoU 0.2 and mIoU of every method in ``records``
    (``reports/localise/metrics.json``), then retrieval R@1 caption->image for context."""
    rows = []
    for m in localise_methods(records):
        rows += [(f"localisation AP@0.2, {m}", _key(f"ap_{m}"), ".3f"), (f"localisation mIoU, {m}", _key(f"miou_{m}"), ".3f")]
    return rows + [("retrieval R@1 caption→image (per-stream codes)", _key("r1_cap2img"), ".3f")]


def rows_for(grid: str, groups: dict[str, list[Record]]) -> list[tuple[str, Callable[[Record], float | None], str]]:
    """The table rows of ``grid`` (:data:`ROWS`; the localisation grid's depend on the streams)."""
    if grid == "localise":
        return localise_rows(r for recs in groups.values() for r in recs)
    return ROWS[grid]


def config_name(name: str, prefix: str) -> str | None:
    """``"<prefix>-<config>-s<seed>"`` -> ``"<config>"``; None for other names."""
    m = re.fullmatch(rf"{re.escape(prefix)}-(.+)-s\d+", name)
    return m.group(1) if m else None


def group_records(records: Iterable[Record], prefix: str) -> dict[str, list[Record]]:
    """Experiments of the grid ``prefix`` by configuration, in the order of its grid in
    :data:`GRIDS` first. A name ``<prefix>-<tag>-<config>-s<seed>`` whose ``<config>`` is one of
    the grid's belongs to the grid ``<prefix>-<tag>`` (``localise-q240-sparc-s0``) and is left out."""
    known = GRIDS[grid_of(prefix)]
    groups: dict[str, list[Record]] = {}
    for rec in records:
        cfg = config_name(rec.name, prefix)
        if cfg is None or (cfg not in known and any(cfg.endswith("-" + c) for c in known)):
            continue
        groups.setdefault(cfg, []).append(rec)
    order = [c for c in known if c in groups] + sorted(c for c in groups if c not in known)
    return {c: sorted(groups[c], key=lambda r: r.name) for c in order}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "n/a"
    mean, std = mean_std(values)
    if fmt.endswith("%"):
        digits = fmt[1:-1]
        return f"{mean * 100:.{digits}f}%" if len(values) == 1 else f"{mean * 100:.{digits}f} ± {std * 100:.{digits}f}%"
    return f"{mean:{fmt}}" if len(values) == 1 else f"{mean:{fmt}} ± {std:{fmt}}"


def summarise(groups: dict[str, list[Record]], rows: Sequence = TABLE_ROWS) -> dict[str, dict[str, list[float]]]:
    """config -> row label -> the values over seeds (runs where the metric exists)."""
    out: dict[str, dict[str, list[float]]] = {}
    for cfg, recs in groups.items():
        out[cfg] = {}
        for label, read, _ in rows:
            vals = [read(r) for r in recs]
            out[cfg][label] = [v for v in vals if v is not None and math.isfinite(v)]
    return out


def each_experiment(records: Iterable[Record]) -> dict[str, list[Record]]:
    """One group per experiment (for :func:`ablation_table` without averaging), by name."""
    return {r.name: [r] for r in sorted(records, key=lambda r: r.name)}


def ablation_table(groups: dict[str, list[Record]], rows: Sequence = TABLE_ROWS) -> str:
    """Markdown table: one column per group (mean ± std over its runs, e.g. seeds), one row per
    metric of ``rows`` (:data:`TABLE_ROWS` or :data:`ALIGNMENT_ROWS`)."""
    if not groups:
        return "_no matching experiments in `dvc exp show`_\n"
    values = summarise(groups, rows)
    cols = list(groups)
    seeds = {c: len(groups[c]) for c in cols}
    averaged = any(n > 1 for n in seeds.values())
    head = f"| metric (test split{'; mean ± std over seeds' if averaged else ''}) | " + " | ".join(
        f"{COLUMN_TITLES.get(c, c)}{f' (n={seeds[c]})' if averaged else ''}" for c in cols
    ) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for label, _, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(_cell(values[c][label], fmt) for c in cols) + " |")
    return "\n".join(lines) + "\n"


# The paper's claims (method.md section 5) as comparisons of table rows between configurations.
CLAIMS: list[tuple[str, str, str, str]] = [
    ("Global TopK aligns more than Local TopK (Jaccard, λ=1)", "Jaccard depth 0, all latents (joint)", "sparc", "local-lam1"),
    ("... also at the deepest level", "Jaccard deepest level, all latents (joint)", "sparc", "local-lam1"),
    ("... also measured per stream, without the shared indices",
     "Jaccard deepest level, all latents (per-stream)", "sparc", "local-lam1"),
    ("the cross-loss raises Global TopK's deepest-level Jaccard (all latents, the paper's figure)",
     "Jaccard deepest level, all latents (joint)", "sparc", "global-lam0"),
    ("... over live latents", "Jaccard deepest level, live latents (joint)", "sparc", "global-lam0"),
    ("... per stream, over live latents", "Jaccard deepest level, live latents (per-stream)", "sparc", "global-lam0"),
    ("Global TopK leaves fewer mixed latents than Local TopK", "mixed latents (joint)", "local-lam1", "sparc"),
    ("... also per stream", "mixed latents (per-stream)", "local-lam1", "sparc"),
    ("the cross-loss lowers leak-free cross NMSE (Global TopK)", "cross NMSE (per-stream, leak-free)", "global-lam0", "sparc"),
    ("the cross-loss lowers leak-free cross NMSE (Local TopK)", "cross NMSE (per-stream, leak-free)", "local-lam0", "local-lam1"),
    ("SPARC retrieves captions→images better than Local λ=0",
     "retrieval R@1 caption→image (per-stream codes)", "sparc", "local-lam0"),
    ("... and better than Global λ=0", "retrieval R@1 caption→image (per-stream codes)", "sparc", "global-lam0"),
    ("SPARC aligns more than USAE (Jaccard, deepest, per stream, live)",
     "Jaccard deepest level, live latents (per-stream)", "sparc", "usae"),
    ("... and more than the USAE paper variant", "Jaccard deepest level, live latents (per-stream)", "sparc", "usae-paper"),
    ("SPARC's 1-D probes have a lower log-loss than Local λ=0's (the paper: flat across runs)",
     "1-D probe test log-loss, mean of streams (chance 0.693)", "local-lam0", "sparc"),
]


def verdict(a: list[float], b: list[float]) -> str:
    """``holds`` when mean(a) - mean(b) exceeds twice the standard error of the difference,
    ``reversed`` when it is below minus that, else ``within noise`` (``n/a`` without data)."""
    if not a or not b:
        return "n/a"
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if ma - mb > 2 * se:
        return "holds"
    if mb - ma > 2 * se:
        return "reversed"
    return "within noise"


def alignment_claims(configs: Iterable[str]) -> list[tuple[str, str, str, str]]:
    """The questions of the alignment grid, for each option against SPARC: does it raise
    per-stream alignment (Jaccard, mixed latents, retrieval) and does it keep reconstruction?"""
    out = []
    for c in configs:
        if c == "sparc":
            continue
        title = COLUMN_TITLES.get(c, c)
        out += [
            (f"{title} raises per-stream Jaccard (live latents)", "Jaccard deepest level, live latents (per-stream)", c, "sparc"),
            (f"{title} leaves fewer mixed latents per stream", "mixed latents (per-stream)", "sparc", c),
            (f"{title} retrieves captions→images better", "retrieval R@1 caption→image (per-stream codes)", c, "sparc"),
            (f"{title} lowers per-stream self NMSE (within noise = kept)", "self NMSE (per-stream)", "sparc", c),
            (f"{title} lowers joint self NMSE (within noise = kept)", "self NMSE (joint)", "sparc", c),
            (f"{title} lowers leak-free cross NMSE", "cross NMSE (per-stream, leak-free)", "sparc", c),
        ]
    return out


def localise_claims(groups: dict[str, list[Record]]) -> list[tuple[str, str, str, str]]:
    """The questions of the localisation grid, for every scored image stream: does SPARC localise
    better (AP@0.2, mIoU) than Local TopK and than lambda = 0?"""
    methods = [m for m in localise_methods(r for recs in groups.values() for r in recs) if m != LOCALISE_CHANCE]
    out = []
    for m in methods:
        for other in ("local-lam1", "global-lam0"):
            title = COLUMN_TITLES.get(other, other)
            out += [(f"SPARC localises better than {title} ({m}, AP@0.2)", f"localisation AP@0.2, {m}", "sparc", other),
                    (f"SPARC localises better than {title} ({m}, mIoU)", f"localisation mIoU, {m}", "sparc", other)]
    return out


def claims(groups: dict[str, list[Record]], grid: str = "ablation") -> str:
    """Markdown list: each claim of the grid (:data:`CLAIMS`, :func:`alignment_claims` or
    :func:`localise_claims`), its verdict and the two means."""
    rows = rows_for(grid, groups)
    values = summarise(groups, rows)
    fmt = {label: f for label, _, f in rows}
    if grid == "ablation":
        questions = CLAIMS
    elif grid == "localise":
        questions = localise_claims(groups)
    else:
        questions = alignment_claims(groups)
    lines = []
    for text, label, high, low in questions:
        if high not in values or low not in values:
            continue
        a, b = values[high][label], values[low][label]
        f = fmt[label]
        lines.append(
            f"- {text}: **{verdict(a, b)}** ({label}: {COLUMN_TITLES.get(high, high)} {_cell(a, f)}, "
            f"{COLUMN_TITLES.get(low, low)} {_cell(b, f)})"
        )
    return "\n".join(lines) + "\n"


def replace_block(
    text: str, block: str, begin: str = README_BEGIN, end: str = README_END, name: str = "README"
) -> str:
    """``text`` with what lies between the ``begin`` and ``end`` marker lines replaced by ``block``."""
    try:
        a = text.index(begin) + len(begin)
        b = text.index(end, a)
    except ValueError:
        raise ValueError(f"{name}: markers {begin} ... {end} not found") from None
    return text[:a] + "\n" + block.rstrip("\n") + "\n" + text[b:]


# Headline rows drawn by :func:`comparison_figure`.
FIGURE_ROWS = [
    "Jaccard deepest level, all latents (joint)",
    "Jaccard deepest level, all latents (per-stream)",
    "mixed latents (per-stream)",
    "cross NMSE (per-stream, leak-free)",
    "retrieval R@1 caption→image (per-stream codes)",
]


def comparison_figure(groups: dict[str, list[Record]], path: str | Path) -> Path:
    """Bar charts of :data:`FIGURE_ROWS`, one bar per group (mean, with the std over its runs)."""
    from matplotlib.figure import Figure

    from sparc.report.figures import save_png

    values = summarise(groups, TABLE_ROWS)
    cols = list(groups)
    fig = Figure(figsize=(3.2 * len(FIGURE_ROWS), 3.4 + 0.12 * max(len(c) for c in cols)), layout="constrained")
    axes = fig.subplots(1, len(FIGURE_ROWS))
    for ax, label in zip(axes, FIGURE_ROWS, strict=True):
        stats = [mean_std(values[c][label]) if values[c][label] else (float("nan"), 0.0) for c in cols]
        ax.bar(range(len(cols)), [m for m, _ in stats], yerr=[s for _, s in stats], color="tab:blue", capsize=3)
        ax.set_xticks(range(len(cols)), [COLUMN_TITLES.get(c, c) for c in cols], rotation=60, ha="right", fontsize=8)
        ax.set_title(label.replace(" (", "\n("), fontsize=9)
    fig.suptitle("Comparison of runs (mean ± std over seeds where averaged)", fontsize=10)
    return save_png(fig, path)


# The columns of `python -m sparc show`: the headline metrics that compare runs at a glance (both
# kinds of codes) and the ablation knobs; fits a 200-column terminal with a grid's names.
