"""`python -m sparc check` runs the stages' machine checks too: devices, data files, memory."""

from __future__ import annotations

import pytest
import torch

from sparc import paths
from sparc.cli import main
from sparc.params import ParamsError, params_from_dict
from sparc.preflight import check_devices, check_folder_files, preflight, stream_dims


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it(raw):
    raw["train"]["device"] = "cuda"
    with pytest.raises(ParamsError, match=r"train.device: 'cuda' requested but CUDA is not available \(set train.device"):
        check_devices(params_from_dict(raw))


def test_folder_csv_must_exist_and_not_be_empty(raw, tmp_path):
    raw["data"].update(dataset="folder")
    raw["data"]["folder"]["csv"] = str(tmp_path / "missing.csv")
    with pytest.raises(ParamsError, match="data.folder.csv: .*missing.csv not found"):
        check_folder_files(params_from_dict(raw))
    (tmp_path / "empty.csv").write_text("")
    raw["data"]["folder"]["csv"] = str(tmp_path / "empty.csv")
    with pytest.raises(ParamsError, match="empty.csv is empty"):
        check_folder_files(params_from_dict(raw))
    (tmp_path / "ok.csv").write_text("id,image,caption,labels\n")
    raw["data"]["folder"].update(csv=str(tmp_path / "ok.csv"), hierarchy=str(tmp_path / "h.json"))
    with pytest.raises(ParamsError, match="data.folder.hierarchy: .*h.json not found"):
        check_folder_files(params_from_dict(raw))


def test_dims_come_from_the_extracted_features(raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = params_from_dict(raw)
    dims, known = stream_dims(params)
    assert not known and set(dims.values()) == {1}
    out = paths.features_dir(params.data.dataset, "vit")
    out.mkdir(parents=True)
    (out / "meta.json").write_text('{"dim": 384}')
    assert stream_dims(params)[0]["vit"] == 384


def test_an_L_too_large_for_memory_is_one_line_before_any_stage(raw, tmp_path, monkeypatch, capsys):
    """Even before extraction (dims unknown: a lower bound), L = 10^11 cannot fit."""
    monkeypatch.chdir(tmp_path)
    raw["L"] = 100_000_000_000
    (tmp_path / "params.yaml").write_text("")
    from ruamel.yaml import YAML

    with (tmp_path / "params.yaml").open("w") as fh:
        YAML().dump(raw, fh)
    assert main(["check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: L: 100000000000 needs about") and "set L <=" in err
    assert "\n" not in err


def test_preflight_reports_devices_and_memory(raw):
    lines = preflight(params_from_dict(raw))
    assert lines[0].startswith("devices: extract.device=")
    assert lines[1].startswith("training memory: about")
