"""Checks of ``params.yaml`` against this machine, run by ``python -m sparc check``.

:func:`sparc.params.validate` checks values without touching files or devices (every stage runs
it when it loads the parameters). :func:`preflight` adds what the stages check when they start:
that the requested devices exist, that a bring-your-own CSV and hierarchy exist and are not empty,
that a checksum list (``download.checksums``) parses,
and that the SAE fits in memory for training (the estimate of :mod:`sparc.train.memory`, with the
stream dimensions of the extracted features, or 1 per stream before extraction, a lower bound).
Each failure is one ParamsError line naming the parameter.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparc import paths
from sparc.params import Params, ParamsError


def check_devices(params: Params) -> dict[str, str]:
    """Resolve ``extract.device``, ``train.device``, ``evaluate.device`` and ``localise.device``;
    ParamsError when one names CUDA on a machine without it. Returns parameter -> resolved device."""
    from sparc.device import resolve_device

    out = {}
    for param, device in (
        ("extract.device", params.extract.device),
        ("train.device", params.train.device),
        ("evaluate.device", params.evaluate.device),
        ("localise.device", params.localise.device),
    ):
        try:
            out[param] = str(resolve_device(device, param))
        except ValueError as err:
            raise ParamsError(f"{err} (set {param}: auto or cpu)") from None
    return out


def check_folder_files(params: Params) -> None:
    """For ``data.dataset: folder``: the CSV must be a non-empty file, the hierarchy (if set) a file."""
    if params.data.dataset != "folder":
        return
    csv_path = Path(params.data.folder.csv).expanduser()
    if not csv_path.is_file():
        raise ParamsError(f"data.folder.csv: {csv_path} not found (give the path of your CSV, see docs/datasets.md)")
    if csv_path.stat().st_size == 0:
        raise ParamsError(f"data.folder.csv: {csv_path} is empty (expected a header row id,image,caption,labels)")
    hierarchy = params.data.folder.hierarchy
    if hierarchy and not Path(hierarchy).expanduser().is_file():
        raise ParamsError(f"data.folder.hierarchy: {hierarchy} not found (or set it to '' for a flat hierarchy)")


def check_checksums_file(params: Params) -> None:
    """``download.checksums``, when set: a readable md5sum/sha256sum file (sparc.data.download)."""
    from sparc.data.download import read_checksums

    if params.download.checksums:
        try:
            read_checksums(params.download.checksums)
        except ValueError as err:
            raise ParamsError(str(err)) from None


def stream_dims(params: Params) -> tuple[dict[str, int], bool]:
    """Input dimension of every stream from its extracted features' meta.json; ``(dims, known)``,
    with 1 for streams not extracted yet (``known`` is then False)."""
    dims, known = {}, True
    for name in params.stream_names:
        meta = paths.features_dir(params.data.dataset, name) / "meta.json"
        try:
            dims[name] = int(json.loads(meta.read_text())["dim"])
        except (OSError, ValueError, KeyError, TypeError):
            dims[name], known = 1, False
    return dims, known


def check_memory(params: Params, device: str) -> str:
    """Estimate training memory on ``device``; ParamsError (naming ``L``) when it cannot fit."""
    from sparc.train.memory import check_train_memory

    dims, known = stream_dims(params)
    t = params.train
    need = check_train_memory(dims, params.L, params.k, t.k_aux, t.batch_size, device, bf16=t.precision != "float32")
    bound = "" if known else " (a lower bound: the features are not extracted yet)"
    return f"training memory: about {need / 2**30:.2f} GiB on {device}{bound}"


def preflight(params: Params) -> list[str]:
    """Every machine-dependent check of the stages (module docstring); returns report lines."""
    devices = check_devices(params)
    check_folder_files(params)
    check_checksums_file(params)
    lines = [f"devices: {', '.join(f'{k}={v}' for k, v in devices.items())}"]
    lines.append(check_memory(params, devices["train.device"]))
    return lines
