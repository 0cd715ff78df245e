"""The notebook API (sparc.api) on a tiny repository made in code.

The repository is laid out as the pipeline writes it (params.yaml, data/prepared/<dataset>,
data/features, data/sae, data/codes, reports/concepts), with the project's own writers and
stages: planted-concept features and labels, a seeded (untrained) SAE, then ``run_encode`` and
``run_concepts``. Leaf labels carry emoji-like display names so concept search has something to
find.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import sparc
from sparc import paths
from sparc.api import RunFileError, RunMismatchError, _match_quality, _tokens, load_run
from sparc.evaluate.concepts_stage import run_concepts
from sparc.evaluate.encode_stage import run_encode
from sparc.model.codes import SparseCodes
from sparc.model.io import save_sae
from sparc.model.sae import MultiStreamSAE, SAEConfig
from sparc.params import params_from_dict
from tests.topk_codes import assert_topk_code, logit_tol

# The notebook example of docs/looking-at-results.md; tested below with the fixture repository as the working directory.
README_EXAMPLE = '''\
import numpy as np
import sparc

run = sparc.load_run(".")           # the repository root, or a path to data/sae (model only)
print(run)                          # streams, L, k and the TopK rule

# Latents named after a concept (best first) and the samples they fire on most
hits = run.search("country flag")   # case and separators do not matter: "Country-Flag", "country_flag";
                                    # label names and names from captions (<s>_text_name, zero-shot) both match
latent = int(hits.latent.iloc[0])
print(run.top_samples(latent, stream=run.streams[0], n=5)[["id", "caption", "activation"]])

# Encode features yourself: numpy [N, d_s] per stream in, sparse codes out
x = {s: run.features(s, split="test") for s in run.streams}
joint = run.encode(x)                       # the model's rule: Global TopK, one index set per sample
alone = run.encode(x, mode="per_stream")    # each stream its own top-k, as with one modality
a, b = run.streams[:2]
print(joint.indices[a][0], alone.indices[a][0])    # the k latent ids of the first test sample

# Cross reconstruction: stream a's own code through stream b's decoder
xhat = run.decode(alone, stream=b, source=a)       # [N, d_b]
xb = x[b] / np.linalg.norm(x[b], axis=1, keepdims=True)   # the model reconstructs unit-norm rows
print("NMSE", a, "->", b, ((xhat - xb) ** 2).sum(axis=1).mean())
'''

CLIP = "openclip:ViT-B-32@laion2b_s34b_b79k"
STREAMS = {
    "clip_img": {"model": CLIP, "input": "image"},
    "clip_txt": {"model": CLIP, "input": "caption"},
    "dino": {"model": "dinov2:facebook/dinov2-small", "input": "image"},
}
DIMS = {"clip_img": 16, "clip_txt": 16, "dino": 20}
L, K, TOP_N = 32, 4, 10
DATASET = "emoji"
# Display names of the 16 planted leaves p0.c0 .. p3.c3 (mixed separators on purpose).
LEAF_NAMES = [
    "cat-face", "dog-face", "country-flag", "flag", "face-smiling", "face_affection", "Person Sport",
    "person-role", "animal-bird", "animal-mammal", "food-fruit", "food-vegetable", "sky & weather",
    "event", "clothing", "music",
]


def build_repo(root: Path, tiny_inputs) -> Path:
    """Write a complete tiny repository (every pipeline output up to `concepts`) under ``root``
    (``tiny_inputs``: the conftest fixture that writes prepared data, features and SAE)."""
    prepared = tiny_inputs(
        root, STREAMS, DIMS, L=L, k=K, n_samples=240, leaf_names=LEAF_NAMES, dataset=DATASET,
        prepared_dir=root / paths.prepared_dir(DATASET), features_root=root / paths.features_root(DATASET),
        sae_dir=root / paths.sae_dir(),
    ).prepared
    raw = {
        "L": L, "k": K, "streams": STREAMS,
        "data": {"dataset": DATASET},
        # captions are "caption <i>", each term on one caption: a low score threshold names them
        "concepts": {"top_n": TOP_N, "purity_threshold": 0.3, "text_min_score": 0.0},
        "evaluate": {"batch_size": 64},
    }
    (root / "params.yaml").write_text(json.dumps(raw, indent=1) + "\n")  # JSON is YAML
    params = params_from_dict(raw)
    codes = run_encode(
        params, sae_dir=root / paths.sae_dir(), features_root=root / paths.features_root(DATASET),
        prepared_dir=prepared, out_dir=root / paths.codes_dir(), device="cpu", progress=False,
    )
    run_concepts(params, codes_dir=codes, prepared_dir=prepared, out_dir=root / paths.concepts_dir())
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_inputs) -> Path:
    return build_repo(tmp_path_factory.mktemp("api") / "repo", tiny_inputs)


@pytest.fixture(scope="module")
def run(repo: Path):
    return load_run(repo)


@pytest.fixture()
def repo_copy(repo: Path, tmp_path: Path) -> Path:
    """A private copy of the repository for tests that remove or replace files."""
    return Path(shutil.copytree(repo, tmp_path / "repo"))


def test_import_sparc_is_cheap_and_exports_load_run() -> None:
    code = "import sys, sparc; f = sparc.load_run; print('torch' in sys.modules, f.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # importing sparc.api (to get load_run) still does not import torch: the model loads lazily
    assert out.split() == ["False", "sparc.api"]
    assert sparc.load_run is load_run and "load_run" in dir(sparc)
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        sparc.nosuch  # noqa: B018


# ------------------------------------------------------------------ loading


def test_load_run_from_repository(run, repo: Path) -> None:
    assert run.root == repo.resolve() and run.sae_dir == repo.resolve() / "data" / "sae"
    assert run.streams == list(STREAMS) and run.dims == DIMS
    assert (run.L, run.k, run.topk) == (L, K, "global")
    assert run.params.L == L and run.params.stream_names == list(STREAMS) and run.dataset == DATASET
    assert isinstance(run.model, MultiStreamSAE) and not run.model.training
    assert run.model.cfg.L == L
    assert "streams=['clip_img', 'clip_txt', 'dino']" in repr(run)


def test_load_run_from_sae_directory_or_file(repo: Path) -> None:
    for path in (repo / "data" / "sae", repo / "data" / "sae" / "model.safetensors"):
        bare = load_run(path)
        assert bare.root is None and bare.params is None
        assert bare.streams == list(STREAMS) and bare.L == L
        codes = bare.encode({"dino": np.ones((2, DIMS["dino"]), dtype=np.float32)})
        assert codes.indices["dino"].shape == (2, K)


def test_load_run_cwd_default(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    assert sparc.load_run().root == repo.resolve()


def test_params_that_differ_from_the_model_warn(repo_copy: Path) -> None:
    raw = json.loads((repo_copy / "params.yaml").read_text())
    (repo_copy / "params.yaml").write_text(json.dumps({**raw, "k": K + 1}))
    with pytest.warns(UserWarning, match=r"k=5 \(the SAE has 4\).*dvc repro train"):
        r = load_run(repo_copy)
    assert r.k == K  # the trained model is what is used


# ------------------------------------------------------------------ encode / decode


def model_logits(run, x: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The model's logits of all rows of ``x`` in one batch: the reference for codes encoded in
    other batches (issue 21: another GEMM shape may round the logits differently in the last bit,
    so ids are compared as a top-k of these up to near-ties, see tests.topk_codes)."""
    with torch.no_grad():
        return run.model.logits({s: torch.from_numpy(a) for s, a in x.items()})



