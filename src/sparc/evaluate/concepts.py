"""Concept naming: each latent's dominant label among its top activating samples, per stream.

For latent l and stream s, take the (up to) ``top_n`` samples with the largest z^s_l > 0, count
the label ids they carry (every label of a multi-label sample counts), and call the most frequent
one the dominant label (ties: the label listed first in the hierarchy). purity = the share of those
top samples that carry the dominant label. The latent is *named* in s (the label's display name)
when purity >= threshold, and *agrees* when it is named in every stream with the same label id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from sparc.evaluate.labels import LabelSpace
from sparc.evaluate.metrics import dominant_labels, firing_counts, top_activating


@dataclass(frozen=True)
class ConceptTable:
    """Per stream, ``[L]`` arrays / lists: firings, dominant label id ('' if none), purity, name;
    and ``top[s]``, the ``(latents, rows)`` pairs of the top samples the names come from
    (:func:`sparc.evaluate.metrics.top_activating`; the text names read the same ones)."""

    streams: list[str]
    n_active: dict[str, np.ndarray]
    label: dict[str, list[str]]
    purity: dict[str, np.ndarray]
    name: dict[str, list[str]]
    top: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def L(self) -> int:
        return len(self.purity[self.streams[0]])

    def agreed(self) -> list[str]:
        """Per latent the name shared by every stream (same label id, named everywhere), else ''."""
        out = []
        for i in range(self.L):
            labels = {self.label[s][i] for s in self.streams}
            named = all(self.name[s][i] for s in self.streams)
            out.append(self.name[self.streams[0]][i] if named and len(labels) == 1 else "")
        return out


def assign_concepts(
    codes: dict[str, sp.csr_matrix],
    labels: sp.csr_matrix,
    space: LabelSpace,
    top_n: int,
    threshold: float,
) -> ConceptTable:
    """Name every latent in every stream (module docstring). ``codes[s]`` ``[N, L]`` CSR,
    ``labels`` ``[N, B]`` multi-hot over ``space.label_ids``."""
    streams = list(codes)
    ids = space.label_ids
    table = ConceptTable(streams, {}, {}, {}, {}, {})
    for s, mat in codes.items():
        L = mat.shape[1]
        lat, rows = table.top[s] = top_activating(mat, top_n)
        dominant, purity, _ = dominant_labels(lat, rows, labels, L)
        label = [ids[j] if j >= 0 else "" for j in dominant]
        table.n_active[s] = firing_counts(mat)
        table.label[s] = label
        table.purity[s] = purity
        table.name[s] = [
            space.name(lab) if lab and p >= threshold else "" for lab, p in zip(label, purity, strict=True)
        ]
    return table


CSV_FIELDS = ("n_active", "label", "name", "purity")


def concept_rows(table: ConceptTable) -> list[dict]:
    """CSV rows: ``latent``, per stream ``<s>_n_active``, ``<s>_label``, ``<s>_name``,
    ``<s>_purity``, then ``agreed_name``."""
    agreed = table.agreed()
    rows = []
    for i in range(table.L):
        row: dict = {"latent": i}
        for s in table.streams:
            row[f"{s}_n_active"] = int(table.n_active[s][i])
            row[f"{s}_label"] = table.label[s][i]
            row[f"{s}_name"] = table.name[s][i]
            row[f"{s}_purity"] = round(float(table.purity[s][i]), 6)
        row["agreed_name"] = agreed[i]
        rows.append(row)
    return rows


def concept_summary(table: ConceptTable) -> dict:
    """``named_fraction`` (of all L latents) and ``mean_purity`` (over latents firing in that
    stream) per stream, ``agreeing`` (count) and ``agreeing_fraction``."""
    agreed = table.agreed()
    named = {s: float(np.mean([bool(n) for n in table.name[s]])) for s in table.streams}
    purity = {}
    for s in table.streams:
        live = table.n_active[s] > 0
        purity[s] = float(table.purity[s][live].mean()) if live.any() else 0.0
    n_agree = sum(bool(a) for a in agreed)
    return {
        "named_fraction": named,
        "mean_purity": purity,
        "agreeing": n_agree,
        "agreeing_fraction": n_agree / table.L,
    }
