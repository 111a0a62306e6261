"""In-graph decoding and resizing (caption_attn/graph_images.py) against images.py, the OpenCV
path of `extract-features` and `caption`. The figures quoted in the README come from here."""

import io
import itertools
import os
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from caption_attn import graph_images
from caption_attn.images import _jpeg_end as _images_jpeg_end
from caption_attn.images import ImageError, decode_image, resize_image
from image_samples import BAD, GOOD, png_chunk, png_file, scene

_decode = tf.function(graph_images.decode, input_signature=[tf.TensorSpec([], tf.string)])
_resize = tf.function(graph_images.resize, input_signature=[tf.TensorSpec([None, None, 3],
                                                                           tf.uint8)])


def _both(path):
    """(images.decode_image, graph_images.decode) of one file, as int arrays."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_image(data).astype(int), _decode(tf.constant(data)).numpy().astype(int)


def test_decode_equals_opencv_on_the_sample_images(images):
    for key in GOOD:
        ref, got = _both(os.path.join(images, key))
        if key == "cmyk.jpg":     # TensorFlow's own CMYK -> RGB rounds differently
            assert got.shape == ref.shape and np.abs(got - ref).max() <= 1
        else:
            np.testing.assert_array_equal(got, ref, err_msg=key)


def _exif(orientation: int, big_endian: bool) -> bytes:
    """An APP1 payload: TIFF header and IFD0 with a description, then the Orientation."""
    e = ">" if big_endian else "<"
    ifd = struct.pack(e + "H", 2) + struct.pack(e + "HHI", 0x010E, 2, 4) + b"abc\0" + \
        struct.pack(e + "HHIH", 0x0112, 3, 1, orientation) + b"\0\0" + struct.pack(e + "I", 0)
    return b"Exif\0\0" + (b"MM\0*" if big_endian else b"II*\0") + struct.pack(e + "I", 8) + ifd


@pytest.mark.parametrize("big_endian", [False, True])
def test_exif_orientation_is_applied_like_opencv(big_endian):
    image = Image.fromarray(scene(5, 64, 40))
    for orientation in range(1, 9):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", exif=_exif(orientation, big_endian), quality=95)
        data = buffer.getvalue()
        assert int(graph_images.exif_orientation(tf.constant(data))) == orientation
        got = _decode(tf.constant(data)).numpy()
        np.testing.assert_array_equal(got, decode_image(data), err_msg=str(orientation))


def _segment(marker: int, payload: bytes) -> bytes:
    """One JPEG marker segment: FF, marker, big-endian length (itself included), payload."""
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def test_exif_orientation_is_found_where_opencv_finds_it():
    """The graph searched the first 64 KB for the first bytes Exif\\0\\0: the orientation was
    lost behind a large ICC profile (APP2 chunks of up to 64 KB each) and taken from a comment
    holding those bytes. OpenCV reads the APP1 Exif segments before the image data, whatever
    precedes them, and takes the Orientation of the first one that has it."""
    jpeg = cv2.imencode(".jpg", scene(6, 64, 40))[1].tobytes()
    icc = b"".join(_segment(0xE2, b"ICC_PROFILE\0" + bytes([k, 3]) + b"\0" * 60000)
                   for k in (1, 2, 3))
    xmp = _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>")  # APP1, not Exif
    no_orientation = b"Exif\0\0II*\0" + struct.pack("<IH", 8, 0) + b"\0" * 4  # IFD0: 0 tags
    before = {"ICC profile": icc, "comment": _segment(0xFE, b"x " + _exif(3, False)),
              "APP2": _segment(0xE2, _exif(3, True)), "XMP APP1": xmp,
              "APP1 without orientation": _segment(0xE1, no_orientation),
              "ICC and comment": icc + _segment(0xFE, _exif(8, False))}
    for name, segments in before.items():
        data = jpeg[:2] + segments + _segment(0xE1, _exif(6, False)) + jpeg[2:]
        orientation = int(graph_images.exif_orientation(tf.constant(data)))
        assert orientation == 6, name
        expected = decode_image(data)
        assert expected.shape == (64, 40, 3), name                    # OpenCV rotated it
        np.testing.assert_array_equal(_decode(tf.constant(data)).numpy(), expected,
                                      err_msg=name)
    # A stray byte between segments (libjpeg skips it, OpenCV still reads the orientation)
    # stops the walk: the first bytes Exif\0\0 of the first 64 KB then tell, as they did
    app0 = 4 + jpeg[4] * 256 + jpeg[5]                                 # after OpenCV's JFIF
    data = jpeg[:app0] + b"\x00" + _segment(0xE1, _exif(6, False)) + jpeg[app0:]
    assert int(graph_images.exif_orientation(tf.constant(data))) == 6
    assert decode_image(data).shape == (64, 40, 3)
    np.testing.assert_array_equal(_decode(tf.constant(data)).numpy(), decode_image(data))
    # An Exif segment after the image (appended to the file) is not the image's: OpenCV does
    # not read it, the old search did
    data = jpeg + _segment(0xE1, _exif(6, False))
    orientation = int(graph_images.exif_orientation(tf.constant(data)))
    assert orientation == 1
    np.testing.assert_array_equal(_decode(tf.constant(data)).numpy(), decode_image(data))


def _write_more(folder):
    """Files of the kinds images.py handles specially: 16-bit, alpha, palettes, WebP."""
    rgb = scene(3, 120, 90)                                                     # (90, 120, 3)
    ramp = np.linspace(0, 1, 120)[None, :].repeat(90, 0)                        # (90, 120)
    deep = rgb.astype(np.uint16) * 257 + np.random.default_rng(0).integers(0, 257, rgb.shape,
                                                                           dtype=np.uint16)
    cv2.imwrite(f"{folder}/rgb16.png", deep[..., ::-1])
    cv2.imwrite(f"{folder}/rgba16.png", np.dstack([deep[..., ::-1],
                                                     (ramp * 65535).astype(np.uint16)]))
    cv2.imwrite(f"{folder}/gray16.png", deep[..., 0])
    Image.fromarray(np.dstack([rgb[..., 0], (ramp * 255).astype(np.uint8)]), "LA") \
        .save(f"{folder}/gray_alpha.png")
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.save(f"{folder}/palette_transparent.png", transparency=0)
    palette.save(f"{folder}/transparent.gif", transparency=0)
    cv2.imwrite(f"{folder}/alpha.bmp", np.dstack([rgb[..., ::-1], np.full((90, 120), 9,
                                                                          np.uint8)]))
    Image.fromarray(rgb).convert("L").save(f"{folder}/gray.bmp")
    palette.save(f"{folder}/palette16.bmp")                    # 8-bit indices into 16 colours
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=256).save(
        f"{folder}/palette256.bmp")
    Image.fromarray(rgb).save(f"{folder}/lossless.webp", lossless=True)
    Image.fromarray(rgb).save(f"{folder}/progressive.jpg", progressive=True, quality=90)


def test_decode_equals_opencv_on_deep_alpha_and_palette_images(tmp_path):
    _write_more(tmp_path)
    for name in ("rgb16.png", "rgba16.png", "gray16.png", "gray_alpha.png", "alpha.bmp",
                 "palette_transparent.png", "gray.bmp", "palette16.bmp", "palette256.bmp",
                 "lossless.webp", "progressive.jpg"):
        ref, got = _both(str(tmp_path / name))
        np.testing.assert_array_equal(got, ref, err_msg=name)
    # The documented difference: transparent GIF pixels are black in TensorFlow's decoder,
    # composited over white by images.py; every other pixel is the same.
    ref, got = _both(str(tmp_path / "transparent.gif"))
    differ = np.any(got != ref, axis=-1)
    assert differ.any() and (got[differ] == 0).all() and (ref[differ] == 255).all()


def test_a_gray_png_with_a_transparent_gray_is_composited_over_white_like_opencv():
    """TensorFlow's PNG decoder, like OpenCV's, ignores the tRNS chunk of a grayscale PNG: the
    SavedModel saw the transparent gray as stored (black here) where images.py makes it
    white. A tRNS in a text chunk is no transparency."""
    u16 = struct.Struct(">H").pack
    for data in (png_file(2, 1, 8, 0, bytes([0, 200]), png_chunk(b"tRNS", u16(0))),
                 png_file(2, 1, 16, 0, u16(0) + u16(60000), png_chunk(b"tRNS", u16(0))),
                 png_file(2, 1, 2, 0, bytes([0b01100000]), png_chunk(b"tRNS", u16(1))),
                 png_file(2, 1, 8, 0, bytes([0, 200]), png_chunk(b"tEXt", b"c\x00tRNS\x00\x00"))):
        got = _decode(tf.constant(data)).numpy()
        np.testing.assert_array_equal(got, decode_image(data))
        assert (got[0, 0] == 255).all() != data.count(b"tEXt")  # transparent -> white


def test_a_paletted_bmp_is_looked_up_in_its_colour_table_like_opencv(tmp_path):
    """TensorFlow's BMP decoder gives an 8-bit paletted BMP's indices as gray levels (the
    palette BMPs of test_decode_equals_opencv...); an index past the file's colour count is
    black in OpenCV's zero-filled table, and a table of more than 256 colours is refused."""
    from caption_attn.images import ImageError
    _write_more(tmp_path)
    data = bytearray((tmp_path / "palette16.bmp").read_bytes())
    data[46:50] = (2).to_bytes(4, "little")                     # 2 colours, indices up to 15
    got = _decode(tf.constant(bytes(data))).numpy()
    np.testing.assert_array_equal(got, decode_image(bytes(data)))
    assert (got == 0).all(axis=-1).any()
    data[46:50] = (300).to_bytes(4, "little")
    with pytest.raises(ImageError):
        decode_image(bytes(data))
    with pytest.raises(tf.errors.InvalidArgumentError):
        _decode(tf.constant(bytes(data)))


