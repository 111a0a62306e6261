import gc
import os
import re
import weakref

import cv2
import numpy as np
import pytest

from caption_attn.images import is_heatmap_file, mark_heatmap
from caption_attn.plot import (
    attention_figure,
    figure_to_png,
    grid_shape,
    save_figure,
    upsample_attention,
)

WORDS = ["a", "red", "circle", "above", "a", "blue", "square", "on", "grey", "ground", "today"]


def _image(h=48, w=64):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _attention(t, rng_seed=0):
    a = np.random.default_rng(rng_seed).random((t, 64)).astype(np.float32)
    return a / a.sum(axis=1, keepdims=True)  # (T, 64), rows sum to 1 like softmax output


def _panels(fig):
    """The panels' images (figure images, `plot._Panel`), in word order."""
    return fig.images


def _words(fig):
    return [t.get_text() for t in fig.texts if t is not fig._suptitle]


def _panel_box(fig, panel):
    """(x0, y0, x1, y1) of a panel in figure pixels, from the bottom left."""
    h, w = panel.get_size()
    return panel.ox, panel.oy, panel.ox + w, panel.oy + h


# --- grid_shape ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 11, 12, 25])
def test_grid_shape_fits_without_empty_row(n):
    rows, cols = grid_shape(n)
    assert rows * cols >= n
    assert (rows - 1) * cols < n  # the last row holds at least one panel
    assert 1 <= cols <= 5


