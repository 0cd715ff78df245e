"""OpenCLIP ViT localiser (explicit attention, rollout, the stream's own feature) on tiny random
open_clip models built here, and the stage's CLIP-similarity stream selection."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.model import CLIP
from PIL import Image

from sparc.features.registry import build_extractor
from sparc.localise.heatmaps import (
    ExplicitAttention,
    OpenClipRollout,
    build_localiser,
    centre_crop_box,
    letterbox_box,
    openclip_box,
)
from sparc.localise.maps import gradient_rollout
from sparc.localise.stage import clip_similarity, clipsim_streams, same_clip_model
from sparc.params import Params, StreamParams

# 2 blocks of width 32 (2 heads), 8 px patches on a 32 px input: 1 + 4 x 4 tokens
VISION = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}
TEXT = {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CFG = {"embed_dim": 16, "vision_cfg": VISION, "text_cfg": TEXT}


def tiny_clip(**vision) -> CLIP:
    torch.manual_seed(0)
    return CLIP(embed_dim=16, vision_cfg={**VISION, **vision}, text_cfg=TEXT).eval()


def save_tiny_clip(root: Path) -> str:
    """Save :func:`tiny_clip` under ``root``; returns its ``openclip:<config json>@<weights>`` spec."""
    (root / "tiny-vit.json").write_text(json.dumps(CFG))
    torch.save(tiny_clip().state_dict(), root / "weights.pt")
    return f"openclip:{root / 'tiny-vit.json'}@{root / 'weights.pt'}"


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    """The spec of a tiny random ViT CLIP saved here."""
    return save_tiny_clip(tmp_path_factory.mktemp("openclip_loc"))


def random_image(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_explicit_attention_keeps_the_outputs():
    """Wrapping every block changes no output; the kept probabilities are softmax rows."""
    model = tiny_clip()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.encode_image(x)
        wrappers = []
        for block in model.visual.transformer.resblocks:
            block.attn = ExplicitAttention(block.attn)
            wrappers.append(block.attn)
        after = model.encode_image(x)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    for w in wrappers:
        assert w.probs.shape == (2, 2, 17, 17)
        torch.testing.assert_close(w.probs.sum(-1), torch.ones(2, 2, 17), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "float", "bool"])
def test_explicit_attention_matches_multihead_attention(batch_first, mask):
    """Output and per-head weights equal nn.MultiheadAttention's, with and without a mask."""
    torch.manual_seed(3)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 5, 32) if batch_first else torch.randn(5, 2, 32)
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    attn_mask = {"none": None, "bool": causal,
                 "float": torch.zeros(5, 5).masked_fill(causal, float("-inf"))}[mask]
    with torch.no_grad():
        ref, ref_w = mha(x, x, x, need_weights=True, attn_mask=attn_mask, average_attn_weights=False)
        wrapped = ExplicitAttention(mha)
        out, none = wrapped(x, x, x, need_weights=False, attn_mask=attn_mask)
    assert none is None
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(wrapped.probs, ref_w, atol=1e-6, rtol=0)


