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