@pytest.mark.parametrize(
    "n, expected", [(1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (5, (2, 3)), (11, (3, 4)), (25, (5, 5))]
)
def test_grid_shape_is_near_square(n, expected):
    assert grid_shape(n) == expected


def test_grid_shape_invariants_over_many_counts_and_widths():
    for max_cols in range(1, 8):
        for n in range(1, 80):
            rows, cols = grid_shape(n, max_cols=max_cols)
            assert cols <= max_cols and rows * cols >= n and (rows - 1) * cols < n, (n, max_cols)


@pytest.mark.parametrize("n, max_cols", [(0, 5), (-1, 5), (3, 0)])
def test_grid_shape_rejects_bad_arguments(n, max_cols):
    with pytest.raises(ValueError, match=r"`(n|max_cols)`"):
        grid_shape(n, max_cols)


# --- upsample_attention -------------------------------------------------------------------


@pytest.mark.parametrize("cell", [(0, 0), (0, 7), (7, 0), (7, 7), (3, 4), (4, 3)])
def test_upsample_peak_lies_in_the_hot_cell(cell):
    h, w = 96, 160  # non-square: rows and columns must not be swapped
    grid = np.zeros((8, 8), np.float32)
    grid[cell] = 1.0
    up = upsample_attention(grid, (h, w))
    assert up.shape == (h, w) and up.dtype == np.float32
    r, c = np.unravel_index(np.argmax(up), up.shape)
    assert cell[0] * h / 8 <= r < (cell[0] + 1) * h / 8
    assert cell[1] * w / 8 <= c < (cell[1] + 1) * w / 8


def test_upsample_is_smooth_not_a_block_stretch():
    flat = np.zeros(64, np.float32)
    flat[3 * 8 + 4] = 1.0  # row-major: position p = row * 8 + col
    up = upsample_attention(flat, (128, 128))
    assert len(np.unique(up)) > 20  # a nearest-neighbour stretch would give only 2 values
    # Neighbouring pixels differ by a small step: no cliff at the cell border.
    assert np.abs(np.diff(up, axis=1)).max() < 0.2
    assert up.min() >= 0.0


def test_upsample_stays_within_attention_weights():
    """Bicubic overshoot was clipped below 0 only: two strong cells side by side peaked at
    1.18 between them, and the heatmap's colour bar went past 1, which no attention weight
    can reach."""
    grid = np.zeros((8, 8), np.float32)
    grid[3, 4:6] = 1.0
    up = upsample_attention(grid, (128, 128))
    assert up.max() == 1.0 and up.min() >= 0.0


def test_upsample_reads_flat_attention_row_major():
    flat = np.zeros(64, np.float32)
    flat[1 * 8 + 6] = 1.0  # row 1 (near the top), column 6 (near the right)
    r, c = np.unravel_index(np.argmax(upsample_attention(flat, (80, 80))), (80, 80))
    assert 10 <= r < 20 and 60 <= c < 70


def test_upsample_accepts_flat_and_grid_forms_equally():
    a = _attention(1)[0]  # (64,)
    np.testing.assert_array_equal(
        upsample_attention(a, (40, 30)), upsample_attention(a.reshape(8, 8), (40, 30))
    )


@pytest.mark.parametrize("shape", [(63,), (8, 7), (2, 64), (1, 8, 8)])
def test_upsample_rejects_bad_attention_shape(shape):
    with pytest.raises(ValueError, match=r"`attention`.*" + re.escape(str(shape))):
        upsample_attention(np.zeros(shape), (10, 10))


def test_upsample_rejects_bad_size():
    with pytest.raises(ValueError, match=r"`size`.*\(0, 10\)"):
        upsample_attention(np.zeros(64), (0, 10))


# --- attention_figure ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 11])
def test_figure_has_one_titled_panel_per_word(n):
    words = WORDS[:n]
    fig = attention_figure(_image(), words, _attention(n + 1))  # + the step that emitted <end>
    assert len(_panels(fig)) == n
    assert _words(fig) == words
    # no axes per panel; the one axes is the shared colorbar
    assert len(fig.axes) == 1 and fig.axes[0].get_ylabel() == "attention weight"
    for panel, word in zip(_panels(fig), fig.texts):  # each word centred above its panel
        x0, y0, x1, y1 = _panel_box(fig, panel)
        x, y = word.get_position()
        assert x * fig.bbox.width == pytest.approx((x0 + x1) / 2, abs=1)
        assert y1 < y * fig.bbox.height < y1 + 20


def test_figure_panels_share_one_color_scale():
    """Word 0 attends to one cell, word 1 everywhere alike: on one scale word 1's panel is
    the colormap's low end all over (its own scale would have made it bright)."""
    from matplotlib import colormaps

    from caption_attn.plot import CMAP
    attention = np.full((2, 64), 1 / 64, np.float32)
    attention[0] = 0.0
    attention[0, 27] = 1.0
    fig = attention_figure(_image(), ["peak", "flat"], attention, alpha=1.0)
    peak, flat = (np.asarray(p.get_array()) for p in _panels(fig))
    low = np.array(colormaps[CMAP](0.0, bytes=True)[:3], np.int16)
    assert np.abs(flat.astype(np.int16) - low).max() <= 40             # dark everywhere
    bright = np.array(colormaps[CMAP](1.0, bytes=True)[:3], np.int16)
    assert np.abs(peak.astype(np.int16) - bright).sum(-1).min() <= 3   # the peak: the top
    cbar = fig.axes[0]
    assert cbar.get_ylim()[0] == 0.0 and cbar.get_ylim()[1] >= 0.9     # the peak's scale


def test_figure_overlay_covers_the_image_and_uses_alpha():
    """Each panel is (1 - alpha) x the image (resized to the panel) + alpha x the map's
    colour: with no attention anywhere, the map is the colormap's lowest colour."""
    from matplotlib import colormaps

    from caption_attn.plot import CMAP
    image = _image(30, 50)
    fig = attention_figure(image, ["word"], np.zeros((1, 8, 8), np.float32), alpha=0.4)
    (panel,) = _panels(fig)
    got = np.asarray(panel.get_array())
    h, w = got.shape[:2]
    assert h / w == pytest.approx(30 / 50, abs=0.01)                   # the image's aspect
    resized = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    low = np.array(colormaps[CMAP](0.0, bytes=True)[:3], np.float32)
    want = np.rint(0.6 * resized + 0.4 * low)
    assert np.abs(got.astype(np.float32) - want).max() <= 1


def test_figure_title():
    fig = attention_figure(_image(), ["a"], _attention(1), title="a red circle")
    assert fig.get_suptitle() == "a red circle"
    assert attention_figure(_image(), ["a"], _attention(1)).get_suptitle() == ""


def test_dollar_signs_in_a_title_or_word_are_drawn_as_they_are():
    """A heatmap of `x$^$y.jpg` (its title holds the file name) crashed `caption
    --plot-attention` with matplotlib's mathtext ParseSyntaxException, and `cost $5 and
    $10.jpg` was drawn as TeX (the text between the $ in math italics, spaces gone)."""
    for title in ("x$^$y.jpg: a b", "a$\\frac$.jpg: a b", "cost $5 and $10.jpg: a b"):
        fig = attention_figure(_image(), ["$a$", "b"], _attention(2), title=title)
        figure_to_png(fig)
        assert not fig._suptitle.get_parse_math()
        assert _words(fig) == ["$a$", "b"]
        assert not any(t.get_parse_math() for t in fig.texts)


def test_figure_rejects_empty_words():
    with pytest.raises(ValueError, match=r"`words`.*\[\]"):
        attention_figure(_image(), [], _attention(2))


def test_figure_rejects_too_few_attention_rows():
    with pytest.raises(ValueError, match=r"`attention`.*\b3 words.*\(2, 64\)"):
        attention_figure(_image(), ["a", "b", "c"], _attention(2))


@pytest.mark.parametrize("shape", [(2, 63), (2, 8, 7), (64,)])
def test_figure_rejects_bad_attention_shape(shape):
    with pytest.raises(ValueError, match=r"`attention`.*shape"):
        attention_figure(_image(), ["a"], np.zeros(shape))


@pytest.mark.parametrize("shape", [(32, 32), (32, 32, 4), (32, 32, 1), (0, 32, 3)])
def test_figure_rejects_non_rgb_image(shape):
    with pytest.raises(ValueError, match=r"`image`.*" + re.escape(str(shape))):
        attention_figure(np.zeros(shape, np.uint8), ["a"], _attention(1))


def test_figure_rejects_a_float_image_and_alpha_outside_0_1():
    """Blended as 0..255 values: a float image in [0, 1] would be drawn black, an alpha of 1.5
    would wrap around in uint8."""
    with pytest.raises(ValueError, match=r"`image` must be uint8.*float32"):
        attention_figure(np.ones((8, 8, 3), np.float32), ["a"], _attention(1))
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\]; got 1.5"):
        attention_figure(_image(), ["a"], _attention(1), alpha=1.5)


