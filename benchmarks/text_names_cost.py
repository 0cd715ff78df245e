"""Cost of the concepts stage's names from captions (sparc.evaluate.text_names), on synthetic data.

Text names: ``--n`` captions of ``--words`` words each drawn from a Zipf law over ``--vocab``
made-up words (Localized Narratives' captions are about 40 words), codes of ``--k`` latents per
sample among ``--L`` (ids drawn with probability proportional to rank^-0.5, exponential values),
the top ``--top-n`` samples per latent. Phases: the term matrix (CountVectorizer, uni+bigrams,
``concepts.text_vocab`` terms), and the names of one stream's codes (T @ C, the z-scores on its
support, the top terms). The concepts stage runs the second once per kind and stream.

Zero-shot names: ``--zero-shot`` terms embedded alone by MiniLM (the default run's caption model,
installed with its weights), then the pre-activations of a random SAE with ``--L`` latents for
that stream and the argmax per latent.

Prints wall and CPU time (the process, all threads) of each phase, and the support's size.

    python benchmarks/text_names_cost.py                     # the paper's size: N 126,020, L 8192
    python benchmarks/text_names_cost.py --n 20000 --L 2048  # a quicker look
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp


def timed(label: str, fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    print(f"{label:<32} wall {time.perf_counter() - w:7.2f} s   cpu {time.process_time() - c:7.2f} s", flush=True)
    return out


def synthetic_captions(n: int, words: int, vocab: int, rng: np.random.Generator) -> list[str]:
    p = 1.0 / np.arange(1, vocab + 1)
    ids = rng.choice(vocab, size=(n, words), p=p / p.sum())
    names = np.array([f"w{i}x" for i in range(vocab)])
    return [" ".join(row) for row in names[ids]]


def synthetic_codes(n: int, L: int, k: int, rng: np.random.Generator) -> sp.csr_matrix:
    p = np.arange(1, L + 1) ** -0.5
    p /= p.sum()
    cols = np.stack([rng.choice(L, size=k, replace=False, p=p) for _ in range(n)])
    vals = rng.exponential(size=(n, k))
    return sp.csr_matrix((vals.ravel(), cols.ravel(), np.arange(0, n * k + 1, k)), shape=(n, L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=126_020)
    ap.add_argument("--L", type=int, default=8192)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--top-n", type=int, default=50)
    ap.add_argument("--words", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=30_000)
    ap.add_argument("--text-vocab", type=int, default=20_000)
    ap.add_argument("--zero-shot", type=int, default=1000, help="terms embedded for zero-shot names (0 = skip)")
    args = ap.parse_args()

    from sparc.evaluate.metrics import top_activating
    from sparc.evaluate.text_names import caption_terms, text_names, top_indicator, zero_shot_names

    rng = np.random.default_rng(0)
    captions = synthetic_captions(args.n, args.words, args.vocab, rng)
    codes = synthetic_codes(args.n, args.L, args.k, rng)
    print(f"N {args.n}, L {args.L}, k {args.k}, top_n {args.top_n}, {args.words} words a caption")
    terms = timed("term matrix", lambda: caption_terms(captions, args.text_vocab))
    top = timed("top samples (shared with labels)", lambda: top_indicator(top_activating(codes, args.top_n), codes.shape))
    support = (top @ terms.counts).nnz
    print(f"vocabulary {len(terms.terms)}, term entries {terms.counts.nnz}, support of T @ C {support}")
    timed("text names (one stream)", lambda: text_names(top, terms, 3, 3.0))

    if args.zero_shot:
        import torch

        from sparc.features.registry import caption_embedder
        from sparc.model.sae import MultiStreamSAE, SAEConfig

        words = [terms.terms[j] for j in terms.most_frequent(args.zero_shot)]
        embed = timed("MiniLM load", lambda: caption_embedder("minilm:all-MiniLM-L6-v2"))
        feats = timed(f"MiniLM on {len(words)} terms", lambda: embed(words))
        model = MultiStreamSAE(SAEConfig(dims={"txt": feats.shape[1], "img": 8}, L=args.L, k=args.k))

        def names():
            with torch.no_grad():
                h = model.logits({"txt": torch.from_numpy(feats)})["txt"].numpy()
            return zero_shot_names(h, words)

        timed("pre-activations + argmax", names)


if __name__ == "__main__":
    main()
