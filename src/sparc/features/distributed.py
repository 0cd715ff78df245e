"""Extraction over several processes (``extract.nproc``, see :mod:`sparc.distributed`).

With batch size ``b`` one process embeds the ``N`` samples in the batches ``[j b, (j + 1) b)``,
``j < nb = ceil(N / b)``. Process ``r`` of ``W`` takes the batches
``[floor(r nb / W), floor((r + 1) nb / W))`` (:func:`shard_rows`): a contiguous run of whole
batches, so every batch holds the same samples as in one process and, with the same number of
model threads per process, the merged stream equals the single-process one byte for byte (same
ids, rows and metadata). With fewer batches than processes, some get no rows.

Each process writes its shard as a stream directory (:class:`~sparc.features.store.StreamWriter`,
so a shard appears only when complete) at ``<stream>.shards/rank-<r>`` beside the stream; after
a barrier, rank 0 opens every shard (:func:`~sparc.features.store.open_stream` checks it), checks
its ids against the prepared data and its metadata against the others (the extraction's
``counts`` are summed), copies the rows in rank order into the stream (published atomically as in
one process) and deletes ``<stream>.shards``.
A failed merge leaves the shards for inspection; the next run replaces them.

The process group only carries barriers, so it is gloo on every device. Processes on several
machines exchange the shards through the file system: ``data/features`` must be shared.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sparc.data.prepared import PreparedData
from sparc.distributed import World, process_group
from sparc.features.base import Extractor
from sparc.features.store import FeatureStoreError, StreamWriter, open_stream

SHARDS_SUFFIX = ".shards"
# Rows copied per block while merging (bounded memory whatever the store's size).
MERGE_ROWS = 65536
# How long a process waits at a barrier for the slowest shard (and rank 0's merge); generous, as a
# process that fails makes torchrun stop the others at once.
BARRIER_TIMEOUT = timedelta(hours=12)
# Metadata keys written by StreamWriter itself (recomputed for the merged stream).
WRITER_META = ("dim", "dtype", "n")
# Metadata summed over the shards, key by key: the extraction's counts (e.g. truncated captions).
SUMMED_META = ("counts",)


def shard_rows(n: int, batch_size: int, rank: int, world_size: int) -> range:
    """Rows ``[lo, hi)`` of process ``rank``: whole batches ``[floor(r nb / W), floor((r + 1) nb / W))``
    of the single-process batches (``nb = ceil(n / batch_size)``, ``W = world_size``); the last
    shard ends at ``n``. Shards are contiguous, in rank order, and cover ``[0, n)`` once."""
    if batch_size <= 0:
        raise ValueError(f"extract.batch_size: must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    batches = -(-n // batch_size)
    lo = batches * rank // world_size * batch_size
    hi = batches * (rank + 1) // world_size * batch_size
    return range(min(lo, n), min(hi, n))


def shard_of(data: PreparedData, rows: range) -> PreparedData:
    """The prepared data restricted to ``rows``: every per-row field (a list or array of ``N``
    entries: ids, images, captions, ...) sliced, the rest (metadata, fingerprint) kept."""
    part, n = slice(rows.start, rows.stop), len(data)
    per_row = {
        f.name: value[part] for f in dataclasses.fields(data)
        if isinstance(value := getattr(data, f.name), (list, np.ndarray)) and len(value) == n
    }
    return dataclasses.replace(data, **per_row)


def shards_dir(out_dir: str | Path) -> Path:
    """``<stream>.shards`` beside the stream directory."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + SHARDS_SUFFIX)


def shard_path(out_dir: str | Path, rank: int) -> Path:
    """Where process ``rank`` writes its shard: ``<stream>.shards/rank-<rank, 5 digits>``."""
    return shards_dir(out_dir) / f"rank-{rank:05d}"


def merged_meta(metas: list[dict], stream: str) -> dict:
    """The shards' metadata as one process writes it: the common entries, without the keys
    StreamWriter recomputes (``WRITER_META``), plus the ``SUMMED_META`` mappings summed key by key
    over the shards that have them. FeatureStoreError naming the first other key on which two
    shards disagree."""
    skip = WRITER_META + SUMMED_META
    first = {k: v for k, v in metas[0].items() if k not in skip}
    for rank, meta in enumerate(metas[1:], start=1):
        other = {k: v for k, v in meta.items() if k not in skip}
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise FeatureStoreError(f"stream {stream}: shard {rank} has {key}={other.get(key)!r}, "
                                        f"the first shard {first.get(key)!r}")
    for key in SUMMED_META:
        parts = [meta[key] for meta in metas if key in meta]
        if parts:
            first[key] = {name: sum(part.get(name, 0) for part in parts) for part in parts for name in part}
    return first


def merge_shards(out_dir: str | Path, ids: list[str], parts: list[range], stream: str) -> Path:
    """Write the stream ``out_dir`` (rows ``ids``) from the shards of ``parts[r]`` (rows of rank
    ``r``; empty ranges wrote no shard), then delete ``<stream>.shards``.

    FeatureStoreError when a shard is missing (naming its path), damaged, or holds other ids than
    its rows of ``ids``.
    """
    out_dir = Path(out_dir)
    shards = []
    for rank, rows in enumerate(parts):
        if len(rows) == 0:
            continue
        path = shard_path(out_dir, rank)
        if not path.is_dir():
            raise FeatureStoreError(
                f"stream {stream}: the shard of process {rank} is missing at {path} (with several "
                "machines, data/features must be on a file system all of them share)"
            )
        shard = open_stream(path, f"{stream} (shard {rank})")
        if shard.ids != ids[rows.start : rows.stop]:
            raise FeatureStoreError(f"stream {stream}: shard {rank} at {path} does not hold rows "
                                    f"{rows.start}-{rows.stop - 1} of the prepared data")
        shards.append(shard)
    if not shards:
        raise FeatureStoreError(f"stream {stream}: no shard holds any row")
    meta = merged_meta([s.meta for s in shards], stream)
    with StreamWriter(out_dir, ids, shards[0].dim, meta) as writer:
        for shard in shards:
            for start in range(0, len(shard), MERGE_ROWS):
                writer.write(np.asarray(shard.features[start : start + MERGE_ROWS]))
    shutil.rmtree(shards_dir(out_dir))
    return out_dir


def extract_sharded(
    data: PreparedData,
    extractor: Extractor,
    out_dir: str | Path,
    world: World,
    *,
    extract: Callable[..., Path],
    batch_size: int = 32,
    num_workers: int = 1,
    stream: str = "",
    progress: bool = True,
    threads: int | None = None,
) -> Path:
    """``extract`` (:func:`sparc.features.extract.extract_stream`, passed in by its caller so that
    this module does not import it back) as process ``world.rank`` of ``world.size``:
    embed this process's shard (:func:`shard_rows`), wait for every shard, rank 0 merges them
    into ``out_dir`` (:func:`merge_shards`), and every process returns once the stream is
    published. Only rank 0 shows a progress bar (of its shard)."""
    out_dir = Path(out_dir)
    stream = stream or out_dir.name
    parts = [shard_rows(len(data), batch_size, r, world.size) for r in range(world.size)]
    mine = parts[world.rank]
    with process_group(world, torch.device("cpu"), timeout=BARRIER_TIMEOUT):
        if len(mine):
            extract(
                shard_of(data, mine), extractor, shard_path(out_dir, world.rank), batch_size=batch_size,
                num_workers=num_workers, stream=stream, progress=progress and world.main, threads=threads,
            )
        dist.barrier()
        if world.main:
            merge_shards(out_dir, data.ids, parts, stream)
        dist.barrier()
    return out_dir