def test_rendered_panels_show_the_image_upright_where_the_words_say():
    """In the PNG itself: each panel's top rows show the image's top (red), its bottom rows
    the bottom (blue), right under its word (alpha 0: the image alone)."""
    image = np.zeros((40, 60, 3), np.uint8)
    image[:20, :, 0] = 255                                             # top half red
    image[20:, :, 2] = 255                                             # bottom half blue
    fig = attention_figure(image, ["one", "two", "three"], _attention(3), alpha=0.0)
    png = cv2.imdecode(np.frombuffer(figure_to_png(fig), np.uint8), cv2.IMREAD_COLOR)
    rgb = png[:, :, ::-1]
    height = rgb.shape[0]
    for panel in _panels(fig):
        x0, y0, x1, y1 = _panel_box(fig, panel)                        # from the bottom
        top, bottom = height - y1, height - y0                         # rows in the PNG
        centre = (x0 + x1) // 2
        np.testing.assert_array_equal(rgb[top + 2, centre], [255, 0, 0])
        np.testing.assert_array_equal(rgb[bottom - 3, centre], [0, 0, 255])
        assert (rgb[top - 1, x0:x1] == 255).all()                      # white just above
        # the word's ink sits above the panel, within its width
        band = rgb[max(0, top - 25):top - 1, x0:x1]
        assert (band < 128).any()


