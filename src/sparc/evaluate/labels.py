"""Sample labels as sparse matrices over label ids, and their lifts through the hierarchy.

Columns are always addressed by label id (never by display order): ``label_ids`` are the
hierarchy's labels in its own order, ``nodes`` the same with the root first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from sparc.data.hierarchy import ROOT, Hierarchy
from sparc.evaluate.metrics import label_matrix, lift_matrix


@dataclass(frozen=True)
class LabelSpace:
    """The label columns of one hierarchy."""

    hierarchy: Hierarchy

    @property
    def label_ids(self) -> list[str]:
        """Columns of :meth:`matrix`: every label id except the root."""
        return self.hierarchy.labels

    @property
    def nodes(self) -> list[str]:
        """Columns after lifting or closing: the root, then :attr:`label_ids`."""
        return [ROOT, *self.hierarchy.labels]

    def name(self, label: str) -> str:
        return self.hierarchy.names.get(label, label)

    def matrix(self, labels: Sequence[Sequence[str]]) -> sp.csr_matrix:
        """Multi-hot ``[N, B]`` of the samples' label ids (B = len(label_ids))."""
        return label_matrix(labels, self.label_ids)

    def lift(self, depth: int) -> sp.csr_matrix:
        """``[B, 1 + B]`` 0/1: label column -> node column of its ancestor at ``depth``.

        ``Y @ lift(d)`` sums, per node at depth d, the counts of all labels below it
        (:meth:`Hierarchy.ancestor_at`: a label shallower than d stays itself).
        """
        col = {node: j for j, node in enumerate(self.nodes)}
        target = [col[self.hierarchy.ancestor_at(lab, depth)] for lab in self.label_ids]
        return lift_matrix(target, len(self.nodes))

    def closure(self) -> sp.csr_matrix:
        """``[B, 1 + B]`` 0/1: label column -> itself and every ancestor except the root.

        ``(Y @ closure()) > 0`` says, per node, whether a sample carries it or a label below it.
        """
        col = {node: j for j, node in enumerate(self.nodes)}
        rows: list[int] = []
        cols: list[int] = []
        for j, lab in enumerate(self.label_ids):
            node: str | None = lab
            while node is not None and node != ROOT:
                rows.append(j)
                cols.append(col[node])
                node = self.hierarchy.parents[node]
        B = len(self.label_ids)
        return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(B, B + 1))