def test_openclip_localiser_feature_is_the_stream_feature(spec):
    """Same preprocessing and feature as the extractor (the stored stream feature), view box of
    open_clip's shortest-side resize + centre crop."""
    loc = build_localiser(spec, layers=2)
    ex = build_extractor(spec, "image", "cpu")
    assert isinstance(loc, OpenClipRollout)
    image = random_image()
    x = loc.preprocess(image)
    torch.testing.assert_close(x, ex.preprocess_image(image), atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(loc.feature(x[None]), ex.embed(x[None]), atol=1e-5, rtol=0)
    assert loc.view_box(48, 40) == pytest.approx(centre_crop_box(48, 40, 32, 32))
    assert loc.view_box(48, 40) == pytest.approx((4.0, 0.0, 44.0, 40.0))


@pytest.mark.parametrize("layers", [1, 2])
def test_openclip_rollout_map_and_cosine_target(spec, layers):
    """The map is the class-token row of the rollout over the 4 x 4 patches; the value is the
    cosine of a caption vector with the stream's feature."""
    loc = build_localiser(spec, layers=layers)
    ex = build_extractor(spec, "image", "cpu")
    x = loc.preprocess(random_image(seed=2)).unsqueeze(0)
    t = torch.randn(16, generator=torch.Generator().manual_seed(4))
    heat, value = loc.heat(x, clip_similarity(t))
    with torch.no_grad():
        f = ex.embed(x)[0]
    assert value == pytest.approx(float(f @ t / (f.norm() * t.norm())), abs=1e-5)
    assert heat.shape == (4, 4) and np.isfinite(heat).all() and heat.max() > 0 and (heat >= 0).all()
    # by hand: the kept probabilities of the blocks used and their gradients
    xr = x.clone().requires_grad_(True)
    target = clip_similarity(t)(loc.feature(xr))
    probs = [a.probs for a in loc.attentions]
    grads = torch.autograd.grad(target, probs)
    expected = gradient_rollout([p.detach() for p in probs], grads)[0, 0, 1:].reshape(4, 4)
    assert len(probs) == layers and np.allclose(heat, expected.numpy(), atol=1e-7)
    if layers == 1:
        cam = (grads[0] * probs[0].detach()).clamp(min=0).mean(dim=1)[0, 0, 1:].reshape(4, 4)
        assert np.allclose(heat, cam.numpy(), atol=1e-7)


@pytest.mark.parametrize(
    "vision, message",
    [
        ({"layers": [1, 1, 1, 1], "width": 16, "head_width": 8}, "image tower is ModifiedResNet, not an open_clip"),
        ({"pool_type": "avg"}, "not its class token \\(pool_type='avg'"),
        ({"attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4},
         "attentional pooler: True"),
        ({"qk_norm": True}, "blocks CustomResidualAttentionBlock are not supported"),
    ],
)
def test_unsupported_towers_raise(vision, message):
    model = tiny_clip(**vision)
    with pytest.raises(ValueError, match=f"localise: openclip:tiny: .*{message}"):
        OpenClipRollout(model, lambda im: torch.zeros(3, 32, 32), letterbox_box, name="openclip:tiny")
    with pytest.raises(ValueError, match="layers=3 but the ViT has 2 blocks"):
        OpenClipRollout(tiny_clip(), lambda im: torch.zeros(3, 32, 32), letterbox_box, layers=3)


def test_unsupported_tower_through_build_localiser_names_the_spec(tmp_path):
    cfg = {**CFG, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "head_width": 8}}
    (tmp_path / "tiny-rn.json").write_text(json.dumps(cfg))
    torch.save(CLIP(**cfg).state_dict(), tmp_path / "rn.pt")
    spec = f"openclip:{tmp_path / 'tiny-rn.json'}@{tmp_path / 'rn.pt'}"
    with pytest.raises(ValueError, match=f"localise: {spec}: the image tower is ModifiedResNet"):
        build_localiser(spec)


def test_openclip_view_boxes():
    assert openclip_box((224, 224), "shortest")(300, 200) == pytest.approx(centre_crop_box(300, 200, 224, 224))
    assert openclip_box((224, 224), "longest")(300, 200) == letterbox_box(300, 200)
    assert openclip_box((224, 224), "squash")(300, 200) == (0.0, 0.0, 300.0, 200.0)
    with pytest.raises(ValueError, match="non-square input size 224 x 256"):
        openclip_box((224, 256), "shortest")
    with pytest.raises(ValueError, match="unknown open_clip resize_mode 'crop'"):
        openclip_box((224, 224), "crop")


def test_clipsim_streams_only_for_one_openclip_model():
    clip = "openclip:ViT-L-14@datacomp_xl_s13b_b90k"
    streams = {
        "clip_img": StreamParams(clip, "image"),
        "other_img": StreamParams("openclip:ViT-B-32@laion2b_s34b_b79k", "image"),
        "effnet": StreamParams("efficientnet:lite0", "image"),
        "minilm": StreamParams("minilm:all-MiniLM-L6-v2", "caption"),
        "clip_txt": StreamParams(clip, "caption"),
        "clip_txt2": StreamParams(clip, "caption"),
    }
    assert clipsim_streams(Params(streams=streams)) == {"clip_img": "clip_txt"}
    assert clipsim_streams(Params(streams={k: streams[k] for k in ("clip_img", "effnet", "minilm")})) == {}
    assert same_clip_model(clip, clip)
    assert not same_clip_model(clip, "openclip:ViT-L-14@laion2b_s32b_b82k")  # other weights
    assert not same_clip_model(clip, "openclip:ViT-B-16@datacomp_xl_s13b_b90k")  # other architecture
    assert not same_clip_model("minilm:all-MiniLM-L6-v2", "minilm:all-MiniLM-L6-v2")  # not CLIP
    # the default streams (efficientnet, imgfocus, minilm) get no CLIP-similarity method
    default = {"effnet": StreamParams("efficientnet:lite0", "image"),
               "vit": StreamParams("imgfocus:vit-s14", "image"),
               "minilm": StreamParams("minilm:all-MiniLM-L6-v2", "caption")}
    assert clipsim_streams(Params(streams=default)) == {}


def tiny_stage_inputs(root: Path, spec: str, target: str) -> tuple[dict, dict]:
    """Prepared data (6 coloured squares), stored features and an SAE for an image + caption pair
    of tiny OpenCLIP streams, and (for ``target: concept``) a per-stream concepts table naming two
    latents after each label. Returns (params dict without ``localise.device``, run_localise paths)."""
    from sparc.data.base import DatasetBuild, Sample
    from sparc.data.hierarchy import Hierarchy
    from sparc.data.prepared import write_prepared
    from sparc.features.store import write_stream
    from sparc.model.io import save_sae
    from sparc.model.sae import MultiStreamSAE, SAEConfig

    colours = [(200, 0, 0), (0, 160, 0), (0, 0, 220), (200, 200, 0), (0, 180, 180), (150, 0, 150)]
    samples = []
    for i, colour in enumerate(colours):
        im = Image.new("RGB", (24, 24), (255, 255, 255))
        im.paste(colour, (4, 4, 20, 20))
        im.save(root / f"{i}.png")
        samples.append(Sample(f"s{i}", root / f"{i}.png", f"item {i}", (f"c{i}",)))
    hierarchy = Hierarchy.from_parents({f"c{i}": None for i in range(len(colours))})
    prepared = write_prepared(DatasetBuild(samples, hierarchy), root / "prepared", dataset="planted",
                              options={}, max_samples=0, split_seed=0, val_fraction=0.1, test_fraction=0.4)
    fingerprint = json.loads((prepared / "meta.json").read_text())["fingerprint"]
    streams = {"clip_img": {"model": spec, "input": "image"}, "clip_txt": {"model": spec, "input": "caption"}}
    rng = np.random.default_rng(0)
    ids = [smp.id for smp in samples]
    for name, sp in streams.items():
        write_stream(root / "features" / name, ids, rng.standard_normal((len(ids), 16)).astype(np.float32),
                     {**sp, "dataset_fingerprint": fingerprint})
    sae = save_sae(MultiStreamSAE(SAEConfig(dims={"clip_img": 16, "clip_txt": 16}, L=24, k=4), seed=1), root / "sae")
    (root / "concepts").mkdir()
    with (root / "concepts" / "concepts_per_stream.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["latent", "clip_img_label", "clip_img_name"])
        for lat in range(12):
            w.writerow([lat, f"c{lat % 6}", f"c{lat % 6}"])
    params = {"L": 24, "k": 4, "streams": streams,
              "localise": {"queries": 3, "grid": 2, "cell": 32, "split": "all", "overlays": 2, "target": target}}
    paths = {"sae_dir": sae, "features_root": root / "features", "prepared_dir": prepared,
             "concepts_dir": root / "concepts"}
    return params, paths


def test_localise_stage_adds_clipsim_for_one_openclip_model(spec, tmp_path):
    """run_localise on a tiny image + caption OpenCLIP pair of streams: SPARC and the CLIP-similarity
    method are scored; the latter's target is cos(stored caption feature, the canvas's feature)."""
    from sparc.data.prepared import load_prepared
    from sparc.features.store import load_streams
    from sparc.localise.stage import query_pairs, run_localise
    from sparc.params import params_from_dict

    raw, paths = tiny_stage_inputs(tmp_path, spec, "code")
    params = params_from_dict(raw)
    out = run_localise(params, **paths, out_dir=tmp_path / "localise", progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["ap_clip_img", "miou_clip_img", "ap_clipsim_clip_img", "miou_clipsim_clip_img",
                             "ap_chance", "miou_chance"]
    with (out / "pairs.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["method"] == "clipsim_clip_img"]
    assert len(rows) == 3
    # the target by hand: the stored (float16) caption feature of the queried item, the extractor's canvas feature
    loaded = load_streams(paths["features_root"], ["clip_img", "clip_txt"])
    pairs, text = query_pairs(params, "composite", load_prepared(paths["prepared_dir"]), loaded, ["clip_txt"])
    ex = build_extractor(spec, "image", "cpu")
    for row, pair, t in zip(rows, pairs, torch.from_numpy(text["clip_txt"]), strict=True):
        with torch.no_grad():
            f = ex.embed(ex.preprocess_image(pair.load_image())[None])[0]
        assert float(row["target"]) == pytest.approx(float(f @ t / (f.norm() * t.norm())), rel=1e-4, abs=1e-6)


def test_clip_similarity_target():
    t = torch.tensor([3.0, 4.0])
    assert float(clip_similarity(t)(torch.tensor([[4.0, -3.0]]))) == pytest.approx(0.0)
    assert float(clip_similarity(t)(torch.tensor([[6.0, 8.0]]))) == pytest.approx(1.0)
    assert float(clip_similarity(torch.zeros(2))(torch.tensor([[6.0, 8.0]]))) == 0.0
