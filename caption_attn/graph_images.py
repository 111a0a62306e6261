"""`images.load_image` in TensorFlow ops: encoded bytes -> the same 299x299 RGB pixels.

The exported SavedModel decodes and resizes inside its graph (no OpenCV, no Python), so this
module re-implements `images.decode_image` and `images.resize_image` op by op. Measured
against them (tests/test_export.py, README "Export and serve"):

- JPEG: libjpeg's accurate integer DCT with fancy upsampling, as OpenCV uses: identical
  pixels (grayscale too); CMYK JPEGs +-1 (TensorFlow's own CMYK -> RGB). The EXIF
  orientation (all 8, either byte order) is applied as OpenCV does, read where OpenCV reads
  it: the first APP1 Exif segment before the image data that has one, however far in (after
  an ICC profile's 64 KB chunks), not bytes Exif\\0\\0 elsewhere (in a comment).
  A JPEG that ends before the end-of-image marker of its first image is refused; as in
  `images._truncated` its segments are walked (`jpeg_walk`, which finds the EXIF segment on
  the way), so data appended after that marker (a motion photo's MP4, a phone's trailer) does
  not matter. Only a JPEG of more than 16384 segments or fill bytes (no encoder writes one)
  falls back to the old rule over all bytes (no FF DA after the last FF D9), which such a
  trailer can fail.
- PNG (8/16-bit, gray, gray+alpha, RGB, RGBA, palette, gray or RGB with transparency):
  identical. Alpha (a gray or RGB PNG's transparent colour, from its tRNS chunk) is
  composited over white with OpenCV's formula; 16-bit without alpha keeps the top 8 bits.
  A PNG without IEND is refused. APNG (`png_animation`): TensorFlow decodes the IDAT image,
  OpenCV the first frame of an animation of two or more frames (acTL), which is the IDAT
  image only when an fcTL chunk covering the whole image comes before it: otherwise (a
  hidden default image, as Pillow's default_image=True writes) it is refused, as are the
  APNGs OpenCV refuses (0 frames, a first frame outside the image); 16-bit samples of
  such an animation without alpha are scaled by 1/255, OpenCV's rounding there.
- GIF: the first frame, identical, except transparent pixels: TensorFlow's decoder makes
  them black, `images.py` composites them over white. A first frame smaller than the GIF's
  logical screen is placed at its offset on a canvas of the screen's size in the background
  colour, as OpenCV does (`_decode_gif`), and refused where OpenCV refuses it.
- BMP: identical, an alpha channel is ignored (OpenCV reads BMP without it); an 8-bit
  paletted BMP's indices (TensorFlow's decoder gives them as gray) are looked up in its
  colour table (past the file's colours black, as OpenCV's). 1-, 4- and 16-bit BMPs are
  refused by TensorFlow's decoder.
- WebP: decoded by TensorFlow's libwebp; alpha composited over white. An animation: its
  first frame, as OpenCV's; one without the alpha flag crashed TensorFlow's decoder (heap
  overflow) and is decoded with the flag set, its alpha dropped as OpenCV drops it
  (`_decode_webp`).
- Not done: TIFF (no TensorFlow decoder: such an image is an error, like a corrupt file);
  the EXIF orientation of the other formats (rare; OpenCV applies it to JPEGs only too,
  except for the EXIF of a WebP or of an opaque PNG, which `caption` therefore applies and
  this does not: the README lists it among the known differences).
- Resizing: the shrinking axes with `tf.image.resize(method="area")` (the box filter of
  OpenCV's INTER_AREA; halving both sides rounds halves up like OpenCV's 2x2 path), the
  enlarging ones with OpenCV's INTER_CUBIC (a = -0.75, half-pixel centres, edge pixels
  repeated) written out as four-tap gathers, uint8 rounding between the passes as OpenCV.
  TensorFlow's own bicubic (Keys, a = -0.5) differs from OpenCV's by up to 12 levels.

Every failure (unknown format, corrupt or truncated data) is a TensorFlow error raised by the
op, so a caller can drop that image (`tf.data` `ignore_errors`) and keep the others.
"""

from __future__ import annotations

import tensorflow as tf

from caption_attn.backbone import IMAGE_SIZE

UNKNOWN, JPEG, PNG, GIF, BMP, WEBP = range(6)   # `sniff` codes, the branches of `decode`
_MAGIC = {JPEG: [(0, b"\xff\xd8\xff")], PNG: [(0, b"\x89PNG\r\n\x1a\n")],
          GIF: [(0, b"GIF87a"), (0, b"GIF89a")], BMP: [(0, b"BM")],
          WEBP: [(0, b"RIFF"), (8, b"WEBP")]}   # GIF: either; WebP: both
