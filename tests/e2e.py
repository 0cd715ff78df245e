"""Helpers of the end-to-end tests (tests/test_pipeline.py, tests/test_remote.py).

The real pipeline runs once per session (`pipeline_run` in tests/conftest.py) in a temporary copy
of the repository with tiny parameters; each module then works on its own copy of that run, so
their experiments and remotes do not meet.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sparc.params import read_yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def command_env() -> dict[str, str]:
    """The environment of a user's shell: this virtual environment first on PATH, no test-only
    DVCLive redirection."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("DVCLIVE_TEST", None)
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` in `cwd`; fail with its stdout and stderr when it exits non-zero."""
    proc = subprocess.run(cmd, cwd=cwd, env=env or command_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def tracked_files() -> list[str]:
    """The repository's files as a clone would have them: tracked plus untracked-not-ignored."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return [line for line in out.splitlines() if line and (ROOT / line).is_file()]


def tiny_params(raw: dict) -> dict:
    """The repository's params with a handful of samples and a tiny SAE."""
    raw["data"]["max_samples"] = 40
    raw["k"] = 4
    raw["L"] = 32
    raw["extract"]["batch_size"] = 8
    raw["extract"]["num_workers"] = 0
    if "train" in raw:
        raw["train"].update(batch_size=16, epochs=3, checkpoint_every=2)
    if "localise" in raw:
        raw["localise"].update(queries=4, overlays=2)
    return raw


def ran_stages(output: str) -> set[str]:
    """Names of the stages a `dvc repro` / `dvc exp run` output says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def committed_copy(dst: Path, edit_params: Callable[[dict], dict]) -> Path:
    """Copy the repository's tracked files to `dst`, write back its params.yaml as `edit_params`
    returns it (given the parsed file), and commit the copy (git identity `t`)."""
    for rel in tracked_files():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    from ruamel.yaml import YAML

    raw = edit_params(read_yaml(dst / "params.yaml"))
    with (dst / "params.yaml").open("w") as fh:
        YAML().dump(raw, fh)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.name", "t"],
                ["git", "config", "user.email", "t@t"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(cmd, dst)
    return dst


def build_pipeline_repo(dst: Path) -> Path:
    """Copy the repository to `dst` with tiny params, commit it (git identity `t`) and `dvc repro`.

    `dvc.lock` is left uncommitted, as after a user's first run."""
    committed_copy(dst, tiny_params)
    run(["dvc", "repro"], dst)
    return dst


def copy_repo(src: Path, dst: Path) -> Path:
    """A full copy of a pipeline repository (git history, DVC cache and run-cache, outputs with
    their mtimes) at `dst`, an empty or missing folder."""
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    return dst
