"""The paper's whole run projected on this machine: wall time and peak memory, stage by stage.

Measures on ``--device`` (cpu or cuda), each part in a fresh process so that its peak resident
memory (``ru_maxrss``) is its own:

* ``extract@<stream>``: the paper's three streams at their real size with random weights
  (``weights=random``: DINOv2 ViT-L/14 with registers, OpenCLIP ViT-L-14 image and text towers;
  sparc.features.random_weights): seconds per row of the model on batches of ``--batch`` rows
  (after a warm-up batch), and the loading of one row on one core (decoding a 1024 x 768 JPEG and
  the model's preprocessing, or tokenising a 60-word narrative), which ``--workers`` loading
  processes share (``extract.num_workers``: 1 by default);
* ``prepared``: the memory of the prepared dataset as the stages hold it
  (:func:`sparc.data.prepared.load_prepared`: extract, concepts, evaluate; ``load_prepared_index``:
  train, encode), a synthetic samples.csv in Open Images' shape at two sizes, per row;
* ``train``: the real training loop (:func:`sparc.train.loop.train_arrays`) at the paper's
  dims (1024/768/768), L 8192, k 64, batch 256, Adam 1e-4: median seconds per step;
* ``encode``: both kinds of codes (:func:`sparc.model.io.encode_dataset`) of synthetic rows at two
  sizes, seconds per 1000 rows; memory: the peak at the larger size plus one kind of codes (their
  bytes per row) for every further row;
* ``evaluate``: ``benchmarks/evaluate_memory.py`` (the `concepts` and `evaluate` stages' phases)
  at two test-split sizes in Open Images' proportions, seconds and memory per 1000 test rows;
* ``epoch`` (``--epoch-rows N``): one epoch of the real training loop on a synthetic feature
  store of N rows (1.7M: the paper's training set, 8.7 GB, written under ``$SPARC_BENCH_DIR`` or
  the system temporary directory) read as the train stage reads it;
* ``prepare``: SHA-256 throughput (prepare hashes every image file; the copy or link of the
  images and the disk are not counted).

and projects them to each dataset of :data:`DATASETS` (the download excluded): extraction
``rows x max(model, loading / workers)`` per stream, training ``ceil(train rows / 256) x 50``
steps, encode and evaluate linearly from their two sizes (retrieval grows faster than linearly:
``evaluate_memory.py`` at full size gives the real figure), peak host memory per stage as the
measured fixed part plus the per-row parts at full size. Not measured: `localise` (60 composite
queries on Open Images; every val2017 image and class on COCO), `figures` and `browser`.

    python benchmarks/paper_cost.py --device cpu            # about 6 minutes on 2 cores
    python benchmarks/paper_cost.py --device cuda --workers 12 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
STREAMS = {  # the paper's streams (sparc.presets.PAPER_MODELS) with random weights
    "dino": ("dinov2:facebook/dinov2-with-registers-large?weights=random", "image"),
    "clip_img": ("openclip:ViT-L-14@datacomp_xl_s13b_b90k?weights=random", "image"),
    "clip_txt": ("openclip:ViT-L-14@datacomp_xl_s13b_b90k?weights=random", "caption"),
}
DIMS = {"dino": 1024, "clip_img": 768, "clip_txt": 768}
L, K, BATCH, EPOCHS = 8192, 64, 256, 50
NARRATIVE = " ".join(["in this picture we can see a person standing on the road and holding a bag"] * 4)
GIB = 2**30


@dataclass(frozen=True)
class Dataset:
    """The sizes of one dataset that the run's cost depends on."""

    rows: int  # samples (image-caption pairs): rows of every stream
    train: int  # training rows
    test: int  # test rows (concepts, evaluate)
    image_bytes: float  # the images on disk (prepare hashes them)


