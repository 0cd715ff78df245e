"""The concept browser (sparc.report.browser) on a tiny pipeline run made in code.

Features and labels come from the planted-concept generator, images are small generated PNGs;
the prepared dataset, features, SAE, codes, concepts and evaluation are written by the project's
own writers and stages (as tests/evaluate/test_stage.py does), so the browser reads exactly what
the pipeline produces.

The last test opens the page in Debian's headless Chromium through Selenium (no browser or driver
is ever downloaded: Selenium Manager is kept offline and both paths are given). Chromium and
chromium-driver are Debian packages that ``make test`` installs (scripts/system-packages.sh); when
they are missing that test fails and says so.
"""

from __future__ import annotations

import ast
import csv
import importlib.resources
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sparc.data.base import Sample
from sparc.data.prepared import load_prepared
from sparc.evaluate.concepts_stage import run_concepts
from sparc.evaluate.encode_stage import run_encode
from sparc.evaluate.evaluate_stage import run_evaluate
from sparc.evaluate.run_files import EvaluateInputError
from sparc.model.codes import SparseCodes
from sparc.params import Params, params_from_dict
from sparc.report.browser import (
    PAGE_FILES,
    build_browser,
    embedded_data,
    localisation_section,
    page_template,
    read_localisation,
    search_matches,
)
from tests.report.localise_fixtures import METHODS, METRICS, TEXTS, write_localise_outputs

CLIP = "openclip:ViT-B-32@laion2b_s34b_b79k"
STREAMS = {
    "dino": {"model": "dinov2:facebook/dinov2-small", "input": "image"},
    "clip_img": {"model": CLIP, "input": "image"},
    "clip_txt": {"model": CLIP, "input": "caption"},
}
DIMS = {"dino": 20, "clip_img": 16, "clip_txt": 16}
L, K = 24, 4
IMAGE_PX, THUMB_PX, TOP_N, QUERIES = 40, 24, 5, 3
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SETUP_HINT = (
    "run `make test` (scripts/system-packages.sh installs them as root) or "
    "`sudo apt-get install chromium chromium-driver`"
)


@dataclass
class Run:
    root: Path
    params: Params
    prepared: Path
    codes: Path
    concepts: Path
    reports: Path

    def build(self, out: Path, **over) -> Path:
        kwargs = {
            "prepared_dir": self.prepared, "codes_dir": self.codes, "concepts_dir": self.concepts,
            "reports_dir": self.reports, "out_dir": out,
        }
        kwargs.update(over)
        return build_browser(self.params, **kwargs)


def _image(path: Path, labels: tuple[str, ...]) -> None:
    """A small PNG: background colour from the first label's parent, a shape per leaf."""
    palette = [(220, 70, 60), (60, 140, 220), (70, 180, 90), (230, 180, 40)]
    parent = int(labels[0].split(".")[0][1:]) % len(palette)
    im = Image.new("RGBA", (IMAGE_PX, IMAGE_PX), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    draw.rectangle([2, 2, IMAGE_PX - 3, IMAGE_PX - 3], fill=(*palette[parent], 255))
    for j, lab in enumerate(labels):
        child = int(lab.rsplit("c", 1)[1])
        x = 6 + 10 * j
        box = [x, 6 + 6 * child, x + 8, 14 + 6 * child]
        (draw.ellipse if child % 2 else draw.rectangle)(box, fill=(255, 255, 255, 255))
    im.save(path)


def build_run(root: Path, tiny_inputs, captions_per_image: int = 1, keep_labels: bool = True) -> Run:
    """The stages up to evaluate on planted data (``tiny_inputs``: the conftest fixture); with ``captions_per_image`` > 1, consecutive
    samples share an image (a group, as Open Images' narratives); ``keep_labels`` False: samples
    without labels (their captions still name the planted concepts)."""
    def sample(i: int, sid: str, labels: tuple[str, ...], images: Path) -> Sample:
        group = f"img{i // captions_per_image}" if captions_per_image > 1 else ""
        img = images / f"{group or sid}.png"
        if not img.exists():
            _image(img, labels)
        return Sample(sid, img, "a picture of " + " and ".join(labels), labels if keep_labels else (), group=group)

    made = tiny_inputs(root, STREAMS, DIMS, L=L, k=K, n_samples=200, sample=sample)
    prepared, features, sae = made.prepared, made.features, made.sae
    params = params_from_dict({
        "L": L, "k": K, "streams": STREAMS,
        "concepts": {"top_n": 10, "purity_threshold": 0.25},
        "evaluate": {"batch_size": 64, "probe_min_positives": 5, "probe_candidates": 5},
        "figures": {"top_n": TOP_N, "thumb_px": THUMB_PX, "queries": QUERIES},
    })
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codes = run_encode(
            params, sae_dir=sae, features_root=features, prepared_dir=prepared, out_dir=root / "codes",
            device="cpu", progress=False,
        )
        concepts = run_concepts(params, codes_dir=codes, prepared_dir=prepared, out_dir=root / "concepts")
        metrics = run_evaluate(
            params, codes_dir=codes, prepared_dir=prepared, features_root=features, sae_dir=sae,
            concepts_dir=concepts, metrics_path=root / "reports" / "metrics.json", device="cpu",
        )
    finally:
        torch.set_num_threads(before)
    return Run(root, params, prepared, codes, concepts, metrics.parent)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_inputs) -> Run:
    return build_run(tmp_path_factory.mktemp("browser"), tiny_inputs)


