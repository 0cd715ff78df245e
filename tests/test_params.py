"""params.yaml is parsed like DVC does and bad values give one clear line naming the parameter."""

from pathlib import Path

import pytest

from sparc.params import ParamsError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


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
        (lambda r: r.update(method="sae"), "method: 'sae' is not one of sparc, usae, usae_paper"),
        (lambda r: r["data"].update(dataset="imagenet"), "data.dataset: unknown dataset 'imagenet'"),
        (lambda r: r["streams"]["vit"].update(model="resnet:50"), "streams.vit.model: unknown model family 'resnet'"),
        (lambda r: r["streams"]["vit"].update(model="vit-s14"), "streams.vit.model: model spec 'vit-s14' is not of the form"),
        (lambda r: r["streams"]["minilm"].update(input="image"), "streams.minilm.model: model family 'minilm' reads caption"),
        (lambda r: r["streams"]["vit"].update(input="audio"), "streams.vit.input: 'audio' is not one of image, caption"),
        (lambda r: r.update(kk=3), "kk: unknown parameter"),
        (lambda r: r["train"].update(lr="fast"), "train.lr: expected a number"),
        (lambda r: r.update(streams={}), "streams: SPARC aligns several models, so at least two streams are needed, got 0"),
        # issue 22.9: one stream passed `check`, ran to evaluate and failed there
        (lambda r: r.update(streams={"vit": r["streams"]["vit"]}), "at least two streams are needed, got 1 (vit)"),
        # issue 22.8: a negative seed passed `check`; train failed without naming the key
        (lambda r: r.update(seed=-1), "seed: must be a non-negative integer, got -1"),
        (lambda r: r["data"].update(split_seed=-2), "data.split_seed: must be a non-negative integer"),
        (lambda r: r["evaluate"].update(probe_seed=-1), "evaluate.probe_seed: must be a non-negative integer"),
        (lambda r: r["localise"].update(seed=-1), "localise.seed: must be a non-negative integer"),
        (lambda r: r["extract"].update(cpu_threads=-1), "extract.cpu_threads: must be >= 0"),
        # every value the stages used to reject only when they ran (or never)
        (lambda r: r.update(lamda=0.0), "lamda: unknown parameter (did you mean lambda?)"),
        (lambda r: r["train"].update(epochs=0), "train.epochs: must be >= 1, got 0"),
        (lambda r: r["train"].update(batch_size=0), "train.batch_size: must be >= 1, got 0"),
        (lambda r: r["train"].update(lr=-1.0), "train.lr: must be positive, got -1.0"),
        (lambda r: r["train"].update(device="tpu"), "train.device: unknown device 'tpu' (use auto, cpu, cuda"),
        (lambda r: r["extract"].update(device="gpu"), "extract.device: unknown device 'gpu'"),
        (lambda r: r["evaluate"].update(device="cuda:x"), "evaluate.device: unknown device 'cuda:x'"),
        (lambda r: r["concepts"].update(top_n=0), "concepts.top_n: must be >= 1, got 0"),
        (lambda r: r["concepts"].update(purity_threshold=2.0), "concepts.purity_threshold: must be in [0, 1]"),
        (lambda r: r["evaluate"].update(batch_size=0), "evaluate.batch_size: must be >= 1, got 0"),
        (lambda r: r["data"].update(dataset="folder"), "data.folder.csv: empty; set it to your CSV"),
        (lambda r: r["data"]["emoji"].update(size=0), "data.emoji.size: must be >= 1, got 0"),
        (lambda r: r["data"]["clipart"].update(max_megapixels=0.0), "data.clipart.max_megapixels: must be positive"),
        (lambda r: r.update(method="usae"), "topk: method usae trains and is evaluated with each stream's own top-k"),
        (lambda r: r.update(method="usae_paper", topk="global"), "so topk must be local, got global"),
        (lambda r: r["train"].update(subset_keep=0.0), "train.subset_keep: must be in (0, 1] (1.0 = off), got 0.0"),
        (lambda r: r["train"].update(subset_keep=1.5), "train.subset_keep: must be in (0, 1]"),
        (lambda r: r["train"].update(consistency=-1.0), "train.consistency: must be >= 0 (0.0 = off)"),
        (lambda r: r["train"].update(precision="fp16"), "train.precision: 'fp16' is not one of auto, float32, bf16"),
        # issue 26: train.bf16 became train.precision
        (lambda r: r["train"].update(bf16=True), "train.bf16: replaced by train.precision (bf16: true -> precision: bf16"),
        (lambda r: (r.update(topk="local"), r["train"].update(subset_keep=0.5)),
         "train.subset_keep: a Global TopK training option (method sparc, topk global), but method is sparc with topk local"),
        (lambda r: (r.update(method="usae", topk="local"), r["train"].update(consistency=0.1)),
         "train.consistency: a Global TopK training option"),
    ],
)
def test_bad_values_name_the_parameter(raw, edit, message):
    edit(raw)
    with pytest.raises(ParamsError) as info:
        params_from_dict(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("edit", "at", "column", "message"),
    [  # issue 22.11: ruamel tracebacks (or a decode error naming no file) before
        (lambda t: t.replace("k: 16", "k: 16\nk: 32"), "k: 32", 1, 'found duplicate key "k" with value "32"'),
        (lambda t: t.replace("concepts: [cat-face, country-flag]", "concepts: [cat-face, country-flag"),
         "  n_best:", 3, "close the [ list with ]"),
        (lambda t: t.replace("  batch_size: 32", "\tbatch_size: 32"), "\tbatch_size", 1, "indent with spaces, not tabs"),
        (lambda t: t.replace("dataset: emoji", "dataset: \udcffemoji"), "dataset: \udcff", 12,
         "byte 0xff is not UTF-8; save the file as UTF-8"),
    ],
)
def test_yaml_mistakes_give_one_line_with_file_line_column(tmp_path, capsys, edit, at, column, message):
    from sparc.cli import main

    text = edit((ROOT / "params.yaml").read_text())
    line = text[: text.index(at)].count("\n") + 1
    path = tmp_path / "params.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert main(["--params", str(path), "check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:{line}:{column}: ") and message in err
    assert err.count("\n") == 1


def test_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="parameters file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("method", ["usae", "usae_paper"])
def test_usae_is_defined_with_per_stream_topk(raw, method):
    """A USAE run is trained and evaluated with each stream's own top-k: topk must say so."""
    raw.update(method=method, topk="local")
    assert params_from_dict(raw).method == method


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_device_names(raw, device):
    raw["train"]["device"] = device
    assert params_from_dict(raw).train.device == device
