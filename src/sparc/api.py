"""Notebook API: load a trained run and use it without the pipeline.

::

    import sparc

    run = sparc.load_run(".")                 # a repository root, or a data/sae directory
    run.streams, run.L, run.k, run.topk       # from data/sae/config.json
    codes = run.encode({"vit": x})            # numpy [N, d] in, SparseCodes out
    xhat = run.decode(codes, "minilm", source="vit")
    run.search("cat face")                    # latents named after a concept (labels or captions)
    run.top_samples(28, "vit")                # the samples a latent fires on most

What each method reads (paths relative to the repository root, as in ``dvc.yaml``;
``<dataset>`` is ``data.dataset`` of ``params.yaml``):

- ``model``, ``encode``, ``decode``: ``data/sae/{model.safetensors,config.json}`` (stage ``train``);
- ``samples``: ``data/prepared/<dataset>/`` (``prepare``);
- ``features``: ``data/features/<dataset>/<stream>/`` (``extract@<stream>``);
- ``codes``, ``top_samples``: ``data/codes/{meta.json,joint,per_stream}`` (``encode``);
- ``concepts``, ``concepts_per_stream``, ``search``: ``reports/concepts/{concepts.csv,
  concepts_per_stream.csv,summary.json}`` (``concepts``).

A missing file raises :class:`RunFileError` (a ``FileNotFoundError``) with one line naming the
file and the ``dvc repro`` / ``dvc pull`` that makes it. A run loaded from a ``data/sae``
directory alone has only the model operations; the others raise that error too. Outputs that do
not belong to the trained model (codes encoded by another ``model.safetensors``, concepts computed
from other codes, features or codes of another prepared dataset) raise :class:`RunMismatchError`
naming the stage to re-run, so a notebook never mixes a new model with old concept names.

Inputs are L2-normalised per row inside the model (``x <- x / ||x||``); reconstructions from
:meth:`Run.decode` approximate those unit-norm rows, not the raw features.

Importing this module does not import torch; the model is loaded on first use (``run.model``,
``encode``, ``decode``), so concept browsing works without it.

Longer than 500 lines because it is one class, :class:`Run`, whose methods are the notebook API
over the same cached files and checks; split, one object's surface would be spread over modules.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from sparc import paths
from sparc.features.store import first_nonfinite_row
from sparc.model.codes import SparseCodes
from sparc.model.files import read_sae_config

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from sparc.data.prepared import PreparedData
    from sparc.model.sae import MultiStreamSAE
    from sparc.params import Params

__all__ = ["MODES", "SPLITS", "Run", "RunFileError", "RunMismatchError", "load_run"]

Mode = Literal["joint", "per_stream"]
Split = Literal["train", "val", "test", "all"]
MODES: tuple[str, ...] = ("joint", "per_stream")
SPLITS: tuple[str, ...] = ("train", "val", "test", "all")

PARAMS_FILE = "params.yaml"
SAE_FILES = ("model.safetensors", "config.json")
# Match qualities of :meth:`Run.search`, best first (the ``match`` column).
MATCHES = ("exact", "phrase", "words", "partial")


class RunFileError(FileNotFoundError):
    """A file the method needs is missing; the message names it and the stage that makes it."""


class RunMismatchError(ValueError):
    """Outputs that do not belong together (e.g. codes of another model); the message says which
    stage to re-run."""


def _fix(stage: str) -> str:
    return f"run `dvc repro {stage}` (or `dvc pull {stage}` if a DVC remote has it)"


def _tokens(text: str) -> list[str]:
    """Lower-case word tokens; anything but letters and digits separates (space, '-', '_', '&'...)."""
    return re.findall(r"[^\W_]+", str(text).lower())


def _match_quality(query: list[str], name: str) -> int:
    """How well ``name`` matches the query tokens: 4 exact (same tokens), 3 phrase (the query's
    tokens appear consecutively), 2 words (each query token is a token of the name), 1 partial
    (each query token is inside the name), 0 no match. ``MATCHES[4 - quality]`` is its label."""
    words = _tokens(name)
    if not query or not words:
        return 0
    if words == query:
        return 4
    n = len(query)
    if any(words[i : i + n] == query for i in range(len(words) - n + 1)):
        return 3
    if all(q in words for q in query):
        return 2
    joined = " ".join(words)
    return 1 if all(q in joined for q in query) else 0


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def _as_rows(x: Any, what: str) -> np.ndarray:
    """A ``[N, d]`` (or ``[d]`` -> ``[1, d]``) numpy view of an array or tensor (memmaps stay lazy)."""
    if _is_tensor(x):
        import torch

        x = x.detach().to("cpu")
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    elif not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{what}: expected numbers (a float or integer array), got an array of {x.dtype}")
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what}: expected an [N, d] array, got shape {x.shape}")
    return x


def load_run(path: str | Path = ".", device: str = "cpu") -> Run:
    """Load a trained run.

    ``path``: a repository root (a directory with ``params.yaml``; the run's files are found
    there as the pipeline writes them) or a ``data/sae`` directory (or its ``model.safetensors``)
    on its own, which gives the model operations only. ``device``: where the model runs
    (``cpu``, ``auto`` = CUDA when present, ``cuda``, ``cuda:N``, ``mps``).

    Raises :class:`RunFileError` when ``path`` is neither, or the repository has no trained SAE.
    """
    p = Path(path).expanduser().resolve()
    if p.is_file() and p.name == SAE_FILES[0]:
        p = p.parent
    if not p.exists():
        raise RunFileError(f"{p}: no such directory (pass a repository root or its data/sae directory)")
    if (p / PARAMS_FILE).is_file():
        from sparc.params import load_params

        params = load_params(p / PARAMS_FILE)
        return Run(p / paths.sae_dir(), root=p, params=params, device=device)
    if any((p / name).is_file() for name in SAE_FILES):
        return Run(p, device=device)
    raise RunFileError(
        f"{p}: neither a repository root ({PARAMS_FILE} is missing) nor an SAE directory "
        f"({SAE_FILES[0]} is missing); pass the repository root or its {paths.sae_dir()} directory"
    )


class Run:
    """A trained run: the SAE in ``sae_dir`` and, for a repository, the pipeline's outputs.

    Build it with :func:`load_run`. Attributes: ``root`` (the repository root, None for a bare
    ``data/sae``), ``sae_dir``, ``params`` (the parsed ``params.yaml``, None without a
    repository), ``device``. ``streams``, ``L``, ``k``, ``topk``, ``dims`` come from the model's
    ``config.json`` (the trained model is the truth when ``params.yaml`` was edited since).
    """

    def __init__(self, sae_dir: str | Path, *, root: Path | None = None, params: Params | None = None,
                 device: str = "cpu") -> None:
        self.sae_dir = Path(sae_dir)
        self.root = root
        self.params = params
        self.device = device
        self._codes: dict[tuple[str, str], SparseCodes] = {}
        self._concepts: dict[str, pd.DataFrame] = {}
        for name in SAE_FILES:
            if not (self.sae_dir / name).is_file():
                where = self.sae_dir / name
                fix = f"; {_fix('train')}" if root is not None else ""
                raise RunFileError(f"trained SAE not found: {where} is missing{fix}")
        self.config: dict = read_sae_config(self.sae_dir)
        if params is not None:
            self._warn_params(params)

    # ------------------------------------------------------------------ the model

    def __repr__(self) -> str:
        where = f"root={str(self.root)!r}" if self.root is not None else f"sae_dir={str(self.sae_dir)!r}"
        return (f"Run({where}, streams={self.streams}, L={self.L}, k={self.k}, topk={self.topk!r}, "
                f"device={self.device!r})")

    @property
    def streams(self) -> list[str]:
        """Stream names in the model's (= params.yaml's) order."""
        return list(self.config["dims"])

    @property
    def dims(self) -> dict[str, int]:
        """Stream -> input dimension ``d_s``."""
        return {s: int(d) for s, d in self.config["dims"].items()}

    @property
    def L(self) -> int:
        """Latents per stream (one shared index space)."""
        return int(self.config["L"])

    @property
    def k(self) -> int:
        """Latents kept per sample (per stream) by the TopK rule."""
        return int(self.config["k"])

    @property
    def topk(self) -> str:
        """The model's own TopK rule: ``global`` (SPARC: one index set from ``sum_s h^s``) or
        ``local`` (each stream its own top-k; USAE)."""
        return str(self.config.get("topk", "global"))

    @cached_property
    def model(self) -> MultiStreamSAE:
        """The :class:`~sparc.model.sae.MultiStreamSAE` (eval mode, on ``device``), loaded on first use."""
        from sparc.device import resolve_device
        from sparc.model.io import load_sae

        try:
            device = str(resolve_device(self.device, "load_run(device=...)"))
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"load_run(device={self.device!r}): {err}") from None
        return load_sae(self.sae_dir, device=device)

    @cached_property
    def model_sha256(self) -> str:
        """SHA-256 of ``model.safetensors`` (what ``data/codes/meta.json`` records)."""
        from sparc.data.prepared import file_sha256

        return file_sha256(self.sae_dir / SAE_FILES[0])

    def _warn_params(self, params: Params) -> None:
        have = {"streams": self.streams, "L": self.L, "k": self.k, "topk": self.topk}
        want = {"streams": params.stream_names, "L": params.L, "k": params.k, "topk": params.topk}
        diff = [f"{key}={want[key]} (the SAE has {have[key]})" for key in have if have[key] != want[key]]
        if diff:
            warnings.warn(
                f"{PARAMS_FILE} has {', '.join(diff)}: the trained SAE in {self.sae_dir} is used as it is; "
                f"{_fix('train')} to train one for the current parameters",
                stacklevel=4,
            )

    def _check_stream(self, stream: str) -> None:
        if stream not in self.config["dims"]:
            raise KeyError(f"unknown stream {stream!r}; this run has streams {self.streams}")

    # ------------------------------------------------------------------ encode / decode

    def encode(
        self,
        features: Mapping[str, Any],
        mode: Mode = "joint",
        *,
        ids: list[str] | None = None,
        batch_size: int = 1024,
        progress: bool = False,
    ) -> SparseCodes:
        """Sparse codes of feature rows.

        ``features``: stream -> ``[N, d_s]`` (numpy array, memmap, or torch tensor; a ``[d_s]``
        row counts as ``N = 1``), any non-empty subset of :attr:`streams`, rows aligned across
        streams. Each row is L2-normalised, then ``h^s = W_enc^s (x^s - b_pre^s) + b_lat^s``
        (``[N, L]``, see :mod:`sparc.model.sae`) and ``k`` latents are kept:

        - ``mode="joint"``: the model's own rule (:attr:`topk`). Global TopK: one index set per
          sample, the top-k of ``sum_s h^s`` over the streams *given*, so ``indices[s]`` is the
          same for every stream; local: as ``per_stream``.
        - ``mode="per_stream"``: each stream its own top-k of ``h^s``, as a user with one modality
          would (the retrieval / leak-free setting).

        With one stream given both modes are its own top-k. Values are ``ReLU(h^s)`` at the
        indices (a globally chosen index may hold 0). Rows are encoded ``batch_size`` at a time on
        ``device`` (only ``[batch_size, L]`` logits exist at once).

        Returns :class:`~sparc.model.codes.SparseCodes` (``indices[s]`` int32 ``[N, k]``,
        ``values[s]`` float32 ``[N, k]``, ``ids`` = ``ids`` or ``"0".."N-1"``), for numpy and torch
        input alike (no graph; call ``run.model.encode`` for gradients). ValueError naming the
        stream for a shape, dtype or row count that does not fit, and naming the stream, row and id
        for a row holding NaN or inf (the pipeline refuses such features too).
        """
        if mode not in MODES:
            raise ValueError(f"encode: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(features, Mapping) or not features:
            raise ValueError("encode: expected a non-empty dict stream -> [N, d_s] features")
        unknown = [s for s in features if s not in self.config["dims"]]
        if unknown:
            raise KeyError(f"encode: unknown streams {unknown}; this run has streams {self.streams}")
        arrays: dict[str, np.ndarray] = {}
        for s in self.streams:
            if s in features:
                a = _as_rows(features[s], f"encode: stream {s!r}")
                if a.shape[1] != self.dims[s]:
                    raise ValueError(f"encode: stream {s!r} has {a.shape[1]} dims, the SAE expects {self.dims[s]}")
                arrays[s] = a
        n = {s: a.shape[0] for s, a in arrays.items()}
        if len(set(n.values())) > 1:
            raise ValueError(f"encode: streams have different numbers of rows {n}; rows must be aligned")
        rows = next(iter(n.values()))
        if ids is None:
            ids = [str(i) for i in range(rows)]
        elif len(ids) != rows:
            raise ValueError(f"encode: {len(ids)} ids for {rows} rows")
        for s, a in arrays.items():
            if (row := first_nonfinite_row(a)) is not None:
                raise ValueError(f"encode: stream {s!r} row {row} (id {ids[row]!r}) holds NaN or inf; "
                                 "the SAE needs finite features (drop or fix that row)")
        from sparc.model.io import encode_dataset

        model = self.model
        rule = self.topk if mode == "joint" else "local"
        device = str(next(model.parameters()).device)
        return encode_dataset(model, arrays, list(ids), mode=rule, batch_size=batch_size, device=device,
                              progress=progress)

    def decode(
        self,
        codes: SparseCodes | Mapping[str, Any] | tuple[Any, Any],
        stream: str,
        *,
        source: str | None = None,
        batch_size: int = 1024,
    ) -> np.ndarray | torch.Tensor:
        """Reconstruct stream ``stream`` from sparse codes: ``x^(source->stream) = W_dec^stream z^source
        + b_pre^stream`` (:meth:`MultiStreamSAE.decode`), ``[N, d_stream]`` float32.

        ``codes``: what :meth:`encode` or :meth:`codes` returns (``SparseCodes``), a dict stream ->
        ``Code`` (what ``run.model.encode`` returns), or one ``(indices [N, k], values [N, k])`` pair.
        ``source``: whose code to decode when ``codes`` holds several streams (default
        ``stream`` itself, i.e. self-reconstruction, or the only stream there is); a source other
        than ``stream`` gives the cross reconstruction. The result approximates the L2-normalised
        input ``x^stream / ||x^stream||``. numpy in -> numpy out; tensors in -> a tensor on their
        device (no graph).
        """
        self._check_stream(stream)
        if isinstance(codes, SparseCodes):
            pair: tuple[Any, Any] = self._pick_source(codes.indices, codes.values, stream, source)
        elif isinstance(codes, Mapping):
            chosen = self._pick_source({s: c for s, c in codes.items()}, None, stream, source)
            pair = (chosen[0], chosen[1])
        elif isinstance(codes, (tuple, list)) and len(codes) == 2:
            pair = (codes[0], codes[1])
        else:
            raise TypeError("decode: codes must be SparseCodes, a dict stream -> (indices, values), or one "
                            f"(indices, values) pair, got {type(codes).__name__}")
        tensor_device = pair[0].device if _is_tensor(pair[0]) else None
        indices = _as_rows(pair[0], "decode: indices")
        values = _as_rows(pair[1], "decode: values")
        if indices.shape != values.shape:
            raise ValueError(f"decode: indices {indices.shape} and values {values.shape} must both be [N, k]")
        if indices.size and (indices.min() < 0 or indices.max() >= self.L):
            raise ValueError(f"decode: latent ids must lie in [0, {self.L})")
        import torch

        from sparc.model.sae import Code

        model = self.model
        dev = next(model.parameters()).device
        out = np.empty((indices.shape[0], self.dims[stream]), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, indices.shape[0], batch_size):
                stop = start + batch_size
                code = Code(torch.from_numpy(np.asarray(indices[start:stop], dtype=np.int64)).to(dev),
                            torch.from_numpy(np.asarray(values[start:stop], dtype=np.float32)).to(dev))
                out[start:stop] = model.decode(code, stream).to("cpu", torch.float32).numpy()
        return out if tensor_device is None else torch.from_numpy(out).to(tensor_device)

    def _pick_source(self, indices: Mapping[str, Any], values: Mapping[str, Any] | None, stream: str,
                     source: str | None) -> tuple[Any, Any]:
        """(indices, values) of the source stream's code (``values`` None: ``indices`` maps to pairs)."""
        have = list(indices)
        if source is None:
            if stream in indices:
                source = stream
            elif len(have) == 1:
                source = have[0]
            else:
                raise ValueError(f"decode: codes hold streams {have} but not {stream!r}; pass source=...")
        elif source not in indices:
            raise KeyError(f"decode: source {source!r} is not in the codes (streams {have})")
        if values is None:
            return tuple(indices[source])  # type: ignore[return-value]
        return indices[source], values[source]

    # ------------------------------------------------------------------ repository files

    def _path(self, rel: Path | str, stage: str, what: str) -> Path:
        """``root / rel``, or RunFileError naming the file and the stage that makes it."""
        if self.root is None:
            raise RunFileError(
                f"{what} needs the repository's {Path(rel).as_posix()}, but this run was loaded from "
                f"{self.sae_dir} alone; load the repository root (sparc.load_run('<root>')) and "
                f"{_fix(stage)} there if it is missing"
            )
        path = self.root / rel
        if not path.exists():
            raise RunFileError(f"{what}: {path} is missing; {_fix(stage)}")
        return path

    @property
    def dataset(self) -> str | None:
        """``data.dataset`` of params.yaml (None for a run loaded from a bare ``data/sae``)."""
        return None if self.params is None else self.params.data.dataset

    def _dataset(self) -> str:
        return self.dataset or "<dataset>"  # bare run: only used in the error naming the file

    @cached_property
    def prepared(self) -> PreparedData:
        """The prepared dataset (:class:`sparc.data.prepared.PreparedData`, rows in pipeline order)."""
        from sparc.data.prepared import load_prepared

        rel = paths.prepared_dir(self._dataset())
        for name in ("samples.csv", "hierarchy.json", "meta.json"):
            self._path(rel / name, "prepare", "prepared data")
        return load_prepared(self.root / rel)  # type: ignore[operator]

    def _rows(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
        return np.arange(len(self.prepared)) if split == "all" else self.prepared.indices(split)

    def samples(self, split: Split = "test") -> pd.DataFrame:
        """The prepared samples of ``split`` (train | val | test | all), in pipeline row order:
        columns ``row`` (row in the prepared data), ``id``, ``caption``, ``image`` (absolute
        path), ``labels`` (tuple of label ids), ``label_names``, ``split``. Row ``i`` matches row
        ``i`` of :meth:`features` and :meth:`codes` for the same split."""
        import pandas as pd

        rows = self._rows(split)
        p = self.prepared
        names = p.hierarchy.names
        return pd.DataFrame({
            "row": rows.astype(np.int64),
            "id": [p.ids[i] for i in rows],
            "caption": [p.captions[i] for i in rows],
            "image": [str(p.images[i]) for i in rows],
            "labels": [p.labels[i] for i in rows],
            "label_names": [tuple(names.get(lab, lab) for lab in p.labels[i]) for i in rows],
            "split": [str(p.splits[i]) for i in rows],
        })

    def features(self, stream: str, split: Split = "test", dtype: Any = np.float32) -> np.ndarray:
        """The extracted features of ``stream`` for ``split``: ``[n_split, d_s]`` (a copy in
        ``dtype``; the store holds float16), rows as in :meth:`samples`. Raw, not normalised."""
        from sparc.features.store import open_stream

        self._check_stream(stream)
        rel = paths.features_dir(self._dataset(), stream)
        stage = f"extract@{stream}"
        what = f"features of stream {stream}"
        directory = self._path(rel, stage, what)
        for name in ("features.npy", "ids.txt", "meta.json"):
            self._path(rel / name, stage, what)
        fs = open_stream(directory, stream)  # FeatureStoreError for a damaged directory
        if fs.ids != self.prepared.ids:
            raise RunMismatchError(
                f"{directory}: feature rows do not match the prepared dataset's ids; run `dvc repro {stage}`"
            )
        if fs.dim != self.dims[stream]:
            raise RunMismatchError(f"{directory}: features have dim {fs.dim}, the SAE expects {self.dims[stream]}")
        rows = self._rows(split)
        return np.asarray(fs.features[rows], dtype=dtype)

    @cached_property
    def codes_meta(self) -> dict:
        """``data/codes/meta.json``, checked against the model and the prepared data."""
        from sparc.evaluate.run_files import CODES_META

        path = self._path(paths.codes_dir() / CODES_META, "encode", "sparse codes")
        meta = json.loads(path.read_text())
        if meta.get("model_sha256") != self.model_sha256:
            raise RunMismatchError(
                f"{path.parent}: codes were encoded by another model than {self.sae_dir / SAE_FILES[0]}; "
                "run `dvc repro encode`"
            )
        if meta.get("dataset_fingerprint") != self.prepared.fingerprint:
            raise RunMismatchError(
                f"{path.parent}: codes belong to another prepared dataset than {self.prepared.root}; "
                "run `dvc repro encode`"
            )
        return meta

    def codes(self, kind: Mode = "joint", split: Split = "all") -> SparseCodes:
        """The pipeline's sparse codes (``data/codes/<kind>``; ``kind`` joint | per_stream as in
        :meth:`encode`) of ``split``, rows as in :meth:`samples`."""
        if kind not in MODES:
            raise ValueError(f"codes: kind must be one of {MODES}, got {kind!r}")
        if (kind, split) not in self._codes:  # only the split's rows are read
            meta = self.codes_meta
            for name in ("codes.npz", "codes.json"):
                directory = self._path(paths.codes_dir() / kind / name, "encode", "sparse codes").parent
            rows = None if split == "all" else self._rows(split)
            stored = SparseCodes.read_meta(directory)
            if stored["ids"] != self.prepared.ids or stored["streams"] != self.streams or stored["L"] != self.L:
                raise RunMismatchError(
                    f"{directory}: codes do not match the prepared ids, the SAE's streams or L "
                    f"(meta says model {str(meta.get('model_sha256'))[:12]}...); run `dvc repro encode`"
                )
            self._codes[(kind, split)] = SparseCodes.load(directory, rows=rows, meta=stored)
        return self._codes[(kind, split)]

    def top_samples(self, latent: int, stream: str, n: int = 10, split: Split = "test",
                    kind: Mode = "joint") -> pd.DataFrame:
        """The ``n`` samples of ``split`` on which ``latent`` fires most in ``stream``.

        Activation = ``z^stream_latent`` from the pipeline's ``kind`` codes (default joint, the
        codes the concept names come from; only samples with an activation > 0). Sorted by
        decreasing activation, ties by row, as the concepts stage ranks them. Columns: ``row``,
        ``id``, ``caption``, ``image``, ``activation``, ``labels``, ``label_names``, ``split``.
        """
        self._check_stream(stream)
        if isinstance(latent, bool) or not float(latent).is_integer():
            raise ValueError(f"top_samples: latent must be an integer latent id, got {latent!r}")
        latent = int(latent)
        if not 0 <= latent < self.L:
            raise ValueError(f"top_samples: latent must lie in [0, {self.L}), got {latent}")
        if n < 1:
            raise ValueError(f"top_samples: n must be positive, got {n}")
        codes = self.codes(kind, split)
        hit = codes.indices[stream] == latent
        act = np.where(hit, codes.values[stream], 0.0).sum(axis=1)
        pos = np.flatnonzero(act > 0)
        pos = pos[np.lexsort((pos, -act[pos]))][:n]
        table = self.samples(split).iloc[pos].reset_index(drop=True)
        table.insert(4, "activation", act[pos].astype(np.float32))
        return table

    # ------------------------------------------------------------------ concepts

    def _concept_table(self, kind: str) -> pd.DataFrame:
        if kind not in MODES:
            raise ValueError(f"concepts: kind must be one of {MODES}, got {kind!r}")
        if kind not in self._concepts:
            import pandas as pd

            from sparc.evaluate.run_files import CONCEPTS_CSV, CONCEPTS_SUMMARY

            rel = paths.concepts_dir()
            csv_path = self._path(rel / CONCEPTS_CSV[kind], "concepts", "concepts")
            summary_path = self._path(rel / CONCEPTS_SUMMARY, "concepts", "concepts")
            used = json.loads(summary_path.read_text()).get("codes", {})
            if used.get("model_sha256") != self.model_sha256:
                raise RunMismatchError(
                    f"{csv_path.parent}: concepts were computed from codes of another model than "
                    f"{self.sae_dir / SAE_FILES[0]}; run `dvc repro encode concepts`"
                )
            text = [f"{s}_{c}" for s in self.streams
                    for c in ("label", "name", "text_name", "text_words", "zero_shot_name")] + ["agreed_name"]
            table = pd.read_csv(csv_path, keep_default_na=False, dtype=dict.fromkeys(text, str))
            if table["latent"].tolist() != list(range(self.L)):
                raise RunMismatchError(f"{csv_path}: expected one row per latent 0..{self.L - 1}; "
                                       "run `dvc repro concepts`")
            for col in [f"{s}_text_score" for s in self.streams if f"{s}_text_score" in table]:
                table[col] = pd.to_numeric(table[col], errors="coerce")  # '' (no terms) -> NaN
            self._concepts[kind] = table
        return self._concepts[kind].copy()

    @property
    def concepts(self) -> pd.DataFrame:
        """``reports/concepts/concepts.csv`` (joint codes): one row per latent (row ``l`` = latent
        ``l``) with ``latent``, per stream ``<s>_n_active``, ``<s>_label``, ``<s>_name`` ('' when
        the purity is below the threshold), ``<s>_purity``, and ``agreed_name`` ('' unless every
        stream names the latent with the same label); then the names from captions, per stream
        ``<s>_text_name`` ('' below ``concepts.text_min_score``), ``<s>_text_score`` (NaN for a
        latent whose top captions hold no term),
        ``<s>_text_words`` ('|'-joined), and per caption stream ``<s>_zero_shot_name``,
        ``<s>_zero_shot_score`` when ``concepts.zero_shot_vocab`` > 0. See
        :mod:`sparc.evaluate.concepts` and :mod:`sparc.evaluate.text_names`."""
        return self._concept_table("joint")

    @property
    def concepts_per_stream(self) -> pd.DataFrame:
        """``reports/concepts/concepts_per_stream.csv``: :attr:`concepts` from the per-stream codes."""
        return self._concept_table("per_stream")

    def search(self, query: str, kind: Mode = "joint") -> pd.DataFrame:
        """Latents whose concept names match ``query``, best matches first.

        Matching is case-insensitive on word tokens (space, ``-``, ``_`` and other punctuation
        separate them, so "cat face", "Cat-Face" and "cat_face" are the same query), against
        every stream's label-derived ``<s>_name`` and ``agreed_name``, and its names from captions
        (``<s>_text_name``, ``<s>_zero_shot_name``; :mod:`sparc.evaluate.text_names`), of the
        ``kind`` concepts. A name matches ``exact`` (same tokens), ``phrase`` (the query's tokens
        consecutively, e.g. "cat face" in "cat-face-smiling"), ``words`` (each query token, in
        any order) or ``partial`` (each query token inside the name, e.g. "fla" in "flag").

        Columns: ``latent``, ``match`` (a latent's best match over all its names), ``agreed_name``,
        ``n_streams`` (streams whose label-derived name matches), ``mean_purity`` (over those
        streams, 0 when none), ``n_text_streams`` (streams whose text or zero-shot name matches),
        then per stream ``<s>_name``, ``<s>_purity``, ``<s>_text_name``. Order: match quality, an
        agreed-name match first, more label-name streams, higher mean purity, more text-name
        streams, lower latent. No match: an empty table.
        """
        import pandas as pd

        q = _tokens(query)
        if not q:
            raise ValueError(f"search: the query {query!r} has no letters or digits")
        table = self._concept_table(kind)
        columns = ["latent", "match", "agreed_name", "n_streams", "mean_purity", "n_text_streams"]
        for s in self.streams:
            columns += [f"{s}_name", f"{s}_purity", f"{s}_text_name"]
        rows, keys = [], []
        for rec in table.to_dict("records"):
            per_stream = {s: _match_quality(q, rec[f"{s}_name"]) for s in self.streams}
            per_text = {s: max(_match_quality(q, rec.get(f"{s}_text_name", "")),
                               _match_quality(q, rec.get(f"{s}_zero_shot_name", ""))) for s in self.streams}
            agreed = _match_quality(q, rec["agreed_name"])
            best = max([agreed, *per_stream.values(), *per_text.values()])
            if best == 0:
                continue
            matched = [s for s, m in per_stream.items() if m > 0]
            purity = float(np.mean([rec[f"{s}_purity"] for s in matched])) if matched else 0.0
            n_text = sum(m > 0 for m in per_text.values())
            row = {"latent": int(rec["latent"]), "match": MATCHES[4 - best], "agreed_name": rec["agreed_name"],
                   "n_streams": len(matched), "mean_purity": purity, "n_text_streams": n_text}
            for s in self.streams:
                row[f"{s}_name"] = rec[f"{s}_name"]
                row[f"{s}_purity"] = float(rec[f"{s}_purity"])
                row[f"{s}_text_name"] = rec.get(f"{s}_text_name", "")
            rows.append(row)
            keys.append((-best, -(agreed > 0), -len(matched), -purity, -n_text, row["latent"]))
        order = sorted(range(len(rows)), key=keys.__getitem__)
        return pd.DataFrame([rows[i] for i in order], columns=columns)
