"""The clipart dataset on a small fake Debian-like tree, and on the real install when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sparc.data.clipart import (
    PNG_ROOT,
    REASONS,
    SVG_ROOT,
    build_clipart,
    clean_title,
    image_size,
    is_filename_like,
    svg_title,
)
from sparc.params import ClipartOptions

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="10" height="10">
  <metadata><rdf:RDF><cc:Work rdf:about="">{title}
    <dc:publisher><cc:Agent rdf:about="http://www.openclipart.org"><dc:title>Some Publisher</dc:title></cc:Agent></dc:publisher>
  </cc:Work></rdf:RDF></metadata>
  <rect width="10" height="10"/>
</svg>
"""

OPTIONS = ClipartOptions(max_megapixels=0.01, min_title_chars=3, max_title_repeats=2)


class FakeTree:
    """png/ and svg/ trees like Debian's openclipart-png and openclipart-svg."""

    def __init__(self, root: Path) -> None:
        self.png = root / "png"
        self.svg = root / "svg"
        self.png.mkdir(parents=True)
        self.svg.mkdir(parents=True)
        self.n = 0

    def add(self, rel: str, title: str | None, size: int = 20, svg: str | None = None) -> Path:
        """A PNG with unique pixels at png/<rel>.png and, unless title is None, its SVG."""
        self.n += 1
        path = self.png / f"{rel}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGBA", (size, size), (self.n * 7 % 256, self.n * 13 % 256, 50, 255)).save(path)
        if title is not None or svg is not None:
            text = svg if svg is not None else SVG.format(title=f"<dc:title>{title}</dc:title>" if title else "")
            (self.svg / f"{rel}.svg").parent.mkdir(parents=True, exist_ok=True)
            (self.svg / f"{rel}.svg").write_text(text, encoding="utf-8")
        return path


