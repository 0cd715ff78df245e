"""The SPARC reference code's checkpoints (AtlasAnalyticsLab/SPARC, commit 7f36faa) in and out.

The reference saves ``msae_checkpoint.pth`` = ``torch.save(model.state_dict())`` of its
``MultiStreamSparseAutoencoder`` (sparc/model/model_global.py for Global TopK, model_local.py
for Local TopK), and ``run_config.json`` beside it (``{"args": vars(args), "config_file_content":
...}``; ``args`` holds ``topk_type``, ``n_latents``, ``k``, ``auxk``, ``use_sparse_decoder``,
``dead_steps_threshold``, ``auxk_threshold``). Per stream ``s`` its state dict holds

====================================  ===========  ==========================================
reference key                         shape        this project (:class:`MultiStreamSAE`)
====================================  ===========  ==========================================
``encoders.<s>.weight``               ``[L, d]``   ``W_enc.<s>`` (same layout)
``decoders.<s>.weight``               ``[d, L]``   ``W_dec.<s>`` = its transpose ``[L, d]``
``pre_biases.<s>``                    ``[d]``      ``b_pre.<s>``
``latent_biases.<s>``                 ``[L]``      ``b_lat.<s>``
``stats_last_nonzero_<s>`` (buffer)   ``[L]``      not kept (dead-latent counters; see below)
====================================  ===========  ==========================================

What the imported model reproduces exactly (up to float32 rounding of the matmuls): the
reference's forward on unit-norm rows (its ``HDF5FeatureDataset`` divides each row by
``||x|| + 1e-8`` before the model; this project divides by ``max(||x||, 1e-8)`` inside the model,
a relative difference below 1e-7): logits ``h^s = W_enc^s (x^s - b_pre^s) + b_lat^s`` (pre-bias
subtracted before the encoder, latent bias added after it), Global TopK's index set = top-k of
the sum of the raw logits, Local TopK's = each stream's own top-k, ReLU *after* the selection,
decoding ``W_dec^t z + b_pre^t`` with the decoder exactly as saved (its columns are not
renormalised on import; the reference keeps them unit-norm up to its ``+1e-8``), and cross
decoding through the target's decoder and pre-bias. Not reproduced: the reference sums the
streams' logits in the iteration order of a Python ``set`` (it varies between runs), this
project in stream order, so samples whose k-th and (k+1)-th summed logits tie to the last bit may
pick another latent; the dead-latent counters (``stats_last_nonzero_<s>``) are dropped, since
this project counts only training steps and fires at > 0 instead of > 1e-3 (README "Differences
from the reference code"): training from an imported model starts with fresh counters and fresh
Adam moments; ``use_sparse_decoder`` (a Triton kernel of the same product) is irrelevant.

Loading uses ``torch.load(weights_only=True)`` only: a checkpoint that needs anything but
tensors and plain containers (a pickle that would run code) is refused.
"""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import torch

from sparc.model.sae import MultiStreamSAE, SAEConfig

CHECKPOINT = "msae_checkpoint.pth"
RUN_CONFIG = "run_config.json"
# The reference's model defaults (main.py), written by export for its `--only_eval` loader.
REFERENCE_DEFAULTS = {"use_sparse_decoder": False, "dead_steps_threshold": 1000, "auxk_threshold": 1e-3}
PREFIXES = ("encoders.", "decoders.", "pre_biases.", "latent_biases.", "stats_last_nonzero_")


class ReferenceCheckpointError(ValueError):
    """A reference checkpoint cannot be read or does not fit; the message names file and keys."""


def checkpoint_files(path: str | Path) -> tuple[Path, Path | None]:
    """``(msae_checkpoint.pth, run_config.json or None)`` for ``path``: the .pth file or the
    directory holding it; the run config is looked for beside the checkpoint."""
    path = Path(path).expanduser()
    pth = path / CHECKPOINT if path.is_dir() else path
    if not pth.is_file():
        raise ReferenceCheckpointError(f"{pth}: reference checkpoint not found")
    config = pth.parent / RUN_CONFIG
    return pth, config if config.is_file() else None


