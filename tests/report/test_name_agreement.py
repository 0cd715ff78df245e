"""The validation of names from captions against names from labels (sparc.report.name_agreement),
on concepts tables written by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from sparc.cli import main
from sparc.report.name_agreement import (
    BEGIN,
    END,
    agreement,
    compare,
    name_agreement,
    validate_names,
    words,
)


def test_words_are_content_words_without_plural_s() -> None:
    assert words("Country-Flag") == {"country", "flag"}
    assert words("flags of the world") == {"flag", "world"}
    assert words("glass bus") == {"glass", "bus"}  # -ss kept, short words kept
    assert words("sky & weather") == {"sky", "weather"}
    assert words("the of") == set()


def test_agreement_rules() -> None:
    labels = ["cat-face", "country-flag", "food-fruit", "the"]
    terms = [["cat", "grinning"], ["flag germany", "country"], ["vegetable"], ["the"]]
    got = agreement(labels, terms)
    assert got["any"].tolist() == [True, True, False, False]
    assert got["all"].tolist() == [False, True, False, False]  # a label without content words never agrees
    with pytest.raises(ValueError, match="term lists"):
        agreement(labels, terms[:2])


def test_shuffled_baseline_is_near_chance() -> None:
    """Twenty latents each named after a distinct word, whose terms hold exactly it: all agree;
    shuffled, a latent keeps its own terms only by chance (1/20 on average)."""
    labels = [f"word{i}" for i in range(20)]
    terms = [[f"word{i}", "common"] for i in range(20)]
    a = compare("joint", "s", "text", labels, terms, permutations=200, seed=0)
    assert a.n_named == 20 and a.fraction == {"any": 1.0, "all": 1.0}
    assert a.shuffled_mean["any"] == pytest.approx(0.05, abs=0.02)
    assert a.shuffled_std["any"] > 0
    assert compare("joint", "s", "text", labels, terms, 200, 0) == a  # seeded
    empty = compare("joint", "s", "text", [], [], 5, 0)
    assert empty.n_named == 0 and np.isnan(empty.fraction["any"]) and np.isnan(empty.shuffled_mean["all"])


PARAMS = json.dumps({"data": {"dataset": "emoji"}, "streams": {
    "img": {"model": "efficientnet:lite0", "input": "image"}, "txt": {"model": "minilm:all-MiniLM-L6-v2", "input": "caption"},
}})


def write_concepts(root: Path, text: bool = True) -> Path:
    """A run's params.yaml and reports/concepts with two streams, one a caption stream with
    zero-shot names."""
    concepts = root / "reports" / "concepts"
    concepts.mkdir(parents=True)
    (root / "params.yaml").write_text(PARAMS)
    rows = [
        ("cat-face", "cat|cat face|grinning", "cat"),
        ("country-flag", "flag|flag germany|germany", "flag"),
        ("food-fruit", "red apple|apple|red", "apple"),
        ("", "sky|blue", "sky"),
    ]
    for name in ("concepts.csv", "concepts_per_stream.csv"):
        with (concepts / name).open("w", newline="") as fh:
            w = csv.writer(fh)
            head = ["latent", "img_name", "txt_name", "agreed_name"]
            if text:
                head += ["img_text_words", "txt_text_words", "txt_zero_shot_name"]
            w.writerow(head)
            for i, (label, terms, zero) in enumerate(rows):
                w.writerow([i, label, label, label] + ([terms, terms, zero] if text else []))
    (concepts / "summary.json").write_text(json.dumps({
        "split": "test", "n_samples": 4, "top_n": 50, "purity_threshold": 0.3, "L": 4,
        "codes": {"model_sha256": "ab" * 32}, "text": {"words": 3, "vocab": 10}, "zero_shot": {"vocab": 5},
    }))
    return concepts


def test_name_agreement_reads_the_concepts_tables(tmp_path: Path) -> None:
    rows, summary = name_agreement(write_concepts(tmp_path), permutations=10)
    assert summary["L"] == 4
    assert [(a.kind, a.stream, a.names) for a in rows] == [
        (k, s, n) for k in ("joint", "per_stream") for s, ns in (("img", ["text"]), ("txt", ["text", "zero-shot"])) for n in ns
    ]
    text = rows[0]
    assert text.n_named == 3  # the unnamed latent 3 is left out
    assert text.fraction["any"] == pytest.approx(2 / 3) and text.fraction["all"] == pytest.approx(1 / 3)
    zero = rows[2]
    assert zero.names == "zero-shot" and zero.fraction["any"] == pytest.approx(2 / 3)


def test_name_agreement_needs_text_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no text names"):
        name_agreement(write_concepts(tmp_path, text=False))


def test_validate_names_rewrites_the_doc_block(tmp_path: Path) -> None:
    write_concepts(tmp_path)
    doc = tmp_path / "page.md"
    doc.write_text(f"intro\n{BEGIN}\nold\n{END}\nafter\n")
    block = validate_names(tmp_path, doc, permutations=5)
    text = doc.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith(f"{END}\nafter\n")
    assert block in text and "Dataset `emoji`" in block and "`abababababab`" in block
    assert "| joint | img | text | 3 | **66.7%** |" in block
    with pytest.raises(ValueError, match="markers"):
        validate_names(tmp_path, tmp_path / "params.yaml")


def test_cli_part_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    write_concepts(run)
    here = tmp_path / "repo"
    (here / "docs").mkdir(parents=True)
    (here / "docs" / "unlabeled.md").write_text(f"{BEGIN}\n{END}\n")
    (here / "params.yaml").write_text(PARAMS)
    monkeypatch.chdir(here)
    assert main(["validate-text", "--part", "names", "--data-root", str(run), "--permutations", "3"]) == 0
    assert "3 permutations" in capsys.readouterr().out
    assert "| per-stream | txt | zero-shot |" in (here / "docs" / "unlabeled.md").read_text()
