"""End to end: the real DVC pipeline on a handful of emoji, in a temporary copy of the repository.

This runs `dvc repro` exactly as a user does (real models, real data, tiny parameters), then
checks that a second `dvc repro` has nothing to do and that changing the training seed re-runs
only the stages that depend on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparc.localise.overlays import read_overlays
from sparc.params import read_yaml
from sparc.report.browser import embedded_data
from tests.e2e import BIN, copy_repo, ran_stages, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(pipeline_run, tmp_path_factory) -> Path:
    """This module's copy of the session's pipeline run (tests/conftest.py)."""
    return copy_repo(pipeline_run, tmp_path_factory.mktemp("repo"))


def test_repro_builds_aligned_features(repo):
    from sparc.features.store import load_streams

    params = read_yaml(repo / "params.yaml")
    streams = load_streams(repo / "data/features/emoji", list(params["streams"]))
    prepared = json.loads((repo / "data/prepared/emoji/meta.json").read_text())
    for stream in streams.values():
        assert len(stream) == prepared["n_samples"] == 40
        assert stream.meta["dataset_fingerprint"] == prepared["fingerprint"]


def test_second_repro_has_nothing_to_do(repo):
    out = run(["dvc", "repro"], repo).stdout
    assert "Data and pipelines are up to date" in out, out
    status = run(["dvc", "status"], repo).stdout
    assert "up to date" in status, status


def test_repro_reaches_the_evaluation(repo):
    """Every stage ran: training metrics, per-stream codes, concepts and the evaluation metrics."""
    params = read_yaml(repo / "params.yaml")
    streams = list(params["streams"])
    train = json.loads((repo / "reports/train/metrics.json").read_text())
    assert train["step"] > 0
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["n_eval"] > 0
    assert set(metrics["sparsity"]["l0_joint"]) == set(streams)
    assert all(0 < v <= params["k"] for v in metrics["sparsity"]["l0_per_stream"].values())
    for kind in ("joint", "per_stream"):
        assert 0.0 <= metrics["jaccard"][kind]["depth_0"]["all"] <= 1.0
        assert sum(metrics["patterns"][kind]["counts"].values()) == params["L"]
        assert len(metrics["reconstruction"][kind]["nmse"]) == len(streams) ** 2
    concepts = (repo / "reports/concepts/concepts.csv").read_text().splitlines()
    assert len(concepts) == params["L"] + 1
    headline = json.loads((repo / "reports/headline.json").read_text())
    assert headline["jaccard_d0"] == metrics["jaccard"]["joint"]["depth_0"]["all"]


def test_repro_localises_the_text_queries(repo):
    """The localise stage scored its composite queries for every image stream and the chance map."""
    metrics = json.loads((repo / "reports/localise/metrics.json").read_text())
    assert set(metrics) == {f"{m}_{s}" for m in ("ap", "miou") for s in ("effnet", "vit", "chance")}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    details = json.loads((repo / "reports/localise/details.json").read_text())
    assert details["n_queries"] == 4 and details["text_stream"] == "minilm"
    overlays = read_overlays(repo / "reports/localise/overlays.npz")
    assert set(overlays.methods) == {k[len("ap_"):] for k in metrics if k.startswith("ap_")}
    assert len(overlays.queries) == 2 and all(q.text for q in overlays.queries)


def test_repro_ends_with_figures_and_the_browser(repo):
    figures = json.loads((repo / "reports/figures/index.json").read_text())
    for name in ("reconstruction.png", "jaccard_depth.png", "patterns.png", "retrieval.png",
                 "localisation.png", "localisation_scores.png"):
        assert (repo / "reports/figures" / name).read_bytes()[:4] == b"\x89PNG", name
    assert figures
    html = (repo / "reports/browser/index.html").read_text()
    assert "<script" in html and "http://" not in html and "https://" not in html
    localisation = embedded_data(repo / "reports/browser/index.html")["localisation"]
    assert len(localisation["queries"]) == 2 and localisation["metrics"]
    for q in localisation["queries"]:
        for img in (q["img"], *(p["img"] for p in q["panels"])):
            assert (repo / "reports/browser" / img).read_bytes()[:4] == b"\x89PNG", img


def test_pull_from_a_remote_restores_outputs_without_recomputing(repo, tmp_path):
    """The README's remote workflow: push the outputs, clone, `dvc pull`, and nothing is left to run."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["dvc", "remote", "add", "-d", "storage", str(tmp_path / "remote")], repo)
    run([*git, "add", "dvc.lock", ".dvc/config"], repo)
    run([*git, "commit", "-qm", "lock and remote"], repo)
    run(["dvc", "push"], repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    for rel in ("reports/metrics.json", "data/features/emoji/minilm/features.npy"):
        assert (clone / rel).read_bytes() == (repo / rel).read_bytes(), rel
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], clone).stdout


