"""Hierarchical generalised Jaccard between streams, per latent and depth (method.md section 4).

For latent l and stream s, u^s_l[b] = number of samples where z^s_l > 0 and label b is on (all
samples of the evaluated split, multi-hot sums). At depth d every label is lifted to its ancestor
at d (labels shallower than d stay themselves) and the counts of labels sharing an ancestor add up.
A latent's score at depth d is the mean of GJ(u^s_l, u^t_l) over the unordered stream pairs in
which the latent fires in both streams; a latent firing in fewer than two streams scores 0.
Averages: over all L latents, and over *live* latents (firing in at least one stream).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from sparc.evaluate.labels import LabelSpace
from sparc.evaluate.metrics import firing_counts, firing_matrix, latent_jaccard, latent_label_counts


def hierarchical_jaccard(
    codes: dict[str, sp.csr_matrix], labels: sp.csr_matrix, space: LabelSpace
) -> dict[int, np.ndarray]:
    """Per-latent score ``[L]`` at every depth 0..max_depth of ``space.hierarchy``.

    ``codes[s]`` ``[N, L]`` CSR of one split, ``labels`` ``[N, B]`` multi-hot of the same rows.
    """
    counts = {s: latent_label_counts(firing_matrix(mat), labels) for s, mat in codes.items()}
    alive = {s: firing_counts(mat) > 0 for s, mat in codes.items()}
    out = {}
    for depth in range(space.hierarchy.max_depth + 1):
        lift = space.lift(depth)
        out[depth] = latent_jaccard({s: (c @ lift).tocsr() for s, c in counts.items()}, alive)
    return out


def jaccard_summary(scores: dict[int, np.ndarray], live: np.ndarray) -> dict:
    """``{"depth_<d>": {"all": mean over L, "live": mean over live latents}}``."""
    return {
        f"depth_{d}": {
            "all": float(v.mean()),
            "live": float(v[live].mean()) if live.any() else 0.0,
        }
        for d, v in scores.items()
    }