@pytest.mark.parametrize("n, size", [(1, (48, 64)), (5, (299, 299)), (13, (80, 40))])
def test_fixed_layout_keeps_panels_apart_and_inside(n, size):
    fig = attention_figure(_image(*size), WORDS[:n] + ["x"] * max(0, n - len(WORDS)),
                           _attention(n), title="t")
    assert fig.get_layout_engine() is None  # computed once, not solved at every draw
    fig.canvas.draw()
    boxes = [_panel_box(fig, p) for p in _panels(fig)]                 # pixels
    colorbar = fig.axes[0].get_window_extent()
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        assert 0 <= x0 and x1 <= colorbar.x0 and 0 <= y0 and y1 <= fig.bbox.height
        assert not any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1
                       for b in boxes[i + 1:])
    assert colorbar.x1 < fig.bbox.width


@pytest.mark.parametrize("h, w", [(360, 640), (640, 360), (30, 600), (600, 30)])
def test_rendered_panels_keep_the_photo_proportions_within_todays_panel_size(h, w):
    """In the PNG: the panel (a solid green photo, alpha 0) has the photo's width/height
    within a pixel or two, its longest side that of a square panel (a tall photo made a
    panel as tall as its width allowed, a figure 10 panels high for a 1:20 strip), the
    colorbar still readable beside a thin strip, and the figure no taller than a square
    photo's."""
    green = np.zeros((h, w, 3), np.uint8)
    green[..., 1] = 255
    square = figure_to_png(attention_figure(_image(99, 99), ["word"], _attention(1), title="t"))
    fig = attention_figure(green, ["word"], _attention(1), title="t", alpha=0.0)
    png = cv2.imdecode(np.frombuffer(figure_to_png(fig), np.uint8), cv2.IMREAD_COLOR)  # BGR
    assert fig.axes[0].get_window_extent().height >= 120   # a colorbar its ticks fit on
    rows, cols = np.nonzero((png == [0, 255, 0]).all(axis=-1))
    ph, pw = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert len(rows) == ph * pw                                        # one solid rectangle
    side = attention_figure(_image(99, 99), ["w"], _attention(1)).images[0].get_size()[1]
    assert max(ph, pw) == side
    assert abs(ph - pw * h / w) <= 2 if w >= h else abs(pw - ph * w / h) <= 2  # short side
    square_h = cv2.imdecode(np.frombuffer(square, np.uint8), cv2.IMREAD_COLOR).shape[0]
    assert png.shape[0] <= square_h


def test_figure_is_garbage_collected_without_pyplot():
    ref = weakref.ref(attention_figure(_image(), WORDS[:2], _attention(2)))
    gc.collect()
    assert ref() is None


# --- PNG output ---------------------------------------------------------------------------


def test_figure_renders_identically_every_time():
    fig = attention_figure(_image(), WORDS[:5], _attention(5), title="t")
    assert figure_to_png(fig) == figure_to_png(fig)


