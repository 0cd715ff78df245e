"""``weights=random`` (sparc.features.random_weights) for the dinov2, openclip and transformers
families, on tiny models saved locally and tiny copies of the built-in hub configs; the network
is cut (any connection raises), so nothing may download. The real-size architectures are checked
on the meta device (no memory, no time) and end to end in tests/test_paper_random.py."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    BertConfig,
    BertModel,
    BertTokenizer,
    BitImageProcessor,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

from sparc.catalog import check_spec
from sparc.features import random_weights as rw
from sparc.features.extract import extract_stream
from sparc.features.openclip import resolve_random
from sparc.features.registry import build_extractor
from sparc.features.store import open_stream
from tests.features.test_openclip import CFG as CLIP_CFG

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY_DINO = {"config": {"model_type": "dinov2_with_registers", **TINY, "image_size": 28, "patch_size": 14,
                        "num_register_tokens": 2},
             "preprocessor": {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 32},
                              "crop_size": {"height": 28, "width": 28}, "do_center_crop": True}}
HUB_NAME = "facebook/dinov2-tiny-sparc-test"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every socket connection fails: a model that tried to download would error."""
    def refuse(*args, **kwargs):
        raise OSError("network access in a weights=random test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny DINOv2 with registers (weights and processor) and a tiny BERT (weights and
    tokenizer) saved locally, and a tiny OpenCLIP config JSON."""
    root = tmp_path_factory.mktemp("random_weights")
    torch.manual_seed(1)
    dino = root / "dino"
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY_DINO["config"])).save_pretrained(dino)
    BitImageProcessor(**TINY_DINO["preprocessor"]).save_pretrained(dino)
    bert = root / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat"]) + "\n")
    BertTokenizer(vocab=str(bert / "vocab.txt")).save_pretrained(bert)
    BertModel(BertConfig(**TINY, vocab_size=8, max_position_embeddings=16)).save_pretrained(bert)
    clip = root / "tiny-clip.json"
    clip.write_text(json.dumps(CLIP_CFG))
    return {"dino": dino, "bert": bert, "clip": clip}


def weights(extractor) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in extractor.model.parameters()])


def test_spec_option_is_checked_without_loading():
    for spec, inp in (("dinov2:facebook/dinov2-with-registers-large?weights=random", "image"),
                      ("openclip:ViT-L-14@datacomp_xl_s13b_b90k?weights=random", "caption"),
                      ("transformers:google/vit-base-patch16-224?pool=cls&weights=random", "image")):
        assert check_spec(spec, inp).option("weights") == "random"
    assert check_spec("dinov2:facebook/dinov2-large", "image").option("weights") == "pretrained"
    with pytest.raises(ValueError, match="weights='zeros' is not one of pretrained, random"):
        check_spec("dinov2:facebook/dinov2-large?weights=zeros", "image")


@pytest.mark.parametrize("name, params_m", [
    ("facebook/dinov2-with-registers-large", 304.37), ("facebook/dinov2-with-registers-small", 22.06),
    ("google/vit-base-patch16-224", 86.39), ("google/siglip-base-patch16-224", 203.16),
])
def test_known_models_have_the_real_size(name, params_m):
    """The built-in copies of the hub configs give the real architectures (parameter counts of
    the hub models), built on the meta device."""
    with rw.config_source(name, "transformers") as (source, origin):
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    assert origin == "sparc.features.random_weights.KNOWN_MODELS"
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.01)


def test_dinov2_directory_random_is_seeded_and_keeps_the_preprocessing(dirs, prepared):
    pretrained = build_extractor(f"dinov2:{dirs['dino']}", "image")
    a = build_extractor(f"dinov2:{dirs['dino']}?weights=random", "image")
    b = build_extractor(f"dinov2:{dirs['dino']}?weights=random", "image")
    assert torch.equal(weights(a), weights(b)) and not torch.equal(weights(a), weights(pretrained))
    assert a.random_origin == "directory" and pretrained.random_origin == ""
    assert a.preprocessing() == pretrained.preprocessing() and a.dim == 32
    image = pretrained.load(prepared.images[0], "")
    assert torch.equal(a.load(prepared.images[0], ""), image)
    assert a.embed(image[None]).shape == (1, 32)


def test_known_hub_name_builds_offline(monkeypatch, prepared):
    monkeypatch.setitem(rw.KNOWN_MODELS, HUB_NAME, TINY_DINO)
    for spec in (f"dinov2:{HUB_NAME}?weights=random", f"transformers:{HUB_NAME}?pool=cls&weights=random"):
        ex = build_extractor(spec, "image")
        assert (ex.dim, ex.random_origin) == (32, "sparc.features.random_weights.KNOWN_MODELS")
        assert ex.preprocess_image(Image.new("RGB", (50, 40))).shape == (3, 28, 28)


def test_unknown_hub_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"dinov2: weights=random needs 'facebook/nope-large''s config"):
        build_extractor("dinov2:facebook/nope-large?weights=random", "image")


def test_transformers_caption_stream_uses_the_models_tokenizer(dirs):
    pretrained = build_extractor(f"transformers:{dirs['bert']}", "caption")
    ex = build_extractor(f"transformers:{dirs['bert']}?weights=random", "caption")
    batch = ex.collate(["a red cat"])
    assert torch.equal(batch["input_ids"], pretrained.collate(["a red cat"])["input_ids"])
    assert ex.embed(batch).shape == (1, 32) and not torch.equal(weights(ex), weights(pretrained))


def test_openclip_random_from_a_config_is_seeded(dirs):
    a = build_extractor(f"openclip:{dirs['clip']}?weights=random", "caption")
    b = build_extractor(f"openclip:{dirs['clip']}?weights=random", "image")
    assert torch.equal(weights(a), weights(b)) and a.random_origin.startswith("open_clip architecture")
    tokens = a.collate(["a red cat"])
    assert a.embed(tokens).shape == (1, 16)


def test_openclip_tag_gives_its_preprocessing_not_its_weights(tmp_path):
    arch, overrides = resolve_random("ViT-L-14", "datacomp_xl_s13b_b90k")
    assert arch == "ViT-L-14"
    assert overrides["image_mean"] == (0.48145466, 0.4578275, 0.40821073)
    assert overrides["image_resize_mode"] == "shortest"
    assert resolve_random("ViT-L-14", None) == ("ViT-L-14", {})
    (tmp_path / "w.pt").write_bytes(b"")
    for name, tag, message in (("ViT-L-14", "no_such_tag", "is not a pretrained tag of 'ViT-L-14'"),
                               ("ViT-L-14", str(tmp_path / "w.pt"), "is not a pretrained tag"),
                               ("hf-hub:org/repo", None, "takes a built-in architecture or a config JSON"),
                               ("ViT-L-15", None, "unknown model 'ViT-L-15'")):
        with pytest.raises(ValueError, match=message):
            resolve_random(name, tag)


def test_extracted_stream_says_random_weights(dirs, prepared, tmp_path):
    random = extract_stream(prepared, build_extractor(f"dinov2:{dirs['dino']}?weights=random", "image"),
                            tmp_path / "random", num_workers=0, progress=False)
    meta = open_stream(random).meta
    assert (meta["weights"], meta["weights_seed"], meta["config_source"]) == ("random", 0, "directory")
    assert meta["warning"] == rw.WARNING
    plain = extract_stream(prepared, build_extractor(f"dinov2:{dirs['dino']}", "image"), tmp_path / "plain",
                           num_workers=0, progress=False)
    assert not {"weights", "weights_seed", "config_source", "warning"} & set(open_stream(plain).meta)
    assert rw.random_streams({"a": meta, "b": open_stream(plain).meta}) == ["a"]
