"""Attention heatmaps: one panel per generated word, the image under its attention map.

Functions take arrays and return a `matplotlib.figure.Figure` drawn on the Agg canvas; nothing
here touches `pyplot`, so figures hold no global state and are garbage collected like any
object (no `plt.close` needed, no GUI backend, safe in training callbacks and threads).

The decoder attends over the 8x8 InceptionV3 grid (64 positions, row-major: position
p = row * 8 + col, row 0 at the top of the image) once per word.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from typing import Optional, Sequence

import cv2
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import FigureImage

from caption_attn.backbone import GRID
from caption_attn.fileio import write_bytes_atomic
from caption_attn.images import mark_heatmap

PANEL_INCHES = 2.2  # width of one word panel; readable titles at 100 dpi
_PAD_INCHES = 0.05  # around each panel's image
_WORD_INCHES = 0.3  # the word above each panel
_TITLE_INCHES = 0.4  # the figure title
_COLORBAR_INCHES = 1.0  # colorbar, its tick labels and its label
_MIN_BAR_INCHES = 1.5  # the colorbar's least height: room for its label and a few ticks
_WORD_GAP_POINTS = 6.0  # between a panel and its word's baseline (an axes title's pad)
# PNG encoding of a heatmap, lossless: zlib level 1 with its run-length strategy, every row
# Paeth-filtered. A 15-word figure on a photo-like (synthetic) image: 23 ms, 725 kB, where
# level 1 alone took 32 ms, 865 kB (run-length with libpng's default, all five filters tried
# per row: 28 ms, 723 kB; level 3: 51 ms, 843 kB); on a gray square 24 ms, 643 kB against
# 35 ms, 761 kB. The level comes first: OpenCV resets the strategy when it reads the level.
PNG_PARAMS = (cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY,
              cv2.IMWRITE_PNG_STRATEGY_RLE, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH)
CMAP = "inferno"  # dark = ignored, bright = attended: a spotlight on the attended region


def grid_shape(n: int, max_cols: int = 5) -> tuple[int, int]:
    """`(rows, cols)` for `n` panels: near-square, landscape-leaning, never an empty row.

    >>> [grid_shape(n) for n in (1, 3, 5, 7, 11, 25)]
    [(1, 1), (1, 3), (2, 3), (2, 4), (3, 4), (5, 5)]
    """
    if n < 1:
        raise ValueError(f"`n` must be >= 1; got {n}")
    if max_cols < 1:
        raise ValueError(f"`max_cols` must be >= 1; got {max_cols}")
    rows = max(math.ceil(n / max_cols), math.isqrt(n))
    # Spreading n over `rows` rows leaves fewer than `cols` empty slots, so no row is empty.
    return rows, math.ceil(n / rows)


def _as_grids(attention, per_step: bool) -> np.ndarray:
    """float32 grids: (64,) or (8, 8) -> (8, 8); per step, (T, 64) or (T, 8, 8) -> (T, 8, 8)."""
    a = np.asarray(attention, dtype=np.float32)
    lead = 1 if per_step else 0
    if a.ndim == lead + 1 and a.shape[lead:] == (GRID * GRID,):
        return a.reshape(a.shape[:lead] + (GRID, GRID))
    if a.ndim == lead + 2 and a.shape[lead:] == (GRID, GRID):
        return a
    t = "T, " if per_step else ""
    want = f"({t}{GRID * GRID}) or ({t}{GRID}, {GRID})"
    raise ValueError(f"`attention` must have shape {want}; got shape {a.shape}")


def upsample_attention(attention, size: tuple[int, int]) -> np.ndarray:
    """One attention map (64,) or (8, 8) as a smooth (H, W) float32 map, values in [0, 1].

    Bicubic interpolation with pixel-centre alignment: grid cell (r, c) covers image rows
    r*H/8 .. (r+1)*H/8 and columns c*W/8 .. (c+1)*W/8, and a lone weight peaks at its centre.
    Bicubic overshoots next to sharp peaks, below zero and above the weights themselves; the
    values are clipped to the range of an attention weight (the colour bar went past 1).
    """
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"`size` must be (H, W) with H, W >= 1; got {size}")
    grid = _as_grids(attention, per_step=False)  # (8, 8)
    up = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)  # (H, W)
    return np.clip(up, 0.0, 1.0).astype(np.float32)


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"`image` must be an (H, W, 3) RGB array; got shape {image.shape}")
    if image.dtype != np.uint8:   # blended as 0..255 values (a float image would come out black)
        raise ValueError(f"`image` must be uint8 (0..255); got dtype {image.dtype}")
    return image


def _check_words(words: Sequence[str], attention) -> np.ndarray:
    """Validated attention grids (len(words), 8, 8); extra decoding steps are dropped."""
    if len(words) == 0:
        raise ValueError(f"`words` must name at least one word; got {words!r}")
    grids = _as_grids(attention, per_step=True)  # (T, 8, 8)
    if len(grids) < len(words):
        raise ValueError(
            f"`attention` needs one row per word: {len(words)} words but `attention` has "
            f"shape {np.shape(attention)} ({len(grids)} rows)"
        )
    return grids[: len(words)]  # (n, 8, 8)


def _layout(rows: int, cols: int, aspect: float, title: bool):
    """A fixed layout in inches, computed once instead of solved by a layout engine.

    Returns the figure size, one [left, bottom, width, height] rectangle (figure fractions) per
    panel in row-major order, the colorbar's rectangle and the title's y. Each panel cell is
    PANEL_INCHES wide with its word above it; the image (`aspect` = height / width) fills it
    across, or, when taller than wide, is as high as a square one and centred across (a
    1:20 strip made a cell 42 inches high). The colorbar spans 80% of the panels' height,
    at least _MIN_BAR_INCHES (beside one row of a wide strip it was too short for its ticks:
    the figure is then that much higher, the panels at its top).
    (Constrained layout gave nearly the same picture but cost 0.6 s per 13-word figure: three
    solves, each measuring every text.)
    """
    side = PANEL_INCHES - 2 * _PAD_INCHES  # the image's longest side
    image_w, image_h = (side, side * aspect) if aspect <= 1 else (side / aspect, side)
    cell_h = image_h + 2 * _PAD_INCHES + _WORD_INCHES
    top = _TITLE_INCHES if title else 0.0
    width = cols * PANEL_INCHES + _COLORBAR_INCHES
    grid_h = rows * cell_h
    bar_h = max(0.8 * grid_h, _MIN_BAR_INCHES)
    body_h = max(grid_h, bar_h / 0.8)
    height = body_h + top
    panels = []
    for r in range(rows):
        for c in range(cols):
            left = c * PANEL_INCHES + (PANEL_INCHES - image_w) / 2
            bottom = height - top - (r + 1) * cell_h + _PAD_INCHES
            panels.append([left / width, bottom / height, image_w / width, image_h / height])
    bottom = (body_h - bar_h) / 2
    colorbar = [(cols * PANEL_INCHES + 0.1) / width, bottom / height, 0.15 / width,
                bar_h / height]
    return (width, height), panels, colorbar, 1 - 0.1 / height


class _Panel(FigureImage):
    """A word's panel: uint8 RGB pixels placed on the figure as they are.

    matplotlib's `FigureImage` resamples every image through float32 RGBA, even one drawn
    1:1: about 1.9 ms per 210 x 210 panel, half the Agg drawing of a 15-word heatmap (28 of
    its 53 ms). Unscaled (the renderer at the figure's dpi: `savefig(dpi=...)` sets both),
    unclipped and opaque, a panel goes to the renderer as it is, the same pixels to the byte
    (a test draws both ways); anything else (a vector format at other than 72 dpi, a panel
    past the figure's edge) takes matplotlib's path.
    """

    def make_image(self, renderer, magnification=1.0, unsampled=False):
        pixels = self.get_array()
        height, width = pixels.shape[:2]
        fig = self.get_figure(root=True)
        if (unsampled or magnification != 1.0 or renderer.dpi != fig.dpi
                or self.origin != "upper"
                or self.get_alpha() is not None or pixels.dtype != np.uint8
                or pixels.shape[2:] != (3,) or min(self.ox, self.oy) < 0
                or self.ox + width > fig.bbox.width or self.oy + height > fig.bbox.height):
            return super().make_image(renderer, magnification, unsampled)
        rgba = np.empty((height, width, 4), np.uint8)
        rgba[..., :3], rgba[..., 3] = pixels[::-1], 255  # the renderer's rows run bottom-up
        return rgba, self.ox, self.oy, None


def _add_panel(fig: Figure, pixels: np.ndarray, xo: int, yo: int) -> None:
    """`fig.figimage(pixels, xo, yo, origin="upper")`, drawn as a `_Panel`."""
    panel = _Panel(fig, offsetx=xo, offsety=yo, origin="upper")
    panel.set_array(pixels)
    fig.images.append(panel)
    panel._remove_method = fig.images.remove  # as `Figure.figimage` does: `remove()` works


def _new_figure(size) -> Figure:
    fig = Figure(figsize=size)  # no layout engine: every render is identical
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    return fig


def attention_figure(
    image,
    words: list[str],
    attention,
    title: str | None = None,
    alpha: float = 0.6,
) -> Figure:
    """The image under each word's attention map, one panel per word, one shared color scale.

    image: (H, W, 3) uint8 RGB, the photo in its own proportions (`images.heatmap_view`, not
    the 299x299 the model saw): each 8x8 map is stretched over all of it, as the model's
    resize stretched the photo. attention: (T, 64) or (T, 8, 8) with T >= len(words); row t
    belongs to words[t], extra rows (e.g. the step that produced `<end>`) are ignored.

    Each panel is blended here, at the pixel size it is drawn at: the image resized once,
    each map upsampled to it and coloured by CMAP, (1 - alpha) image + alpha map, then placed
    on the figure as it is (a figure image, `_Panel`: no axes, no resampling) with its word
    above it as a figure text. Axes per panel, each with two resampled images, drew the same
    picture in twice the time (0.29 against 0.145 s of CPU for 15 words at 299 x 299, most of
    it making the axes); a large photo was resampled at full size twice per word. An image
    smaller than its panel is enlarged smoothly (bicubic), not in blocks.
    """
    image = _check_image(image)
    grids = _check_words(words, attention)  # (n, 8, 8)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1]; got {alpha}")
    height, width = image.shape[:2]
    rows, cols = grid_shape(len(words))
    size, panels, colorbar, title_y = _layout(rows, cols, height / width, bool(title))
    fig = _new_figure(size)
    fig_w, fig_h = size[0] * fig.dpi, size[1] * fig.dpi  # pixels
    panel_w = max(1, round(panels[0][2] * fig_w))
    panel_h = max(1, round(panels[0][3] * fig_h))
    shrink = panel_w < width or panel_h < height
    base = cv2.resize(image, (panel_w, panel_h),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    maps = np.stack([upsample_attention(g, (panel_h, panel_w)) for g in grids])  # (n, h, w)
    norm = Normalize(vmin=0.0, vmax=max(float(np.max(maps)), 1e-8))
    colored = colormaps[CMAP](norm(maps), bytes=True)[..., :3]  # (n, h, w, 3) uint8
    blended = np.rint((1.0 - alpha) * base.astype(np.float32)
                      + alpha * colored.astype(np.float32)).astype(np.uint8)
    word_gap = _WORD_GAP_POINTS / 72 / size[1]  # figure fraction
    for (left, bottom, w, h), word, panel in zip(panels, words, blended):
        _add_panel(fig, panel, round(left * fig_w), round(bottom * fig_h))
        fig.text(left + w / 2, bottom + h + word_gap, word, ha="center", va="baseline",
                 fontsize=11, parse_math=False)  # parse_math: "$" is not TeX
    mappable = ScalarMappable(norm=norm, cmap=CMAP)
    fig.colorbar(mappable, cax=fig.add_axes(colorbar), label="attention weight")
    if title:
        fig.suptitle(title, y=title_y, va="top", parse_math=False)  # "$": no TeX (file names)
    return fig


def figure_to_png(fig: Figure) -> bytes:
    """PNG bytes of `fig` at its own size and dpi (for TensorBoard summaries and files).

    Drawn on the Agg canvas and encoded by OpenCV with `PNG_PARAMS`: for a 15-word heatmap
    (1200 x 790 px) about 0.05 s + 0.025 s, where `savefig` took 0.3 s to encode.
    """
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        canvas.draw()
    _report_missing_glyphs(caught)
    bgr = cv2.cvtColor(np.asarray(canvas.buffer_rgba()), cv2.COLOR_RGBA2BGR)  # (H, W, 3)
    ok, png = cv2.imencode(".png", bgr, PNG_PARAMS)
    if not ok:
        raise RuntimeError("OpenCV could not encode the figure as PNG")
    return png.tobytes()


_GLYPH_WARNING = re.compile(r"Glyph (\d+) \(.+\) missing from font\(s\) (.+)\.$")
_missing_glyphs: set = set()   # characters already reported by this process


def _report_missing_glyphs(caught) -> None:
    """Matplotlib warns once per missing character with a source line; words of a vocabulary
    in a script the font lacks (e.g. CJK under DejaVu Sans) become one note on stderr per
    new character set instead. Other warnings are passed on as they were."""
    new, font = [], ""
    for w in caught:
        found = _GLYPH_WARNING.search(str(w.message))
        if found is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        char, font = chr(int(found.group(1))), found.group(2)
        if char not in _missing_glyphs:
            _missing_glyphs.add(char)
            new.append(char)
    if new:
        print(f"note: the heatmaps' font ({font}) has no glyph for {' '.join(new)}: those "
              f"words are drawn with empty boxes; install a font that has them and matplotlib "
              f"uses it", file=sys.stderr)


def save_figure(fig: Figure, path, source: Optional[str] = None) -> None:
    """Write `fig` as a PNG at `path` atomically (`config.atomic_path`), marked as a heatmap
    (`images.mark_heatmap`: `caption` redraws and removes only files so marked, and folder
    walks leave them out of the images), of the image `source` (its real path) if given;
    creates parents."""
    write_bytes_atomic(str(path), mark_heatmap(figure_to_png(fig), source))
