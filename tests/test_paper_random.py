"""End to end: the paper setting with random weights (``make paper WEIGHTS=random MAX_IMAGES=4``,
i.e. ``python -m sparc paper --weights random``) on a tiny Open Images served over local HTTP,
with no network: DINOv2 ViT-L/14 with registers and OpenCLIP ViT-L-14 at their real size, the
paper's hyper-parameters (L 8192, k 64, batch 256, 50 epochs), every stage through figures and
the browser, and every output saying that its models had random weights.

Slow: about 3-4 minutes on 2 cores (building three ViT-L models, 14 rows through each, 50 training
steps at L 8192, localisation heat maps of two ViT-L towers on 2 composite queries).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.remote_fixtures import openimages_files, serve_mirror
from tests.e2e import command_env, committed_copy, ran_stages, run

pytestmark = pytest.mark.slow

STREAMS = {"dino": 1024, "clip_img": 768, "clip_txt": 768}
STAGES = {"download", "prepare", *(f"extract@{s}" for s in STREAMS), "train", "encode", "concepts",
          "evaluate", "localise", "figures", "browser"}


def offline_env() -> dict[str, str]:
    """The user's environment with the Hugging Face hub off and every other host behind a proxy
    that does not exist: only 127.0.0.1 (the fixture mirror) answers."""
    dead = "http://127.0.0.1:9"
    return dict(command_env(), HF_HUB_OFFLINE="1", HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead,
                https_proxy=dead, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")


def few_queries(raw: dict) -> dict:
    """2 localisation queries (the default 60 composite queries of two ViT-L towers would take
    about 10 minutes here)."""
    raw["localise"].update(queries=2, overlays=2)
    return raw


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory) -> tuple[Path, str]:
    repo = committed_copy(tmp_path_factory.mktemp("paper_random"), few_queries)
    with serve_mirror({"openimages": openimages_files()}) as server:
        cmd = [sys.executable, "-m", "sparc", "paper", "--weights", "random", "--max-images", "4",
               "--base-url", server.url]
        out = run(cmd, repo, env=offline_env()).stdout
    return repo, out


def test_every_stage_runs_offline_with_the_paper_streams_at_their_real_size(paper_run) -> None:
    repo, out = paper_run
    assert STAGES <= ran_stages(out), out
    for stream, dim in STREAMS.items():
        meta = json.loads((repo / f"data/features/openimages/{stream}/meta.json").read_text())
        assert (meta["dim"], meta["n"], meta["weights"], meta["weights_seed"]) == (dim, 14, "random", 0)
        assert meta["model"].endswith("?weights=random") and "random weights" in meta["warning"]
    dino = json.loads((repo / "data/features/openimages/dino/meta.json").read_text())
    assert dino["preprocessing"]["register_tokens"] == 4
    assert dino["preprocessing"]["image_processor"]["crop_size"] == {"height": 224, "width": 224}
    config = json.loads((repo / "data/sae/config.json").read_text())
    assert (config["L"], config["k"], config["dims"]) == (8192, 64, STREAMS)


def test_outputs_say_random_weights(paper_run) -> None:
    repo, _ = paper_run
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["random_weights"] == list(STREAMS) and "not a result" in metrics["warning"]
    assert json.loads((repo / "reports/headline.json").read_text())["random_weights"] == 3
    page = (repo / "reports/browser/index.html").read_text()
    assert 'id="random-weights"' in page and "<title>RANDOM WEIGHTS" in page
    assert (repo / "reports/figures/index.json").is_file()
    show = subprocess.run([sys.executable, "-m", "sparc", "show"], cwd=repo, env=dict(offline_env(), COLUMNS="200"),
                          capture_output=True, text=True, check=True).stdout
    head = next(line.split() for line in show.splitlines() if "Experiment" in line)
    row = next(line.split() for line in show.splitlines() if "paper-random-4" in line)
    name = next(i for i, token in enumerate(row) if "paper-random-4" in token)
    assert head[1] == "random_weights" and row[name + 1] == "3", show
