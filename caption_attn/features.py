"""InceptionV3 feature cache: image decoding, the backbone, and the resumable `.npy` cache.

`extract_features` turns every image under `--images` into `<cache>/<image key>.npy`, a
(64, 2048) array: InceptionV3's last 8x8x2048 map (ImageNet preprocessing, no top), flattened
row-major (position = row * 8 + col) and multiplied by the cache's `feature_scale`.

Cache layout:
    <cache>/manifest.json            backbone, weights identity, dtype, image size, resize method,
                                     feature_scale, .npy header length, count, format version
    <cache>/<key>.npy                one file per image; key = path relative to --images
    <cache>/failed.tsv               key<TAB>reason of images that could not be extracted
    <cache>/backbone_random_seed{S}.weights.h5   random backbone weights (`--weights random`)
    <cache>/.lock                    flock'ed around every manifest / failed.tsv update

Guarantees:
- Atomic files: a feature is written to a hidden temporary name in its folder and renamed into
  place, so a killed run never leaves a truncated file under a final name. Stale temporary
  files (their process is gone) are removed by the next run.
- Resume: a rerun skips images whose file passes the quick check (size and exact header) and
  extracts the rest; `verify` loads every file and re-extracts invalid ones.
- Identity: a cache holds features of one backbone only; extracting into a cache made with other
  weights, dtype, precision or image size is refused.
- Sharding: shard = sha256(key) mod num_shards; shards may write into one cache concurrently.

Images are decoded with OpenCV and resized by `resize_image` (see there); `load_image` is the
one entry point, used both here and by `caption`, so both see identical pixels.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import functools
import hashlib
import io
import math
import os
import queue
import random
import re
import socket
import sys
import threading
import time
from typing import Iterable, Optional

import cv2
import numpy as np

from caption_attn.backbone import FEATURE_SHAPE, IMAGE_SIZE
from caption_attn.config import BACKBONE_PRECISIONS as PRECISIONS
from caption_attn.config import DTYPE_POLICIES, ExtractConfig
from caption_attn.config import FEATURE_DTYPES as DTYPES
from caption_attn.data import image_key_problem
from caption_attn.fileio import HOST, atomic_path, read_json, write_bytes_atomic, write_json_atomic
from caption_attn.errors import UserError

FORMAT_VERSION = 1               # bump when the meaning of cached files changes
BACKBONE = "InceptionV3"
RESIZE_METHOD = ("stretch to 299x299 (aspect ratio not kept, no crop); per axis INTER_AREA "
                 "when shrinking, INTER_CUBIC when enlarging; alpha composited over white")
PREPROCESS = "keras.applications.inception_v3.preprocess_input (x / 127.5 - 1)"
FEATURE_LAYOUT = "row-major 8x8 grid: position = row * 8 + col"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".gif", ".webp", ".tif",
                    ".tiff")
MANIFEST = "manifest.json"
FAILED = "failed.tsv"
LOCK = ".lock"

# Keras' own file name, URL and md5 of the no-top ImageNet weights (keras.applications).
IMAGENET_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
                + IMAGENET_FILE)
IMAGENET_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"
DOWNLOAD_TIMEOUT_S = 30          # per socket operation: a black-holed network fails, not hangs
CALIBRATION_SEED = 20240601      # synthetic calibration images for feature_scale
STALE_TEMP_AGE_S = 3600          # temp files of other hosts older than this are stale
_TEMP_RE = re.compile(r"^\.(?P<base>.+)\.tmp\.(?P<pid>\d+)\.(?P<host>.+?)(\.weights\.h5)?$")


# =========================================================================== images
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
    return None


def _truncated(data: bytes, fmt: Optional[str]) -> bool:
    """True when a JPEG has no end-of-image marker after its last scan, or a PNG no IEND.

    Some OpenCV/libjpeg builds decode a truncated JPEG "successfully" with a gray bottom; the
    markers cannot occur inside entropy-coded data, so their absence means a cut file.
    """
    if fmt == "jpeg":
        return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")
    if fmt == "png":
        return data.rfind(b"IEND") == -1
    return False


def _may_have_alpha(data: bytes, fmt: Optional[str]) -> bool:
    """Cheap header test; only these images pay for a second, alpha-preserving decode."""
    if fmt == "png":
        idat = data.find(b"IDAT")
        return (len(data) > 25 and data[25] in (4, 6)) or data.find(b"tRNS", 0, idat) != -1
    if fmt == "gif":
        gce = data.find(b"\x21\xf9\x04")  # graphic control extension: bit 0 = transparency
        return gce != -1 and len(data) > gce + 3 and bool(data[gce + 3] & 1)
    return fmt in ("webp", "tiff")


def _composite_alpha(raw: np.ndarray) -> np.ndarray:
    """BGRA (uint8 or uint16) -> RGB uint8 composited over white."""
    peak = 65535.0 if raw.dtype == np.uint16 else 255.0
    bgra = raw.astype(np.float32) / peak                    # (H, W, 4) in [0, 1]
    rgb, alpha = bgra[..., 2::-1], bgra[..., 3:]            # (H, W, 3), (H, W, 1)
    out = rgb * alpha + (1.0 - alpha)                       # (H, W, 3) over white
    return np.rint(out * 255.0).astype(np.uint8)


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes -> RGB uint8 (H, W, 3) at the original size; raises ImageError.

    JPEG/PNG/BMP/GIF (first frame)/WebP/TIFF and whatever else OpenCV reads. Grayscale and CMYK
    become RGB, the EXIF orientation is applied (OpenCV's IMREAD_COLOR does it), 16-bit images
    are scaled to 8 bits. Images with an alpha channel are composited over white (what a viewer
    shows; the colour under transparent pixels is often arbitrary); for those the EXIF
    orientation is not applied (OpenCV only keeps alpha with IMREAD_UNCHANGED, which ignores
    it; PNG/WebP files very rarely carry an orientation).
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    fmt = _sniff(data)
    if _truncated(data, fmt):
        raise ImageError("truncated")
    buf = np.frombuffer(data, np.uint8)
    try:
        if _may_have_alpha(data, fmt):
            raw = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            if raw is not None and raw.ndim == 3 and raw.shape[2] == 4:
                return _composite_alpha(raw)
        rgb = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    except cv2.error as e:
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


def load_image(path: str) -> np.ndarray:
    """Image file -> uint8 (299, 299, 3) RGB exactly as extraction sees it; raises ImageError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError("missing") from None
    except IsADirectoryError:
        raise ImageError("not a file (a folder)") from None
    except OSError as e:
        raise ImageError(f"unreadable ({e.strerror})") from None
    return resize_image(decode_image(data))


