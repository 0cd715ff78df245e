"""Planted-concept benchmark: synthetic multi-stream features whose shared concepts are known.

Generative model (all randomness from ``PlantedConfig.seed``):

1. Concept hierarchy: ``n_parents`` top concepts ``p{i}``, each with ``n_children`` leaf concepts
   ``p{i}.c{j}``. The leaves are the planted concepts; a parent is implied by any of its children
   (labels are leaf ids, lifting them with :meth:`Hierarchy.ancestor_at` gives the parents).
2. World vectors: each leaf c gets a unit vector ``w_c`` in a shared world space of dimension
   ``world_dim``: ``w_c = normalise(sqrt(family_share) g_parent + sqrt(1 - family_share) g_c)``
   with Gaussian ``g``, so siblings have cosine about ``family_share`` (the hierarchy is visible in
   the features, not only in the labels).
3. Samples: sample n activates a uniformly drawn number of distinct leaves in
   ``[min_active, max_active]``, each with magnitude ``a ~ U(mag_low, mag_high)``;
   its world code is ``z_n = sum_c a_nc w_c``.
4. Streams: stream s maps the world code through its own random 2-layer MLP without biases,
   ``f_s(z) = W2_s leaky_relu(W1_s z)`` (``W1_s`` is ``[hidden_mult * d_s, world_dim]``,
   ``W2_s`` is ``[d_s, hidden_mult * d_s]``, Gaussian, negative slope ``leak``), then adds
   ``n_nuisance`` stream-specific nuisance directions (unit vectors present in that stream only,
   each active with probability ``nuisance_prob`` and magnitude ``nuisance_scale * U(mag_low,
   mag_high)`` relative to the mean concept response norm) and isotropic Gaussian noise whose
   expected norm is ``noise`` times the mean concept response norm.

Planted direction of leaf c in stream s: the stream's mean response to the concept alone,
``normalise(mean_a f_s(a w_c))`` with ``a`` over ``n_magnitudes`` evenly spaced quantiles of the
magnitude distribution (``f_s`` is positively homogeneous, so this is ``normalise(f_s(w_c))``; the
mean keeps the definition valid for any activation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sparc.data.hierarchy import Hierarchy


def _default_dims() -> dict[str, int]:
    return {"a": 48, "b": 32, "c": 40}


@dataclass(frozen=True)
class PlantedConfig:
    """Size and difficulty of the planted-concept data (see the module docstring)."""

    dims: dict[str, int] = field(default_factory=_default_dims)
    n_samples: int = 2000
    n_parents: int = 4
    n_children: int = 4
    world_dim: int = 32
    family_share: float = 0.3
    min_active: int = 1
    max_active: int = 3
    mag_low: float = 0.5
    mag_high: float = 1.5
    hidden_mult: int = 2
    leak: float = 0.25
    n_nuisance: int = 4
    nuisance_prob: float = 0.5
    nuisance_scale: float = 1.0
    noise: float = 0.05
    n_magnitudes: int = 16
    seed: int = 0

    def check(self) -> None:
        """Raise ValueError naming the first out-of-range field."""
        if len(self.dims) < 1 or any(d < 2 for d in self.dims.values()):
            raise ValueError(f"dims: need at least one stream, each of dim >= 2, got {self.dims}")
        for name in ("n_samples", "n_parents", "n_children", "world_dim", "hidden_mult", "n_magnitudes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        n_leaves = self.n_parents * self.n_children
        if not 1 <= self.min_active <= self.max_active <= n_leaves:
            raise ValueError(
                f"min_active/max_active: need 1 <= {self.min_active} <= {self.max_active} <= {n_leaves} leaves"
            )
        if not 0.0 <= self.family_share < 1.0:
            raise ValueError(f"family_share: must be in [0, 1), got {self.family_share}")
        if not 0.0 < self.mag_low <= self.mag_high:
            raise ValueError(f"mag_low/mag_high: need 0 < {self.mag_low} <= {self.mag_high}")
        if not 0.0 <= self.nuisance_prob <= 1.0:
            raise ValueError(f"nuisance_prob: must be in [0, 1], got {self.nuisance_prob}")
        for name in ("n_nuisance", "nuisance_scale", "noise", "leak"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class PlantedData:
    """Planted-concept data set; rows are aligned across streams.

    ``features[s]`` is ``[N, d_s]`` float32; ``concepts`` is the ``[N, C]`` bool indicator of the
    leaf concepts ``concept_ids`` (the planted ones); ``labels[n]`` are sample n's active leaf ids;
    ``directions[s]`` is ``[C, d_s]``, row c the unit planted direction of ``concept_ids[c]``;
    ``nuisance[s]`` is ``[n_nuisance, d_s]``, the unit nuisance directions of stream s.
    """

    ids: list[str]
    features: dict[str, np.ndarray]
    concepts: np.ndarray
    concept_ids: list[str]
    labels: list[tuple[str, ...]]
    hierarchy: Hierarchy
    directions: dict[str, np.ndarray]
    nuisance: dict[str, np.ndarray]
    config: PlantedConfig

    @property
    def streams(self) -> list[str]:
        return list(self.features)

    def __len__(self) -> int:
        return len(self.ids)

    def indicator_at_depth(self, depth: int) -> tuple[list[str], np.ndarray]:
        """Concept indicator with labels lifted to ``depth`` (1 = parents, 2 = leaves).

        Returns ``(ids, [N, n_ids] bool)``; a sample holds a lifted id when any of its leaves does.
        """
        lifted = [self.hierarchy.ancestor_at(c, depth) for c in self.concept_ids]
        ids = list(dict.fromkeys(lifted))
        column = {label: i for i, label in enumerate(ids)}
        out = np.zeros((len(self), len(ids)), dtype=bool)
        for c, label in enumerate(lifted):
            out[:, column[label]] |= self.concepts[:, c]
        return ids, out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _leaky_relu(x: np.ndarray, leak: float) -> np.ndarray:
    return np.where(x > 0, x, leak * x)


def make_planted(config: PlantedConfig | None = None) -> PlantedData:
    """Generate the planted-concept data set described in the module docstring (seeded, fast)."""
    cfg = config or PlantedConfig()
    cfg.check()
    rng = np.random.default_rng(cfg.seed)
    n, n_leaves = cfg.n_samples, cfg.n_parents * cfg.n_children

    parents = {f"p{i}": None for i in range(cfg.n_parents)}
    leaves = {f"p{i}.c{j}": f"p{i}" for i in range(cfg.n_parents) for j in range(cfg.n_children)}
    hierarchy = Hierarchy.from_parents({**parents, **leaves})
    concept_ids = list(leaves)

    g_parent = rng.standard_normal((cfg.n_parents, cfg.world_dim))
    g_leaf = rng.standard_normal((n_leaves, cfg.world_dim))
    family = np.repeat(np.arange(cfg.n_parents), cfg.n_children)
    world = _unit_rows(
        np.sqrt(cfg.family_share) * _unit_rows(g_parent)[family]
        + np.sqrt(1.0 - cfg.family_share) * _unit_rows(g_leaf)
    )

    n_active = rng.integers(cfg.min_active, cfg.max_active + 1, size=n)
    order = np.argsort(rng.random((n, n_leaves)), axis=1)
    concepts = np.zeros((n, n_leaves), dtype=bool)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n_leaves)[None, :].repeat(n, 0), axis=1)
    concepts[:] = rank < n_active[:, None]
    magnitudes = rng.uniform(cfg.mag_low, cfg.mag_high, size=(n, n_leaves)) * concepts
    z = magnitudes @ world  # [N, world_dim]

    quantiles = (np.arange(cfg.n_magnitudes) + 0.5) / cfg.n_magnitudes
    mags = cfg.mag_low + quantiles * (cfg.mag_high - cfg.mag_low)

    features: dict[str, np.ndarray] = {}
    directions: dict[str, np.ndarray] = {}
    nuisance: dict[str, np.ndarray] = {}
    for s, d in cfg.dims.items():
        h = cfg.hidden_mult * d
        w1 = rng.standard_normal((h, cfg.world_dim)) / np.sqrt(cfg.world_dim)
        w2 = rng.standard_normal((d, h)) / np.sqrt(h)

        def stream_map(v: np.ndarray, w1: np.ndarray = w1, w2: np.ndarray = w2) -> np.ndarray:
            return _leaky_relu(v @ w1.T, cfg.leak) @ w2.T

        alone = stream_map(mags[:, None, None] * world[None])  # [n_mag, C, d]
        mean_alone = alone.mean(axis=0)
        directions[s] = _unit_rows(mean_alone).astype(np.float32)
        scale = float(np.linalg.norm(alone, axis=-1).mean())

        x = stream_map(z)
        nuis_dirs = _unit_rows(rng.standard_normal((cfg.n_nuisance, d))) if cfg.n_nuisance else np.zeros((0, d))
        on = rng.random((n, cfg.n_nuisance)) < cfg.nuisance_prob
        nuis_mag = on * rng.uniform(cfg.mag_low, cfg.mag_high, size=(n, cfg.n_nuisance))
        x = x + cfg.nuisance_scale * scale * (nuis_mag @ nuis_dirs)
        x = x + cfg.noise * scale / np.sqrt(d) * rng.standard_normal((n, d))
        features[s] = x.astype(np.float32)
        nuisance[s] = nuis_dirs.astype(np.float32)

    width = len(str(n - 1))
    ids = [f"planted{i:0{width}d}" for i in range(n)]
    labels = [tuple(concept_ids[c] for c in np.flatnonzero(row)) for row in concepts]
    return PlantedData(
        ids=ids,
        features=features,
        concepts=concepts,
        concept_ids=concept_ids,
        labels=labels,
        hierarchy=hierarchy,
        directions=directions,
        nuisance=nuisance,
        config=cfg,
    )
