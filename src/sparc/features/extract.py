"""The `extract` stage: run one stream's model over the prepared dataset into the feature store.

Samples are read, decoded, preprocessed and collated (images resized and normalised, captions
tokenised) by ``num_workers`` DataLoader worker processes while the model runs on the previous
batch, in row order, so the output rows match ``samples.csv``. On CUDA, batches are pinned and
copied asynchronously.

CPU threads: each worker runs single-threaded (the DataLoader default) and, on the CPU, the model
gets ``extract.cpu_threads`` intra-op threads; the default (0) is
``max(1, cores - max(1, num_workers))`` (:func:`model_threads`): one core per
worker, and at least one core left for everything else (the main process's own loading when
``num_workers`` is 0, the feature store, other jobs), so the model's threads are not preempted.
Preemption is expensive: an intra-op thread that loses its core stalls every parallel op at its
barrier. On the 2-core build machine shared with other jobs, MiniLM ran 3.5x (up to 15x with the
loading in the main process) and EfficientNet-Lite0 1.5-2x faster with 1 thread than with 2; with
2 threads the best runs were faster, but run times varied up to 3x. On the same machine when quiet,
2 threads made ViT-S/14 1.46x and EfficientNet-Lite0 1.14x faster (benchmarks/extract_throughput.py
``--threads 2``): set ``extract.cpu_threads: 2`` there if nothing else runs.

Determinism: the model runs with ``torch.use_deterministic_algorithms`` and fixed batches, so the
same inputs and settings give the same bytes on the same machine and device.

Several processes (``extract.nproc > 1``, relaunched under torchrun by the command line): each
embeds a shard of whole batches and rank 0 merges them (:mod:`sparc.features.distributed`); the
default thread count shares the machine's cores among its processes (:func:`model_threads`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sparc.catalog import FAMILIES, check_spec
from sparc.data.prepared import PreparedData
from sparc.device import rank_device, resolve_device
from sparc.distributed import World
from sparc.features.base import Extractor
from sparc.features.distributed import extract_sharded
from sparc.features.random_weights import meta_fields
from sparc.features.registry import build_extractor
from sparc.features.store import StreamWriter


class _Items(Dataset):
    """Row i of the prepared data, loaded by the extractor (runs in worker processes)."""

    def __init__(self, data: PreparedData, extractor: Extractor) -> None:
        self.images = data.images
        self.captions = data.captions
        self.extractor = extractor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        return self.extractor.load(self.images[i], self.captions[i])


def make_loader(
    data: PreparedData, extractor: Extractor, batch_size: int, num_workers: int, counted: bool = False
) -> DataLoader:
    """Ordered batches of collated inputs, with ``num_workers`` processes preparing the next ones.

    ``num_workers = 0`` loads in the calling process. Each worker keeps up to 4 batches ready.
    ``counted``: each batch comes as ``(batch, counts)`` (:meth:`Extractor.collate_counted`).
    """
    if batch_size <= 0:
        raise ValueError(f"extract.batch_size: must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"extract.num_workers: must be >= 0, got {num_workers}")
    return DataLoader(
        _Items(data, extractor),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=extractor.collate_counted if counted else extractor.collate,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=extractor.device.type == "cuda",
    )


@contextmanager
def deterministic() -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True, warn_only=True)`` for the block, then restored."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def model_threads(num_workers: int, requested: int = 0, processes: int = 1) -> int:
    """Intra-op threads for the model on the CPU: ``requested`` when positive (``extract.cpu_threads``),
    else ``max(1, usable_cores() // processes - max(1, num_workers))`` (``processes``: extraction
    processes sharing this machine, ``extract.nproc``)."""
    if requested > 0:
        return requested
    return max(1, usable_cores() // processes - max(1, num_workers))


@contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` for the block, then the previous count is restored."""
    if threads <= 0:
        raise ValueError(f"threads: must be positive, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def stream_meta(data: PreparedData, extractor: Extractor, stream: str) -> dict:
    """The metadata stored with a stream: model spec, input, preprocessing, dataset provenance;
    for a model with random weights also :func:`sparc.features.random_weights.meta_fields`."""
    meta = {
        "stream": stream,
        "model": str(extractor.spec),
        "input": extractor.input,
        "preprocessing": extractor.preprocessing(),
        "device": extractor.device.type,
        "dataset": data.meta.get("dataset"),
        "dataset_fingerprint": data.fingerprint,
    }
    if extractor.random_origin:
        meta.update(meta_fields(extractor.random_origin))
    return meta


def extract_stream(
    data: PreparedData,
    extractor: Extractor,
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 1,
    stream: str = "",
    progress: bool = True,
    threads: int | None = None,
) -> Path:
    """Embed every sample of ``data`` with ``extractor`` and write the stream to ``out_dir``.

    Row i of ``out_dir/features.npy`` (``[N, extractor.dim]`` float16) is sample ``data.ids[i]``.
    The directory appears only when every row is written (see :class:`StreamWriter`). On the CPU
    the model runs with ``threads`` intra-op threads (default :func:`model_threads`). The counts
    of :meth:`Extractor.collate_counted`, summed over the batches, are ``meta.json``'s ``counts``
    (text models: ``{"truncated_captions": n}``; absent when the extractor counts nothing).
    """
    if len(data) == 0:
        raise ValueError("extract: the prepared dataset has no samples")
    meta = stream_meta(data, extractor, stream or Path(out_dir).name)
    loader = make_loader(data, extractor, batch_size, num_workers, counted=True)
    counts: dict[str, int] = {}
    bar = tqdm(total=len(data), desc=f"extract {meta['stream']}", unit="sample", disable=not progress)
    on_cpu = extractor.device.type == "cpu"
    with (
        cpu_threads(threads or model_threads(num_workers)) if on_cpu else nullcontext(),
        StreamWriter(out_dir, data.ids, extractor.dim, meta) as writer,
        deterministic(),
        torch.inference_mode(),
    ):
        for batch, batch_counts in loader:
            feats = extractor.embed(batch)
            writer.write(feats.float().cpu().numpy())
            bar.update(len(feats))
            for key, value in batch_counts.items():
                counts[key] = counts.get(key, 0) + int(value)
        if counts:
            writer.meta["counts"] = counts
    bar.close()
    return Path(out_dir)


def run_extract(params, stream: str, prepared_dir: str | Path, out_dir: str | Path) -> Path:
    """Stage entry point: extract stream ``stream`` as configured in params."""
    from sparc.data.prepared import load_prepared

    if stream not in params.streams:
        raise ValueError(f"unknown stream {stream!r} (configured: {', '.join(params.streams)})")
    cfg = params.streams[stream]
    data = load_prepared(prepared_dir)
    spec = check_spec(cfg.model, cfg.input)
    if FAMILIES[spec.family].precomputed:  # h5: / npy: files, rows matched by id (no model runs)
        from sparc.data.download import raw_dir
        from sparc.features.precomputed import import_stream

        meta = {"stream": stream, "model": cfg.model, "input": cfg.input, "preprocessing": {}, "device": "none",
                "dataset": data.meta.get("dataset"), "dataset_fingerprint": data.fingerprint}
        return import_stream(spec, data.ids, out_dir, meta, raw_dir(params.data.dataset))
    world = World.from_env()  # several processes under torchrun: extract.nproc, sparc.distributed
    device = rank_device(resolve_device(params.extract.device), world)
    on_cpu = device.type == "cpu"
    threads = model_threads(params.extract.num_workers, params.extract.cpu_threads, world.local_size)
    # The thread count is set before the model is built: ONNX Runtime fixes it at session creation.
    with cpu_threads(threads) if on_cpu else nullcontext():
        extractor = build_extractor(cfg.model, cfg.input, params.extract.device if world.size == 1 else str(device))
        run = extract_stream if world.size == 1 else partial(extract_sharded, world=world, extract=extract_stream)
        return run(
            data,
            extractor,
            out_dir,
            batch_size=params.extract.batch_size,
            num_workers=params.extract.num_workers,
            stream=stream,
            threads=threads,
        )