def test_figure_to_png_decodes_to_the_figure_pixel_size():
    fig = attention_figure(_image(), WORDS[:5], _attention(5), title="t")
    data = figure_to_png(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None
    w, h = np.round(fig.get_size_inches() * fig.dpi).astype(int)
    assert decoded.shape == (h, w, 3)
    assert decoded.std() > 10  # something was drawn, not a blank canvas


def test_figure_to_png_is_lossless_with_its_fast_encoding():
    """The PNG's speed settings (run-length strategy, Paeth filter) change its bytes, never a
    pixel: decoded, it is the canvas the figure was drawn on. The strategy is in effect
    (OpenCV resets it when it reads the compression level after it)."""
    fig = attention_figure(_image(120, 160), WORDS[:7], _attention(7), title="t")
    png = figure_to_png(fig)
    decoded = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    drawn = cv2.cvtColor(np.asarray(fig.canvas.buffer_rgba()), cv2.COLOR_RGBA2BGR)
    np.testing.assert_array_equal(decoded, drawn)
    without_strategy = [cv2.IMWRITE_PNG_COMPRESSION, 1,
                        cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH]
    assert png != cv2.imencode(".png", drawn, without_strategy)[1].tobytes()


def _with_plain_figure_images(fig):
    """`fig` with each panel replaced by a plain `Figure.figimage` of the same pixels."""
    import matplotlib.image

    panels = list(_panels(fig))
    for panel in panels:
        fig.figimage(panel.get_array(), xo=panel.ox, yo=panel.oy, origin="upper")
        panel.remove()
    assert len(fig.images) == len(panels)
    assert all(type(p) is matplotlib.image.FigureImage for p in fig.images)
    return fig


def test_panels_are_drawn_as_matplotlib_draws_a_figure_image_without_resampling(monkeypatch):
    """At the figure's own dpi the panels skip matplotlib's float32 resampling and still give
    the canvas a plain `Figure.figimage` of the same pixels gives, to the byte."""
    import matplotlib.image

    fig = attention_figure(_image(120, 160), WORDS[:7], _attention(7), title="t")
    with monkeypatch.context() as m:
        def refused(*args, **kwargs):
            raise AssertionError("a panel was resampled")
        m.setattr(matplotlib.image._ImageBase, "_make_image", refused)
        fast = figure_to_png(fig)
    assert figure_to_png(_with_plain_figure_images(fig)) == fast


@pytest.mark.parametrize("fmt, dpi", [("png", 50), ("png", 200), ("svg", 100), ("pdf", 100)])
def test_a_heatmap_saved_another_way_is_what_plain_figure_images_give(fmt, dpi, monkeypatch):
    """`savefig` at another dpi or in a vector format (at 100 dpi matplotlib's own path draws
    the panels) gives the same bytes as with plain `Figure.figimage` panels."""
    import io

    import matplotlib

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")       # SVG's and PDF's dates, else the second

    def saved(fig):
        buffer = io.BytesIO()
        with matplotlib.rc_context({"svg.hashsalt": "fixed"}):    # SVG ids, else random
            fig.savefig(buffer, format=fmt, dpi=dpi)
        return buffer.getvalue()

    def figure():
        return attention_figure(_image(120, 160), WORDS[:3], _attention(3), title="t")

    ours = saved(figure())
    assert len(ours) > 1000 and saved(figure()) == ours                # reproducible
    assert saved(_with_plain_figure_images(figure())) == ours


def test_save_figure_writes_atomically_and_creates_parents(tmp_path):
    fig = attention_figure(_image(), WORDS[:2], _attention(2))
    path = tmp_path / "run" / "attention" / "epoch_001.png"
    save_figure(fig, path)
    assert path.read_bytes() == mark_heatmap(figure_to_png(fig))
    assert os.listdir(path.parent) == ["epoch_001.png"]  # no temp file left behind
    save_figure(fig, str(path))  # overwriting an existing file (str path) works too
    assert os.listdir(path.parent) == ["epoch_001.png"]


def test_saved_heatmaps_are_marked_and_still_decode(tmp_path):
    """`caption --plot-attention` redraws or removes only the files it drew: a heatmap saved
    carries a mark that an image from elsewhere (this PNG without it) has not."""
    fig = attention_figure(_image(), WORDS[:2], _attention(2))
    path = tmp_path / "x.png"
    save_figure(fig, path)
    assert is_heatmap_file(path)
    decoded = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    plain = cv2.imdecode(np.frombuffer(figure_to_png(fig), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decoded, plain)
    (tmp_path / "photo.png").write_bytes(figure_to_png(fig))
    os.symlink("x.png", tmp_path / "link.png")
    (tmp_path / "dir.png").mkdir()
    assert not any(is_heatmap_file(tmp_path / n) for n in ("photo.png", "link.png", "dir.png",
                                                           "missing.png"))


def test_save_figure_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    fig = attention_figure(_image(), ["a"], _attention(1))

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_words_the_font_cannot_draw_give_one_note_not_warnings(capsys):
    """A CJK vocabulary under DejaVu Sans: matplotlib warned once per character with a source
    line on every epoch's heatmaps; now one note names the characters, once per process."""
    import warnings

    from caption_attn import plot
    plot._missing_glyphs.discard("\u65e5")
    image = np.zeros((64, 64, 3), np.uint8)
    attention = np.full((2, 64), 1 / 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            figure_to_png(attention_figure(image, ["\u65e5", "cat"], attention))
    assert not [str(w.message) for w in caught]
    err = capsys.readouterr().err
    assert err.count("note: the heatmaps' font") == 1 and "\u65e5" in err
