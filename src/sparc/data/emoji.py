"""The `emoji` dataset: Noto Color Emoji glyphs rendered with Pillow, captioned by their CLDR names.

Sources (Debian packages, no network needed):

* ``fonts-noto-color-emoji``: ``/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf``, a bitmap
  (CBDT) font whose strikes load only at pixel size 109 (one glyph = a 136 x 128 cell);
* ``unicode-data``: ``/usr/share/unicode/emoji/emoji-test.txt``, the Unicode list of emoji with
  their group, subgroup and CLDR short name.

Only ``fully-qualified`` entries are used (the ``component`` entries - skin-tone swatches and hair
styles - and the minimally/un-qualified spellings are left out). Without ``skin_tones`` every
sequence containing a skin-tone modifier (U+1F3FB..U+1F3FF) is left out too: 1870 emoji instead of
3655 (Unicode 15.0).

Each sample:

* id: the code points in lower-case hex joined with ``-`` (``1f600``, ``1f469-200d-1f4bb``,
  ``263a-fe0f``), stable across runs and safe as a file name;
* image: ``<work_dir>/<id>.png``, an RGB square of ``size`` pixels (see :func:`render_emoji`);
* caption: the CLDR name (``grinning face``, ``flag: Germany``);
* labels: ``(subgroup:<subgroup>,)``; the hierarchy is root > ``group:<slug>`` (9) >
  ``subgroup:<subgroup>`` (99), display names as written in emoji-test.txt.

Emoji the font cannot draw as one glyph (blank image, or a sequence laid out as several glyphs)
are skipped and listed in ``skipped``; with the Debian 12 packages none is.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import PIL
from PIL import Image, ImageDraw, ImageFont, features

from sparc.data.base import DatasetBuild, Sample, require_package_path
from sparc.data.hierarchy import Hierarchy
from sparc.params import EmojiOptions, check_emoji_options

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
FONT_PIXEL_SIZE = 109  # the only size at which the CBDT strikes of Noto Color Emoji load
MARGIN = 0.05  # blank border on each side, as a fraction of the square's side
SKIN_TONES = range(0x1F3FB, 0x1F3FF + 1)


@dataclass(frozen=True)
class EmojiEntry:
    """One fully-qualified line of emoji-test.txt."""

    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str

    @property
    def id(self) -> str:
        return "-".join(f"{cp:x}" for cp in self.codepoints)

    @property
    def text(self) -> str:
        return "".join(map(chr, self.codepoints))

    @property
    def has_skin_tone(self) -> bool:
        return any(cp in SKIN_TONES for cp in self.codepoints)


def slug(text: str) -> str:
    """``"Smileys & Emotion"`` -> ``"smileys-emotion"``: lower case, non-alphanumeric runs -> '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def parse_emoji_test(path: Path = EMOJI_TEST_PATH) -> list[EmojiEntry]:
    """Fully-qualified emoji of ``emoji-test.txt`` in file order.

    Line format: ``1F600 ; fully-qualified # 😀 E1.0 grinning face``; ``# group: X`` and
    ``# subgroup: y`` comment lines set the group and subgroup of the lines after them.
    """
    path = require_package_path(Path(path), "emoji", "unicode-data")
    entries: list[EmojiEntry] = []
    group = subgroup = ""
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
            continue
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"\s*([0-9A-Fa-f ]+?)\s*;\s*([a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+)", line)
        if match is None:
            raise ValueError(f"{path}:{lineno}: unrecognised emoji-test line {line!r}")
        if match.group(2) != "fully-qualified":
            continue
        if not group or not subgroup:
            raise ValueError(f"{path}:{lineno}: emoji before any '# group:'/'# subgroup:' line")
        codepoints = tuple(int(cp, 16) for cp in match.group(1).split())
        entries.append(EmojiEntry(codepoints, match.group(3).strip(), group, subgroup))
    if not entries:
        raise ValueError(f"{path}: no fully-qualified emoji found")
    return entries