CUBIC_A = -0.75                                 # OpenCV's INTER_CUBIC coefficient
EXIF_MAX_ENTRIES = 64         # IFD0 entries read (Orientation is among the first few)
EXIF_SCAN = 1 << 16           # bytes searched for EXIF data when the segments cannot be walked


def sniff(data):
    """Format code (int32 scalar) of encoded bytes from their magic bytes, as images._sniff."""
    head = tf.strings.substr(data, 0, 12) + b"\0" * 12            # >= 12 bytes
    def at(pos, magic):
        return tf.equal(tf.strings.substr(head, pos, len(magic)), magic)
    found = {code: [at(pos, magic) for pos, magic in checks] for code, checks in _MAGIC.items()}
    matches = [tf.reduce_any(found[GIF]) if code == GIF else tf.reduce_all(hits)
               for code, hits in found.items()]
    return tf.reduce_max(tf.where(tf.stack(matches), tf.constant(list(_MAGIC)), UNKNOWN))


def _matches(raw, pattern: bytes):
    """(n,) bool: where `pattern` starts in the bytes `raw` (uint8)."""
    n = tf.maximum(tf.size(raw) - len(pattern) + 1, 0)
    hit = tf.ones([n], tf.bool)
    for k, byte in enumerate(pattern):
        hit &= tf.equal(raw[k:k + n], byte)                            # (n,)
    return hit


def _last(raw, pattern: bytes):
    """Last position (int32) of `pattern` in the bytes `raw` (n,) uint8, -1 if absent."""
    found = tf.cast(tf.where(_matches(raw, pattern))[-1:, 0], tf.int32)  # (0 or 1,)
    return tf.concat([[-1], found], 0)[-1]


def exif_orientation(data):
    """The EXIF Orientation (1-8, int32) of a JPEG's bytes (string scalar), found by the walk
    of `jpeg_walk`; 1 when absent or unreadable."""
    return jpeg_walk(tf.io.decode_raw(data, tf.uint8))[1]


def _app1_orientation(byte, tiff, end):
    """Tag 0x0112 of IFD0 (int32) in the TIFF data from byte `tiff` to `end` of an APP1 Exif
    segment, read in either byte order with `byte` (positions of any shape -> int32 bytes);
    -1 when IFD0 has no such tag or is outside the segment (OpenCV then reads the next one)."""
    little = tf.equal(byte(tiff), ord("I"))                           # "II": little endian

    def uint(pos, size):                                               # pos: any shape
        digits = byte(pos[..., None] + tf.range(size))                # (..., size)
        weights = 256 ** tf.where(little, tf.range(size), tf.range(size - 1, -1, -1))
        return tf.reduce_sum(digits * weights, axis=-1)

    ifd = tiff + uint(tiff + 4, 4)                                     # IFD0; < tiff: overflow
    entries = ifd + 2 + 12 * tf.range(EXIF_MAX_ENTRIES)                # (E,) 12-byte entries
    readable = (tf.range(EXIF_MAX_ENTRIES) < uint(ifd, 2)) & (entries + 10 <= end)  # (E,)
    hits = readable & tf.equal(uint(entries, 2), 0x0112) & (ifd >= tiff) & (ifd + 2 <= end)
    first = tf.argmax(tf.cast(hits, tf.int32), output_type=tf.int32)  # as OpenCV's tag map
    return tf.where(tf.reduce_any(hits), uint(entries[first] + 8, 2), -1)


def _orient(rgb, orientation):
    """Display `rgb` (H, W, 3) as EXIF `orientation` says (OpenCV's order of cases)."""
    transpose = lambda x: tf.transpose(x, [1, 0, 2])                   # noqa: E731
    cases = [lambda: rgb,                                              # 1 as stored
             lambda: tf.reverse(rgb, [1]),                             # 2 mirrored
             lambda: tf.reverse(rgb, [0, 1]),                          # 3 rotated 180
             lambda: tf.reverse(rgb, [0]),                             # 4 flipped
             lambda: transpose(rgb),                                   # 5 transposed
             lambda: tf.reverse(transpose(rgb), [1]),                  # 6 rotated 90 cw
             lambda: tf.reverse(transpose(rgb), [0, 1]),               # 7 transversed
             lambda: tf.reverse(transpose(rgb), [0])]                  # 8 rotated 90 ccw
    return tf.switch_case(orientation - 1, cases)


JPEG_WALK_STEPS = 1 << 14   # markers `jpeg_walk` follows before it gives up (None)
EXIF = list(b"Exif\0\0")   # how the payload of an APP1 segment of EXIF data starts


def jpeg_end(raw):
    """Where the first JPEG image in the bytes `raw` (n,) uint8 ends: see `jpeg_walk`."""
    return jpeg_walk(raw)[0]