def list_images(images_dir: str) -> list[str]:
    """Keys (sorted POSIX paths relative to `images_dir`) of every image file under it.

    Files are recognised by extension (IMAGE_EXTENSIONS, any case); hidden files and folders
    (name starting with ".") are skipped.
    """
    if not os.path.isdir(images_dir):
        raise UserError(f"--images {images_dir}: not a folder")
    keys = []
    for root, dirs, files in os.walk(images_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, images_dir)
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                path = name if rel == "." else os.path.join(rel, name)
                keys.append(path.replace(os.sep, "/"))
    return sorted(keys)


def shard_of(key: str, num_shards: int) -> int:
    """Deterministic shard of an image key (independent of list order and of the machine)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % num_shards


# =========================================================================== backbone
@contextlib.contextmanager
def _build_scope(precision: str, seed: int):
    """Keras dtype policy and Python RNG state for building the backbone, restored afterwards.

    Keras draws the seed of every unseeded initializer from Python's `random` when the layer is
    created, so seeding it gives identical weights in every process (and in both precisions:
    mixed policies keep float32 variables).
    """
    import keras

    previous_policy, previous_state = keras.config.dtype_policy(), random.getstate()
    keras.config.set_dtype_policy(DTYPE_POLICIES[precision])
    random.seed(seed)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous_policy)
        random.setstate(previous_state)


def imagenet_weights_path() -> str:
    """Path of Keras' cached ImageNet weights, downloading them once; UserError when offline."""
    import keras

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return keras.utils.get_file(IMAGENET_FILE, IMAGENET_URL, cache_subdir="models",
                                    file_hash=IMAGENET_MD5)
    except Exception as e:  # URL/DNS/timeout errors arrive as plain Exception from Keras
        raise UserError(
            f"--weights imagenet: cannot get the InceptionV3 ImageNet weights ({e}). Without "
            f"network: copy {IMAGENET_FILE} from a machine that has it (Keras keeps it in "
            f"~/.keras/models/) and pass `--weights PATH/{IMAGENET_FILE}` (or put it into "
            f"~/.keras/models/ here), or use `--weights random` for offline trials (random "
            f"features only exercise the pipeline).") from None
    finally:
        socket.setdefaulttimeout(previous)