def test_encode_joint_matches_the_pipeline_and_shares_indices(run) -> None:
    x = {s: run.features(s, "all") for s in run.streams}
    codes = run.encode(x)
    assert isinstance(codes, SparseCodes) and codes.streams == run.streams and codes.L == L
    pipeline = run.codes("joint")  # encoded in batches of 64 rows, these in one batch of 240
    h = model_logits(run, x)
    total = sum(h.values())
    tol = logit_tol(total, sum(DIMS.values()))
    for s in run.streams:
        assert codes.indices[s].dtype == np.int32 and codes.values[s].dtype == np.float32
        assert codes.indices[s].shape == (len(x[s]), K)
        # Global TopK: one index set per sample, the same in every stream
        np.testing.assert_array_equal(codes.indices[s], codes.indices[run.streams[0]])
        np.testing.assert_array_equal(pipeline.indices[s], pipeline.indices[run.streams[0]])
        for got in (codes, pipeline):
            assert_topk_code(got.indices[s], total, K, tol, values=got.values[s], logits=h[s], msg=s)
    assert codes.ids == [str(i) for i in range(len(x["dino"]))]


def test_encode_per_stream_matches_the_pipeline_and_each_stream_alone(run) -> None:
    x = {s: run.features(s, "test") for s in run.streams}
    per = run.encode(x, mode="per_stream")
    pipeline = run.codes("per_stream", "test")  # the test rows of batches of 64 rows of all splits
    h = model_logits(run, x)
    for s in run.streams:
        assert_topk_code(pipeline.indices[s], h[s], K, logit_tol(h[s], DIMS[s]), values=pipeline.values[s], msg=s)
        # exact: the same local top-k of the same rows in one batch, computed again
        alone = run.encode({s: x[s]})  # one stream given: its own top-k, whatever the mode
        np.testing.assert_array_equal(alone.indices[s], per.indices[s])
        with torch.no_grad():
            direct = run.model.encode({s: torch.from_numpy(x[s])}, mode="local")[s]
        np.testing.assert_array_equal(per.indices[s], direct.indices.numpy())
    assert any((per.indices[s] != per.indices["clip_img"]).any() for s in run.streams)
    # joint over a subset of streams: one index set chosen from those streams' summed logits
    pair = run.encode({"clip_img": x["clip_img"], "dino": x["dino"]})
    assert pair.streams == ["clip_img", "dino"]
    np.testing.assert_array_equal(pair.indices["clip_img"], pair.indices["dino"])


