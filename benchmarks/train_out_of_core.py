"""Training from the memory-mapped feature store at the paper's scale, against the in-RAM path.

Writes a synthetic feature store with the project's writer (:class:`sparc.features.store.
StreamWriter`): N = 1.7M rows of 3 streams (dims 1024/768/768, float16, 8.7 GB = 8.1 GiB on disk)
under ``--dir``, then trains the paper-size SAE (L 8192, k 64, batch 256, Global TopK, lambda 1,
k_aux 64, lr 1e-4) for a fixed number of steps through :class:`sparc.train.loop.Trainer`:

- ``memmap``: every row is a training row; the 8.7 GB do not fit the default
  ``train.ram_budget_mb`` (4096), so :class:`~sparc.train.sampler.FeatureSource` reads each batch
  from the store (warm: the file in the page cache, as after writing it or after a first epoch;
  the run passes a budget of 0, so a smaller ``--n`` takes this path too);
- ``memmap-cold``: the same after the store's pages were dropped from the page cache
  (``posix_fadvise(DONTNEED)`` on each file, nothing else is evicted), so batches come from the disk;
- ``ram``: the in-RAM path on the first ``--ram-rows`` rows (copied into memory once, as the
  train stage does when the rows fit the budget; the full 8.7 GB would not fit this machine
  beside the page cache). A step's cost does not depend on N (a batch is an ``index_select``).

Each run is a fresh process (so its peak memory is its own), started in alternation over
``--rounds`` rounds (machine load affects every path alike); ``--threads`` PyTorch threads (the
train stage's default ``train.cpu_threads`` is 1). Per run: median wall and CPU time per step over
the timed steps (CPU time of the whole process, and of the training thread alone: the store is
read by other threads), samples/s, the time a step waits in ``FeatureSource.gather`` (the trainer
prefetches the next batch during a step), the bytes read from the disk per step
(``/proc/self/io``), and memory from ``/proc/self/status``: VmHWM (peak resident set, which counts the store's pages mapped into the
process, ``RssFile``: page cache, shared and reclaimable, not memory the process owns) and the
largest ``RssAnon`` seen after a step (the process's own memory: model, optimizer, batches,
in-RAM rows). Printed: samples/s of each path, memmap over ram (target >= 0.8) and the memmap
runs' peak resident memory (target < 4 GiB).

    python benchmarks/train_out_of_core.py                      # write, measure, delete: ~20 min
    python benchmarks/train_out_of_core.py --keep               # keep the store for another run
    python benchmarks/train_out_of_core.py --n 200000 --steps 10  # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIMS = {"dino": 1024, "clip_img": 768, "clip_txt": 768}
STORE = "sparc_out_of_core_store"
BLOCK_ROWS = 65536
GIB = 2**30


def store_bytes(n: int) -> int:
    """Feature bytes of the synthetic store (float16)."""
    return n * sum(DIMS.values()) * 2


def write_store(root: Path, n: int, seed: int) -> None:
    """Write ``n`` rows of standard normal features per stream with :class:`StreamWriter`."""
    from sparc.features.store import StreamWriter

    ids = [f"s{i:08d}" for i in range(n)]
    rng = np.random.default_rng(seed)
    for stream, d in DIMS.items():
        meta = {"model": "synthetic", "dataset_fingerprint": "synthetic"}
        with StreamWriter(root / stream, ids, d, meta) as writer:
            for start in range(0, n, BLOCK_ROWS):
                writer.write(rng.standard_normal((min(BLOCK_ROWS, n - start), d), dtype=np.float32))


def store_complete(root: Path, n: int) -> bool:
    """Whether ``root`` holds this benchmark's store with ``n`` rows in every stream."""
    for stream, d in DIMS.items():
        meta = root / stream / "meta.json"
        if not meta.is_file():
            return False
        info = json.loads(meta.read_text())
        if (info.get("n"), info.get("dim")) != (n, d):
            return False
    return True