@pytest.fixture(scope="module")
def browser(run: Run) -> Path:
    return run.build(run.root / "browser")


@pytest.fixture(scope="module")
def data(browser: Path) -> dict:
    return embedded_data(browser / "index.html")


@pytest.fixture(scope="module")
def loc_browser(run: Run) -> Path:
    """The browser with the localise stage's outputs (tiny ones made in code)."""
    return run.build(run.root / "browser_loc", localise_dir=write_localise_outputs(run.root / "localise"))


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def a_query(data: dict) -> str:
    """A concept name that some, not all, live latents carry (the fixture must have one)."""
    names = sorted({n for e in data["latents"] for n in e["search"].split("\n") if n})
    for name in names:
        hits = search_matches(data, name)
        if 0 < len(hits) < len(data["latents"]):
            return name
    pytest.fail(f"the fixture names no latent usefully (names: {names}); lower its purity_threshold")


# --------------------------------------------------------------------------- the embedded data


def test_writes_page_and_thumbnails_atomically(run: Run, browser: Path, data: dict) -> None:
    assert sorted(p.name for p in browser.iterdir()) == ["index.html", "thumbs"]
    assert not browser.with_name(browser.name + ".tmp").exists()
    thumbs = sorted(browser.glob("thumbs/*"))
    assert len(thumbs) == len(data["thumbs"]) > 0
    for path in thumbs:
        with Image.open(path) as im:
            assert im.format == "JPEG" and max(im.size) == THUMB_PX
    # a rebuild replaces the output as a whole
    (browser / "stray.txt").write_text("x")
    run.build(browser)
    assert not (browser / "stray.txt").exists()


def test_live_latents_are_those_firing_on_test(run: Run, data: dict) -> None:
    rows = read_csv(run.reports / "latents.csv")
    live = [int(r["latent"]) for r in rows if r["alive_in"] != "none"]
    assert [e["l"] for e in data["latents"]] == live
    metrics = json.loads((run.reports / "metrics.json").read_text())
    assert len(live) == metrics["jaccard"]["joint"]["n_live"] == data["summary"]["n_live"]["joint"]
    assert 0 < len(live) <= L
    deepest = max(int(k.removeprefix("jaccard_d")) for k in rows[0] if re.fullmatch(r"jaccard_d\d+", k))
    assert data["depths"][-1] == deepest
    for e in data["latents"]:
        r = rows[e["l"]]
        assert e["agreed"] == r["agreed_name"]
        assert e["jac"]["joint"][-1] == pytest.approx(float(r[f"jaccard_d{deepest}"]))
        assert e["jac"]["per_stream"][-1] == pytest.approx(float(r[f"per_stream_jaccard_d{deepest}"]))
        for s in STREAMS:
            assert e["name"][s] == r[f"name_{s}"]
            assert e["freq"][s] == pytest.approx(float(r[f"freq_{s}"]))