def _file_md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_backbone(weights: str = "imagenet", seed: int = 0, precision: str = "float32"):
    """keras.Model: InceptionV3 without top, input (299, 299, 3), output (8, 8, 2048).

    `weights`: "imagenet" (Keras' download/cache), "random" (seeded init) or a weights file.
    `precision`: "bfloat16" builds it under the "mixed_bfloat16" policy (float32 variables).
    """
    import keras

    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}")
    if weights == "imagenet":
        path = imagenet_weights_path()
    elif weights == "random":
        path = None
    else:
        path = weights
        if not os.path.isfile(path):
            raise UserError(f"--weights {weights}: no such file (expected `imagenet`, `random` "
                            f"or the path of an InceptionV3 weights file such as "
                            f"{IMAGENET_FILE})")
    with _build_scope(precision, seed):
        model = keras.applications.InceptionV3(include_top=False, weights=None,
                                               input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    if path is not None:
        try:
            model.load_weights(path)
        except Exception as e:
            raise UserError(f"--weights {path}: cannot load it into InceptionV3 without top "
                            f"({type(e).__name__}: {e})") from None
    return model


def weights_sha256(model) -> str:
    """Identity of a model's weights: sha256 over every weight array (dtype, shape, bytes)."""
    h = hashlib.sha256()
    for array in model.get_weights():
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def fold_batchnorm(model):
    """Inference copy of `model` with every Conv2D -> BatchNormalization pair folded into one
    Conv2D with bias (kernel * gamma / sqrt(var + eps), bias = beta - mean * that).

    Same function up to float rounding, ~7% less CPU time in float32 and ~20% in mixed
    bfloat16 (InceptionV3 has 94 such pairs). Returns `model` itself when the graph is not
    made of such pairs. The copy keeps each layer's dtype policy.
    """
    import keras

    pairs = {}  # conv name -> its BatchNormalization
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            history = getattr(layer.input, "_keras_history", None)
            conv = history[0] if history else None
            if not isinstance(conv, keras.layers.Conv2D) or conv.use_bias or \
                    conv.name in pairs or layer.axis not in (-1, 3):
                return model
            pairs[conv.name] = layer

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return _pass_through_class()(name=layer.name, dtype=layer.dtype_policy.name)
        config = layer.get_config()
        if layer.name in pairs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name in pairs:
            bn = pairs[layer.name]
            gamma = bn.gamma.numpy().astype(np.float64) if bn.scale else 1.0
            beta = bn.beta.numpy().astype(np.float64) if bn.center else 0.0
            variance = bn.moving_variance.numpy().astype(np.float64)
            factor = gamma / np.sqrt(variance + bn.epsilon)                 # (C_out,)
            kernel = layer.kernel.numpy() * factor                          # (kh, kw, C_in, C_out)
            bias = beta - bn.moving_mean.numpy() * factor                   # (C_out,)
            folded.get_layer(layer.name).set_weights([kernel.astype(np.float32),
                                                      bias.astype(np.float32)])
        elif not isinstance(layer, keras.layers.BatchNormalization) and layer.weights:
            folded.get_layer(layer.name).set_weights(layer.get_weights())
    return folded


@functools.lru_cache(maxsize=None)
def _pass_through_class():
    """Keras layer class defined on first use (Keras is imported lazily in this module)."""
    import keras

    class PassThrough(keras.layers.Layer):
        """Stands in for a BatchNormalization folded into the preceding convolution."""

        def call(self, x, training=None, mask=None):
            return x

    return PassThrough


class Backbone:
    """uint8 images (B, 299, 299, 3) -> float32 features (B, 64, 2048) times `feature_scale`.

    Wraps the Keras model (batch norms folded into the convolutions, see `fold_batchnorm`) in
    one tf.function: preprocess_input, model, reshape, cast, scale. Any batch size works
    without retracing. `jit_compile=True` compiles it with XLA (slower on CPU: 10% in float32,
    2.4x in bfloat16 measured; may help on GPU; each new batch size compiles again).
    `self.model` is the unfolded model (its weights are the cache's identity).
    """

    def __init__(self, model, feature_scale: float = 1.0, jit_compile: bool = False):
        import keras
        import tensorflow as tf

        self.model = model
        self.feature_scale = float(feature_scale)  # applied in __call__ (exact: a power of 2)
        preprocess = keras.applications.inception_v3.preprocess_input
        inference_model = fold_batchnorm(model)

        def forward(images):                                        # (B, 299, 299, 3) uint8
            x = preprocess(tf.cast(images, tf.float32))             # (B, 299, 299, 3) in [-1, 1]
            y = inference_model(x, training=False)                  # (B, 8, 8, 2048)
            return tf.reshape(tf.cast(y, tf.float32), (-1,) + FEATURE_SHAPE)  # (B, 64, 2048)

        spec = tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 3), tf.uint8)
        self._forward = tf.function(forward, input_signature=[spec], jit_compile=jit_compile)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or \
                images.dtype != np.uint8:
            raise ValueError(f"`images` must be uint8 (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got "
                             f"{images.dtype} {images.shape}")
        features = self._forward(images).numpy()                    # (B, 64, 2048) float32
        if self.feature_scale != 1.0:
            features *= self.feature_scale
        return features

    @classmethod
    def from_manifest(cls, cache_dir: str, jit_compile: bool = False) -> "Backbone":
        """Exactly the backbone that made the cache (weights checked against its sha256)."""
        m = read_manifest(cache_dir)
        if m["weights"] == "random":
            model = _random_model_from_cache(cache_dir, m)
        else:
            model = build_backbone(m["weights"], m.get("seed") or 0, m["precision"])
            sha = weights_sha256(model)
            if sha != m["weights_sha256"]:
                raise UserError(f"{_manifest_path(cache_dir)}: the cache was made with weights "
                                f"sha256 {m['weights_sha256'][:12]}…, but {m['weights']} now "
                                f"has {sha[:12]}… (the weights file changed?)")
        return cls(model, m["feature_scale"], jit_compile=jit_compile)