def jpeg_walk(raw):
    """images._jpeg_end and the EXIF orientation in ops: (end, orientation), int32 scalars.

    end: where the first JPEG image in the bytes `raw` (n,) uint8 ends (after its EOI
    marker), -1 when the data ends first (a cut file), -2 (None there) when its marker
    structure cannot be followed, or after JPEG_WALK_STEPS markers (where images._jpeg_end
    goes on: more than 16384 fill bytes or segments, which no encoder writes; the caller then
    applies the old rule).

    orientation (1-8): the Orientation of IFD0 in the first APP1 segment before the first
    scan whose payload starts with Exif\\0\\0 and holds that tag, as OpenCV reads it (an ICC
    profile of 64 KB chunks or an XMP segment may come first, a comment may hold the same
    bytes); 1 when there is none, it is not 1-8, or the walk stops before it.

    The segments are walked by their lengths, one loop iteration per marker; a scan's
    entropy-coded data is skipped in one step to the first byte FF at or after its start that
    begins a marker (FF followed by neither 00, FF nor a restart marker D0-D7), found by a
    binary search among all such positions, which are listed once over all bytes. Bytes
    after the image (a motion photo's MP4) do not change the result, as in `caption`.
    """
    b = tf.cast(raw, tf.int32)                                        # (n,)
    n = tf.size(b)
    nxt = tf.concat([b[1:], [0]], 0)                                  # (n,) the following byte
    starts = tf.cast(tf.where(
        tf.equal(b, 0xFF) & (tf.range(n) < n - 1) & tf.not_equal(nxt, 0x00)
        & tf.not_equal(nxt, 0xFF) & ~((nxt >= 0xD0) & (nxt <= 0xD7)))[:, 0], tf.int32)
    # padded once here: a concat inside the loop copied all n bytes at every marker
    padded, starts_or_none = tf.concat([b, [0]], 0), tf.concat([starts, [-1]], 0)

    def byte(i):                                     # any shape; 0 past the end (and before)
        return tf.gather(padded, tf.clip_by_value(i, 0, n))

    def step(i, end, orientation):                   # orientation -1: still looking
        marker = byte(i + 1)
        length = byte(i + 2) * 256 + byte(i + 3)
        after = i + 2 + length                                        # past a segment
        scan_end = tf.searchsorted(starts, [after])[0]                # first start >= after
        next_marker = tf.gather(starts_or_none, scan_end)             # -1: none (cut)
        cases = [
            (i + 1 >= n, (i, -1)),                                    # ends before a marker
            (tf.not_equal(byte(i), 0xFF), (i, -2)),                   # not a marker: lost
            (tf.equal(marker, 0xFF), (i + 1, end)),                   # fill byte
            (tf.equal(marker, 0xD9), (i, i + 2)),                     # EOI
            (((marker >= 0xD0) & (marker <= 0xD7)) | tf.equal(marker, 0x01), (i + 2, end)),
            (i + 4 > n, (i, -1)),                                     # cut inside a length
            (tf.equal(marker, 0xDA), (next_marker, tf.where(next_marker < 0, -1, end))),
        ]
        new_i, new_end = after, end                                   # any other segment
        for condition, (ci, ce) in reversed(cases):                   # the first match wins
            new_i, new_end = tf.where(condition, ci, new_i), tf.where(condition, ce, new_end)
        segment = ~tf.reduce_any(tf.stack([c for c, _ in cases[:-1]]))  # a marker + length
        exif = segment & tf.equal(marker, 0xE1) & tf.equal(orientation, -1) & (length >= 8) \
            & tf.reduce_all(tf.equal(byte(i + 4 + tf.range(6)), EXIF))
        orientation = tf.cond(exif, lambda: _app1_orientation(byte, i + 10, tf.minimum(
            after, n)), lambda: orientation)
        scan = segment & tf.equal(marker, 0xDA) & tf.equal(orientation, -1)
        return new_i, new_end, tf.where(scan, 0, orientation)         # none before the scan

    _, end, orientation = tf.while_loop(lambda i, end, _: tf.equal(end, -3), step,
                                        (tf.constant(2), tf.constant(-3), tf.constant(-1)),
                                        maximum_iterations=JPEG_WALK_STEPS)
    end = tf.where(tf.equal(end, -3), -2, end)
    # A structure the walk cannot follow (libjpeg skips stray bytes between segments, and
    # OpenCV still finds the EXIF data): the first bytes Exif\0\0 of the first EXIF_SCAN
    orientation = tf.cond(tf.equal(end, -2) & (orientation < 1),
                          lambda: _searched_orientation(padded, n, byte), lambda: orientation)
    orientation = tf.where((orientation >= 1) & (orientation <= 8), orientation, 1)
    return end, orientation