def test_search_matches_concept_names(data: dict) -> None:
    every = [e["l"] for e in data["latents"]]
    assert search_matches(data, "") == search_matches(data, "   ") == every
    assert search_matches(data, "no such concept at all") == []
    query = a_query(data)
    hits = search_matches(data, query.upper())
    assert hits == search_matches(data, f"  {query} ")
    for e in data["latents"]:
        names = [e["agreed"], *e["name"].values(), *e["text"].values()] + [
            n for k in e["kinds"].values() for n in (k["agreed"], *(v["name"] for v in k["stream"].values()))
        ] + [n for k in e["kinds"].values() for v in k["stream"].values() for n in (v["text"], *v["words"])]
        assert (e["l"] in hits) == any(query in n.lower() for n in names)


def test_text_names_are_shown_and_searched(run: Run, data: dict) -> None:
    """Each latent's text names and top terms (sparc.evaluate.text_names) come from the concepts
    CSVs, and the search finds a latent by a term no label name holds."""
    tables = {k: read_csv(run.concepts / n) for k, n in (("joint", "concepts.csv"), ("per_stream", "concepts_per_stream.csv"))}
    texts = set()
    for e in data["latents"]:
        for s in STREAMS:
            assert e["text"][s] == tables["joint"][e["l"]][f"{s}_text_name"]
            for kind, table in tables.items():
                v = e["kinds"][kind]["stream"][s]
                row = table[e["l"]]
                assert v["text"] == row[f"{s}_text_name"]
                assert v["words"] == [w for w in row[f"{s}_text_words"].split("|") if w]
                assert v["text_score"] == (pytest.approx(float(row[f"{s}_text_score"])) if row[f"{s}_text_score"] else None)
                texts.update(v["words"])
    label_names = " ".join(
        n.lower() for e in data["latents"] for k in e["kinds"].values()
        for n in (e["agreed"], k["agreed"], *(v["name"] for v in k["stream"].values()))
    )
    holder = {w: e["l"] for e in data["latents"] for k in e["kinds"].values() for v in k["stream"].values()
              for w in v["words"] if w not in label_names}
    assert holder, "the fixture's captions should give terms no label name holds"
    term, latent = sorted(holder.items())[0]
    assert latent in search_matches(data, term.upper())


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory: pytest.TempPathFactory, tiny_inputs) -> Path:
    """The browser of a run whose samples have no labels (their captions name the concepts)."""
    root = tmp_path_factory.mktemp("unlabelled")
    return build_run(root, tiny_inputs, keep_labels=False).build(root / "browser")


def test_a_run_without_labels_shows_and_searches_text_names(unlabelled: Path) -> None:
    data = embedded_data(unlabelled / "index.html")
    assert data["latents"] and not data["labels"]
    assert all(not e["agreed"] and not any(e["name"].values()) for e in data["latents"])
    named = [e for e in data["latents"] if any(e["text"].values())]
    assert named
    text = next(t for t in named[0]["text"].values() if t)
    assert named[0]["l"] in search_matches(data, text)