def _random_weights_file(seed: int) -> str:
    return f"backbone_random_seed{seed}.weights.h5"


def _random_model_from_cache(cache_dir: str, m: dict):
    path = os.path.join(cache_dir, m["weights_file"])
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; the random backbone of cache {cache_dir} cannot be "
                        f"rebuilt (extract into a new --cache folder)")
    model = build_backbone("random", m["seed"], m["precision"])
    try:
        model.load_weights(path)
    except Exception as e:
        raise UserError(f"{path}: cannot load the cached backbone weights ({e})") from None
    if weights_sha256(model) != m["weights_sha256"]:
        raise UserError(f"{path}: weights do not match the sha256 in the manifest (file "
                        f"replaced or corrupt); extract into a new --cache folder")
    return model


def calibration_images(n: int = 4) -> np.ndarray:
    """Fixed synthetic images (n, 299, 299, 3) uint8: smooth colour noise at several scales."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    images = []
    for i in range(n):
        side = 4 * 2 ** (i % 4)                                     # 4, 8, 16, 32 blobs across
        low = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        images.append(cv2.resize(low, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_CUBIC))
    return np.stack(images)


def calibrate_feature_scale(backbone: Backbone) -> tuple[float, float]:
    """(power-of-two scale making the features' RMS ~1, the RMS before scaling).

    A randomly initialised InceptionV3 outputs tiny activations (RMS ~1e-3; ~5% of the
    non-zero ones are below float16's normal range 6.1e-5, where it keeps fewer bits, and the
    smallest, ~1e-9, become 0). Scaling by a power of two is exact and keeps them. `backbone`
    must be unscaled (feature_scale 1).
    """
    assert backbone.feature_scale == 1.0
    feats = backbone(calibration_images())                          # (4, 64, 2048)
    rms = float(np.sqrt(np.mean(np.square(feats, dtype=np.float64))))
    if not math.isfinite(rms) or rms == 0.0:
        return 1.0, rms
    return float(2.0 ** round(-math.log2(rms))), rms


# =========================================================================== cache files
def feature_path(cache_dir: str, key: str) -> str:
    """<cache>/<key>.npy (key keeps its image extension: a.jpg -> a.jpg.npy)."""
    return os.path.join(cache_dir, *key.split("/")) + ".npy"


def npy_header(dtype: str) -> bytes:
    """The exact .npy header of every feature file of this dtype (version 1.0, C order)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": FEATURE_SHAPE})
    return buf.getvalue()


def check_feature_file(path: str, dtype: str, full: bool = False) -> Optional[str]:
    """None if `path` is a valid feature file, else the reason.

    Quick: .npy header, shape (64, 2048), dtype, C order and file size. Full: also reads the
    data and checks every value is finite.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran_order, file_dtype = read_header(f)
            except (ValueError, OSError, SyntaxError) as e:
                return f"bad .npy header ({e})"
            header_len = f.tell()
            if shape != FEATURE_SHAPE:
                return f"shape {shape}, expected {FEATURE_SHAPE}"
            if file_dtype != np.dtype(dtype):
                return f"dtype {file_dtype}, expected {dtype}"
            if fortran_order:
                return "Fortran order, expected C order"
            expected = header_len + int(np.prod(FEATURE_SHAPE)) * np.dtype(dtype).itemsize
            if size != expected:
                return f"{size} bytes, expected {expected} (truncated?)"
            if full:
                values = np.frombuffer(f.read(), dtype=file_dtype)
                if values.size != np.prod(FEATURE_SHAPE):
                    return "short read"
                if not np.isfinite(values).all():
                    return "non-finite values"
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None


def _quick_valid(path: str, header: bytes, size: int) -> bool:
    """Fast path of the quick check: exact size and byte-identical header."""
    try:
        if os.stat(path).st_size != size:
            return False
        with open(path, "rb") as f:
            return f.read(len(header)) == header
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale_temp(path: str, name: str) -> bool:
    m = _TEMP_RE.match(name)
    if m is None:
        return False
    if m["host"] == HOST:
        pid = int(m["pid"])
        return pid == os.getpid() or not _pid_alive(pid)
    with contextlib.suppress(OSError):
        return time.time() - os.path.getmtime(path) > STALE_TEMP_AGE_S
    return False


def _scan_cache(cache_dir: str, header: Optional[bytes] = None, size: int = 0,
                known_valid: frozenset = frozenset()) -> tuple[int, int]:
    """Remove stale temp files; return (removed, valid feature files by the quick check).

    Files in `known_valid` (paths this run just checked or wrote) are counted without being
    opened again: on COCO that is every file for a single-shard run.
    """
    removed = valid = 0
    for root, _, files in os.walk(cache_dir):
        for name in files:
            path = os.path.join(root, name)
            if name.startswith(".") and _is_stale_temp(path, name):
                with contextlib.suppress(OSError):
                    os.remove(path)
                    removed += 1
            elif header is not None and name.endswith(".npy") and not name.startswith("."):
                valid += path in known_valid or _quick_valid(path, header, size)
    return removed, valid


@contextlib.contextmanager
def cache_lock(cache_dir: str):
    """Exclusive flock on <cache>/.lock (shards share one cache)."""
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, LOCK), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_failed(cache_dir: str) -> dict[str, str]:
    """failed.tsv as {key: reason} (empty when absent)."""
    out = {}
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(cache_dir, FAILED), encoding="utf-8") as f:
            for line in f:
                key, _, reason = line.rstrip("\n").partition("\t")
                if key:
                    out[key] = reason
    return out


def _update_failed(cache_dir: str, failed: dict[str, str], succeeded: Iterable[str]) -> int:
    """Merge this run into failed.tsv (caller holds the lock); return the entries written."""
    entries = read_failed(cache_dir)
    for key in succeeded:
        entries.pop(key, None)
    entries.update({k: " ".join(r.split()) for k, r in failed.items()})
    lines = [f"{key}\t{entries[key]}\n".encode("utf-8") for key in sorted(entries)]
    path = os.path.join(cache_dir, FAILED)
    if lines or os.path.exists(path):
        write_bytes_atomic(path, lines)
    return len(entries)


# =========================================================================== manifest
_REQUIRED = ("format_version", "backbone", "weights", "weights_sha256", "dtype", "precision",
             "feature_shape", "image_size", "resize", "feature_scale", "npy_header_bytes",
             "count")


def _manifest_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, MANIFEST)


def read_manifest(cache_dir: str) -> dict:
    """The cache's manifest.json; UserError when missing or malformed."""
    path = _manifest_path(cache_dir)
    if not os.path.exists(path):
        raise UserError(f"{path}: no feature cache manifest (run `extract-features --cache "
                        f"{cache_dir}` first)")
    m = read_json(path)
    missing = [k for k in _REQUIRED if not isinstance(m, dict) or k not in m]
    if missing:
        raise UserError(f"{path}: malformed manifest, missing {missing}")
    if m["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path}: cache format version {m['format_version']}, this version "
                        f"reads {FORMAT_VERSION}; extract into a new --cache folder")
    if m["weights"] == "random" and "weights_file" not in m:
        raise UserError(f"{path}: malformed manifest, random weights without `weights_file`")
    return m


def _describe_weights(weights: str, seed: Optional[int]) -> str:
    return f"random (seed {seed})" if weights == "random" else weights


def _identity(cfg: ExtractConfig) -> dict:
    """Manifest fields a run must agree with (besides the weights)."""
    return {"format_version": FORMAT_VERSION, "backbone": BACKBONE, "dtype": cfg.dtype,
            "precision": cfg.precision, "feature_shape": list(FEATURE_SHAPE),
            "image_size": IMAGE_SIZE, "resize": RESIZE_METHOD}


def _refuse(cache_dir: str, what: str, cached, wanted, hint: str = "") -> UserError:
    return UserError(f"--cache {cache_dir} holds features made with {what} {cached}, this run "
                     f"asks for {wanted}; a cache holds one backbone's features only: use another "
                     f"--cache folder{hint}")


def _check_identity(cache_dir: str, m: dict, cfg: ExtractConfig) -> None:
    """Refuse cheap mismatches before building anything."""
    for key, value in _identity(cfg).items():
        if m.get(key) != value:
            flag = {"dtype": " (or --dtype {})", "precision": " (or --precision {})"}.get(key, "")
            raise _refuse(cache_dir, key, m.get(key), value, flag.format(m.get(key)))
    kinds = {m["weights"], cfg.weights}
    mine, theirs = _describe_weights(cfg.weights, cfg.seed), \
        _describe_weights(m["weights"], m.get("seed"))
    if "random" in kinds and (len(kinds) > 1 or m.get("seed") != cfg.seed):
        raise _refuse(cache_dir, "weights", theirs, mine)
    if kinds == {"imagenet", "random"}:
        raise _refuse(cache_dir, "weights", theirs, mine)


def _read_manifest_if_any(cache_dir: str) -> Optional[dict]:
    return read_manifest(cache_dir) if os.path.exists(_manifest_path(cache_dir)) else None


def _new_manifest(cache_dir: str, cfg: ExtractConfig, backbone: Backbone, sha: str) -> dict:
    """Calibrate feature_scale, save random weights and write the manifest (lock held)."""
    scale, rms = (1.0, None) if _is_imagenet(cfg.weights) else \
        calibrate_feature_scale(backbone)
    weights = cfg.weights if cfg.weights in ("imagenet", "random") \
        else os.path.abspath(cfg.weights)
    m = {**_identity(cfg), "weights": weights, "weights_sha256": sha,
         "seed": cfg.seed if cfg.weights == "random" else None,
         "feature_layout": FEATURE_LAYOUT, "preprocess": PREPROCESS,
         "feature_scale": scale, "calibration_rms": rms,
         "npy_header_bytes": len(npy_header(cfg.dtype)), "count": 0,
         "keras_version": _version("keras"), "tensorflow_version": _version("tensorflow")}
    if cfg.weights == "random":
        m["weights_file"] = _random_weights_file(cfg.seed)
        path = os.path.join(cache_dir, m["weights_file"])
        with atomic_path(path, ".weights.h5") as tmp:  # Keras insists on this suffix
            backbone.model.save_weights(tmp)
    write_json_atomic(_manifest_path(cache_dir), m)
    return m


def _open_cache(cache_dir: str, cfg: ExtractConfig) -> tuple[Backbone, dict]:
    """The run's backbone, and the cache manifest created or checked against it.

    The backbone is built outside the lock (seconds); creating the manifest happens under it,
    re-reading first, since another shard may have created it meanwhile.
    """
    existing = None
    if os.path.isdir(cache_dir):  # (a failed first run leaves no empty cache folder behind)
        with cache_lock(cache_dir):
            existing = _read_manifest_if_any(cache_dir)
    if existing is not None:
        _check_identity(cache_dir, existing, cfg)  # cheap refusals before building anything
    if existing is not None and existing["weights"] == "random":
        model = _random_model_from_cache(cache_dir, existing)
    else:
        model = build_backbone(cfg.weights, cfg.seed, cfg.precision)
    backbone, sha = Backbone(model), weights_sha256(model)

    with cache_lock(cache_dir):
        m = _read_manifest_if_any(cache_dir)
        if m is None:
            m = _new_manifest(cache_dir, cfg, backbone, sha)
        else:
            _check_identity(cache_dir, m, cfg)
            if m["weights_sha256"] != sha:
                cached = _describe_weights(m["weights"], m.get("seed"))
                raise _refuse(cache_dir, "weights", f"{cached} (sha256 {m['weights_sha256'][:12]}…)",
                              f"{_describe_weights(cfg.weights, cfg.seed)} (sha256 {sha[:12]}…)")
    backbone.feature_scale = float(m["feature_scale"])
    return backbone, m


def _is_imagenet(weights: str) -> bool:
    """`imagenet`, or a file identical to Keras' ImageNet weights (same features: scale 1)."""
    if weights == "imagenet":
        return True
    if weights == "random" or os.path.getsize(weights) < 1 << 20:
        return False
    return _file_md5(weights) == IMAGENET_MD5


def _version(module: str) -> Optional[str]:
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", None)


# =========================================================================== extraction
class _Writer:
    """Background thread writing feature files, so disk I/O never stalls the model."""

    def __init__(self, header: bytes, dtype: str, max_items: int):
        self.header, self.dtype = header, np.dtype(dtype)
        self.queue: queue.Queue = queue.Queue(maxsize=max_items)
        self.error: Optional[BaseException] = None
        self.written: list[str] = []
        self.thread = threading.Thread(target=self._run, name="feature-writer", daemon=True)
        self.thread.start()

    def put(self, key: str, path: str, features: np.ndarray) -> None:
        if self.error is not None:
            raise UserError(f"cannot write {path}: {self.error}")
        self.queue.put((key, path, features))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after an error
            key, path, features = item
            try:  # write_bytes_atomic creates the key's sub-folders
                write_bytes_atomic(path, (self.header, features.astype(self.dtype).tobytes()))
                self.written.append(key)
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                self.error = e

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()


class _Progress:
    """One-line stderr progress bar: done/total, images/s, ETA, failures."""

    def __init__(self, total: int, enabled: bool, label: str):
        self.total, self.enabled, self.label = total, enabled and total > 0, label
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.done = self.failed = 0

    def update(self, done: int, failed: int, force: bool = False) -> None:
        self.done, self.failed = done, failed
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 30.0)):
            return
        self.last = now
        elapsed = now - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done - failed) / rate if rate > 0 else float("nan")
        width = 30
        filled = int(width * (done + failed) / self.total)
        bar = "=" * filled + (">" if filled < width else "") + "." * (width - filled - 1)
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--"
        line = (f"{self.label} {done + failed}/{self.total} [{bar[:width]}] {rate:.1f} images/s "
                f"ETA {eta_s}" + (f" failed {failed}" if failed else ""))
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(self.done, self.failed, force=True)
            if self.tty:
                sys.stderr.write("\n")
                sys.stderr.flush()


