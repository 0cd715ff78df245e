"""params.yaml is parsed like DVC does and bad values give one clear line naming the parameter."""

from pathlib import Path

import pytest

from sparc.params import ParamsError, load_params, params_from_dict, read_yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def raw() -> dict:
    return read_yaml(ROOT / "params.yaml")


def test_repository_params_are_valid(raw):
    params = params_from_dict(raw)
    assert params.k <= params.L
    assert params.stream_names == list(raw["streams"])
    assert params.lam == raw["lambda"]


def test_yaml_12_floats(tmp_path):
    path = tmp_path / "p.yaml"
    text = (ROOT / "params.yaml").read_text().replace("lr: 1.0e-3", "lr: 1e-3")
    path.write_text(text)
    assert load_params(path).train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.update(k=0), "k: must be a positive integer"),
        (lambda r: r.update(k=-3), "k: must be a positive integer"),
        (lambda r: r.update(k=r["L"] + 1), "k: must be at most L"),
        (lambda r: r.update({"lambda": -0.5}), "lambda: must be non-negative"),
        (lambda r: r.update(topk="both"), "topk: 'both' is not one of global, local"),
        (lambda r: r.update(method="sae"), "method: 'sae' is not one of sparc, usae"),
        (lambda r: r["data"].update(dataset="imagenet"), "data.dataset: unknown dataset 'imagenet'"),
        (lambda r: r["streams"]["vit"].update(model="resnet:50"), "streams.vit.model: unknown model family 'resnet'"),
        (lambda r: r["streams"]["vit"].update(model="vit-s14"), "streams.vit.model: model spec 'vit-s14' is not of the form"),
        (lambda r: r["streams"]["minilm"].update(input="image"), "streams.minilm.model: model family 'minilm' reads caption"),
        (lambda r: r["streams"]["vit"].update(input="audio"), "streams.vit.input: 'audio' is not one of image, caption"),
        (lambda r: r.update(kk=3), "kk: unknown parameter"),
        (lambda r: r["train"].update(lr="fast"), "train.lr: expected a number"),
        (lambda r: r.update(streams={}), "streams: at least one stream"),
        (lambda r: r["extract"].update(cpu_threads=-1), "extract.cpu_threads: must be >= 0"),
    ],
)
def test_bad_values_name_the_parameter(raw, edit, message):
    edit(raw)
    with pytest.raises(ParamsError) as info:
        params_from_dict(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="parameters file not found"):
        load_params(tmp_path / "nope.yaml")