def test_top_samples_and_label_counts_match_the_concepts(run: Run, data: dict) -> None:
    prepared = load_prepared(run.prepared)
    test_rows = set(np.flatnonzero(prepared.splits == "test").tolist())
    tables = {
        "joint": read_csv(run.concepts / "concepts.csv"),
        "per_stream": read_csv(run.concepts / "concepts_per_stream.csv"),
    }
    codes = {kind: SparseCodes.load(run.codes / kind) for kind in tables}
    label_ids = [lab for lab, _ in data["labels"]]
    checked = 0
    for e in data["latents"]:
        for kind, k in e["kinds"].items():
            for s, v in k["stream"].items():
                c = tables[kind][e["l"]]
                assert v["n_active"] == int(c[f"{s}_n_active"]) and v["name"] == c[f"{s}_name"]
                top = v["top"]
                assert len(top) == min(TOP_N, v["n_active"])
                acts = [a for _, a in top]
                assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
                for row, act in top:
                    assert row in test_rows
                    hit = codes[kind].indices[s][row] == e["l"]
                    assert codes[kind].values[s][row][hit][0] == pytest.approx(act, abs=1e-4)
                dist = v["dist_top"]
                assert dist["n"] == min(data["top_n_names"], v["n_active"])
                assert v["dist_all"]["n"] == v["n_active"]
                if dist["n"]:
                    j, count = dist["labels"][0]
                    assert label_ids[j] == c[f"{s}_label"] == label_ids[v["label"]]
                    assert count / dist["n"] == pytest.approx(float(c[f"{s}_purity"]), abs=1e-6)
                    checked += 1
    assert checked > 0


def test_thumbnails_only_for_shown_images(browser: Path, data: dict) -> None:
    image_streams = [s for s, spec in STREAMS.items() if spec["input"] == "image"]
    shown = set()
    for e in data["latents"]:
        for k in e["kinds"].values():
            for s in image_streams:
                shown.update(row for row, _ in k["stream"][s]["top"])
    for ex in data["retrieval"]["examples"]:
        for item in ex["items"]:
            shown.add(item["row"])
            shown.update(row for row, _ in item["top"])
    assert set(data["thumbs"]) == shown
    for row in shown:
        img = data["samples"][str(row)]["img"]
        assert img == f"thumbs/{row}.jpg" and (browser / img).is_file()


def test_retrieval_examples(run: Run, data: dict) -> None:
    prepared = load_prepared(run.prepared)
    n_test = int((prepared.splits == "test").sum())
    examples = data["retrieval"]["examples"]
    assert [(x["query"], x["gallery"]) for x in examples] == [("clip_txt", "dino"), ("clip_txt", "clip_img")]
    for ex in examples:
        assert len(ex["items"]) == QUERIES
        for item in ex["items"]:
            assert 1 <= item["rank"] <= n_test and 0 <= item["ties"] < n_test
            sims = [sim for _, sim in item["top"]]
            assert len(sims) == 5 and sims == sorted(sims, reverse=True)
            if item["rank"] == 1 and item["ties"] == 0:
                assert item["top"][0][0] == item["row"]
    reps = {(r["query"], r["gallery"], r["representation"]) for r in data["retrieval"]["metrics"]}
    assert ("clip_txt", "dino", "codes") in reps and ("", "", "chance") in reps


def test_retrieval_examples_use_one_caption_per_image(tmp_path: Path, tiny_inputs) -> None:
    """Issue 22.7: with several captions per image the examples ranked every test row (an image
    twice in one top list, two captions of one image both queries), not the metric's rows."""
    grouped = build_run(tmp_path, tiny_inputs, captions_per_image=2)
    prepared = load_prepared(grouped.prepared)
    test = np.flatnonzero(prepared.splits == "test")
    firsts = set(prepared.one_per_group(test).tolist())
    assert len(firsts) < test.size  # the fixture has groups with several test captions
    data = embedded_data(grouped.build(tmp_path / "browser") / "index.html")
    for ex in data["retrieval"]["examples"]:
        for item in ex["items"]:
            assert item["row"] in firsts and 1 <= item["rank"] <= len(firsts) and item["ties"] < len(firsts)
            shown = [row for row, _ in item["top"]]
            assert set(shown) <= firsts and len({prepared.groups[r] for r in shown}) == len(shown)


def test_page_is_self_contained(browser: Path, data: dict) -> None:
    text = (browser / "index.html").read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert "fetch(" not in text and "<link" not in text and "@import" not in text
    blob = text[text.index('id="data">') : text.index("</script>", text.index('id="data">'))]
    assert "<" not in blob.removeprefix('id="data">')
    assert data["thumb_px"] == THUMB_PX and data["top_n"] == TOP_N


