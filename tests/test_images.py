"""Tests of image decoding and resizing (caption_attn/images.py).

Images are rendered by tests/image_samples.py (OpenCV, and Pillow for CMYK/EXIF/GIF fixtures)
into the session's `images` folder (conftest.py).
"""

import io
import json
import os
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from caption_attn.errors import UserError
from caption_attn.images import (ImageError, _composite_alpha, _may_have_alpha, decode_image,
                                 heatmaps_note, is_heatmap_file, left_out_note, list_images,
                                 load_image, mark_heatmap, resize_image)
from image_samples import (BAD, BLUE, GOOD, GREEN, RED, png_chunk, png_file, run_as_user,
                           scene)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_image_formats(images):
    for key in GOOD:
        img = load_image(os.path.join(images, key))
        assert img.shape == (299, 299, 3) and img.dtype == np.uint8, key

    gray = load_image(os.path.join(images, "gray.jpg")).astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 1
    assert np.abs(gray[..., 0] - gray[..., 2]).max() <= 1

    rgba = load_image(os.path.join(images, "rgba.png"))
    assert (rgba[150, 20] == 255).all()                      # transparent -> white
    assert tuple(rgba[150, 280]) == GREEN                    # opaque keeps its colour

    cmyk = load_image(os.path.join(images, "cmyk.jpg")).astype(int)
    assert np.abs(cmyk[30, 150] - RED).max() < 30            # top band stays red
    assert np.abs(cmyk[270, 150] - BLUE).max() < 30

    gif = load_image(os.path.join(images, "anim.gif"))
    assert tuple(gif[150, 150]) == RED                       # first frame

    bmp = load_image(os.path.join(images, "bitmap.bmp"))
    np.testing.assert_array_equal(bmp, resize_image(scene(7, 100, 80)))