def test_encode_local_topk_model_joint_is_per_stream(tmp_path: Path) -> None:
    model = MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K, topk="local"), seed=2)
    r = load_run(save_sae(model, tmp_path / "sae"))
    rng = np.random.default_rng(0)
    x = {s: rng.standard_normal((7, d)).astype(np.float32) for s, d in DIMS.items()}
    joint, per = r.encode(x), r.encode(x, mode="per_stream")
    for s in DIMS:
        np.testing.assert_array_equal(joint.indices[s], per.indices[s])


def test_encode_batches_tensors_rows_and_ids(run) -> None:
    x = {s: run.features(s, "test") for s in run.streams}
    whole = run.encode(x)
    batched = run.encode(x, batch_size=7, ids=[f"s{i}" for i in range(len(x["dino"]))])
    # batches of 7 rows and a single row are other GEMM shapes than the whole: ids are a top-k of
    # the one-batch logits up to near-ties (issue 21)
    total = sum(model_logits(run, x).values())
    tol = logit_tol(total, sum(DIMS.values()))
    assert_topk_code(batched.indices["dino"], total, K, tol)
    assert batched.ids[0] == "s0"
    one = run.encode({s: a[0] for s, a in x.items()})  # a single [d] row
    assert_topk_code(one.indices["dino"], total[:1], K, tol)
    # issue 22 (minor): tensors in gave a dict of torch Code objects out; now SparseCodes as for numpy
    t = run.encode({s: torch.from_numpy(a) for s, a in x.items()})
    assert isinstance(t, SparseCodes) and t.streams == run.streams
    assert t.indices["dino"].dtype == np.int32 and t.values["dino"].dtype == np.float32
    # exact: the same rows in the same batch (tensors in or numpy in is the same computation)
    np.testing.assert_array_equal(t.indices["dino"], whole.indices["dino"])
    np.testing.assert_array_equal(t.values["dino"], whole.values["dino"])
    half = run.encode({"dino": torch.from_numpy(x["dino"]).to(torch.bfloat16)})
    assert isinstance(half, SparseCodes) and half.indices["dino"].shape == (len(x["dino"]), K)