def test_page_files_are_package_data_found_through_importlib_resources() -> None:
    """The page's files are read through importlib.resources (as from an installed package), and
    pyproject.toml's package-data ships every one of them."""
    files = importlib.resources.files("sparc.report") / PAGE_FILES
    names = {f.name for f in files.iterdir()}
    assert {"index.html", "style.css", "app.js"} <= names
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    section = pyproject[pyproject.index("[tool.setuptools.package-data]") :]
    patterns = ast.literal_eval(re.search(r'^"sparc\.report" = (\[.*\])$', section, re.M).group(1))
    for name in names:
        assert any(Path(f"{PAGE_FILES}/{name}").match(p) for p in patterns), name
    page = page_template()
    assert "{{STYLE}}" not in page and "{{SCRIPT}}" not in page
    assert (files / "style.css").read_text(encoding="utf-8") in page
    assert (files / "app.js").read_text(encoding="utf-8") in page
    assert all(f"{{{{{key}}}}}" in page for key in ("TITLE", "THUMB", "DATA"))


def test_refuses_stale_evaluation(run: Run, tmp_path: Path) -> None:
    stale = tmp_path / "reports"
    shutil.copytree(run.reports, stale)
    rows = read_csv(stale / "latents.csv")
    live = next(r for r in rows if r["alive_in"] != "none")
    live[f"freq_{next(iter(STREAMS))}"] = "0.0"
    with (stale / "latents.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(EvaluateInputError, match="stale evaluation"):
        run.build(tmp_path / "out", reports_dir=stale)
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="retrieval.csv"):
        (stale / "retrieval.csv").unlink()
        run.build(tmp_path / "out", reports_dir=stale)


def test_localisation_section_and_images(loc_browser: Path) -> None:
    loc = embedded_data(loc_browser / "index.html")["localisation"]
    assert loc["ap_label"] == "AP@0.2" and loc["notes"] == []
    assert [(r["method"], r["ap"], r["miou"], r["chance"]) for r in loc["metrics"]] == [
        (m, METRICS[f"ap_{m}"], METRICS[f"miou_{m}"], m == "chance") for m in METHODS]
    assert [q["text"] for q in loc["queries"]] == TEXTS
    images = []
    for q in loc["queries"]:
        assert [p["method"] for p in q["panels"]] == METHODS
        images += [q["img"], *(p["img"] for p in q["panels"])]
    assert sorted(images) == sorted(p.relative_to(loc_browser).as_posix() for p in loc_browser.glob("localise/*"))
    for rel in images:
        data = (loc_browser / rel).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(loc_browser / rel) as im:
            assert im.mode == "RGB" and 16 <= max(im.size) <= 160


