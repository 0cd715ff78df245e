"""Training checkpoints: written atomically, found again by a key over everything that shapes training.

Layout of one run's directory ``<checkpoints_dir>/<key>/``::

    step-00000500/
        model.safetensors     model.state_dict()
        trainer.safetensors   optimizer state (``optim/<param name>/<state key>``), dead-latent
                              counters, log accumulators
        state.json            step, epoch, dims, key payload, logged metric history, ...

A checkpoint is written to ``step-<step, 8 digits>.tmp`` and renamed when complete; older step directories
are deleted only after the rename, so a crash at any moment leaves at least one complete
checkpoint. :func:`latest_checkpoint` ignores ``.tmp`` directories.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
TMP_SUFFIX = ".tmp"


def checkpoint_key(payload: dict) -> str:
    """First 16 hex digits of the SHA-256 of ``payload`` as canonical JSON (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint read back: tensor files by name (without ``.safetensors``) and the JSON state."""

    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if not run_dir.is_dir():
        return out
    for p in run_dir.iterdir():
        name = p.name
        if p.is_dir() and name.startswith(PREFIX) and not name.endswith(TMP_SUFFIX):
            try:
                out.append((int(name[len(PREFIX) :]), p))
            except ValueError:
                continue
    return sorted(out)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict,
) -> Path:
    """Write ``tensors`` (file name -> name -> tensor) and ``state`` (JSON) as step ``step``.

    Atomic: written to a ``.tmp`` directory and renamed; then older checkpoints are removed.
    Returns the checkpoint directory.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"{PREFIX}{step:08d}"
    tmp = run_dir / (final.name + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for fname, group in tensors.items():
        flat = {k: v.detach().to("cpu").contiguous() for k, v in group.items()}
        save_file(flat, str(tmp / f"{fname}.safetensors"))
    (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=1, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old_step, old in _step_dirs(run_dir):
        if old_step != step:
            shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob(f"{PREFIX}*{TMP_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``run_dir``, or None."""
    dirs = _step_dirs(Path(run_dir))
    return dirs[-1][1] if dirs else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint`."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"checkpoint {path}: state.json is missing")
    state = json.loads(state_file.read_text())
    tensors = {f.name[: -len(".safetensors")]: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    return Checkpoint(path=path, tensors=tensors, state=state)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """Flatten the per-parameter optimizer state as ``optim/<param name>/<state key>`` tensors.

    ``names`` maps each parameter to its name in ``model.named_parameters()``. Non-tensor state
    values are stored as 0-d float64 tensors.
    """
    out = {}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            t = value if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
            out[f"optim/{names[p]}/{key}"] = t
    return out


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    *,
    copy: bool = True,
) -> None:
    """Inverse of :func:`optimizer_tensors`: load the flattened state into ``optimizer``.

    ``params`` maps parameter names to the (current) parameters. Tensors are moved to their
    parameter's device, except the 0-d ``step`` counters, which stay where PyTorch keeps them:
    on the CPU, or for a fused (or capturable) optimizer on the parameter's device as float32, as
    ``Optimizer.load_state_dict`` places them (the fused CUDA kernel reads the step on the GPU,
    so a CUDA run resumed from a checkpoint, read on the CPU, needs it moved there).
    ``copy=False`` lets the optimizer own the given tensors (for tensors just read from a
    checkpoint: no second copy of Adam's state, so a resume needs no more memory than a fresh run);
    the default copies them, as ``tensors`` may be another optimizer's live state.
    """
    step_on_device = {id(p) for group in optimizer.param_groups if group.get("fused") or group.get("capturable")
                      for p in group["params"]}
    state: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
    for flat_name, value in tensors.items():
        if not flat_name.startswith("optim/"):
            continue
        pname, key = flat_name[len("optim/") :].rsplit("/", 1)
        if pname not in params:
            raise ValueError(f"checkpoint holds optimizer state for unknown parameter {pname!r}")
        p = params[pname]
        if value.dim() > 0:
            if value.shape != p.shape:
                raise ValueError(
                    f"checkpoint optimizer state {pname}/{key} has shape {tuple(value.shape)}, "
                    f"parameter has {tuple(p.shape)}"
                )
            value = value.to(p.device)
        elif key == "step" and id(p) in step_on_device:
            value = value.to(device=p.device, dtype=torch.float32)
        state.setdefault(p, {})[key] = value.clone() if copy else value
    optimizer.state.clear()
    for p, st in state.items():
        optimizer.state[p] = st


def prune_run(run_dir: str | Path) -> None:
    """Delete a run's checkpoint directory (after its final model was written)."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
