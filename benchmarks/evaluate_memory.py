"""Time and peak memory of every evaluation metric at the paper's scale, on synthetic codes.

Default sizes: N = 126,020 test samples, L = 8192, k = 64, 3 streams (dims 1024/768/768 for the
reconstruction phase), 600 labels in a depth-5 hierarchy with 1-6 labels per sample. The codes are
stored as the `encode` stage stores them, for every row of the dataset: the N test rows among
``--train-rows`` others (default 1.7M, the paper's training set; 5.6 GB of codes on disk for the
two kinds), at random positions; ``load`` reads the test rows back as the stages do. The prepared
dataset is written for all those rows too, in Open Images' shape (a caption of 40 words, 1-6
labels and a group of 3 captions per image), and ``prepared`` loads it as every stage does
(:func:`sparc.data.prepared.load_prepared`); it stays in memory through the later phases, as in
the stage.

Synthetic data: latent ids per sample are drawn without replacement with probability proportional
to rank^-0.5 (a few frequent latents, a long tail), independently for the joint index set and for
each stream's per-stream codes; activations are exponential, and 10% of each stream's joint
entries are set to 0 (ReLU cuts). Labels follow a Zipf law over the 600 labels. The codes carry no
signal: time and memory depend on sizes and latent frequencies, not on what the codes mean.

Phases run one after the other in this process, each through the functions the stages call, on
both kinds of codes where the `evaluate` stage uses both (joint and per-stream: jaccard, patterns,
universality, reconstruction), the joint codes for the probes (all classes with more than
``--probe-min-positives`` positives, as the paper preset), the per-stream codes for retrieval (the
6 ordered stream pairs). Per phase the script prints wall time, CPU time of the process (all
threads; on a shared machine it is the steadier number) and the phase's own peak resident memory
(Linux VmHWM, reset before each phase; the process's ``ru_maxrss`` where that is unavailable).
``concepts`` is the `concepts` stage (not part of `evaluate`); ``evaluate`` sums the phases of the
`evaluate` stage, its peak is the largest phase peak. ``--compare-dense`` also runs the previous
retrieval computation (dense similarity blocks) and checks that every rank count is identical.

    python benchmarks/evaluate_memory.py                    # paper scale, the whole evaluate stage
    python benchmarks/evaluate_memory.py --n 20000          # a quicker look
    python benchmarks/evaluate_memory.py --only retrieval --compare-dense   # retrieval before / after
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparc.data.hierarchy import Hierarchy
from sparc.data.prepared import load_prepared
from sparc.evaluate.concepts import assign_concepts
from sparc.evaluate.jaccard import hierarchical_jaccard
from sparc.evaluate.labels import LabelSpace
from sparc.evaluate.metrics import (
    activation_patterns,
    code_matrix,
    cofire_counts,
    cofire_proportion,
    firing_counts,
    firing_entropy,
    retrieval_metrics,
)
from sparc.evaluate.probes import run_probes
from sparc.evaluate.reconstruction import reconstruction_matrix
from sparc.evaluate.retrieval import dense_pair_rank_counts, pair_rank_counts
from sparc.model.codes import SparseCodes

# the phases of the `evaluate` stage (sparc.evaluate.evaluate_stage.run_evaluate)
EVALUATE_PHASES = ("prepared", "load", "jaccard", "patterns", "universality", "reconstruction", "probes", "retrieval")
PHASES = ("concepts", *EVALUATE_PHASES, "retrieval_dense")


def reset_peak() -> bool:
    """Reset this process's peak resident memory (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gib() -> float:
    """Peak resident memory since the last :func:`reset_peak` (VmHWM), else of the whole run."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def draw_indices(n: int, L: int, k: int, rng: np.random.Generator, chunk: int = 16384) -> np.ndarray:
    """``[n, k]`` int32 distinct latent ids per row, drawn one after another with P(latent) ~ rank^-0.5
    among the latents not drawn yet (the law of a Gumbel top-k): draws with replacement, repeats
    skipped; a row with fewer than k distinct ids among its 2k draws is drawn again."""
    cdf = np.cumsum(np.arange(1, L + 1, dtype=np.float64) ** -0.5)
    cdf /= cdf[-1]
    perm = rng.permutation(L)  # frequent latents spread over the index range
    out = np.empty((n, k), dtype=np.int32)
    for start in range(0, n, chunk):
        pending = np.arange(start, min(start + chunk, n))
        while pending.size:
            draws = np.minimum(np.searchsorted(cdf, rng.random((pending.size, 2 * k)), side="right"), L - 1)
            order = np.argsort(draws, axis=1, kind="stable")
            ranked = np.take_along_axis(draws, order, axis=1)
            first_ranked = np.ones(ranked.shape, dtype=bool)
            first_ranked[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
            first = np.empty_like(first_ranked)
            np.put_along_axis(first, order, first_ranked, axis=1)  # first occurrence, in draw order
            enough = first.sum(axis=1) >= k
            keep = np.argsort(~first[enough], axis=1, kind="stable")[:, :k]
            out[pending[enough]] = perm[np.take_along_axis(draws[enough], keep, axis=1)]
            pending = pending[~enough]
    return out


def codes_digest(codes: SparseCodes) -> str:
    """SHA-256 of every index and value array of ``codes``, in stream order."""
    h = hashlib.sha256()
    for s in codes.streams:
        h.update(np.ascontiguousarray(codes.indices[s]).tobytes())
        h.update(np.ascontiguousarray(codes.values[s]).tobytes())
    return h.hexdigest()


def make_hierarchy(rng: np.random.Generator, sizes: list[int]) -> Hierarchy:
    """A random tree with ``sizes[d - 1]`` labels at depth d; parents drawn from the level above."""
    parents: dict[str, str | None] = {}
    above: list[str | None] = [None]
    for depth, size in enumerate(sizes, start=1):
        level = [f"d{depth}_{i}" for i in range(size)]
        for lab in level:
            parents[lab] = above[int(rng.integers(len(above)))]
        above = level
    return Hierarchy.from_parents(parents)


def make_labels(rng: np.random.Generator, labels: list[str], n: int) -> list[tuple[str, ...]]:
    """1-6 labels per sample, Zipf-distributed over ``labels``."""
    p = 1.0 / np.arange(1, len(labels) + 1)
    p /= p.sum()
    order = rng.permutation(len(labels))
    counts = rng.integers(1, 7, size=n)
    draws = order[rng.choice(len(labels), size=int(counts.sum()), p=p)]
    out, pos = [], 0
    for c in counts:
        out.append(tuple(labels[j] for j in sorted(set(draws[pos : pos + c].tolist()))))
        pos += c
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=126_020)
    ap.add_argument("--train-rows", type=int, default=1_700_000,
                    help="rows of the stored codes besides the N test rows (the stages read the test rows only)")
    ap.add_argument("--L", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 768, 768])
    ap.add_argument("--probe-min-positives", type=int, default=51, help="as the paper preset")
    ap.add_argument("--probe-classes", type=int, default=0, help="probe only the first classes (0 = all, as the stage)")
    ap.add_argument("--skip", nargs="*", default=[], choices=PHASES, help="phases to leave out")
    ap.add_argument("--only", nargs="*", default=[], choices=PHASES, help="run only these phases (and load)")
    ap.add_argument("--compare-dense", action="store_true", help="also time the dense retrieval and compare counts")
    ap.add_argument("--device", default="cpu", help="device for retrieval and reconstruction")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    streams = [f"s{i}" for i in range(len(args.dims))]
    N, L, k = args.n, args.L, args.k
    print(f"N={N} L={L} k={k} streams={len(streams)} dims={args.dims} device={args.device} "
          f"torch threads={torch.get_num_threads()}")
    wanted = set(args.only or PHASES) | {"load"}
    wanted -= set(args.skip)
    if not args.compare_dense:
        wanted.discard("retrieval_dense")
    per_phase_peak = reset_peak()

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    joint_idx = draw_indices(N, L, k, rng)
    joint_vals = {}
    for s in streams:
        v = rng.exponential(size=(N, k)).astype(np.float32)
        v[rng.random((N, k)) < 0.1] = 0.0
        joint_vals[s] = v
    joint = SparseCodes([str(i) for i in range(N)], L, {s: joint_idx for s in streams}, joint_vals)
    local = SparseCodes(
        joint.ids, L,
        {s: draw_indices(N, L, k, rng) for s in streams},
        {s: rng.exponential(size=(N, k)).astype(np.float32) for s in streams},
    )
    hierarchy = make_hierarchy(rng, [10, 40, 100, 200, 250])
    sample_labels = make_labels(rng, hierarchy.labels, N)
    print(f"{'phase':<16}{'wall s':>9}{'cpu s':>9}{'peak GiB':>10}")
    print(f"{'generate':<16}{time.perf_counter() - t0:9.1f}{'':>9}{peak_rss_gib():10.2f}")

    timings: dict[str, tuple[float, float, float]] = {}  # phase -> wall, cpu, peak

    def run(name: str, fn):
        """Run one phase unless left out; print its wall and CPU time and its peak memory."""
        if name not in wanted:
            return None
        reset_peak()
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        timings[name] = (time.perf_counter() - wall, time.process_time() - cpu, peak_rss_gib())
        print(f"{name:<16}{timings[name][0]:9.1f}{timings[name][1]:9.1f}{timings[name][2]:10.2f}", flush=True)
        return result

    # the codes as `encode` stores them: every row of the dataset, the test rows among them
    store = tempfile.TemporaryDirectory()
    t0 = time.perf_counter()
    total = N + args.train_rows
    test_rows = np.sort(rng.choice(total, size=N, replace=False))
    source = np.arange(total) % N  # the other rows repeat test rows (the stages never read them)
    source[test_rows] = np.arange(N)
    ids = [str(i) for i in range(total)]
    for name, codes in (("joint", joint), ("per_stream", local)):
        SparseCodes(ids, L, {s: codes.indices[s][source] for s in streams},
                    {s: codes.values[s][source] for s in streams}).save(Path(store.name) / name)
    del source, ids
    digest = {name: codes_digest(codes) for name, codes in (("joint", joint), ("per_stream", local))}
    del joint, local, joint_idx, joint_vals  # the stages hold the codes they read, not these
    size = sum(f.stat().st_size for f in Path(store.name).rglob("codes.npz")) / 2**30
    print(f"{'store codes':<16}{time.perf_counter() - t0:9.1f}{'':>9}{peak_rss_gib():10.2f}   "
          f"({total:,} rows, {size:.2f} GiB on disk)")

    def write_prepared_csv(root: Path) -> None:
        """samples.csv (+ hierarchy.json, meta.json) of ``total`` rows, as `prepare` writes them."""
        root.mkdir()
        hierarchy.save(root / "hierarchy.json")
        (root / "meta.json").write_text('{"dataset": "synthetic", "fingerprint": "-"}')
        words = np.array([f"w{i}" for i in range(2000)])
        split = np.full(total, "train", dtype=object)
        split[test_rows] = "test"
        others = iter(make_labels(rng, hierarchy.labels, args.train_rows))
        test_of = dict(zip(test_rows.tolist(), sample_labels, strict=True))
        with (root / "samples.csv").open("w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["id", "image", "caption", "labels", "split", "image_sha256", "group"])
            for start in range(0, total, 65536):
                stop = min(total, start + 65536)
                caption = words[rng.integers(0, words.size, (stop - start, 40))]
                for i in range(start, stop):
                    labels = test_of[i] if i in test_of else next(others)
                    group = f"{i // 3:016x}"
                    out.writerow([f"{group}_{i % 3}", f"images/{group}.jpg", " ".join(caption[i - start]),
                                  "|".join(labels), split[i], "0" * 64, group])

    if "prepared" in wanted:
        t0 = time.perf_counter()
        write_prepared_csv(Path(store.name) / "prepared")
        size = (Path(store.name) / "prepared" / "samples.csv").stat().st_size / 2**20
        print(f"{'write prepared':<16}{time.perf_counter() - t0:9.1f}{'':>9}{peak_rss_gib():10.2f}   "
              f"(samples.csv {size:.0f} MiB)")
    prepared = run("prepared", lambda: load_prepared(Path(store.name) / "prepared"))
    if prepared is not None:
        assert np.array_equal(prepared.indices("test"), test_rows)

    # what run_evaluate holds for the whole run: the test split's codes (read from the store),
    # their CSR matrices and the label matrix
    space = LabelSpace(hierarchy)

    def load() -> dict:
        meta = SparseCodes.read_meta(Path(store.name) / "joint")
        read = {name: SparseCodes.load(Path(store.name) / name, rows=test_rows, meta=meta)
                for name in ("joint", "per_stream")}
        return {
            "codes": read,
            **{name: {s: code_matrix(c.indices[s], c.values[s], L) for s in streams} for name, c in read.items()},
            "labels": space.matrix(sample_labels),
        }

    csr = run("load", load)
    store.cleanup()
    joint, local = csr["codes"]["joint"], csr["codes"]["per_stream"]
    assert codes_digest(joint) == digest["joint"] and codes_digest(local) == digest["per_stream"], "codes read back differ"
    labels = csr["labels"]
    kinds = {"joint": csr["joint"], "per_stream": csr["per_stream"]}
    run("concepts", lambda: [assign_concepts(c, labels, space, top_n=50, threshold=0.3) for c in kinds.values()])
    run("jaccard", lambda: [hierarchical_jaccard(c, labels, space) for c in kinds.values()])
    run("patterns", lambda: [activation_patterns({s: firing_counts(m) > 0 for s, m in c.items()}) for c in kinds.values()])

    def universality() -> None:
        for codes in kinds.values():
            firing_entropy(np.stack([firing_counts(m) for m in codes.values()]))
            cofire_proportion(*cofire_counts(codes))

    run("universality", universality)

    def reconstruction() -> None:
        from sparc.model.sae import MultiStreamSAE, SAEConfig

        cfg = SAEConfig(dims=dict(zip(streams, args.dims, strict=True)), L=L, k=k)
        model = MultiStreamSAE(cfg).to(args.device)
        with tempfile.TemporaryDirectory() as tmp:
            feats = {}
            for s, d in zip(streams, args.dims, strict=True):
                path = Path(tmp) / f"{s}.npy"
                arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(N, d))
                for start in range(0, N, 16384):
                    stop = min(N, start + 16384)
                    arr[start:stop] = rng.standard_normal((stop - start, d)).astype(np.float16)
                arr.flush()
                del arr
                feats[s] = np.load(path, mmap_mode="r")
            for codes in (joint, local):
                reconstruction_matrix(model, feats, np.arange(N), codes, batch_size=1024, device=args.device)

    run("reconstruction", reconstruction)
    probes = run("probes", lambda: run_probes(
        kinds["joint"], labels, space, min_positives=args.probe_min_positives, n_candidates=20, seed=0,
        max_classes=args.probe_classes or None,
    ))
    if probes is not None:
        n_classes = len({r.label for r in probes})
        print(f"  probes: {n_classes} classes x {len(streams)} streams, "
              f"{timings['probes'][0] / max(n_classes, 1):.2f} s per class")

    def retrieval(rank_counts) -> dict:
        out = {}
        for a, s in enumerate(streams):
            for t in streams[a + 1 :]:
                wall, cpu = time.perf_counter(), time.process_time()
                out[(s, t)] = rank_counts(kinds["per_stream"][s], kinds["per_stream"][t])
                print(f"  pair {s}<->{t}: {time.perf_counter() - wall:.1f} s wall, "
                      f"{time.process_time() - cpu:.1f} s cpu", flush=True)
        return out

    ret = run("retrieval", lambda: retrieval(lambda q, g: pair_rank_counts(q, g, device=args.device)))
    if ret is not None:
        pair = next(iter(ret))
        print(f"  R@1 {retrieval_metrics(*ret[pair][0])['R@1']:.2e} (chance {1 / N:.2e})")
    dense = run("retrieval_dense", lambda: retrieval(lambda q, g: dense_pair_rank_counts(q, g, device=args.device)))
    if ret is not None and dense is not None:
        same = all(
            np.array_equal(ret[p][d][c], dense[p][d][c]) for p in ret for d in (0, 1) for c in (0, 1)
        )
        print(f"  dense vs inverted index: rank counts {'identical' if same else 'DIFFERENT'}; "
              f"{timings['retrieval_dense'][0] / timings['retrieval'][0]:.1f}x the wall time")

    stage = [name for name in EVALUATE_PHASES if name in timings]
    wall = sum(timings[name][0] for name in stage)
    cpu = sum(timings[name][1] for name in stage)
    peak = max(timings[name][2] for name in stage)
    print(f"{'evaluate':<16}{wall:9.1f}{cpu:9.1f}{peak:10.2f}   ({' + '.join(stage)})")
    if not per_phase_peak:
        print("(peak memory: of the whole run so far; this system cannot reset it per phase)")


if __name__ == "__main__":
    main()
