"""The M x M reconstruction matrix: row = source stream (whose code is decoded), column = target.

x^t is the L2-normalised input of stream t (what the SAE reconstructs; the model's own
``normalise_rows``); xhat^(s->t) = ``model.decode(code^s, t)`` (W_dec^t z^s + b_pre^t; for the USAE paper variant's bias-free
dictionary W_dec^t z^s / sqrt(d_t), see sparc.model.sae), with z^s
the code of stream s given by the caller: the joint code (the model's own TopK rule; under
Global TopK its index set was chosen with the target's logits too) or the per-stream code
(stream s encoded alone: leak-free cross reconstruction). The diagonal is self reconstruction, the
rest cross reconstruction. Both NMSE (uncentred, as the training loss) and FVU (centred on the
evaluated split's mean) are reported.
"""

from __future__ import annotations

import numpy as np
import torch

from sparc.evaluate.metrics import ReconstructionErrors
from sparc.model.codes import SparseCodes
from sparc.model.sae import Code, MultiStreamSAE, normalise_rows


def reconstruction_matrix(
    model: MultiStreamSAE,
    features: dict[str, np.ndarray],
    rows: np.ndarray,
    codes: SparseCodes,
    batch_size: int = 1024,
    device: str = "cpu",
) -> dict[tuple[str, str], dict[str, float]]:
    """``{(source, target): {"nmse", "fvu"}}`` over ``rows`` of the feature arrays.

    ``features[s]`` ``[N_all, d_s]`` (memmap is fine), ``rows`` ``[n]`` the evaluated rows,
    ``codes`` the (joint or per-stream) codes of exactly those rows (``len(codes) == n``), ``model`` the SAE.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(codes) != rows.size:
        raise ValueError(f"reconstruction: {len(codes)} code rows for {rows.size} feature rows")
    streams = [s for s in model.streams if s in codes.indices]
    missing = [s for s in model.streams if s not in codes.indices or s not in features]
    if missing:
        raise ValueError(f"reconstruction: stream {missing[0]!r} of the model has no codes or features")
    acc = ReconstructionErrors()
    model.eval()
    with torch.no_grad():
        for start in range(0, rows.size, batch_size):
            sel = rows[start : start + batch_size]
            # float64 inputs and their squared row norms, once per target (add() would redo both per source)
            x = {
                t: normalise_rows(torch.from_numpy(np.asarray(features[t][sel], dtype=np.float32))).numpy().astype(np.float64)
                for t in streams
            }
            x_sq = {t: (x[t] ** 2).sum(axis=1) for t in streams}
            for t in streams:
                acc.add_target(t, x[t])
            for s in streams:
                code = Code(
                    indices=torch.from_numpy(codes.indices[s][start : start + batch_size].astype(np.int64)).to(device),
                    values=torch.from_numpy(codes.values[s][start : start + batch_size].astype(np.float32)).to(device),
                )
                for t in streams:
                    xhat = model.decode(code, t).float().cpu().numpy()
                    acc.add(s, t, xhat, x[t], x_sq[t])
    return acc.result()


def reconstruction_summary(result: dict[tuple[str, str], dict[str, float]]) -> dict:
    """``self_nmse_mean``, ``cross_nmse_mean``, ``self_fvu_mean``, ``cross_fvu_mean`` (means over
    the diagonal / the ordered pairs s != t) and ``nmse`` / ``fvu`` per ``"<s>-><t>"``."""
    self_keys = [k for k in result if k[0] == k[1]]
    cross_keys = [k for k in result if k[0] != k[1]]

    def mean(keys, metric):
        return float(np.mean([result[k][metric] for k in keys])) if keys else None

    return {
        "self_nmse_mean": mean(self_keys, "nmse"),
        "cross_nmse_mean": mean(cross_keys, "nmse"),
        "self_fvu_mean": mean(self_keys, "fvu"),
        "cross_fvu_mean": mean(cross_keys, "fvu"),
        "nmse": {f"{s}->{t}": v["nmse"] for (s, t), v in result.items()},
        "fvu": {f"{s}->{t}": v["fvu"] for (s, t), v in result.items()},
    }
