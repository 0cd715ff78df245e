"""End to end: `dvc repro` downloads a small Open Images and a small COCO from a local HTTP server
(the real file formats, ``download.base_url`` pointing at it) and runs through `evaluate` (COCO
then through `localise` on its instance masks).

Each dataset runs once per module in its own copy of the repository with tiny parameters and two
of the offline streams (EfficientNet-Lite0 and MiniLM).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from sparc.params import read_yaml
from tests.data.remote_fixtures import coco_files, coco_image_id, openimages_files, serve_mirror
from tests.e2e import ROOT, ran_stages, run, tiny_params, tracked_files

pytestmark = pytest.mark.slow

STAGES = {"download", "prepare", "extract@effnet", "extract@minilm", "train", "encode", "concepts", "evaluate"}


@pytest.fixture(scope="module")
def server():
    with serve_mirror({"openimages": openimages_files(), "coco": coco_files()}) as srv:
        yield srv


def dataset_repo(dst: Path, server, dataset: str, options: dict) -> tuple[Path, str]:
    """A committed copy of the repository set to ``dataset`` on the local mirror; returns it and
    the output of its `dvc repro evaluate`."""
    for rel in tracked_files():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    from ruamel.yaml import YAML

    raw = tiny_params(read_yaml(dst / "params.yaml"))
    raw["data"].update(dataset=dataset, max_samples=0)
    raw["data"][dataset].update(options)
    raw["download"].update(base_url=server.url, workers=4)
    raw["streams"].pop("vit")
    raw["evaluate"]["probe_min_positives"] = 2
    with (dst / "params.yaml").open("w") as fh:
        YAML().dump(raw, fh)
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.name", "t"],
                ["git", "config", "user.email", "t@t"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        run(cmd, dst)
    return dst, run(["dvc", "repro", "evaluate"], dst).stdout


@pytest.fixture(scope="module")
def openimages(tmp_path_factory, server) -> tuple[Path, str]:
    return dataset_repo(tmp_path_factory.mktemp("oi"), server, "openimages", {"max_images": 4})


@pytest.fixture(scope="module")
def coco(tmp_path_factory, server) -> tuple[Path, str]:
    return dataset_repo(tmp_path_factory.mktemp("coco"), server, "coco", {"max_images": 5, "captions": "each"})


def samples(repo: Path, dataset: str) -> list[dict]:
    with (repo / "data/prepared" / dataset / "samples.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_openimages_subset_runs_through_evaluate(openimages, server) -> None:
    repo, out = openimages
    assert ran_stages(out) == STAGES, out
    manifest = json.loads((repo / "data/raw/openimages/manifest.json").read_text())
    assert manifest["info"]["images"] == {"train": 4, "validation": 3, "test": 4}
    rows = samples(repo, "openimages")
    assert len(rows) == 4 + 1 + 3 + 1 + 4 + 1  # the second image of each split has two narratives
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    test_rows = [r for r in rows if r["split"] == "test"]
    assert metrics["n_eval"] == len(test_rows) == 5
    assert metrics["retrieval"]["n"] == len({r["group"] for r in test_rows}) == 4  # one caption per image
    assert "effnet->minilm" in metrics["retrieval"]


def test_openimages_second_repro_is_up_to_date_and_a_corrupt_image_is_fetched_again(openimages) -> None:
    repo, _ = openimages
    out = run(["dvc", "repro", "evaluate"], repo).stdout
    assert ran_stages(out) == set(), out
    image = next((repo / "data/raw/openimages/test").iterdir())
    good = image.read_bytes()
    image.write_bytes(good[:-10] + bytes(10))
    out = run(["dvc", "repro", "evaluate"], repo).stdout
    assert ran_stages(out) == {"download"}, out  # restored, so nothing downstream re-runs
    assert image.read_bytes() == good


def test_coco_subset_with_one_sample_per_caption_runs_through_evaluate(coco) -> None:
    repo, out = coco
    assert ran_stages(out) == STAGES, out
    rows = samples(repo, "coco")
    # the first 5 images with captions of train2017, the 4 of val2017 (its last has none), 5 captions each
    assert len(rows) == (5 + 4) * 5
    by_group: dict[str, set[str]] = {}
    for r in rows:
        by_group.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_group.values())
    annotations = (repo / "data/prepared/coco/annotations.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["group"] for line in annotations) == sorted(by_group)
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["n_eval"] == 20 and metrics["retrieval"]["n"] == 4


def test_coco_localises_each_test_image_and_present_category_on_its_masks(coco) -> None:
    """`localise` on coco (localise.source auto): one pair per val2017 image and category, the
    query the prompt, the real EfficientNet-Lite0 and MiniLM (about 35 s on 2 busy cores)."""
    repo, _ = coco
    out = run(["dvc", "repro", "localise"], repo).stdout
    assert ran_stages(out) == {"localise"}, out
    metrics = json.loads((repo / "reports/localise/metrics.json").read_text())
    assert sorted(metrics) == ["ap_chance", "ap_effnet", "miou_chance", "miou_effnet"]
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    details = json.loads((repo / "reports/localise/details.json").read_text())
    assert (details["source"], details["n_images"], details["n_queries"]) == ("masks", 4, 5)
    with (repo / "reports/localise/pairs.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["method"] == "effnet"]
    stem = [f"{coco_image_id('val2017', i):012d}" for i in range(4)]  # the 4 captioned val2017 images
    assert [(r["image"], r["category"], r["prompt"]) for r in rows] == [
        (stem[0], "person", "a photo of a person."), (stem[0], "dog", "a photo of a dog."),
        (stem[1], "bicycle", "a photo of a bicycle."), (stem[2], "car", "a photo of a car."),
        (stem[3], "dog", "a photo of a dog."),
    ]