def test_encode_errors(run) -> None:
    x = run.features("dino", "test")
    with pytest.raises(ValueError, match="mode must be one of"):
        run.encode({"dino": x}, mode="global")
    with pytest.raises(KeyError, match="unknown streams \\['nope'\\]"):
        run.encode({"nope": x})
    with pytest.raises(ValueError, match="has 20 dims, the SAE expects 16"):
        run.encode({"clip_img": x})
    with pytest.raises(ValueError, match="different numbers of rows"):
        run.encode({"dino": x, "clip_img": run.features("clip_img", "test")[:3]})
    with pytest.raises(ValueError, match="non-empty"):
        run.encode({})
    with pytest.raises(ValueError, match="ids for"):
        run.encode({"dino": x}, ids=["a"])
    # issue 22 (minor): an array of strings named no stream
    with pytest.raises(ValueError, match="^encode: stream 'dino': expected numbers \\(a float or integer array\\), "
                                         "got an array of <U1$"):
        run.encode({"dino": np.full(x.shape, "a")})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_rows_naming_stream_and_row(run, bad: float) -> None:
    """Issue 22.6: one NaN in one stream's row gave arbitrary latents for every stream and an
    all-NaN decode, without a word."""
    x = {s: run.features(s, "test").copy() for s in run.streams}
    x["clip_txt"][3, 5] = bad
    ids = [f"s{i}" for i in range(len(x["dino"]))]
    message = ("^encode: stream 'clip_txt' row 3 \\(id 's3'\\) holds NaN or inf; the SAE needs finite features "
               "\\(drop or fix that row\\)$")
    for mode in ("joint", "per_stream"):
        with pytest.raises(ValueError, match=message):
            run.encode(x, mode=mode, ids=ids)
    with pytest.raises(ValueError, match="stream 'clip_txt' row 3 \\(id '3'\\)"):
        run.encode({"clip_txt": torch.from_numpy(x["clip_txt"])})
    del x["clip_txt"]
    assert run.encode(x).indices["dino"].shape == (len(ids), K)  # the other streams are finite


def test_decode_self_and_cross(run) -> None:
    x = {s: run.features(s, "test") for s in run.streams}
    per = run.encode(x, mode="per_stream")
    xt = torch.from_numpy(x["dino"])
    with torch.no_grad():
        code = run.model.encode({"clip_txt": torch.from_numpy(x["clip_txt"])}, mode="local")["clip_txt"]
        want_cross = run.model.decode(code, "dino").numpy()
        want_self = run.model.decode(run.model.encode({"dino": xt}, mode="local")["dino"], "dino").numpy()
    cross = run.decode(per, "dino", source="clip_txt", batch_size=5)
    assert cross.shape == (len(xt), DIMS["dino"]) and cross.dtype == np.float32
    np.testing.assert_allclose(cross, want_cross, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run.decode(per, "dino"), want_self, rtol=1e-5, atol=1e-6)  # source = stream
    pair = (per.indices["clip_txt"], per.values["clip_txt"])
    np.testing.assert_allclose(run.decode(pair, "dino"), want_cross, rtol=1e-5, atol=1e-6)
    only = run.encode({"clip_txt": x["clip_txt"]})
    np.testing.assert_allclose(run.decode(only, "dino"), want_cross, rtol=1e-5, atol=1e-6)  # the only stream
    out = run.decode({"clip_txt": code}, "dino")  # what run.model.encode returns: torch in, torch out
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), want_cross, rtol=1e-5, atol=1e-6)
    # self reconstruction approximates the unit-norm input better than a zero code would
    unit = x["dino"] / np.linalg.norm(x["dino"], axis=1, keepdims=True)
    assert ((want_self - unit) ** 2).sum(1).mean() < 1.0
    with pytest.raises(ValueError, match="pass source"):
        run.decode(run.encode({"clip_img": x["clip_img"], "clip_txt": x["clip_txt"]}), "dino")
    with pytest.raises(KeyError, match="source 'nope'"):
        run.decode(per, "dino", source="nope")
    with pytest.raises(KeyError, match="unknown stream 'nope'"):
        run.decode(per, "nope")
    with pytest.raises(ValueError, match="latent ids must lie"):
        run.decode((np.full((1, K), L), np.ones((1, K))), "dino")


