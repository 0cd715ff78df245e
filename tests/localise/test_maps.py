"""Localisation: rollout and Grad-CAM on tiny models made here, Otsu/IoU/AP on hand-made masks,
the composite benchmark's canvases and masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sparc.localise.composite import build_composites, compose, content_box
from sparc.localise.heatmaps import GradCAM, ViTRollout, centre_crop_box, letterbox_box
from sparc.localise.maps import (
    average_precision,
    binarise,
    gaussian_map,
    gradient_rollout,
    iou,
    otsu_threshold,
    place_map,
    score_pairs,
)


def square_mask(side: int = 32, box: tuple[int, int, int, int] = (4, 6, 14, 20)) -> np.ndarray:
    x0, y0, x1, y1 = box
    m = np.zeros((side, side), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# ----------------------------------------------------------------------------- metrics


def test_perfect_map_scores_one_and_empty_map_zero():
    gt = [square_mask(), square_mask(box=(20, 20, 30, 28))]
    perfect = score_pairs([m.astype(float) for m in gt], gt, [1.0, 0.5])
    assert perfect["ap"] == 1.0 and perfect["miou"] == 1.0 and perfect["hit"] == 1.0
    empty = score_pairs([np.zeros((32, 32))] * 2, gt, [1.0, 0.5])
    assert empty["ap"] == 0.0 and empty["miou"] == 0.0


def test_average_precision_ranks_by_score_and_groups_ties():
    assert average_precision([0.5, 0.0], [2.0, 1.0]) == pytest.approx(0.5)  # hit first: P=1 at R=0.5
    assert average_precision([0.0, 0.5], [2.0, 1.0]) == pytest.approx(0.25)  # hit second: P=0.5
    assert average_precision([0.5, 0.0], [1.0, 1.0]) == pytest.approx(0.25)  # one rank: (hits/n)^2
    assert average_precision([0.19, 0.2], [1.0, 0.0], threshold=0.2) == pytest.approx(0.25)
    assert average_precision([], []) == 0.0


def test_iou_and_otsu():
    a, b = square_mask(box=(0, 0, 10, 10)), square_mask(box=(5, 0, 15, 10))
    assert iou(a, b) == pytest.approx(50 / 150)
    assert iou(np.zeros((4, 4)), np.zeros((4, 4))) == 0.0
    values = np.r_[np.full(100, 0.1), np.full(50, 0.8)]
    assert 0.1 <= otsu_threshold(values) < 0.8
    heat = 0.1 * np.random.default_rng(0).random((32, 32)) + 5.0 * square_mask()
    assert np.array_equal(binarise(heat), square_mask())


def test_gaussian_and_place_map():
    g = gaussian_map(20, 30)
    assert g.shape == (20, 30) and np.unravel_index(g.argmax(), g.shape) in {(9, 14), (9, 15), (10, 14), (10, 15)}
    # a 2x2 map whose top-left is hot, placed on the centred 20x20 square of a 40x20 image
    placed = place_map(np.array([[1.0, 0.0], [0.0, 0.0]]), (10, 0, 30, 20), (40, 20))
    assert placed.shape == (20, 40) and placed[:, :10].max() == 0 and placed[:, 30:].max() == 0
    assert placed[2, 12] > placed[17, 27]
    assert centre_crop_box(300, 200, 256, 224) == pytest.approx((62.5, 12.5, 237.5, 187.5))
    assert letterbox_box(300, 200) == (0, -50, 300, 250)


# ----------------------------------------------------------------------------- rollout


def test_gradient_rollout_formula():
    a = torch.full((1, 2, 3, 3), 1 / 3)
    g = torch.ones(1, 2, 3, 3)
    g[:, 1] = -1.0  # the second head's negative contributions are clamped away
    r = gradient_rollout([a], [g])
    assert torch.allclose(r[0], torch.eye(3) + torch.full((3, 3), 1 / 6))
    r2 = gradient_rollout([a, a], [g, g])
    step = torch.full((3, 3), 1 / 6)
    assert torch.allclose(r2[0], (torch.eye(3) + step) + step @ (torch.eye(3) + step))


@pytest.fixture(scope="module")
def tiny_vit():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=8,
                       image_size=32, attn_implementation="eager")
    return Dinov2Model(cfg).eval()


def test_vit_rollout_on_a_tiny_dinov2(tiny_vit):
    """The map is the CLS row of I + mean_h(clamp(dA * A)) over the 4 x 4 patches of a 32 px input."""
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1))
    loc = ViTRollout(tiny_vit, lambda im: torch.zeros(3, 32, 32), letterbox_box, patch=8, prefix=1)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    heat, value = loc.heat(x, lambda feat: feat[0] @ direction)
    xr = x.clone().requires_grad_(True)
    out = tiny_vit(pixel_values=xr, output_attentions=True)
    assert value == pytest.approx(float(out.last_hidden_state[0, 0].detach() @ direction), rel=1e-5)
    a = out.attentions[-1]
    (g,) = torch.autograd.grad(out.last_hidden_state[0, 0] @ direction, a)
    expected = (g * a).clamp(min=0).mean(dim=1)[0, 0, 1:].reshape(4, 4)
    assert heat.shape == (4, 4) and np.allclose(heat, expected.detach().numpy(), atol=1e-6)
    assert (heat >= 0).all() and heat.max() > 0


# ----------------------------------------------------------------------------- Grad-CAM


def test_grad_cam_on_a_tiny_cnn_finds_the_bright_block():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.fill_(0.1)
        conv.bias.zero_()
    pool = torch.nn.AvgPool2d(4)
    loc = GradCAM(lambda x: torch.relu(pool(conv(x))), lambda im: torch.zeros(3, 32, 32), letterbox_box)
    x = torch.zeros(1, 3, 32, 32)
    x[:, :, 0:8, 24:32] = 1.0  # the top-right 8 x 8 block
    heat, value = loc.heat(x, lambda feat: feat.sum())
    assert heat.shape == (8, 8) and value > 0
    assert np.unravel_index(heat.argmax(), heat.shape)[0] <= 1 and heat[4:, :4].max() == 0
    iou_top_right = iou(binarise(place_map(heat, (0, 0, 32, 32), (32, 32))), square_mask(box=(24, 0, 32, 8)))
    assert iou_top_right > 0.5


# ----------------------------------------------------------------------------- composites


def test_compose_masks_each_item_inside_its_cell():
    red = Image.new("RGB", (40, 40), (255, 255, 255))
    red.paste((200, 0, 0), (10, 10, 30, 30))
    assert content_box(red) == (10, 10, 30, 30)
    canvas, masks = compose([red] * 4, grid=2, cell=50, scale=0.8)
    assert canvas.size == (100, 100) and len(masks) == 4
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        assert (xs.min() // 50, ys.min() // 50) == (i % 2, i // 2) and m.sum() == 20 * 20  # the 40 px item is pasted unscaled
        assert (np.asarray(canvas)[m] < 250).any(axis=1).all()


def test_build_composites_is_deterministic(tmp_path):
    paths, captions, labels = [], [], []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(p)
        paths.append(p)
        captions.append(f"item {i}")
        labels.append((f"label{i % 3}",))
    a = build_composites(range(6), paths, captions, labels, n=3, grid=2, cell=20, seed=1)
    b = build_composites(range(6), paths, captions, labels, n=3, grid=2, cell=20, seed=1)
    assert [(c.rows, c.query) for c in a] == [(c.rows, c.query) for c in b]
    for c in a:
        assert len(set(c.rows)) == 4 and c.query_mask.any()
    with pytest.raises(ValueError, match="cannot fill"):
        build_composites(range(3), paths, captions, labels, n=1)


def test_overlay_picks_show_the_top_of_the_ranking_across_streams():
    from sparc.localise.stage import overlay_picks

    # pair 2 is first in both streams; pair 0 is second in one and third in the other; ties by order
    assert overlay_picks([[0.5, 0.1, 0.9, 0.0], [0.2, 0.3, 0.8, 0.0]], 2) == [2, 0]
    assert overlay_picks([[0.0, 0.0, 0.0]], 5) == [0, 1, 2]
    assert overlay_picks([], 4) == [] and overlay_picks([[]], 4) == []
