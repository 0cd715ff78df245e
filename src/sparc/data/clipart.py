"""The `clipart` dataset: Open Clip Art Library 0.18 from Debian, captioned by the SVG titles.

Sources (Debian packages): ``openclipart-png`` (``/usr/share/openclipart/png``, the images) and
``openclipart-svg`` (``/usr/share/openclipart/svg``, the same tree as SVG; only its RDF metadata
is read). A PNG ``png/<categories>/<name>.png`` is matched to ``svg/<categories>/<name>.svg``.

Each sample:

* id: the PNG's path below the root without ``.png``, ``/`` replaced by ``.``
  (``science.medicine.barattolo_di_pillole_arc_01``): stable and safe as a file name;
* image: the absolute path of the PNG, read in place;
* caption: the ``dc:title`` of the ``cc:Work`` in the SVG's RDF metadata, whitespace collapsed,
  with a leading ``Clipart by <author> - `` credit removed;
* labels: the deepest category directory of the image (``science/medicine``); an image that the
  package also links into other categories (symbolic links) carries those categories too.
  The hierarchy is the category directory tree (1-5 levels in the package; only categories that
  hold a kept image or are ancestors of one), names = the directory name with ``_`` as spaces.

What is left out, and why (first matching reason; every item is listed in ``skipped`` and counted
per reason in ``info["filtered"]``). On Debian 12's package (8121 PNG entries: 6900 files and 1221
symbolic links) the defaults keep 2864 images in 133 categories (depth 4) and filter: duplicate
1221, too_large 16, no_title 58, short_title 10, filename_title 594, collection_title 3358, the
other reasons 0.

* ``duplicate``: a symbolic link to another PNG of the tree, or a file byte-identical to an
  earlier one: not a new image; its category is added to the labels of the image it repeats;
* ``no_category``: a PNG directly in the root (no category to label it with);
* ``too_large``: more than ``max_megapixels`` megapixels (read from the PNG header): the few such
  images are posters of up to 620 megapixels that would stall every image model's loader;
* ``unreadable_image``: Pillow cannot decode the file;
* ``no_svg`` / ``unreadable_svg``: no SVG for the PNG, or the SVG is not well-formed XML;
* ``no_title``: the SVG has no ``dc:title`` for the work, or it is empty;
* ``short_title``: fewer than ``min_title_chars`` characters (``"M"``, ``"TV"``);
* ``filename_title``: the title is only a file-name-like string (``bee1``, ``rss_button``,
  ``books-aj.svg``): one token with an underscore, a digit or a file extension, not a description;
* ``collection_title``: the same title on more than ``max_title_repeats`` of the images that pass
  the filters above
  (``gramastar`` on 1375 stars, ``Lemon SVG theme``, ``Part of the Flat Icon Collection``): the
  name of a collection, not of the image; identical captions would make the text stream
  degenerate. ``max_title_repeats: 0`` keeps them.
"""

from __future__ import annotations

import hashlib
import re
import struct
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from sparc.data.base import DatasetBuild, Sample, require_package_path
from sparc.data.hierarchy import Hierarchy
from sparc.params import ClipartOptions, check_clipart_options

PNG_ROOT = Path("/usr/share/openclipart/png")
SVG_ROOT = Path("/usr/share/openclipart/svg")

REASONS = (
    "duplicate",
    "no_category",
    "too_large",
    "unreadable_image",
    "no_svg",
    "unreadable_svg",
    "no_title",
    "short_title",
    "filename_title",
    "collection_title",
)