# ------------------------------------------------------------------ repository outputs


def test_features_and_samples_are_aligned(run, repo: Path) -> None:
    test = run.samples("test")
    assert list(test.columns) == ["row", "id", "caption", "image", "labels", "label_names", "split"]
    assert (test.split == "test").all() and len(test) == len(run.samples("all")) - len(run.samples("train")) - len(run.samples("val"))
    feats = run.features("dino", "test")
    assert feats.shape == (len(test), DIMS["dino"]) and feats.dtype == np.float32
    store = np.load(repo / "data" / "features" / DATASET / "dino" / "features.npy")
    np.testing.assert_array_equal(feats, store[test.row.to_numpy()].astype(np.float32))
    assert Path(test.image[0]).is_file()
    first = test.iloc[0]
    assert first.label_names == tuple(LEAF_NAMES[int(lab[1]) * 4 + int(lab[4])] for lab in first.labels)
    with pytest.raises(ValueError, match="unknown split"):
        run.features("dino", "dev")


def test_concepts_tables(run, repo: Path) -> None:
    joint, per = run.concepts, run.concepts_per_stream
    for table in (joint, per):
        assert isinstance(table, pd.DataFrame) and table.latent.tolist() == list(range(L))
        assert {"agreed_name", "dino_name", "dino_purity", "clip_img_n_active"} <= set(table.columns)
        assert table.dino_purity.dtype == float and pd.api.types.is_string_dtype(table.agreed_name)
    assert (joint.agreed_name == "country-flag").any()
    joint.loc[0, "agreed_name"] = "changed"  # a copy: the run's table is untouched
    assert run.concepts.loc[0, "agreed_name"] != "changed"


def test_top_samples(run) -> None:
    latent = int(run.concepts.query("agreed_name == 'country-flag'").latent.iloc[0])
    top = run.top_samples(latent, "clip_txt", n=TOP_N)
    assert list(top.columns) == ["row", "id", "caption", "image", "activation", "labels", "label_names", "split"]
    assert 0 < len(top) <= TOP_N and (top.split == "test").all()
    act = top.activation.to_numpy()
    assert (act > 0).all() and (np.diff(act) <= 0).all()
    codes = run.codes("joint")
    for rec in top.itertuples():
        i = rec.row
        hit = codes.indices["clip_txt"][i] == latent
        assert codes.ids[i] == rec.id and act[rec.Index] == pytest.approx(codes.values["clip_txt"][i][hit].sum())
    # the concepts stage named the latent from these same samples: purity = share carrying the label
    row = run.concepts.loc[latent]
    share = np.mean([row.clip_txt_label in labels for labels in top.labels])
    assert share == pytest.approx(row.clip_txt_purity, abs=1e-6)
    assert len(run.top_samples(latent, "dino", n=2, split="all")) == 2
    with pytest.raises(ValueError, match="latent must lie"):
        run.top_samples(L, "dino")
    # issue 22 (minor): 198.5 silently meant latent 198
    with pytest.raises(ValueError, match="^top_samples: latent must be an integer latent id, got 2.5$"):
        run.top_samples(2.5, "dino")
    assert run.top_samples(np.int64(latent), "clip_txt", n=TOP_N).equals(run.top_samples(float(latent), "clip_txt", n=TOP_N))
    with pytest.raises(KeyError, match="unknown stream"):
        run.top_samples(0, "nope")


