"""Time and peak memory of the evaluation metrics at the paper's scale, on synthetic codes.

Default sizes: N = 126,020 test samples, L = 8192, k = 64, 3 streams (dims 1024/768/768 for the
reconstruction phase), 600 labels in a depth-5 hierarchy with 1-6 labels per sample.

Synthetic data: latent ids per sample are drawn without replacement with probability proportional
to rank^-0.5 (a few frequent latents, a long tail), independently for the joint index set and for
each stream's per-stream codes; activations are exponential, and 10% of each stream's joint
entries are set to 0 (ReLU cuts). Labels follow a Zipf law over the 600 labels. The codes carry no
signal: time and memory depend on sizes and latent frequencies, not on what the codes mean.

Phases run one after the other in this process, each through the same functions the `evaluate`
stage calls. After each phase the script prints its wall time and the process's peak resident
memory so far (``ru_maxrss``, which never decreases: the last line is the peak of the whole run,
data generation included).

    python benchmarks/evaluate_memory.py --probe-classes 600  # paper scale: about 30 min on 2 CPU cores
    python benchmarks/evaluate_memory.py --n 20000 --probe-classes 20   # a quicker look
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparc.data.hierarchy import Hierarchy
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
from sparc.evaluate.retrieval import pair_rank_counts
from sparc.model.codes import SparseCodes


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def draw_indices(n: int, L: int, k: int, gen: torch.Generator, chunk: int = 2048) -> np.ndarray:
    """``[n, k]`` int32 distinct latent ids per row, P(latent) ~ rank^-0.5 (Gumbel top-k)."""
    logp = torch.log(torch.arange(1, L + 1, dtype=torch.float32) ** -0.5)
    perm = torch.randperm(L, generator=gen)  # frequent latents spread over the index range
    out = np.empty((n, k), dtype=np.int32)
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        u = torch.rand(b, L, generator=gen).clamp_min_(1e-20)
        keys = logp - torch.log(-torch.log(u))
        out[start : start + b] = perm[keys.topk(k, dim=1).indices].numpy()
    return out


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
    ap.add_argument("--L", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 768, 768])
    ap.add_argument("--probe-classes", type=int, default=50, help="probe only the first classes (time is per class)")
    ap.add_argument("--skip", nargs="*", default=[], help="phases to leave out (e.g. retrieval reconstruction)")
    ap.add_argument("--device", default="cpu", help="device for retrieval and reconstruction")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    streams = [f"s{i}" for i in range(len(args.dims))]
    N, L, k = args.n, args.L, args.k
    print(f"N={N} L={L} k={k} streams={len(streams)} dims={args.dims} device={args.device} "
          f"torch threads={torch.get_num_threads()}")

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    joint_idx = draw_indices(N, L, k, gen)
    joint_vals = {}
    for s in streams:
        v = rng.exponential(size=(N, k)).astype(np.float32)
        v[rng.random((N, k)) < 0.1] = 0.0
        joint_vals[s] = v
    joint = SparseCodes([str(i) for i in range(N)], L, {s: joint_idx for s in streams}, joint_vals)
    local = SparseCodes(
        joint.ids, L,
        {s: draw_indices(N, L, k, gen) for s in streams},
        {s: rng.exponential(size=(N, k)).astype(np.float32) for s in streams},
    )
    hierarchy = make_hierarchy(rng, [10, 40, 100, 200, 250])
    sample_labels = make_labels(rng, hierarchy.labels, N)
    print(f"{'generate':<16}{time.perf_counter() - t0:9.1f} s   peak RSS {peak_rss_gib():6.2f} GiB")

    timings: dict[str, float] = {}

    def run(name: str, fn):
        """Run one phase unless skipped; print its time and the peak RSS so far."""
        if name in args.skip:
            return None
        start = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - start
        print(f"{name:<16}{timings[name]:9.1f} s   peak RSS {peak_rss_gib():6.2f} GiB", flush=True)
        return result

    # what run_evaluate holds for the whole run: CSR codes of the split and the label matrix
    space = LabelSpace(hierarchy)
    joint_t, local_t, labels = run("load", lambda: (
        {s: code_matrix(joint.indices[s], joint.values[s], L) for s in streams},
        {s: code_matrix(local.indices[s], local.values[s], L) for s in streams},
        space.matrix(sample_labels),
    ))
    run("concepts", lambda: assign_concepts(joint_t, labels, space, top_n=50, threshold=0.3))
    run("jaccard", lambda: hierarchical_jaccard(joint_t, labels, space))
    run("patterns", lambda: activation_patterns({s: firing_counts(m) > 0 for s, m in joint_t.items()}))

    def universality() -> None:
        for codes in (joint_t, local_t):
            firing_entropy(np.stack([firing_counts(m) for m in codes.values()]))
            cofire_proportion(*cofire_counts(codes))

    run("universality", universality)
    probes = run("probes", lambda: run_probes(
        joint_t, labels, space, min_positives=50, n_candidates=20, seed=0, max_classes=args.probe_classes,
    ))
    if probes is not None:
        n_classes = len({r.label for r in probes})
        print(f"  probes: {n_classes} classes x {len(streams)} streams, "
              f"{timings['probes'] / max(n_classes, 1):.2f} s per class")

    def retrieval() -> dict:
        out = {}
        for a, s in enumerate(streams):
            for t in streams[a + 1 :]:
                start = time.perf_counter()
                fwd, rev = pair_rank_counts(local_t[s], local_t[t], device=args.device)
                out[f"{s}->{t}"] = retrieval_metrics(*fwd)
                out[f"{t}->{s}"] = retrieval_metrics(*rev)
                print(f"  pair {s}<->{t}: {time.perf_counter() - start:.1f} s", flush=True)
        return out

    ret = run("retrieval", retrieval)
    if ret is not None:
        print(f"  R@1 {ret['s0->s1']['R@1']:.2e} (chance {1 / N:.2e})")

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
            reconstruction_matrix(model, feats, np.arange(N), joint, batch_size=1024, device=args.device)

    run("reconstruction", reconstruction)
    print(f"total {sum(timings.values()):.1f} s (without generation); peak RSS {peak_rss_gib():.2f} GiB")


if __name__ == "__main__":
    main()