def test_an_rgb_png_with_a_transparent_colour_is_composited_over_white_like_opencv():
    """OpenCV turns an RGB PNG's tRNS colour into alpha; TensorFlow's decoder ignored it, so
    the SavedModel saw that colour as stored where `caption` saw white."""
    u16 = struct.Struct(">H").pack
    key8, key16 = png_chunk(b"tRNS", u16(10) + u16(20) + u16(30)), png_chunk(
        b"tRNS", u16(1000) + u16(2000) + u16(3000))
    for data, clear in ((png_file(2, 1, 8, 2, bytes([10, 20, 30, 10, 20, 31]), key8), True),
                        (png_file(2, 1, 16, 2, u16(1000) + u16(2000) + u16(3000) + u16(1000)
                                  + u16(2000) + u16(3001), key16), True),
                        (png_file(2, 1, 8, 2, bytes([10, 20, 30, 10, 20, 31]),
                                  png_chunk(b"tEXt", b"c\x00" + key8)), False)):
        got = _decode(tf.constant(data)).numpy()
        np.testing.assert_array_equal(got, decode_image(data))
        assert (got[0, 0] == 255).all() == clear and not (got[0, 1] == 255).all()


@pytest.mark.parametrize("key", sorted(k for k in BAD if k != "missing.jpg"))
def test_decode_refuses_what_images_py_refuses(images, key):
    with open(os.path.join(images, key), "rb") as f:
        data = f.read()
    with pytest.raises(tf.errors.InvalidArgumentError):
        _decode(tf.constant(data))