def test_search(run) -> None:
    hits = run.search("country flag")
    assert list(hits.columns[:5]) == ["latent", "match", "agreed_name", "n_streams", "mean_purity"]
    assert {"dino_name", "dino_purity"} <= set(hits.columns)
    first = hits.iloc[0]
    assert first.match == "exact" and first.agreed_name == "country-flag" and first.n_streams == 3
    for query in ("Country-Flag", "COUNTRY_FLAG", "  country   flag "):
        pd.testing.assert_frame_equal(run.search(query), hits)
    joint = run.concepts
    named = {int(r.latent) for r in joint.itertuples()
             if "country-flag" in (r.agreed_name, r.clip_img_name, r.clip_txt_name, r.dino_name)}
    assert set(hits.latent) == named
    # "flag": exact matches ("flag") before phrase matches ("country-flag"); ties by streams, purity
    flag = run.search("flag")
    quality = flag.match.map({"exact": 0, "phrase": 1, "words": 2, "partial": 3}).to_numpy()
    assert (np.diff(quality) >= 0).all() and set(flag.match) <= {"exact", "phrase"}
    exact = flag[flag.match == "exact"]
    assert (exact.n_streams.diff().dropna() <= 0).all()
    assert run.search("zebra").empty and list(run.search("zebra").columns) == list(hits.columns)
    assert not run.search("flag", kind="per_stream").empty
    with pytest.raises(ValueError, match="no letters or digits"):
        run.search(" - ")


def test_search_finds_text_names(run) -> None:
    """Names from captions are searched too: the fixture's captions are "caption <i>", so a
    latent's text name (a number, or "caption <i>") matches no label name."""
    joint = run.concepts
    assert {f"{s}_text_name" for s in STREAMS} <= set(joint.columns)
    for s in STREAMS:  # a number, NaN exactly where the latent has no terms (it never fires)
        assert joint[f"{s}_text_score"].dtype == np.float64
        assert (joint[f"{s}_text_score"].isna() == (joint[f"{s}_text_words"] == "")).all()
    named = joint[joint.clip_txt_text_name != ""]
    assert not named.empty
    latent, text = int(named.latent.iloc[0]), named.clip_txt_text_name.iloc[0]
    hits = run.search(text)
    assert list(hits.columns[:6]) == ["latent", "match", "agreed_name", "n_streams", "mean_purity", "n_text_streams"]
    row = hits[hits.latent == latent].iloc[0]
    assert row.match == "exact" and row.n_text_streams >= 1 and row.clip_txt_text_name == text
    assert (hits.n_streams == 0).all() and (hits.mean_purity == 0).all()  # no label name holds a number
    expected = {int(r.latent) for r in joint.itertuples()
                if any(_match_quality(_tokens(text), getattr(r, f"{s}_text_name")) for s in STREAMS)}
    assert set(hits.latent) == expected


def test_match_quality() -> None:
    q = _tokens("cat face")
    assert q == ["cat", "face"] and _tokens("Sky & Weather") == ["sky", "weather"]
    assert _match_quality(q, "Cat-Face") == 4
    assert _match_quality(q, "cat_face_smiling") == 3
    assert _match_quality(q, "face of a cat") == 2
    assert _match_quality(q, "catface") == 1
    assert _match_quality(q, "dog-face") == 0
    assert _match_quality(q, "") == 0


# ------------------------------------------------------------------ errors


