from __future__ import annotations

import pytest

from sparc.catalog import ModelSpec, check_spec, parse_spec
from sparc.features.registry import build_extractor


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("dinov2:facebook/dinov2-with-registers-large", ModelSpec("dinov2", "facebook/dinov2-with-registers-large")),
        ("openclip:ViT-L-14@datacomp_xl_s13b_b90k", ModelSpec("openclip", "ViT-L-14", "datacomp_xl_s13b_b90k")),
        ("openclip:/m/cfg.json@/m/w.pt", ModelSpec("openclip", "/m/cfg.json", "/m/w.pt")),
        ("efficientnet:lite0", ModelSpec("efficientnet", "lite0")),
        ("imgfocus:vit-s14", ModelSpec("imgfocus", "vit-s14")),
        ("minilm:all-MiniLM-L6-v2", ModelSpec("minilm", "all-MiniLM-L6-v2")),
        ("minilm:models/my-minilm", ModelSpec("minilm", "models/my-minilm")),
        ("dinov2:/x/dino?pool=cls+mean", ModelSpec("dinov2", "/x/dino", None, (("pool", "cls+mean"),))),
    ],
)
def test_parse_spec_forms_and_round_trip(spec, expected):
    parsed = parse_spec(spec)
    assert parsed == expected
    assert str(parsed) == spec
    assert parse_spec(str(parsed)) == parsed


def test_option_default_and_explicit():
    assert parse_spec("dinov2:d").option("pool") == "cls"
    assert parse_spec("dinov2:d?pool=mean").option("pool") == "mean"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("vit-s14", "not of the form family:name"),
        ("dinov2:", "not of the form family:name"),
        ("resnet:50", "unknown model family 'resnet'"),
        ("efficientnet:lite3", "unknown efficientnet model 'lite3'"),
        ("efficientnet:/some/dir", "unknown efficientnet model '/some/dir'"),
        ("imgfocus:vit-b14", "unknown imgfocus model 'vit-b14'"),
        ("minilm:all-MiniLM-L12-v2", "unknown minilm model 'all-MiniLM-L12-v2'"),
        ("efficientnet:lite0@x", "takes no @weights"),
        ("dinov2:d?pool=max", "pool='max' is not one of cls, mean, cls+mean"),
        ("dinov2:d?size=3", "unknown option 'size'"),
        ("dinov2:d?pool", "not of the form key=value"),
        ("dinov2:d?pool=cls&pool=mean", "given twice"),
        ("minilm:all-MiniLM-L6-v2?pool=cls", "options of this family: none"),
        ("openclip:@w", "has no model name"),
    ],
)
def test_parse_spec_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message.replace("?", r"\?").replace("+", r"\+")):
        parse_spec(spec)


def test_check_spec_rejects_unreadable_input():
    assert check_spec("openclip:ViT-L-14@x", "caption").family == "openclip"
    with pytest.raises(ValueError, match="'minilm' reads caption, not 'image'"):
        check_spec("minilm:all-MiniLM-L6-v2", "image")
    with pytest.raises(ValueError, match="'efficientnet' reads image, not 'caption'"):
        build_extractor("efficientnet:lite0", "caption")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("transformers:google/siglip-base-patch16-224", ModelSpec("transformers", "google/siglip-base-patch16-224")),
        ("transformers:bert-base-uncased?max_length=64", ModelSpec("transformers", "bert-base-uncased", None, (("max_length", "64"),))),
        (
            "transformers:/models/vit?layer=8&norm=true&pool=mean",
            ModelSpec("transformers", "/models/vit", None, (("layer", "8"), ("norm", "true"), ("pool", "mean"))),
        ),
        ("python:my_pkg.extractors:Colour?size=4", ModelSpec("python", "my_pkg.extractors:Colour", None, (("size", "4"),))),
        ("python:mod:Cls@/w/weights.pt", ModelSpec("python", "mod:Cls", "/w/weights.pt")),
    ],
)
def test_new_families_parse_and_round_trip(spec, expected):
    parsed = check_spec(spec, "caption" if "max_length" in spec else "image")
    assert parsed == expected and str(parsed) == spec


def test_integer_options():
    spec = parse_spec("transformers:m/x?layer=0")
    assert spec.int_option("layer") == 0 and spec.int_option("max_length") is None
    assert spec.option("pool") == "auto" and spec.option("norm") == "false"
    with pytest.raises(TypeError, match="is an integer: use int_option"):
        spec.option("layer")
    with pytest.raises(TypeError, match="not an integer option"):
        spec.int_option("pool")


@pytest.mark.parametrize(
    "spec, input, message",
    [
        ("transformers:m/x?layer=-1", "image", "layer='-1' is not an integer >= 0"),
        ("transformers:m/x?layer=08", "image", "layer='08' is not an integer >= 0 \\(decimal digits, no leading zeros\\)"),
        ("transformers:m/x?layer=eight", "image", "layer='eight' is not an integer"),
        ("transformers:m/x?max_length=0", "caption", "max_length='0' is not an integer >= 1"),
        ("transformers:m/x?pool=max", "image", "pool='max' is not one of auto, cls, mean, pooler, embed"),
        ("transformers:m/x?norm=true", "image", "norm=true applies to layer=N"),
        ("transformers:m/x?layer=3&pool=embed", "image", "pool=embed reads the model's final output and takes no layer"),
        ("transformers:m/x?max_length=32", "image", "max_length applies to caption streams, not 'image'"),
        ("transformers:my model", "image", "neither a Hugging Face hub id"),
        ("transformers:org/a--b", "image", "neither a Hugging Face hub id"),
        ("transformers:m/x@rev", "image", "takes no @weights"),
        ("python:my_extractors.Colour", "image", "is not of the form package.module:Class"),
        ("python:my-pkg:Colour", "image", "is not of the form package.module:Class"),
        ("python:/path/to/file.py:Colour", "image", "is not of the form package.module:Class"),
    ],
)
def test_new_family_spec_errors(spec, input, message):
    with pytest.raises(ValueError, match=message):
        check_spec(spec, input)


def test_check_spec_imports_no_model_library():
    """Validating specs (what `python -m sparc check` does for every stream) imports neither torch,
    transformers nor the python: module."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sparc.catalog import check_spec\n"
        "check_spec('transformers:google/vit-base-patch16-224?layer=8&pool=mean', 'image')\n"
        "check_spec('transformers:./models/bert?max_length=64', 'caption')\n"
        "check_spec('python:not_imported_module:Extractor', 'image')\n"
        "print(sorted(m for m in ('torch', 'transformers', 'not_imported_module') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
