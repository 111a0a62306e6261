"""Image files -> RGB pixels, the same everywhere: `extract-features`, `caption` and the
attention snapshots of `train` all go through `load_image` (the heatmaps are drawn on the
photo in its own proportions, `heatmap_view`).

Images are decoded with OpenCV (`decode_image`: format sniffed from the magic bytes, truncated
JPEG/PNG refused, alpha composited over white) and stretched to 299x299 by `resize_image`.
`ImageError` carries the short reason written to failed.tsv.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import urllib.parse
import zlib
from typing import Optional

import cv2
import numpy as np

from caption_attn.backbone import IMAGE_SIZE
from caption_attn.config import IMAGE_EXTENSIONS
from caption_attn.errors import UserError, counted
from caption_attn.fileio import is_utf8, one_line, printable_json

RESIZE_METHOD = ("stretch to 299x299 (aspect ratio not kept, no crop); per axis INTER_AREA "
                 "when shrinking, INTER_CUBIC when enlarging; alpha composited over white")


# OpenCV refuses images larger than these (environment variables of the same name raise them)
_OPENCV_LIMITS = {"CV_IO_MAX_IMAGE_PIXELS": (1 << 30, "pixels"),
                  "CV_IO_MAX_IMAGE_WIDTH": (1 << 20, "pixels wide"),
                  "CV_IO_MAX_IMAGE_HEIGHT": (1 << 20, "pixels high")}
_OPENCV_LIMIT = re.compile("|".join(_OPENCV_LIMITS))


class ImageError(Exception):
    """One image cannot be used; the message is the short reason written to failed.tsv."""


def _sniff(data: bytes) -> Optional[str]:
    """Image format from the magic bytes (None: unknown; OpenCV still gets a try)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:3] in (b"PF\n", b"Pf\n"):          # Portable FloatMap: colour, gray
        return "pfm"
    return None


def _truncated(data: bytes, fmt: Optional[str]) -> bool:
    """True when a JPEG has no end-of-image marker after its last scan, or a PNG no IEND.

    Some OpenCV/libjpeg builds decode a truncated JPEG "successfully" with a gray bottom; the
    markers cannot occur inside entropy-coded data, so their absence means a cut file.
    """
    if fmt == "jpeg":
        end = _jpeg_end(data)
        if end is not None:
            return end < 0
        return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")  # unparsable: the old rule
    if fmt == "png":
        return data.rfind(b"IEND") == -1
    return False


def _jpeg_end(data: bytes) -> Optional[int]:
    """Where the first JPEG image in `data` ends (after its EOI marker), -1 when the data ends
    first (a cut file), None when its marker structure cannot be followed.

    Walks the segments by their lengths (an EXIF thumbnail inside APP1 is skipped whole) and
    each scan's entropy-coded data to the next marker, so bytes after the image (a motion
    photo's MP4, a phone's trailer, a second MPO frame) are never looked at: the 'last FFDA
    after the last FFD9' rule called such a file truncated whenever its trailer happened to
    hold the bytes FF DA.
    """
    i, n = 2, len(data)
    while True:
        if i + 1 >= n:
            return -1
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:                            # fill byte
            i += 1
        elif marker == 0xD9:                          # EOI
            return i + 2
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn / TEM: no length
            i += 2
        else:
            if i + 4 > n:
                return -1
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
            if marker == 0xDA:                        # SOS: entropy-coded data follows
                while True:
                    i = data.find(b"\xff", i)
                    if i == -1 or i + 1 >= n:
                        return -1
                    nxt = data[i + 1]
                    if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:   # stuffed byte / restart marker
                        i += 2
                    elif nxt == 0xFF:
                        i += 1
                    else:
                        break


