"""The offline default models, for real (pretrained weights from installed packages)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from sparc.features.base import open_rgb
from sparc.features.offline import IMGFOCUS_TAP, letterbox
from sparc.features.registry import build_extractor


def embed_images(extractor, paths) -> np.ndarray:
    batch = extractor.collate([extractor.load(p, "") for p in paths])
    with torch.inference_mode():
        return extractor.embed(batch).numpy()


def embed_captions(extractor, captions) -> np.ndarray:
    batch = extractor.collate([extractor.load(None, c) for c in captions])
    with torch.inference_mode():
        return extractor.embed(batch).numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("name, dim", [("effnet", 1280), ("imgfocus", 384)])
def test_image_models_shape_finite_deterministic(request, prepared, name, dim):
    extractor = request.getfixturevalue(name)
    assert extractor.dim == dim
    first = embed_images(extractor, prepared.images)
    assert first.shape == (len(prepared), dim) and first.dtype == np.float32
    assert np.isfinite(first).all()
    # Deterministic: the same batch again gives the same bytes (the same computation re-run).
    np.testing.assert_array_equal(embed_images(extractor, prepared.images), first)
    # Independent of the rest of the batch: the same image twice in one batch, and every image in
    # a batch one larger. Another batch shape may take other conv/GEMM kernels that round
    # differently (issue 21; efficientnet's features of one image alone and in a batch of 7 differ
    # by up to 7e-7 here, features up to ~10, float32 ulp at 8 ~ 1e-6): compare within 1e-5, far
    # below what mixing samples in a batch would change (features differ by O(0.1) across images).
    again = embed_images(extractor, [prepared.images[0], prepared.images[0]] + prepared.images[1:])
    np.testing.assert_allclose(again[0], again[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again[1:], first, rtol=1e-5, atol=1e-5)
    # Different images give different features; same-shape pairs are closer than across shapes.
    assert not np.allclose(first[0], first[2])
    ids = prepared.ids
    disc_red, disc_blue = first[ids.index("red-disc")], first[ids.index("blue-disc")]
    bar = first[ids.index("orange-bar")]
    assert cosine(disc_red, disc_blue) > cosine(disc_red, bar)


def test_imgfocus_taps_the_backbone_cls_token(imgfocus, prepared):
    assert [o.name for o in imgfocus.model.get_outputs()] == [IMGFOCUS_TAP]
    x = torch.stack([imgfocus.load(p, "") for p in prepared.images[:2]])
    assert x.shape == (2, 3, 224, 224)
    (tokens,) = imgfocus.model.run(None, {"input_image": x.numpy()})  # the same session and batch
    assert tokens.shape == (2, 257, 384)
    np.testing.assert_array_equal(imgfocus.embed(x).numpy(), tokens[:, 0])


def test_letterbox_keeps_aspect_and_centres():
    from PIL import Image

    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    out = letterbox(wide, 224)
    assert out.size == (224, 224)
    px = np.asarray(out)
    assert (px[0, :, 0] == 0).all() and (px[112, :, 0] == 255).all()  # black bands top, red middle
    assert (px[:56, 112] == 0).all() and (px[56:168, 112] == [255, 0, 0]).all()


def test_open_rgb_composites_transparency_on_white(prepared):
    img = open_rgb(prepared.images[0])
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)


def test_minilm_shape_and_semantics(minilm):
    assert minilm.dim == 384 and minilm.max_length == 256
    captions = ["a small dog running on the grass", "a puppy runs across a lawn", "the stock market fell sharply today"]
    f = embed_captions(minilm, captions)
    assert f.shape == (3, 384) and np.isfinite(f).all()
    assert cosine(f[0], f[1]) > cosine(f[0], f[2]) + 0.3
    # Deterministic, and independent of the other captions in the batch (padding is masked).
    g = embed_captions(minilm, captions[:1])
    np.testing.assert_allclose(g[0], f[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(embed_captions(minilm, captions), f)


def test_minilm_truncates_long_captions(minilm):
    batch = minilm.collate(["word " * 1000, "short"])
    assert batch["input_ids"].shape == (2, 256)
    assert batch["attention_mask"][1].sum() < 10
    with torch.inference_mode():
        assert np.isfinite(minilm.embed(batch).numpy()).all()


def test_minilm_local_directory(tmp_path, minilm):
    from sparc.features.base import package_file
    from sparc.features.offline import MINILM_DIR

    source = package_file(*MINILM_DIR)
    local = build_extractor(f"minilm:{source}", "caption", "cpu")
    np.testing.assert_array_equal(
        embed_captions(local, ["a red apple"]), embed_captions(minilm, ["a red apple"])
    )
    with pytest.raises(ValueError, match="not all-MiniLM-L6-v2 nor a local model directory"):
        build_extractor(f"minilm:{tmp_path}/nothing", "caption")


def test_extractors_pickle_without_model(effnet, minilm, prepared):
    """Workers started with spawn/forkserver receive the extractor without its model."""
    for extractor in (effnet, minilm):
        copy = pickle.loads(pickle.dumps(extractor))
        assert copy.model is None and extractor.model is not None
    copy = pickle.loads(pickle.dumps(effnet))
    torch.testing.assert_close(copy.load(prepared.images[0], ""), effnet.load(prepared.images[0], ""))
    copy = pickle.loads(pickle.dumps(minilm))
    assert torch.equal(copy.collate(["a b c"])["input_ids"], minilm.collate(["a b c"])["input_ids"])


def test_preprocessing_is_recorded(effnet, imgfocus, minilm):
    assert effnet.preprocessing()["mean"] == [0.5, 0.5, 0.5] and effnet.preprocessing()["center_crop"] == 224
    assert imgfocus.preprocessing()["output"].startswith(IMGFOCUS_TAP)
    assert minilm.preprocessing()["max_length"] == 256


def test_minilm_counts_truncated_captions(minilm):
    """Captions over 256 tokens ([CLS] and [SEP] included) are counted; the batch is collate's."""
    captions = ["word " * 254, "word " * 255, "short", "word " * 1000]  # 256, 257, 3, 1002 tokens
    batch, counts = minilm.collate_counted(captions)
    assert counts == {"truncated_captions": 2}
    assert torch.equal(batch["input_ids"], minilm.collate(captions)["input_ids"])
