"""Extraction throughput: full pipeline (data loading included) vs the model's forward pass alone.

For each stream (default: the streams of params.yaml) over the emoji data, in one run:

(a) ``extract_stream`` end to end: DataLoader workers decode + preprocess, the model embeds, the
    feature store writes; samples/s;
(b) the model alone: the same batches, pre-loaded in memory, through ``Extractor.embed``; samples/s;

and prints a / b (1.0 = data loading is fully hidden behind the model) and the cost per 1000
samples of (a). (a) and (b) alternate ``--repeats`` times: throughputs are the fastest run of
each, a/b the median of the back-to-back pairs, so load from other processes on a shared machine
biases neither.

Also printed, because wall time on a shared machine depends on the other processes: the CPU
seconds per 1000 samples of (b) and of (a) (this process plus its data workers), and their ratio
``cpu b / cpu a``: the a/b a CPU-bound machine can reach when every core is busy.

The data is ``data/prepared/emoji`` when it exists, else the emoji set rendered into a temporary
directory; ``--limit`` samples (the first ones).

    .venv/bin/python benchmarks/extract_throughput.py --limit 512 [--device auto] [--streams effnet vit]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from sparc.data.prepared import PreparedData, load_prepared, prepare_dataset
from sparc.device import resolve_device
from sparc.features.extract import (
    cpu_threads,
    deterministic,
    extract_stream,
    make_loader,
    model_threads,
)
from sparc.features.registry import build_extractor
from sparc.params import DataParams, load_params


def subset(data: PreparedData, limit: int) -> PreparedData:
    """The first ``limit`` rows (all when ``limit`` <= 0)."""
    if limit <= 0 or limit >= len(data):
        return data
    keep = slice(0, limit)
    return dataclasses.replace(
        data,
        ids=data.ids[keep],
        images=data.images[keep],
        captions=data.captions[keep],
        labels=data.labels[keep],
        splits=data.splits[keep],
    )


def emoji_data(limit: int, work: Path) -> PreparedData:
    """data/prepared/emoji when present, else the emoji set rendered into ``work``."""
    prepared = Path("data/prepared/emoji")
    if (prepared / "samples.csv").is_file():
        return subset(load_prepared(prepared), limit)
    print(f"rendering emoji into {work} (data/prepared/emoji does not exist)")
    return load_prepared(prepare_dataset(DataParams(dataset="emoji", max_samples=max(limit, 0)), work / "emoji"))


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def forward_only(extractor, batches: list) -> tuple[float, float]:
    """(wall, CPU) seconds to embed the pre-loaded ``batches``."""
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), cpu_seconds()
    with deterministic(), torch.inference_mode():
        for batch in batches:
            extractor.embed(batch)
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def full_extract(extractor, data: PreparedData, out_dir: Path, args) -> tuple[float, float]:
    """(wall, CPU) seconds for ``extract_stream`` over ``data`` (workers, model, feature store)."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    extract_stream(
        data, extractor, out_dir, batch_size=args.batch_size, num_workers=args.num_workers,
        stream=out_dir.name, progress=False, threads=args.threads,
    )
    return time.perf_counter() - wall, cpu_seconds() - cpu


def bench_stream(name: str, spec: str, input: str, data: PreparedData, args, out_root: Path) -> dict:
    """(a) and (b) for one stream, alternated ``args.repeats`` times. Throughputs: the fastest run
    of each (other load on a shared machine only ever slows a run down); a/b: the median over the
    back-to-back pairs, so load that changes between pairs cancels out."""
    on_cpu = resolve_device(args.device).type == "cpu"
    # (b) and the model build use the thread count extract_stream gives the model in (a).
    with cpu_threads(args.threads) if on_cpu else nullcontext():
        start = time.perf_counter()
        extractor = build_extractor(spec, input, args.device)
        load_s = time.perf_counter() - start
        batches = list(make_loader(data, extractor, args.batch_size, 0))
        forward_only(extractor, batches[:1])  # warm-up (allocations, kernel selection)
        a_runs, b_runs = [], []
        for _ in range(args.repeats):
            b_runs.append(forward_only(extractor, batches))
            a_runs.append(full_extract(extractor, data, out_root / name, args))
    a_wall, a_cpu = np.array(a_runs).T
    b_wall, b_cpu = np.array(b_runs).T
    n = len(data)
    return {
        "stream": name, "spec": spec, "dim": extractor.dim, "n": n, "load_s": load_s,
        "a": n / a_wall.min(), "b": n / b_wall.min(), "ratio": float(np.median(b_wall / a_wall)),
        "per_1000_s": 1000 * a_wall.min() / n,
        "cpu_a_1000": 1000 * float(np.median(a_cpu)) / n, "cpu_b_1000": 1000 * float(np.median(b_cpu)) / n,
        "a_wall": a_wall, "b_wall": b_wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=512, help="samples per stream (0 = all)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=None, help="default: extract.batch_size")
    parser.add_argument("--num-workers", type=int, default=None, help="default: extract.num_workers")
    parser.add_argument("--repeats", type=int, default=3, help="alternated (a)/(b) runs")
    parser.add_argument("--streams", nargs="*", default=None, help="stream names from params.yaml")
    parser.add_argument("--threads", type=int, default=None, help="model threads on the CPU (default: the stage's choice from extract.cpu_threads)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    args.batch_size = args.batch_size or params.extract.batch_size
    args.num_workers = params.extract.num_workers if args.num_workers is None else args.num_workers
    args.threads = model_threads(args.num_workers, params.extract.cpu_threads if args.threads is None else args.threads)
    names = args.streams or params.stream_names
    unknown = [n for n in names if n not in params.streams]
    if unknown:
        parser.error(f"unknown streams {unknown} (configured: {', '.join(params.streams)})")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, model threads {args.threads} (on CPU), "
          f"load average {os.getloadavg()[0]:.1f}, device {args.device}, batch {args.batch_size}, "
          f"workers {args.num_workers}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = emoji_data(args.limit, Path(tmp))
        print(f"{len(data)} samples")
        for name in names:
            cfg = params.streams[name]
            r = bench_stream(name, cfg.model, cfg.input, data, args, Path(tmp) / "features")
            rows.append(r)
            print(f"{r['stream']:>8} {r['spec']:<24} dim {r['dim']:>4}  (a) full {r['a']:6.1f}/s  "
                  f"(b) forward {r['b']:6.1f}/s  a/b {r['ratio']:.3f}  wall {r['per_1000_s']:.1f} s/1000  "
                  f"CPU (a) {r['cpu_a_1000']:.1f} (b) {r['cpu_b_1000']:.1f} s/1000, "
                  f"cpu b/a {r['cpu_b_1000'] / r['cpu_a_1000']:.3f}  (model load {r['load_s']:.1f} s)", flush=True)
            print(f"{'':>8} wall runs (a) {' '.join(f'{t:.2f}' for t in r['a_wall'])} s, "
                  f"(b) {' '.join(f'{t:.2f}' for t in r['b_wall'])} s, load average {os.getloadavg()[0]:.1f}",
                  flush=True)
    ratios = np.array([r["ratio"] for r in rows])
    print(f"min a/b {ratios.min():.3f}, mean a/b {ratios.mean():.3f} (target >= 0.8)")


if __name__ == "__main__":
    main()
