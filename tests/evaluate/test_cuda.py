"""Evaluation on the device (``evaluate.device``) against the CPU: the encode stage's codes, the
reconstruction errors and retrieval's dense path (see tests/device.py for ``SPARC_TEST_DEVICE``).

Tolerances. Encoder logits are float32 matmuls in another order (cuBLAS instead of oneDNN):
relative ~1e-6, so code values agree within ``rtol = 1e-5`` and the top-k index sets are equal
wherever the k-th and (k+1)-th selection scores are more than 1e-4 apart (the rows where float32
rounding cannot change the choice). Retrieval rank counts must be equal: the scores are exact
integers on every device (sparc.evaluate.retrieval's docstring), on dyadic codes with many ties
and on generic values alike.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sparc.evaluate import retrieval as r
from sparc.evaluate.metrics import code_matrix
from sparc.evaluate.reconstruction import reconstruction_matrix
from sparc.evaluate.run_files import evaluate_device
from sparc.model.codes import SparseCodes
from sparc.model.io import encode_dataset
from sparc.model.sae import MultiStreamSAE, SAEConfig
from sparc.params import params_from_dict
from tests.device import DEVICE, cpu_path, device_path, needs_device
from tests.evaluate.test_retrieval import assert_counts_equal, hard_pair

pytestmark = [needs_device, pytest.mark.kernels, pytest.mark.filterwarnings("error::RuntimeWarning")]

CFG = SAEConfig(dims={"a": 24, "b": 16, "c": 12}, L=64, k=4)
N = 300


def selection_gaps(model: MultiStreamSAE, features: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """Per stream ``[N]``: the gap between the k-th and (k+1)-th score of the selection (the
    summed logits of all streams for ``global``, the stream's own for ``local``), on the CPU."""
    with torch.no_grad():
        h = model.logits({s: torch.from_numpy(np.asarray(x, dtype=np.float32)) for s, x in features.items()})
    k = model.cfg.k
    scores = {s: sum(h.values()) for s in h} if mode == "global" else h
    out = {}
    for s, v in scores.items():
        top = v.topk(k + 1, dim=1).values
        out[s] = (top[:, k - 1] - top[:, k]).numpy()
    return out


def by_latent(codes: SparseCodes, s: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of each row sorted by latent id (top-k order may differ between ties)."""
    order = np.argsort(codes.indices[s], axis=1)
    return np.take_along_axis(codes.indices[s], order, 1), np.take_along_axis(codes.values[s], order, 1)


@pytest.mark.parametrize("mode", ["global", "local"])
def test_encode_on_device_matches_cpu(mode: str, raw: dict) -> None:
    raw["evaluate"]["device"] = str(DEVICE)
    assert evaluate_device(params_from_dict(raw), None) == str(DEVICE)  # the stage encodes there
    rng = np.random.default_rng(0)
    features = {s: rng.standard_normal((N, d)).astype(np.float16) for s, d in CFG.dims.items()}  # cast as the store's
    ids = [f"s{i}" for i in range(N)]
    model = MultiStreamSAE(CFG, seed=3).eval()
    with cpu_path():
        want = encode_dataset(model, features, ids, mode, batch_size=128, device="cpu", progress=False)
    with device_path():
        got = encode_dataset(model, features, ids, mode, batch_size=128, device=str(DEVICE), progress=False)
    assert next(model.parameters()).device.type == "cpu"  # the stage's model is copied, not moved
    gaps = selection_gaps(model, features, mode)
    for s in CFG.dims:
        clear = gaps[s] > 1e-4
        assert clear.mean() > 0.9  # the comparison covers most rows
        got_i, got_v = by_latent(got, s)
        want_i, want_v = by_latent(want, s)
        np.testing.assert_array_equal(got_i[clear], want_i[clear])
        np.testing.assert_allclose(got_v[clear], want_v[clear], rtol=1e-5, atol=1e-6)
        assert got.indices[s].dtype == np.int32 and got.values[s].dtype == np.float32
    if mode == "global":  # one index set for every stream, on the device too
        assert all(np.array_equal(got.indices[s], got.indices["a"]) for s in CFG.dims)


def test_reconstruction_on_device_matches_cpu() -> None:
    """The evaluate stage's reconstruction errors with the SAE on ``evaluate.device`` (sparse
    decodes there, float64 errors on the host): the CPU's within float32 rounding."""
    rng = np.random.default_rng(1)
    features = {s: rng.standard_normal((N, d)).astype(np.float32) for s, d in CFG.dims.items()}
    model = MultiStreamSAE(CFG, seed=3).eval()
    rows = np.arange(10, N)
    codes = encode_dataset(model, {s: x[rows] for s, x in features.items()}, [str(i) for i in rows], "global",
                           progress=False)
    with cpu_path():
        want = reconstruction_matrix(model, features, rows, codes, batch_size=128)
    with device_path():
        got = reconstruction_matrix(copy.deepcopy(model).to(DEVICE), features, rows, codes, batch_size=128,
                                    device=str(DEVICE))
    assert got.keys() == want.keys() and len(got) == len(CFG.dims) ** 2
    for pair, metrics in want.items():
        assert got[pair] == pytest.approx(metrics, rel=1e-5), pair


def dyadic_pair(seed: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Binary codes of 1, 4 or 16 active latents (L 24): unit rows hold 1, 1/2 or 1/4, so every
    score is a short dyadic sum, exact in any order; most scores tie (overlaps of 0-4 latents)."""
    rng = np.random.default_rng(seed)
    L = 24

    def codes() -> tuple[np.ndarray, np.ndarray]:
        sizes = rng.choice([1, 4, 16], size=80, p=[0.1, 0.7, 0.2])
        idx = np.stack([rng.permutation(L)[:16] for _ in sizes])
        val = (np.arange(16)[None, :] < sizes[:, None]).astype(np.float32)
        return idx, val

    (q_idx, q_val), (g_idx, g_val) = codes(), codes()
    g_idx[5], g_val[5] = q_idx[5], q_val[5]  # an answer equal to its query
    return code_matrix(q_idx, q_val, L), code_matrix(g_idx, g_val, L)


@pytest.mark.parametrize("case", ["hard-1", "hard-3", "dyadic-0", "dyadic-1", "features"])
def test_dense_retrieval_on_device_equals_cpu_counts(case: str, monkeypatch) -> None:
    """``dense_pair_rank_counts`` on the device (what ``pair_rank_counts`` runs for codes off the
    CPU) gives the CPU's counts: codes against the inverted index, raw features against the CPU
    dense path. Blocks of 16 queries, so the diagonal and the counts span several blocks."""
    kind, _, seed = case.partition("-")
    if kind == "hard":
        q, g = hard_pair(int(seed))  # odd seeds: generic values with structural ties
    elif kind == "dyadic":
        q, g = dyadic_pair(int(seed))
    else:
        rng = np.random.default_rng(0)
        q, g = rng.standard_normal((80, 12)).astype(np.float32), rng.standard_normal((80, 12)).astype(np.float32)
    want = r.pair_rank_counts(q, g, device="cpu")
    if DEVICE.type == "cpu":  # run the accelerators' counting (torch reductions) on the CPU
        real = r._block_counts
        monkeypatch.setattr(r, "_block_counts", lambda st, diag, rows, on_cpu: real(st, diag, rows, False))
    got = r.dense_pair_rank_counts(q, g, device=str(DEVICE), block_bytes=8 * 80 * 16)
    assert_counts_equal(got, want)
    if kind != "features":
        assert (want[0][1] > 0).any()  # the case has ties to get right