# Open Images V7 + Localized Narratives (docs/datasets.md; 1.7M training pairs, the
# 126,020 test pairs, 670k images, 200 GB) and COCO 2017 with captions joined (123,287 images with
# captions: train2017 split 90/10 into train and val, val2017's 5,000 the test split; 19 GB).
DATASETS = {
    "Open Images": Dataset(rows=1_826_020, train=1_700_000, test=126_020, image_bytes=200e9),
    "COCO": Dataset(rows=123_287, train=106_459, test=5_000, image_bytes=19e9),
}


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak(device) -> int:
    """The largest CUDA memory allocated on ``device`` so far (0 on the CPU)."""
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_image():
    """A 1024 x 768 JPEG (Open Images' usual size) decoded as the extract stage decodes it."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:768, 0:1024]
    noise = np.random.default_rng(0).integers(0, 40, (768, 1024, 3))
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1) + noise
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------- parts (child processes)


def part_extract(stream: str, device_name: str, batch: int, reps: int) -> dict:
    """Model seconds per row of ``stream`` at batch ``batch`` (median of ``reps`` batches after one
    warm-up), loading seconds per row on one core, build seconds, and the peaks."""
    import statistics
    import tempfile

    import torch

    from sparc.features.extract import model_threads
    from sparc.features.registry import build_extractor

    spec, inp = STREAMS[stream]
    if device_name == "cpu":
        torch.set_num_threads(model_threads(1))  # the extract stage's default on the CPU
    start = time.perf_counter()
    ex = build_extractor(spec, inp, device_name)
    build = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "image.jpg"
        image.write_bytes(sample_image())
        start = time.perf_counter()
        items = [ex.load(image, NARRATIVE) for _ in range(batch)]
        batch_in = ex.collate(items)
        load = (time.perf_counter() - start) / batch
    times = []
    with torch.inference_mode():
        for _ in range(reps + 1):
            synchronize(ex.device)
            start = time.perf_counter()
            ex.embed(batch_in)
            synchronize(ex.device)
            times.append(time.perf_counter() - start)
    return {"model_s_per_row": statistics.median(times[1:]) / batch, "load_s_per_row": load, "build_s": build,
            "host_peak": peak_rss(), "device_peak": device_peak(ex.device)}


def part_prepared(rows: int) -> dict:
    """Memory of loading a synthetic Open Images-shaped prepared dataset of ``rows`` rows with
    :func:`load_prepared` (``full``) and ``load_prepared_index`` (``index``): each one's peak
    above the resident memory before it (Linux VmHWM, reset before each)."""
    import tempfile

    import numpy as np

    sys.path.insert(0, str(HERE))
    from evaluate_memory import make_hierarchy, make_labels, peak_rss_gib, reset_peak

    from sparc.data.prepared import load_prepared, load_prepared_index

    rng = np.random.default_rng(0)
    hierarchy = make_hierarchy(rng, [10, 40, 100, 200, 250])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hierarchy.save(root / "hierarchy.json")
        (root / "meta.json").write_text('{"dataset": "synthetic", "fingerprint": "-"}')
        words = np.array([f"w{i}" for i in range(2000)])
        with (root / "samples.csv").open("w") as fh:
            fh.write("id,image,caption,labels,split,image_sha256,group\n")
            for i, labels in enumerate(make_labels(rng, hierarchy.labels, rows)):
                group = f"{i // 3:016x}"
                caption = " ".join(words[rng.integers(0, words.size, 40)])
                fh.write(f"{group}_{i % 3},images/{group}.jpg,{caption},{'|'.join(labels)},train,{'0' * 64},{group}\n")
        grown = {}
        for name, load in (("index", load_prepared_index), ("full", load_prepared)):
            reset_peak()  # the peak restarts from the current resident memory
            base = peak_rss_gib()
            loaded = load(root)
            grown[name] = (peak_rss_gib() - base) * GIB
            del loaded
    return grown


def part_train(device_name: str, steps: int) -> dict:
    """Median seconds per step of the real training loop at the paper's sizes, and the peaks."""
    import statistics

    import numpy as np
    import torch

    from sparc.params import TrainParams
    from sparc.train.loop import TrainSpec, train_arrays

    if device_name == "cpu":
        torch.set_num_threads(TrainParams().cpu_threads)  # the train stage's default on the CPU
    rng = np.random.default_rng(0)
    rows = BATCH * steps
    features = {s: rng.standard_normal((rows, d), dtype=np.float32).astype(np.float16) for s, d in DIMS.items()}
    spec = TrainSpec(L=L, k=K, lam=1.0, topk="global", seed=42, train=TrainParams(
        batch_size=BATCH, epochs=EPOCHS, lr=1.0e-4, device=device_name, dead_steps=1000, revive_every=100))
    device = torch.device(device_name)
    stamps: list[float] = []

    def tick(step: int, model) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    train_arrays(features, spec, max_steps=steps, callback=tick)
    per_step = statistics.median(b - a for a, b in zip(stamps[2:], stamps[3:], strict=False))
    return {"s_per_step": per_step, "host_peak": peak_rss(), "device_peak": device_peak(device)}