def test_misspelt_parameter_fails_the_repro(repo):
    """A key no stage reads (`lamda` beside `lambda`) stops `dvc repro` with one clear line."""
    path = repo / "params.yaml"
    original = path.read_text()
    path.write_text(original.replace("\nlambda:", "\nlamda: 0.0\nlambda:", 1))
    try:
        env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        proc = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
    finally:
        path.write_text(original)
    assert proc.returncode != 0
    assert "error: lamda: unknown parameter (did you mean lambda?)" in proc.stdout + proc.stderr
    assert ran_stages(proc.stdout) == {"check"}, proc.stdout


def test_seed_experiment_reruns_only_training_and_after(repo):
    """`dvc exp run -S seed=1` reuses the prepared data and the features (last: it changes params)."""
    out = run(["dvc", "exp", "run", "-n", "seed1", "-S", "seed=1"], repo).stdout
    assert ran_stages(out) == {"check", "train", "encode", "concepts", "evaluate", "localise", "figures", "browser"}, out
    assert "seed1" in run(["dvc", "exp", "list", "--name-only"], repo).stdout.split()
    assert read_yaml(repo / "params.yaml")["seed"] == 1


def test_ablation_grid_compare_and_exp_show(repo):
    """The four runs of the paper's ablation as one command, tabulated by `sparc compare`; `dvc exp
    show` lists the headline metrics only, and `sparc show` (its README view) fits 200 columns."""
    configs = "sparc,global-lam0,local-lam1,local-lam0"
    run([sys.executable, "-m", "sparc", "ablation", "--seeds", "0", "--only", configs], repo)
    out = run([sys.executable, "-m", "sparc", "compare", "--grid", "ablation", "--figure", "reports/compare.png"], repo)
    header = next(line for line in out.stdout.splitlines() if line.startswith("| metric"))
    for title in ("Global, λ=1 (SPARC)", "Global, λ=0", "Local, λ=1", "Local, λ=0"):
        assert title in header
    assert (repo / "reports/compare.png").read_bytes()[:4] == b"\x89PNG"
    show = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    names = [r["name"] for c in show for e in (c.get("experiments") or []) for r in e["revs"]]
    assert sorted(n for n in names if n.startswith("ablation-")) == sorted(
        f"ablation-{c}-s0" for c in configs.split(",")
    )
    metrics = next(r["data"]["metrics"] for c in show for e in (c.get("experiments") or []) for r in e["revs"])
    # the only DVC metrics: what exp show lists
    assert sorted(metrics) == ["reports/headline.json", "reports/localise/metrics.json"]
    env = dict(os.environ, COLUMNS="200", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "sparc", "show"], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 200 and "…" not in proc.stdout, proc.stdout
    assert sum("[ablation-" in line for line in lines) == 4, proc.stdout
    assert "jaccard_ps_live" in proc.stdout and "nmse_cross_lf" in proc.stdout
    revs = ["ablation-sparc-s0", "ablation-local-lam0-s0"]
    plots = json.loads(run(["dvc", "plots", "diff", *revs, "--json"], repo).stdout)["data"]
    for title in ("Hierarchical Jaccard by depth", "Retrieval R@1, per-stream codes (query->gallery)"):
        assert plots[title][0]["revisions"] == revs, title
