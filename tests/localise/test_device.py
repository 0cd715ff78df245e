"""``localise.device``: the parameter's checks and resolution, the device reaching the SAE, the
localiser's model and its input in a run of the stage (CPU), and, where CUDA exists, the same heat
maps and scores on the GPU as on the CPU (tiny DINOv2, CNN and OpenCLIP models made here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparc.localise import stage as localise_stage
from sparc.localise.heatmaps import (
    GradCAM,
    ViTRollout,
    build_localiser,
    float32_convolutions,
    letterbox_box,
)
from sparc.localise.overlays import read_overlays
from sparc.localise.stage import clip_similarity, localise_device, run_localise
from sparc.params import LocaliseParams, ParamsError, check_localise, params_from_dict
from sparc.preflight import check_devices
from tests.localise.test_heatmaps_openclip import save_tiny_clip, tiny_stage_inputs

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory) -> str:
    """``openclip:<config json>@<weights>`` of the tiny random ViT CLIP of test_heatmaps_openclip."""
    return save_tiny_clip(tmp_path_factory.mktemp("openclip_device"))


def test_localise_device_names_are_checked(raw: dict) -> None:
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        check_localise(LocaliseParams(device=ok), "emoji")
    for bad in ("gpu", "cuda:x", "tpu", ""):
        with pytest.raises(ParamsError, match=f"localise.device: unknown device '{bad}'"):
            check_localise(LocaliseParams(device=bad), "emoji")
    assert params_from_dict(raw).localise.device == "auto"  # params.yaml
    raw["localise"]["device"] = "gpu"
    with pytest.raises(ParamsError, match="localise.device: unknown device 'gpu'"):
        params_from_dict(raw)


def test_auto_resolves_to_cuda_when_present_and_cuda_is_refused_without_it(raw: dict, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert localise_device(LocaliseParams()) == torch.device("cpu")
    assert localise_device(LocaliseParams(device="cpu")) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ParamsError, match=f"localise.device: '{name}' requested but CUDA is not available "
                                              r"\(set localise.device: auto or cpu\)"):
            localise_device(LocaliseParams(device=name))
    raw["localise"]["device"] = "cuda"
    with pytest.raises(ParamsError, match="localise.device: 'cuda' requested"):
        check_devices(params_from_dict(raw))  # `python -m sparc check`
    with pytest.raises(ParamsError, match="localise.device: 'cuda' requested"):  # before any file is read
        run_localise(params_from_dict(raw), sae_dir="/nonexistent", prepared_dir="/nonexistent", progress=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert localise_device(LocaliseParams()) == torch.device("cuda")
    assert localise_device(LocaliseParams(device="cuda:1")) == torch.device("cuda:1")


# ----------------------------------------------------------------------------- a tiny run of the stage


def run_on(params: dict, paths: dict, device: str, out: Path) -> Path:
    """run_localise with ``localise.device: device`` into ``out``."""
    p = params_from_dict({**params, "localise": {**params["localise"], "device": device}})
    return run_localise(p, **paths, out_dir=out, progress=False)


def test_the_device_reaches_the_sae_the_localiser_and_its_input(clip_spec, tmp_path, monkeypatch) -> None:
    """``auto`` on a machine without CUDA resolves to the CPU, and that device is the one the SAE
    is loaded on, the localiser is moved to (its parameters are there) and every input ``heat``
    gets is on; ``target: concept`` runs too; details.json does not record the device."""
    from sparc.evaluate import run_files

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen: dict[str, list] = {"sae": [], "localiser": [], "to": [], "x": []}
    load_model = run_files.load_model

    def recording_load(params, sae_dir, device):
        model = load_model(params, sae_dir, device)
        seen["sae"].append((device, {p.device for p in model.parameters()}))
        return model

    def recording_build(model_spec, layers):
        loc = build_localiser(model_spec, layers)
        heat, to = loc.heat, loc.to

        def recording_to(device):
            seen["to"].append(device)
            return to(device)

        def recording_heat(x, target):
            seen["x"].append(x.device)
            return heat(x, target)

        loc.heat, loc.to = recording_heat, recording_to
        seen["localiser"].append(loc)
        return loc

    monkeypatch.setattr(run_files, "load_model", recording_load)
    monkeypatch.setattr(localise_stage, "build_localiser", recording_build)
    params, paths = tiny_stage_inputs(tmp_path, clip_spec, "concept")
    out = run_on(params, paths, "auto", tmp_path / "out")
    cpu = torch.device("cpu")
    assert seen["sae"] == [("cpu", {cpu})]
    assert len(seen["localiser"]) == 2  # the scoring pass and the overlays' pass
    assert seen["to"] == [cpu, cpu]
    for loc in seen["localiser"]:
        assert loc.device == cpu and {p.device for p in loc.model.parameters()} == {cpu}
    # (3 queries + the shown ones again) x (SPARC + CLIP similarity)
    assert seen["x"] == [cpu] * 2 * (3 + 2)  # overlays: 2
    details = json.loads((out / "details.json").read_text())
    assert "device" not in details["params"] and details["params"]["target"] == "concept"


def test_localiser_to_moves_the_model_it_was_given() -> None:
    moved = []

    class Recording(torch.nn.Conv2d):
        def to(self, *args, **kwargs):
            moved.append(args)
            return super().to(*args, **kwargs)

    conv = Recording(3, 4, 3, padding=1)
    loc = GradCAM(conv, lambda im: torch.zeros(3, 8, 8), letterbox_box, model=conv)
    assert loc.to("cpu") is loc and loc.device == torch.device("cpu") and moved == [(torch.device("cpu"),)]
    bare = GradCAM(conv, lambda im: torch.zeros(3, 8, 8), letterbox_box)  # no model: nothing to move
    assert bare.to("cpu").device == torch.device("cpu") and len(moved) == 1


def test_float32_convolutions_restores_the_setting() -> None:
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with float32_convolutions():
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before


# ----------------------------------------------------------------------------- CUDA against the CPU


def tiny_localisers(clip_spec: str) -> list[tuple[str, object, torch.Tensor, torch.Tensor, bool]]:
    """(name, a localiser on the CPU, an input ``[1, 3, 32, 32]``, a vector ``t``, cosine?): a tiny
    DINOv2 (rollout over both layers), a tiny CNN (Grad-CAM) and the tiny OpenCLIP ViT (rollout),
    the last also with the CLIP cosine target (:func:`make_target`)."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    vit = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                   patch_size=8, image_size=32, attn_implementation="eager")).eval()
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(4)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    direction = torch.randn(32, generator=gen)
    blank = lambda im: torch.zeros(3, 32, 32)  # noqa: E731
    clip = build_localiser(clip_spec, layers=2)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    x_clip = clip.preprocess(image).unsqueeze(0)
    return [
        ("vit", ViTRollout(vit, blank, letterbox_box, patch=8, prefix=1, layers=2), x, direction, False),
        ("cnn", GradCAM(cnn, blank, letterbox_box, model=cnn), x, direction[:8], False),
        ("openclip", clip, x_clip, direction[:16], False),
        ("openclip cosine", build_localiser(clip_spec, layers=1), x_clip, direction[16:], True),
    ]