_CC = "{http://web.resource.org/cc/}"
_CC_NEW = "{http://creativecommons.org/ns#}"
_DC_TITLE = "{http://purl.org/dc/elements/1.1/}title"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILE_EXT = re.compile(r"\.(svg|svgz|png|jpe?g|gif|bmp|tiff?|ai|eps|pdf|wmf|xcf|odg)$", re.I)
_CREDIT = re.compile(r"^clip ?art by [^-]+ - ", re.I)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding (PNG IHDR read directly, so even
    images beyond Pillow's decompression-bomb limit are measured). Raises OSError if unreadable."""
    with path.open("rb") as fh:
        head = fh.read(24)
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            return img.size


def is_readable_image(path: Path) -> bool:
    """True when Pillow decodes the whole image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def svg_title(path: Path) -> str | None:
    """The ``dc:title`` of the ``cc:Work`` in an SVG's RDF metadata ('' when absent or empty).

    Returns ``None`` when the file is not well-formed XML. Titles of ``cc:Agent`` entries
    (publisher, creator) are ignored; whitespace runs are collapsed to one space.
    """
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError, ValueError):
        return None
    for work in tree.iter():
        if work.tag in (f"{_CC}Work", f"{_CC_NEW}Work"):
            title = work.find(_DC_TITLE)
            if title is not None:
                return " ".join("".join(title.itertext()).split())
    return ""


def clean_title(title: str) -> str:
    """Remove a leading ``Clipart by <author> - `` credit (the rest is the work's own title)."""
    return _CREDIT.sub("", title, count=1).strip()


def is_filename_like(title: str) -> bool:
    """True for a title that is only a file name: ends in a file extension, or is one token of
    letters, digits, ``_ - .`` that contains an underscore or a digit (``bee1``, ``rss_button``)."""
    if _FILE_EXT.search(title):
        return True
    return bool(re.fullmatch(r"[\w.\-]+", title)) and bool(re.search(r"[_\d]", title))


@dataclass
class _Item:
    """One real PNG file and the category directories it appears in."""

    rel: str  # path below the PNG root without suffix, '/'-separated
    path: Path
    categories: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.rel.replace("/", ".")


def _category(rel: Path) -> str:
    return rel.parent.as_posix() if rel.parent != Path(".") else ""


def build_clipart(
    options: ClipartOptions,
    work_dir: Path,
    *,
    png_root: Path = PNG_ROOT,
    svg_root: Path = SVG_ROOT,
) -> DatasetBuild:
    """Index the clip art under ``png_root``/``svg_root`` (read in place; ``work_dir`` is unused).

    Samples are in sorted path order. Raises FileNotFoundError naming the Debian package when a
    root is missing, ValueError for out-of-range options.
    """
    check_clipart_options(options)
    png_root = require_package_path(Path(png_root), "clipart", "openclipart-png", directory=True).resolve()
    svg_root = require_package_path(Path(svg_root), "clipart", "openclipart-svg", directory=True).resolve()

    skipped: list[tuple[str, str]] = []
    reasons: Counter[str] = Counter()

    def skip(item_id: str, reason: str, detail: str) -> None:
        reasons[reason] += 1
        skipped.append((item_id, f"{reason}: {detail}"))

    # 1. Real files and the links into them (a link adds its category to the file it points at).
    entries = sorted(png_root.rglob("*.png"))
    items: dict[Path, _Item] = {}
    links: list[tuple[Path, Path]] = []
    for path in entries:
        rel = path.relative_to(png_root)
        if path.is_symlink():
            links.append((rel, path.resolve()))
        elif path.is_file():
            items[path] = _Item(rel.with_suffix("").as_posix(), path, [_category(rel)])
    for rel, target in links:
        link_id = rel.with_suffix("").as_posix().replace("/", ".")
        if target in items:
            items[target].categories.append(_category(rel))
            skip(link_id, "duplicate", f"symbolic link to {items[target].id}")
        else:
            skip(link_id, "unreadable_image", f"symbolic link to {target}, which is not a PNG of the tree")

    # 2. Per-file checks, in sorted path order.
    max_pixels = options.max_megapixels * 1e6
    by_hash: dict[str, _Item] = {}
    candidates: list[tuple[_Item, str]] = []
    for item in sorted(items.values(), key=lambda it: it.rel):
        if not item.categories[0]:
            skip(item.id, "no_category", "the image is not inside a category directory")
            continue
        try:
            width, height = image_size(item.path)
        except (OSError, struct.error, SyntaxError, ValueError):
            skip(item.id, "unreadable_image", "cannot read the image header")
            continue
        if width * height > max_pixels:
            skip(item.id, "too_large", f"{width}x{height} = {width * height / 1e6:.1f} megapixels")
            continue
        if not is_readable_image(item.path):
            skip(item.id, "unreadable_image", "Pillow cannot decode the image")
            continue
        digest = hashlib.sha256(item.path.read_bytes()).hexdigest()
        if digest in by_hash:
            first = by_hash[digest]
            first.categories.extend(item.categories)
            skip(item.id, "duplicate", f"same bytes as {first.id}")
            continue
        by_hash[digest] = item
        svg = svg_root / f"{item.rel}.svg"
        if not svg.is_file():
            skip(item.id, "no_svg", f"no {svg.relative_to(svg_root)} for the title")
            continue
        raw = svg_title(svg)
        if raw is None:
            skip(item.id, "unreadable_svg", "the SVG is not well-formed XML")
            continue
        title = clean_title(raw)
        if not title:
            skip(item.id, "no_title", "the SVG metadata has no dc:title for the work")
            continue
        if len(title) < options.min_title_chars:
            skip(item.id, "short_title", f"title {title!r} is shorter than {options.min_title_chars} characters")
            continue
        if is_filename_like(title):
            skip(item.id, "filename_title", f"title {title!r} is only a file name")
            continue
        candidates.append((item, title))

    # 3. Collection names: one title on too many images.
    repeats = Counter(title for _, title in candidates)
    samples: list[Sample] = []
    for item, title in candidates:
        if options.max_title_repeats and repeats[title] > options.max_title_repeats:
            skip(item.id, "collection_title", f"title {title!r} is on {repeats[title]} images")
            continue
        labels = tuple(dict.fromkeys(item.categories))
        samples.append(Sample(item.id, item.path, title, labels))

    # 4. The category tree of the kept images.
    parents: dict[str, str | None] = {}
    for s in samples:
        for label in s.labels:
            parts = label.split("/")
            for depth in range(1, len(parts) + 1):
                node = "/".join(parts[:depth])
                parents.setdefault(node, "/".join(parts[: depth - 1]) or None)
    ordered = dict(sorted(parents.items()))
    names = {lab: lab.rsplit("/", 1)[-1].replace("_", " ") for lab in ordered}
    hierarchy = Hierarchy.from_parents(ordered, names)

    info = {
        "png_root": str(png_root),
        "svg_root": str(svg_root),
        "n_png_entries": len(entries),
        "n_png_files": len(items),
        "n_png_links": len(links),
        "n_kept": len(samples),
        "n_multi_label": sum(len(s.labels) > 1 for s in samples),
        "filtered": {reason: reasons[reason] for reason in REASONS},
    }
    return DatasetBuild(samples=samples, hierarchy=hierarchy, skipped=skipped, info=info)