def test_decode_refuses_a_jpeg_without_end_marker_and_tiff(tmp_path):
    ok, buf = cv2.imencode(".jpg", scene(2))
    data = buf.tobytes()
    assert data.endswith(b"\xff\xd9")
    with pytest.raises(tf.errors.InvalidArgumentError):
        _decode(tf.constant(data[:-2]))           # every scan complete, no EOI: truncated
    Image.fromarray(scene(2)).save(tmp_path / "x.tif")
    with pytest.raises(tf.errors.InvalidArgumentError):
        _decode(tf.constant((tmp_path / "x.tif").read_bytes()))   # no TensorFlow decoder


_jpeg_end = tf.function(lambda data: graph_images.jpeg_end(tf.io.decode_raw(data, tf.uint8)),
                        input_signature=[tf.TensorSpec([], tf.string)])


def _python_jpeg_end(data: bytes) -> int:
    end = _images_jpeg_end(data)
    return -2 if end is None else end


def test_a_jpeg_with_data_after_its_end_is_decoded_as_caption_does():
    """The SavedModel refused a motion photo (a JPEG with an MP4 appended) whenever the MP4
    held the bytes FF DA after its last FF D9, which `caption` took: `images.py` walks the
    JPEG's segments to the end of its first image, and so does the graph now."""
    data = cv2.imencode(".jpg", scene(1))[1].tobytes()
    progressive = io.BytesIO()
    Image.fromarray(scene(2)).save(progressive, "JPEG", progressive=True)
    exif_image = io.BytesIO()
    exif = Image.new("RGB", (40, 30))
    exif.save(exif_image, "JPEG", exif=exif.getexif().tobytes())
    for image in (data, progressive.getvalue(), exif_image.getvalue()):
        for trailer in (b"ftypmp42\xff\xda\x00\x10junk", b"\xff\xd8\xff\xdb\x00\x43", b"\xff\xda"):
            got = _decode(tf.constant(image + trailer)).numpy()
            np.testing.assert_array_equal(got, decode_image(image + trailer))
    p = progressive.getvalue()
    for cut in (len(data) // 2, len(data) - 2):
        with pytest.raises(tf.errors.InvalidArgumentError, match="truncated"):
            _decode(tf.constant(data[:cut] + b"\x00\xff\xda"))   # cut inside a scan
    for cut in (len(p) // 3, len(p) * 2 // 3, len(p) - 2):
        with pytest.raises(tf.errors.InvalidArgumentError, match="truncated"):
            _decode(tf.constant(p[:cut]))


def test_jpeg_end_gives_up_after_its_step_cap_where_the_old_rule_takes_over():
    """More fill bytes than JPEG_WALK_STEPS: the walk stops (-2) and the old rule decides."""
    data = cv2.imencode(".jpg", scene(1))[1].tobytes()
    fill = b"\xff" * (graph_images.JPEG_WALK_STEPS + 2)
    padded = data[:2] + fill + data[2:]
    assert _python_jpeg_end(padded) == len(padded)
    assert int(_jpeg_end(tf.constant(padded))) == -2
    np.testing.assert_array_equal(_decode(tf.constant(padded)).numpy(), decode_image(padded))


def test_jpeg_end_equals_images_py_on_mutated_jpegs():
    """Ends, cuts (-1) and lost structure (-2) where images._jpeg_end finds them, on real
    JPEGs (baseline with restart markers, progressive) cut, extended and with bytes changed."""
    rng = np.random.default_rng(0)
    restart = cv2.imencode(".jpg", scene(3), [cv2.IMWRITE_JPEG_RST_INTERVAL, 4])[1].tobytes()
    progressive = io.BytesIO()
    Image.fromarray(scene(4, 64, 48)).save(progressive, "JPEG", progressive=True)
    seen = set()
    for base in (restart, progressive.getvalue()):
        assert b"\xff\xd0" in base or base is not restart
        for _ in range(60):
            data = bytearray(base)
            kind = rng.integers(4)
            if kind == 0:
                data = data[:rng.integers(2, len(data))]
            elif kind == 1:
                data += rng.integers(0, 256, rng.integers(1, 40)).astype(np.uint8).tobytes()
            elif kind == 2:
                for pos in rng.integers(2, len(data), rng.integers(1, 4)):
                    data[pos] = rng.choice([0x00, 0xFF, 0xD9, 0xDA, 0xD3, rng.integers(256)])
            else:
                pos = rng.integers(2, len(data))
                data[pos:pos] = bytes([0xFF, rng.choice([0xFF, 0x00, 0xD9, 0xDA, 0x01])])
            data = bytes(data)
            expected = _python_jpeg_end(data)
            assert int(_jpeg_end(tf.constant(data))) == expected
            seen.add(expected)
    assert {-1, -2} <= seen and any(end > 0 for end in seen)


@pytest.mark.parametrize("width, height", [(640, 480), (320, 240), (200, 150), (400, 200),
                                           (150, 500), (598, 897), (300, 300), (50, 37),
                                           (299, 299), (1200, 299)])
def test_resize_matches_opencv_within_one_level(width, height):
    rgb = scene(width * height % 97, width, height)
    ref = resize_image(rgb).astype(int)
    got = _resize(tf.constant(rgb)).numpy().astype(int)
    assert got.shape == (299, 299, 3)
    assert np.abs(got - ref).max() <= 1
    # rounding of a float sum at .5 differs on a few pixels; integer factors and enlarging
    # are exact (OpenCV's integer-factor path and its cubic weights are reproduced)
    assert np.mean(got != ref) <= 0.004
    if (width % 299, height % 299) == (0, 0) or (width <= 299 and height <= 299):
        assert np.mean(got != ref) <= 1e-4


def _gif_on_canvas(frame, canvas, at, background=3, transparent=None, comment=False,
                   local_table=False) -> bytes:
    """A GIF whose first (and only) frame `frame` (h, w, 3) lies at `at` (left, top) of a
    logical screen `canvas` (width, height): Pillow's GIF of the frame, its header patched.
    `comment` puts a comment extension before the image; `local_table` moves the colour table
    into the image descriptor (no global one: OpenCV's canvas is then black)."""
    image = Image.fromarray(frame).convert("P", palette=Image.ADAPTIVE, colors=16)
    buffer = io.BytesIO()
    image.save(buffer, "GIF", **({} if transparent is None else {"transparency": transparent}))
    data = bytearray(buffer.getvalue())
    table = 3 * 2 ** ((data[10] & 7) + 1)
    assert data[10] & 0x80
    i = 13 + table
    while data[i] == 0x21:                                          # extension blocks
        i += 2
        while data[i]:
            i += data[i] + 1
        i += 1
    assert data[i] == 0x2C
    data[6:10] = struct.pack("<HH", *canvas)
    data[11] = background
    data[i + 1:i + 5] = struct.pack("<HH", *at)
    if comment:
        note = b"\x21\xfe" + bytes([9]) + b"a comment" + bytes([250]) + b"x" * 250 + b"\0"
        data[i:i] = note
        i += len(note)
    if local_table:
        colours = data[13:13 + table]
        data[i + 9] |= 0x80 | (data[10] & 7)                         # its own table follows
        data[i + 10:i + 10] = colours
        data[10] &= 0x7F
        del data[13:13 + table]
    return bytes(data)


@pytest.mark.parametrize("case", [
    dict(canvas=(299, 299), at=(100, 100)),                          # the red-team image
    dict(canvas=(64, 48), at=(0, 0)), dict(canvas=(64, 48), at=(24, 8)),  # corner, far edge
    dict(canvas=(299, 299), at=(5, 200), comment=True),
    dict(canvas=(80, 70), at=(3, 4), local_table=True)])            # no global table: black
def test_a_gif_frame_smaller_than_its_screen_is_placed_on_it_like_opencv(case):
    """OpenCV draws the first frame at its offset on a canvas of the GIF's logical screen, in
    the background colour; TensorFlow's decoder gave only the frame's own size (and drew a
    frame at an offset beyond it as black), so the SavedModel captioned another picture."""
    h, w = (99, 99) if case["canvas"] == (299, 299) else (40, 40)
    data = _gif_on_canvas(scene(7, w, h), **case)
    ref = decode_image(data)
    assert ref.shape == (case["canvas"][1], case["canvas"][0], 3)
    np.testing.assert_array_equal(_decode(tf.constant(data)).numpy(), ref)


def test_a_transparent_gif_frame_smaller_than_its_screen_has_white_around_it():
    """images.py composites a transparent GIF over white, the canvas outside the frame too;
    inside the frame TensorFlow's transparent pixels stay black (the documented difference)."""
    data = _gif_on_canvas(scene(8, 40, 30), (90, 60), (20, 10), transparent=0)
    ref, got = decode_image(data).astype(int), _decode(tf.constant(data)).numpy().astype(int)
    assert got.shape == ref.shape == (60, 90, 3)
    differ = np.any(got != ref, axis=-1)
    assert not differ[:10].any() and not differ[:, :20].any() and (ref[:10] == 255).all()
    assert (got[differ] == 0).all() and (ref[differ] == 255).all()


@pytest.mark.parametrize("case", [dict(canvas=(60, 60), at=(30, 0), why="outside"),
                                  dict(canvas=(60, 60), at=(0, 0), background=200,
                                       why="background colour index")])
def test_a_gif_opencv_refuses_is_refused(case):
    """A frame beyond its screen, a background index past the colour table: OpenCV refuses
    them (`caption` reports the image); so does the SavedModel, not a frame drawn elsewhere."""
    why = case.pop("why")
    data = _gif_on_canvas(scene(9, 40, 40), **case)
    with pytest.raises(ImageError):
        decode_image(data)
    with pytest.raises(tf.errors.InvalidArgumentError, match=why):
        _decode(tf.constant(data))


def _webp(frames, **options) -> bytes:
    """Pillow's WebP of `frames` (arrays, RGB or RGBA): an animation when there are several."""
    buffer = io.BytesIO()
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(buffer, "WEBP", save_all=True, append_images=images[1:], duration=100,
                   **options)
    return buffer.getvalue()


def _riff_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + b"\0" * (len(body) % 2)


def _webp_animation(canvas, frames, alpha_flag=False) -> bytes:
    """An animated WebP written by hand (Pillow's first frame always fills its canvas): on a
    canvas (width, height), frames [(rgb, left, top)] (even offsets), each Pillow's lossless
    still WebP in an ANMF chunk; VP8X flags: animation, and alpha if `alpha_flag`."""
    def u24(value):
        return struct.pack("<I", value)[:3]
    anmf = b""
    for rgb, left, top in frames:
        still = _webp([rgb], lossless=True)
        assert still[12:16] == b"VP8L"                                # RIFF, size, WEBP, VP8L
        anmf += _riff_chunk(b"ANMF", u24(left // 2) + u24(top // 2) + u24(rgb.shape[1] - 1)
                            + u24(rgb.shape[0] - 1) + u24(100) + b"\0" + still[12:])
    flags = 0x02 | (0x10 if alpha_flag else 0)                       # the container spec's
    body = (b"WEBP" + _riff_chunk(b"VP8X", bytes([flags, 0, 0, 0]) + u24(canvas[0] - 1)
                                  + u24(canvas[1] - 1))
            + _riff_chunk(b"ANIM", b"\xff" * 4 + b"\0\0") + anmf)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _webp_samples():
    """name -> bytes: animated WebPs without alpha (those TensorFlow's decoder crashed on),
    with alpha, and still ones."""
    frames = [scene(seed, 48, 36) for seed in range(3)]
    rgba = [np.dstack([f, np.full((36, 48), 100 + 50 * k, np.uint8)]) for k, f in enumerate(frames)]
    small_first = [(scene(5, 30, 20), 10, 6), (frames[1], 0, 0)]
    return {"animation lossless": _webp(frames, lossless=True),
            "animation lossy": _webp(frames, quality=80),
            "animation, first frame smaller than the canvas": _webp_animation((48, 36),
                                                                             small_first),
            "animation with alpha": _webp(rgba, lossless=True),
            "animation with alpha, lossy": _webp(rgba, quality=80),
            "animation with alpha, first frame smaller": _webp_animation((48, 36), small_first,
                                                                         alpha_flag=True),
            "still lossless": _webp(frames[:1], lossless=True),
            "still lossy": _webp(frames[:1], quality=80),
            "still with alpha": _webp(rgba[:1], quality=80)}


def test_animated_webps_without_alpha_are_found_from_their_vp8x_flags():
    """What TensorFlow's WebP decoder crashed on (libwebp's has_animation without has_alpha):
    the first chunk VP8X (bytes 12-15), its flags byte 20 with 0x02 and without 0x10. Checked
    on the files Pillow (libwebp's own muxer) writes; no decoder runs here."""
    samples = _webp_samples()
    for name, data in samples.items():
        opaque = bool(graph_images.webp_opaque_animation(tf.constant(data)))
        assert opaque == (name.startswith("animation") and "alpha" not in name), name
        if name.startswith("animation"):
            assert data[12:16] == b"VP8X" and data[20] & 0x02, name
            assert bool(data[20] & 0x10) == ("alpha" in name), name
    for cut in (0, 12, 16, 20, 21):             # up to the flags byte: no animation, no error
        assert bool(graph_images.webp_opaque_animation(
            tf.constant(samples["animation lossless"][:cut]))) == (cut == 21)
    # with alpha, the canvas outside a smaller first frame is transparent: white, as caption
    data = samples["animation with alpha, first frame smaller"]
    got, ref = _decode(tf.constant(data)).numpy(), decode_image(data)
    np.testing.assert_array_equal(got, ref)
    assert (ref[:6] == 255).all()


_DECODE_IN_A_CHILD = """
import sys
import numpy as np
import tensorflow as tf
from caption_attn import graph_images
decode = tf.function(graph_images.decode, input_signature=[tf.TensorSpec([], tf.string)])
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        data = f.read()
    try:
        np.save(path + ".npy", decode(tf.constant(data)).numpy())
    except tf.errors.InvalidArgumentError:
        pass                                    # refused: no .npy
    print(path, flush=True)
"""


@pytest.mark.slow
def test_an_animated_webp_without_alpha_decodes_like_opencv_in_a_process_that_survives(
        tmp_path):
    """TensorFlow's decode_webp gave an animation without the alpha flag RGBA frames in an
    output sized for RGB: "malloc(): corrupted top size", SIGABRT, and the serving process
    died with the good images of the batch. Decoded in a child process (a crash there fails
    this test, not the test run): the first frame, the same pixels as `caption`'s OpenCV
    (black outside a first frame smaller than the canvas: OpenCV drops the alpha)."""
    samples = {name: data for name, data in _webp_samples().items()
               if name.startswith("animation") and "alpha" not in name}
    samples["animation cut"] = samples["animation lossy"][:300]
    paths = []
    for k, data in enumerate(samples.values()):
        paths.append(str(tmp_path / f"{k}.webp"))
        with open(paths[-1], "wb") as f:
            f.write(data)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.run([sys.executable, "-c", _DECODE_IN_A_CHILD, *paths], text=True,
                           capture_output=True, timeout=300,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": root})
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    for path, (name, data) in zip(paths, samples.items()):
        if name == "animation cut":                                  # refused by both
            with pytest.raises(ImageError):
                decode_image(data)
            assert not os.path.exists(path + ".npy")
            continue
        assert os.path.exists(path + ".npy"), f"{name}: refused, OpenCV decodes it"
        ref = decode_image(data)
        np.testing.assert_array_equal(np.load(path + ".npy"), ref, err_msg=name)
        if "smaller" in name:
            assert (ref[:6] == 0).all()


def _apng(width: int, height: int, depth: int, colour: int, frames, hidden=None, count=None,
          first=(), actl=b"") -> bytes:
    """An APNG written by hand (Pillow writes neither 16-bit RGB APNGs nor broken ones).
    `frames`: each its packed pixel rows (bytes); `hidden`: an IDAT image that is no frame
    (no fcTL before it), else frame 0 is the IDAT image; `count`: the frames acTL declares
    (len(frames)); `first`: frame 0's fcTL fields (width, height, x, y, dispose, blend), by
    default the whole image; `actl`: bytes added to the acTL chunk."""
    def idat(pixels):
        stride = len(pixels) // height
        return zlib.compress(b"".join(b"\0" + pixels[y * stride:(y + 1) * stride]
                                      for y in range(height)))
    sequence = itertools.count()

    def fctl(w, h, x=0, y=0, dispose=0, blend=0):
        return png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", next(sequence), w, h, x, y, 1, 10,
                                              dispose, blend))
    chunks = [png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)),
              png_chunk(b"acTL", struct.pack(">II", len(frames) if count is None else count, 0)
                        + actl)]
    if hidden is not None:
        chunks.append(png_chunk(b"IDAT", idat(hidden)))
    for k, pixels in enumerate(frames):
        chunks.append(fctl(*(first or (width, height))) if k == 0 else fctl(width, height))
        chunks.append(png_chunk(b"IDAT", idat(pixels)) if k == 0 and hidden is None else
                      png_chunk(b"fdAT", struct.pack(">I", next(sequence)) + idat(pixels)))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + png_chunk(b"IEND", b"")