def make_target(t: torch.Tensor, cosine: bool):
    """``feat [1, d] -> <feat[0], t>``, or the CLIP cosine of ``feat[0]`` and ``t``."""
    return clip_similarity(t) if cosine else (lambda feat: (feat[0] * t).sum())


@CUDA
def test_tiny_localisers_give_the_same_maps_on_cuda_as_on_cpu(clip_spec) -> None:
    """Same map (to 1e-4 of its maximum) and target value (rel 1e-4) on both devices, convolutions
    in float32 as in the stage; the model's parameters are on CUDA, the map comes back as a CPU
    numpy array (each localiser built twice, the same weights: one stays on the CPU)."""
    for (name, loc, x, t, cosine), (_, gpu, *_) in zip(tiny_localisers(clip_spec), tiny_localisers(clip_spec),
                                                       strict=True):
        for a, b in zip(loc.model.state_dict().values(), gpu.model.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        with float32_convolutions():
            heat_cpu, value_cpu = loc.heat(x, make_target(t, cosine))
            gpu.to("cuda")
            assert gpu.device == torch.device("cuda"), name
            assert {p.device.type for p in gpu.model.parameters()} == {"cuda"}, name
            heat_gpu, value_gpu = gpu.heat(x.to("cuda"), make_target(t.to("cuda"), cosine))
        assert isinstance(heat_gpu, np.ndarray) and heat_gpu.shape == heat_cpu.shape, name
        assert heat_cpu.max() > 0, name
        np.testing.assert_allclose(heat_gpu, heat_cpu, rtol=0, atol=1e-4 * heat_cpu.max(), err_msg=name)
        assert value_gpu == pytest.approx(value_cpu, rel=1e-4, abs=1e-6), name


@CUDA
@pytest.mark.parametrize("target", ["code", "concept"])
def test_the_stage_on_cuda_matches_the_cpu(clip_spec, tmp_path, target) -> None:
    """run_localise with ``localise.device: cuda`` and ``cpu`` on the tiny OpenCLIP streams: the
    targets agree (rel 1e-4), the IoUs and metrics (to 0.02: a pixel at the Otsu cut may flip)
    and the stored overlay maps (to 1e-2, float16)."""
    params, paths = tiny_stage_inputs(tmp_path, clip_spec, target)
    cpu, gpu = run_on(params, paths, "cpu", tmp_path / "cpu"), run_on(params, paths, "cuda", tmp_path / "gpu")
    rows = {}
    for name, out in (("cpu", cpu), ("gpu", gpu)):
        with (out / "pairs.csv").open(newline="") as fh:
            rows[name] = list(csv.DictReader(fh))
    assert [(r["query"], r["method"]) for r in rows["gpu"]] == [(r["query"], r["method"]) for r in rows["cpu"]]
    assert any(float(r["target"]) != 0 for r in rows["cpu"] if r["target"])
    for a, b in zip(rows["cpu"], rows["gpu"], strict=True):
        if a["target"]:
            assert float(b["target"]) == pytest.approx(float(a["target"]), rel=1e-4, abs=1e-6), (a, b)
        assert float(b["iou"]) == pytest.approx(float(a["iou"]), abs=0.02), (a, b)
    metrics_cpu = json.loads((cpu / "metrics.json").read_text())
    metrics_gpu = json.loads((gpu / "metrics.json").read_text())
    assert list(metrics_gpu) == list(metrics_cpu)
    assert all(metrics_gpu[k] == pytest.approx(v, abs=0.02) for k, v in metrics_cpu.items()), (metrics_cpu, metrics_gpu)
    oc, og = read_overlays(cpu / "overlays.npz"), read_overlays(gpu / "overlays.npz")
    assert oc.methods == og.methods and len(oc.queries) == 2
    for qc, qg in zip(oc.queries, og.queries, strict=True):
        for m in oc.methods:
            np.testing.assert_allclose(qg.heats[m], qc.heats[m], rtol=0, atol=1e-2, err_msg=m)
