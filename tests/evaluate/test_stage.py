"""The encode / concepts / evaluate stages on a tiny synthetic setup made in code.

Features and labels come from the planted-concept generator; the prepared dataset, the feature
store and the SAE are written with the project's own writers, so the stages read exactly what the
pipeline produces.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sparc.evaluate.concepts_stage import run_concepts
from sparc.evaluate.encode_stage import run_encode
from sparc.evaluate.evaluate_stage import run_evaluate
from sparc.evaluate.run_files import EvaluateInputError
from sparc.features.random_weights import WARNING, meta_fields
from sparc.model.codes import SparseCodes
from sparc.model.io import load_sae, save_sae
from sparc.model.sae import MultiStreamSAE, SAEConfig
from sparc.params import Params, ParamsError, params_from_dict
from tests.topk_codes import assert_topk_code, logit_tol

CLIP = "openclip:ViT-B-32@laion2b_s34b_b79k"
STREAMS = {
    "clip_img": {"model": CLIP, "input": "image"},
    "clip_txt": {"model": CLIP, "input": "caption"},
    "dino": {"model": "dinov2:facebook/dinov2-small", "input": "image"},
}
DIMS = {"clip_img": 16, "clip_txt": 16, "dino": 20}
L, K = 24, 4


@dataclass
class Setup:
    root: Path
    params: Params
    prepared: Path
    features: Path
    sae: Path

    def encode(self, out: Path, params: Params | None = None, sae: Path | None = None) -> Path:
        return run_encode(
            params or self.params, sae_dir=sae or self.sae, features_root=self.features,
            prepared_dir=self.prepared, out_dir=out, device="cpu", progress=False,
        )

    def concepts(self, codes: Path, out: Path, params: Params | None = None) -> Path:
        return run_concepts(params or self.params, codes_dir=codes, prepared_dir=self.prepared, out_dir=out)

    def evaluate(self, codes: Path, concepts: Path, metrics: Path, sae: Path | None = None) -> Path:
        return run_evaluate(
            self.params, codes_dir=codes, prepared_dir=self.prepared, features_root=self.features,
            sae_dir=sae or self.sae, concepts_dir=concepts, metrics_path=metrics, device="cpu",
        )


def make_params(**over) -> Params:
    raw = {
        "L": L, "k": K, "streams": STREAMS,
        "concepts": {"top_n": 10, "purity_threshold": 0.3},
        "evaluate": {"batch_size": 64, "probe_min_positives": 5, "probe_candidates": 5},
    }
    raw.update(over)
    return params_from_dict(raw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_inputs) -> Setup:
    root = tmp_path_factory.mktemp("stage")
    made = tiny_inputs(root, STREAMS, DIMS, L=L, k=K, n_samples=240)
    return Setup(root, make_params(), made.prepared, made.features, made.sae)


@pytest.fixture(scope="module")
def outputs(setup: Setup) -> dict[str, Path]:
    codes = setup.encode(setup.root / "codes")
    concepts = setup.concepts(codes, setup.root / "concepts")
    metrics = setup.evaluate(codes, concepts, setup.root / "reports" / "metrics.json")
    return {"codes": codes, "concepts": concepts, "metrics": metrics}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_encode_writes_joint_and_per_stream_codes(setup: Setup, outputs: dict[str, Path]) -> None:
    meta = json.loads((outputs["codes"] / "meta.json").read_text())
    assert meta["L"] == L and meta["k"] == K and meta["streams"] == list(STREAMS)
    assert meta["joint_mode"] == "global" and meta["n"] == 240
    joint = SparseCodes.load(outputs["codes"] / "joint")
    local = SparseCodes.load(outputs["codes"] / "per_stream")
    # joint inference shares one index set; per-stream inference does not
    for s in STREAMS:
        np.testing.assert_array_equal(joint.indices[s], joint.indices["clip_img"])
    assert any((local.indices[s] != local.indices["clip_img"]).any() for s in STREAMS)
    model = load_sae(setup.sae)
    x = {s: torch.from_numpy(np.load(setup.features / s / "features.npy")[:5].astype(np.float32)) for s in STREAMS}
    with torch.no_grad():
        h = model.logits(x)
    for s in STREAMS:
        # the stage encodes batches of 64 rows, another GEMM shape than these 5: the logits may
        # differ in the last bit (issue 21), so its ids are a top-k of these up to near-ties
        assert_topk_code(local.indices[s][:5], h[s], K, logit_tol(h[s], DIMS[s]), values=local.values[s][:5], msg=s)


def test_concepts_outputs(outputs: dict[str, Path]) -> None:
    rows = read_csv(outputs["concepts"] / "concepts.csv")
    assert [int(r["latent"]) for r in rows] == list(range(L))
    assert {"clip_img_purity", "dino_name", "agreed_name"} <= set(rows[0])
    summary = json.loads((outputs["concepts"] / "summary.json").read_text())
    assert summary["split"] == "test" and summary["top_n"] == 10
    for kind in ("joint", "per_stream"):
        assert set(summary[kind]["named_fraction"]) == set(STREAMS)
        assert 0 <= summary[kind]["agreeing"] <= L
    per_stream = read_csv(outputs["concepts"] / "concepts_per_stream.csv")
    assert [int(r["latent"]) for r in per_stream] == list(range(L))
    for r in rows:
        for s in STREAMS:
            p = float(r[f"{s}_purity"])
            assert 0.0 <= p <= 1.0
            assert bool(r[f"{s}_name"]) == (p >= 0.3 and bool(r[f"{s}_label"]))


def test_metrics_schema_and_ranges(outputs: dict[str, Path]) -> None:
    metrics = json.loads(outputs["metrics"].read_text())
    assert set(metrics) == {
        "n_eval", "sparsity", "concepts", "jaccard", "patterns", "reconstruction", "probes",
        "retrieval", "universality",
    }
    for section in ("concepts", "jaccard", "patterns", "reconstruction", "universality"):
        assert set(metrics[section]) == {"joint", "per_stream"}, section
    assert set(metrics["sparsity"]) == {"l0_joint", "l0_per_stream"}
    for kind in ("joint", "per_stream"):
        assert set(metrics["jaccard"][kind]) == {"depth_0", "depth_1", "depth_2", "n_live"}
        for d in range(3):
            j = metrics["jaccard"][kind][f"depth_{d}"]
            assert 0.0 <= j["all"] <= j["live"] <= 1.0
        pat = metrics["patterns"][kind]
        assert pat["alive_all"] + pat["dead_all"] + pat["mixed"] == pytest.approx(1.0)
        assert sum(pat["combinations"].values()) == L
        rec = metrics["reconstruction"][kind]
        assert len(rec["nmse"]) == 9 and rec["self_nmse_mean"] > 0
        uni = metrics["universality"][kind]
        assert 0.0 <= uni["firing_entropy_mean"] <= 1.0 and 0.0 <= uni["cofire_mean"] <= 1.0
        for s in STREAMS:
            assert metrics["sparsity"][f"l0_{kind}"][s] <= K
    ret = metrics["retrieval"]
    assert ret["n"] == metrics["n_eval"]
    assert len([k for k in ret if "->" in k]) == 6
    assert set(ret["raw"]) == {"clip_img->clip_txt", "clip_txt->clip_img"}
    assert ret["chance"]["R@1"] == pytest.approx(1 / ret["n"])
    assert metrics["probes"]["n_classes"] > 0 and metrics["probes"]["reason"] is None


def test_headline_and_plot_files(outputs: dict[str, Path]) -> None:
    """headline.json (the DVC metrics) is a flat selection of metrics.json; the plot CSVs too."""
    out = outputs["metrics"].parent
    metrics = json.loads(outputs["metrics"].read_text())
    head = json.loads((out / "headline.json").read_text())
    assert head["jaccard_d2"] == metrics["jaccard"]["joint"]["depth_2"]["all"]
    assert head["jaccard_ps_live"] == metrics["jaccard"]["per_stream"]["depth_2"]["live"]
    assert head["nmse_cross_lf"] == metrics["reconstruction"]["per_stream"]["cross_nmse_mean"]
    assert head["mixed_ps"] == metrics["patterns"]["per_stream"]["mixed"]
    # clip_txt is the only caption stream, clip_img and dino the image streams
    r1 = [metrics["retrieval"][f"clip_txt->{g}"]["R@1"] for g in ("clip_img", "dino")]
    assert head["r1_cap2img"] == pytest.approx(sum(r1) / 2)
    assert all(not isinstance(v, dict) for v in head.values()) and len(head) <= 24
    jaccard = read_csv(out / "plots" / "jaccard.csv")
    assert [int(r["depth"]) for r in jaccard] == [0, 1, 2]
    assert float(jaccard[2]["per_stream_live"]) == pytest.approx(head["jaccard_ps_live"], abs=1e-6)
    assert len(read_csv(out / "plots" / "retrieval.csv")) == 6
    assert len(read_csv(out / "plots" / "reconstruction.csv")) == 9
    assert [r["pattern"] for r in read_csv(out / "plots" / "patterns.csv")] == ["alive_all", "dead_all", "mixed"]


def test_joint_codes_share_indices_per_stream_codes_do_not(outputs: dict[str, Path]) -> None:
    """Global TopK: every stream fires on the same index set, so a latent is never 'mixed' by
    construction of the joint codes; the per-stream codes measure alignment without that."""
    metrics = json.loads(outputs["metrics"].read_text())
    assert metrics["patterns"]["joint"]["mixed"] <= metrics["patterns"]["per_stream"]["mixed"]
    assert metrics["jaccard"]["joint"]["depth_2"]["live"] != metrics["jaccard"]["per_stream"]["depth_2"]["live"]


def test_per_stream_cross_reconstruction_is_leak_free(setup: Setup, outputs: dict[str, Path]) -> None:
    """Per-stream cross NMSE s->t decodes the code stream s picks on its own: the target's
    features play no part in choosing it (unlike the Global TopK joint code)."""
    metrics = json.loads(outputs["metrics"].read_text())
    splits = [r["split"] for r in read_csv(setup.prepared / "samples.csv")]
    test = np.flatnonzero(np.array(splits) == "test")
    model = load_sae(setup.sae)
    x = {s: torch.from_numpy(np.load(setup.features / s / "features.npy")[test].astype(np.float32)) for s in STREAMS}
    with torch.no_grad():
        for s in STREAMS:
            alone = model.encode({s: x[s]}, mode="global")[s]  # one stream: its own top-k
            for t in STREAMS:
                xt = x[t] / x[t].norm(dim=1, keepdim=True)
                err = ((model.decode(alone, t) - xt) ** 2).sum(1) / (xt**2).sum(1)
                got = metrics["reconstruction"]["per_stream"]["nmse"][f"{s}->{t}"]
                assert got == pytest.approx(float(err.mean()), rel=1e-4), (s, t)
    joint = metrics["reconstruction"]["joint"]["cross_nmse_mean"]
    assert joint != metrics["reconstruction"]["per_stream"]["cross_nmse_mean"]


def test_usae_run_is_evaluated_with_its_own_per_stream_rule(setup: Setup, tmp_path: Path) -> None:
    """A USAE model (Local TopK) gets joint codes equal to its per-stream codes, so every joint
    metric is computed on the index sets USAE trained with."""
    sae = save_sae(MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K, topk="local"), seed=4), tmp_path / "usae")
    params = make_params(method="usae", topk="local")
    codes = setup.encode(tmp_path / "codes", params=params, sae=sae)
    assert json.loads((codes / "meta.json").read_text())["joint_mode"] == "local"
    joint, per_stream = SparseCodes.load(codes / "joint"), SparseCodes.load(codes / "per_stream")
    for s in STREAMS:  # exact: both are the same local top-k of the same batches' logits
        np.testing.assert_array_equal(joint.indices[s], per_stream.indices[s])
        np.testing.assert_array_equal(joint.values[s], per_stream.values[s])
    with pytest.raises(ParamsError, match="topk must be local"):
        make_params(method="usae")  # the rule that used to give USAE Global TopK codes


def test_probes_without_classes_say_why(setup: Setup, outputs: dict[str, Path], tmp_path: Path, capsys) -> None:
    params = make_params(evaluate={"batch_size": 64, "probe_min_positives": 10_000, "probe_candidates": 5})
    run_evaluate(
        params, codes_dir=outputs["codes"], prepared_dir=setup.prepared, features_root=setup.features,
        sae_dir=setup.sae, concepts_dir=outputs["concepts"], metrics_path=tmp_path / "m.json", device="cpu",
    )
    probes = json.loads((tmp_path / "m.json").read_text())["probes"]
    assert probes["n_classes"] == 0 and probes["mean_test_logloss"]["dino"] is None
    assert "no class has more than 10000 positives" in probes["reason"]
    assert "lower evaluate.probe_min_positives" in probes["reason"]
    assert "warning: probes skipped: no class has more than 10000" in capsys.readouterr().err


def test_csv_outputs(outputs: dict[str, Path]) -> None:
    out = outputs["metrics"].parent
    latents = read_csv(out / "latents.csv")
    assert len(latents) == L
    assert {"name_dino", "purity_dino", "freq_dino", "jaccard_d2", "pattern", "alive_in"} <= set(latents[0])
    assert {"per_stream_jaccard_d2", "per_stream_pattern", "per_stream_alive_in"} <= set(latents[0])
    retrieval = read_csv(out / "retrieval.csv")
    raw = [r for r in retrieval if r["representation"] == "raw"]
    assert len(raw) == 6
    assert {(r["query"], r["gallery"]) for r in raw if r["applicable"] == "True"} == {
        ("clip_img", "clip_txt"), ("clip_txt", "clip_img"),
    }
    assert all(r["R@1"] == "" for r in raw if r["applicable"] == "False")
    recon = read_csv(out / "reconstruction.csv")
    assert len(recon) == 18 and sum(r["kind"] == "self" for r in recon) == 6
    assert {r["codes"] for r in recon} == {"joint", "per_stream"}
    probes = read_csv(out / "probes.csv")
    assert probes and {r["stream"] for r in probes} == set(STREAMS)


def test_reconstruction_agrees_with_training_loss(setup: Setup, outputs: dict[str, Path]) -> None:
    """The stage's NMSE is the training loss's NMSE on the same (test) rows."""
    metrics = json.loads(outputs["metrics"].read_text())
    splits = [r["split"] for r in read_csv(setup.prepared / "samples.csv")]
    test = np.flatnonzero(np.array(splits) == "test")
    model = load_sae(setup.sae)
    x = {s: torch.from_numpy(np.load(setup.features / s / "features.npy")[test].astype(np.float32)) for s in STREAMS}
    with torch.no_grad():
        terms = model.loss(x, lam=1.0).terms
    for s in STREAMS:
        got = metrics["reconstruction"]["joint"]["nmse"][f"{s}->{s}"]
        assert got == pytest.approx(float(terms[f"self_nmse/{s}"]), rel=1e-4)
    assert metrics["reconstruction"]["joint"]["cross_nmse_mean"] == pytest.approx(float(terms["cross_nmse"]), rel=1e-4)


def test_evaluate_is_deterministic(setup: Setup, outputs: dict[str, Path], tmp_path: Path) -> None:
    again = setup.evaluate(outputs["codes"], outputs["concepts"], tmp_path / "metrics.json")
    assert again.read_bytes() == outputs["metrics"].read_bytes()
    assert (tmp_path / "latents.csv").read_bytes() == (outputs["metrics"].parent / "latents.csv").read_bytes()


def test_codes_from_another_model_are_refused(setup: Setup, outputs: dict[str, Path], tmp_path: Path) -> None:
    other = other_sae(tmp_path, seed=2)
    with pytest.raises(EvaluateInputError, match="another model"):
        setup.evaluate(outputs["codes"], outputs["concepts"], tmp_path / "m.json", sae=other)


def other_sae(tmp_path: Path, seed: int) -> Path:
    return save_sae(MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K), seed=seed), tmp_path / f"sae{seed}")


def test_stale_concepts_are_refused(setup: Setup, outputs: dict[str, Path], tmp_path: Path) -> None:
    other = other_sae(tmp_path, seed=3)
    codes = setup.encode(tmp_path / "codes", sae=other)
    with pytest.raises(EvaluateInputError, match="concepts were computed from other codes"):
        setup.evaluate(codes, outputs["concepts"], tmp_path / "m.json", sae=other)


def test_stages_read_the_codes_of_the_test_split_only(setup: Setup, outputs: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """At the paper's size the codes of 1.8M rows are 5.6 GB; concepts and evaluate read the 126k
    test rows (and give the same outputs as from codes of the test rows alone)."""
    asked = []
    load = SparseCodes.load.__func__

    def recording_load(cls, path, rows=None, meta=None):
        asked.append(None if rows is None else np.asarray(rows).tolist())
        return load(cls, path, rows, meta)

    monkeypatch.setattr(SparseCodes, "load", classmethod(recording_load))
    splits = np.array([r["split"] for r in read_csv(setup.prepared / "samples.csv")])
    test = np.flatnonzero(splits == "test").tolist()
    assert 0 < len(test) < splits.size
    concepts = setup.concepts(outputs["codes"], tmp_path / "concepts")
    metrics = setup.evaluate(outputs["codes"], concepts, tmp_path / "reports" / "metrics.json")
    assert asked == [test] * 4  # two kinds of codes, two stages
    assert metrics.read_bytes() == outputs["metrics"].read_bytes()


@pytest.mark.parametrize("split", ["test", "train"])
def test_id_order_mismatch_is_refused(setup: Setup, outputs: dict[str, Path], tmp_path: Path, split: str) -> None:
    """Also where the stage reads the codes of the test split only: every row's id is checked."""
    codes = tmp_path / "codes"
    shutil.copytree(outputs["codes"], codes)
    joint = SparseCodes.load(codes / "joint")
    a, b = [i for i, r in enumerate(read_csv(setup.prepared / "samples.csv")) if r["split"] == split][:2]
    swapped = list(joint.ids)
    swapped[a], swapped[b] = swapped[b], swapped[a]
    SparseCodes(swapped, joint.L, joint.indices, joint.values).save(codes / "joint")
    with pytest.raises(EvaluateInputError, match=f"row {a} .*id order mismatch"):
        setup.concepts(codes, tmp_path / "concepts")