def load_font(path: Path = FONT_PATH) -> ImageFont.FreeTypeFont:
    """Noto Color Emoji at its bitmap size, with the Raqm layout engine (needed to shape
    ZWJ sequences, flags and keycaps into single glyphs)."""
    path = require_package_path(Path(path), "emoji", "fonts-noto-color-emoji")
    if not features.check("raqm"):
        raise RuntimeError(
            "emoji dataset: this Pillow has no libraqm, so emoji sequences cannot be shaped; "
            "install a Pillow wheel from PyPI (it bundles raqm) or the Debian package 'libraqm0'"
        )
    return ImageFont.truetype(str(path), FONT_PIXEL_SIZE, layout_engine=ImageFont.Layout.RAQM)


def render_emoji(text: str, font: ImageFont.FreeTypeFont, size: int) -> Image.Image | None:
    """Render ``text`` to an RGB ``size`` x ``size`` image, or ``None`` when nothing is drawn.

    The glyph is drawn in colour on a transparent canvas, cropped to its non-transparent pixels,
    centred in a square of side ``max(w, h) / (1 - 2 * MARGIN)``, composited onto white and
    resized with a Lanczos filter. Pure function of (text, font file, size): same pixels each run.
    """
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("RGBA", (right + 2, bottom + 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = int(round(max(glyph.size) / (1.0 - 2.0 * MARGIN)))
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    offset = ((side - glyph.width) // 2, (side - glyph.height) // 2)
    square.alpha_composite(glyph, offset)
    return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def build_hierarchy(entries: list[EmojiEntry]) -> Hierarchy:
    """root > ``group:<slug>`` > ``subgroup:<name>``, in file order.

    Raises ValueError if one subgroup name appears under two groups (ids would clash).
    """
    parents: dict[str, str | None] = {}
    names: dict[str, str] = {}
    for e in entries:
        gid, sid = f"group:{slug(e.group)}", f"subgroup:{e.subgroup}"
        parents.setdefault(gid, None)
        names[gid] = e.group
        if parents.setdefault(sid, gid) != gid:
            raise ValueError(f"emoji-test: subgroup {e.subgroup!r} appears under two groups")
        names[sid] = e.subgroup
    return Hierarchy.from_parents(parents, names)


def build_emoji(
    options: EmojiOptions,
    work_dir: Path,
    *,
    font_path: Path = FONT_PATH,
    emoji_test_path: Path = EMOJI_TEST_PATH,
    limit: int = 0,
) -> DatasetBuild:
    """Render the emoji set into ``work_dir`` and return it in emoji-test.txt order.

    ``limit`` > 0 renders only the first ``limit`` selected emoji (for tests); the hierarchy then
    holds only the groups and subgroups those emoji use. Raises FileNotFoundError naming the Debian
    package when the font or emoji-test.txt is missing, ValueError for a non-positive ``size``.
    """
    check_emoji_options(options)
    entries = parse_emoji_test(emoji_test_path)
    font = load_font(font_path)
    selected = [e for e in entries if options.skin_tones or not e.has_skin_tone]
    n_selected = len(selected)
    if limit > 0:
        selected = selected[:limit]
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    single_width = font.getlength("\U0001f600")
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    for e in selected:
        if font.getlength(e.text) > 1.5 * single_width:
            skipped.append((e.id, "the font has no single glyph for this sequence"))
            continue
        image = render_emoji(e.text, font, options.size)
        if image is None:
            skipped.append((e.id, "the font draws nothing for this emoji (blank image)"))
            continue
        path = work_dir / f"{e.id}.png"
        image.save(path, format="PNG")
        samples.append(Sample(e.id, path, e.name, (f"subgroup:{e.subgroup}",)))
    kept = {s.id for s in samples}
    hierarchy = build_hierarchy([e for e in selected if e.id in kept])
    font_bytes = Path(font_path).read_bytes()
    header = Path(emoji_test_path).read_text(encoding="utf-8")[:2000]
    version = re.search(r"^# Version:\s*(\S+)", header, re.M)
    info = {
        "font": str(font_path),
        "font_sha256": hashlib.sha256(font_bytes).hexdigest(),
        "emoji_test": str(emoji_test_path),
        "emoji_version": version.group(1) if version else "unknown",
        "n_fully_qualified": len(entries),
        "n_selected": n_selected,
        "n_rendered": len(samples),
        "n_skipped": len(skipped),
        "pillow": PIL.__version__,
        "raqm": features.version("raqm"),
        "freetype": features.version("freetype2"),
    }
    return DatasetBuild(samples=samples, hierarchy=hierarchy, skipped=skipped, info=info)
