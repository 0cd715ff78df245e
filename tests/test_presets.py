"""The paper preset, applied by DVC's own --set-param code, gives the paper setting of method.md."""

import shutil
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from sparc.params import Params, load_params
from sparc.presets import PAPER_MODELS, paper_command, paper_overrides

ROOT = Path(__file__).resolve().parents[1]

# The paper setting as method.md states it (sections 1, 2 and 4): parameter, reader, value.
PAPER_TABLE = [
    ("L", lambda p: p.L, 8192),
    ("k", lambda p: p.k, 64),
    ("lambda", lambda p: p.lam, 1.0),
    ("topk", lambda p: p.topk, "global"),
    ("method", lambda p: p.method, "sparc"),
    ("seed", lambda p: p.seed, 42),
    ("batch", lambda p: p.train.batch_size, 256),
    ("epochs", lambda p: p.train.epochs, 50),
    ("lr", lambda p: p.train.lr, 1e-4),
    ("eps", lambda p: p.train.adam_eps, 1e-8),
    ("k_aux", lambda p: p.train.k_aux, 64),
    ("aux coefficient", lambda p: p.train.aux_coef, 1 / 32),
    ("dead steps", lambda p: p.train.dead_steps, 1000),
    ("revival interval", lambda p: p.train.revive_every, 100),
    ("top-n", lambda p: p.concepts.top_n, 50),
    ("purity", lambda p: p.concepts.purity_threshold, 0.3),
    ("concepts on the test split", lambda p: p.concepts.split, "test"),
    ("probe classes with > 50 positives", lambda p: p.evaluate.probe_min_positives, 51),
    ("probe candidates", lambda p: p.evaluate.probe_candidates, 20),
    ("every sample", lambda p: p.data.max_samples, 0),
]


def applied(tmp_path, csv: str, hierarchy: str = "") -> Params:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    apply_overrides(path, paper_overrides(csv, hierarchy))
    return load_params(path)


@pytest.fixture()
def paper(tmp_path) -> Params:
    return applied(tmp_path, "/data/coco/captions.csv", "/data/coco/hierarchy.json")


@pytest.mark.parametrize(("name", "read", "value"), PAPER_TABLE, ids=[row[0] for row in PAPER_TABLE])
def test_paper_preset_sets_every_value_of_the_paper_setting(paper, name, read, value):
    assert read(paper) == pytest.approx(value) if isinstance(value, float) else read(paper) == value


def test_paper_preset_streams_and_data(paper):
    assert {n: (s.model, s.input) for n, s in paper.streams.items()} == PAPER_MODELS
    assert paper.data.dataset == "folder"
    assert paper.data.folder.csv == "/data/coco/captions.csv"
    assert paper.data.folder.hierarchy == "/data/coco/hierarchy.json"


@pytest.mark.parametrize(
    "csv", ["/data/it's here/captions.csv", 'C:\\data\\"q"\\', "/d/a,b=c [x] {y}.csv", "/d/o'\\'k.csv"]
)
def test_paths_with_quotes_survive_the_override(tmp_path, csv):
    """An apostrophe (or quote, backslash, comma...) in the path reaches params.yaml unchanged."""
    params = applied(tmp_path, csv, hierarchy=csv + ".json")
    assert params.data.folder.csv == csv
    assert params.data.folder.hierarchy == csv + ".json"


def test_paper_command_is_an_experiment():
    cmd = paper_command("/x.csv")
    assert cmd[:5] == ["dvc", "exp", "run", "-n", "paper"]
    assert cmd[5::2] == ["-S"] * len(paper_overrides("/x.csv"))
