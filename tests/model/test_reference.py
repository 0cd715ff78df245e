"""The reference code's checkpoints in and out (sparc.model.reference), against fixtures made by
the reference code itself (tests/model/reference_fixtures/make_fixtures.py, commit 7f36faa):
the imported model's codes and decodings equal the reference model's forward outputs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sparc.cli import main
from sparc.model.io import save_sae
from sparc.model.reference import (
    CHECKPOINT,
    ReferenceCheckpointError,
    export_reference,
    load_initial,
    load_reference,
    read_state_dict,
)

FIXTURES = Path(__file__).parent / "reference_fixtures"
STREAMS = ["dino", "clip_img", "clip_txt"]
RULES = ["global", "local"]
TOL = 1e-6


@pytest.fixture(scope="module")
def outputs() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "outputs.npz") as npz:
        return dict(npz)


def check_matches_reference(model, outputs: dict[str, np.ndarray], rule: str) -> None:
    """Codes: the reference's indices exactly, its values to TOL; every self and cross decoding to TOL."""
    x = {s: torch.from_numpy(outputs[f"{rule}/x/{s}"]) for s in STREAMS}
    with torch.no_grad():
        codes = model.encode(x)
        for s in STREAMS:
            ref_idx = outputs[f"{rule}/indices/{s}"]
            np.testing.assert_array_equal(codes[s].indices.numpy(), ref_idx)
            ref_values = np.take_along_axis(outputs[f"{rule}/codes/{s}"], ref_idx, axis=1)
            np.testing.assert_allclose(codes[s].values.numpy(), ref_values, rtol=0, atol=TOL)
            for t in STREAMS:
                np.testing.assert_allclose(model.decode(codes[s], t).numpy(), outputs[f"{rule}/recon/{t}/{s}"],
                                           rtol=0, atol=TOL)


@pytest.mark.parametrize("rule", RULES)
def test_imported_model_reproduces_the_reference_forward(rule, outputs) -> None:
    model = load_reference(FIXTURES / rule)
    assert model.cfg.topk == rule and model.cfg.k == 4 and model.cfg.L == 64
    assert model.cfg.dims == {"dino": 16, "clip_img": 12, "clip_txt": 8}
    check_matches_reference(model, outputs, rule)


def test_streams_follow_the_callers_order(outputs) -> None:
    model = load_reference(FIXTURES / "global" / CHECKPOINT, ["clip_txt", "dino", "clip_img"])
    assert model.streams == ["clip_txt", "dino", "clip_img"]
    check_matches_reference(model, outputs, "global")


@pytest.mark.parametrize("rule", RULES)
def test_export_gives_the_reference_state_dict_back(rule, tmp_path, outputs) -> None:
    """export -> the reference's keys, shapes and values (what its strict load_state_dict needs;
    make_fixtures.py --check loads it into the reference class itself) -> import -> same outputs."""
    model = load_reference(FIXTURES / rule)
    out = export_reference(model, tmp_path / "exported")
    original = read_state_dict(FIXTURES / rule / CHECKPOINT)
    exported = read_state_dict(out / CHECKPOINT)
    assert list(exported) == list(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and exported[key].shape == tensor.shape, key
        if not key.startswith("stats_last_nonzero_"):
            torch.testing.assert_close(exported[key], tensor, rtol=0, atol=0)
    args = json.loads((out / "run_config.json").read_text())["args"]
    assert {k: args[k] for k in ("topk_type", "n_latents", "k", "auxk", "use_sparse_decoder")} == {
        "topk_type": rule, "n_latents": 64, "k": 4, "auxk": 8, "use_sparse_decoder": False}
    check_matches_reference(load_reference(out), outputs, rule)


def test_export_command_writes_a_trained_sae_in_the_reference_format(tmp_path, outputs, capsys) -> None:
    sae = save_sae(load_reference(FIXTURES / "local"), tmp_path / "sae")
    params = Path(__file__).resolve().parents[2] / "params.yaml"
    assert main(["--params", str(params), "export", "--reference", str(tmp_path / "ref"), "--sae", str(sae)]) == 0
    check_matches_reference(load_reference(tmp_path / "ref"), outputs, "local")
    # train.init also takes this project's own SAE folder
    check_matches_reference(load_initial(sae, STREAMS, k=4, topk="local"), outputs, "local")


class Payload:
    """A pickle that runs a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_a_malicious_pickle_is_refused_and_never_run(tmp_path, zipped) -> None:
    marker = tmp_path / "PWNED"
    pth = tmp_path / CHECKPOINT
    if zipped:
        torch.save({"encoders.dino.weight": Payload(marker)}, pth)
    else:
        pth.write_bytes(pickle.dumps({"encoders.dino.weight": Payload(marker)}))
    with pytest.raises(ReferenceCheckpointError, match="refused: not a plain state dict"):
        load_reference(tmp_path, k=4, topk="global")
    assert not marker.exists()


def copy_state(tmp_path: Path, edit) -> Path:
    state = read_state_dict(FIXTURES / "global" / CHECKPOINT)
    edit(state)
    torch.save(state, tmp_path / CHECKPOINT)
    (tmp_path / "run_config.json").write_text((FIXTURES / "global" / "run_config.json").read_text())
    return tmp_path


def test_keys_that_do_not_fit_are_named(tmp_path) -> None:
    def edit(state):
        state["encoder.extra"] = torch.zeros(1)
        del state["latent_biases.clip_txt"]

    with pytest.raises(ReferenceCheckpointError, match=r"unexpected \['encoder.extra'\], missing \['latent_biases.clip_txt'\]"):
        load_reference(copy_state(tmp_path, edit))


def test_a_wrong_shape_is_named(tmp_path) -> None:
    def edit(state):
        state["decoders.dino.weight"] = state["decoders.dino.weight"][:, :10]

    with pytest.raises(ReferenceCheckpointError, match=r"decoders.dino.weight \(16, 10\) \(expected \(16, 64\)\)"):
        load_reference(copy_state(tmp_path, edit))


def test_other_stream_names_are_refused() -> None:
    with pytest.raises(ReferenceCheckpointError, match="are not the streams"):
        load_reference(FIXTURES / "global", ["effnet", "vit", "minilm"])


def test_without_run_config_k_and_topk_come_from_the_caller(tmp_path, outputs) -> None:
    (tmp_path / CHECKPOINT).write_bytes((FIXTURES / "global" / CHECKPOINT).read_bytes())
    with pytest.raises(ReferenceCheckpointError, match="so k must be given"):
        load_reference(tmp_path)
    check_matches_reference(load_reference(tmp_path, k=4, topk="global"), outputs, "global")
    with pytest.raises(ReferenceCheckpointError, match="k is 4, not 8"):
        load_reference(FIXTURES / "global", k=8)
