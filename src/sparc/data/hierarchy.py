"""Label hierarchies: a tree of label ids, used to lift labels to any depth for Jaccard.

Depth 0 is the root. Every label id appears once in the tree; a dataset whose source lists a label
in several places resolves that before building the :class:`Hierarchy` (the deepest occurrence).
Labels are always addressed by id, never by display order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ROOT = "__root__"


@dataclass(frozen=True)
class Hierarchy:
    """A rooted label tree.

    ``parents[label]`` is the parent id (``None`` only for the root ``ROOT``); ``names[label]`` is
    a display name. Build it with :meth:`from_parents`, which adds the root and checks for cycles.
    """

    parents: dict[str, str | None]
    names: dict[str, str]
    _depth: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_parents(
        cls, parents: dict[str, str | None], names: dict[str, str] | None = None
    ) -> Hierarchy:
        """Build from ``label -> parent`` (``None`` = child of the root); checks it is a tree."""
        full: dict[str, str | None] = {ROOT: None}
        for label, parent in parents.items():
            if label == ROOT:
                continue
            full[label] = ROOT if parent in (None, "", ROOT) else parent
        for label, parent in full.items():
            if parent is not None and parent not in full:
                raise ValueError(f"hierarchy: label {label!r} has unknown parent {parent!r}")
        all_names = {ROOT: "root"}
        all_names.update({lab: lab for lab in full if lab != ROOT})
        all_names.update(names or {})
        depth: dict[str, int] = {ROOT: 0}
        for label in full:
            chain = []
            node: str | None = label
            while node is not None and node not in depth:
                if node in chain:
                    raise ValueError(f"hierarchy: cycle through label {node!r}")
                chain.append(node)
                node = full[node]
            base = depth[node] if node is not None else -1
            for offset, member in enumerate(reversed(chain), start=1):
                depth[member] = base + offset
        return cls(parents=full, names=all_names, _depth=depth)

    @classmethod
    def flat(cls, labels: list[str]) -> Hierarchy:
        """A one-level hierarchy: every label is a child of the root."""
        return cls.from_parents({label: None for label in labels})

    @property
    def labels(self) -> list[str]:
        """All label ids except the root, in insertion order."""
        return [label for label in self.parents if label != ROOT]

    @property
    def max_depth(self) -> int:
        return max(self._depth.values())

    def depth(self, label: str) -> int:
        """Depth of ``label`` (root = 0). Raises KeyError naming an unknown label."""
        try:
            return self._depth[label]
        except KeyError:
            raise KeyError(f"label {label!r} is not in the hierarchy") from None

    def ancestor_at(self, label: str, depth: int) -> str:
        """The ancestor of ``label`` at ``depth``; a label shallower than ``depth`` maps to itself."""
        node = label
        while self.depth(node) > depth:
            parent = self.parents[node]
            assert parent is not None
            node = parent
        return node

    def labels_at_depth(self, depth: int) -> list[str]:
        """Ids that labels lift to at ``depth``: nodes at that depth plus shallower leaves."""
        children = {p for p in self.parents.values() if p is not None}
        return [
            lab
            for lab in self.parents
            if self._depth[lab] == depth or (self._depth[lab] < depth and lab not in children)
        ]

    def to_json(self) -> dict:
        return {
            "labels": [
                {"id": lab, "name": self.names[lab], "parent": self.parents[lab]}
                for lab in self.labels
            ]
        }

    @classmethod
    def from_json(cls, data: dict) -> Hierarchy:
        """Inverse of :meth:`to_json`: ``{"labels": [{"id", "name", "parent"}]}``."""
        try:
            entries = data["labels"]
            parents = {str(e["id"]): e.get("parent") for e in entries}
            names = {str(e["id"]): str(e.get("name", e["id"])) for e in entries}
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"hierarchy JSON: expected {{'labels': [{{'id', 'parent'}}]}} ({err})") from None
        if len(parents) != len(entries):
            seen: set[str] = set()
            dup = next(str(e["id"]) for e in entries if str(e["id"]) in seen or seen.add(str(e["id"])))
            raise ValueError(f"hierarchy JSON: label {dup!r} is listed more than once")
        return cls.from_parents(parents, names)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Hierarchy:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"hierarchy file not found: {path}")
        return cls.from_json(json.loads(path.read_text()))
