"""DINOv2 through transformers, on tiny random models saved locally (and served from a fake hub
cache under a hub name), through the same code path as facebook/dinov2-with-registers-large."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from transformers import (
    AutoModel,
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTModel,
)

from sparc.features.registry import build_extractor

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56)
HUB_NAME = "facebook/dinov2-tiny-sparc-test"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """``plain``: Dinov2Model without a preprocessor config; ``registers``: with 4 register
    tokens and a BitImageProcessor (shortest edge 64, crop 56)."""
    root = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY)).save_pretrained(root / "plain")
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**TINY, num_register_tokens=4)).save_pretrained(root / "registers")
    BitImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}, do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3,
    ).save_pretrained(root / "registers")
    return {"plain": root / "plain", "registers": root / "registers", "root": root}


def load_batch(extractor, paths) -> torch.Tensor:
    return extractor.collate([extractor.load(p, "") for p in paths])


def reference_tokens(model_dir, pixels: torch.Tensor) -> torch.Tensor:
    """last_hidden_state of the saved model, loaded independently of sparc."""
    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return model(pixel_values=pixels).last_hidden_state


def test_plain_directory_cls_and_fallback_preprocessing(dirs, prepared):
    ex = build_extractor(f"dinov2:{dirs['plain']}", "image", "cpu")
    assert ex.dim == 32 and ex.pool == "cls" and ex.num_registers == 0
    x = load_batch(ex, prepared.images[:3])
    assert x.shape == (3, 3, 224, 224)  # standard DINOv2 transform: 256 bicubic, crop 224
    with torch.inference_mode():
        f = ex.embed(x)
    tokens = reference_tokens(dirs["plain"], x)
    torch.testing.assert_close(f, tokens[:, 0], rtol=0, atol=0)
    pre = ex.preprocessing()
    assert pre["resize_shorter_side"] == 256 and pre["center_crop"] == 224 and pre["mean"] == [0.485, 0.456, 0.406]
    with torch.inference_mode():
        assert torch.equal(ex.embed(x), f)


@pytest.mark.parametrize("pool, dim", [("cls", 32), ("mean", 32), ("cls+mean", 64)])
def test_registers_pooling_options(dirs, prepared, pool, dim):
    ex = build_extractor(f"dinov2:{dirs['registers']}?pool={pool}", "image", "cpu")
    assert ex.dim == dim and ex.num_registers == 4
    x = load_batch(ex, prepared.images[:2])
    assert x.shape == (2, 3, 56, 56)  # the saved AutoImageProcessor: shortest edge 64, crop 56
    with torch.inference_mode():
        f = ex.embed(x)
    tokens = reference_tokens(dirs["registers"], x)
    assert tokens.shape == (2, 1 + 4 + 16, 32)
    cls, patch_mean = tokens[:, 0], tokens[:, 5:].mean(dim=1)
    expected = {"cls": cls, "mean": patch_mean, "cls+mean": torch.cat([cls, patch_mean], dim=1)}[pool]
    torch.testing.assert_close(f, expected)
    assert ex.preprocessing()["image_processor"]["crop_size"] == {"height": 56, "width": 56}


@pytest.fixture
def fake_hub_cache(dirs, tmp_path, monkeypatch):
    """The registers model under HUB_NAME in a Hugging Face cache layout; hub marked offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / ("models--" + HUB_NAME.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(dirs["registers"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_name_loads_from_cache_like_the_directory(fake_hub_cache, dirs, prepared, monkeypatch):
    from sparc.features.dinov2 import model_source

    by_dir = build_extractor(f"dinov2:{dirs['registers']}", "image", "cpu")
    by_name = build_extractor(f"dinov2:{HUB_NAME}", "image", "cpu")
    assert str(by_name.spec) == f"dinov2:{HUB_NAME}"
    x = load_batch(by_name, prepared.images[:2])
    torch.testing.assert_close(x, load_batch(by_dir, prepared.images[:2]), rtol=0, atol=0)
    with torch.inference_mode():
        np.testing.assert_array_equal(by_name.embed(x).numpy(), by_dir.embed(x).numpy())
    # A cached model is read locally even when downloads would be allowed.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert model_source(HUB_NAME) == (HUB_NAME, True)
    assert model_source("facebook/not-cached-here") == ("facebook/not-cached-here", False)


def test_unknown_hub_name_offline_is_a_clear_error(fake_hub_cache):
    with pytest.raises(ValueError, match="dinov2: cannot load model 'facebook/dinov2-nope' from the local Hugging Face cache"):
        build_extractor("dinov2:facebook/dinov2-nope", "image", "cpu")


def test_bad_directories(dirs, tmp_path):
    ViTModel(ViTConfig(**TINY)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="is a 'vit' model, not one of dinov2, dinov2_with_registers"):
        build_extractor(f"dinov2:{tmp_path / 'vit'}", "image", "cpu")
    Dinov2Config(**TINY).save_pretrained(tmp_path / "no-weights")
    with pytest.raises(ValueError, match="cannot load the weights of .*no-weights.* from the directory"):
        build_extractor(f"dinov2:{tmp_path / 'no-weights'}", "image", "cpu")
    with pytest.raises(ValueError, match="model directory '/nonexistent/dino' does not exist"):
        build_extractor("dinov2:/nonexistent/dino", "image", "cpu")
    with pytest.raises(ValueError, match="reads image, not 'caption'"):
        build_extractor(f"dinov2:{dirs['plain']}", "caption", "cpu")