def _png_frames(*seeds):
    """Pillow images of scenes (40x30), and their pixels as OpenCV decodes a PNG of each."""
    images = [Image.fromarray(scene(seed, 40, 30)) for seed in seeds]
    return images, [scene(seed, 40, 30) for seed in seeds]


def test_an_apng_whose_idat_image_is_no_frame_is_refused_where_opencv_shows_another():
    """An APNG whose default (IDAT) image is not part of the animation: IHDR acTL IDAT fcTL
    fdAT fcTL fdAT IEND (Pillow's default_image=True). TensorFlow decoded the IDAT image A,
    OpenCV (extraction, training, `caption`) shows the first animation frame B: the export
    captioned another picture, silently. Now refused ("" and -inf), like a TIFF. With one
    animation frame OpenCV shows A too, and an APNG whose frame 0 is its IDAT image (fcTL
    before IDAT) is A for both: those decode as before."""
    (a, b, c), (pixels_a, pixels_b, _) = _png_frames(1, 2, 3)

    def apng(frames, **options):
        buffer = io.BytesIO()
        frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=100,
                       **options)
        return buffer.getvalue()
    hidden = apng([a, b, c], default_image=True)
    idat, actl, fctl = hidden.find(b"IDAT"), hidden.find(b"acTL"), hidden.find(b"fcTL")
    assert actl < idat < fctl                          # acTL, the hidden IDAT, then frames
    np.testing.assert_array_equal(decode_image(hidden), pixels_b)   # OpenCV: frame B
    with pytest.raises(tf.errors.InvalidArgumentError, match="not its whole IDAT image"):
        _decode(tf.constant(hidden))
    for data in (apng([a, b], default_image=True), apng([a, b, c]), apng([a, b])):
        np.testing.assert_array_equal(decode_image(data), pixels_a)
        np.testing.assert_array_equal(_decode(tf.constant(data)).numpy(), pixels_a)