def _may_have_alpha(data: bytes, fmt: Optional[str]) -> bool:
    """Cheap header test; only these images pay for a second, alpha-preserving decode.
    A PFM holds float samples: read as 8-bit colour, one of 0..1 came out black (OpenCV
    casts, it does not scale)."""
    if fmt == "pfm":
        return True
    if fmt == "png":
        idat = data.find(b"IDAT")
        return (len(data) > 25 and data[25] in (4, 6)) or data.find(b"tRNS", 0, idat) != -1
    if fmt == "gif":
        gce = data.find(b"\x21\xf9\x04")  # graphic control extension: bit 0 = transparency
        return gce != -1 and len(data) > gce + 3 and bool(data[gce + 3] & 1)
    return fmt in ("webp", "tiff")


def _png_gray_transparent(data: bytes) -> Optional[int]:
    """The sample value a grayscale PNG's tRNS chunk makes transparent, on the scale OpenCV
    decodes it to (bit depths 1, 2 and 4 stretched to 0..255); None when there is none.

    OpenCV turns the tRNS of palette and RGB PNGs into an alpha channel but ignores it on
    grayscale ones, whose transparent pixels then kept their stored gray (often black).
    """
    if len(data) < 26 or data[25] != 0:                    # IHDR colour type 0: gray
        return None
    depth, i = data[24], 8
    while i + 8 <= len(data):                              # the chunks before the pixels
        length, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        if kind == b"tRNS" and length >= 2:
            value = int.from_bytes(data[i + 8:i + 10], "big")
            return value * (255 // ((1 << depth) - 1)) if depth < 8 else value
        if kind in (b"IDAT", b"IEND"):
            return None
        i += 12 + length
    return None


def _tiff_tags(data: bytes, wanted: tuple[int, ...]) -> dict[int, int]:
    """The first value of each `wanted` SHORT/LONG tag of a TIFF's first image (the one OpenCV
    decodes); tags it lacks are left out, and an unreadable directory gives {}."""
    order = "<" if data[:2] == b"II" else ">"
    tags = {}
    try:
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind, n = struct.unpack_from(order + "HHI", data, entry)
            if tag in wanted and kind in (3, 4) and n >= 1:  # SHORT, LONG
                fmt = order + ("H" if kind == 3 else "I")
                at = entry + 8                                # the value, if it fits in 4 bytes
                if struct.calcsize(fmt) * n > 4:
                    (at,) = struct.unpack_from(order + "I", data, at)
                (tags[tag],) = struct.unpack_from(fmt, data, at)
    except struct.error:
        return {}
    return tags


_SAMPLES_PER_PIXEL, _EXTRA_SAMPLES = 277, 338            # TIFF tags
_ASSOCIATED_ALPHA, _UNASSOCIATED_ALPHA = 1, 2            # ExtraSamples values (0: unspecified)


_FLOAT_SLACK = 0.05  # how far float samples may overshoot 0..1 and still be taken as 0..1


def _unit_samples(raw: np.ndarray) -> np.ndarray:
    """uint8, uint16, or float in [0, 1] (as in a float TIFF) samples -> float32 in [0, 1].

    Floats are taken as 0..1 (a slight overshoot, as resampling leaves, is clipped); floats
    clearly outside it (0..255 or HDR values) and other sample types are refused rather than
    scaled by a guess, which would make them silently white or black.
    """
    if raw.dtype.kind == "f":
        unit = np.nan_to_num(raw.astype(np.float32), posinf=np.inf, neginf=-np.inf)
        _check_unit_range(float(unit.min()), float(unit.max()), raw.dtype)
        return np.clip(unit, 0.0, 1.0)
    if raw.dtype in (np.uint8, np.uint16):
        return raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
    raise ImageError(f"unsupported pixel type ({raw.dtype} samples)")


def _check_unit_range(lo: float, hi: float, dtype) -> None:
    """ImageError unless float samples from `lo` to `hi` can be taken as 0..1."""
    if lo < -_FLOAT_SLACK or hi > 1.0 + _FLOAT_SLACK:
        raise ImageError(f"unsupported pixel values ({dtype} samples from {lo:g} to {hi:g}, "
                         f"not 0..1)")


_COMPOSITE_PIXELS = 1 << 18   # composited at a time: ~13 MB of float32 temporaries


def _composite_alpha(raw: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """BGRA (uint8, uint16, or float in [0, 1] as in a float TIFF) -> RGB uint8 composited
    over white; `premultiplied`: the colour is already multiplied by alpha (a TIFF's
    associated alpha). Other sample types are refused rather than scaled by a guess.

    In bands of rows: the float32 temporaries of the whole image took 52 bytes per pixel
    (1.25 GB for a 24-megapixel PNG); a band's are ~13 MB, and the pixels are the same."""
    rows = max(1, _COMPOSITE_PIXELS // max(1, raw.shape[1]))
    bands = [raw[top:top + rows] for top in range(0, raw.shape[0], rows)]
    if raw.dtype.kind == "f":   # refused on the range of the whole image, not of a band
        ranges = [(float(u.min()), float(u.max())) for u in
                  (np.nan_to_num(b.astype(np.float32), posinf=np.inf, neginf=-np.inf)
                   for b in bands) if u.size]
        if ranges:
            _check_unit_range(min(r[0] for r in ranges), max(r[1] for r in ranges), raw.dtype)
    out = np.empty(raw.shape[:2] + (3,), np.uint8)                # (H, W, 3)
    for top, band in zip(range(0, raw.shape[0], rows), bands):
        bgra = _unit_samples(band)                              # (h, W, 4)
        rgb, alpha = bgra[..., 2::-1], bgra[..., 3:]            # (h, W, 3), (h, W, 1)
        over = (rgb if premultiplied else rgb * alpha) + (1.0 - alpha)  # (h, W, 3) over white
        out[top:top + len(band)] = np.rint(np.minimum(over, 1.0) * 255.0)
    return out


def _tiff_alpha(raw: np.ndarray, data: bytes) -> Optional[bool]:
    """For a TIFF OpenCV decoded to `raw`: None when it has no alpha, else whether `raw`'s
    colour is premultiplied by it. Raises ImageError for a gray+alpha TIFF.

    A TIFF's ExtraSamples tag says whether its alpha is associated (premultiplied) or not, but
    OpenCV reads 8-bit TIFFs through libtiff's RGBA interface, which premultiplies unassociated
    alpha; 16-bit and float ones, and an extra sample of unspecified meaning (OpenCV writes
    BGRA so, meaning straight alpha), come back as stored. Compositing premultiplied colour as
    straight made half-transparent pixels too dark (red 200 at alpha 0.5 came out 177, not
    227). A gray+alpha TIFF comes back without its alpha, transparent pixels in their stored
    gray (often black), so it is refused.
    """
    tags = _tiff_tags(data, (_SAMPLES_PER_PIXEL, _EXTRA_SAMPLES))
    extra = tags.get(_EXTRA_SAMPLES)
    if raw.ndim == 2 and tags.get(_SAMPLES_PER_PIXEL) == 2 and extra in (_ASSOCIATED_ALPHA,
                                                                        _UNASSOCIATED_ALPHA):
        raise ImageError("unsupported TIFF (gray with alpha: OpenCV drops the alpha)")
    if raw.ndim != 3 or raw.shape[2] != 4:
        return None
    return extra == _ASSOCIATED_ALPHA or (extra == _UNASSOCIATED_ALPHA and raw.dtype == np.uint8)


def _from_unchanged(raw: np.ndarray, data: bytes, fmt: Optional[str]) -> Optional[np.ndarray]:
    """RGB uint8 from OpenCV's IMREAD_UNCHANGED decode when it needs handling here: alpha
    (an alpha channel, or a grayscale PNG's transparent gray), float samples (OpenCV's
    IMREAD_COLOR refuses 32/64-bit TIFFs: "corrupt TIFF" was the reason given), or signed /
    32-bit integer samples, refused (IMREAD_COLOR reads int8/int16 TIFFs as if unsigned: wrong
    pixels). None: the ordinary IMREAD_COLOR decode is right (it applies the orientation).
    """
    if fmt == "tiff":
        premultiplied = _tiff_alpha(raw, data)
        if premultiplied is not None:
            return _composite_alpha(raw, premultiplied)
    if raw.ndim == 3 and raw.shape[2] == 4:
        return _composite_alpha(raw)
    if fmt == "png" and raw.ndim == 2:
        key = _png_gray_transparent(data)
        if key is not None:
            alpha = np.where(raw == key, 0, np.iinfo(raw.dtype).max).astype(raw.dtype)
            return _composite_alpha(np.dstack([raw, raw, raw, alpha]))
    if raw.dtype in (np.uint8, np.uint16) or (raw.ndim == 3 and raw.shape[2] != 3):
        return None
    samples = _unit_samples(raw)                            # (H, W) or (H, W, 3) BGR
    rgb = np.repeat(samples[..., None], 3, 2) if samples.ndim == 2 else samples[..., 2::-1]
    return np.rint(rgb * 255.0).astype(np.uint8)


# PNG chunks of colour management, which OpenCV reads past without applying (the pixels are
# the same without them) and about which libpng itself prints "libpng warning: iCCP: known
# incorrect sRGB profile", "... sRGB: invalid" to stderr, whatever OpenCV's log level: noise
# between the progress bar and the captions, for images that decode fine
_COLOUR_CHUNKS = (b"iCCP", b"sRGB")


def _without_colour_chunks(data: bytes) -> bytes:
    """PNG `data` without its `_COLOUR_CHUNKS` (the same bytes when it has none, or when its
    chunks cannot be walked: the decoder says what is wrong then)."""
    pos, kept, start = len(_PNG_SIGNATURE), [], 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I", data[pos:pos + 4])[0], data[pos + 4:pos + 8]
        end = pos + 12 + length                            # length, type, data, CRC
        if end > len(data):
            return data
        if kind in _COLOUR_CHUNKS:
            kept.append(data[start:pos])
            start = end
        if kind == b"IEND":
            break
        pos = end
    return data if not kept else b"".join(kept) + data[start:]


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> RGB uint8 (H, W, 3) at the original size; raises ImageError.

    JPEG/PNG/BMP/GIF (first frame)/WebP/TIFF and whatever else OpenCV reads. Grayscale and CMYK
    become RGB, the EXIF orientation is applied (OpenCV's IMREAD_COLOR does it), 16-bit images
    are scaled to 8 bits, float TIFFs are read as 0..1. Images with an alpha channel or a
    transparent colour (PNG tRNS, GIF) are composited over white (what a viewer shows; the
    colour under transparent pixels is often arbitrary); for those and float TIFFs the EXIF
    orientation is not applied (OpenCV only keeps alpha and floats with IMREAD_UNCHANGED, which
    ignores it; PNG/WebP files very rarely carry an orientation).
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    fmt = _sniff(data)
    if _truncated(data, fmt):
        raise ImageError("truncated")
    buf = np.frombuffer(_without_colour_chunks(data) if fmt == "png" else data, np.uint8)
    try:
        if _may_have_alpha(data, fmt):
            raw = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            rgb = None if raw is None else _from_unchanged(raw, data, fmt)
            if rgb is not None:
                return rgb
        rgb = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    except cv2.error as e:
        limit = _OPENCV_LIMIT.search(str(e))
        if limit:  # a size check, not damage: say which, not OpenCV's assertion line
            name = limit.group()
            default, unit = _OPENCV_LIMITS[name]
            raise ImageError(f"too large: more than {os.environ.get(name, default)} {unit}, "
                             f"OpenCV's limit ({name})") from None
        raise ImageError(f"cannot decode ({str(e).strip().splitlines()[-1]})") from None
    if rgb is None:
        raise ImageError(f"corrupt {fmt.upper()} (OpenCV cannot decode it)" if fmt
                         else "not an image (unrecognised format)")
    return rgb


def resize_image(rgb: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """RGB (H, W, 3) -> (size, size, 3): stretched, no crop, the one resize used everywhere.

    Each axis uses INTER_AREA when it shrinks (averages, no aliasing) and INTER_CUBIC when it
    grows; an image that shrinks along one axis and grows along the other is resized in two
    passes (shrink first).
    """
    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return rgb
    if h >= size and w >= size:
        return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    if h <= size and w <= size:
        return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_CUBIC)
    if h > size:  # tall and narrow
        rgb = cv2.resize(rgb, (w, size), interpolation=cv2.INTER_AREA)
    else:         # wide and short
        rgb = cv2.resize(rgb, (size, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_CUBIC)


def read_image_file(path: str) -> tuple[bytes, os.stat_result]:
    """The bytes of an image file and its stat, taken on the open file (so the size and mtime
    are those of the bytes read); raises ImageError."""
    try:  # O_NONBLOCK: opening a FIFO named like an image would wait for a writer forever
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError("missing") from None
    except IsADirectoryError:
        raise ImageError("not a file (a folder)") from None
    except OSError as e:
        raise ImageError(f"unreadable ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or /dev/zero would never end
            raise ImageError("not a file (a folder)" if stat.S_ISDIR(st.st_mode) else
                             "not a regular file (a FIFO, socket or device)")
        with open(fd, "rb", closefd=False) as f:
            return f.read(), st
    except OSError as e:
        raise ImageError(f"unreadable ({e.strerror})") from None
    finally:
        os.close(fd)


# why an image is not read: a file, or the pixels a small file declares (a 1-gigapixel PNG
# of a few MB), too large for this machine's memory (a MemoryError ended `caption` whole)
TOO_LARGE = "too large for this machine's memory (its file or its pixels)"


def load_image(path: str) -> np.ndarray:
    """Image file -> uint8 (299, 299, 3) RGB exactly as extraction sees it; raises ImageError."""
    try:
        return resize_image(decode_image(read_image_file(path)[0]))
    except MemoryError:
        raise ImageError(TOO_LARGE) from None


def heatmap_view(rgb: np.ndarray, longest: int = IMAGE_SIZE) -> np.ndarray:
    """RGB (H, W, 3) -> the photo heatmaps are drawn on: its own proportions (the model's
    8x8 grid is stretched over all of it, as `resize_image` stretched the photo), shrunk
    (area) so its longest side is at most `longest`, never enlarged: no more pixels than
    the 299x299 image every photo used to be squeezed into for its heatmaps, still more
    than a panel shows (210 px at most, `plot.PANEL_INCHES`)."""
    h, w = rgb.shape[:2]
    if max(h, w) <= longest:
        return rgb
    scale = longest / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))        # (W', H')
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def load_image_and_view(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Image file -> (`load_image`'s (299, 299, 3), its `heatmap_view`), decoded once."""
    try:
        rgb = decode_image(read_image_file(path)[0])
        return resize_image(rgb), heatmap_view(rgb)
    except MemoryError:
        raise ImageError(TOO_LARGE) from None


def printable_name(name: str) -> str:
    """`name` with the bytes of a file name that is not UTF-8 (caf\\xe9.png, which Python
    holds as 'caf\\udce9.png') written as \\xNN, so it can be printed, drawn and saved; a
    UTF-8 name comes back as it is (`fileio.printable_json` of a string)."""
    return printable_json(name)


def json_name(name: str, key: str = "image") -> dict:
    """How JSON output names a file: `key` -> the name as every printed message shows it
    (`printable_name`), and, only for a name that is not UTF-8, `key`_hex -> its exact
    bytes in hex. A name held with surrogate escapes went out as "caf\\udce9.png", a lone
    surrogate that strict JSON and UTF-8 readers refuse or mangle; "caf\\xe9.png" alone
    could not be told from a file named so, hence the bytes (`bytes.fromhex`)."""
    if is_utf8(name):
        return {key: name}
    return {key: printable_name(name), f"{key}_hex": os.fsencode(name).hex()}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))


# Every heatmap file `plot.save_figure` writes carries this tEXt chunk right after the PNG's
# header (OpenCV's encoder writes no text chunks of its own): how `caption --plot-attention`
# tells the heatmaps it drew, which it may redraw or remove, from the user's images, which it
# never touches, and how every folder walk (`list_images`) leaves them out of the images.
HEATMAP_MARK = _png_chunk(b"tEXt", b"Software\0caption-attn heatmap")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEADER_END = len(_PNG_SIGNATURE) + 25   # then the IHDR chunk: length, type, 13 bytes, CRC


def mark_heatmap(png: bytes, source: Optional[str] = None) -> bytes:
    """PNG bytes (`plot.figure_to_png`) with `HEATMAP_MARK` after their header chunk, then,
    given `source` (the real path of the image the heatmap shows), a tEXt chunk recording it
    (`heatmap_source`): a heatmap of d2/cat.png was removed as the heatmap of d1/cat.png, an
    image failing now, as both are drawn into DIR/cat.png."""
    marks = HEATMAP_MARK
    if source is not None:   # percent-encoded: tEXt is Latin-1, a path any bytes but NUL
        marks += _png_chunk(b"tEXt", _SOURCE_KEY + b"\0"
                            + urllib.parse.quote_from_bytes(os.fsencode(source), "/").encode())
    return png[:_HEADER_END] + marks + png[_HEADER_END:]


_SOURCE_KEY = b"caption-attn image"


def heatmap_source(path) -> Optional[str]:
    """The real path of the image the heatmap file `path` shows, as `mark_heatmap` recorded
    it; None for a file that is no heatmap, or a heatmap drawn before the source was
    recorded."""
    if not is_heatmap_file(path):
        return None
    try:
        with open(path, "rb") as f:
            f.seek(_HEADER_END + len(HEATMAP_MARK))
            head = f.read(8)
            if len(head) < 8 or head[4:] != b"tEXt":
                return None
            data = f.read(struct.unpack(">I", head[:4])[0])
    except OSError:
        return None
    key, _, value = data.partition(b"\0")
    if key != _SOURCE_KEY:
        return None
    return os.fsdecode(urllib.parse.unquote_to_bytes(value.decode("latin-1")))


def is_heatmap_file(path, links: bool = False) -> bool:
    """Whether `path` is a file (not a folder or FIFO) that `plot.save_figure` wrote: its
    first 70 bytes carry `HEATMAP_MARK`. A symlink is none unless `links` (a heatmap's file
    is one `caption` may overwrite: never a link; a folder walk goes by what it reads)."""
    try:
        if not links and stat.S_ISLNK(os.lstat(path).st_mode):
            return False
        # O_NONBLOCK: opening a FIFO named like an image would wait for a writer forever
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            head = os.read(fd, _HEADER_END + len(HEATMAP_MARK))
        finally:
            os.close(fd)
    except OSError:
        return False
    return head[:len(_PNG_SIGNATURE)] == _PNG_SIGNATURE and head[_HEADER_END:] == HEATMAP_MARK


def list_images(images_dir: str, unreadable: Optional[dict] = None,
                left_out: Optional[list] = None, flag: str = "--images",
                heatmaps: Optional[list] = None) -> list[str]:
    """Keys (sorted POSIX paths relative to `images_dir`) of every image file under it.

    Files are recognised by extension (IMAGE_EXTENSIONS, any case); hidden files and folders
    (name starting with ".") are skipped. `left_out`, when given, receives the keys of the
    other files (sorted), which callers report (`left_out_note`): a phone's .heic or a
    Windows .jfif was skipped without a word. The heatmaps `caption --plot-attention` drew
    (`is_heatmap_file`, read for .png names only) are no images either: `heatmaps`, when
    given, receives their keys (sorted; `heatmaps_note`): drawn into a folder of the dataset,
    they were extracted as images by a later `extract-features` without a word, and
    captioned as photos by a later `caption`. Symlinked folders are followed (a dataset is often
    assembled from links) under every path that leads to them: `latest -> v2` beside `v2`
    gives latest/x.jpg and v2/x.jpg, since a caption file may name either. Only a link back
    up to a folder above it (a loop) is not followed.

    `unreadable`, when given, receives {"FOLDER/": reason} for every folder below
    `images_dir` that cannot be listed (its images are not in the keys); `images_dir` itself
    unlistable is a UserError naming it after `flag`, the caller's flag ("" for an argument
    without one: `caption photos` was told of an --images it has not got).
    """
    name = f"{flag} {images_dir}" if flag else images_dir
    if not os.path.isdir(images_dir):
        raise UserError(f"{name}: not a folder")
    keys = []
    top = os.stat(images_dir)
    # (key prefix of a folder, (st_dev, st_ino) of it and of every folder above it)
    stack = [("", ((top.st_dev, top.st_ino),))]
    while stack:
        rel, above = stack.pop()
        try:
            with os.scandir(os.path.join(images_dir, rel)) as it:
                entries = sorted(it, key=lambda entry: entry.name)
        except OSError as e:
            if not rel:
                raise UserError(f"{name}: cannot be read ({e.strerror})") from None
            if unreadable is not None:
                unreadable[rel] = f"folder cannot be read ({e.strerror}): its images were " \
                                  f"not listed"
            continue
        for entry in reversed(entries):  # popped in order
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat() if entry.is_dir() else None  # both follow a symlink
            except OSError:
                st = None  # vanished, or a link into a folder that cannot be searched
            if st is not None:
                if (st.st_dev, st.st_ino) not in above:
                    stack.append((rel + entry.name + "/", above + ((st.st_dev, st.st_ino),)))
            elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                if left_out is not None:
                    left_out.append(rel + entry.name)
            elif entry.name.lower().endswith(".png") and is_heatmap_file(entry.path, links=True):
                if heatmaps is not None:
                    heatmaps.append(rel + entry.name)
            else:
                keys.append(rel + entry.name)
    for found in (left_out, heatmaps):
        if found is not None:
            found.sort()
    return sorted(keys)


def left_out_note(paths: list[str], where: str, examples: int = 2) -> str:
    """One line for the files a folder walk left out for their extension (`list_images`'
    `left_out`), with a count and a few of them; "" when there are none."""
    if not paths:
        return ""
    return (f"left out {len(paths)} file(s) {where} whose extension is not an image's "
            f"({_some_of(paths, examples)}); images are taken by extension: "
            f"{' '.join(IMAGE_EXTENSIONS)} (any case)")


def heatmaps_note(paths: list[str], where: str, examples: int = 2) -> str:
    """One line for the heatmaps caption-attn drew that a folder walk left out (`list_images`'
    `heatmaps`), with a count and a few of them; "" when there are none."""
    if not paths:
        return ""
    one = len(paths) == 1
    return (f"left out {counted(len(paths), 'heatmap')} caption-attn drew {where} "
            f"({_some_of(paths, examples)}): "
            f"{'it is not a photo' if one else 'they are not photos'}")


def _some_of(paths: list[str], examples: int) -> str:
    """The first `examples` of `paths`, printable, and ", ..." if there are more."""
    shown = ", ".join(one_line(printable_name(p)) for p in paths[:examples])
    return shown + (", ..." if len(paths) > examples else "")
