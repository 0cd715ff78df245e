"""Saving, loading and batch-encoding a :class:`~sparc.model.sae.MultiStreamSAE`.

On disk a model is a directory with ``model.safetensors`` (the state dict, float32, keys
``b_pre.<s>``, ``W_enc.<s>``, ``b_lat.<s>``, ``W_dec.<s>``; for the "batchnorm" encoder no
``b_pre.<s>`` but ``bn.<s>.weight``, ``bn.<s>.bias`` and the running statistics
``bn.<s>.running_mean``, ``bn.<s>.running_var``; see ``sae.py`` for the layout) and ``config.json``
(:meth:`SAEConfig.to_dict`, which records the encoder kind; a file without ``encoder`` loads as the
"linear" model it was written for). Both files are written to a temporary name and renamed into
place, and identical weights give byte-identical files.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sparc.model.codes import SparseCodes
from sparc.model.files import CONFIG_FILE, WEIGHTS_FILE, read_sae_config, unreadable
from sparc.model.sae import TOPK_MODES, MultiStreamSAE, SAEConfig


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_sae(model: MultiStreamSAE, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out_dir`` (created); return ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in model.state_dict().items()}
    _atomic_write(out_dir / WEIGHTS_FILE, lambda p: save_file(tensors, str(p)))
    text = json.dumps(model.cfg.to_dict(), indent=2) + "\n"
    _atomic_write(out_dir / CONFIG_FILE, lambda p: p.write_text(text))
    return out_dir


def load_sae(path: str | Path, device: str = "cpu") -> MultiStreamSAE:
    """Load a model saved by :func:`save_sae` (``path``: its directory or its ``model.safetensors``),
    in eval mode (a batchnorm encoder's losses then use its running statistics).

    FileNotFoundError for a missing file; :class:`~sparc.model.files.SAEFileError` (a ValueError)
    naming the file and how to restore it for a truncated or corrupt one, or weights that do not
    match ``config.json``."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"SAE checkpoint incomplete: {directory / name} is missing")
    cfg = read_sae_config(directory)
    try:
        model = MultiStreamSAE(SAEConfig.from_dict(cfg))
    except (KeyError, TypeError, ValueError) as err:
        raise unreadable(directory / CONFIG_FILE, f"not an SAE configuration: {err}") from None
    try:
        state = load_file(str(directory / WEIGHTS_FILE))
    except SafetensorError as err:
        raise unreadable(directory / WEIGHTS_FILE, err) from None
    expected = set(model.state_dict())
    if set(state) != expected:
        raise unreadable(directory / WEIGHTS_FILE, f"tensors {sorted(set(state) ^ expected)} do not match config.json")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise unreadable(directory / WEIGHTS_FILE, f"tensor shapes do not match config.json: {err}") from None
    return model.to(device).eval()


def encode_dataset(
    model: MultiStreamSAE,
    features: Mapping[str, np.ndarray],
    ids: Sequence[str],
    mode: str,
    batch_size: int = 1024,
    device: str = "cpu",
    progress: bool = True,
) -> SparseCodes:
    """Sparse codes of every row of ``features`` (stream -> ``[N, d_s]``, memmaps allowed).

    Rows are aligned across streams and with ``ids``. ``mode``: "global" (joint Global TopK over
    the streams given) or "local" (each stream its own top-k). Batches of ``batch_size`` rows are
    read, cast to float32 and encoded on ``device`` (a copy of the model is moved there if it lives
    elsewhere); only ``[batch, L]`` logits ever exist, never ``[N, L]``. Returns ``SparseCodes``
    with ``indices[s]`` int32 ``[N, k]`` and ``values[s]`` float32 ``[N, k]``.
    """
    if mode not in TOPK_MODES:
        raise ValueError(f"encode_dataset: mode must be one of {TOPK_MODES}, got {mode!r}")
    if not features:
        raise ValueError("encode_dataset: features is empty")
    if batch_size <= 0:
        raise ValueError(f"encode_dataset: batch_size must be positive, got {batch_size}")
    n = len(ids)
    for s, arr in features.items():
        if s not in model.cfg.dims:
            raise KeyError(f"encode_dataset: unknown stream {s!r}; the SAE has streams {model.streams}")
        if arr.ndim != 2 or arr.shape != (n, model.cfg.dims[s]):
            raise ValueError(
                f"encode_dataset: stream {s!r} has shape {arr.shape}, expected ({n}, {model.cfg.dims[s]}) "
                "(rows aligned with ids)"
            )
    dev = torch.device(device)
    if next(model.parameters()).device != dev:
        model = copy.deepcopy(model).to(dev)
    streams = [s for s in model.streams if s in features]
    k = model.cfg.k
    indices = {s: np.empty((n, k), dtype=np.int32) for s in streams}
    values = {s: np.empty((n, k), dtype=np.float32) for s in streams}
    starts = range(0, n, batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc="encode", unit="batch", disable=not progress):
            stop = min(n, start + batch_size)
            x = {
                s: torch.from_numpy(np.asarray(features[s][start:stop], dtype=np.float32)).to(dev)
                for s in streams
            }
            for s, code in model.encode(x, mode=mode).items():
                indices[s][start:stop] = code.indices.to("cpu", torch.int32).numpy()
                values[s][start:stop] = code.values.to("cpu", torch.float32).numpy()
    return SparseCodes(ids=list(ids), L=model.cfg.L, indices=indices, values=values)
