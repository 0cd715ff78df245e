"""OpenCLIP through open_clip, on a tiny custom config with random weights saved locally, through
the same create_model_and_transforms call as openclip:ViT-L-14@datacomp_xl_s13b_b90k."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from open_clip.model import CLIP

from sparc.features.openclip import resolve_model
from sparc.features.registry import build_extractor

CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
EOT = 49407  # SimpleTokenizer end-of-text id


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A bare model config JSON, an open_clip_config.json-style one, random weights, and the
    reference model built directly from the config."""
    root = tmp_path_factory.mktemp("openclip")
    (root / "tiny-clip.json").write_text(json.dumps(CFG))
    (root / "wrapped.json").write_text(
        json.dumps({"model_cfg": CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
    )
    torch.manual_seed(0)
    reference = CLIP(**CFG).eval()
    torch.save(reference.state_dict(), root / "weights.pt")
    return {"root": root, "reference": reference}


@pytest.fixture(scope="module")
def towers(tiny):
    spec = f"openclip:{tiny['root'] / 'tiny-clip.json'}@{tiny['root'] / 'weights.pt'}"
    return build_extractor(spec, "image", "cpu"), build_extractor(spec, "caption", "cpu")


def test_image_tower_matches_reference_unnormalised(towers, tiny, prepared):
    image, _ = towers
    assert image.dim == 16
    x = image.collate([image.load(p, "") for p in prepared.images])
    assert x.shape == (len(prepared), 3, 32, 32)
    with torch.inference_mode():
        f = image.embed(x)
        expected = tiny["reference"].encode_image(x)
    torch.testing.assert_close(f, expected)
    assert not torch.allclose(f.norm(dim=1), torch.ones(len(f)))  # not normalised
    with torch.inference_mode():
        assert torch.equal(image.embed(x), f)
    pre = image.preprocessing()
    assert pre["size"] == [32, 32] and pre["interpolation"] == "bicubic" and not pre["normalised"]


def test_text_tower_matches_reference_and_truncates(towers, tiny, prepared):
    _, text = towers
    assert text.dim == 16
    captions = prepared.captions + ["word " * 200]
    tokens = text.collate([text.load(None, c) for c in captions])
    assert tokens.shape == (len(captions), 12) and tokens.dtype == torch.long
    assert tokens[-1, -1] == EOT  # the long caption was cut to the context and still ends in EOT
    with torch.inference_mode():
        f = text.embed(tokens)
        expected = tiny["reference"].encode_text(tokens)
    torch.testing.assert_close(f, expected)
    assert f.shape == (len(captions), 16) and torch.isfinite(f).all()
    assert text.preprocessing()["context_length"] == 12


def test_wrapped_config_preprocess_and_local_dir(tiny, prepared, tmp_path):
    root = tiny["root"]
    wrapped = build_extractor(f"openclip:{root / 'wrapped.json'}@{root / 'weights.pt'}", "image", "cpu")
    assert wrapped.preprocessing()["mean"] == [0.5, 0.5, 0.5]
    # An open_clip local directory: open_clip_config.json + weights found by name.
    local = tmp_path / "clipdir"
    local.mkdir()
    shutil.copy(root / "wrapped.json", local / "open_clip_config.json")
    shutil.copy(root / "weights.pt", local / "open_clip_pytorch_model.bin")
    by_dir = build_extractor(f"openclip:{local}", "image", "cpu")
    x = wrapped.collate([wrapped.load(p, "") for p in prepared.images[:2]])
    torch.testing.assert_close(by_dir.load(prepared.images[0], ""), x[0])
    with torch.inference_mode():
        torch.testing.assert_close(by_dir.embed(x), wrapped.embed(x))


def test_local_config_never_shadows_builtin(tiny):
    import open_clip

    (tiny["root"] / "ViT-L-14.json").write_text(json.dumps(CFG))
    name, _, _ = resolve_model(str(tiny["root"] / "ViT-L-14.json"), str(tiny["root"] / "weights.pt"))
    assert name != "ViT-L-14" and name.startswith("ViT-L-14-")
    assert open_clip.get_model_config("ViT-L-14")["embed_dim"] == 768


@pytest.mark.parametrize(
    "name, weights, message",
    [
        ("ViT-L-15", "x", "unknown model 'ViT-L-15'"),
        ("ViT-L-14", None, "'ViT-L-14' needs @weights: a pretrained tag \\(.*datacomp_xl_s13b_b90k"),
        ("ViT-L-14", "nosuchtag", "weights 'nosuchtag' for 'ViT-L-14' are neither a local file nor a known"),
        ("/nonexistent/cfg.json", "w.pt", "model config '/nonexistent/cfg.json' does not exist"),
    ],
)
def test_resolve_errors(name, weights, message):
    with pytest.raises(ValueError, match=message):
        resolve_model(name, weights)


def test_bad_config_and_weights_files(tiny, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"embed_dim": 3}))
    with pytest.raises(ValueError, match="is not an OpenCLIP model config"):
        resolve_model(str(tmp_path / "bad.json"), "w.pt")
    with pytest.raises(ValueError, match="needs @weights"):
        resolve_model(str(tiny["root"] / "tiny-clip.json"), None)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="openclip: cannot load openclip:.*broken.pt"):
        build_extractor(f"openclip:{tiny['root'] / 'tiny-clip.json'}@{tmp_path / 'broken.pt'}", "image", "cpu")


def test_pretrained_tag_resolves_from_hub_cache_without_network(tmp_path, monkeypatch):
    """A cached tag loads as a file with the tag's preprocessing; uncached + offline is an error."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        resolve_model("ViT-L-14", "datacomp_xl_s13b_b90k")
    repo = tmp_path / "models--laion--CLIP-ViT-L-14-DataComp.XL-s13B-b90K"
    commit = "1" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    name, pretrained, overrides = resolve_model("ViT-L-14", "datacomp_xl_s13b_b90k")
    assert name == "ViT-L-14"
    assert pretrained == str(repo / "snapshots" / commit / "open_clip_pytorch_model.bin")
    assert overrides["image_interpolation"] == "bicubic" and len(overrides["image_mean"]) == 3


def test_text_tower_counts_truncated_captions(towers):
    """A caption is counted when its tokens with start and end exceed the context (12): ten
    one-token words fit exactly, eleven do not; the tokens are the tokenizer's at every length
    around the context (SimpleTokenizer: tokenised once at context 13), and as the generic path
    (two tokenisations) gives them."""
    from sparc.features.openclip import tokenize_counted

    _, text = towers
    captions = [" ".join("abcdefghijklmno"[:n]) for n in range(1, 15)] + ["a red circle", "word " * 200]
    assert [len(text.tokenizer.encode(c)) + 2 for c in captions[8:12]] == [11, 12, 13, 14]
    tokens, counts = text.collate_counted(captions)
    assert counts == {"truncated_captions": 5}  # 11 to 14 letters, and the 200 words
    assert torch.equal(tokens, text.tokenizer(captions)) and torch.equal(tokens, text.collate(captions))

    class Generic:  # any other open_clip tokenizer (HFTokenizer, SigLipTokenizer): the generic path
        def __init__(self, inner):
            self.inner, self.context_length = inner, inner.context_length

        def __call__(self, texts, context_length=None):
            return self.inner(texts, context_length=context_length)

    generic_tokens, generic_cut = tokenize_counted(Generic(text.tokenizer), captions)
    assert generic_cut == 5 and torch.equal(generic_tokens, tokens)
    image, _ = towers
    assert image.collate_counted([torch.zeros(3, 32, 32)])[1] == {}