def test_exif_orientation_is_applied(images):
    raw = cv2.imread(os.path.join(images, "exif6.jpg"),
                     cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    assert raw.shape == (60, 40, 3)                          # stored portrait, red on top
    with open(os.path.join(images, "exif6.jpg"), "rb") as f:
        decoded = decode_image(f.read())
    assert decoded.shape == (40, 60, 3)                      # displayed landscape
    # rotated 90 degrees clockwise: the red top band is now the right third
    assert np.abs(decoded[20, 55].astype(int) - RED).max() < 30
    assert np.abs(decoded[20, 5].astype(int) - BLUE).max() < 30


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_images_raise_with_reason(images, key):
    with pytest.raises(ImageError) as e:
        load_image(os.path.join(images, key))
    assert str(e.value) == BAD[key]


def test_truncated_jpeg_is_detected_even_if_decodable():
    """Some libjpeg builds decode a cut JPEG with a gray bottom; the EOI check catches it."""
    ok, buf = cv2.imencode(".jpg", scene(1))
    data = buf.tobytes()
    assert data.endswith(b"\xff\xd9")
    assert decode_image(data).shape == (240, 320, 3)
    with pytest.raises(ImageError, match="truncated"):
        decode_image(data[:-2])                           # only the EOI marker missing
    with pytest.raises(ImageError, match="truncated"):
        decode_image(cv2.imencode(".png", scene(1))[1].tobytes()[:-12])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height gray pixels (its pixel data is one empty block)."""
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))


def test_an_image_too_large_for_opencv_says_so():
    """The reason was OpenCV's assertion line ("cannot decode (OpenCV(5.0.0) /io/opencv/...
    loadsave.cpp:79: error: (-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS in
    function 'validateInputImageSize')") in failed.tsv and caption's message."""
    with pytest.raises(ImageError) as e:
        decode_image(_png_header_only(40000, 40000))
    assert str(e.value) == ("too large: more than 1073741824 pixels, OpenCV's limit "
                            "(CV_IO_MAX_IMAGE_PIXELS)")


def test_resize_stretches_with_area_or_cubic():
    big = scene(2, 640, 480)
    np.testing.assert_array_equal(resize_image(big),
                                  cv2.resize(big, (299, 299), interpolation=cv2.INTER_AREA))
    small = scene(2, 100, 50)
    np.testing.assert_array_equal(resize_image(small),
                                  cv2.resize(small, (299, 299), interpolation=cv2.INTER_CUBIC))
    for h, w in [(1000, 100), (100, 1000), (299, 299), (1, 1)]:
        flat = np.full((h, w, 3), 77, np.uint8)
        out = resize_image(flat)
        assert out.shape == (299, 299, 3) and (out == 77).all()


def test_list_images_keys(images):
    keys = list_images(images)
    assert keys == sorted(GOOD + [k for k in BAD if k != "missing.jpg"])
    assert "sub/deeper/d.jpg" in keys                       # POSIX separators, subfolders
    with pytest.raises(UserError, match="--images"):
        list_images(os.path.join(images, "nope"))


def test_list_images_takes_jfif_and_reports_the_files_it_leaves_out(tmp_path):
    """Real JPEGs saved as .jfif (Windows' name for a downloaded JPEG) or .pjpeg, and a
    phone's .heic, were skipped by every folder walk without a word. JPEG's other names are
    images now; the files left out for their extension are handed back (hidden ones aside)
    and said in one line with a count and two of them."""
    jpeg = cv2.imencode(".jpg", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()
    for name in ("a.jfif", "sub/b.PJPEG", "c.pjp", "d.jpe"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(jpeg)
    for name in ("e.heic", "sub/notes.txt", "f.xyz", ".hidden.heic"):
        (tmp_path / name).write_bytes(b"x")
    left_out: list = []
    assert list_images(str(tmp_path), left_out=left_out) == ["a.jfif", "c.pjp", "d.jpe",
                                                              "sub/b.PJPEG"]
    assert left_out == ["e.heic", "f.xyz", "sub/notes.txt"]
    assert load_image(str(tmp_path / "a.jfif")).shape == (299, 299, 3)
    assert left_out_note(left_out, "under --images X") == (
        "left out 3 file(s) under --images X whose extension is not an image's (e.heic, "
        "f.xyz, ...); images are taken by extension: .jpg .jpeg .jpe .jfif .pjpeg .pjp .png "
        ".bmp .dib .gif .webp .tif .tiff (any case)")
    assert left_out_note([], "anywhere") == ""


def test_list_images_leaves_out_the_heatmaps_caption_drew(tmp_path):
    """`caption --plot-attention photos/heat`, then `extract-features --images photos`: the
    heatmaps were extracted as images of the dataset without a word. Every walk leaves out
    the PNGs that carry caption-attn's heatmap mark (through a link too) and hands them back
    to be counted in a note; other PNGs, a FIFO named .png (not waited on), and a heatmap
    renamed .jpg (only .png names are read) are still images."""
    png = cv2.imencode(".png", np.full((8, 8, 3), 90, np.uint8))[1].tobytes()
    (tmp_path / "heat").mkdir()
    for name in ("a.png", "heat/x.png", "heat/y.PNG", "renamed.jpg"):
        (tmp_path / name).write_bytes(mark_heatmap(png))
    (tmp_path / "photo.png").write_bytes(png)
    (tmp_path / "heat" / "b.png").write_bytes(png)           # a photo put among them
    os.symlink("heat/x.png", tmp_path / "link.png")
    os.mkfifo(tmp_path / "fifo.png")
    assert load_image(str(tmp_path / "a.png")).shape == (299, 299, 3)   # a PNG all the same
    heatmaps: list = []
    assert list_images(str(tmp_path), heatmaps=heatmaps) == [
        "fifo.png", "heat/b.png", "photo.png", "renamed.jpg"]
    assert heatmaps == ["a.png", "heat/x.png", "heat/y.PNG", "link.png"]
    assert list_images(str(tmp_path)) == ["fifo.png", "heat/b.png", "photo.png", "renamed.jpg"]
    # a link is no heatmap file `caption` may overwrite, but is one to leave out of a walk
    assert not is_heatmap_file(tmp_path / "link.png")
    assert is_heatmap_file(tmp_path / "link.png", links=True)
    assert not is_heatmap_file(tmp_path / "fifo.png", links=True)
    assert heatmaps_note(heatmaps, "under --images X") == (
        "left out 4 heatmaps caption-attn drew under --images X (a.png, heat/x.png, ...): "
        "they are not photos")
    assert heatmaps_note(["a.png"], "there") == (
        "left out 1 heatmap caption-attn drew there (a.png): it is not a photo")
    assert heatmaps_note([], "anywhere") == ""


def test_list_images_follows_folder_symlinks_once(tmp_path):
    """A symlinked sub-folder (images/val2014 -> /data/val2014) was skipped without a word,
    while symlinked files were listed; a link back up (a loop) is listed once."""
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for path in (root / "a.jpg", root / "sub" / "b.jpg", elsewhere / "c.jpg"):
        path.write_bytes(b"x")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "gone", target_is_directory=True)
    assert list_images(str(root)) == ["a.jpg", "linked/c.jpg", "sub/b.jpg"]


def test_list_images_lists_a_symlinked_folder_under_both_paths(tmp_path):
    """images/latest -> v2 beside v2: the first path to the folder claimed it, so v2/x.jpg
    (which a caption file may name) had no features, without a word. Only a link back up to a
    folder above it (a loop) is not followed."""
    root = tmp_path / "images"
    (root / "v2").mkdir(parents=True)
    for name in ("x.jpg", "y.jpg"):
        (root / "v2" / name).write_bytes(b"x")
    (root / "latest").symlink_to("v2", target_is_directory=True)
    (root / "v2" / "up").symlink_to("..", target_is_directory=True)
    assert list_images(str(root)) == ["latest/x.jpg", "latest/y.jpg", "v2/x.jpg", "v2/y.jpg"]


LIST_UNREADABLE = """
import json, sys
from caption_attn.errors import UserError
from caption_attn.images import list_images
unreadable = {}
try:
    print(json.dumps([list_images(sys.argv[1], unreadable), unreadable]))
except UserError as e:
    print(e)
"""


def test_list_images_reports_folders_it_cannot_read(tmp_path):
    """A folder that cannot be listed was skipped by os.walk without a word (its images
    neither extracted nor in failed.tsv); an unlistable --images said "no image files found"."""
    root = tmp_path / "images"
    (root / "locked").mkdir(parents=True)
    for path in (root / "a.jpg", root / "locked" / "b.jpg"):
        path.write_bytes(b"x")
    os.chmod(root / "locked", 0)
    try:
        out = run_as_user(LIST_UNREADABLE, str(root), cwd=REPO)
        os.chmod(root, 0)
        top = run_as_user(LIST_UNREADABLE, str(root), cwd=REPO)
    finally:
        os.chmod(root, 0o755)
        os.chmod(root / "locked", 0o755)
    assert json.loads(out.stdout) == [["a.jpg"], {
        "locked/": "folder cannot be read (Permission denied): its images were not listed"}], \
        out.stderr
    assert top.stdout == f"--images {root}: cannot be read (Permission denied)\n", top.stderr


def test_a_fifo_or_device_named_like_an_image_fails_at_once_instead_of_hanging(tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)                      # open() without O_NONBLOCK waits for a writer forever
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(str(fifo))
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageError, match="not a file \\(a folder\\)"):
        load_image(str(tmp_path / "folder.jpg"))
    if os.path.exists("/dev/zero"):      # reading it never ends
        os.symlink("/dev/zero", tmp_path / "zero.jpg")
        with pytest.raises(ImageError, match="not a regular file"):
            load_image(str(tmp_path / "zero.jpg"))


def test_a_float_tiff_with_alpha_is_scaled_from_0_1_not_from_0_255():
    bgra = np.full((8, 8, 4), 0.8, np.float32)                   # (H, W, 4): gray 0.8, opaque
    bgra[..., 3] = 1.0
    bgra[:, :4, 3] = 0.0                                          # left half transparent
    ok, data = cv2.imencode(".tiff", bgra)
    assert ok
    rgb = decode_image(data.tobytes())
    assert (rgb[:, 4:] == 204).all()                              # 0.8 * 255 (was 254: alpha 1/255)
    assert (rgb[:, :4] == 255).all()                              # over white
    with pytest.raises(ImageError, match="unsupported pixel type"):
        from caption_attn.images import _composite_alpha
        _composite_alpha(np.zeros((2, 2, 4), np.int32))
    bgra[..., :3] = 200.0                                         # 0..255 values, not 0..1
    with pytest.raises(ImageError) as e:
        decode_image(cv2.imencode(".tiff", bgra)[1].tobytes())
    assert str(e.value) == "unsupported pixel values (float32 samples from 0 to 200, not 0..1)"


def test_a_float_tiff_without_alpha_is_read_as_0_1():
    """OpenCV's IMREAD_COLOR refuses 32/64-bit samples: such a TIFF was called "corrupt TIFF
    (OpenCV cannot decode it)", a false reason; it is read like a float TIFF with alpha."""
    gray = np.array([[0.0, 0.2, 0.8, 1.0]], np.float32)          # (1, 4)
    bgr = np.array([[[0.2, 0.4, 0.6], [1.0, 0.5, 0.0]]], np.float32)  # (1, 2, 3)
    for image, rgb in ((gray, [[0] * 3, [51] * 3, [204] * 3, [255] * 3]),
                       (gray.astype(np.float64), [[0] * 3, [51] * 3, [204] * 3, [255] * 3]),
                       (bgr, [[153, 102, 51], [0, 128, 255]]),
                       (np.array([[[-0.01, 0.5, 1.02]]], np.float32), [[255, 128, 0]])):  # clipped
        ok, data = cv2.imencode(".tiff", image)
        assert ok
        assert decode_image(data.tobytes())[0].tolist() == rgb, image.dtype
    with pytest.raises(ImageError) as e:                          # 0..255 scale: no guess
        decode_image(cv2.imencode(".tiff", gray * 255)[1].tobytes())
    assert str(e.value) == "unsupported pixel values (float32 samples from 0 to 255, not 0..1)"


def test_a_float_pfm_is_read_as_0_1_and_other_formats_as_before():
    """A float PFM of 0..1 went through IMREAD_COLOR, which casts without scaling: a black
    image (max 1 of 255), captioned with exit 0; one of huge values came out all 0."""
    bgr = np.array([[[0.2, 0.4, 0.6], [1.0, 0.5, 0.0]]], np.float32)  # (1, 2, 3)
    for ext in (".pfm", ".hdr"):
        ok, data = cv2.imencode(ext, bgr)
        assert ok
        np.testing.assert_allclose(decode_image(data.tobytes())[0], [[153, 102, 51],
                                                                     [0, 128, 255]], atol=1)
    gray = cv2.imencode(".pfm", bgr[..., 0])[1].tobytes()              # "Pf": one channel
    np.testing.assert_allclose(decode_image(gray)[0], [[51] * 3, [255] * 3], atol=1)
    with pytest.raises(ImageError, match=r"unsupported pixel values \(float32 samples from "):
        decode_image(cv2.imencode(".pfm", bgr * 1e30)[1].tobytes())
    # a Radiance HDR image of values over 1 (as they are) stays OpenCV's colour decode
    assert decode_image(cv2.imencode(".hdr", bgr * 4)[1].tobytes()).dtype == np.uint8
    gray16 = np.array([[0, 257 * 51, 65535]], np.uint16)              # (1, 3) PGM, 16-bit
    ppm8 = np.array([[[30, 60, 90]]], np.uint8)                        # (1, 1, 3) PPM
    assert decode_image(cv2.imencode(".pgm", gray16)[1].tobytes())[0].tolist() == [
        [0] * 3, [51] * 3, [255] * 3]
    assert decode_image(cv2.imencode(".ppm", ppm8)[1].tobytes())[0].tolist() == [[90, 60, 30]]


def test_a_jpeg_with_data_after_its_end_is_not_called_truncated():
    """Motion photos append an MP4, phones a trailer: bytes FF DA in it are no cut scan."""
    data = cv2.imencode(".jpg", scene(1))[1].tobytes()
    exif = Image.new("RGB", (40, 30))
    exif_image = io.BytesIO()
    exif.save(exif_image, "JPEG", exif=exif.getexif().tobytes())
    for trailer in (b"ftypmp42\xff\xda\x00\x10junk", b"\xff\xd8\xff\xdb\x00\x43"):
        assert decode_image(data + trailer).shape == (240, 320, 3)
    with pytest.raises(ImageError, match="truncated"):
        decode_image(data[:len(data) // 2] + b"\x00\xff\xda")   # cut inside a scan
    progressive = io.BytesIO()
    Image.fromarray(scene(2)).save(progressive, "JPEG", progressive=True)
    p = progressive.getvalue()
    assert decode_image(p + b"\xff\xda").shape == (240, 320, 3)
    for cut in (len(p) // 3, len(p) * 2 // 3, len(p) - 2):
        with pytest.raises(ImageError, match="truncated"):
            decode_image(p[:cut])
    assert decode_image(exif_image.getvalue() + b"\xff\xda").shape == (30, 40, 3)


def test_every_kind_of_transparent_png_is_composited_over_white():
    """OpenCV ignores the tRNS chunk of a grayscale PNG: its transparent gray (usually black)
    came out as it is stored, exit 0. Each PNG here has a transparent first pixel over black
    and an opaque second one."""
    u16 = struct.Struct(">H").pack
    trns0 = png_chunk(b"tRNS", u16(0))                    # gray 0 is transparent
    palette = png_chunk(b"PLTE", bytes([0, 0, 0, 200, 100, 50])) + png_chunk(b"tRNS", b"\x00")
    cases = {  # name: (PNG, the opaque pixel's RGB)
        "gray 8-bit tRNS": (png_file(2, 1, 8, 0, bytes([0, 200]), trns0), (200, 200, 200)),
        "gray 16-bit tRNS": (png_file(2, 1, 16, 0, u16(0) + u16(60000), trns0),
                             (233, 233, 233)),                # 60000 / 65535 * 255
        "gray 2-bit tRNS": (png_file(2, 1, 2, 0, bytes([0b01100000]), png_chunk(b"tRNS", u16(1))),
                            (170, 170, 170)),                 # sample 1 transparent, 2 of 0..3
        "gray+alpha 8-bit": (png_file(2, 1, 8, 4, bytes([0, 0, 200, 255])), (200, 200, 200)),
        "gray+alpha 16-bit": (png_file(2, 1, 16, 4, u16(0) + u16(0) + u16(60000) + u16(65535)),
                              (233, 233, 233)),
        "RGB 8-bit tRNS": (png_file(2, 1, 8, 2, bytes([0, 0, 0, 200, 100, 50]),
                                    png_chunk(b"tRNS", u16(0) * 3)), (200, 100, 50)),
        "RGB 16-bit tRNS": (png_file(2, 1, 16, 2, u16(0) * 3 + u16(60000) * 3,
                                     png_chunk(b"tRNS", u16(0) * 3)), (233, 233, 233)),
        "palette tRNS": (png_file(2, 1, 8, 3, bytes([0, 1]), palette), (200, 100, 50)),
        "palette 4-bit tRNS": (png_file(2, 1, 4, 3, bytes([0x01]), palette), (200, 100, 50)),
    }
    for name, (data, opaque) in cases.items():
        assert _may_have_alpha(data, "png"), name
        rgb = decode_image(data)
        assert rgb.shape == (1, 2, 3), name
        assert tuple(rgb[0, 0]) == (255, 255, 255), name      # transparent -> white
        assert tuple(rgb[0, 1]) == opaque, name


def test_only_a_real_trns_chunk_makes_a_gray_png_transparent():
    """A text chunk that mentions tRNS passes the cheap header test but is no transparency;
    a gray PNG without one is unchanged."""
    text = png_chunk(b"tEXt", b"Comment\x00tRNS\x00\x00")
    for extra in (text, b""):
        data = png_file(2, 1, 8, 0, bytes([0, 200]), extra)
        assert decode_image(data)[0].tolist() == [[0, 0, 0], [200, 200, 200]]


def test_a_tiff_of_signed_or_32_bit_integers_is_refused_not_misread():
    """OpenCV's IMREAD_COLOR reads signed TIFF samples as if unsigned (int16 -1, 5, 32767 came
    out 127, 0, 255; an int16 gray ramp black), exit 0, and calls int32 ones corrupt; their
    scale is unknown, so they are refused with their type."""
    for dtype in (np.int8, np.int16, np.int32):
        ok, data = cv2.imencode(".tiff", np.array([[[-1, 5, 100]]], dtype))
        assert ok
        with pytest.raises(ImageError) as e:
            decode_image(data.tobytes())
        assert str(e.value) == f"unsupported pixel type ({np.dtype(dtype).name} samples)"
    gray16 = cv2.imencode(".tiff", np.array([[0, 5000, 60000]], np.uint16))[1].tobytes()
    assert decode_image(gray16)[0, :, 0].tolist() == [0, 19, 234]   # unsigned: as before


def _tiff(pixels: np.ndarray, extra_samples: int) -> bytes:
    """An uncompressed little-endian RGBA TIFF written by hand (OpenCV writes no ExtraSamples
    tag, Pillow no 16-bit RGBA): `pixels` (H, W, 4) uint8/uint16 in R, G, B, A order;
    `extra_samples` 1: associated (premultiplied) alpha, 2: unassociated."""
    h, w, _ = pixels.shape
    body = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    bits = struct.pack("<4H", *[pixels.dtype.itemsize * 8] * 4)
    tags = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 4, 8 + 2 + 12 * 11 + 4),  # BitsPerSample
            (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, 8 + 2 + 12 * 11 + 4 + len(bits)),
            (277, 3, 1, 4), (278, 4, 1, h), (279, 4, 1, len(body)), (284, 3, 1, 1),
            (338, 3, 1, extra_samples)]
    ifd = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHII" if kind == 4 or n > 1 else "<HHIHxx", tag, kind, n, value)
        for tag, kind, n, value in tags) + b"\x00" * 4
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bits + body


def test_tiff_alpha_is_composited_by_what_its_extra_sample_says_and_gray_alpha_refused():
    """OpenCV reads 8-bit TIFFs through libtiff's RGBA interface, which premultiplies
    unassociated alpha, and a TIFF with associated alpha is premultiplied as stored: both were
    multiplied by alpha once more, half-transparent pixels too dark (177 for 227). A gray+alpha
    TIFF came back gray without its alpha (the transparent pixel in its stored gray)."""
    straight = np.array([[[200, 0, 0, 128], [200, 100, 50, 255], [90, 90, 90, 0]]], np.uint8)
    premultiplied = np.array([[[100, 0, 0, 128], [200, 100, 50, 255], [0, 0, 0, 0]]],
                             np.uint8)
    want = [[227, 127, 127], [200, 100, 50], [255, 255, 255]]    # over white
    pillow = io.BytesIO()
    Image.fromarray(straight, "RGBA").save(pillow, "TIFF")       # ExtraSamples 2
    for name, data in (("pillow 8-bit unassociated", pillow.getvalue()),
                       ("8-bit unassociated", _tiff(straight, 2)),
                       ("8-bit associated", _tiff(premultiplied, 1)),
                       ("16-bit unassociated", _tiff(straight.astype(np.uint16) * 257, 2)),
                       ("16-bit associated", _tiff(premultiplied.astype(np.uint16) * 257, 1)),
                       ("OpenCV's BGRA (no ExtraSamples: straight)",
                        cv2.imencode(".tiff", straight[..., [2, 1, 0, 3]])[1].tobytes())):
        assert decode_image(data).tolist() == [want], name
    gray_alpha = io.BytesIO()
    Image.fromarray(np.array([[[0, 0], [200, 255]]], np.uint8), "LA").save(gray_alpha, "TIFF")
    with pytest.raises(ImageError) as e:
        decode_image(gray_alpha.getvalue())
    assert str(e.value) == "unsupported TIFF (gray with alpha: OpenCV drops the alpha)"


def _composite_whole(raw, premultiplied=False):
    """_composite_alpha as it was, on the whole image at once in float32."""
    scale = 1.0 if raw.dtype.kind == "f" else float(np.iinfo(raw.dtype).max)
    bgra = np.clip(raw.astype(np.float32) / scale, 0.0, 1.0)
    rgb, alpha = bgra[..., 2::-1], bgra[..., 3:]
    out = (rgb if premultiplied else rgb * alpha) + (1.0 - alpha)
    return np.rint(np.minimum(out, 1.0) * 255.0).astype(np.uint8)


def test_alpha_is_composited_in_bands_with_the_same_pixels():
    """Compositing converted the whole BGRA image to float32 with its temporaries: 52 bytes
    per pixel at the peak, 1.25 GB for a 24-megapixel PNG. In bands of rows it takes the
    raw image's size plus the output's, and gives the same pixels."""
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.uint16, np.float32):
        raw = rng.integers(0, 256 if dtype == np.uint8 else 65536, (700, 1000, 4)).astype(dtype)
        if dtype == np.float32:
            raw /= 65535.0
        for premultiplied in (False, True):
            np.testing.assert_array_equal(_composite_alpha(raw, premultiplied),
                                          _composite_whole(raw, premultiplied))
    raw[-1, -1, 0] = 200.0                       # out of 0..1 in the last band only
    with pytest.raises(ImageError) as e:
        _composite_alpha(raw)
    assert str(e.value).endswith("samples from 0 to 200, not 0..1)")

    raw = rng.integers(0, 256, (2048, 2048, 4), dtype=np.uint8)
    tracemalloc.start()
    try:
        _composite_alpha(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / raw[..., 0].size < 10, peak          # bytes per pixel (3 of them the output)


def _with_chunks(png: bytes, *chunks: tuple) -> bytes:
    """`png` with (type, data) chunks put right after its header chunk."""
    return png[:33] + b"".join(png_chunk(k, d) for k, d in chunks) + png[33:]


def test_colour_profile_chunks_that_libpng_warns_about_print_nothing(capfd):
    # "libpng warning: iCCP: too short" (or "known incorrect sRGB profile", "sRGB: invalid")
    # went to the terminal for each such PNG, between the progress bar and the captions:
    # libpng's own default handler writes it, whatever OpenCV's log level. OpenCV does not
    # apply colour profiles, so the chunks are dropped before decoding: the same pixels.
    pixels = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    png = cv2.imencode(".png", pixels)[1].tobytes()
    expected = decode_image(png)
    capfd.readouterr()
    for chunks in ([(b"iCCP", b"ICC Profile\0\0" + zlib.compress(bytes(200)))],
                   [(b"sRGB", b"\x07")], [(b"sRGB", b"\0"), (b"sRGB", b"\0")]):
        assert np.array_equal(decode_image(_with_chunks(png, *chunks)), expected)
        assert capfd.readouterr().err == ""
    # damage is still said: a PNG whose image data is cut is refused as before
    damaged = _with_chunks(png, (b"iCCP", b"x\0\0" + zlib.compress(bytes(200))))
    start = damaged.index(b"IDAT") + 8
    with pytest.raises(ImageError, match="corrupt PNG"):
        decode_image(damaged[:start] + bytes(40) + damaged[start + 40:])


def test_a_heatmap_records_the_image_it_shows(tmp_path):
    """The mark said only that caption-attn drew the file, so a failing d1/cat.png removed
    H/cat.png drawn of d2/cat.png. The recorded path comes back byte for byte (a Latin-1
    name, a newline), the PNG still decodes, and an older heatmap records none."""
    from caption_attn.images import heatmap_source
    png = cv2.imencode(".png", np.zeros((4, 6, 3), np.uint8))[1].tobytes()
    source = "/d\n1/caf\udce9 100%.png"
    (tmp_path / "h.png").write_bytes(mark_heatmap(png, source))
    (tmp_path / "old.png").write_bytes(mark_heatmap(png))
    assert heatmap_source(str(tmp_path / "h.png")) == source
    assert is_heatmap_file(str(tmp_path / "h.png"))
    assert load_image(str(tmp_path / "h.png")).shape[-1] == 3
    assert heatmap_source(str(tmp_path / "old.png")) is None
    (tmp_path / "plain.png").write_bytes(png)
    assert heatmap_source(str(tmp_path / "plain.png")) is None


@pytest.mark.parametrize("load", ["load_image", "load_image_and_view", "extract"])
def test_an_image_too_large_for_memory_is_one_images_error(tmp_path, monkeypatch, load):
    """A file, or the pixels a small file declares (a 1-gigapixel PNG of a few MB), too
    large for the machine's memory: the MemoryError ended `caption` whole with a traceback
    (extract-features listed "error (MemoryError: )"). It is that image's ImageError."""
    from caption_attn import extract, images

    def decode(data):
        raise MemoryError
    monkeypatch.setattr(images, "decode_image", decode)
    monkeypatch.setattr(extract, "decode_image", decode)
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG")
    call = {"load_image": images.load_image, "load_image_and_view": images.load_image_and_view,
            "extract": extract._read_image}[load]
    with pytest.raises(ImageError) as e:
        call(str(path))
    assert str(e.value) == "too large for this machine's memory (its file or its pixels)"