@pytest.fixture()
def tree(tmp_path: Path) -> FakeTree:
    t = FakeTree(tmp_path)
    parrot = t.add("animals/birds/parrot", "Red \n  parrot")
    t.add("animals/cat", "Sleeping cat")
    (t.png / "people/pets").mkdir(parents=True)
    os.symlink("../../animals/cat.png", t.png / "people/pets/cat.png")
    (t.png / "misc").mkdir()
    (t.png / "misc/parrot_copy.png").write_bytes(parrot.read_bytes())
    (t.svg / "misc").mkdir()
    (t.svg / "misc/parrot_copy.svg").write_text(SVG.format(title="<dc:title>Parrot copy</dc:title>"))
    t.add("animals/big", "A big picture", size=200)
    (t.png / "animals/broken.png").write_bytes(b"this is not an image")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(t.png / "animals/truncated.png")
    data = (t.png / "animals/truncated.png").read_bytes()
    (t.png / "animals/truncated.png").write_bytes(data[: len(data) // 2])
    for name in ("broken", "truncated"):
        (t.svg / f"animals/{name}.svg").write_text(SVG.format(title=f"<dc:title>A {name} one</dc:title>"))
    t.add("animals/nosvg", None)
    t.add("animals/badxml", None, svg="<svg><metadata><unclosed")
    t.add("animals/notitle", "")
    t.add("animals/short", "TV")
    t.add("animals/bee1", "bee1")
    t.add("shapes/jigsaw", "Clipart by Nicu Buculei - jigsaw_red_10")
    t.add("shapes/antenna", "Clipart by Nicu Buculei - antenna")
    for i in range(3):
        t.add(f"shapes/icons/i{i}", "Lemon theme")
    t.add("root", "An image without a category")
    t.add("plants/flowers/wild/rose", "A wild rose")
    (t.png / "plants/empty").mkdir()
    return t


def test_fake_tree(tree: FakeTree, tmp_path: Path) -> None:
    build = build_clipart(OPTIONS, tmp_path / "work", png_root=tree.png, svg_root=tree.svg)
    assert [s.id for s in build.samples] == [
        "animals.birds.parrot",
        "animals.cat",
        "plants.flowers.wild.rose",
        "shapes.antenna",
    ]
    by_id = {s.id: s for s in build.samples}
    assert by_id["animals.birds.parrot"].caption == "Red parrot"
    assert by_id["animals.birds.parrot"].labels == ("animals/birds", "misc")  # byte-identical copy
    assert by_id["animals.cat"].labels == ("animals", "people/pets")  # symbolic link
    assert by_id["shapes.antenna"].caption == "antenna"  # credit removed
    assert by_id["plants.flowers.wild.rose"].labels == ("plants/flowers/wild",)
    assert by_id["animals.cat"].image == (tree.png / "animals/cat.png").resolve()
    assert all(s.image.is_absolute() and s.image.is_file() for s in build.samples)

    h = build.hierarchy
    assert h.labels == [
        "animals", "animals/birds", "misc", "people", "people/pets",
        "plants", "plants/flowers", "plants/flowers/wild", "shapes",
    ]
    assert h.parents["plants/flowers/wild"] == "plants/flowers" and h.depth("plants/flowers/wild") == 3
    assert h.names["people/pets"] == "pets"

    assert build.info["filtered"] == {
        "duplicate": 2,
        "no_category": 1,
        "too_large": 1,
        "unreadable_image": 2,
        "no_svg": 1,
        "unreadable_svg": 1,
        "no_title": 1,
        "short_title": 1,
        "filename_title": 2,
        "collection_title": 3,
    }
    assert build.info["n_png_entries"] == 19 and build.info["n_png_links"] == 1
    assert build.info["n_kept"] + sum(build.info["filtered"].values()) == 19
    reasons = dict(build.skipped)
    assert len(reasons) == len(build.skipped) == 15
    assert reasons["people.pets.cat"].startswith("duplicate: symbolic link to animals.cat")
    assert reasons["misc.parrot_copy"].startswith("duplicate: same bytes as animals.birds.parrot")
    assert reasons["animals.big"].startswith("too_large: 200x200")
    assert reasons["animals.broken"].startswith("unreadable_image")
    assert reasons["animals.truncated"] == "unreadable_image: Pillow cannot decode the image"
    assert reasons["animals.notitle"].startswith("no_title")  # the publisher's title is not the work's
    assert reasons["shapes.jigsaw"].startswith("filename_title")
    assert reasons["shapes.icons.i1"] == "collection_title: title 'Lemon theme' is on 3 images"
    assert reasons["root"].startswith("no_category")
    assert not (tmp_path / "work").exists()  # images are read in place


def test_options_change_the_filters(tree: FakeTree, tmp_path: Path) -> None:
    relaxed = ClipartOptions(max_megapixels=1.0, min_title_chars=2, max_title_repeats=0)
    build = build_clipart(relaxed, tmp_path, png_root=tree.png, svg_root=tree.svg)
    ids = {s.id for s in build.samples}
    assert {"animals.big", "animals.short", "shapes.icons.i0", "shapes.icons.i2"} <= ids
    assert build.info["filtered"]["collection_title"] == 0
    assert build.info["filtered"]["too_large"] == 0


def test_order_is_deterministic(tree: FakeTree, tmp_path: Path) -> None:
    a = build_clipart(OPTIONS, tmp_path, png_root=tree.png, svg_root=tree.svg)
    b = build_clipart(OPTIONS, tmp_path, png_root=tree.png, svg_root=tree.svg)
    assert a.samples == b.samples and a.skipped == b.skipped


def test_missing_roots_name_the_package(tmp_path: Path, tree: FakeTree) -> None:
    with pytest.raises(FileNotFoundError, match="openclipart-png"):
        build_clipart(OPTIONS, tmp_path, png_root=tmp_path / "nope", svg_root=tree.svg)
    with pytest.raises(FileNotFoundError, match="openclipart-svg"):
        build_clipart(OPTIONS, tmp_path, png_root=tree.png, svg_root=tmp_path / "nope")


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (ClipartOptions(max_megapixels=0.0), "max_megapixels"),
        (ClipartOptions(min_title_chars=-1), "min_title_chars"),
        (ClipartOptions(max_title_repeats=-1), "max_title_repeats"),
    ],
)
def test_bad_options(options: ClipartOptions, name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"data.clipart.{name}"):
        build_clipart(options, tmp_path, png_root=tmp_path, svg_root=tmp_path)


