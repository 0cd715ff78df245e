"""Figures of one run: pure matplotlib, rendered with the Agg canvas (no display, no pyplot).

Every ``*_figure`` function takes plain data (sections of ``reports/metrics.json``, or the small
dataclasses below) and returns a :class:`matplotlib.figure.Figure`; :func:`save_png` writes it at
:data:`DPI` with no ``Software`` metadata, so the same inputs give the same PNG bytes (for one
matplotlib / FreeType build). The `figures` stage (:mod:`sparc.report.figures_stage`) reads the
pipeline's outputs into these inputs.

* :func:`reconstruction_figure`  M x M NMSE and FVU heat maps, one row per kind of codes
* :func:`jaccard_figure`          hierarchical Jaccard against depth, all and live latents
* :func:`patterns_figure`         alive / mixed / dead latents per kind, dead fraction per stream
* :func:`retrieval_figure`        R@1/5/10 per ordered stream pair, with chance
* :func:`latent_figure`           one latent's top activating samples, one column per stream
* :func:`retrieval_examples_figure`  caption queries and the images each image stream returns

User text (captions, concept names) is drawn with ``parse_math=False``: a ``$`` in a caption is
a dollar sign, not mathtext.

Longer than 500 lines because it holds one short, independent function per figure sharing
:data:`DPI`, the colours and :func:`save_png`; splitting them would only spread those over modules.
"""

from __future__ import annotations

import contextlib
import math
import textwrap
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from sparc.evaluate.run_files import csv_number

DPI = 100
KINDS = ("joint", "per_stream")
KIND_TITLES = {"joint": "joint codes", "per_stream": "per-stream codes"}
KIND_COLORS = {"joint": "#1f77b4", "per_stream": "#ff7f0e"}
RECALL_KS = (1, 5, 10)
RECALL_COLORS = ("#9ecae1", "#4292c6", "#08306b")
PATTERN_COLORS = {"alive_all": "#2ca02c", "mixed": "#ff7f0e", "dead_all": "#9e9e9e"}
HIT_COLOR = "#1a9850"
FRAME_COLOR = "#cccccc"
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
}


# --------------------------------------------------------------------------- basics


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The figures' rc settings; missing-glyph warnings (exotic captions) are silenced."""
    with matplotlib.rc_context(STYLE), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph .* missing")
        warnings.filterwarnings("ignore", message=r"Matplotlib currently does not support")
        yield