def part_encode(device_name: str, rows: int) -> dict:
    """Seconds for both kinds of codes of ``rows`` synthetic rows at the paper's sizes, the peak
    above the resident memory before encoding (model and features made; Linux VmHWM), and the
    bytes per row of one kind of codes (what grows with the rows: the stage holds one kind)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from evaluate_memory import peak_rss_gib, reset_peak

    from sparc.model.io import encode_dataset
    from sparc.model.sae import MultiStreamSAE, SAEConfig

    device = torch.device(device_name)
    model = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K, topk="global", k_aux=64), seed=0).to(device).eval()
    rng = np.random.default_rng(0)
    features = {s: rng.standard_normal((rows, d), dtype=np.float32).astype(np.float16) for s, d in DIMS.items()}
    ids = [str(i) for i in range(rows)]
    reset_peak()
    base = peak_rss_gib()
    start = time.perf_counter()
    for mode in ("global", "local"):  # joint, then per-stream codes: one kind held at a time
        codes = encode_dataset(model, features, ids, mode, batch_size=1024, device=device_name, progress=False)
        per_row = sum(a.nbytes for arrays in (codes.indices, codes.values) for a in arrays.values()) / rows
        del codes
    synchronize(device)
    return {"s": time.perf_counter() - start, "grown": (peak_rss_gib() - base) * GIB, "codes_per_row": per_row,
            "device_peak": device_peak(device)}


def part_epoch(device_name: str, rows: int) -> dict:
    """One epoch of the real training loop (:func:`sparc.train.loop.train_sae`) at the paper's
    sizes on a synthetic feature store of ``rows`` rows written with the project's writer
    (``benchmarks/train_out_of_core.py``), read as the train stage reads it (from the memory map
    when it exceeds ``train.ram_budget_mb``); wall seconds of the epoch and the peaks."""
    import tempfile

    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from train_out_of_core import write_store

    from sparc.features.store import load_streams
    from sparc.params import TrainParams
    from sparc.train.loop import TrainSpec, train_sae
    from sparc.train.sampler import FeatureSource

    params = TrainParams(batch_size=BATCH, epochs=1, lr=1.0e-4, device=device_name)
    if device_name == "cpu":
        torch.set_num_threads(params.cpu_threads)
    with tempfile.TemporaryDirectory(dir=os.environ.get("SPARC_BENCH_DIR")) as tmp:
        start = time.perf_counter()
        write_store(Path(tmp), rows, seed=0)
        written = time.perf_counter() - start
        arrays = {s: fs.features for s, fs in load_streams(Path(tmp), list(DIMS), check_finite=False).items()}
        start = time.perf_counter()
        source = FeatureSource(arrays, np.arange(rows), ram_budget_bytes=params.ram_budget_mb * 2**20,
                               device=torch.device(device_name), check_finite=False)
        spec = TrainSpec(L=L, k=K, lam=1.0, topk="global", seed=42, train=params)
        result = train_sae(source, spec)
        synchronize(torch.device(device_name))
        epoch = time.perf_counter() - start
    return {"write_s": written, "epoch_s": epoch, "steps": result.step, "in_memory": source.in_memory,
            "host_peak": peak_rss(), "device_peak": device_peak(torch.device(device_name))}


PARTS = {"extract": part_extract, "prepared": part_prepared, "train": part_train, "encode": part_encode,
         "epoch": part_epoch}


def child(argv: list[str]) -> dict:
    """Run one part in a fresh process (``python paper_cost.py --part NAME ARG...``); its JSON."""
    proc = subprocess.run([sys.executable, __file__, "--part", *argv], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: part {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluate_run(device: str, test_rows: int) -> dict:
    """``evaluate_memory.py`` at ``test_rows`` test rows among Open Images' proportion of other
    rows: wall seconds and peak bytes of `concepts` plus `evaluate`."""
    ratio = DATASETS["Open Images"].train / DATASETS["Open Images"].test
    cmd = [sys.executable, str(HERE / "evaluate_memory.py"), "--n", str(test_rows),
           "--train-rows", str(int(test_rows * ratio)), "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: evaluate_memory.py --n {test_rows} failed:\n{proc.stderr[-3000:]}")
    phases = {line.split()[0]: line.split()[1:4] for line in proc.stdout.splitlines()
              if line.split() and line.split()[0] in ("concepts", "evaluate")}
    wall = float(phases["concepts"][0]) + float(phases["evaluate"][0])
    peak = max(float(phases["concepts"][2]), float(phases["evaluate"][2])) * GIB
    return {"s": wall, "peak": peak}


def sha256_rate() -> float:
    """Bytes per second that SHA-256 hashes on one core (prepare hashes every image)."""
    import hashlib

    data = os.urandom(64 * 2**20)
    start = time.perf_counter()
    for _ in range(4):
        hashlib.sha256(data).digest()
    return 4 * len(data) / (time.perf_counter() - start)


# --------------------------------------------------------------------------- projection


def line(x1: float, y1: float, x2: float, y2: float):
    """The line through (x1, y1) and (x2, y2), as a function of x."""
    slope = (y2 - y1) / (x2 - x1)
    return lambda x: y1 + slope * (x - x1)


def hms(seconds: float) -> str:
    """``1 h 02 min`` / ``3 min 05 s`` / ``4.2 s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def project(m: dict, data: Dataset, workers: int) -> list[tuple[str, float, float, float]]:
    """``(stage, seconds, peak host bytes, peak device bytes)`` of each stage for ``data``."""
    full = m["prepared"]["full_fit"]
    index = m["prepared"]["index_fit"]
    rows = []
    rows.append(("prepare", data.image_bytes / m["sha256"], full(data.rows), 0.0))
    for s in STREAMS:
        e = m["extract"][s]
        per_row = max(e["model_s_per_row"], e["load_s_per_row"] / workers)
        rows.append((f"extract@{s}", e["build_s"] + data.rows * per_row, e["host_peak"] + full(data.rows),
                     e["device_peak"]))
    t = m["train"]
    steps = math.ceil(data.train / BATCH) * EPOCHS
    rows.append(("train", steps * t["s_per_step"], t["host_peak"] + index(data.rows), t["device_peak"]))
    enc = m["encode"]
    rows.append(("encode", enc["s_fit"](data.rows), enc["grown_fit"](data.rows) + index(data.rows), enc["device_peak"]))
    ev = m["evaluate"]
    rows.append(("concepts+evaluate", ev["s_fit"](data.test), ev["peak_fit"](data.test), 0.0))
    return rows


