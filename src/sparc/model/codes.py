"""Sparse codes: what the SAE says about every sample, never as an N x L dense matrix.

For each stream s, ``indices[s]`` is ``[N, k]`` int32 latent ids and ``values[s]`` is ``[N, k]``
float32 activations (>= 0; an entry may be 0 where ReLU cut a globally chosen index). In joint
(Global TopK) inference the index rows are identical across streams; in per-stream inference each
stream has its own. ``ids`` are the sample ids in row order, so codes can be checked against the
labels and features they are combined with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparc.npz import load_npz_rows, save_npz


@dataclass(frozen=True)
class SparseCodes:
    ids: list[str]
    L: int
    indices: dict[str, np.ndarray]  # stream -> [N, k] int32
    values: dict[str, np.ndarray]  # stream -> [N, k] float32

    @property
    def streams(self) -> list[str]:
        return list(self.indices)

    def __len__(self) -> int:
        return len(self.ids)

    def active(self, stream: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows, latents) of the strictly positive entries of ``stream``, each ``[nnz]``."""
        vals = self.values[stream]
        rows, cols = np.nonzero(vals > 0)
        return rows, self.indices[stream][rows, cols]

    def subset(self, rows: np.ndarray) -> SparseCodes:
        """Codes of the given rows (e.g. one split), in that order."""
        return SparseCodes(
            ids=[self.ids[i] for i in rows],
            L=self.L,
            indices={s: a[rows] for s, a in self.indices.items()},
            values={s: a[rows] for s, a in self.values.items()},
        )

    def save(self, path: str | Path) -> None:
        """Write ``codes.npz`` + ``codes.json`` (ids, L, streams) into directory ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        arrays = {f"{s}__indices": a.astype(np.int32, copy=False) for s, a in self.indices.items()}
        arrays.update({f"{s}__values": a.astype(np.float32, copy=False) for s, a in self.values.items()})
        save_npz(path / "codes.npz", arrays)
        (path / "codes.json").write_text(json.dumps({"L": self.L, "streams": self.streams, "ids": self.ids}))

    @staticmethod
    def read_meta(path: str | Path) -> dict:
        """``codes.json`` of directory ``path``: ``L``, ``streams`` and ``ids`` (every stored row, in
        order). FileNotFoundError when ``codes.npz`` or ``codes.json`` is missing."""
        path = Path(path)
        for name in ("codes.npz", "codes.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"sparse codes incomplete: {path / name} is missing")
        return json.loads((path / "codes.json").read_text())

    @classmethod
    def load(cls, path: str | Path, rows: np.ndarray | None = None, meta: dict | None = None) -> SparseCodes:
        """The codes saved in directory ``path``: every row, or only the stored rows ``rows`` (int
        indices, e.g. one split's; row ``j`` of the result is stored row ``rows[j]``), read without
        loading the rest (:func:`sparc.npz.load_npz_rows`). ``meta``: :meth:`read_meta`'s result
        when the caller has read it already. ValueError when the arrays do not have one row per
        stored id or a row is out of range."""
        path = Path(path)
        meta = cls.read_meta(path) if meta is None else meta
        ids, streams = meta["ids"], meta["streams"]
        arrays = load_npz_rows(path / "codes.npz", rows, n_rows=len(ids))
        if rows is not None:
            ids = [ids[i] for i in np.asarray(rows, dtype=np.int64).reshape(-1)]
        indices = {s: arrays[f"{s}__indices"] for s in streams}
        values = {s: arrays[f"{s}__values"] for s in streams}
        return cls(ids=ids, L=int(meta["L"]), indices=indices, values=values)
