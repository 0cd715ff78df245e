from __future__ import annotations

import pytest

from sparc.features.registry import ModelSpec, build_extractor, check_spec, parse_spec


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
