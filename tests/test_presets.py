"""The paper preset, applied by DVC's own --set-param code, gives valid paper-setting params."""

import shutil
from pathlib import Path

from dvc.utils.hydra import apply_overrides

from sparc.params import load_params
from sparc.presets import PAPER_MODELS, paper_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_paper_overrides_give_the_paper_setting(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    apply_overrides(path, paper_overrides("/data/coco/captions.csv", "/data/coco/hierarchy.json"))
    params = load_params(path)
    assert (params.L, params.k, params.lam, params.seed) == (8192, 64, 1.0, 42)
    assert (params.topk, params.method) == ("global", "sparc")
    assert (params.train.batch_size, params.train.epochs, params.train.lr) == (256, 50, 1.0e-4)
    assert {n: (s.model, s.input) for n, s in params.streams.items()} == PAPER_MODELS
    assert params.data.dataset == "folder"
    assert params.data.folder.csv == "/data/coco/captions.csv"
    assert params.data.folder.hierarchy == "/data/coco/hierarchy.json"
