"""End to end with the reference code's files: `dvc repro` on a tiny Open Images (local mirror)
whose three streams are the reference-format H5 fixture (tests/model/reference_fixtures:
features/<split>/*.h5, rows in the reference's Open Images order) and whose SAE is the
reference's Global TopK checkpoint imported by `train.init` with `train.epochs: 0`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.data.remote_fixtures import openimages_files, serve_mirror
from tests.e2e import committed_copy, ran_stages, run, tiny_params

pytestmark = pytest.mark.slow  # `dvc repro` of 9 stages: about 35 s

FIXTURES = "tests/model/reference_fixtures"
# Images per split whose narratives are the fixture's 17 / 5 / 8 rows (image 1 has two narratives).
SIZES = {"train": 16, "validation": 4, "test": 7}
FILES = {"dino": ("dino_features_dinov2_vitl14_reg.h5", "image"),
         "clip_img": ("clip_image_features_CLIP-ViT-L-14-DataComp.h5", "image"),
         "clip_txt": ("clip_text_features_CLIP-ViT-L-14-DataComp.h5", "caption")}


def reference_params(raw: dict, base_url: str) -> dict:
    """Tiny params: Open Images from ``base_url``, the H5 fixture as streams, the reference's
    checkpoint imported (k 4, L 64, Global TopK, no training step)."""
    raw = tiny_params(raw)
    raw["data"].update(dataset="openimages", max_samples=0)
    raw["download"].update(base_url=base_url, workers=4)
    raw["streams"] = {s: {"model": f"h5:{FIXTURES}/features/{{split}}/{name}?rows=openimages", "input": kind}
                      for s, (name, kind) in FILES.items()}
    raw.update(k=4, L=64, topk="global")
    raw["train"].update(init=f"{FIXTURES}/global", epochs=0)
    raw["evaluate"]["probe_min_positives"] = 2
    return raw


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, str]:
    dst = tmp_path_factory.mktemp("reference")
    with serve_mirror({"openimages": openimages_files(SIZES)}) as server:
        committed_copy(dst, lambda raw: reference_params(raw, server.url))
        out = run(["dvc", "repro"], dst).stdout
    return dst, out


def test_reference_features_and_checkpoint_run_through_the_browser(repo) -> None:
    dst, out = repo
    assert ran_stages(out) == {"check", "download", "prepare", "extract@dino", "extract@clip_img", "extract@clip_txt",
                               "train", "encode", "concepts", "evaluate", "localise", "figures", "browser"}, out
    metrics = json.loads((dst / "reports/metrics.json").read_text())
    assert metrics["n_eval"] == 8
    meta = json.loads((dst / "data/features/openimages/dino/meta.json").read_text())
    assert [f["split"] for f in meta["source"]] == ["train", "val", "test"] and meta["n"] == 30
    # no image model to take heat maps from: localisation scores the chance baseline only
    assert set(json.loads((dst / "reports/localise/metrics.json").read_text())) == {"ap_chance", "miou_chance"}
    assert (dst / "reports/browser/index.html").is_file()


def test_stored_rows_are_the_h5_rows_of_each_sample(repo) -> None:
    """The store's row of sample <ImageID>_<k> is the H5 row of that narrative (float16)."""
    import h5py

    dst, _ = repo
    ids = (dst / "data/features/openimages/clip_txt/ids.txt").read_text().split()
    stored = np.load(dst / "data/features/openimages/clip_txt/features.npy")
    rows = []
    for split in ("train", "val", "test"):
        with h5py.File(dst / FIXTURES / "features" / split / FILES["clip_txt"][0]) as fh:
            rows.append(fh["features"][:])
    np.testing.assert_array_equal(stored, np.concatenate(rows).astype(np.float16))
    assert len(ids) == 30


def test_the_imported_sae_is_the_reference_checkpoint(repo) -> None:
    """train.epochs 0: data/sae holds the reference's weights as they were (no training step)."""
    import torch

    from sparc.model.io import load_sae
    from sparc.model.reference import load_reference

    dst, _ = repo
    saved, ref = load_sae(dst / "data/sae").state_dict(), load_reference(dst / FIXTURES / "global").state_dict()
    assert saved.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(saved[key], ref[key], rtol=0, atol=0)
