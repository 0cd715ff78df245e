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

from sparc.npz import save_npz


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
        arrays = {f"{s}__indices": a.astype(np.int32) for s, a in self.indices.items()}
        arrays.update({f"{s}__values": a.astype(np.float32) for s, a in self.values.items()})
        save_npz(path / "codes.npz", arrays)
        (path / "codes.json").write_text(json.dumps({"L": self.L, "streams": self.streams, "ids": self.ids}))

    @classmethod
    def load(cls, path: str | Path) -> SparseCodes:
        path = Path(path)
        for name in ("codes.npz", "codes.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"sparse codes incomplete: {path / name} is missing")
        meta = json.loads((path / "codes.json").read_text())
        with np.load(path / "codes.npz") as z:
            indices = {s: z[f"{s}__indices"] for s in meta["streams"]}
            values = {s: z[f"{s}__values"] for s in meta["streams"]}
        return cls(ids=meta["ids"], L=int(meta["L"]), indices=indices, values=values)