def read_state_dict(pth: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``pth``, loaded with ``torch.load(weights_only=True)`` on the CPU.

    ReferenceCheckpointError when the file is not a state dict of tensors, including any pickle
    that would construct other objects (such a file is never executed)."""
    try:
        state = torch.load(pth, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        # torch's first line suggests weights_only=False (which would run the pickle): name the cause instead
        why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
        raise ReferenceCheckpointError(
            f"{pth}: refused: not a plain state dict of tensors, never unpickled with code "
            f"(torch.load weights_only=True: {why.strip() or type(err).__name__})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ReferenceCheckpointError(f"{pth}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


def read_run_config(path: Path | None) -> dict:
    """``args`` of the reference's ``run_config.json`` ({} without the file)."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReferenceCheckpointError(f"{path}: not JSON ({err})") from None
    args = data.get("args", {}) if isinstance(data, dict) else None
    if not isinstance(args, dict):
        raise ReferenceCheckpointError(f"{path}: expected an object with an 'args' object (the reference's run_config.json)")
    return args


def streams_of(state: dict[str, torch.Tensor]) -> list[str]:
    """Stream names of a reference state dict, in its order (from ``encoders.<s>.weight``)."""
    return [key[len("encoders."):-len(".weight")] for key in state if key.startswith("encoders.") and key.endswith(".weight")]


def convert_state_dict(
    state: dict[str, torch.Tensor], streams: list[str] | None = None, source: str = "checkpoint"
) -> tuple[dict[str, int], int, dict[str, torch.Tensor]]:
    """Reference state dict -> ``(dims, L, this project's state dict)`` for ``streams`` (default:
    the checkpoint's, in its order). ReferenceCheckpointError naming the keys that do not fit:
    missing or unexpected ones, and shapes that disagree (``source`` names the file)."""
    found = streams_of(state)
    streams = list(streams) if streams is not None else found
    if sorted(streams) != sorted(found):
        raise ReferenceCheckpointError(
            f"{source}: the checkpoint's streams {found} are not the streams {streams} (stream names must match)"
        )
    expected = {f"{p}{s}{'.weight' if p in ('encoders.', 'decoders.') else ''}" for p in PREFIXES for s in streams}
    unknown = sorted(set(state) - expected)
    missing = sorted(expected - set(state) - {f"stats_last_nonzero_{s}" for s in streams})
    if unknown or missing:
        raise ReferenceCheckpointError(f"{source}: keys that do not fit: unexpected {unknown}, missing {missing}")
    L = int(state[f"encoders.{streams[0]}.weight"].shape[0])
    dims: dict[str, int] = {}
    out: dict[str, torch.Tensor] = {}
    for s in streams:
        enc = state[f"encoders.{s}.weight"]
        d = int(enc.shape[1]) if enc.dim() == 2 else -1
        shapes = {f"encoders.{s}.weight": (L, d), f"decoders.{s}.weight": (d, L), f"pre_biases.{s}": (d,),
                  f"latent_biases.{s}": (L,)}
        wrong = [f"{k} {tuple(state[k].shape)} (expected {v})" for k, v in shapes.items() if tuple(state[k].shape) != v]
        if wrong:
            raise ReferenceCheckpointError(f"{source}: keys that do not fit: {', '.join(wrong)}")
        dims[s] = d
        out[f"b_pre.{s}"] = state[f"pre_biases.{s}"].float()
        out[f"W_enc.{s}"] = enc.float()
        out[f"b_lat.{s}"] = state[f"latent_biases.{s}"].float()
        out[f"W_dec.{s}"] = state[f"decoders.{s}.weight"].float().t().contiguous()
    return dims, L, out


def load_reference(
    path: str | Path, streams: list[str] | None = None, *, k: int | None = None, topk: str | None = None
) -> MultiStreamSAE:
    """A :class:`MultiStreamSAE` from the reference's ``msae_checkpoint.pth`` (``path``: the file
    or its directory). ``k`` and the TopK rule come from ``run_config.json`` beside it
    (``args.k``, ``args.topk_type``); ``k``/``topk`` given here must agree with it, and are needed
    without it. ``streams``: this project's stream order (names must equal the checkpoint's)."""
    pth, config = checkpoint_files(path)
    state = read_state_dict(pth)
    dims, L, converted = convert_state_dict(state, streams, str(pth))
    args = read_run_config(config)
    rule = {"k": args.get("k"), "topk": args.get("topk_type")}
    for name, given in (("k", k), ("topk", topk)):
        if rule[name] is None:
            rule[name] = given
        elif given is not None and given != rule[name]:
            raise ReferenceCheckpointError(f"{config}: {name} is {rule[name]!r}, not {given!r}")
        if rule[name] is None:
            raise ReferenceCheckpointError(f"{pth}: no {RUN_CONFIG} beside it, so {name} must be given")
    cfg = SAEConfig(dims=dims, L=L, k=int(rule["k"]), topk=rule["topk"], k_aux=min(int(args.get("auxk") or 64), L))
    model = MultiStreamSAE(cfg)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def reference_state_dict(model: MultiStreamSAE) -> OrderedDict[str, torch.Tensor]:
    """This project's model as the reference's state dict, in the order its ``state_dict()`` has
    (the counter buffers first, as zeros: a fresh model's). ValueError for the batchnorm encoder
    (``method: usae_paper``), which the reference has no class for."""
    if model.batchnorm:
        raise ValueError("export --reference: the batchnorm encoder (method usae_paper) has no reference model class")
    cpu = {name: t.detach().to("cpu", torch.float32) for name, t in model.state_dict().items()}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for s in model.streams:
        out[f"stats_last_nonzero_{s}"] = torch.zeros(model.cfg.L, dtype=torch.long)
    for s in model.streams:
        out[f"encoders.{s}.weight"] = cpu[f"W_enc.{s}"].clone()
    for s in model.streams:
        out[f"decoders.{s}.weight"] = cpu[f"W_dec.{s}"].t().contiguous()
    for s in model.streams:
        out[f"pre_biases.{s}"] = cpu[f"b_pre.{s}"].clone()
    for s in model.streams:
        out[f"latent_biases.{s}"] = cpu[f"b_lat.{s}"].clone()
    return out


def export_reference(model: MultiStreamSAE, out_dir: str | Path) -> Path:
    """Write ``msae_checkpoint.pth`` and ``run_config.json`` as the reference's ``main.py`` does,
    so its ``--only_eval`` loader and notebooks read them (``args``: ``topk_type``,
    ``n_latents``, ``k``, ``auxk`` and :data:`REFERENCE_DEFAULTS`; ``config_file_content`` holds
    the stream dims). Returns ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = reference_state_dict(model)
    cfg = model.cfg
    args = {"topk_type": cfg.topk, "n_latents": cfg.L, "k": cfg.k, "auxk": cfg.k_aux, **REFERENCE_DEFAULTS}
    torch.save(state, out_dir / CHECKPOINT)
    run_config = {"args": args, "config_file_content": {"streams": dict(cfg.dims)}}
    (out_dir / RUN_CONFIG).write_text(json.dumps(run_config, indent=4) + "\n", encoding="utf-8")
    return out_dir


def load_initial(path: str | Path, streams: list[str], *, k: int, topk: str) -> MultiStreamSAE:
    """The SAE ``train.init`` names: a folder of this project's (``data/sae``: ``config.json`` +
    ``model.safetensors``, :func:`~sparc.model.io.load_sae`), or the reference's checkpoint
    (:func:`load_reference`, with ``k``/``topk`` where it has no ``run_config.json``)."""
    from sparc.model.files import CONFIG_FILE, WEIGHTS_FILE
    from sparc.model.io import load_sae

    folder = Path(path).expanduser()
    if folder.is_dir() and (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return load_sae(folder)
    return load_reference(folder, streams, k=k, topk=topk)