def _searched_orientation(padded, n, byte):
    """The Orientation (int32, -1 if none) of the APP1 payload at the first bytes Exif\0\0
    among the first EXIF_SCAN of a JPEG's bytes `padded` (n + 1,) int32 (a 0 after them),
    read with `jpeg_walk`'s `byte`."""
    head = padded[:tf.minimum(n, EXIF_SCAN)]
    found = tf.cast(tf.where(_matches(head, b"Exif\0\0"))[:1, 0], tf.int32)   # (0 or 1,)
    start = tf.concat([found, [-1]], 0)[0]
    payload_end = tf.minimum(start + 6 + (1 << 16), n)       # a segment holds < 64 KB
    return tf.where(start >= 0, _app1_orientation(byte, start + 6, payload_end), -1)


def _refuse_truncated(raw, fmt, end=None):
    """Assert ops of images._truncated on the bytes `raw` (n,) uint8: a JPEG needs an
    end-of-image marker after its first image (`end`, from `jpeg_walk`; or, when its structure
    cannot be followed, after its last scan), a PNG an IEND chunk."""
    if fmt == JPEG:
        ok = tf.cond(tf.equal(end, -2),
                     lambda: _last(raw, b"\xff\xd9") >= _last(raw, b"\xff\xda"),  # the old rule
                     lambda: end >= 0)
    else:
        ok = _last(raw, b"IEND") >= 0
    return tf.debugging.Assert(ok, ["truncated image"])


