"""No value from params.yaml reaches the shell that DVC runs a stage's command in.

DVC writes `${...}` into a stage's `cmd:` before a shell runs it, and a params.yaml can come from
a collaborator (`git pull`, `dvc exp apply`): a stream named `x;touch PWNED;echo` must not run
`touch`. The `extract@<stream>` stages name no stream on their command line; `sparc extract`
reads it from the stage name DVC passes in `DVC_STAGE`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ruamel.yaml import YAML

from sparc.cli import main, stage_stream
from sparc.params import read_yaml
from tests.e2e import ROOT, command_env, run

MALICIOUS = "x;touch PWNED;echo"


def stage_commands(dvc_yaml: dict) -> dict[str, str]:
    """Every stage's `cmd:` (the `do:` of a foreach stage) by stage name."""
    out = {}
    for name, stage in dvc_yaml["stages"].items():
        cmd = stage.get("do", stage)["cmd"]
        out[name] = "\n".join(cmd) if isinstance(cmd, list) else cmd
    return out


def test_no_stage_command_interpolates_a_value() -> None:
    commands = stage_commands(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    assert commands["extract"] == "python -m sparc extract"
    assert not {name: cmd for name, cmd in commands.items() if "${" in cmd}


def test_stage_stream_from_the_dvc_stage_address() -> None:
    assert stage_stream("extract@effnet") == "effnet"
    assert stage_stream("sub/dir/dvc.yaml:extract@clip_img") == "clip_img"
    assert stage_stream("train") is None and stage_stream("extract@") is None and stage_stream(None) is None


def test_extract_reads_its_stream_from_dvc_stage(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setenv("DVC_STAGE", "extract@nosuch")
    assert main(["extract"]) == 2
    assert "unknown stream 'nosuch'" in capsys.readouterr().err
    monkeypatch.delenv("DVC_STAGE")
    assert main(["extract"]) == 2
    assert capsys.readouterr().err.startswith("error: extract: name a stream")


@pytest.mark.slow
def test_stream_name_runs_no_shell_command(tmp_path: Path) -> None:
    """`dvc repro -s 'extract@x;touch PWNED;echo'` in a DVC repository with this dvc.yaml: sparc
    refuses the name, and no file PWNED appears."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "src/sparc", repo / "src/sparc", ignore=shutil.ignore_patterns("__pycache__"))  # the deps
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    raw = read_yaml(ROOT / "params.yaml")
    raw["streams"][MALICIOUS] = {"model": "minilm:all-MiniLM-L6-v2", "input": "caption"}
    with (repo / "params.yaml").open("w") as fh:
        YAML().dump(raw, fh)
    prepared = repo / "data/prepared" / raw["data"]["dataset"]
    prepared.mkdir(parents=True)
    (prepared / "samples.csv").write_text("id\n")
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    proc = subprocess.run(["dvc", "repro", "-s", f"extract@{MALICIOUS}"], cwd=repo, env=command_env(),
                          capture_output=True, text=True)
    assert not (repo / "PWNED").exists(), proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "stream names may use letters, digits" in proc.stderr
