"""A folder dataset without labels, labelled from its captions through WordNet
(``data.labels_from: captions``), runs through prepare, train, encode, concepts, evaluate, figures
and browser with named latents and a Jaccard by depth; with the option off, prepare writes what
it always did.

Tiny data made in code: planted concepts (sparc.data.planted) whose samples' captions name
nouns of their concepts, so the latents that learn a concept fire on captions naming it.
Needs Debian's ``wordnet-base`` (installed by `make test`); fails naming it otherwise.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparc.data.prepared import load_prepared, prepare_dataset
from sparc.params import ParamsError, params_from_dict

# The planted leaves (4 parents x 4 children) as nouns: animals, vehicles, fruit, furniture.
NOUNS = ["dog", "cat", "horse", "cow", "car", "bus", "bicycle", "boat",
         "apple", "banana", "strawberry", "lemon", "chair", "table", "bed", "lamp"]
STREAMS = {"img": {"model": "npy:/x.npy", "input": "image"}, "txt": {"model": "npy:/y.npy", "input": "caption"}}
DIMS = {"img": 16, "txt": 12}
DEPTH = 12


def write_folder(root: Path, n: int) -> tuple[Path, list[str], dict[str, np.ndarray]]:
    """A folder CSV with empty labels and captions naming each sample's planted concepts; returns
    the CSV, the ids and the planted features."""
    from sparc.data.planted import PlantedConfig, make_planted

    planted = make_planted(PlantedConfig(dims=dict(DIMS), n_samples=n))
    leaf = {c: NOUNS[i] for i, c in enumerate(planted.concept_ids)}
    (root / "images").mkdir(parents=True)
    rows = []
    for i, (sid, labels) in enumerate(zip(planted.ids, planted.labels, strict=True)):
        Image.new("RGB", (4, 4), (i % 256, 0, 0)).save(root / "images" / f"{sid}.png")
        nouns = [leaf[lab] for lab in labels if lab in leaf] or ["thing"]
        rows.append({"id": sid, "image": f"images/{sid}.png", "caption": "a photo of a " + " and a ".join(nouns), "labels": ""})
    with (root / "data.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "image", "caption", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "data.csv", planted.ids, planted.features


def make_params(csv_path: Path, **data):
    return params_from_dict({
        "L": 32, "k": 4, "streams": STREAMS,
        "data": {"dataset": "folder", "folder": {"csv": str(csv_path)}, "test_fraction": 0.4, **data},
        "train": {"batch_size": 32, "epochs": 30, "device": "cpu"},
        "concepts": {"top_n": 10, "zero_shot_vocab": 0},
        "evaluate": {"batch_size": 64, "probe_min_positives": 5, "probe_candidates": 5, "device": "cpu"},
        "figures": {"concepts": ["dog"], "queries": 2},
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """Every stage of the pipeline on the label-free folder data, in this process."""
    from sparc.evaluate.concepts_stage import run_concepts
    from sparc.evaluate.encode_stage import run_encode
    from sparc.evaluate.evaluate_stage import run_evaluate
    from sparc.features.store import write_stream
    from sparc.report.browser import build_browser
    from sparc.report.figures_stage import run_figures
    from sparc.train.stage import run_train

    root = tmp_path_factory.mktemp("unlabeled")
    csv_path, ids, features = write_folder(root / "folder", 240)
    params = make_params(csv_path, labels_from="captions", wordnet_depth=DEPTH)
    prepared = prepare_dataset(params.data, root / "prepared")
    fingerprint = json.loads((prepared / "meta.json").read_text())["fingerprint"]
    for s, spec in STREAMS.items():
        write_stream(root / "features" / s, ids, features[s], {**spec, "dataset_fingerprint": fingerprint})
    sae = run_train(params, features_root=root / "features", prepared_dir=prepared, out_dir=root / "sae",
                    reports_dir=root / "reports" / "train", checkpoints_dir=root / "ckpt", progress=False)
    codes = run_encode(params, sae_dir=sae, features_root=root / "features", prepared_dir=prepared,
                       out_dir=root / "codes", device="cpu", progress=False)
    concepts = run_concepts(params, codes_dir=codes, prepared_dir=prepared, out_dir=root / "reports" / "concepts")
    metrics = run_evaluate(params, codes_dir=codes, prepared_dir=prepared, features_root=root / "features",
                           sae_dir=sae, concepts_dir=concepts, metrics_path=root / "reports" / "metrics.json", device="cpu")
    dirs = dict(prepared_dir=prepared, codes_dir=codes, concepts_dir=concepts, reports_dir=root / "reports")
    figures = run_figures(params, **dirs)
    browser = build_browser(params, **dirs)
    return {"prepared": prepared, "concepts": concepts, "metrics": metrics, "figures": figures, "browser": browser}


@pytest.mark.slow  # the module's pipeline: about 30 s on 2 busy cores
def test_prepare_labels_the_captions_and_records_it(run: dict[str, Path]) -> None:
    data = load_prepared(run["prepared"])
    assert data.meta["labels"]["from"] == "captions" and data.meta["labels"]["wordnet_depth"] == DEPTH
    assert data.meta["labels"]["n_dataset_labels"] == 0 and data.meta["labels"]["coverage"] > 0.9
    assert set(data.meta["labels"]["wordnet"]) == {"index.noun", "data.noun"}
    assert data.hierarchy.max_depth == DEPTH and data.meta["hierarchy_depth"] == DEPTH
    by_caption = dict(zip(data.captions, data.labels, strict=True))
    assert by_caption["a photo of a dog"] == ("canine.n.02",)  # dog.n.01 lies at depth 13: cut to 12
    assert by_caption["a photo of a car"] == ("car.n.01",)  # at depth 11: itself
    assert data.hierarchy.names["canine.n.02"] == "canine"


@pytest.mark.slow  # the module's pipeline: about 30 s on 2 busy cores
def test_latents_are_named_after_wordnet_nouns(run: dict[str, Path]) -> None:
    with (run["concepts"] / "concepts.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    names = {r[f"{s}_name"] for r in rows for s in STREAMS} - {""}
    hierarchy = load_prepared(run["prepared"]).hierarchy
    assert names and names <= set(hierarchy.names.values())
    summary = json.loads((run["concepts"] / "summary.json").read_text())
    assert all(v > 0 for v in summary["joint"]["named_fraction"].values())


@pytest.mark.slow  # the module's pipeline: about 30 s on 2 busy cores
def test_jaccard_by_depth_runs_to_the_wordnet_depth(run: dict[str, Path]) -> None:
    metrics = json.loads(run["metrics"].read_text())
    for kind in ("joint", "per_stream"):
        assert [f"depth_{d}" for d in range(DEPTH + 1)] == [k for k in metrics["jaccard"][kind] if k.startswith("depth_")]
    assert metrics["jaccard"]["joint"][f"depth_{DEPTH}"]["live"] > 0
    assert metrics["probes"]["n_classes"] > 0
    assert (run["figures"] / "jaccard_depth.png").stat().st_size > 0
    page = "".join(p.read_text(errors="ignore") for p in run["browser"].rglob("*") if p.suffix in (".html", ".js", ".json"))
    assert "canine" in page or "vehicle" in page


def test_prepare_is_unchanged_when_the_option_is_off(tmp_path: Path) -> None:
    """labels_from: dataset keeps the folder's own (empty) labels and writes no ``labels`` key;
    the bytes equal a prepare run with the option absent from the parameters."""
    csv_path, _, _ = write_folder(tmp_path / "folder", 40)
    off = prepare_dataset(make_params(csv_path, labels_from="dataset").data, tmp_path / "off")
    absent = prepare_dataset(make_params(csv_path).data, tmp_path / "absent")
    for name in ("samples.csv", "hierarchy.json", "meta.json"):
        assert (off / name).read_bytes() == (absent / name).read_bytes()
    meta = json.loads((off / "meta.json").read_text())
    assert "labels" not in meta and meta["n_labels"] == 0
    assert all(not lab for lab in load_prepared(off).labels)


def test_option_checks(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ParamsError, match="data.wordnet_depth: must be >= 1"):
        make_params(tmp_path / "x.csv", labels_from="captions", wordnet_depth=0)
    with pytest.raises(ParamsError, match="data.labels_from: 'nouns' is not one of dataset, captions"):
        make_params(tmp_path / "x.csv", labels_from="nouns")
    with pytest.raises(ParamsError, match="data.folder.hierarchy: data.labels_from: captions replaces"):
        params_from_dict({"streams": STREAMS, "data": {"dataset": "folder", "labels_from": "captions",
                                                       "folder": {"csv": "x.csv", "hierarchy": "h.json"}}})
    import sparc.data.wordnet as wordnet

    csv_path, _, _ = write_folder(tmp_path / "folder", 10)
    monkeypatch.setattr(wordnet, "WORDNET_DIR", tmp_path / "no-wordnet")
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        prepare_dataset(make_params(csv_path, labels_from="captions").data, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()
