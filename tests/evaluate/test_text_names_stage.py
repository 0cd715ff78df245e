"""The concepts stage's text names and zero-shot names, on a tiny planted run whose captions name
its labels, with labels and without any; the caption stream is the real (offline) MiniLM."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparc.data.base import Sample
from sparc.data.prepared import load_prepared
from sparc.evaluate.concepts import assign_concepts, concept_rows
from sparc.evaluate.concepts_stage import run_concepts, zero_shot_streams
from sparc.evaluate.encode_stage import run_encode
from sparc.evaluate.labels import LabelSpace
from sparc.evaluate.metrics import top_activating
from sparc.evaluate.run_files import (
    EvaluateInputError,
    codes_to_csr,
    load_codes,
    split_rows,
    write_csv,
)
from sparc.evaluate.text_names import caption_terms, text_names, top_indicator
from sparc.features.registry import caption_embedder
from sparc.model.io import load_sae, save_sae
from sparc.params import Params, params_from_dict

MINILM = "minilm:all-MiniLM-L6-v2"
STREAMS = {"img": {"model": "efficientnet:lite0", "input": "image"}, "txt": {"model": MINILM, "input": "caption"}}
DIMS = {"img": 16, "txt": 384}
L, K, TOP_N = 12, 3, 10
WORDS = ["apple", "bridge", "castle", "dolphin", "engine", "forest", "guitar", "harbour",
         "island", "jacket", "kettle", "lantern", "mountain", "notebook", "orchard", "piano"]
CONCEPT = {f"p{p}.c{c}": WORDS[4 * p + c] for p in range(4) for c in range(4)}  # planted leaf -> word


def named_sample(keep_labels: bool):
    """Samples whose caption names their planted concepts; labels kept or dropped."""
    def sample(i: int, sid: str, labels: tuple[str, ...], images: Path) -> Sample:
        img = images / f"{sid}.png"
        img.write_bytes(f"image {i}".encode())
        return Sample(sid, img, "a photo of " + " and ".join(CONCEPT[lab] for lab in labels), labels if keep_labels else ())
    return sample


def make_params(zero_shot: int = 0) -> Params:
    return params_from_dict({
        "L": L, "k": K, "streams": STREAMS,
        "concepts": {"top_n": TOP_N, "purity_threshold": 0.3, "text_words": 3, "text_min_score": 1.0,
                     "zero_shot_vocab": zero_shot},
    })


def build(root: Path, tiny_inputs, keep_labels: bool, zero_shot_words: list[str] | None = None) -> dict[str, Path]:
    """Tiny inputs, (optionally) an SAE whose caption-stream encoder row l is word l's MiniLM
    embedding, and its codes."""
    made = tiny_inputs(root, STREAMS, DIMS, L=L, k=K, n_samples=200, sample=named_sample(keep_labels),
                       leaf_names=list(CONCEPT.values()))
    if zero_shot_words is not None:
        model = load_sae(made.sae)
        emb = torch.from_numpy(caption_embedder(MINILM)(zero_shot_words))
        with torch.no_grad():
            model.W_enc["txt"][: len(zero_shot_words)] = emb / torch.linalg.vector_norm(emb, dim=1, keepdim=True)
            model.b_pre["txt"].zero_()
            model.b_lat["txt"].zero_()
        save_sae(model, made.sae)
    codes = run_encode(make_params(), sae_dir=made.sae, features_root=made.features, prepared_dir=made.prepared,
                       out_dir=root / "codes", device="cpu", progress=False)
    return {"prepared": made.prepared, "sae": made.sae, "codes": codes}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_inputs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text_names")
    run = build(root, tiny_inputs, keep_labels=True, zero_shot_words=WORDS[:L])
    run["concepts"] = run_concepts(make_params(zero_shot=200), codes_dir=run["codes"], prepared_dir=run["prepared"],
                                   out_dir=root / "concepts", sae_dir=run["sae"], device="cpu")
    return run


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_label_columns_are_unchanged_and_text_columns_follow(labelled: dict[str, Path]) -> None:
    """The CSVs hold the label-derived columns exactly as concept_rows writes them alone, first
    on every line; the text columns come after."""
    params = make_params()
    prepared = load_prepared(labelled["prepared"])
    rows = split_rows(prepared, "test")
    space = LabelSpace(prepared.hierarchy)
    labels = space.matrix([prepared.labels[i] for i in rows])
    for kind, name in (("joint", "concepts.csv"), ("per_stream", "concepts_per_stream.csv")):
        codes, _ = load_codes(labelled["codes"], kind, prepared, params, rows=rows)
        alone = concept_rows(assign_concepts(codes_to_csr(codes), labels, space, TOP_N, 0.3))
        buf = labelled["concepts"] / f"alone_{kind}.csv"
        write_csv(buf, alone)
        old = buf.read_text().splitlines()
        buf.unlink()
        new = (labelled["concepts"] / name).read_text().splitlines()
        assert len(old) == len(new) == L + 1
        for a, b in zip(old, new, strict=True):
            assert b.startswith(a + ",")
        header = next(csv.reader(io.StringIO(new[0])))
        assert header[len(next(csv.reader(io.StringIO(old[0])))):] == [
            "img_text_name", "img_text_score", "img_text_words", "txt_text_name", "txt_text_score", "txt_text_words",
            "txt_zero_shot_name", "txt_zero_shot_score",
        ]


def test_text_names_are_those_of_the_top_captions(labelled: dict[str, Path]) -> None:
    params = make_params()
    prepared = load_prepared(labelled["prepared"])
    rows = split_rows(prepared, "test")
    terms = caption_terms([prepared.captions[i] for i in rows], params.concepts.text_vocab)
    codes, _ = load_codes(labelled["codes"], "per_stream", prepared, params, rows=rows)
    csr = codes_to_csr(codes)
    table = read_rows(labelled["concepts"] / "concepts_per_stream.csv")
    named = 0
    for s in STREAMS:
        top = top_indicator(top_activating(csr[s], TOP_N), csr[s].shape)
        want = text_names(top, terms, 3, 1.0)
        for i, r in enumerate(table):
            assert r[f"{s}_text_name"] == want.name[i]
            assert r[f"{s}_text_words"] == "|".join(want.words[i])
            named += bool(r[f"{s}_text_name"])
            # every word of a latent's terms is in the captions of its top samples
            words = {w for j in top[i].indices for w in prepared.captions[rows[j]].split()}
            assert {w for term in want.words[i] for w in term.split()} <= words
    assert named > 0
    summary = json.loads((labelled["concepts"] / "summary.json").read_text())
    assert summary["text"]["vocab"] == len(terms.terms) and summary["text"]["words"] == 3
    assert set(summary["per_stream"]["text_named_fraction"]) == set(STREAMS)


def test_label_names_appear_among_text_words(labelled: dict[str, Path]) -> None:
    """Captions name the labels, so a latent named from its labels with a high purity has that
    name among the words of its top terms (a rarer co-occurring word may score higher alone, and
    come first as the bigram of both)."""
    checked = 0
    for r in read_rows(labelled["concepts"] / "concepts_per_stream.csv"):
        for s in STREAMS:
            if r[f"{s}_name"] and float(r[f"{s}_purity"]) >= 0.8:
                assert r[f"{s}_name"] in r[f"{s}_text_words"].replace("|", " ").split()
                checked += 1
    assert checked > 0


def test_zero_shot_names_find_the_planted_words(labelled: dict[str, Path]) -> None:
    """Caption-stream encoder row l is word l's embedding: each latent's zero-shot name is its word,
    in both files; the image stream gets none."""
    for name in ("concepts.csv", "concepts_per_stream.csv"):
        table = read_rows(labelled["concepts"] / name)
        assert [r["txt_zero_shot_name"] for r in table] == WORDS[:L]
        assert all(float(r["txt_zero_shot_score"]) > 0.9 for r in table)
        assert "img_zero_shot_name" not in table[0]
    summary = json.loads((labelled["concepts"] / "summary.json").read_text())
    assert summary["zero_shot"]["streams"] == ["txt"] and summary["zero_shot"]["skipped"] == {}
    assert 0 < summary["zero_shot"]["vocab"] <= 200


def test_zero_shot_refuses_another_model(labelled: dict[str, Path], tmp_path: Path) -> None:
    other = load_sae(labelled["sae"])
    with torch.no_grad():
        other.b_lat["img"].add_(1.0)
    save_sae(other, tmp_path / "sae")
    with pytest.raises(EvaluateInputError, match="not the model that encoded the codes"):
        run_concepts(make_params(zero_shot=50), codes_dir=labelled["codes"], prepared_dir=labelled["prepared"],
                     out_dir=tmp_path / "concepts", sae_dir=tmp_path / "sae", device="cpu")


def test_a_run_without_labels_gets_text_names(tmp_path: Path, tiny_inputs) -> None:
    run = build(tmp_path, tiny_inputs, keep_labels=False)
    out = run_concepts(make_params(), codes_dir=run["codes"], prepared_dir=run["prepared"], out_dir=tmp_path / "concepts")
    table = read_rows(out / "concepts.csv")
    assert all(r[f"{s}_label"] == "" and r[f"{s}_name"] == "" for r in table for s in STREAMS)
    texts = [r["txt_text_name"] for r in table if r["txt_text_name"]]
    assert texts and all(set(t.split()) & set(WORDS) for t in texts)  # each names a planted concept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["joint"]["named_fraction"]["txt"] == 0.0 and summary["joint"]["text_named_fraction"]["txt"] > 0
    assert "zero_shot" not in summary
    assert np.isfinite([float(r["txt_text_score"]) for r in table if r["txt_text_score"]]).all()


def test_zero_shot_streams_skip_precomputed_features() -> None:
    params = params_from_dict({"streams": {
        "img": STREAMS["img"], "pre": {"model": "npy:/nowhere/text.npy", "input": "caption"}, "txt": STREAMS["txt"],
    }})
    assert zero_shot_streams(params) == (["txt"], {"pre": "precomputed features: no model to encode the terms"})