def drop_page_cache(root: Path) -> None:
    """Evict the store's (clean) pages from the page cache; other files are untouched."""
    for stream in DIMS:
        fd = os.open(root / stream / "features.npy", os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process in bytes (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def disk_read_bytes() -> int:
    """Bytes this process caused to be read from storage (Linux ``/proc/self/io`` read_bytes)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def child(args: argparse.Namespace) -> None:
    """One measured run (a fresh process): train ``--steps`` steps, print one JSON line."""
    import torch

    from sparc.features.store import load_streams
    from sparc.params import TrainParams
    from sparc.train.loop import Trainer, TrainSpec
    from sparc.train.sampler import FeatureSource

    torch.set_num_threads(args.threads)
    root = Path(args.dir) / STORE
    if args.mode == "memmap-cold":
        drop_page_cache(root)
    streams = load_streams(root, list(DIMS), check_finite=False)
    arrays = {s: fs.features for s, fs in streams.items()}
    start = time.perf_counter()
    if args.mode == "ram":
        source = FeatureSource(arrays, np.arange(args.ram_rows), ram_budget_bytes=None, check_finite=False)
    else:
        source = FeatureSource(arrays, ram_budget_bytes=0, check_finite=False)
    load_s = time.perf_counter() - start
    spec = TrainSpec(L=8192, k=64, lam=1.0, topk="global", seed=0, train=TrainParams(
        batch_size=256, lr=1e-4, k_aux=64, dead_steps=1000, revive_every=100, device="cpu",
        cpu_threads=args.threads))
    trainer = Trainer(source, spec, torch.device("cpu"))

    gather_times: list[float] = []
    gather = source.gather

    def timed_gather(positions: np.ndarray) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        out = gather(positions)
        gather_times.append(time.perf_counter() - t0)
        return out

    source.gather = timed_gather  # type: ignore[method-assign]
    wall, cpu, main_cpu, disk, anon, file_ = [], [], [], [], [], []
    for _ in range(args.warmup + args.steps):
        w0, c0, m0, d0 = time.perf_counter(), time.process_time(), time.thread_time(), disk_read_bytes()
        trainer.train_step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        main_cpu.append(time.thread_time() - m0)
        disk.append(disk_read_bytes() - d0)
        st = proc_status()
        anon.append(st["RssAnon"])
        file_.append(st["RssFile"])
    st = proc_status()
    timed = slice(args.warmup, None)
    print(json.dumps({
        "mode": args.mode, "in_memory": source.in_memory, "rows": len(source), "load_s": load_s,
        "wall": statistics.median(wall[timed]), "cpu": statistics.median(cpu[timed]),
        "main_cpu": statistics.median(main_cpu[timed]), "disk": statistics.median(disk[timed]),
        "gather": statistics.median(gather_times[timed]), "gather_max": max(gather_times[timed]),
        "vm_hwm": st["VmHWM"], "rss_anon_max": max(anon), "rss_file_max": max(file_),
        "loss": float(trainer.sums["loss/total"] / trainer.counts["loss/total"]),
    }))


def run_child(args: argparse.Namespace, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--dir", args.dir, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--ram-rows", str(args.ram_rows),
           "--n", str(args.n)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp", help="where the store is written (needs ~9 GB free)")
    parser.add_argument("--n", type=int, default=1_700_000, help="rows of the synthetic store")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each path, in alternation")
    parser.add_argument("--ram-rows", type=int, default=300_000, help="rows of the in-RAM run")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads (train.cpu_threads)")
    parser.add_argument("--no-cold", action="store_true", help="skip the runs from a dropped page cache")
    parser.add_argument("--keep", action="store_true", help="keep the store (reused by the next run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["ram", "memmap", "memmap-cold"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return

    root = Path(args.dir) / STORE
    print(f"store: {root}, {args.n} rows x {DIMS} float16 = {store_bytes(args.n) / GIB:.2f} GiB; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    if store_complete(root, args.n):
        print("reusing the existing store")
    else:
        free = shutil.disk_usage(args.dir).free
        if free < store_bytes(args.n) * 1.1:
            raise SystemExit(f"{args.dir}: {free / GIB:.1f} GiB free, the store needs {store_bytes(args.n) / GIB:.1f}")
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        write_store(root, args.n, args.seed)
        print(f"written in {time.perf_counter() - start:.0f} s", flush=True)
    modes = ["ram", "memmap"] + ([] if args.no_cold else ["memmap-cold"])
    results: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        for r in range(args.rounds):
            for mode in modes:
                res = run_child(args, mode)
                results[mode].append(res)
                print(f"round {r + 1} {mode:>11}: {256 / res['wall']:6.0f} samples/s (wall), "
                      f"{256 / res['cpu']:6.0f} per CPU s ({256 / res['main_cpu']:4.0f} per CPU s of the "
                      f"training thread), gather {1e3 * res['gather']:6.1f} ms/step, "
                      f"disk {res['disk'] / 2**20:5.1f} MiB/step, "
                      f"VmHWM {res['vm_hwm'] / GIB:.2f} GiB, RssAnon max {res['rss_anon_max'] / GIB:.2f} GiB, "
                      f"RssFile max {res['rss_file_max'] / GIB:.2f} GiB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            print(f"deleted {root}")

    print(f"\n{'path':>11} {'rows':>9} {'load s':>7} {'samples/s':>10} {'per CPU s':>10} {'gather ms':>10} "
          f"{'VmHWM GiB':>10} {'RssAnon GiB':>12} {'RssFile GiB':>12}")
    summary = {}
    for mode, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        summary[mode] = (256 / wall, 256 / cpu)
        print(f"{mode:>11} {runs[0]['rows']:>9} {max(r['load_s'] for r in runs):>7.1f} {256 / wall:>10.0f} "
              f"{256 / cpu:>10.0f} {1e3 * statistics.median(r['gather'] for r in runs):>10.1f} "
              f"{max(r['vm_hwm'] for r in runs) / GIB:>10.2f} {max(r['rss_anon_max'] for r in runs) / GIB:>12.2f} "
              f"{max(r['rss_file_max'] for r in runs) / GIB:>12.2f}")
    for mode in modes[1:]:
        peak = max(r["vm_hwm"] for r in results[mode]) / GIB
        print(f"{mode} / ram samples/s: {summary[mode][0] / summary['ram'][0]:.2f} wall, "
              f"{summary[mode][1] / summary['ram'][1]:.2f} per CPU s (target >= 0.8); peak resident "
              f"{peak:.2f} GiB (target < 4)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
