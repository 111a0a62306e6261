"""Sample images and extraction settings shared by the image, backbone, cache and extract
tests (the fixtures built from them are in conftest.py).

`make_images` renders GOOD images in many formats (OpenCV, and Pillow for CMYK/EXIF/GIF) and
BAD files whose load_image error is the reason in BAD (missing.jpg is not written).
"""

import os
import shutil
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from caption_attn.config import ExtractConfig

GOOD = ["a.jpg", "b.png", "sub/c.jpg", "sub/deeper/d.jpg", "gray.jpg", "rgba.png", "cmyk.jpg",
        "anim.gif", "bitmap.bmp", "exif6.jpg"]
BAD = {"truncated.jpg": "truncated", "empty.jpg": "empty file (0 bytes)",
       "notes.jpg": "not an image (unrecognised format)", "missing.jpg": "missing"}
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def scene(seed: int, width: int = 320, height: int = 240) -> np.ndarray:
    """RGB uint8 (H, W, 3): a few filled shapes on a gradient."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 220, width, dtype=np.float32)[None, :, None]         # (1, W, 1)
    img = np.ascontiguousarray(np.broadcast_to(ramp, (height, width, 3)), dtype=np.uint8)
    for _ in range(3):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(img, center, int(rng.integers(15, 70)), color, -1)
    return img


def bands(height: int = 60, width: int = 40) -> np.ndarray:
    """RGB (H, W, 3): red top third, green middle, blue bottom."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 3], img[height // 3: 2 * height // 3], img[2 * height // 3:] = RED, GREEN, BLUE
    return img


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, body, CRC."""
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def png_file(width: int, height: int, depth: int, colour_type: int, pixels: bytes,
             before_idat: bytes = b"") -> bytes:
    """A PNG written by hand (OpenCV cannot write tRNS or 1/2/4-bit gray): `pixels` are the
    packed rows, each given the filter byte 0 here; `before_idat` are extra chunks."""
    stride = len(pixels) // height
    rows = b"".join(b"\x00" + pixels[y * stride:(y + 1) * stride] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0,
                                             0))
            + before_idat + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b""))


def write_rgb(path, rgb, *params):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), list(params))


def make_images(root) -> None:
    """GOOD and BAD images (but missing.jpg) under `root`, plus files list_images skips."""
    root = str(root)
    for i, key in enumerate(["a.jpg", "b.png", "sub/c.jpg", "sub/deeper/d.jpg"]):
        write_rgb(os.path.join(root, key), scene(i))
    write_rgb(os.path.join(root, "bitmap.bmp"), scene(7, 100, 80))
    Image.fromarray(scene(4)).convert("L").save(os.path.join(root, "gray.jpg"))
    rgba = np.dstack([bands(), np.full((60, 40), 255, np.uint8)])              # (60, 40, 4)
    rgba[:, :20] = 0                                                            # left: transparent
    Image.fromarray(rgba, "RGBA").save(os.path.join(root, "rgba.png"))
    Image.fromarray(bands()).convert("CMYK").save(os.path.join(root, "cmyk.jpg"), quality=95)
    first = Image.fromarray(np.full((50, 50, 3), RED, np.uint8))
    second = Image.fromarray(np.full((50, 50, 3), BLUE, np.uint8))
    first.save(os.path.join(root, "anim.gif"), save_all=True, append_images=[second],
               duration=100, loop=0)
    exif_image = Image.fromarray(bands())
    exif = exif_image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif_image.save(os.path.join(root, "exif6.jpg"), exif=exif.tobytes(), quality=95)
    # bad ones
    write_rgb(os.path.join(root, "full.jpg"), scene(9, 400, 300))
    with open(os.path.join(root, "full.jpg"), "rb") as f:
        data = f.read()
    os.remove(os.path.join(root, "full.jpg"))
    with open(os.path.join(root, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    open(os.path.join(root, "empty.jpg"), "wb").close()
    with open(os.path.join(root, "notes.jpg"), "w") as f:
        f.write("these are not pixels\n")
    # ignored by list_images
    with open(os.path.join(root, "readme.txt"), "w") as f:
        f.write("not an image extension\n")
    os.makedirs(os.path.join(root, ".hidden"))
    write_rgb(os.path.join(root, ".hidden", "x.jpg"), scene(5))


def extract_cfg(cache, **overrides) -> ExtractConfig:
    """The tests' extraction: seeded random backbone, float16 files, batches of 4."""
    return ExtractConfig(**{"cache": str(cache), "weights": "random", "seed": 0,
                            "dtype": "float16", "batch_size": 4, **overrides})


def run_as_user(code: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    """`python -c code args` in a process to which file permissions apply: as root, without
    the capabilities that read and search any file (setpriv), as a user who does not own the
    files would be; skips the test when root cannot drop them."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root reads every file, and setpriv is missing to drop that")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    # PYTHONPATH: the caption_attn of this checkout, not the one installed in the interpreter
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([*prefix, sys.executable, "-c", code, *args], cwd=cwd, text=True,
                          capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                                                    "PYTHONPATH": root})
