"""Attention heatmaps: one panel per generated word, the image under its attention map.

Functions take arrays and return a `matplotlib.figure.Figure` drawn on the Agg canvas; nothing
here touches `pyplot`, so figures hold no global state and are garbage collected like any
object (no `plt.close` needed, no GUI backend, safe in training callbacks and threads).

The decoder attends over the 8x8 InceptionV3 grid (64 positions, row-major: position
p = row * 8 + col, row 0 at the top of the image) once per word.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from caption_attn.backbone import GRID
from caption_attn.fileio import write_bytes_atomic

PANEL_INCHES = 2.2  # width of one word panel; readable titles at 100 dpi
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
    """One attention map (64,) or (8, 8) as a smooth (H, W) float32 map, values >= 0.

    Bicubic interpolation with pixel-centre alignment: grid cell (r, c) covers image rows
    r*H/8 .. (r+1)*H/8 and columns c*W/8 .. (c+1)*W/8, and a lone weight peaks at its centre.
    Bicubic overshoots slightly below zero next to sharp peaks; those values are clipped.
    """
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"`size` must be (H, W) with H, W >= 1; got {size}")
    grid = _as_grids(attention, per_step=False)  # (8, 8)
    up = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)  # (H, W)
    return np.maximum(up, 0.0).astype(np.float32)


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"`image` must be an (H, W, 3) RGB array; got shape {image.shape}")
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


def _new_figure(rows: int, cols: int, aspect: float, title: str | None) -> Figure:
    """Empty figure sized for `rows` x `cols` panels of height/width `aspect`, plus colorbar."""
    width = cols * PANEL_INCHES + 0.9  # colorbar and its labels
    height = rows * (PANEL_INCHES * aspect + 0.3) + (0.4 if title else 0.0)  # + word titles
    fig = Figure(figsize=(width, height), layout="constrained")
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

    image: (H, W, 3) uint8 RGB. attention: (T, 64) or (T, 8, 8) with T >= len(words); row t
    belongs to words[t], extra rows (e.g. the step that produced `<end>`) are ignored.
    """
    image = _check_image(image)
    grids = _check_words(words, attention)  # (n, 8, 8)
    height, width = image.shape[:2]
    maps = [upsample_attention(g, (height, width)) for g in grids]  # n x (H, W)
    norm = Normalize(vmin=0.0, vmax=max(float(np.max(maps)), 1e-8))

    rows, cols = grid_shape(len(words))
    fig = _new_figure(rows, cols, aspect=height / width, title=title)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, word, heat in zip(axes, words, maps):
        ax.imshow(image)
        ax.imshow(heat, cmap=CMAP, norm=norm, alpha=alpha)
        ax.set_title(word, fontsize=11)
        ax.set_axis_off()
    for ax in axes[len(words) :]:
        fig.delaxes(ax)
    mappable = ScalarMappable(norm=norm, cmap=CMAP)
    fig.colorbar(mappable, ax=list(axes[: len(words)]), shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title)
    _freeze_layout(fig)
    return fig


def _freeze_layout(fig: Figure, passes: int = 3) -> None:
    """Settle constrained layout, then fix it so every render of `fig` is identical.

    With fixed-aspect images and a colorbar, constrained layout moves the axes a little on each
    draw (converging geometrically; after 3 passes by < 0.3 px), so two saves of a fresh figure
    would differ. Freezing also spares the layout solve on every later save.
    """
    engine = fig.get_layout_engine()
    for _ in range(passes):
        engine.execute(fig)
    fig.set_layout_engine("none")  # keeps the settled positions


def figure_to_png(fig: Figure) -> bytes:
    """PNG bytes of `fig` at its own size and dpi (for TensorBoard summaries and files)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    return buffer.getvalue()


def save_figure(fig: Figure, path) -> None:
    """Write `fig` as a PNG at `path` atomically (`config.atomic_path`); creates parents."""
    write_bytes_atomic(str(path), figure_to_png(fig))
