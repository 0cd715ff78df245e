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