@pytest.mark.parametrize("case, opencv", [
    pytest.param(dict(count=0), "refuses", id="acTL of no frames"),
    pytest.param(dict(first=(40, 30, 1, 0)), "refuses", id="frame 0 beyond the image"),
    pytest.param(dict(first=(40, 30, 0, 0, 3, 0)), "refuses", id="unknown dispose op"),
    pytest.param(dict(first=(40, 30, 0, 0, 0, 2)), "refuses", id="unknown blend op"),
    pytest.param(dict(actl=b"\0"), "refuses", id="acTL of 9 bytes"),
    pytest.param(dict(first=(20, 15, 5, 5)), "crops", id="frame 0 a part of the image"),
    pytest.param(dict(first=(20, 15, 5, 5), count=1), "decodes", id="a part, one frame"),
    pytest.param(dict(first=(40, 30, 0, 0, 2, 1)), "decodes", id="other valid ops"),
    pytest.param(dict(hidden=scene(9, 40, 30).tobytes(), count=1), "decodes",
                 id="hidden IDAT image, one frame")])
def test_the_apng_chunks_before_idat_are_read_as_opencv_reads_them(case, opencv):
    """OpenCV reads the acTL and fcTL chunks before IDAT: it refuses 0 frames, a first frame
    outside the image, unknown ops and chunks of other sizes, and draws a first frame that is
    a part of the image on black (two or more frames). The graph refuses all of these and
    decodes the others like OpenCV."""
    frames = [scene(seed, 40, 30).tobytes() for seed in (1, 2, 3)]
    data = _apng(40, 30, 8, 2, frames, **case)
    if opencv == "refuses":
        with pytest.raises(ImageError):
            decode_image(data)
    else:
        ref = decode_image(data)
        assert (opencv == "crops") == (ref[:5] == 0).all()
    if opencv == "decodes":
        np.testing.assert_array_equal(_decode(tf.constant(data)).numpy(), ref)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="APNG"):
            _decode(tf.constant(data))