def test_title_helpers(tmp_path: Path) -> None:
    assert clean_title("Clipart by Nicu Buculei - bee") == "bee"
    assert clean_title("Farfalla - Butterfly") == "Farfalla - Butterfly"
    for name in ("bee1", "rss_button", "books-aj.svg", "Tigre01", "large_braces.svg"):
        assert is_filename_like(name), name
    for name in ("Red parrot", "T-shirt", "Stara Ksiega - Old Book", "antenna", "Quake 3 Icon"):
        assert not is_filename_like(name), name
    path = tmp_path / "x.svg"
    path.write_text(SVG.format(title="<dc:title>  Hello\n\tworld </dc:title>"))
    assert svg_title(path) == "Hello world"
    path.write_text(SVG.format(title=""))
    assert svg_title(path) == ""
    path.write_text("<svg>")
    assert svg_title(path) is None


def test_image_size_reads_the_header_only(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.new("L", (30, 7)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:40])  # header intact, pixel data gone
    assert image_size(path) == (30, 7)


needs_openclipart = pytest.mark.skipif(
    not (PNG_ROOT.is_dir() and SVG_ROOT.is_dir()),
    reason="Debian packages openclipart-png and openclipart-svg are not installed",
)


@needs_openclipart
def test_real_install_one_category(tmp_path: Path) -> None:
    """The real `animals` tree (its subdirectories become the categories), with the defaults."""
    build = build_clipart(ClipartOptions(), tmp_path, png_root=PNG_ROOT / "animals", svg_root=SVG_ROOT / "animals")
    info = build.info
    assert info["n_kept"] == len(build.samples) > 50
    assert info["n_kept"] + sum(info["filtered"].values()) == info["n_png_entries"]
    assert info["filtered"]["no_category"] > 0  # files directly in animals/
    known = set(build.hierarchy.labels)
    for s in build.samples:
        assert len(s.caption) >= 3 and not is_filename_like(s.caption)
        assert s.labels and set(s.labels) <= known
    assert {"birds", "mammals"} <= known
    big = PNG_ROOT / "signs_and_symbols/stop_sign_miguel_s_nchez_.png"
    if big.is_file():
        assert image_size(big) == (20990, 29700)
    pills = SVG_ROOT / "science/medicine/barattolo_di_pillole_arc_01.svg"
    if pills.is_file():
        assert svg_title(pills) == "Barattolo di pillole"


@needs_openclipart
@pytest.mark.slow
def test_real_install_full(tmp_path: Path) -> None:
    """The whole package (about 12 s: every PNG is decoded once)."""
    build = build_clipart(ClipartOptions(), tmp_path)
    info = build.info
    assert set(info["filtered"]) == set(REASONS)
    assert info["n_kept"] + sum(info["filtered"].values()) == info["n_png_entries"]
    assert info["n_png_entries"] == info["n_png_files"] + info["n_png_links"]
    assert info["filtered"]["duplicate"] >= info["n_png_links"]
    assert info["filtered"]["too_large"] >= 1
    assert info["n_kept"] > 2000
    assert len({s.id for s in build.samples}) == len(build.samples)
    captions = [s.caption for s in build.samples]
    assert max(captions.count(c) for c in set(captions)) <= ClipartOptions().max_title_repeats
    assert 2 <= build.hierarchy.max_depth <= 5