def _to_rgb(raw, peak, keep_alpha: bool):
    """raw (H, W, C) integers up to `peak`, C = 1-4 -> uint8 RGB (H, W, 3).

    Gray becomes RGB. With `keep_alpha` an alpha channel (C 2 or 4) is composited over white
    exactly as images._composite_alpha; otherwise it is dropped. 16-bit values without alpha
    keep their top 8 bits (OpenCV's conversion)."""
    channels = tf.shape(raw)[-1]
    raw = tf.cast(raw, tf.int32)                                       # (H, W, C)
    color = tf.cond(channels < 3, lambda: tf.repeat(raw[..., :1], 3, axis=-1),
                    lambda: raw[..., :3])                              # (H, W, 3)

    def composite():
        alpha = tf.cast(raw[..., -1:], tf.float32) / peak              # (H, W, 1)
        rgb = tf.cast(color, tf.float32) / peak * alpha + (1.0 - alpha)  # (H, W, 3) over white
        return tf.cast(tf.round(rgb * 255.0), tf.uint8)

    def opaque():
        return tf.cast(tf.where(peak > 255.0, color // 256, color), tf.uint8)

    if not keep_alpha:
        return opaque()
    return tf.cond(tf.equal(channels % 2, 0), composite, opaque)


def _uint(data, pos, size: int, little: bool = False):
    """The unsigned integer (int64) of `size` bytes at byte `pos` of the string `data`
    (big-endian, or `little`); bytes past its end must have been padded on by the caller."""
    digits = tf.io.decode_raw(tf.strings.substr(data, tf.cast(pos, tf.int64),
                                                tf.constant(size, tf.int64)), tf.uint8)
    order = range(size) if little else range(size - 1, -1, -1)
    weights = tf.constant([256 ** k for k in order], tf.int64)
    return tf.reduce_sum(tf.cast(digits, tf.int64) * weights)


def _decode_bmp(data):
    """A BMP as OpenCV reads it: TensorFlow's decoder gives an 8-bit paletted BMP's (a
    256-colour or grayscale one) palette indices, looked up here in its colour table; alpha is
    dropped (OpenCV reads BMP without it). 1-, 4- and 16-bit BMPs: TensorFlow refuses them."""
    raw = tf.io.decode_bmp(data, 0)                                    # (H, W, C) uint8
    padded = data + b"\0" * 64
    paletted = (_uint(padded, 28, 2, little=True) <= 8) & tf.equal(tf.shape(raw)[-1], 1)

    def looked_up():
        colours = _uint(padded, 46, 4, little=True)                    # 0: 2 ** bits
        colours = tf.where(colours == 0, tf.constant(256, tf.int64), colours)
        start = 14 + _uint(padded, 14, 4, little=True)                 # after the DIB header
        with tf.control_dependencies([tf.debugging.Assert(colours <= 256, [
                "a BMP colour table of more than 256 colours (OpenCV refuses it)"])]):
            table = tf.reshape(tf.io.decode_raw(tf.strings.substr(padded, start, 4 * colours),
                                                tf.uint8), [-1, 4])    # (N, 4) B, G, R, 0
        # OpenCV's table has 256 entries, those past the file's black: so has this one
        table = tf.pad(table[:, 2::-1], [[0, 256 - tf.shape(table)[0]], [0, 0]])
        return tf.gather(table, tf.cast(raw[..., 0], tf.int32))        # (H, W, 3) RGB
    return tf.cond(paletted, looked_up, lambda: _to_rgb(raw, 255.0, keep_alpha=False))


def png_transparent(data):
    """The sample values (int64 (3,)) a gray or RGB PNG's tRNS chunk makes transparent, on the
    decoded scale (gray: its one value three times, 1/2/4-bit stretched to 0..255); -1s when
    there is none. TensorFlow's decoder ignores the tRNS of both. OpenCV turns an RGB PNG's
    into alpha and ignores a gray one's, which images._png_gray_transparent reads instead: both
    are composited over white there, and here."""
    padded = data + b"\0" * 16                                       # reads past the end: 0
    n = tf.cast(tf.strings.length(data), tf.int64)

    def uint(pos, size):                                               # big-endian, at pos
        return _uint(padded, pos, size)

    colour = uint(25, 1)
    gray, rgb = tf.equal(colour, 0), tf.equal(colour, 2)
    needed = tf.where(gray, tf.constant(2, tf.int64), 6)               # tRNS bytes it needs

    def chunk(pos, key):                                               # key[0] -2: looking
        kind = tf.strings.substr(padded, pos + 4, tf.constant(4, tf.int64))
        length = uint(pos, 4)
        last = tf.equal(kind, b"IDAT") | tf.equal(kind, b"IEND")       # the pixels: no tRNS
        found = tf.equal(kind, b"tRNS") & (length >= needed)
        samples = tf.stack([uint(pos + 8, 2), uint(pos + 10, 2), uint(pos + 12, 2)])
        samples = tf.where(gray, tf.fill([3], samples[0]), samples)
        key = tf.where(found, samples, tf.where(last, tf.fill([3], tf.constant(-1, tf.int64)),
                                                key))
        return pos + 12 + length, key

    _, key = tf.while_loop(lambda pos, key: tf.equal(key[0], -2) & (pos + 8 <= n), chunk,
                           (tf.constant(8, tf.int64),    # chunks walked for gray/RGB only
                            tf.fill([3], tf.where(gray | rgb, tf.constant(-2, tf.int64), -1))))
    depth = uint(24, 1)
    stretch = 255 // tf.maximum(2 ** tf.minimum(depth, 8) - 1, 1)     # 1-bit 255, 2-bit 85 ...
    key = tf.where(depth < 8, key * stretch, key)
    return tf.where((gray | rgb) & (key[0] >= 0), key, -1)


def png_animation(data):
    """The APNG chunks before a PNG's first IDAT chunk, as OpenCV reads them (those after it
    do not decide which picture it shows): (frames, fctl, sizes_ok). frames (int64): the
    num_frames of the last acTL chunk, -1 without one; fctl (int64 (6,)): the width, height,
    x and y offsets, dispose and blend ops of the last fcTL chunk, -1s without one; sizes_ok:
    every acTL chunk holds 8 bytes and every fcTL chunk 26 (OpenCV refuses others)."""
    padded = data + b"\0" * 40                                        # reads past the end: 0
    n = tf.cast(tf.strings.length(data), tf.int64)

    def uint(pos, size):                                               # big-endian, at pos
        return _uint(padded, pos, size)

    def chunk(pos, frames, fctl, sizes_ok):
        kind = tf.strings.substr(padded, pos + 4, tf.constant(4, tf.int64))
        length = uint(pos, 4)
        actl, fctl_here = tf.equal(kind, b"acTL"), tf.equal(kind, b"fcTL")
        frames = tf.where(actl, uint(pos + 8, 4), frames)
        fields = tf.stack([uint(pos + 12, 4), uint(pos + 16, 4), uint(pos + 20, 4),
                           uint(pos + 24, 4), uint(pos + 32, 1), uint(pos + 33, 1)])
        fctl = tf.where(fctl_here, fields, fctl)
        sizes_ok &= ~(actl & (length != 8)) & ~(fctl_here & (length != 26))
        return pos + 12 + length, frames, fctl, sizes_ok

    def more(pos, *_):                       # up to the first IDAT (or IEND, or the end)
        kind = tf.strings.substr(padded, pos + 4, tf.constant(4, tf.int64))
        return (pos + 8 <= n) & tf.not_equal(kind, b"IDAT") & tf.not_equal(kind, b"IEND")

    minus_one = tf.constant(-1, tf.int64)
    _, frames, fctl, sizes_ok = tf.while_loop(
        more, chunk, (tf.constant(8, tf.int64), minus_one, tf.fill([6], minus_one),
                      tf.constant(True)))
    return frames, fctl, sizes_ok


def _refuse_animation(data, frames, fctl, sizes_ok):
    """Assert ops refusing the APNGs (`png_animation`) OpenCV refuses (0 frames, a first fcTL
    outside the image or with unknown dispose/blend ops, acTL/fcTL chunks of other sizes), and
    those of two or more frames where OpenCV shows another picture than the IDAT image
    TensorFlow decodes: the first animation frame when the IDAT image is no frame (no fcTL
    before it), the IDAT image cropped onto black when its fcTL does not cover the image."""
    width, height = _uint(data + b"\0" * 24, 16, 4), _uint(data + b"\0" * 24, 20, 4)  # IHDR
    w, h, x, y, dispose, blend = tf.unstack(fctl)
    inside = (x + w <= width) & (y + h <= height) & (dispose <= 2) & (blend <= 1)
    whole = tf.equal(x, 0) & tf.equal(y, 0) & tf.equal(w, width) & tf.equal(h, height)
    return [tf.debugging.Assert(sizes_ok & tf.not_equal(frames, 0) & ((w < 0) | inside), [
                "an APNG OpenCV refuses (no frames, or a bad first frame or chunk)"]),
            tf.debugging.Assert((frames <= 1) | whole, [
                "an APNG whose first frame is not its whole IDAT image (OpenCV shows that frame)"])]


def _decode_png(data):
    """A PNG as OpenCV reads it: alpha and a tRNS colour composited over white, 16 bits to 8;
    an APNG (`png_animation`) of two or more frames, which OpenCV reads frame by frame, is
    refused where its first frame is not the IDAT image TensorFlow decodes, and its 16-bit
    samples without alpha are scaled by 1/255 (OpenCV's convertTo there), not cut to 8 bits."""
    frames, fctl, sizes_ok = png_animation(data)
    with tf.control_dependencies(_refuse_animation(data, frames, fctl, sizes_ok)):
        depth16 = tf.equal(tf.strings.substr(data, 24, 1), b"\x10")  # IHDR bit depth
    raw = tf.cond(depth16, lambda: tf.cast(tf.io.decode_png(data, 0, tf.uint16), tf.int32),
                  lambda: tf.cast(tf.io.decode_png(data, 0, tf.uint8), tf.int32))
    peak = tf.where(depth16, 65535.0, 255.0)
    key = tf.cast(png_transparent(data), tf.int32)
    channels = tf.shape(raw)[-1]

    def keyed_alpha():                      # gray or RGB + alpha: 0 where the key colour is
        clear = tf.reduce_all(tf.equal(raw, key[:channels]), axis=-1, keepdims=True)
        return tf.concat([raw, tf.where(clear, 0, tf.cast(peak, tf.int32))], -1)
    raw = tf.cond((key[0] >= 0) & ((channels == 1) | (channels == 3)), keyed_alpha,
                  lambda: raw)                                         # (H, W, C)
    scaled = depth16 & (frames > 1) & tf.equal(tf.shape(raw)[-1] % 2, 1)  # no alpha
    raw = tf.cond(scaled, lambda: tf.minimum((raw + 127) // 255, 255), lambda: raw)
    return _to_rgb(raw, tf.where(scaled, 255.0, peak), keep_alpha=True)


def _gif_frame(data):
    """Where the first frame of a GIF's bytes (string scalar) lies on its logical screen, as
    OpenCV reads them: int32 (position of its image descriptor or -1 when the blocks before it
    cannot be followed, left, top, width, height, screen width, screen height, canvas colour
    (3,), whether the background index is in the global colour table or there is none). The
    descriptor (0x2C) follows the header (13 bytes), the global colour table and
    any extension blocks (0x21, a label, then sub-blocks of a length byte each up to a 0)."""
    b = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)           # (n,)
    n = tf.size(b)
    padded = tf.concat([b, [0]], 0)

    def byte(i):                                     # any shape; 0 past the end
        return tf.gather(padded, tf.clip_by_value(i, 0, n))

    def word(i):                                     # little-endian 16 bits
        return byte(i) + 256 * byte(i + 1)

    flags = byte(10)
    colours = tf.where(flags >= 0x80, 2 ** (flags % 8 + 1), 0)       # global table entries

    def step(pos, inside):           # inside: among an extension's sub-blocks, at a length
        length = byte(pos)
        return (tf.where(inside, pos + 1 + length, pos + 2),
                tf.where(inside, tf.not_equal(length, 0), True))

    pos, _ = tf.while_loop(
        lambda pos, inside: (pos < n) & (inside | tf.equal(byte(pos), 0x21)), step,
        (13 + 3 * colours, tf.constant(False)))
    found = (pos + 9 < n) & tf.equal(byte(pos), 0x2C)
    bg = byte(11)
    table = 13 + 3 * tf.minimum(bg, tf.maximum(colours - 1, 0)) + tf.range(3)
    colour = tf.where(bg < colours, byte(table), 0)                   # OpenCV's canvas
    # images.py reads a GIF with a transparency flag in its first graphic control extension
    # (found by its bytes 21 F9 04) with alpha and composites it over white: the canvas too
    gce = tf.cast(tf.where(_matches(tf.cast(padded[:-1], tf.uint8), b"\x21\xf9\x04"))
                  [:1, 0], tf.int32)
    gce = tf.concat([gce, [-1]], 0)[0]
    alpha = (gce >= 0) & (gce + 3 < n) & tf.equal(byte(gce + 3) % 2, 1)
    colour = tf.where(alpha, 255, colour)
    return (tf.where(found, pos, -1), word(pos + 1), word(pos + 3), word(pos + 5),
            word(pos + 7), word(6), word(8), colour, (colours == 0) | (bg < colours))


def _decode_gif(data):
    """A GIF's first frame as OpenCV reads it: drawn at its offset on a canvas of the GIF's
    logical screen (bytes 6-9), in the colour of the background index of the global colour
    table (black without one; white for a GIF images.py composites over white). TensorFlow's
    decoder gives a canvas of the largest frame's size, where a first frame at an offset was
    cut off or left black: the frame is decoded with its offset set to 0 in a copy of the
    bytes, then placed. A frame that does not fit its screen is refused (as by OpenCV)."""
    pos, left, top, width, height, screen_w, screen_h, colour, background_ok = \
        _gif_frame(data)
    fits = (width > 0) & (height > 0) & (left + width <= screen_w) & (top + height <= screen_h)
    with tf.control_dependencies([tf.debugging.Assert((pos < 0) | fits, [
            "a GIF whose first frame lies outside its logical screen (OpenCV refuses it)"]),
            tf.debugging.Assert(background_ok, ["a GIF whose background colour index is "
                                                "past its colour table (OpenCV refuses it)"])]):
        moved = (pos >= 0) & ((left > 0) | (top > 0))
    at_origin = tf.cond(moved, lambda: tf.strings.join([
        tf.strings.substr(data, 0, pos + 1), b"\0\0\0\0", tf.strings.substr(data, pos + 5, -1)]),
        lambda: data)
    frame = tf.io.decode_gif(at_origin)[0]                             # (h', w', 3)
    placed = (pos >= 0) & ((screen_w != width) | (screen_h != height) | moved
                           | (tf.shape(frame)[0] != height) | (tf.shape(frame)[1] != width))

    def place():
        image = tf.pad(frame[:height, :width], [[top, screen_h - top - height],
                                                [left, screen_w - left - width], [0, 0]])
        inside = tf.pad(tf.ones([height, width, 1], tf.bool),
                        [[top, screen_h - top - height], [left, screen_w - left - width],
                         [0, 0]])
        return tf.where(inside, image, tf.cast(colour, tf.uint8))
    return tf.cond(placed, place, lambda: frame)


WEBP_ANIMATION, WEBP_ALPHA = 0x02, 0x10   # flags of a WebP's VP8X chunk (its byte 20)
_BYTES = bytes(range(256))                # a byte value v as a string: substr(_BYTES, v, 1)


def webp_opaque_animation(data):
    """Whether a WebP's bytes (string scalar) are an animation without the alpha flag: its
    first chunk (bytes 12-15, after RIFF, the size and WEBP) is VP8X, whose flags (byte 20,
    the low byte of a little-endian word) have WEBP_ANIMATION but not WEBP_ALPHA. libwebp's
    WebPGetFeatures reads has_animation and has_alpha from these two bits."""
    head = tf.strings.substr(data, 0, 21) + b"\0" * 21                  # >= 21 bytes
    flags = tf.cast(tf.io.decode_raw(tf.strings.substr(head, 20, 1), tf.uint8)[0], tf.int32)
    return (tf.equal(tf.strings.substr(head, 12, 4), b"VP8X")
            & tf.not_equal(flags & WEBP_ANIMATION, 0) & tf.equal(flags & WEBP_ALPHA, 0))


def _decode_webp(data):
    """A WebP's first frame as OpenCV reads it. TensorFlow's decoder gives an animation's
    frames as RGBA (libwebp's animation decoder) but sizes its output for RGB when the file
    has no alpha flag: a heap overflow that aborted or crashed the whole process. Such a file
    is decoded with the flag set in a copy of its bytes (WEBP_ALPHA changes nothing else for
    libwebp), and its alpha dropped as OpenCV drops it (RGB of the same canvas: black where
    the first frame does not cover it); an animation with alpha is composited over white,
    as `images.py` does. Only the first frame is decoded (expand_animations=False)."""
    opaque = webp_opaque_animation(data)

    def flagged():
        flags = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 20, 1), tf.uint8)[0], tf.int32)
        return tf.strings.join([tf.strings.substr(data, 0, 20),
                                tf.strings.substr(_BYTES, flags | WEBP_ALPHA, 1),
                                tf.strings.substr(data, 21, -1)])
    raw = tf.io.decode_image(tf.cond(opaque, flagged, lambda: data), channels=0,
                             expand_animations=False)                  # (H, W, 3 or 4)
    return tf.cond(opaque, lambda: _to_rgb(raw, 255.0, keep_alpha=False),
                   lambda: _to_rgb(raw, 255.0, keep_alpha=True))


