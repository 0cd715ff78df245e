"""The command line turns expected failures into one `error:` line and exit status 2."""

from pathlib import Path

from sparc.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_check_prints_streams(capsys):
    assert main(["--params", str(ROOT / "params.yaml"), "check"]) == 0
    out = capsys.readouterr().out
    assert "params OK" in out and "stream minilm" in out


def test_bad_params_exit_2(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text((ROOT / "params.yaml").read_text().replace("\nk: 16", "\nk: 100000"))
    assert main(["--params", str(bad), "check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: k: must be at most L")


def test_missing_prepared_data_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert main(["extract", "minilm"]) == 2
    assert "samples.csv is missing" in capsys.readouterr().err


def test_unknown_stream_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert main(["extract", "nosuch"]) == 2
    assert "unknown stream 'nosuch'" in capsys.readouterr().err


def test_ablation_and_sweep_print_their_experiments(capsys):
    params = str(ROOT / "params.yaml")
    assert main(["--params", params, "ablation", "--dry", "--seeds", "0,1", "--only", "sparc,usae"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "dvc exp run --temp -n ablation-sparc-s0 -S topk=global -S lambda=1.0 -S method=sparc -S seed=0",
        "dvc exp run --temp -n ablation-sparc-s1 -S topk=global -S lambda=1.0 -S method=sparc -S seed=1",
        "dvc exp run --temp -n ablation-usae-s0 -S topk=local -S lambda=1.0 -S method=usae -S seed=0",
        "dvc exp run --temp -n ablation-usae-s1 -S topk=local -S lambda=1.0 -S method=usae -S seed=1",
    ]
    assert main(["--params", params, "sweep", "L=256,1024", "--dry", "--seeds", "3"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == [
        "dvc exp run --temp -n sweep-L256-s3 -S L=256 -S seed=3",
        "dvc exp run --temp -n sweep-L1024-s3 -S L=1024 -S seed=3",
    ]
    assert main(["--params", params, "ablation", "--dry", "--only", "nope"]) == 2
    assert "unknown configuration 'nope'" in capsys.readouterr().err


def test_experiments_refused_while_dvc_runs_in_the_workspace(tmp_path, capsys, monkeypatch):
    """Issue 22.14: a second `dvc exp run` during a workspace run wrote its -S values into
    params.yaml, then failed on DVC's lock (and the first run failed after it). ablation, sweep
    and the presets now say so before starting anything."""
    import json
    import os
    import subprocess
    import sys

    from sparc.report import experiments

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    started = []
    monkeypatch.setattr(experiments, "run_experiments", lambda cmds: started.extend(cmds) or [])
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: started.append(cmd))
    grid = ["ablation", "--only", "sparc", "--seeds", "0"]
    assert main(grid) == 0 and len(started) == 1  # nothing running: the grid starts
    lock = tmp_path / ".dvc" / "tmp" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    holder = subprocess.Popen(  # noqa: S603 (the real Popen: monkeypatch replaced subprocess.run only)
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('locked', flush=True); time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        for argv in (grid, ["sweep", "k=8,16", "--seeds", "0"], ["paper"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err == ("error: a DVC command holding .dvc/tmp/lock is running in this workspace: starting "
                           "experiments now would write their -S values into params.yaml and then fail on DVC's "
                           "lock; wait for it to finish, or queue them (--queue, then `dvc queue start` once it "
                           "has finished)\n")
    finally:
        holder.kill()
        holder.wait()
    assert len(started) == 1
    pid_file = tmp_path / ".dvc" / "tmp" / "exps" / "run" / "workspace" / "workspace.json"
    pid_file.parent.mkdir(parents=True)
    pid_file.write_text(json.dumps({"pid": os.getpid()}))
    assert main(grid) == 2
    assert f"error: a workspace `dvc exp run` (process {os.getpid()}, .dvc/tmp/exps/run/workspace/workspace.json)" \
        in capsys.readouterr().err
    assert main([*grid, "--queue"]) == 0 and len(started) == 2  # queueing is what the message advises
    pid_file.write_text(json.dumps({"pid": holder.pid}))  # a finished run's stale file is ignored
    assert main(grid) == 0 and len(started) == 3
