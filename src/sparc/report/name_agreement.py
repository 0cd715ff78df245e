"""Validation of the names from captions against the names from labels, on a run with real labels:
``python -m sparc validate-text --part names`` (docs/unlabeled.md).

For each kind of codes (joint, per_stream) and stream, the *named* latents are those with a
label-derived name (``<s>_name`` of the concepts CSVs: purity >= ``concepts.purity_threshold``).
A named latent *agrees* when the words of its label name are among the words of its top text
terms (``<s>_text_words``: the best ``concepts.text_words`` caption terms,
:mod:`sparc.evaluate.text_names`):

* ``any``: at least one content word of the label name is a word of those terms;
* ``all``: every content word of the label name is.

Words: lower-case runs of letters and digits (:func:`words`), without scikit-learn's English stop
words, a plural ``-s`` removed (``flags`` -> ``flag``; not after ``s``, not from words of 3
letters or fewer). A label name with no content word counts as named but never agrees.

Baseline: the same fractions after permuting which latent's text terms go with which label name,
among the named latents of that kind and stream (``permutations`` draws, seeded; mean and
standard deviation), i.e. how often a random named latent's terms would hold the label's words.
Caption streams with zero-shot names (``<s>_zero_shot_name``) get the same comparison for those
names (one term each), as their own rows.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparc.evaluate.run_files import CODE_KINDS, CONCEPTS_CSV, CONCEPTS_SUMMARY, read_json_object
from sparc.evaluate.text_names import TERM_SEP

BEGIN, END = "<!-- text-names:begin -->", "<!-- text-names:end -->"
RULES = ("any", "all")


def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


def words(text: str) -> set[str]:
    """The content words of ``text`` (module docstring: lower case, stop words dropped, a plural
    ``-s`` removed)."""
    stop = _stop_words()
    out = set()
    for w in re.findall(r"[^\W_]+", text.lower()):
        if w in stop:
            continue
        out.add(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w)
    return out


def agreement(label_names: Sequence[str], terms: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
    """Per named latent (``label_names[i]``, its text ``terms[i]``) whether it agrees, per rule of
    :data:`RULES`: ``{"any": bool [n], "all": bool [n]}``."""
    if len(label_names) != len(terms):
        raise ValueError(f"{len(label_names)} label names, {len(terms)} term lists")
    label = [words(n) for n in label_names]
    text = [set().union(*(words(t) for t in ts)) if ts else set() for ts in terms]
    return {
        "any": np.array([bool(a & b) for a, b in zip(label, text, strict=True)], dtype=bool),
        "all": np.array([bool(a) and a <= b for a, b in zip(label, text, strict=True)], dtype=bool),
    }


@dataclass(frozen=True)
class Agreement:
    """One row of the validation: ``n_named`` latents, the fraction agreeing per rule, and the
    shuffled baseline's mean and standard deviation per rule."""

    kind: str
    stream: str
    names: str  # "text" (top terms) | "zero-shot"
    n_named: int
    fraction: dict[str, float]
    shuffled_mean: dict[str, float]
    shuffled_std: dict[str, float]


def compare(kind: str, stream: str, names: str, label_names: list[str], terms: list[list[str]],
            permutations: int, seed: int) -> Agreement:
    """:class:`Agreement` of the named latents' ``label_names`` and ``terms`` (module docstring)."""
    n = len(label_names)
    observed = agreement(label_names, terms)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {r: [] for r in RULES}
    for _ in range(permutations if n else 0):
        perm = rng.permutation(n)
        shuffled = agreement(label_names, [terms[j] for j in perm])
        for r in RULES:
            draws[r].append(float(shuffled[r].mean()))
    nan = float("nan")
    return Agreement(
        kind, stream, names, n,
        {r: float(observed[r].mean()) if n else nan for r in RULES},
        {r: float(np.mean(draws[r])) if draws[r] else nan for r in RULES},
        {r: float(np.std(draws[r])) if draws[r] else nan for r in RULES},
    )