@contextlib.contextmanager
def _opencv_settings():
    """OpenCV single-threaded inside our decode pool (parallelism comes from the pool, no
    oversubscription next to TensorFlow) and quiet (failures go to failed.tsv instead)."""
    threads, level = cv2.getNumThreads(), cv2.utils.logging.getLogLevel()
    cv2.setNumThreads(1)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)
        cv2.utils.logging.setLogLevel(level)


def _run_pipeline(backbone: Backbone, images_dir: str, cache_dir: str, keys: list[str],
                  dtype: str, batch_size: int, workers: int,
                  progress: _Progress) -> tuple[list[str], dict[str, str]]:
    """Decode (thread pool) -> backbone (batches) -> write (writer thread).

    Returns (keys written, {key: failure reason}).
    """
    failed: dict[str, str] = {}
    header = npy_header(dtype)
    writer = _Writer(header, dtype, max_items=2 * batch_size)
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode")
    lookahead = 2 * batch_size + workers  # next batch is decoded while the model runs
    pending: collections.deque = collections.deque()
    todo = iter(keys)
    batch = np.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)  # (B, 299, 299, 3)
    batch_keys: list[str] = []

    def submit() -> None:
        key = next(todo, None)
        if key is not None:
            pending.append((key, pool.submit(load_image, os.path.join(images_dir, key))))

    def run_batch() -> None:
        n = len(batch_keys)
        feats = backbone(batch[:n])                                  # (n, 64, 2048) float32
        stored = feats.astype(dtype)                                 # (n, 64, 2048) dtype
        finite = np.isfinite(stored).reshape(n, -1).all(axis=1)      # (n,)
        for key, row, ok in zip(batch_keys, stored, finite):
            if ok:
                writer.put(key, feature_path(cache_dir, key), row)
            else:
                failed[key] = f"non-finite features in {dtype}"
        batch_keys.clear()
        progress.update(len(writer.written) + writer.queue.qsize(), len(failed))

    try:
        for _ in range(lookahead):
            submit()
        while pending:
            key, future = pending.popleft()
            submit()
            try:
                batch[len(batch_keys)] = future.result()
                batch_keys.append(key)
            except Exception as e:  # noqa: BLE001 - one bad image never stops the run
                failed[key] = str(e) if isinstance(e, ImageError) else \
                    f"error ({type(e).__name__}: {e})"
                progress.update(len(writer.written) + writer.queue.qsize(), len(failed))
                continue
            if len(batch_keys) == batch_size:
                run_batch()
        if batch_keys:
            run_batch()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writer.close()
    if writer.error is not None:
        raise UserError(f"cannot write features into {cache_dir}: {writer.error}")
    return writer.written, failed