def new_figure(width: float, height: float, *, constrained: bool = False) -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at :data:`DPI` (no Software/date metadata) and return ``path``."""
    path = Path(path)
    with style():
        fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return path


# a metric value as a float, NaN when absent, empty or not a number
_nan = partial(csv_number, missing=math.nan)


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.{digits}f}"


def wrap(text: str, width: int, max_lines: int) -> str:
    """``text`` wrapped at ``width`` characters, at most ``max_lines`` lines ('…' when cut)."""
    lines = textwrap.wrap(" ".join(str(text).split()), max(width, 4), break_long_words=True) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        lines[-1] = (last[: max(width - 1, 1)].rstrip() + "…") if len(last) >= width else last + "…"
    return "\n".join(lines)


def _chars(width_in: float, fontsize: float) -> int:
    """About how many characters of ``fontsize`` points fit in ``width_in`` inches."""
    return max(int(width_in * 72 / (fontsize * 0.56)), 4)


# --------------------------------------------------------------------------- summary figures


def _pair_matrix(section: Mapping, streams: Sequence[str]) -> np.ndarray:
    """``{"s->t": value}`` -> ``[M, M]`` float, NaN where missing or null."""
    M = len(streams)
    out = np.full((M, M), np.nan)
    for i, s in enumerate(streams):
        for j, t in enumerate(streams):
            out[i, j] = _nan((section or {}).get(f"{s}->{t}"))
    return out


def reconstruction_figure(reconstruction: Mapping, streams: Sequence[str]) -> Figure:
    """The M x M reconstruction matrices as annotated heat maps.

    ``reconstruction`` is ``metrics.json["reconstruction"]``: per kind (joint, per_stream)
    ``{"nmse": {"s->t": v}, "fvu": {...}}``. Rows: kinds present; columns: NMSE, FVU. Row s,
    column t of a map is stream s's code decoded by t's decoder (the diagonal is self
    reconstruction); one colour scale per metric, shared by the kinds.
    """
    kinds = [k for k in KINDS if k in reconstruction] or list(reconstruction)
    if not kinds:
        raise ValueError("reconstruction: no kind of codes to draw")
    metrics = (("nmse", "NMSE"), ("fvu", "FVU"))
    M = len(streams)
    mats = {(k, m): _pair_matrix(reconstruction[k].get(m, {}), streams) for k in kinds for m, _ in metrics}
    side = max(2.4, 0.62 * M + 1.3)
    with style():
        fig = new_figure(2 * side + 1.2, len(kinds) * side + 0.7, constrained=True)
        axes = fig.subplots(len(kinds), 2, squeeze=False)
        for col, (m, title) in enumerate(metrics):
            values = np.concatenate([mats[(k, m)].ravel() for k in kinds])
            finite = values[np.isfinite(values)]
            vmax = max(float(finite.max()) if finite.size else 1.0, 1e-9)
            for row, kind in enumerate(kinds):
                ax = axes[row, col]
                mat = mats[(kind, m)]
                im = ax.imshow(np.ma.masked_invalid(mat), cmap="YlOrRd", vmin=0.0, vmax=vmax)
                ax.set_xticks(range(M), streams, rotation=30 if M > 3 else 0, ha="right" if M > 3 else "center")
                ax.set_yticks(range(M), streams)
                ax.set_xlabel("decoded by (target)")
                ax.set_ylabel("code of (source)")
                ax.set_title(f"{title}, {KIND_TITLES.get(kind, kind)}")
                for sp in ax.spines.values():
                    sp.set_visible(False)
                fs = 8 if M <= 5 else 6
                for i in range(M):
                    for j in range(M):
                        v = mat[i, j]
                        dark = math.isfinite(v) and v / vmax > 0.6
                        ax.text(j, i, _fmt(v), ha="center", va="center", fontsize=fs,
                                color="white" if dark else "black",
                                fontweight="bold" if i == j else "normal")
                if row == len(kinds) - 1:
                    fig.colorbar(im, ax=axes[:, col].tolist(), shrink=0.8, label=title)
        fig.suptitle("Reconstruction on the test split (lower is better; bold: self)")
    return fig


def _depths(section: Mapping) -> list[int]:
    return sorted(int(k.split("_", 1)[1]) for k in section if k.startswith("depth_"))


def jaccard_figure(jaccard: Mapping) -> Figure:
    """Hierarchical Jaccard against hierarchy depth.

    ``jaccard`` is ``metrics.json["jaccard"]``: per kind ``{"depth_<d>": {"all", "live"},
    "n_live"}``. One line per kind (colour) and latent set (solid: live latents, dashed: all L).
    """
    kinds = [k for k in KINDS if k in jaccard] or list(jaccard)
    with style():
        fig = new_figure(5.2, 3.9, constrained=True)
        ax = fig.subplots()
        all_depths: set[int] = set()
        for kind in kinds:
            sec = jaccard[kind]
            depths = _depths(sec)
            all_depths.update(depths)
            color = KIND_COLORS.get(kind, None)
            n_live = sec.get("n_live")
            for which, ls, marker in (("live", "-", "o"), ("all", "--", "s")):
                ys = [_nan(sec[f"depth_{d}"].get(which)) for d in depths]
                label = f"{KIND_TITLES.get(kind, kind)}, {which}"
                if which == "live" and n_live is not None:
                    label += f" ({n_live} latents)"
                ax.plot(depths, ys, ls=ls, marker=marker, color=color, label=label, ms=4)
        ax.set_xticks(sorted(all_depths) or [0])
        ax.set_xlabel("hierarchy depth (0 = root)")
        ax.set_ylabel("mean hierarchical Jaccard")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
        fig.legend(loc="outside lower center", ncol=2)
        ax.set_title("Cross-stream concept alignment by depth")
    return fig


def patterns_figure(patterns: Mapping, streams: Sequence[str]) -> Figure:
    """Activation patterns: alive in all streams / mixed / dead in all, per kind (stacked bars,
    fractions of L), and each stream's dead fraction per kind (grouped bars).

    ``patterns`` is ``metrics.json["patterns"]``: per kind ``{alive_all, dead_all, mixed,
    counts{...}, dead_fraction{s}}``.
    """
    kinds = [k for k in KINDS if k in patterns] or list(patterns)
    M = len(streams)
    with style():
        fig = new_figure(4.2 + max(2.8, 0.75 * M + 1.2), 3.2, constrained=True)
        ax1, ax2 = fig.subplots(1, 2, width_ratios=[4.2, max(2.8, 0.75 * M + 1.2)])
        ys = np.arange(len(kinds))[::-1]
        for y, kind in zip(ys, kinds, strict=True):
            left = 0.0
            counts = patterns[kind].get("counts", {})
            for key, label in (("alive_all", "alive in all"), ("mixed", "mixed"), ("dead_all", "dead in all")):
                v = _nan(patterns[kind].get(key))
                v = 0.0 if not math.isfinite(v) else v
                ax1.barh(y, v, left=left, color=PATTERN_COLORS[key], height=0.6,
                         label=label if y == ys[0] else None)
                if v >= 0.08:
                    n = counts.get(key)
                    ax1.text(left + v / 2, y, f"{v:.0%}" + (f"\n({n})" if n is not None else ""),
                             ha="center", va="center", fontsize=7.5, color="white")
                left += v
        ax1.set_yticks(ys, [KIND_TITLES.get(k, k) for k in kinds])
        ax1.set_xlim(0, 1)
        ax1.set_xlabel("fraction of the L latents")
        ax1.set_title("Activation patterns (test split)")
        ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, frameon=False)
        x = np.arange(M)
        width = 0.8 / max(len(kinds), 1)
        for i, kind in enumerate(kinds):
            dead = patterns[kind].get("dead_fraction", {})
            vals = [_nan(dead.get(s)) for s in streams]
            ax2.bar(x + (i - (len(kinds) - 1) / 2) * width, np.nan_to_num(vals), width,
                    color=KIND_COLORS.get(kind), label=KIND_TITLES.get(kind, kind))
        ax2.set_xticks(x, streams, rotation=30 if M > 3 else 0, ha="right" if M > 3 else "center")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("dead fraction")
        ax2.set_title("Dead latents per stream")
        ax2.grid(axis="y", alpha=0.3)
        ax2.legend(loc="upper right")
    return fig


def retrieval_figure(retrieval: Mapping, streams: Sequence[str]) -> Figure:
    """Cross-stream retrieval with the per-stream codes: R@1, R@5, R@10 per ordered pair
    (query -> gallery) as grouped bars; black ticks: chance at each K; crosses: raw features
    where the pair shares a space.

    ``retrieval`` is ``metrics.json["retrieval"]`` (``n``, ``chance``, ``"s->t"``, ``raw``).
    ValueError when it has no pair (a single stream).
    """
    pairs = [(s, t) for s in streams for t in streams if s != t and f"{s}->{t}" in retrieval]
    if not pairs:
        raise ValueError("retrieval: no stream pair to draw (at least two streams are needed)")
    chance = retrieval.get("chance", {}) or {}
    raw = retrieval.get("raw", {}) or {}
    P = len(pairs)
    width = 0.8 / len(RECALL_KS)
    with style():
        fig = new_figure(max(5.6, (0.75 if P <= 8 else 0.5) * P + 1.8), 4.0, constrained=True)
        ax = fig.subplots()
        x = np.arange(P)
        raw_drawn = False
        chance_label = "chance (" + ", ".join(
            f"R@{k} {_fmt(_nan(chance.get(f'R@{k}')), 3)}" for k in RECALL_KS) + ")"
        for i, (k, color) in enumerate(zip(RECALL_KS, RECALL_COLORS, strict=True)):
            key = f"R@{k}"
            pos = x + (i - (len(RECALL_KS) - 1) / 2) * width
            vals = [_nan(retrieval[f"{s}->{t}"].get(key)) for s, t in pairs]
            ax.bar(pos, np.nan_to_num(vals), width, color=color, label=key)
            c = _nan(chance.get(key))
            if math.isfinite(c):
                ax.hlines([c] * P, pos - width / 2, pos + width / 2, colors="black", linewidth=1.2,
                          label=chance_label if i == 0 else None)
            rv = [_nan(raw.get(f"{s}->{t}", {}).get(key)) for s, t in pairs]
            if any(math.isfinite(v) for v in rv):
                ax.scatter(pos, rv, marker="x", color="#d62728", s=22, zorder=3,
                           label="raw features" if not raw_drawn else None)
                raw_drawn = True
        ax.set_xticks(x, [f"{s}→{t}" for s, t in pairs], rotation=30 if P > 4 else 0,
                      ha="right" if P > 4 else "center")
        ax.set_xlabel("query stream → gallery stream")
        ax.set_ylabel("recall")
        ax.set_ylim(0, 1.0)
        ax.grid(axis="y", alpha=0.3)
        fig.legend(loc="outside lower center", ncol=3 if raw_drawn else 2)
        n = retrieval.get("n")
        ax.set_title("Cross-stream retrieval, per-stream codes" + (f" ({n} test samples)" if n else ""))
    return fig


# --------------------------------------------------------------------------- sample grids


@dataclass(frozen=True)
class TopSample:
    """One top activating sample of a latent in one stream (``hit``: carries the stream's
    dominant label; None when the stream has none)."""

    sample_id: str
    activation: float
    caption: str
    image: Path | None
    hit: bool | None = None


@dataclass(frozen=True)
class LatentColumn:
    """One stream's side of a latent: its concept name ('' when unnamed), purity, how many
    evaluated samples it fires on, its top samples (best first), and its text name (the best
    caption term of :mod:`sparc.evaluate.text_names`, '' when none)."""

    stream: str
    input: str  # image | caption
    name: str
    purity: float
    n_active: int
    samples: list[TopSample]
    text: str = ""


@dataclass(frozen=True)
class LatentView:
    """What :func:`latent_figure` draws: a title line, a note line, one column per stream."""

    latent: int
    title: str
    note: str
    columns: list[LatentColumn]

    @property
    def fires(self) -> bool:
        return any(c.samples for c in self.columns)


@dataclass(frozen=True)
class Retrieved:
    sample_id: str
    image: Path | None
    score: float
    correct: bool


@dataclass(frozen=True)
class RetrievalExample:
    """One caption query and, per image stream, its top images and the rank of the right one."""

    query_stream: str
    sample_id: str
    caption: str
    results: dict[str, list[Retrieved]]
    correct_rank: dict[str, int]  # 1-based rank of the query's own image in each gallery
    gallery_size: int


class Thumbnails:
    """Square RGB thumbnails of image files (white background, aspect kept), cached by path;
    a grey tile when the file is missing or not an image."""

    def __init__(self, px: int) -> None:
        self.px = int(px)
        self._cache: dict[Path | None, tuple[np.ndarray, bool]] = {}

    def __call__(self, path: Path | None) -> tuple[np.ndarray, bool]:
        """``(uint8 [px, px, 3], ok)``."""
        if path not in self._cache:
            self._cache[path] = self._load(path)
        return self._cache[path]

    def _load(self, path: Path | None) -> tuple[np.ndarray, bool]:
        from PIL import Image

        from sparc.data.images import to_8bit

        tile = np.full((self.px, self.px, 3), 230, dtype=np.uint8)
        if path is None:
            return tile, False
        try:
            with Image.open(path) as im:
                im.draft("RGB", (2 * self.px, 2 * self.px))  # JPEG: decode at a reduced scale
                im.load()
                im = to_8bit(im).convert("RGBA")
        except (OSError, ValueError, Image.DecompressionBombError):
            return tile, False
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im).convert("RGB")
        im.thumbnail((self.px, self.px), Image.Resampling.LANCZOS)
        out = Image.new("RGB", (self.px, self.px), (255, 255, 255))
        out.paste(im, ((self.px - im.width) // 2, (self.px - im.height) // 2))
        return np.asarray(out, dtype=np.uint8), True


class _Grid:
    """Absolute placement in inches (origin top-left) on a figure of fixed size."""

    def __init__(self, fig: Figure, width: float, height: float) -> None:
        self.fig, self.W, self.H = fig, width, height

    def axes(self, x: float, y: float, w: float, h: float):
        ax = self.fig.add_axes((x / self.W, 1 - (y + h) / self.H, w / self.W, h / self.H))
        ax.set_axis_off()
        return ax

    def text(self, x: float, y: float, s: str, **kw) -> None:
        kw.setdefault("parse_math", False)
        self.fig.text(x / self.W, 1 - y / self.H, s, **kw)


def _frame(ax, color: str, lw: float) -> None:
    ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor=color,
                           linewidth=lw, clip_on=False))


def _image_cell(grid: _Grid, thumbs: Thumbnails, x: float, y: float, size: float, path: Path | None,
                color: str, lw: float) -> None:
    arr, ok = thumbs(path)
    ax = grid.axes(x, y, size, size)
    ax.imshow(arr, interpolation="nearest", extent=(0, 1, 0, 1))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    if not ok:
        ax.text(0.5, 0.5, "no image", ha="center", va="center", fontsize=6.5, color="#666666")
    _frame(ax, color, lw)


def _caption_cell(grid: _Grid, x: float, y: float, w: float, h: float, text: str, fontsize: float,
                  color: str, lw: float, footer: str = "") -> None:
    ax = grid.axes(x, y, w, h)
    line_in = fontsize * 1.25 / 72
    max_lines = max(int((h - 0.08 - (line_in if footer else 0)) / line_in), 1)
    ax.text(0.04, 0.95, wrap(text, _chars(w - 0.1, fontsize), max_lines), ha="left", va="top",
            fontsize=fontsize, transform=ax.transAxes, parse_math=False, linespacing=1.1)
    if footer:
        ax.text(0.96, 0.04, footer, ha="right", va="bottom", fontsize=6.5, color="#555555",
                transform=ax.transAxes, parse_math=False)
    _frame(ax, color, lw)


def latent_figure(view: LatentView, top_n: int, thumb_px: int, thumbs: Thumbnails | None = None) -> Figure:
    """One latent's top ``top_n`` activating samples, one column per stream (from the joint codes):
    a thumbnail for an image stream, the wrapped caption for a caption stream, each with its
    activation. Column titles: stream, its concept name, its text name (when any column has
    one), purity, how many samples it fires on. A green frame marks a sample carrying that
    stream's dominant label.

    ValueError when the latent fires in no stream (nothing to show).
    """
    if not view.fires:
        raise ValueError(f"latent {view.latent} never fires: nothing to show")
    thumbs = thumbs or Thumbnails(thumb_px)
    thumb = thumb_px / DPI
    img_w = max(thumb + 0.25, 1.45)
    cap_w = 2.5
    cell_h = max(thumb + 0.2, 0.72)
    gap, margin = 0.15, 0.2
    texts = any(c.text for c in view.columns)
    title_h, header_h, foot_h = 0.62, 0.86 if texts else 0.72, 0.3
    widths = [img_w if c.input == "image" else cap_w for c in view.columns]
    W = 2 * margin + sum(widths) + gap * (len(widths) - 1)
    W = max(W, 3.2)
    n_rows = max(min(len(c.samples), top_n) for c in view.columns)
    H = title_h + header_h + n_rows * cell_h + foot_h
    with style():
        fig = new_figure(W, H)
        grid = _Grid(fig, W, H)
        grid.text(W / 2, 0.1, wrap(view.title, _chars(W - 0.2, 11), 1), ha="center", va="top",
                  fontsize=11, fontweight="bold")
        grid.text(W / 2, 0.36, wrap(view.note, _chars(W - 0.2, 8), 1), ha="center", va="top",
                  fontsize=8, color="#444444")
        x = margin + (W - 2 * margin - sum(widths) - gap * (len(widths) - 1)) / 2
        for col, w in zip(view.columns, widths, strict=True):
            cx = x + w / 2
            name = col.name or "unnamed"
            purity = "n/a" if not math.isfinite(col.purity) else f"{col.purity:.2f}"
            header = "\n".join([
                f"{col.stream} ({col.input})",
                wrap(name, _chars(w, 7.5), 1),
                *([wrap(f"text: {col.text or 'none'}", _chars(w, 7.5), 1)] if texts else []),
                f"purity {purity} · fires on {col.n_active}" if col.input == "caption"
                else f"purity {purity}\nfires on {col.n_active}",
            ])
            grid.text(cx, title_h, header, ha="center", va="top", fontsize=7.5, linespacing=1.15)
            if not col.samples:
                grid.text(cx, title_h + header_h + 0.2, f"never fires in {col.stream}", ha="center",
                          va="top", fontsize=8, color="#666666", style="italic")
            for r, s in enumerate(col.samples[:top_n]):
                y = title_h + header_h + r * cell_h
                color, lw = (HIT_COLOR, 2.0) if s.hit else (FRAME_COLOR, 0.8)
                if col.input == "image":
                    _image_cell(grid, thumbs, cx - thumb / 2, y, thumb, s.image, color, lw)
                    grid.text(cx, y + thumb + 0.02, f"{s.activation:.3g}", ha="center", va="top",
                              fontsize=6.5, color="#555555")
                else:
                    _caption_cell(grid, x + 0.03, y, w - 0.06, cell_h - 0.1, s.caption, 7.5, color, lw,
                                  footer=f"{s.activation:.3g}")
            x += w + gap
        grid.text(W / 2, H - 0.08, "green frame: carries the stream's dominant label; numbers: activation",
                  ha="center", va="bottom", fontsize=6.5, color="#555555")
    return fig


def retrieval_examples_figure(
    examples: Sequence[RetrievalExample], image_streams: Sequence[str], top_n: int, thumb_px: int,
    thumbs: Thumbnails | None = None,
) -> Figure:
    """Caption queries (rows) and the top ``top_n`` test images each image stream returns for the
    query's per-stream code (cosine of L2-normalised codes); the query's own image has a green
    frame, and each row says at which rank it came. ValueError without queries or image streams."""
    if not examples or not image_streams:
        raise ValueError("retrieval examples: need at least one caption query and one image stream")
    thumbs = thumbs or Thumbnails(thumb_px)
    thumb = thumb_px / DPI
    cell_w = max(thumb + 0.08, 0.45)
    cap_w, gap, margin = 2.4, 0.3, 0.2
    title_h, head_h, label_h, score_h, row_gap = 0.55, 0.3, 0.22, 0.2, 0.12
    row_h = label_h + thumb + score_h + row_gap
    group_w = top_n * cell_w
    W = 2 * margin + cap_w + len(image_streams) * (gap + group_w)
    H = title_h + head_h + len(examples) * row_h + 0.1
    with style():
        fig = new_figure(W, H)
        grid = _Grid(fig, W, H)
        q = examples[0].query_stream
        n = examples[0].gallery_size
        grid.text(W / 2, 0.1, f"Caption → image retrieval with per-stream codes (queries: {q}, "
                  f"gallery: {n} test images)", ha="center", va="top", fontsize=11, fontweight="bold")
        grid.text(margin, title_h, "query caption", ha="left", va="top", fontsize=8.5, fontweight="bold")
        gx0 = margin + cap_w + gap
        for g, s in enumerate(image_streams):
            grid.text(gx0 + g * (gap + group_w) + group_w / 2, title_h, f"top {top_n} in {s}",
                      ha="center", va="top", fontsize=8.5, fontweight="bold")
        for r, ex in enumerate(examples):
            y = title_h + head_h + r * row_h
            _caption_cell(grid, margin, y + label_h, cap_w - 0.05, thumb + score_h - 0.02, ex.caption, 8,
                          FRAME_COLOR, 0.8, footer=ex.sample_id)
            for g, s in enumerate(image_streams):
                gx = gx0 + g * (gap + group_w)
                rank = ex.correct_rank.get(s)
                found = rank is not None and rank <= top_n
                grid.text(gx, y + 0.02, f"correct image at rank {rank}" if rank else "", ha="left", va="top",
                          fontsize=7, color=HIT_COLOR if found else "#555555")
                for c, hit in enumerate(ex.results.get(s, [])[:top_n]):
                    x = gx + c * cell_w + (cell_w - thumb) / 2
                    color, lw = (HIT_COLOR, 2.5) if hit.correct else (FRAME_COLOR, 0.8)
                    _image_cell(grid, thumbs, x, y + label_h, thumb, hit.image, color, lw)
                    grid.text(x + thumb / 2, y + label_h + thumb + 0.02, f"{hit.score:.2f}", ha="center",
                              va="top", fontsize=6.5, color="#555555")
    return fig
