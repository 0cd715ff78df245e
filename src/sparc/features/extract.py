"""The `extract` stage: run one stream's model over the prepared dataset into the feature store.

Samples are read and preprocessed by DataLoader workers while the model runs, in row order, so
the output rows match ``samples.csv``. On CPU the model runs with deterministic algorithms, so the
same inputs give the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from sparc.data.prepared import PreparedData
from sparc.features.base import Extractor
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


def make_loader(data: PreparedData, extractor: Extractor, batch_size: int, num_workers: int) -> DataLoader:
    """Ordered batches of collated inputs, with workers preparing the next batches."""
    return DataLoader(
        _Items(data, extractor),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=extractor.collate,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        pin_memory=extractor.device.type == "cuda",
    )


def extract_stream(
    data: PreparedData,
    extractor: Extractor,
    out_dir: str | Path,
    *,
    batch_size: int = 32,
    num_workers: int = 1,
    stream: str = "",
    progress: bool = True,
) -> Path:
    """Embed every sample of ``data`` with ``extractor`` and write the stream to ``out_dir``."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    meta = {
        "stream": stream or Path(out_dir).name,
        "model": str(extractor.spec),
        "input": extractor.input,
        "preprocessing": extractor.preprocessing(),
        "dataset": data.meta.get("dataset"),
        "dataset_fingerprint": data.fingerprint,
    }
    loader = make_loader(data, extractor, batch_size, num_workers)
    bar = tqdm(total=len(data), desc=f"extract {meta['stream']}", unit="sample", disable=not progress)
    with StreamWriter(out_dir, data.ids, extractor.dim, meta) as writer, torch.inference_mode():
        for batch in loader:
            feats = extractor.embed(batch)
            writer.write(feats.float().cpu().numpy())
            bar.update(len(feats))
    bar.close()
    return Path(out_dir)


def run_extract(params, stream: str, prepared_dir: str | Path, out_dir: str | Path) -> Path:
    """Stage entry point: extract stream ``stream`` as configured in params."""
    from sparc.data.prepared import load_prepared

    if stream not in params.streams:
        raise ValueError(f"unknown stream {stream!r} (configured: {', '.join(params.streams)})")
    cfg = params.streams[stream]
    data = load_prepared(prepared_dir)
    extractor = build_extractor(cfg.model, cfg.input, params.extract.device)
    return extract_stream(
        data,
        extractor,
        out_dir,
        batch_size=params.extract.batch_size,
        num_workers=params.extract.num_workers,
        stream=stream,
    )
