"""The `encode` stage: the sparse codes of every prepared row, two kinds side by side.

Reads ``data/sae/`` (the trained SAE), ``data/features/<dataset>/`` and
``data/prepared/<dataset>/``; computes the two kinds of sparse codes that are evaluated side by
side:

* ``joint``: every stream encoded together with the model's own inference rule (Global TopK for
  ``topk: global``, each stream its own top-k for ``topk: local`` and for USAE, which params.py
  requires to be ``topk: local``). The paper's protocol for concepts, Jaccard, patterns and
  probes. Under Global TopK all streams share one index set per sample, so joint alignment
  metrics are close to perfect by construction, and the joint code of a source stream was chosen
  with the target stream's logits too (its cross reconstruction knows the target).
* ``per_stream``: each stream encoded alone (its own top-k), as a user with one modality would;
  the like-for-like way to compare TopK rules, and the leak-free cross reconstruction. Retrieval
  always uses these (the shared indices would leak the answer).

and writes ``data/codes/``::

    joint/codes.npz, joint/codes.json            SparseCodes of every prepared row, joint
    per_stream/codes.npz, per_stream/codes.json  ... per-stream inference
    meta.json     model_sha256 (of model.safetensors), dataset, dataset_fingerprint, ids_sha256,
                  n, L, k, streams, joint_mode (the rule of the joint codes)

encode refuses a model whose streams, L, k or topk differ from params.yaml, and features that do
not match the prepared ids (the checks of :mod:`sparc.evaluate.run_files`).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from sparc import paths
from sparc.data.prepared import load_prepared_index
from sparc.evaluate.run_files import (
    CODES_META,
    EvaluateInputError,
    evaluate_device,
    fresh_tmp,
    ids_sha256,
    load_features,
    load_model,
    model_sha256,
    replace_dir,
    write_json,
)
from sparc.params import Params, check_evaluate

# errno values of a write refused for want of room: disk full, file-size limit (`ulimit -f`), quota.
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)



def run_encode(
    params: Params,
    *,
    sae_dir: str | Path | None = None,
    features_root: str | Path | None = None,
    prepared_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Path:
    """The `encode` stage: joint and per-stream sparse codes of every prepared row (see module
    docstring). Writes ``out_dir`` (default ``data/codes``) atomically and returns it."""
    from sparc.model.io import encode_dataset

    check_evaluate(params.evaluate)
    dataset = params.data.dataset
    sae_dir = Path(sae_dir or paths.sae_dir())
    features_root = Path(features_root or paths.features_root(dataset))
    prepared = load_prepared_index(prepared_dir or paths.prepared_dir(dataset))
    out_dir = Path(out_dir or paths.codes_dir())
    dev = evaluate_device(params, device)

    model_hash = model_sha256(sae_dir)
    model = load_model(params, sae_dir, dev)
    streams = load_features(params, features_root, prepared)
    for s, fs in streams.items():
        if fs.dim != model.cfg.dims[s]:
            raise EvaluateInputError(f"stream {s}: features have dim {fs.dim}, the SAE expects {model.cfg.dims[s]}")
    features = {s: fs.features for s, fs in streams.items()}
    joint_mode = model.cfg.topk
    tmp = fresh_tmp(out_dir)
    try:
        for kind, mode in (("joint", joint_mode), ("per_stream", "local")):
            codes = encode_dataset(
                model, features, prepared.ids, mode=mode, batch_size=params.evaluate.batch_size,
                device=dev, progress=progress,
            )
            codes.save(tmp / kind)
            del codes  # one kind's codes in memory at a time (2.8 GB each at the paper's 1.8M rows)
        meta = {
            "model_sha256": model_hash,
            "dataset": prepared.meta.get("dataset"),
            "dataset_fingerprint": prepared.fingerprint,
            "ids_sha256": ids_sha256(prepared.ids),
            "n": len(prepared.ids),
            "L": model.cfg.L,
            "k": model.cfg.k,
            "streams": list(model.streams),
            "joint_mode": joint_mode,
        }
        write_json(tmp / CODES_META, meta)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left next to the old codes
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            raise EvaluateInputError(
                f"{tmp}: no room to write the codes ({err.strerror}): they need about "
                f"{_codes_bytes(len(prepared.ids), model.cfg.k, len(model.streams)) / 2**20:.1f} MiB "
                f"there; free disk space (or raise the file-size limit, `ulimit -f`) and run "
                f"`dvc repro encode` again ({out_dir} is unchanged)"
            ) from None
        raise
    replace_dir(tmp, out_dir)
    return out_dir


def _codes_bytes(n: int, k: int, n_streams: int) -> int:
    """Bytes ``encode`` writes: two kinds of codes x ``n_streams`` x ``n`` rows x ``k`` latents x
    (int32 index + float32 value), plus two copies of the ids (about 16 bytes each)."""
    return 2 * n_streams * n * k * 8 + 2 * 16 * n