def measure(args: argparse.Namespace) -> dict:
    """Every part (module docstring), printed as it is measured."""
    m: dict = {"extract": {}}
    for s in STREAMS:
        m["extract"][s] = child(["extract", s, args.device, str(args.batch), str(args.reps)])
        e = m["extract"][s]
        print(f"extract@{s}: model {e['model_s_per_row']:.4f} s/row (batch {args.batch}), loading "
              f"{e['load_s_per_row']:.4f} s/row on one core, build {e['build_s']:.1f} s, peak host "
              f"{e['host_peak'] / GIB:.2f} GiB, device {e['device_peak'] / GIB:.2f} GiB", flush=True)
    small, big = args.prepared_rows
    p1, p2 = child(["prepared", str(small)]), child(["prepared", str(big)])
    m["prepared"] = {key: p2[key] for key in ("full", "index")}
    m["prepared"]["full_fit"] = line(small, p1["full"], big, p2["full"])
    m["prepared"]["index_fit"] = line(small, p1["index"], big, p2["index"])
    print(f"prepared: {p2['full'] / big:.0f} B/row (load_prepared), {p2['index'] / big:.0f} B/row (index) "
          f"at {big:,} rows", flush=True)
    m["train"] = child(["train", args.device, str(args.train_steps)])
    print(f"train: {m['train']['s_per_step']:.4f} s/step (L {L}, k {K}, batch {BATCH}), peak host "
          f"{m['train']['host_peak'] / GIB:.2f} GiB, device {m['train']['device_peak'] / GIB:.2f} GiB", flush=True)
    small, big = args.encode_rows
    e1, e2 = child(["encode", args.device, str(small)]), child(["encode", args.device, str(big)])
    per_row = e2["codes_per_row"]
    m["encode"] = {"s_fit": line(small, e1["s"], big, e2["s"]),
                   "grown_fit": line(big, e2["grown"], 2 * big, e2["grown"] + per_row * big),
                   "device_peak": e2["device_peak"]}
    print(f"encode: {1000 * e2['s'] / big:.3f} s per 1000 rows (both kinds, at {big:,} rows), peak "
          f"{e2['grown'] / GIB:.2f} GiB above the model and features, codes {per_row:.0f} B/row", flush=True)
    small, big = args.evaluate_rows
    v1, v2 = evaluate_run(args.device, small), evaluate_run(args.device, big)
    m["evaluate"] = {"s_fit": line(small, v1["s"], big, v2["s"]),
                     "peak_fit": line(small, v1["peak"], big, v2["peak"])}
    print(f"concepts+evaluate: {1000 * v2['s'] / big:.2f} s per 1000 test rows (at {big:,}), peak "
          f"{v2['peak'] / GIB:.2f} GiB", flush=True)
    m["sha256"] = sha256_rate()
    print(f"prepare: SHA-256 {m['sha256'] / 1e6:.0f} MB/s on one core", flush=True)
    return m