def decode(data):
    """Encoded bytes (string scalar) -> uint8 RGB (H, W, 3) like images.decode_image; a
    TensorFlow error (InvalidArgumentError) for anything it refuses."""
    fmt = sniff(data)

    def unknown():
        with tf.control_dependencies([tf.debugging.Assert(False, ["not an image"])]):
            return tf.zeros([0, 0, 3], tf.uint8)

    def jpeg():
        raw = tf.io.decode_raw(data, tf.uint8)                        # (n,)
        end, orientation = jpeg_walk(raw)                             # one walk for both
        with tf.control_dependencies([_refuse_truncated(raw, JPEG, end)]):
            rgb = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        return _orient(rgb, orientation)

    def png():
        with tf.control_dependencies([_refuse_truncated(tf.io.decode_raw(data, tf.uint8), PNG)]):
            return _decode_png(data)

    branches = {UNKNOWN: unknown, JPEG: jpeg, PNG: png,
                GIF: lambda: _decode_gif(data),                        # first frame
                BMP: lambda: _decode_bmp(data),
                WEBP: lambda: _decode_webp(data)}
    rgb = tf.switch_case(fmt, [branches[code] for code in sorted(branches)])
    return tf.ensure_shape(rgb, [None, None, 3])


def _cubic(x, axis: int, size: int):
    """OpenCV's INTER_CUBIC along `axis` of float x (H, W, C) up to `size` samples."""
    n = tf.shape(x)[axis]
    scale = tf.cast(n, tf.float64) / size
    src = tf.cast((tf.range(size, dtype=tf.float64) + 0.5) * scale - 0.5, tf.float32)  # (S,)
    left = tf.floor(src)
    t = (src - left)[:, None]                                          # (S, 1) in [0, 1)
    a = CUBIC_A
    c0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    c1 = ((a + 2) * t - (a + 3)) * t * t + 1
    c2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    weights = tf.concat([c0, c1, c2, 1 - c0 - c1 - c2], axis=1)       # (S, 4)
    taps = tf.cast(left, tf.int32)[:, None] + tf.range(-1, 3)          # (S, 4)
    taps = tf.clip_by_value(taps, 0, n - 1)                            # edge pixels repeat
    picked = tf.gather(x, taps, axis=axis)          # axis 0: (S, 4, W, C); axis 1: (H, S, 4, C)
    shape = [size, 4, 1] if axis == 0 else [size, 4]
    return tf.reduce_sum(picked * tf.reshape(weights, shape + [1]), axis=axis + 1)