def name_agreement(concepts_dir: str | Path, permutations: int = 20, seed: int = 0) -> tuple[list[Agreement], dict]:
    """Every kind x stream (x text / zero-shot names) row of the validation from the concepts
    stage's CSVs in ``concepts_dir``; returns the rows and the stage's summary. ValueError when the
    CSVs have no text names (concepts computed before they existed: re-run ``dvc repro concepts``)."""
    concepts_dir = Path(concepts_dir)
    summary = read_json_object(concepts_dir / CONCEPTS_SUMMARY, "concepts", "concepts")
    out = []
    for k, kind in enumerate(CODE_KINDS):
        path = concepts_dir / CONCEPTS_CSV[kind]
        if not path.is_file():
            raise FileNotFoundError(f"concepts incomplete: {path} is missing (run `dvc repro concepts`)")
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            raise ValueError(f"{path}: no rows")
        streams = [c.removesuffix("_text_words") for c in rows[0] if c.endswith("_text_words")]
        if not streams:
            raise ValueError(f"{path}: no text names (computed before they existed); run `dvc repro concepts`")
        for j, s in enumerate(streams):
            named = [r for r in rows if r[f"{s}_name"]]
            labels = [r[f"{s}_name"] for r in named]
            terms = [[t for t in r[f"{s}_text_words"].split(TERM_SEP) if t] for r in named]
            out.append(compare(kind, s, "text", labels, terms, permutations, seed + 100 * k + j))
            if f"{s}_zero_shot_name" in rows[0]:
                zs = [[r[f"{s}_zero_shot_name"]] if r[f"{s}_zero_shot_name"] else [] for r in named]
                out.append(compare(kind, s, "zero-shot", labels, zs, permutations, seed + 100 * k + j + 50))
    return out, summary


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:.1f}%"


def agreement_table(rows: list[Agreement]) -> str:
    """The markdown table of :func:`name_agreement`'s rows."""
    lines = [
        "| codes | stream | names | named latents | any word | shuffled (any) | all words | shuffled (all) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for a in rows:
        cells = [a.kind.replace("_", "-"), a.stream, a.names, str(a.n_named)]
        for r in RULES:
            cells += [f"**{_pct(a.fraction[r])}**",
                      f"{_pct(a.shuffled_mean[r])} ± {_pct(a.shuffled_std[r])}" if np.isfinite(a.shuffled_mean[r]) else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_block(rows: list[Agreement], summary: dict, dataset: str, permutations: int, command: str) -> str:
    """The generated docs block: what was compared, on which run, and the table."""
    codes = summary.get("codes", {})
    text = summary.get("text", {})
    return "\n".join([
        f"Dataset `{dataset}`, split `{summary.get('split')}` ({summary.get('n_samples')} samples), "
        f"L {summary.get('L')}, model sha256 `{str(codes.get('model_sha256', ''))[:12]}`; label names from the top "
        f"{summary.get('top_n')} samples at purity >= {summary.get('purity_threshold')}, text terms: the best "
        f"{text.get('words')} of {text.get('vocab')} caption terms; zero-shot: the best of "
        f"{summary.get('zero_shot', {}).get('vocab', 0)} terms. Shuffled: {permutations} permutations of the "
        "named latents' terms (mean ± std).",
        "",
        agreement_table(rows),
        "",
        f"Generated by `{command}`.",
    ])


DOC = Path("docs/unlabeled.md")


def validate_names(root: str | Path = ".", doc: str | Path = DOC, permutations: int = 20, seed: int = 0,
                   command: str = "python -m sparc validate-text --part names") -> str:
    """Compute the validation on the run of repository ``root`` (its ``params.yaml`` and
    ``reports/concepts``), rewrite the block between :data:`BEGIN` and :data:`END` of ``doc``, and
    return the block."""
    from sparc import paths
    from sparc.params import load_params
    from sparc.report.ablation import replace_block

    if permutations < 1:
        raise ValueError(f"permutations must be >= 1, got {permutations}")
    root = Path(root)
    dataset = load_params(root / "params.yaml").data.dataset
    rows, summary = name_agreement(root / paths.concepts_dir(), permutations, seed)
    block = agreement_block(rows, summary, dataset, permutations, command)
    doc = Path(doc)
    doc.write_text(replace_block(doc.read_text(), block, BEGIN, END, name=str(doc)))
    return block