def table(m: dict, workers: int, device: str) -> tuple[str, dict]:
    """The projection as a markdown table (a GPU memory column on cuda), and its figures for
    ``--json``."""
    gpu = device == "cuda"

    def cells(seconds: str, host: float, dev: float) -> str:
        return f"{seconds} | {host / GIB:.1f} GiB" + (f" | {dev / GIB:.1f} GiB" if gpu else "")

    columns = "wall | peak host" + (" | peak GPU" if gpu else "")
    lines = ["| stage | " + " | ".join(f"{name}: {columns}" for name in DATASETS) + " |",
             "|---|" + ("---:|" * (3 if gpu else 2)) * len(DATASETS)]
    projected = {name: project(m, data, workers) for name, data in DATASETS.items()}
    stages = [stage for stage, *_ in projected["Open Images"]]
    for i, stage in enumerate(stages):
        row = [cells(hms(t), h, d) for _, t, h, d in (projected[n][i] for n in DATASETS)]
        lines.append(f"| {stage} | " + " | ".join(row) + " |")
    row = [cells(f"**{hms(sum(t for _, t, _, _ in projected[n]))}**", max(h for _, _, h, _ in projected[n]),
                 max(d for _, _, _, d in projected[n])) for n in DATASETS]
    lines.append("| total (download excluded) | " + " | ".join(row) + " |")
    for name in DATASETS:
        train = next(t for stage, t, _, _ in projected[name] if stage == "train")
        lines.append(f"\n{name}: training {hms(train)}; everything else {hms(sum(t for _, t, _, _ in projected[name]) - train)}.")
    figures = {name: {stage: {"s": t, "host_bytes": h, "device_bytes": d} for stage, t, h, d in rows}
               for name, rows in projected.items()}
    return "\n".join(lines), figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batch", type=int, default=0, help="extraction batch (default: 2 on cpu, 128 on cuda)")
    ap.add_argument("--reps", type=int, default=0, help="timed extraction batches (default: 2 on cpu, 5 on cuda)")
    ap.add_argument("--workers", type=int, default=1, help="loading processes of extraction (extract.num_workers)")
    ap.add_argument("--train-steps", type=int, default=0, help="training steps run (default: 20 on cpu, 200 on cuda)")
    ap.add_argument("--prepared-rows", type=int, nargs=2, default=[50_000, 150_000])
    ap.add_argument("--encode-rows", type=int, nargs=2, default=[0, 0], help="default: 4096 8192 on cpu, 65536 262144 on cuda")
    ap.add_argument("--evaluate-rows", type=int, nargs=2, default=[2000, 8000], help="test rows of the two evaluate runs")
    ap.add_argument("--epoch-rows", type=int, default=0,
                    help="also time one training epoch on a synthetic store of this many rows (1700000: the paper's)")
    ap.add_argument("--json", default="", help="also write the measurements and the projection here")
    ap.add_argument("--part", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        name, *rest = args.part
        fn = PARTS[name]
        print(json.dumps(fn(*(int(a) if a.isdigit() else a for a in rest))))
        return
    gpu = args.device == "cuda"
    args.batch = args.batch or (128 if gpu else 2)
    args.reps = args.reps or (5 if gpu else 2)
    args.train_steps = args.train_steps or (200 if gpu else 20)
    if args.encode_rows == [0, 0]:
        args.encode_rows = [65536, 262144] if gpu else [4096, 8192]
    import torch

    where = torch.cuda.get_device_name(0) if gpu else f"{os.cpu_count()} CPU cores"
    print(f"paper_cost: {where}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}, "
          f"{args.workers} loading worker(s)", flush=True)
    start = time.perf_counter()
    m = measure(args)
    if args.epoch_rows:
        ep = child(["epoch", args.device, str(args.epoch_rows)])
        m["epoch"] = ep
        print(f"one epoch on {args.epoch_rows:,} rows: {hms(ep['epoch_s'])} ({ep['steps']} steps, "
              f"{ep['epoch_s'] / ep['steps']:.4f} s/step, {'in RAM' if ep['in_memory'] else 'from the memory map'}; "
              f"store written in {hms(ep['write_s'])}), peak host {ep['host_peak'] / GIB:.2f} GiB, "
              f"device {ep['device_peak'] / GIB:.2f} GiB", flush=True)
    text, figures = table(m, args.workers, args.device)
    print(f"\nProjected paper run on this machine ({where}; measured in {hms(time.perf_counter() - start)}):\n")
    print(text)
    if args.json:
        keep = {k: v for k, v in m.items() if k in ("extract", "train", "sha256", "epoch")}
        Path(args.json).write_text(json.dumps({"device": where, "measured": keep, "projected": figures}, indent=1))


if __name__ == "__main__":
    main()
