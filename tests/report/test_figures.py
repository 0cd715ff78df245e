"""The figures of a run: each figure function on tiny inputs made in code, and the `figures`
stage end to end on real encode / concepts / evaluate outputs of a tiny planted setup (the
prepared dataset has real generated PNG images)."""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib.text
import numpy as np
import pytest
from PIL import Image

from sparc.data.base import Sample
from sparc.data.prepared import load_prepared
from sparc.evaluate.concepts_stage import run_concepts
from sparc.evaluate.encode_stage import run_encode
from sparc.evaluate.evaluate_stage import run_evaluate
from sparc.evaluate.run_files import codes_to_csr
from sparc.model.codes import SparseCodes
from sparc.params import Params, params_from_dict
from sparc.report import figures as F
from sparc.report.figures_stage import (
    choose_latents,
    concept_matches,
    localisation_figures,
    run_figures,
)
from tests.report.localise_fixtures import METHODS, TEXTS, write_localise_outputs

PNG = b"\x89PNG\r\n\x1a\n"
CLIP = "openclip:ViT-B-32@laion2b_s34b_b79k"
IMAGE_SPECS = [CLIP, "dinov2:facebook/dinov2-small", "efficientnet:lite0"]
CAPTION_SPECS = [CLIP, "minilm:all-MiniLM-L6-v2"]


