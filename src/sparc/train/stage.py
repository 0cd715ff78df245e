"""The `train` stage: read the feature store, train the SAE on the train split, write it.

Inputs: the prepared dataset (for the split and the sample order) and one feature stream per
``streams:`` entry. Outputs:

- ``out_dir`` (``data/sae``): the final model (``save_sae``: model.safetensors + config.json),
  written atomically only when training finished; with ``train.init`` training starts from that
  SAE (:func:`initial_model`), and with ``train.epochs: 0`` the imported SAE is the model;
- ``reports_dir`` (``reports/train``): DVCLive's ``metrics.json`` (the last logged training
  averages, ``val/...`` terms over the validation split, ``step``) and ``plots/metrics/**.tsv``,
  published only when training finished; an earlier run's files are removed when training starts
  (see :mod:`sparc.train.live`);
- ``checkpoints_dir/<key>``: checkpoints while training, and ``live/``, the DVCLive directory of
  the run in progress; ``key`` hashes the training spec and the feature streams' metadata (model,
  input, dim, dataset fingerprint), so a run resumes only its own checkpoints. The directory is
  deleted once the final model is written: a finished run is the DVC output itself (and the
  run-cache restores it), so its checkpoints serve no purpose.

Before the first step, everything that would otherwise fail late is checked: the streams match
the prepared dataset, every train and val row of every stream is finite (one sequential scan per
stream, naming the sample id), and the model fits the device's memory
(:func:`sparc.train.memory.check_train_memory`, after the feature rows are loaded).

Several processes (``train.nproc > 1``: ``python -m sparc train`` relaunches itself under
torchrun, :mod:`sparc.distributed`): every process loads the training rows and trains on its
slice of each batch (:mod:`sparc.train.distributed`); rank 0 alone clears and publishes the
reports, logs, writes checkpoints, runs the validation pass and writes the model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from sparc import paths
from sparc.data.prepared import PreparedIndex, load_prepared_index
from sparc.device import rank_device, resolve_device
from sparc.distributed import World, process_group
from sparc.features.store import FeatureStoreError, FeatureStream, load_streams
from sparc.model.sae import MultiStreamSAE
from sparc.params import Params
from sparc.train.checkpoint import checkpoint_key, prune_run
from sparc.train.distributed import DataParallel, Ranks
from sparc.train.live import LiveLogger, clear_reports, publish
from sparc.train.loop import TrainSpec, evaluate_loss, train_sae
from sparc.train.memory import check_train_memory
from sparc.train.sampler import FeatureSource, first_nonfinite_row

# The DVCLive directory of a run in progress, inside its checkpoint directory.
LIVE_DIR = "live"


def check_matches_prepared(streams: dict[str, FeatureStream], prepared: PreparedIndex) -> None:
    """Every stream must hold the prepared dataset's ids in its order and come from that dataset.

    Raises FeatureStoreError naming the stream and the first differing row.
    """
    for name, stream in streams.items():
        if len(stream.ids) != len(prepared.ids):
            raise FeatureStoreError(
                f"stream {name}: {len(stream.ids)} rows, but the prepared dataset has {len(prepared.ids)} "
                "(re-run `dvc repro` to extract features of the current dataset)"
            )
        if stream.ids != prepared.ids:
            row = next(i for i, (a, b) in enumerate(zip(stream.ids, prepared.ids, strict=True)) if a != b)
            raise FeatureStoreError(
                f"stream {name}: row {row} has id {stream.ids[row]!r}, the prepared dataset has {prepared.ids[row]!r}"
            )
        fp = stream.meta.get("dataset_fingerprint")
        if fp is not None and fp != prepared.fingerprint:
            raise FeatureStoreError(
                f"stream {name}: extracted from dataset fingerprint {fp[:12]}..., the prepared dataset is "
                f"{prepared.fingerprint[:12]}... (re-run `dvc repro extract`)"
            )


def check_finite_splits(streams: dict[str, FeatureStream], prepared: PreparedIndex, splits: tuple[str, ...]) -> None:
    """Every row of ``splits`` must be finite in every stream (streams match ``prepared``).

    Raises FeatureStoreError naming the stream, the first bad row's sample id, row and split.
    """
    rows = np.flatnonzero(np.isin(prepared.splits, splits))
    for name, stream in streams.items():
        row = first_nonfinite_row(stream.features, rows)
        if row is not None:
            kind = "NaN" if np.isnan(stream.features[row]).any() else "infinite"
            raise FeatureStoreError(
                f"stream {name}: sample id {prepared.ids[row]!r} (row {row}, {prepared.splits[row]} split) has "
                f"{kind} features; re-extract it (dvc repro extract@{name}) or remove the sample"
            )


def precision_metric(spec: TrainSpec, precision: str) -> dict[str, float]:
    """``{"precision/bf16": 1.0 or 0.0}``, the encoder matmul's format the run chose, unless
    ``train.precision`` is float32 (then params.yaml says it, and metrics.json stays as before)."""
    if spec.train.precision == "float32":
        return {}
    return {"precision/bf16": float(precision == "bf16")}


def initial_model(spec: TrainSpec, dims: dict[str, int]) -> MultiStreamSAE | None:
    """The SAE ``train.init`` names (None when empty), checked against the run: its streams and
    their dims equal ``dims`` (the feature store's), its L, k and TopK rule equal params.yaml's
    (:func:`sparc.model.reference.load_initial`). ValueError naming what differs."""
    from sparc.model.reference import load_initial

    path = spec.train.init
    if not path:
        return None
    model = load_initial(path, list(dims), k=spec.k, topk=spec.topk)
    if sorted(model.cfg.dims.items()) != sorted(dims.items()):
        raise ValueError(f"train.init: {path} has streams {model.cfg.dims}, the feature store {dims}")
    ours = {"L": spec.L, "k": spec.k, "topk": spec.topk}
    theirs = {"L": model.cfg.L, "k": model.cfg.k, "topk": model.cfg.topk}
    wrong = [f"{key}: {theirs[key]!r} (params.yaml: {ours[key]!r})" for key in ours if ours[key] != theirs[key]]
    if wrong:
        raise ValueError(f"train.init: {path} has {', '.join(wrong)}; set params.yaml to the checkpoint's values")
    return model


def run_key(spec: TrainSpec, streams: dict[str, FeatureStream], rows: np.ndarray,
            init: MultiStreamSAE | None = None) -> str:
    """Checkpoint key: hash of the training spec, each stream's metadata, the training rows and
    the initial weights (``train.init``)."""
    payload = {
        "spec": spec.key_payload(),
        "streams": {name: dict(s.meta, n=len(s)) for name, s in streams.items()},
        "rows": hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest(),
    }
    if init is not None:
        digest = hashlib.sha256()
        for name, tensor in sorted(init.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().float().contiguous().numpy().tobytes())
        payload["init"] = digest.hexdigest()
    return checkpoint_key(payload)


def run_train(
    params: Params,
    *,
    features_root: str | Path | None = None,
    prepared_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    reports_dir: str | Path | None = None,
    checkpoints_dir: str | Path | None = None,
    max_steps: int | None = None,
    progress: bool = True,
) -> Path:
    """Stage entry point. Returns ``out_dir`` when training finished; when ``max_steps`` stopped it
    early, returns the checkpoint written there (a later call resumes from it) and writes neither
    model nor reports.

    Training rows are the prepared dataset's train split; the final ``val/...`` metrics are the
    training objective's terms on the val split. ``train.cpu_threads > 0`` sets PyTorch's CPU
    thread count for the duration of the call (restored afterwards).
    """
    from sparc.model.io import save_sae

    dataset = params.data.dataset
    features_root = Path(features_root) if features_root is not None else paths.features_root(dataset)
    prepared_dir = Path(prepared_dir) if prepared_dir is not None else paths.prepared_dir(dataset)
    out_dir = Path(out_dir) if out_dir is not None else paths.sae_dir()
    reports_dir = Path(reports_dir) if reports_dir is not None else paths.train_reports_dir()
    checkpoints_dir = Path(checkpoints_dir) if checkpoints_dir is not None else paths.checkpoints_dir()

    spec = TrainSpec.from_params(params)
    spec.check()
    prepared = load_prepared_index(prepared_dir)  # ids and splits: captions and labels are not needed
    train_rows, val_rows = prepared.indices("train"), prepared.indices("val")
    if len(train_rows) == 0:
        raise ValueError(f"{prepared_dir}: the train split is empty")
    streams = load_streams(features_root, params.stream_names, check_finite=False)  # rows checked below
    check_matches_prepared(streams, prepared)
    check_finite_splits(streams, prepared, ("train", "val"))
    world = World.from_env()  # several processes under torchrun (train.nproc): sparc.train.distributed
    device = rank_device(resolve_device(spec.train.device, "train.device"), world)
    arrays = {name: s.features for name, s in streams.items()}
    budget = spec.train.ram_budget_mb * 2**20
    source = FeatureSource(arrays, train_rows, ram_budget_bytes=budget, device=device, check_finite=False)
    t = spec.train
    check_train_memory(source.dims, spec.L, spec.k, t.k_aux, t.batch_size, device,
                       bf16=t.precision != "float32")
    init = initial_model(spec, dict(source.dims))
    run_dir = checkpoints_dir / run_key(spec, streams, train_rows, init)

    threads = torch.get_num_threads()
    if spec.train.cpu_threads > 0:
        torch.set_num_threads(spec.train.cpu_threads)
    if world.main:  # rank 0 alone logs, validates and writes outputs
        clear_reports(reports_dir)
    logger = LiveLogger(run_dir / LIVE_DIR) if world.main else None
    try:
        with process_group(world, device):
            ranks = DataParallel(world) if world.size > 1 else Ranks()
            result = train_sae(source, spec, checkpoint_dir=run_dir, logger=logger, max_steps=max_steps,
                               progress=progress, ranks=ranks, init=init)
        if logger is not None and result.finished and len(val_rows):
            val = FeatureSource(arrays, val_rows, ram_budget_bytes=budget, device=device, check_finite=False)
            metrics = evaluate_loss(result.model, val, spec, batch_size=spec.train.batch_size)
            logger.log(result.step, {f"val/{k}": v for k, v in metrics.items()} | precision_metric(spec, result.precision))
        elif logger is not None and result.step == 0:  # import only, no val split: metrics.json has the step
            logger.log(0, {})
    finally:
        if logger is not None:
            logger.close()
        torch.set_num_threads(threads)
    if not result.finished:
        assert result.checkpoint is not None
        return result.checkpoint
    if not world.main:
        return out_dir
    save_sae(result.model, out_dir)
    publish(run_dir / LIVE_DIR, reports_dir)
    prune_run(run_dir)
    return out_dir