def test_missing_path_or_model(tmp_path: Path, repo_copy: Path) -> None:
    with pytest.raises(RunFileError, match="no such directory"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a repository root"):
        load_run(tmp_path / "empty")
    (repo_copy / "data" / "sae" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"data/sae/model.safetensors is missing; run `dvc repro train`"):
        load_run(repo_copy)


@pytest.mark.parametrize(
    ("file", "reason"),
    [("model.safetensors", "unreadable \\(.*\\)"), ("config.json", "unreadable \\(Unterminated string")],
)
def test_damaged_sae_files_are_named_with_how_to_restore_them(
    repo_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, file: str, reason: str,
) -> None:
    """Issue 22.12: a truncated model.safetensors gave a SafetensorError traceback (encode stage and
    load_run), a corrupt config.json `Unterminated string...` naming no file."""
    from sparc.cli import main
    from sparc.model.files import SAEFileError

    path = repo_copy / "data" / "sae" / file
    path.write_bytes(path.read_bytes()[:60])
    message = f"{path.resolve()}: {reason}.*; restore it with `dvc checkout data/sae` \\(or retrain: `dvc repro train`\\)$"
    with pytest.raises(SAEFileError, match=f"^{message}"):
        load_run(repo_copy).model  # noqa: B018
    monkeypatch.chdir(repo_copy)
    before = sorted(p.name for p in (repo_copy / "data" / "codes").iterdir())
    assert main(["encode"]) == 2
    err = capsys.readouterr().err
    assert re.match(f"^error: {message.replace(str(path.resolve()), 'data/sae/' + file)}", err) and err.count("\n") == 1
    assert sorted(p.name for p in (repo_copy / "data" / "codes").iterdir()) == before  # old codes intact


def test_sae_only_run_refuses_repository_methods(repo: Path) -> None:
    bare = load_run(repo / "data" / "sae")
    calls = {
        "reports/concepts/concepts.csv": lambda: bare.concepts,
        "reports/concepts/concepts_per_stream.csv": lambda: bare.concepts_per_stream,
        "data/codes/meta.json": lambda: bare.top_samples(0, "dino"),
        "data/features/<dataset>/dino": lambda: bare.features("dino"),
        "data/prepared/<dataset>/samples.csv": lambda: bare.samples(),
    }
    for name, call in calls.items():
        with pytest.raises(RunFileError, match=f"{name}.*loaded from .*alone.*dvc repro .*dvc pull"):
            call()
    with pytest.raises(RunFileError, match="concepts.csv"):
        bare.search("flag")


@pytest.mark.parametrize(
    ("remove", "call", "message"),
    [
        ("reports/concepts", lambda r: r.concepts, r"concepts.csv is missing; run `dvc repro concepts` \(or `dvc pull concepts`"),
        ("reports/concepts/summary.json", lambda r: r.search("flag"), r"summary.json is missing; run `dvc repro concepts`"),
        ("data/codes", lambda r: r.top_samples(0, "dino"), r"data/codes/meta.json is missing; run `dvc repro encode`"),
        ("data/codes/per_stream", lambda r: r.codes("per_stream"), r"per_stream/codes.npz is missing; run `dvc repro encode`"),
        ("data/features/emoji/dino", lambda r: r.features("dino"), r"features/emoji/dino is missing; run `dvc repro extract@dino`"),
        ("data/features/emoji/dino/ids.txt", lambda r: r.features("dino"), r"dino/ids.txt is missing; run `dvc repro extract@dino`"),
        ("data/prepared", lambda r: r.samples(), r"samples.csv is missing; run `dvc repro prepare`"),
    ],
)
def test_missing_outputs_name_the_file_and_the_fix(repo_copy: Path, remove: str, call, message: str) -> None:
    target = repo_copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    r = load_run(repo_copy)
    with pytest.raises(FileNotFoundError, match=message) as info:
        call(r)
    assert "\n" not in str(info.value)


def test_outputs_of_another_model_are_refused(repo_copy: Path) -> None:
    save_sae(MultiStreamSAE(SAEConfig(dims=DIMS, L=L, k=K), seed=99), repo_copy / "data" / "sae")
    r = load_run(repo_copy)
    with pytest.raises(RunMismatchError, match="encoded by another model.*dvc repro encode"):
        r.top_samples(0, "dino")
    with pytest.raises(RunMismatchError, match="another model.*dvc repro encode concepts"):
        r.search("flag")
    assert r.encode({"dino": r.features("dino")}).indices["dino"].shape[1] == K  # the model still works


# ------------------------------------------------------------------ README


def test_readme_example_runs(repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(repo)
    namespace: dict = {}
    exec(compile(README_EXAMPLE, "README_EXAMPLE", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Run(root=" in out and "activation" in out and "NMSE" in out
    assert namespace["hits"].agreed_name.iloc[0] == "country-flag"
    assert namespace["xhat"].shape == (len(namespace["x"]["clip_img"]), DIMS["clip_txt"])


def test_readme_shows_the_example_that_runs() -> None:
    """The documented Python example (docs/looking-at-results.md) is the one
    test_readme_example_runs executes."""
    readme = (Path(__file__).resolve().parents[1] / "docs" / "looking-at-results.md").read_text()
    assert f"```python\n{README_EXAMPLE}```" in readme
