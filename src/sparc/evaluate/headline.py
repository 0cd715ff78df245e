"""The headline metrics: the numbers a researcher compares across runs, in one flat JSON.

``reports/headline.json`` is what DVC shows as the run's metrics (``dvc exp show``,
``dvc metrics show``) and what ``python -m sparc compare`` tabulates; the full evaluation
stays in ``reports/metrics.json`` (a plain output). Every value is read from that full file
(:func:`headline`), so the two never disagree. Keys (``null`` when undefined):

    jaccard_d<d>      hierarchical Jaccard at depth d, joint codes, mean over all L latents
    jaccard_live      ... at the deepest depth, over live latents
    jaccard_ps        ... per-stream codes, deepest depth, all latents
    jaccard_ps_live   ... per-stream codes, deepest depth, live latents
    alive, dead, mixed  activation patterns of the joint codes (fractions of L)
    mixed_ps          mixed latents of the per-stream codes
    agree, agree_ps   fraction of latents named alike in every stream (joint / per-stream)
    entropy, entropy_ps   mean firing entropy of firing latents (1 = fires equally in every stream)
    nmse_self         self NMSE, joint codes (mean over streams)
    nmse_self_ps      self NMSE, per-stream codes (each stream encoded alone)
    nmse_cross        cross NMSE, joint codes (the training loss's cross term)
    nmse_cross_lf     cross NMSE, per-stream codes: leak-free
    probe_logloss     1-D probe test log-loss, mean over streams (chance ln 2 = 0.693)
    r1_cap2img, r1_img2cap   retrieval R@1 with per-stream codes, mean over caption->image
                      (image->caption) stream pairs
    l0                mean non-zeros per sample of the joint codes, mean over streams
    random_weights    only when some streams' models had random weights (metrics.json
                      ``random_weights``): how many; the run's numbers mean nothing (the
                      first key, so that ``dvc exp show`` shows it first)

The evaluation plots (``reports/plots/*.csv``, declared under ``plots:`` in dvc.yaml so that
``dvc plots diff`` compares runs) are written by :func:`plot_tables`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _depths(jaccard: Mapping) -> list[int]:
    return sorted(int(m.group(1)) for k in jaccard if (m := re.fullmatch(r"depth_(\d+)", k)))


def headline(metrics: Mapping, inputs: Mapping[str, str]) -> dict[str, float | None]:
    """The headline numbers (module docstring) of a full ``metrics.json``; ``inputs`` maps each
    stream to its input (``image`` or ``caption``), in stream order."""
    jac, pat, rec = metrics["jaccard"], metrics["patterns"], metrics["reconstruction"]
    deepest = f"depth_{_depths(jac['joint'])[-1]}"
    out: dict[str, float | None] = {f"jaccard_d{d}": jac["joint"][f"depth_{d}"]["all"] for d in _depths(jac["joint"])}
    out.update(
        jaccard_live=jac["joint"][deepest]["live"],
        jaccard_ps=jac["per_stream"][deepest]["all"],
        jaccard_ps_live=jac["per_stream"][deepest]["live"],
        alive=pat["joint"]["alive_all"],
        dead=pat["joint"]["dead_all"],
        mixed=pat["joint"]["mixed"],
        mixed_ps=pat["per_stream"]["mixed"],
        agree=metrics["concepts"]["joint"]["agreeing_fraction"],
        agree_ps=metrics["concepts"]["per_stream"]["agreeing_fraction"],
        entropy=metrics["universality"]["joint"]["firing_entropy_mean"],
        entropy_ps=metrics["universality"]["per_stream"]["firing_entropy_mean"],
        nmse_self=rec["joint"]["self_nmse_mean"],
        nmse_self_ps=rec["per_stream"]["self_nmse_mean"],
        nmse_cross=rec["joint"]["cross_nmse_mean"],
        nmse_cross_lf=rec["per_stream"]["cross_nmse_mean"],
        probe_logloss=_mean(list(metrics["probes"]["mean_test_logloss"].values())),
    )
    ret = metrics["retrieval"]
    for key, (q, g) in (("r1_cap2img", ("caption", "image")), ("r1_img2cap", ("image", "caption"))):
        pairs = [f"{s}->{t}" for s in inputs for t in inputs if inputs[s] == q and inputs[t] == g]
        out[key] = _mean([ret[p]["R@1"] for p in pairs if p in ret])
    out["l0"] = _mean(list(metrics["sparsity"]["l0_joint"].values()))
    if metrics.get("random_weights"):  # first, so that tables of the metrics show it first
        out = {"random_weights": len(metrics["random_weights"]), **out}
    return out


def plot_tables(metrics: Mapping) -> dict[str, list[dict]]:
    """Rows of the evaluation plot files: file name -> rows (dvc.yaml ``plots:``).

    ``jaccard.csv``: depth, joint, joint_live, per_stream, per_stream_live;
    ``patterns.csv``: pattern (alive_all | dead_all | mixed), joint, per_stream;
    ``reconstruction.csv``: pair (``s->t``), joint, per_stream (NMSE);
    ``retrieval.csv``: pair (``s->t``), R@1, R@5, R@10 (per-stream codes).
    """
    jac = metrics["jaccard"]
    jaccard = [
        {
            "depth": d,
            "joint": jac["joint"][f"depth_{d}"]["all"],
            "joint_live": jac["joint"][f"depth_{d}"]["live"],
            "per_stream": jac["per_stream"][f"depth_{d}"]["all"],
            "per_stream_live": jac["per_stream"][f"depth_{d}"]["live"],
        }
        for d in _depths(jac["joint"])
    ]
    patterns = [
        {"pattern": p, "joint": metrics["patterns"]["joint"][p], "per_stream": metrics["patterns"]["per_stream"][p]}
        for p in ("alive_all", "dead_all", "mixed")
    ]
    rec = metrics["reconstruction"]
    reconstruction = [
        {"pair": pair, "joint": rec["joint"]["nmse"][pair], "per_stream": rec["per_stream"]["nmse"][pair]}
        for pair in rec["joint"]["nmse"]
    ]
    retrieval = [
        {"pair": k, **{r: v[r] for r in ("R@1", "R@5", "R@10")}}
        for k, v in metrics["retrieval"].items()
        if "->" in k
    ]
    return {
        "jaccard.csv": jaccard,
        "patterns.csv": patterns,
        "reconstruction.csv": reconstruction,
        "retrieval.csv": retrieval,
    }