def test_a_16_bit_apng_is_scaled_to_8_bits_as_opencv_reads_an_animation():
    """OpenCV reads an APNG of two or more frames frame by frame and scales 16-bit samples
    without alpha by 1/255 (convertTo), not to their top 8 bits as a still PNG: up to 2 levels
    apart. With alpha (composited over white) and as a still PNG the top 8 bits stay."""
    rng = np.random.default_rng(0)
    deep = [rng.integers(0, 65536, (30, 40, 4), dtype=np.uint16).astype(">u2") for _ in range(2)]
    deep[0][:2, :2, :3] = [[[65535, 32767, 128]]]          # (v + 127) // 255: 255, 129, 1
    for colour, channels in ((2, 3), (0, 1), (6, 4)):
        frames = [d[..., :channels].tobytes() for d in deep]
        data = _apng(40, 30, 16, colour, frames)
        ref = decode_image(data)
        np.testing.assert_array_equal(_decode(tf.constant(data)).numpy(), ref,
                                      err_msg=str(colour))
        if colour != 6:
            top = np.asarray(deep[0][..., :channels], np.uint16) >> 8
            assert (ref[..., :channels] != top).any()          # not the still PNG's rule
            still = png_file(40, 30, 16, colour, frames[0])
            np.testing.assert_array_equal(_decode(tf.constant(still)).numpy(),
                                          decode_image(still))