def assert_png(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == PNG
    with Image.open(path) as im:
        return im.size


def make_images(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        im = Image.new("RGBA", (40, 30 + i % 3 * 10), (0, 0, 0, 0))
        im.paste((40 * i % 256, 90, 200 - 30 * i % 200, 255), (5, 5, 35, 25))
        path = root / f"img{i}.png"
        im.save(path)
        out.append(path)
    return out


# --------------------------------------------------------------------------- synthetic inputs


def metrics_for(streams: list[str]) -> dict:
    pairs = [(s, t) for s in streams for t in streams]
    rec = {
        kind: {
            "nmse": {f"{s}->{t}": 0.1 + 0.05 * i for i, (s, t) in enumerate(pairs)},
            "fvu": {f"{s}->{t}": (None if i == 1 else 0.2 + 0.1 * i) for i, (s, t) in enumerate(pairs)},
            "self_nmse_mean": 0.1,
        }
        for kind in ("joint", "per_stream")
    }
    jac = {
        kind: {**{f"depth_{d}": {"all": 0.5 - 0.1 * d, "live": 0.9 - 0.2 * d} for d in range(3)}, "n_live": 17}
        for kind in ("joint", "per_stream")
    }
    jac["per_stream"]["depth_2"]["live"] = None
    pat = {
        kind: {
            "alive_all": 0.5, "dead_all": 0.4, "mixed": 0.1,
            "counts": {"alive_all": 12, "dead_all": 10, "mixed": 2},
            "dead_fraction": {s: 0.4 + 0.02 * i for i, s in enumerate(streams)},
        }
        for kind in ("joint", "per_stream")
    }
    ret: dict = {"n": 50, "chance": {"R@1": 0.02, "R@5": 0.1, "R@10": 0.2}}
    for s in streams:
        for t in streams:
            if s != t:
                ret[f"{s}->{t}"] = {"R@1": 0.3, "R@5": 0.6, "R@10": 0.8, "median_rank": 2.0, "MRR": 0.4}
    ret["raw"] = {f"{streams[0]}->{streams[1]}": {"R@1": 0.5, "R@5": 0.7, "R@10": 0.9}}
    return {"reconstruction": rec, "jaccard": jac, "patterns": pat, "retrieval": ret}


STREAM_SETS = {
    "2-streams": {"img": "image", "txt": "caption"},
    "3-streams": {"img_a": "image", "img_b": "image", "txt": "caption"},
    "captions-only": {"txt_a": "caption", "txt_b": "caption"},
}


@pytest.mark.parametrize("kinds", list(STREAM_SETS.values()), ids=list(STREAM_SETS))
def test_summary_figures_are_pngs(kinds: dict[str, str], tmp_path: Path) -> None:
    streams = list(kinds)
    m = metrics_for(streams)
    figs = {
        "reconstruction": F.reconstruction_figure(m["reconstruction"], streams),
        "jaccard": F.jaccard_figure(m["jaccard"]),
        "patterns": F.patterns_figure(m["patterns"], streams),
        "retrieval": F.retrieval_figure(m["retrieval"], streams),
    }
    for name, fig in figs.items():
        w, h = assert_png(F.save_png(fig, tmp_path / f"{name}.png"))
        assert 200 < w < 2500 and 150 < h < 2500


def test_summary_figures_of_one_stream(tmp_path: Path) -> None:
    m = metrics_for(["solo", "other"])
    rec = {k: {"nmse": {"solo->solo": 0.3}, "fvu": {"solo->solo": 0.4}} for k in ("joint", "per_stream")}
    assert_png(F.save_png(F.reconstruction_figure(rec, ["solo"]), tmp_path / "r.png"))
    assert_png(F.save_png(F.patterns_figure(m["patterns"], ["solo"]), tmp_path / "p.png"))
    assert_png(F.save_png(F.jaccard_figure({"joint": m["jaccard"]["joint"]}), tmp_path / "j.png"))


def test_png_bytes_are_deterministic(tmp_path: Path) -> None:
    streams = ["a", "b", "c"]
    m = metrics_for(streams)
    a = F.save_png(F.reconstruction_figure(m["reconstruction"], streams), tmp_path / "a.png").read_bytes()
    b = F.save_png(F.reconstruction_figure(m["reconstruction"], streams), tmp_path / "b.png").read_bytes()
    assert a == b
    assert b"Software" not in a and b"matplotlib" not in a.lower()


def test_retrieval_figure_needs_a_pair() -> None:
    with pytest.raises(ValueError, match="two streams"):
        F.retrieval_figure({"n": 5, "chance": {}}, ["only"])


def view_for(kinds: dict[str, str], images: list[Path], n: int, latent: int = 3) -> F.LatentView:
    cols = []
    for j, (s, inp) in enumerate(kinds.items()):
        samples = [
            F.TopSample(f"id{i}", 1.0 / (i + 1), f"caption {i} with a $dollar$ and ünïcode " * (1 + i % 3),
                        images[i % len(images)] if inp == "image" else None, hit=(i % 2 == 0))
            for i in range(n if j else max(n - 2, 0))
        ]
        cols.append(F.LatentColumn(s, inp, "cat-face" if j else "", 0.5 if j else float("nan"), len(samples), samples))
    return F.LatentView(latent, f"latent {latent} — cat-face", "best-aligned #1", cols)


@pytest.mark.parametrize("kinds", list(STREAM_SETS.values()), ids=list(STREAM_SETS))
def test_latent_figure(kinds: dict[str, str], tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", 4)
    images.append(tmp_path / "missing.png")  # drawn as a grey tile, not an error
    fig = F.latent_figure(view_for(kinds, images, 5), top_n=4, thumb_px=48)
    w, h = assert_png(F.save_png(fig, tmp_path / "latent.png"))
    assert w > 300 and h > 300


def test_latent_figure_shows_text_names(tmp_path: Path) -> None:
    """A column's text name (sparc.evaluate.text_names) is drawn under its label-derived name;
    without any, the header keeps its former lines."""
    images = make_images(tmp_path / "images", 2)
    kinds = {"img": "image", "txt": "caption"}
    plain = view_for(kinds, images, 3)
    texts = F.LatentView(plain.latent, plain.title, plain.note,
                         [dataclasses.replace(plain.columns[0], text="red apple"), plain.columns[1]])

    def drawn(fig) -> str:
        return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))

    with_text = F.latent_figure(texts, 4, 48)
    assert "text: red apple" in drawn(with_text) and "text: none" in drawn(with_text)
    assert "text:" not in drawn(F.latent_figure(plain, 4, 48))
    _, h_plain = assert_png(F.save_png(F.latent_figure(plain, 4, 48), tmp_path / "a.png"))
    _, h_text = assert_png(F.save_png(with_text, tmp_path / "b.png"))
    assert h_text > h_plain


def test_latent_figure_height_follows_the_samples(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", 2)
    kinds = {"img": "image", "txt": "caption"}
    _, short = assert_png(F.save_png(F.latent_figure(view_for(kinds, images, 2), 6, 48), tmp_path / "a.png"))
    _, tall = assert_png(F.save_png(F.latent_figure(view_for(kinds, images, 6), 6, 48), tmp_path / "b.png"))
    assert short < tall


def test_latent_that_never_fires_has_no_figure() -> None:
    view = view_for({"img": "image", "txt": "caption"}, [], 0)
    assert not view.fires
    with pytest.raises(ValueError, match="never fires"):
        F.latent_figure(view, 4, 48)


def test_retrieval_examples_figure(tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", 6)
    examples = []
    for q in range(3):
        results = {
            s: [F.Retrieved(f"id{i}", images[i], 0.9 - 0.1 * i, correct=(i == q)) for i in range(5)]
            for s in ("img_a", "img_b")
        }
        examples.append(F.RetrievalExample("txt", f"id{q}", f"query {q}", results, {"img_a": q + 1, "img_b": 40}, 50))
    fig = F.retrieval_examples_figure(examples, ["img_a", "img_b"], top_n=5, thumb_px=48)
    assert_png(F.save_png(fig, tmp_path / "ret.png"))
    with pytest.raises(ValueError):
        F.retrieval_examples_figure(examples, [], top_n=5, thumb_px=48)


def test_retrieval_examples_use_one_caption_per_image(tmp_path: Path, tiny_inputs) -> None:
    """Issue 22.7: on Open Images the grid said "gallery: 14 test images" where the metric ranks
    11 (one caption per image), showed an image twice in one top list and queried two narratives of
    one image. Queries and gallery are now the metric's rows."""
    from sparc.report.figures_stage import retrieval_examples

    grouped = pipeline(tmp_path, tiny_inputs, {"img": "image", "txt": "caption"}, captions_per_image=2)
    prepared = load_prepared(grouped.prepared)
    test = np.flatnonzero(prepared.splits == "test")
    firsts = prepared.one_per_group(test)
    assert firsts.size < test.size  # the fixture has groups with several test captions
    index = json.loads((figures(grouped) / "index.json").read_text())["retrieval_examples"]
    assert index["gallery_size"] == firsts.size == json.loads((grouped.reports / "metrics.json").read_text())["retrieval"]["n"]
    ids = {prepared.ids[r] for r in firsts}
    assert {q["id"] for q in index["queries"]} <= ids
    local = codes_to_csr(SparseCodes.load(grouped.codes / "per_stream", test))
    examples, _, _ = retrieval_examples(grouped.params, local, test, prepared)
    for ex in examples:
        shown = [r.sample_id for r in ex.results["img"]]
        assert ex.gallery_size == firsts.size and set(shown) <= ids and len(set(shown)) == len(shown)


def test_thumbnails_keep_aspect_on_white(tmp_path: Path) -> None:
    (path,) = make_images(tmp_path, 1)
    arr, ok = F.Thumbnails(32)(path)
    assert ok and arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert (arr[0, 0] == 255).all()  # transparent corner composited on white
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    arr, ok = F.Thumbnails(32)(bad)
    assert not ok and arr.shape == (32, 32, 3)


def test_thumbnails_of_16_bit_and_float_images_keep_their_grey(tmp_path: Path) -> None:
    """Issue 22.5: 16-bit greyscale was clipped to white, 0..1 floats to black."""
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    for name in ("g16.png", "f.tif"):
        arr, ok = F.Thumbnails(32)(tmp_path / name)
        assert ok and arr[16, 16].tolist() == [128, 128, 128]  # the image in the middle of the white tile


def test_wrap_cuts_with_an_ellipsis() -> None:
    assert F.wrap("a b c", 10, 2) == "a b c"
    out = F.wrap("word " * 40, 12, 2)
    assert out.count("\n") == 1 and out.endswith("…")


# --------------------------------------------------------------------------- latent choice


def latent_table(streams: list[str]) -> tuple[list[dict], list[dict]]:
    """Five latents: 0 dead, 1 and 2 alive everywhere (2 better aligned), 3 mixed and named
    cat-face in one stream, 4 named country-flag but never firing."""
    rows, crows = [], []
    spec = {
        0: ("dead_all", 0.0, "", ""), 1: ("alive_all", 0.7, "tool", "tool"), 2: ("alive_all", 0.9, "", "sky"),
        3: ("mixed", 0.2, "", ""), 4: ("alive_all", 1.0, "country-flag", "country-flag"),
    }
    for i, (pattern, jac, agreed, name) in spec.items():
        row = {"latent": str(i), "agreed_name": agreed, "pattern": pattern, "jaccard_d0": "1.0", "jaccard_d1": str(jac)}
        crow = {"latent": str(i)}
        for j, s in enumerate(streams):
            n = "cat-face" if (i == 3 and j == 1) else name
            row[f"name_{s}"], row[f"purity_{s}"], row[f"freq_{s}"] = n, "0.5" if n else "0.1", "0.2"
            crow[f"{s}_name"], crow[f"{s}_label"] = n, (f"subgroup:{n}" if n else "")
        rows.append(row)
        crows.append(crow)
    return rows, crows


def test_choose_latents_best_concepts_and_skips() -> None:
    streams = ["img", "txt"]
    rows, crows = latent_table(streams)
    fires = np.array([False, True, True, True, False])
    choices, skipped_concepts, skipped_latents = choose_latents(
        rows, crows, streams, fires, n_best=5, concepts=["Cat-Face", "country-flag", "unicorn"]
    )
    got = {c.latent: c.reasons for c in choices}
    assert got == {2: ["best:1"], 1: ["best:2"], 3: ["concept:Cat-Face"]}  # 4 never fires, 0 is dead
    assert [c["concept"] for c in skipped_concepts] == ["country-flag", "unicorn"]
    assert "never fire" in skipped_concepts[0]["reason"] and "no latent" in skipped_concepts[1]["reason"]
    assert skipped_latents == [{"latent": 4, "reason": "never fires on the test split", "concept": "country-flag"}]
    # latents firing on a full column of samples come before better-aligned thin ones
    choices, _, _ = choose_latents(rows, crows, streams, fires, 1, [], supported=np.array([1, 1, 0, 1, 1], bool))
    assert [c.latent for c in choices] == [1]


def test_concept_matches_names_and_label_ids() -> None:
    streams = ["a", "b"]
    row = {"agreed_name": "", "name_a": "Cat Face", "name_b": ""}
    crow = {"a_name": "Cat Face", "a_label": "subgroup:cat-face", "b_name": "", "b_label": "subgroup:cat-face"}
    assert concept_matches("cat face", row, crow, streams) == 1
    assert concept_matches("cat-face", row, crow, streams) == 1  # the label id's last part
    assert concept_matches("subgroup:cat-face", row, crow, streams) == 1
    assert concept_matches("dog", row, crow, streams) == 0
    assert concept_matches("x", {"agreed_name": "X"}, {}, streams) == 2


# --------------------------------------------------------------------------- the stage end to end


L, K = 24, 4


@dataclass
class Run:
    params: Params
    prepared: Path
    codes: Path
    concepts: Path
    reports: Path


def pipeline(root: Path, tiny_inputs, kinds: dict[str, str], concepts: list[str] | None = None,
             captions_per_image: int = 1) -> Run:
    """prepare (real PNG images) -> features -> untrained SAE (``tiny_inputs``: the conftest
    fixture) -> encode -> concepts -> evaluate;
    with ``captions_per_image`` > 1, consecutive samples form a group (one image, several captions)."""
    dims = {s: 12 + 2 * i for i, s in enumerate(kinds)}
    images = make_images(root / "src_images", 8)

    def sample(i: int, sid: str, labels: tuple[str, ...], _: Path) -> Sample:
        group = f"img{i // captions_per_image}" if captions_per_image > 1 else ""
        return Sample(sid, images[i % len(images)], f"caption {i} of {' and '.join(labels)}", labels, group=group)

    specs = {}
    counters = {"image": 0, "caption": 0}
    for s, inp in kinds.items():
        pool = IMAGE_SPECS if inp == "image" else CAPTION_SPECS
        specs[s] = {"model": pool[counters[inp] % len(pool)], "input": inp}
        counters[inp] += 1
    made = tiny_inputs(root, specs, dims, L=L, k=K, n_samples=160, sample=sample)
    prepared, sae = made.prepared, made.sae
    params = params_from_dict({
        "L": L, "k": K, "streams": specs,
        "concepts": {"top_n": 8, "purity_threshold": 0.3},
        "evaluate": {"batch_size": 64, "probe_min_positives": 5, "probe_candidates": 3},
        "figures": {"concepts": concepts or ["no-such-concept"], "n_best": 2, "top_n": 4, "queries": 3, "thumb_px": 32},
    })
    codes = run_encode(params, sae_dir=sae, features_root=root / "features", prepared_dir=prepared,
                       out_dir=root / "codes", device="cpu", progress=False)
    conc = run_concepts(params, codes_dir=codes, prepared_dir=prepared, out_dir=root / "reports" / "concepts")
    run_evaluate(params, codes_dir=codes, prepared_dir=prepared, features_root=root / "features", sae_dir=sae,
                 concepts_dir=conc, metrics_path=root / "reports" / "metrics.json", device="cpu")
    return Run(params, prepared, codes, conc, root / "reports")


def figures(run: Run, params: Params | None = None, out: Path | None = None) -> Path:
    return run_figures(params or run.params, prepared_dir=run.prepared, codes_dir=run.codes,
                       concepts_dir=run.concepts, reports_dir=run.reports, out_dir=out)


def named_concept(run: Run) -> str:
    with (run.concepts / "concepts.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    s = run.params.stream_names[-1]
    return next(r[f"{s}_name"] for r in rows if r[f"{s}_name"])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, tiny_inputs) -> Run:
    return pipeline(tmp_path_factory.mktemp("mixed"), tiny_inputs, {"img_a": "image", "img_b": "image", "txt": "caption"})


@pytest.fixture(scope="module")
def mixed_figures(mixed: Run) -> Path:
    return figures(mixed, out=mixed.reports / "default_figures")


def test_run_figures_end_to_end(mixed: Run) -> None:
    concept = named_concept(mixed)
    params = params_from_dict({
        "L": L, "k": K, "streams": {s: vars(p) for s, p in mixed.params.streams.items()},
        "figures": {"concepts": [concept, "no-such-concept"], "n_best": 2, "top_n": 4, "queries": 3, "thumb_px": 32},
    })
    out = figures(mixed, params)
    assert out == mixed.reports / "figures"
    assert not (mixed.reports / "figures.tmp").exists()
    index = json.loads((out / "index.json").read_text())
    files = [f["file"] for f in index["figures"]]
    for name in ("reconstruction.png", "jaccard_depth.png", "patterns.png", "retrieval.png", "retrieval_examples.png"):
        assert name in files
    assert sorted(files) == sorted(p.name for p in out.glob("*.png"))
    for p in out.glob("*.png"):
        assert_png(p)
    reasons = [r for lat in index["latents"] for r in lat["reasons"]]
    assert "best:1" in reasons and f"concept:{concept}" in reasons
    with (mixed.concepts / "concepts.csv").open(newline="") as fh:
        concept_rows = list(csv.DictReader(fh))
    for lat in index["latents"]:
        assert (out / lat["file"]).is_file()
        assert any(lat["top_samples"].values())
        assert set(lat["purity"]) == {"img_a", "img_b", "txt"}
        assert lat["text_names"] == {s: concept_rows[lat["latent"]][f"{s}_text_name"] for s in ("img_a", "img_b", "txt")}
    assert index["skipped_concepts"] == [{"concept": "no-such-concept", "reason": "no latent is named 'no-such-concept' in any stream"}]
    ret = index["retrieval_examples"]
    assert ret["query_stream"] == "txt" and ret["image_streams"] == ["img_a", "img_b"]
    assert len(ret["queries"]) == 3
    for q in ret["queries"]:
        assert all(1 <= r <= index["n_eval"] for r in q["correct_rank"].values())


def test_run_figures_is_deterministic_and_replaces_the_output(mixed: Run, mixed_figures: Path, tmp_path: Path) -> None:
    a = mixed_figures
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stale.png").write_bytes(b"old")
    b = figures(mixed, out=tmp_path / "b")
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def test_run_figures_skips_latents_that_never_fire(mixed: Run, mixed_figures: Path) -> None:
    with (mixed.reports / "latents.csv").open(newline="") as fh:
        dead = [r for r in csv.DictReader(fh) if r["alive_in"] == "none"]
    assert dead  # the untrained SAE leaves some latents dead on the test split
    out = mixed_figures
    shown = {lat["latent"] for lat in json.loads((out / "index.json").read_text())["latents"]}
    assert shown and not shown & {int(r["latent"]) for r in dead}


def test_run_figures_draws_the_localisation(mixed: Run, tmp_path: Path) -> None:
    localise = write_localise_outputs(tmp_path / "localise")
    out = run_figures(mixed.params, prepared_dir=mixed.prepared, codes_dir=mixed.codes, concepts_dir=mixed.concepts,
                      reports_dir=mixed.reports, out_dir=tmp_path / "figures", localise_dir=localise)
    index = json.loads((out / "index.json").read_text())
    entries = {f["file"]: f for f in index["figures"]}
    assert entries["localisation.png"]["queries"] == TEXTS and entries["localisation.png"]["methods"] == METHODS
    assert entries["localisation_scores.png"]["methods"] == ["vit", "effnet", "chance"]
    w, h = assert_png(out / "localisation.png")
    assert (w, h) == (round(1.9 * (1 + len(METHODS)) * F.DPI), round(2.1 * len(TEXTS) * F.DPI))
    w, h = assert_png(out / "localisation_scores.png")
    assert 300 <= w <= 1000 and 200 <= h <= 400
    assert not [n for n in index["notes"] if "localisation" in n]


def test_run_figures_skips_the_localisation_without_its_outputs(mixed_figures: Path) -> None:
    index = json.loads((mixed_figures / "index.json").read_text())  # the fixture has no reports/localise
    assert not list(mixed_figures.glob("localisation*.png"))
    assert [n for n in index["notes"] if n.startswith("no localisation")] == [
        f"no localisation.png: {mixed_figures.parent / 'localise' / 'overlays.npz'} is missing "
        "(run `dvc repro localise` or `python -m sparc localise`)",
        f"no localisation_scores.png: {mixed_figures.parent / 'localise' / 'metrics.json'} is missing "
        "(run `dvc repro localise` or `python -m sparc localise`)",
    ]


def test_localisation_figures_with_part_of_the_outputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    saved, notes = [], []

    def save(fig, name: str, what: str, **extra) -> None:
        saved.append((name, fig.axes[0].get_legend().get_texts()[0].get_text() if name.endswith("scores.png") else ""))

    localisation_figures(write_localise_outputs(tmp_path / "m", overlays=False), save, notes)
    assert saved == [("localisation_scores.png", "AP")]  # the threshold is stored with the overlays
    assert notes == [f"no localisation.png: {tmp_path / 'm' / 'overlays.npz'} is missing "
                     "(run `dvc repro localise` or `python -m sparc localise`)"]
    assert capsys.readouterr().out == f"figures: {notes[0]}\n"
    saved.clear()
    localisation_figures(write_localise_outputs(tmp_path / "o", metrics=False), save, notes)
    assert saved == [("localisation.png", "")]


def test_run_figures_captions_only(tmp_path_factory: pytest.TempPathFactory, tiny_inputs) -> None:
    run = pipeline(tmp_path_factory.mktemp("captions"), tiny_inputs, {"txt_a": "caption", "txt_b": "caption"})
    out = figures(run)
    index = json.loads((out / "index.json").read_text())
    assert index["retrieval_examples"] is None
    assert "no image stream: no retrieval example grid" in index["notes"]
    assert not (out / "retrieval_examples.png").exists()
    assert (out / "retrieval.png").is_file() and index["latents"]


def test_run_figures_images_only(tmp_path_factory: pytest.TempPathFactory, tiny_inputs) -> None:
    run = pipeline(tmp_path_factory.mktemp("images"), tiny_inputs, {"img_a": "image", "img_b": "image"})
    index = json.loads((figures(run) / "index.json").read_text())
    assert index["retrieval_examples"] is None
    assert "no caption stream: no retrieval example grid" in index["notes"]