def _validate(cfg: ExtractConfig) -> None:
    if cfg.num_shards < 1:
        raise UserError(f"--num-shards must be >= 1, got {cfg.num_shards}")
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise UserError(f"--shard-index must be in [0, --num-shards) = [0, {cfg.num_shards}), "
                        f"got {cfg.shard_index}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.workers < 0:
        raise UserError(f"--workers must be >= 0, got {cfg.workers}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {DTYPES}, got {cfg.dtype!r}")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {PRECISIONS}, got {cfg.precision!r}")


def extract_features(images_dir: str, cfg: ExtractConfig, keys: Optional[list[str]] = None,
                     progress: bool = True) -> dict:
    """Extract the features of this shard's images into `cfg.cache`; return a summary.

    `keys`: image paths relative to `images_dir` (e.g. from a caption file); default: every
    image file under it. Bad images do not stop the run: they are listed in failed.tsv.
    Summary: images (in this shard), extracted, skipped (already valid), repaired (invalid
    files re-extracted), failed, failures {key: reason}, seconds, images_per_s, cache,
    manifest, failed_file, count, feature_scale, stale_temp_removed, exit_code (1 when
    `cfg.strict` and something failed, or when nothing could be extracted) and message.
    """
    start = time.monotonic()
    _validate(cfg)
    if not os.path.isdir(images_dir):
        raise UserError(f"--images {images_dir}: not a folder")
    if keys is None:
        keys = list_images(images_dir)
        if not keys:
            raise UserError(f"--images {images_dir}: no image files found (extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
    keys = sorted(set(keys))
    failed = {k: reason for k in keys if (reason := image_key_problem(k))}
    mine = [k for k in keys if k not in failed
            and shard_of(k, cfg.num_shards) == cfg.shard_index]
    failed = {k: r for k, r in failed.items() if shard_of(k, cfg.num_shards) == cfg.shard_index}
    n_bad_keys = len(failed)
    cache = cfg.cache
    backbone, manifest = _open_cache(cache, cfg)
    stale, _ = _scan_cache(cache)

    # Resume: keep files that pass the check (quick by default, full with verify).
    header = npy_header(cfg.dtype)
    size = len(header) + int(np.prod(FEATURE_SHAPE)) * np.dtype(cfg.dtype).itemsize
    workers = cfg.workers or os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        if cfg.verify:
            checks = list(pool.map(lambda k: check_feature_file(feature_path(cache, k), cfg.dtype,
                                                                full=True), mine))
        else:
            checks = [None if _quick_valid(feature_path(cache, k), header, size)
                      else check_feature_file(feature_path(cache, k), cfg.dtype) for k in mine]
    done = [k for k, reason in zip(mine, checks) if reason is None]
    invalid = {k: r for k, r in zip(mine, checks) if r is not None and r != "missing"}
    todo = [k for k, reason in zip(mine, checks) if reason is not None]

    bar = _Progress(len(todo), progress, "extract-features")
    t0 = time.monotonic()
    with _opencv_settings():
        written, bad = _run_pipeline(backbone, images_dir, cache, todo, cfg.dtype,
                                     cfg.batch_size, workers, bar)
    extract_seconds = time.monotonic() - t0
    bar.done = len(written)
    bar.close()
    failed.update(bad)

    with cache_lock(cache):
        n_failed_file = _update_failed(cache, failed, succeeded=done + written)
        _, count = _scan_cache(cache, header, size, frozenset(
            feature_path(cache, k) for k in done + written))
        m = read_manifest(cache)
        m["count"] = count
        m["images_dir"] = os.path.abspath(images_dir)  # informational: heatmaps in `train`
        write_json_atomic(_manifest_path(cache), m)

    summary = {
        "images": len(mine) + n_bad_keys,
        "extracted": len(written), "skipped": len(done),
        "repaired": len(set(invalid) & set(written)), "invalid": invalid,
        "failed": len(failed), "failures": dict(sorted(failed.items())),
        "seconds": time.monotonic() - start, "extract_seconds": extract_seconds,
        "images_per_s": len(written) / extract_seconds if extract_seconds > 0 and written
        else 0.0,
        "cache": cache, "manifest": _manifest_path(cache),
        "failed_file": os.path.join(cache, FAILED), "failed_file_entries": n_failed_file,
        "count": count, "dtype": cfg.dtype, "weights": manifest["weights"],
        "feature_scale": manifest["feature_scale"], "stale_temp_removed": stale,
        "shard": f"{cfg.shard_index}/{cfg.num_shards}",
    }
    summary["exit_code"], summary["message"] = _exit_status(summary, cfg.strict)
    return summary


def _exit_status(s: dict, strict: bool) -> tuple[int, str]:
    if s["failed"] and s["extracted"] + s["skipped"] == 0:
        return 1, "nothing could be extracted"
    if strict and s["failed"]:
        return 1, f"{s['failed']} image(s) failed and --strict is set"
    return 0, "ok"


def format_summary(summary: dict) -> str:
    """Human-readable summary for the CLI (several lines)."""
    s = summary
    lines = [f"extracted {s['extracted']}, skipped {s['skipped']} already done"
             + (f" (repaired {s['repaired']} invalid)" if s["repaired"] else "")
             + f", failed {s['failed']} of {s['images']} images (shard {s['shard']}) in "
             f"{s['seconds']:.1f} s ({s['images_per_s']:.1f} images/s)",
             f"cache {s['cache']}: {s['count']} feature files ({s['dtype']}, weights "
             f"{s['weights']}, feature_scale {s['feature_scale']:g})"]
    if s["failed"]:
        shown = list(s["failures"].items())[:5]
        lines.append(f"failed images are listed in {s['failed_file']}: "
                     + "; ".join(f"{k}: {r}" for k, r in shown)
                     + (" ..." if s["failed"] > len(shown) else ""))
    if s["exit_code"]:
        lines.append(f"error: {s['message']}")
    return "\n".join(lines)