def test_wrong_L_is_refused(setup: Setup, outputs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(EvaluateInputError, match="L=24, params.yaml has L=32"):
        setup.concepts(outputs["codes"], tmp_path / "concepts", params=make_params(L=32))
    with pytest.raises(EvaluateInputError, match="L=24, params.yaml has L=32"):
        setup.encode(tmp_path / "codes", params=make_params(L=32))


def test_missing_files_are_named(setup: Setup, outputs: dict[str, Path], tmp_path: Path) -> None:
    codes = tmp_path / "codes"
    shutil.copytree(outputs["codes"], codes)
    (codes / "joint" / "codes.npz").unlink()
    with pytest.raises(FileNotFoundError, match="codes.npz is missing"):
        setup.concepts(codes, tmp_path / "concepts")
    (codes / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        setup.concepts(codes, tmp_path / "concepts")
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        setup.evaluate(outputs["codes"], outputs["concepts"], tmp_path / "m.json", sae=tmp_path / "nowhere")


def test_corrupted_codes_are_refused(setup: Setup, outputs: dict[str, Path], tmp_path: Path) -> None:
    codes = tmp_path / "codes"
    shutil.copytree(outputs["codes"], codes)
    (codes / "joint" / "codes.npz").write_bytes(b"not a zip file")
    with pytest.raises(EvaluateInputError, match="cannot read the codes"):
        setup.concepts(codes, tmp_path / "concepts")
    (codes / "meta.json").write_text("{truncated")
    with pytest.raises(EvaluateInputError, match="meta.json: unreadable"):
        setup.concepts(codes, tmp_path / "concepts")


def test_encode_out_of_space_names_the_path_and_the_space_and_cleans_up(setup: Setup, tmp_path: Path) -> None:
    """Issue 22.13: `ulimit -f 500` during encode gave an `OSError: [Errno 27] File too large`
    traceback and left data/codes.tmp behind. Now one line naming the path and the space needed;
    the temporary directory is removed and the old codes are untouched."""
    import resource

    out = setup.encode(tmp_path / "codes")
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(EvaluateInputError) as info:
            setup.encode(out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    need = (2 * 3 * 240 * K * 8 + 2 * 16 * 240) / 2**20
    assert str(info.value) == (
        f"{tmp_path / 'codes.tmp'}: no room to write the codes (File too large): they need about {need:.1f} MiB "
        f"there; free disk space (or raise the file-size limit, `ulimit -f`) and run `dvc repro encode` again "
        f"({out} is unchanged)"
    )
    assert not (tmp_path / "codes.tmp").exists()
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_random_weight_streams_are_named_in_metrics_and_headline(setup: Setup, outputs: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    """Features whose meta.json says ``weights: random`` (sparc.features.random_weights) make
    metrics.json name those streams with a warning and headline.json count them, first; the
    default run has neither key."""
    assert "random_weights" not in json.loads(outputs["metrics"].read_text())
    assert "random_weights" not in json.loads((outputs["metrics"].parent / "headline.json").read_text())
    features = tmp_path / "features"
    shutil.copytree(setup.features, features)
    random = list(STREAMS)[1:]
    for name in random:
        meta_path = features / name / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta_path.write_text(json.dumps({**meta, **meta_fields("directory")}))
    metrics = run_evaluate(
        setup.params, codes_dir=outputs["codes"], prepared_dir=setup.prepared, features_root=features,
        sae_dir=setup.sae, concepts_dir=outputs["concepts"], metrics_path=tmp_path / "reports" / "metrics.json",
        device="cpu",
    )
    full = json.loads(metrics.read_text())
    assert full["random_weights"] == random and full["warning"] == WARNING
    head = json.loads((metrics.parent / "headline.json").read_text())
    assert list(head)[0] == "random_weights" and head["random_weights"] == 2
