"""The emoji dataset: parsing emoji-test.txt, rendering with the real Noto Color Emoji font."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from sparc.data.emoji import (
    EMOJI_TEST_PATH,
    FONT_PATH,
    build_emoji,
    build_hierarchy,
    load_font,
    parse_emoji_test,
    render_emoji,
    slug,
)
from sparc.params import EmojiOptions

needs_debian = pytest.mark.skipif(
    not (FONT_PATH.is_file() and EMOJI_TEST_PATH.is_file()),
    reason="Debian packages fonts-noto-color-emoji and unicode-data are not installed",
)

FAKE_TEST_FILE = """\
# emoji-test.txt
# Version: 99.0

# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                      ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                  ; fully-qualified     # ☺️ E0.6 smiling face
263A                                       ; unqualified         # ☺ E0.6 smiling face

# group: People & Body

# subgroup: hand-fingers-open
1F44B                                      ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone

# subgroup: person-role
1F469 200D 1F4BB                           ; fully-qualified     # 👩‍💻 E4.0 woman technologist
1F600 200D 1F600                           ; fully-qualified     # 😀‍😀 E99.0 made-up sequence
E000                                       ; fully-qualified     # \ue000 E99.0 private use

# group: Component

# subgroup: skin-tone
1F3FB                                      ; component           # 🏻 E1.0 light skin tone
"""


@pytest.fixture()
def fake_test_file(tmp_path: Path) -> Path:
    path = tmp_path / "emoji-test.txt"
    path.write_text(FAKE_TEST_FILE, encoding="utf-8")
    return path


def test_parse_fake_file(fake_test_file: Path) -> None:
    entries = parse_emoji_test(fake_test_file)
    assert [e.id for e in entries] == ["1f600", "263a-fe0f", "1f44b", "1f44b-1f3fb", "1f469-200d-1f4bb", "1f600-200d-1f600", "e000"]
    assert entries[1].name == "smiling face" and entries[1].text == "\u263a\ufe0f"
    assert entries[4].group == "People & Body" and entries[4].subgroup == "person-role"
    assert [e.has_skin_tone for e in entries] == [False, False, False, True, False, False, False]


def test_slug() -> None:
    assert slug("Smileys & Emotion") == "smileys-emotion"
    assert slug("Travel & Places") == "travel-places"
    assert slug("Flags") == "flags"


def test_parse_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "emoji-test.txt"
    path.write_text("# group: G\n# subgroup: s\nthis is not an emoji line\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"emoji-test.txt:3: unrecognised"):
        parse_emoji_test(path)


def test_subgroup_under_two_groups_rejected(tmp_path: Path) -> None:
    path = tmp_path / "emoji-test.txt"
    path.write_text(
        "# group: A\n# subgroup: s\n1F600 ; fully-qualified # 😀 E1.0 a\n"
        "# group: B\n# subgroup: s\n1F601 ; fully-qualified # 😁 E1.0 b\n",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match="subgroup 's' appears under two groups"):
        build_hierarchy(parse_emoji_test(path))


def test_missing_files_name_the_debian_package(tmp_path: Path, fake_test_file: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        build_emoji(EmojiOptions(), tmp_path / "out", font_path=tmp_path / "nope.ttf", emoji_test_path=fake_test_file)
    with pytest.raises(FileNotFoundError, match="unicode-data"):
        build_emoji(EmojiOptions(), tmp_path / "out", emoji_test_path=tmp_path / "nope.txt")


def test_bad_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.emoji.size"):
        build_emoji(EmojiOptions(size=0), tmp_path)


@needs_debian
def test_fake_file_with_real_font(tmp_path: Path, fake_test_file: Path) -> None:
    """Skin tones are dropped by default; unrenderable emoji are skipped and reported."""
    build = build_emoji(EmojiOptions(size=40), tmp_path, emoji_test_path=fake_test_file)
    assert [s.id for s in build.samples] == ["1f600", "263a-fe0f", "1f44b", "1f469-200d-1f4bb"]
    assert dict(build.skipped).keys() == {"1f600-200d-1f600", "e000"}
    assert "single glyph" in dict(build.skipped)["1f600-200d-1f600"]
    assert "blank" in dict(build.skipped)["e000"]
    assert build.samples[3].caption == "woman technologist"
    assert build.samples[3].labels == ("subgroup:person-role",)
    assert build.hierarchy.parents["subgroup:person-role"] == "group:people-body"
    assert build.hierarchy.names["group:people-body"] == "People & Body"
    assert build.info["emoji_version"] == "99.0"
    with_tones = build_emoji(EmojiOptions(size=40, skin_tones=True), tmp_path / "t", emoji_test_path=fake_test_file)
    assert "1f44b-1f3fb" in [s.id for s in with_tones.samples]


@needs_debian
def test_real_counts() -> None:
    entries = parse_emoji_test()
    assert len(entries) == 3655
    plain = [e for e in entries if not e.has_skin_tone]
    assert len(plain) == 1870
    hierarchy = build_hierarchy(plain)
    assert len(hierarchy.labels_at_depth(1)) == 9
    assert len(hierarchy.labels_at_depth(2)) == 99
    assert "group:component" not in hierarchy.labels


@pytest.fixture(scope="module")
def full_build(tmp_path_factory):
    """The whole default emoji set rendered once (about 3 s)."""
    if not (FONT_PATH.is_file() and EMOJI_TEST_PATH.is_file()):
        pytest.skip("Debian packages fonts-noto-color-emoji and unicode-data are not installed")
    out = tmp_path_factory.mktemp("emoji")
    return build_emoji(EmojiOptions(size=64), out)


def test_full_build(full_build) -> None:
    samples = full_build.samples
    assert len(samples) == 1870 and full_build.skipped == []
    assert full_build.info["n_selected"] == 1870
    assert len({s.id for s in samples}) == 1870
    assert all(re.fullmatch(r"[0-9a-f]+(-[0-9a-f]+)*", s.id) for s in samples)
    assert samples[0].id == "1f600" and samples[0].caption == "grinning face"
    h = full_build.hierarchy
    assert len(h.labels_at_depth(1)) == 9 and len(h.labels_at_depth(2)) == 99 and h.max_depth == 2
    assert h.names["group:smileys-emotion"] == "Smileys & Emotion"
    assert {lab for s in samples for lab in s.labels} == set(h.labels_at_depth(2))
    by_id = {s.id: s for s in samples}
    assert by_id["1f1e9-1f1ea"].caption == "flag: Germany"
    assert by_id["1f1e9-1f1ea"].labels == ("subgroup:country-flag",)
    assert h.parents["subgroup:country-flag"] == "group:flags"
    for sid in ("1f600", "1f469-200d-1f4bb", "23-fe0f-20e3"):
        with Image.open(by_id[sid].image) as img:
            assert img.size == (64, 64) and img.mode == "RGB"
            assert img.getpixel((0, 0)) == (255, 255, 255)  # white margin
            assert len(img.getcolors(64 * 64)) > 20  # a colour glyph, not blank


def test_rendering_is_deterministic(full_build, tmp_path: Path) -> None:
    again = build_emoji(EmojiOptions(size=64), tmp_path, limit=12)
    assert len(again.samples) == 12
    first = {s.id: s for s in full_build.samples}
    for s in again.samples:
        assert s.image.read_bytes() == first[s.id].image.read_bytes()
    assert again.info["n_selected"] == 1870


@needs_debian
def test_render_emoji_geometry() -> None:
    font = load_font()
    img = render_emoji("\U0001f600", font, 100)
    assert img is not None and img.size == (100, 100)
    # the glyph is cropped tight and fills 90% of the side (5% margin each side)
    box = img.convert("L").point(lambda v: 255 if v < 245 else 0).getbbox()
    assert box is not None
    span = max(box[2] - box[0], box[3] - box[1])
    assert 88 <= span <= 93
    assert min(box[0], box[1]) >= 3 and max(box[2], box[3]) <= 97
    assert render_emoji("\ue000", font, 100) is None