def test_localisation_absent_is_a_note(browser: Path, data: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert data["localisation"] is None and not (browser / "localise").exists()
    write_localise_outputs(tmp_path, overlays=False)
    metrics, overlays, notes = read_localisation(tmp_path)
    assert overlays is None and notes == [
        f"no localisation overlays: {tmp_path / 'overlays.npz'} is missing "
        "(run `dvc repro localise` or `python -m sparc localise`)"]
    assert capsys.readouterr().out == f"browser: {notes[0]}\n"
    section = localisation_section(metrics, overlays, notes)
    assert section["ap_label"] == "AP" and section["queries"] == [] and len(section["metrics"]) == 3
    assert localisation_section(None, None, []) is None


# --------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def chrome(tmp_path_factory: pytest.TempPathFactory):
    """Headless Debian Chromium driven by Debian's chromedriver; never downloads anything."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"the browser test needs Debian's chromium and chromium-driver ({', '.join(missing)} "
                    f"missing): {SETUP_HINT}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs selenium: run `make test` or `.venv/bin/pip install -r requirements.txt`",
                    pytrace=False)
    saved = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        f"--user-data-dir={profile}", "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        if saved is None:
            os.environ.pop("SE_OFFLINE", None)
        else:
            os.environ["SE_OFFLINE"] = saved


def _wait(predicate, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.05)


def test_page_in_headless_chromium(chrome, browser: Path, data: dict, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    def rows() -> list[int]:  # read in one script: the table may be re-rendered meanwhile
        return chrome.execute_script(
            "return [...document.querySelectorAll('#latents tbody tr')].map(tr => Number(tr.dataset.latent))"
        )

    chrome.get((browser / "index.html").resolve().as_uri())
    every = [e["l"] for e in data["latents"]]
    assert _wait(lambda: rows() == every), "the table should list every live latent, by latent id"
    headers = [th.text for th in chrome.find_elements(By.CSS_SELECTOR, "#latents thead th")]
    assert headers[:2] == ["latent", "agreed name"] and f"freq {next(iter(STREAMS))}" in headers
    assert [f"{s} text name" for s in STREAMS] == [h for h in headers if h.endswith(" text name")]

    # sort: a click on "latent" reverses the order
    chrome.find_element(By.CSS_SELECTOR, '#latents thead th[data-col="0"]').click()
    assert _wait(lambda: rows() == every[::-1])

    # search filters the table to the latents named after the query
    query = a_query(data)
    expected = search_matches(data, query)
    chrome.find_element(By.ID, "search").send_keys(query.upper())
    assert _wait(lambda: sorted(rows()) == sorted(expected)), (query, rows(), expected)
    assert len(expected) < len(every)

    # open one latent: its panel shows its samples per stream
    latent = expected[0]
    chrome.find_element(By.CSS_SELECTOR, f'#latents tbody tr[data-latent="{latent}"] td:nth-child(2)').click()
    panel = chrome.find_element(By.ID, "panel")
    assert _wait(lambda: panel.is_displayed() and panel.get_attribute("data-latent") == str(latent))
    assert chrome.execute_script("return location.hash") == f"#latent-{latent}"
    assert f"Latent #{latent}" in panel.find_element(By.TAG_NAME, "h2").text
    entry = next(e for e in data["latents"] if e["l"] == latent)
    for s, spec in STREAMS.items():
        section = panel.find_element(By.CSS_SELECTOR, f'section.stream[data-stream="{s}"]')
        top = entry["kinds"]["joint"]["stream"][s]["top"]
        if spec["input"] == "image":
            imgs = section.find_elements(By.CSS_SELECTOR, ".thumbs img")
            assert [i.get_attribute("src").rsplit("/", 1)[1] for i in imgs] == [f"{row}.jpg" for row, _ in top]
            assert all(_wait(lambda i=i: chrome.execute_script("return arguments[0].naturalWidth", i)) for i in imgs)
        else:
            items = [li.text for li in section.find_elements(By.CSS_SELECTOR, "ol.captions li")]
            assert len(items) == len(top)
            for text, (row, _) in zip(items, top, strict=True):
                assert text.startswith(data["samples"][str(row)]["caption"])
    chrome.save_screenshot(str(tmp_path / "browser.png"))
    assert (tmp_path / "browser.png").stat().st_size > 10_000

    # per-stream codes toggle, then close with Escape
    panel.find_element(By.CSS_SELECTOR, 'button[data-kind="per_stream"]').click()
    assert _wait(lambda: "on" in chrome.find_element(By.CSS_SELECTOR, 'button[data-kind="per_stream"]').get_attribute("class"))
    chrome.find_element(By.TAG_NAME, "body").send_keys("\ue00c")  # Escape
    assert _wait(lambda: not chrome.find_element(By.ID, "panel").is_displayed())

    # retrieval examples render, and the page loaded nothing but local files
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#retrieval-examples .query")) == 2 * QUERIES
    requested = [
        m["params"]["request"]["url"]
        for m in (json.loads(entry["message"])["message"] for entry in chrome.get_log("performance"))
        if m["method"] == "Network.requestWillBeSent"
    ]
    assert any(u.endswith(".jpg") for u in requested), requested
    # (chrome:// are the browser's own new-tab resources, before the page opens)
    assert not [u for u in requested if not u.startswith(("file://", "data:", "chrome://", "about:"))], requested
    errors = [m for m in chrome.get_log("browser") if m["level"] == "SEVERE"]
    assert not errors, errors


def test_label_free_page_in_headless_chromium(chrome, unlabelled: Path) -> None:
    """Without labels the table's text-name columns hold names, the search finds a latent by
    one, and its panel is titled with it."""
    from selenium.webdriver.common.by import By

    data = embedded_data(unlabelled / "index.html")
    entry = next(e for e in data["latents"] if any(e["text"].values()))
    text = next(t for t in entry["text"].values() if t)
    chrome.get((unlabelled / "index.html").resolve().as_uri())
    cells = lambda: chrome.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('#latents tbody tr')].map(tr => tr.innerText)")
    assert _wait(lambda: any(text in c for c in cells()))
    chrome.find_element(By.ID, "search").send_keys(text)
    assert _wait(lambda: sorted(int(c.split()[0].lstrip("#")) for c in cells()) == search_matches(data, text))
    chrome.find_element(By.CSS_SELECTOR, f'#latents tbody tr[data-latent="{entry["l"]}"] td:nth-child(2)').click()
    panel = chrome.find_element(By.ID, "panel")
    assert _wait(lambda: panel.is_displayed() and "(text: " in panel.find_element(By.TAG_NAME, "h2").text)
    assert text in panel.find_element(By.TAG_NAME, "h2").text


def test_localisation_in_headless_chromium(chrome, loc_browser: Path) -> None:
    from selenium.webdriver.common.by import By

    chrome.get((loc_browser / "index.html").resolve().as_uri())
    chrome.find_element(By.ID, "nav-localisation").click()
    assert _wait(lambda: chrome.execute_script("return location.hash") == "#localisation")
    rows = chrome.find_elements(By.CSS_SELECTOR, "#localisation-table tr[data-method]")
    assert [r.get_attribute("data-method") for r in rows] == METHODS
    assert rows[0].find_elements(By.TAG_NAME, "td")[1].text == f"{METRICS['ap_vit']:.3f}"
    queries = chrome.find_elements(By.CSS_SELECTOR, "#localisation-queries .query")
    assert [q.find_element(By.TAG_NAME, "b").text for q in queries] == [f"\u201c{t}\u201d" for t in TEXTS]
    imgs = chrome.find_elements(By.CSS_SELECTOR, "#localisation-queries img")
    assert len(imgs) == len(TEXTS) * (1 + len(METHODS))
    assert all(_wait(lambda i=i: chrome.execute_script("return arguments[0].naturalWidth", i)) for i in imgs)
    errors = [m for m in chrome.get_log("browser") if m["level"] == "SEVERE"]
    assert not errors, errors


def test_thumbnails_of_16_bit_and_float_images_keep_their_grey(tmp_path: Path) -> None:
    """Issue 22.5: the thumbnails clipped 16-bit greyscale to white (and 0..1 floats to black)."""
    from sparc.report.browser import make_thumb

    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32)).save(tmp_path / "f.tif")
    for name in ("g16.png", "f.tif"):
        assert make_thumb(tmp_path / name, tmp_path / f"{name}.jpg", 8)
        with Image.open(tmp_path / f"{name}.jpg") as im:
            assert np.asarray(im.convert("L")).mean() == pytest.approx(128, abs=2)


def test_random_weights_are_announced_first(run: Run, browser: Path, tmp_path: Path) -> None:
    """A run whose metrics.json names random-weight streams gets a title saying so and a banner
    opening the header; the default page has neither."""
    page = (browser / "index.html").read_text()
    assert 'id="random-weights"' not in page and "RANDOM WEIGHTS" not in page
    reports = tmp_path / "reports"
    shutil.copytree(run.reports, reports)
    metrics = json.loads((reports / "metrics.json").read_text())
    (reports / "metrics.json").write_text(json.dumps({**metrics, "random_weights": ["a", "b"]}))
    out = run.build(tmp_path / "browser", reports_dir=reports)
    page = (out / "index.html").read_text()
    assert "<title>RANDOM WEIGHTS, not a result: SPARC concept browser" in page
    assert page.index('id="random-weights"') == page.index("<header>") + len("<header>\n") + len('<p ')
    assert "Random weights (a, b)" in page and embedded_data(out / "index.html")["random_weights"] == ["a", "b"]