def resize(rgb, size: int = IMAGE_SIZE):
    """uint8 RGB (H, W, 3) -> (size, size, 3) like images.resize_image: stretched, the
    shrinking axes averaged (area), the enlarging ones cubic, shrink first."""
    h, w = tf.shape(rgb)[0], tf.shape(rgb)[1]
    x = tf.cast(rgb, tf.float32)                                       # (H, W, 3)
    h_to, w_to = tf.minimum(h, size), tf.minimum(w, size)

    def shrink():  # one INTER_AREA pass over the shrinking axes, stored as uint8 by OpenCV
        y = tf.image.resize(x[None], [h_to, w_to], method="area")[0]  # (h_to, w_to, 3)
        halves = tf.equal(h, 2 * h_to) & tf.equal(w, 2 * w_to)        # OpenCV's 2x2 path
        return tf.where(halves, tf.floor(y + 0.5), tf.round(y))      # rounds halves up

    x = tf.cond((h > size) | (w > size), shrink, lambda: x)
    x = tf.cond(h < size, lambda: _cubic(x, 0, size), lambda: x)       # (size, ., 3)
    x = tf.cond(w < size, lambda: _cubic(x, 1, size), lambda: x)       # (size, size, 3)
    x = tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(x, [size, size, 3])


def load(data):
    """Encoded bytes -> uint8 (299, 299, 3): `images.load_image` after the file is read."""
    return resize(decode(data))
