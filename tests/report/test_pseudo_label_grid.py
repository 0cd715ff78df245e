"""The tables of the pseudo-label validation on hand-made runs (sparc.report.pseudo_label_grid)."""

from __future__ import annotations

from sparc.report.pseudo_label_grid import CONFIGS, GridRun, claims_table, rank_agreement, shuffled

BASE = {"sparc": 0.5, "global-lam0": 0.4, "local-lam1": 0.2, "local-lam0": 0.1}


def runs(flip: bool) -> list[GridRun]:
    """12 runs; the WordNet values follow the real ones, or (``flip``) reverse them; the shuffled
    control is flat but for the seed."""
    out = []
    for c in CONFIGS:
        for seed in range(3):
            real = BASE[c] + 0.01 * seed
            wn = (0.6 - real) if flip else real + 0.05
            m = {ls: {"jaccard_d0": v, "jaccard_d2": v, "jaccard_live": v, "jaccard_ps": v, "jaccard_ps_live": v}
                 for ls, v in (("real", real), ("wordnet", wn), ("shuffled", 0.3 + 0.01 * seed))}
            out.append(GridRun(c, seed, 1.0, m))
    return out


def test_orderings_that_agree_and_that_do_not() -> None:
    agree = rank_agreement(runs(False))
    assert agree.count("+1.00 (p=") >= 5 and "Global, λ=1 (SPARC) > Global, λ=0 > Local, λ=1 > Local, λ=0" in agree
    assert "-1.00" in rank_agreement(runs(True))
    same = claims_table(runs(False))
    assert "| Global TopK aligns more than Local TopK (Jaccard, λ=1) | holds (0.510 vs 0.210) | holds" in same
    assert all(line.split(" | ")[-2] == "yes" for line in same.splitlines()[2:])  # WordNet: the real verdicts
    assert "reversed" in claims_table(runs(True)) and "**no**" in claims_table(runs(True))
    assert "| claim | real labels | WordNet pseudo-labels | shuffled pseudo-labels | same verdict (wordnet) | same verdict (shuffled) |" in same
    assert "| holds (0.510 vs 0.210) | holds (0.560 vs 0.260) | within noise (0.310 vs 0.310) | yes | **no** |" in same
    control = rank_agreement(runs(False), "shuffled")
    assert "order, shuffled pseudo-labels" in control and "n/a" in control  # equal means: no ordering


def test_shuffled_labels_keep_the_labels_not_their_samples() -> None:
    labels = [(str(i),) for i in range(50)]
    out = shuffled(labels)
    assert sorted(out) == sorted(labels) and out != labels and out == shuffled(labels)
