"""Tests of image decoding, the backbone and the feature cache (caption_attn/features.py).

Images are rendered here (OpenCV, and Pillow for CMYK/EXIF/GIF fixtures); the backbone is
`weights="random"` (no network). One float16 extraction is shared by most tests (module
fixture); tests that change a cache work on a copy of it.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from caption_attn import features as F
from caption_attn.config import ExtractConfig
from caption_attn.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = ["a.jpg", "b.png", "sub/c.jpg", "sub/deeper/d.jpg", "gray.jpg", "rgba.png", "cmyk.jpg",
        "anim.gif", "bitmap.bmp", "exif6.jpg"]
BAD = {"truncated.jpg": "truncated", "empty.jpg": "empty file (0 bytes)",
       "notes.jpg": "not an image (unrecognised format)", "missing.jpg": "missing"}
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# --------------------------------------------------------------------------- fixtures
def _scene(seed: int, width: int = 320, height: int = 240) -> np.ndarray:
    """RGB uint8 (H, W, 3): a few filled shapes on a gradient."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 220, width, dtype=np.float32)[None, :, None]         # (1, W, 1)
    img = np.ascontiguousarray(np.broadcast_to(ramp, (height, width, 3)), dtype=np.uint8)
    for _ in range(3):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(img, center, int(rng.integers(15, 70)), color, -1)
    return img


def _bands(height: int = 60, width: int = 40) -> np.ndarray:
    """RGB (H, W, 3): red top third, green middle, blue bottom."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 3], img[height // 3: 2 * height // 3], img[2 * height // 3:] = RED, GREEN, BLUE
    return img


def _write_rgb(path, rgb, *params):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), list(params))


def _make_images(root) -> None:
    root = str(root)
    for i, key in enumerate(["a.jpg", "b.png", "sub/c.jpg", "sub/deeper/d.jpg"]):
        _write_rgb(os.path.join(root, key), _scene(i))
    _write_rgb(os.path.join(root, "bitmap.bmp"), _scene(7, 100, 80))
    Image.fromarray(_scene(4)).convert("L").save(os.path.join(root, "gray.jpg"))
    rgba = np.dstack([_bands(), np.full((60, 40), 255, np.uint8)])              # (60, 40, 4)
    rgba[:, :20] = 0                                                            # left: transparent
    Image.fromarray(rgba, "RGBA").save(os.path.join(root, "rgba.png"))
    Image.fromarray(_bands()).convert("CMYK").save(os.path.join(root, "cmyk.jpg"), quality=95)
    first = Image.fromarray(np.full((50, 50, 3), RED, np.uint8))
    second = Image.fromarray(np.full((50, 50, 3), BLUE, np.uint8))
    first.save(os.path.join(root, "anim.gif"), save_all=True, append_images=[second],
               duration=100, loop=0)
    exif_image = Image.fromarray(_bands())
    exif = exif_image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif_image.save(os.path.join(root, "exif6.jpg"), exif=exif.tobytes(), quality=95)
    # bad ones
    _write_rgb(os.path.join(root, "full.jpg"), _scene(9, 400, 300))
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
    _write_rgb(os.path.join(root, ".hidden", "x.jpg"), _scene(5))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _make_images(root)
    return str(root)


def _cfg(cache, **overrides) -> ExtractConfig:
    return ExtractConfig(**{"cache": str(cache), "weights": "random", "seed": 0,
                            "dtype": "float16", "batch_size": 4, **overrides})


@pytest.fixture(scope="module")
def extracted(images, tmp_path_factory):
    """One float16 extraction of GOOD + BAD keys into a module cache: (cache, summary)."""
    cache = tmp_path_factory.mktemp("cache")
    keys = F.list_images(images) + ["missing.jpg"]
    summary = F.extract_features(images, _cfg(cache), keys=keys, progress=False)
    return str(cache), summary


@pytest.fixture(scope="module")
def backbone(extracted):
    return F.Backbone.from_manifest(extracted[0])


@pytest.fixture
def cache_copy(extracted, tmp_path):
    path = tmp_path / "cache"
    shutil.copytree(extracted[0], path)
    return str(path)


# --------------------------------------------------------------------------- images
def test_load_image_formats(images):
    for key in GOOD:
        img = F.load_image(os.path.join(images, key))
        assert img.shape == (299, 299, 3) and img.dtype == np.uint8, key

    gray = F.load_image(os.path.join(images, "gray.jpg")).astype(int)
    assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 1
    assert np.abs(gray[..., 0] - gray[..., 2]).max() <= 1

    rgba = F.load_image(os.path.join(images, "rgba.png"))
    assert (rgba[150, 20] == 255).all()                      # transparent -> white
    assert tuple(rgba[150, 280]) == GREEN                    # opaque keeps its colour

    cmyk = F.load_image(os.path.join(images, "cmyk.jpg")).astype(int)
    assert np.abs(cmyk[30, 150] - RED).max() < 30            # top band stays red
    assert np.abs(cmyk[270, 150] - BLUE).max() < 30

    gif = F.load_image(os.path.join(images, "anim.gif"))
    assert tuple(gif[150, 150]) == RED                       # first frame

    bmp = F.load_image(os.path.join(images, "bitmap.bmp"))
    np.testing.assert_array_equal(bmp, F.resize_image(_scene(7, 100, 80)))


def test_exif_orientation_is_applied(images):
    raw = cv2.imread(os.path.join(images, "exif6.jpg"),
                     cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    assert raw.shape == (60, 40, 3)                          # stored portrait, red on top
    with open(os.path.join(images, "exif6.jpg"), "rb") as f:
        decoded = F.decode_image(f.read())
    assert decoded.shape == (40, 60, 3)                      # displayed landscape
    # rotated 90 degrees clockwise: the red top band is now the right third
    assert np.abs(decoded[20, 55].astype(int) - RED).max() < 30
    assert np.abs(decoded[20, 5].astype(int) - BLUE).max() < 30


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_images_raise_with_reason(images, key):
    with pytest.raises(F.ImageError) as e:
        F.load_image(os.path.join(images, key))
    assert str(e.value) == BAD[key]


def test_truncated_jpeg_is_detected_even_if_decodable():
    """Some libjpeg builds decode a cut JPEG with a gray bottom; the EOI check catches it."""
    ok, buf = cv2.imencode(".jpg", _scene(1))
    data = buf.tobytes()
    assert data.endswith(b"\xff\xd9")
    assert F.decode_image(data).shape == (240, 320, 3)
    with pytest.raises(F.ImageError, match="truncated"):
        F.decode_image(data[:-2])                           # only the EOI marker missing
    with pytest.raises(F.ImageError, match="truncated"):
        F.decode_image(cv2.imencode(".png", _scene(1))[1].tobytes()[:-12])


def test_resize_stretches_with_area_or_cubic():
    big = _scene(2, 640, 480)
    np.testing.assert_array_equal(F.resize_image(big),
                                  cv2.resize(big, (299, 299), interpolation=cv2.INTER_AREA))
    small = _scene(2, 100, 50)
    np.testing.assert_array_equal(F.resize_image(small),
                                  cv2.resize(small, (299, 299), interpolation=cv2.INTER_CUBIC))
    for h, w in [(1000, 100), (100, 1000), (299, 299), (1, 1)]:
        flat = np.full((h, w, 3), 77, np.uint8)
        out = F.resize_image(flat)
        assert out.shape == (299, 299, 3) and (out == 77).all()


def test_list_images_keys(images):
    keys = F.list_images(images)
    assert keys == sorted(GOOD + [k for k in BAD if k != "missing.jpg"])
    assert "sub/deeper/d.jpg" in keys                       # POSIX separators, subfolders
    with pytest.raises(UserError, match="--images"):
        F.list_images(os.path.join(images, "nope"))


# --------------------------------------------------------------------------- cache files
def test_check_feature_file_reasons(tmp_path):
    good = np.ones(F.FEATURE_SHAPE, np.float16)
    cases = {"good": good, "shape": np.ones((8, 8, 2048), np.float16),
             "dtype": good.astype(np.float32), "nan": np.where(good, np.nan, 0).astype(np.float16),
             "fortran": np.asfortranarray(good)}
    for name, array in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
    with open(tmp_path / "good.npy", "rb") as f:
        data = f.read()
    (tmp_path / "short.npy").write_bytes(data[:-100])
    (tmp_path / "garbage.npy").write_bytes(os.urandom(len(data)))

    def check(name, full=False):
        return F.check_feature_file(str(tmp_path / f"{name}.npy"), "float16", full=full)

    assert check("good") is None and check("good", full=True) is None
    assert "shape" in check("shape")
    assert "dtype" in check("dtype")
    assert "Fortran" in check("fortran")
    assert "truncated" in check("short")
    assert "header" in check("garbage")
    assert check("missing") == "missing"
    assert check("nan") is None                              # quick check reads no data
    assert check("nan", full=True) == "non-finite values"
    assert len(F.npy_header("float16")) == len(data) - good.nbytes == 128


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path):
    from caption_attn.fileio import atomic_path, write_bytes_atomic
    path = str(tmp_path / "x.npy")

    def payload():
        yield b"partial"
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(path, payload())
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        with atomic_path(path, ".weights.h5") as tmp:     # a writer that fails half-way
            assert tmp.endswith(".weights.h5") and os.path.basename(tmp).startswith(".x.npy")
            open(tmp, "wb").close()
            raise ValueError("cannot save")
    assert os.listdir(tmp_path) == []
    write_bytes_atomic(str(tmp_path / "new" / "x.npy"), b"done")   # creates the folder
    assert os.listdir(tmp_path / "new") == ["x.npy"]


def test_shards_are_disjoint_and_complete():
    keys = [f"dir{i % 7}/img_{i}.jpg" for i in range(1000)]
    shards = [{k for k in keys if F.shard_of(k, 3) == i} for i in range(3)]
    assert set().union(*shards) == set(keys)
    assert sum(len(s) for s in shards) == len(keys)
    assert all(250 < len(s) < 420 for s in shards)           # roughly balanced
    assert [F.shard_of(k, 3) for k in reversed(keys)][::-1] == [F.shard_of(k, 3) for k in keys]


@pytest.mark.parametrize("shards,index", [(2, 2), (2, -1), (0, 0)])
def test_shard_flags_are_validated(images, tmp_path, shards, index):
    with pytest.raises(UserError, match="--shard-index|--num-shards"):
        F.extract_features(images, _cfg(tmp_path, num_shards=shards, shard_index=index),
                           progress=False)


# --------------------------------------------------------------------------- extraction
def test_extraction_writes_files_and_manifest(images, extracted):
    cache, summary = extracted
    assert summary["extracted"] == len(GOOD) and summary["skipped"] == 0
    assert summary["failed"] == len(BAD) and summary["exit_code"] == 0
    assert summary["images"] == len(GOOD) + len(BAD) and summary["count"] == len(GOOD)
    for key in GOOD:
        path = F.feature_path(cache, key)
        assert path == os.path.join(cache, *key.split("/")) + ".npy"
        assert F.check_feature_file(path, "float16", full=True) is None, key
        assert np.load(path).shape == (64, 2048)

    m = F.read_manifest(cache)
    assert m["backbone"] == "InceptionV3" and m["weights"] == "random" and m["seed"] == 0
    assert m["dtype"] == "float16" and m["feature_shape"] == [64, 2048]
    assert m["image_size"] == 299 and m["format_version"] == F.FORMAT_VERSION
    assert m["count"] == len(GOOD) and "INTER_AREA" in m["resize"]
    assert len(m["weights_sha256"]) == 64
    assert m["feature_scale"] > 1 and np.log2(m["feature_scale"]).is_integer()
    assert os.path.isfile(os.path.join(cache, m["weights_file"]))
    # the raw-bytes reader of the training pipeline: header length + data
    with open(F.feature_path(cache, "a.jpg"), "rb") as f:
        raw = f.read()
    np.testing.assert_array_equal(
        np.frombuffer(raw[m["npy_header_bytes"]:], np.float16).reshape(64, 2048),
        np.load(F.feature_path(cache, "a.jpg")))

    assert F.read_failed(cache) == BAD
    with open(os.path.join(cache, "failed.tsv")) as f:
        lines = f.read().splitlines()
    assert lines == sorted(lines) and all(line.count("\t") == 1 for line in lines)
    text = F.format_summary(summary)
    assert "extracted 10" in text and "failed.tsv" in text


def test_strict_and_nothing_extracted_exit_codes(extracted):
    summary = dict(extracted[1])
    assert F._exit_status(summary, strict=True)[0] == 1
    assert F._exit_status(summary, strict=False)[0] == 0
    summary.update(extracted=0, skipped=0)
    assert F._exit_status(summary, strict=False) == (1, "nothing could be extracted")


def test_rerun_resumes_and_updates_failed(images, cache_copy, tmp_path):
    work = tmp_path / "images"
    shutil.copytree(images, work)
    os.remove(F.feature_path(cache_copy, "sub/c.jpg"))          # not done yet
    _write_rgb(str(work / "notes.jpg"), _scene(11))             # a failure that gets fixed
    from caption_attn.fileio import HOST as host
    stale = os.path.join(cache_copy, "sub", f".c.jpg.npy.tmp.999999999.{host}")
    live = os.path.join(cache_copy, f".x.jpg.npy.tmp.1.{host}")  # pid 1 is alive
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"half")

    keys = F.list_images(str(work)) + ["missing.jpg"]
    summary = F.extract_features(str(work), _cfg(cache_copy), keys=keys, progress=False)
    assert summary["extracted"] == 2 and summary["skipped"] == len(GOOD) - 1
    assert summary["failed"] == len(BAD) - 1 and summary["count"] == len(GOOD) + 1
    assert summary["stale_temp_removed"] == 1
    assert not os.path.exists(stale) and os.path.exists(live)
    assert "notes.jpg" not in F.read_failed(cache_copy)
    assert F.read_manifest(cache_copy)["count"] == len(GOOD) + 1


def test_final_count_opens_each_file_once(images, cache_copy, monkeypatch):
    """The manifest's count covers every shard's files, but a file this run already checked
    (or wrote) is not opened a second time to count it."""
    opened = []
    quick_valid = F._quick_valid
    monkeypatch.setattr(F, "_quick_valid",
                        lambda path, *a: opened.append(path) or quick_valid(path, *a))
    redo = next(k for k in sorted(GOOD) if F.shard_of(k, 2) == 0)
    os.remove(F.feature_path(cache_copy, redo))
    summary = F.extract_features(images, _cfg(cache_copy, num_shards=2, shard_index=0),
                                 progress=False)
    assert summary["extracted"] == 1 and summary["skipped"] > 0
    assert summary["count"] == len(GOOD)                        # both shards' files
    assert F.feature_path(cache_copy, redo) in opened
    assert len(opened) == len(set(opened))                      # each file opened once


def test_verify_repairs_bad_files(images, extracted, cache_copy):
    keys = F.list_images(images)
    reference = {k: np.load(F.feature_path(extracted[0], k)) for k in ("a.jpg", "b.png")}
    path_a, path_b = F.feature_path(cache_copy, "a.jpg"), F.feature_path(cache_copy, "b.png")
    with open(path_a, "r+b") as f:
        f.truncate(os.path.getsize(path_a) // 2)                 # truncated
    with open(path_b, "r+b") as f:
        f.seek(128)
        f.write(np.full(1000, np.nan, np.float16).tobytes())     # valid header, garbage data

    summary = F.extract_features(images, _cfg(cache_copy), keys=keys, progress=False)
    assert summary["extracted"] == 1 and summary["repaired"] == 1   # quick check: a.jpg only
    summary = F.extract_features(images, _cfg(cache_copy, verify=True), keys=keys,
                                 progress=False)
    assert summary["extracted"] == 1 and summary["repaired"] == 1   # full check: b.png
    assert summary["invalid"] == {"b.png": "non-finite values"}
    for key, ref in reference.items():
        path = F.feature_path(cache_copy, key)
        assert F.check_feature_file(path, "float16", full=True) is None
        np.testing.assert_allclose(np.load(path).astype(np.float32), ref.astype(np.float32),
                                   rtol=1e-2, atol=1e-2 * np.abs(ref).max())


@pytest.mark.parametrize("change,message", [
    ({"seed": 1}, "weights random \\(seed 0\\)"),
    ({"dtype": "float32"}, "dtype float16"),
    ({"precision": "bfloat16"}, "precision float32"),
    ({"weights": "imagenet"}, "weights random"),
])
def test_cache_with_other_backbone_is_refused(images, cache_copy, change, message):
    with pytest.raises(UserError, match=message) as e:
        F.extract_features(images, _cfg(cache_copy, **change), progress=False)
    assert "another --cache" in str(e.value)


def test_float16_keeps_activations(images, extracted, backbone):
    """The power-of-two feature_scale keeps float16 from flushing random-init activations."""
    cache = extracted[0]
    scale = F.read_manifest(cache)["feature_scale"]
    batch = np.stack([F.load_image(os.path.join(images, k)) for k in GOOD[:4]])
    f32 = backbone(batch)                                        # (4, 64, 2048) scaled
    f16 = np.stack([np.load(F.feature_path(cache, k)) for k in GOOD[:4]]).astype(np.float32)
    nonzero32, nonzero16 = np.mean(f32 != 0), np.mean(f16 != 0)
    assert abs(nonzero32 - nonzero16) < 1e-3
    rms = np.sqrt(np.mean(f32 ** 2))
    assert 0.25 < rms < 4                                        # calibrated to ~1
    assert np.sqrt(np.mean((f16 - f32) ** 2)) / rms < 2e-3
    # without the scale (RMS ~1e-3) several % of the activations would be float16 subnormals
    # (< 6.1e-5: fewer mantissa bits, the smallest flushed to zero); with it almost none
    nonzero = f32 != 0
    assert np.mean(np.abs(f32[nonzero] / scale) < 6.1e-5) > 0.01
    assert np.mean(np.abs(f32[nonzero]) < 6.1e-5) < 1e-3
    assert np.all(f16[np.abs(f32) > 1e-6] != 0)


def test_from_manifest_reproduces_cached_features(images, extracted, backbone):
    cache = extracted[0]
    assert backbone.feature_scale == F.read_manifest(cache)["feature_scale"]
    got = backbone(F.load_image(os.path.join(images, "sub/c.jpg"))[None])[0]    # (64, 2048)
    want = np.load(F.feature_path(cache, "sub/c.jpg")).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_folded_batchnorm_matches_keras_model(backbone):
    """Backbone folds BN into the convs; the result equals the plain Keras model's."""
    import keras

    x = np.stack([F.resize_image(_scene(3)), F.resize_image(_scene(4))])    # (2, 299, 299, 3)
    plain = backbone.model(keras.applications.inception_v3.preprocess_input(
        x.astype(np.float32)), training=False)
    plain = np.asarray(plain).reshape(2, 64, 2048) * backbone.feature_scale
    got = backbone(x)
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())


def test_bfloat16_backbone_close_to_float32(images, backbone):
    import keras

    model = F.build_backbone("random", 0, precision="bfloat16")
    assert keras.config.dtype_policy().name == "float32"        # policy restored
    assert model.layers[1].dtype_policy.name == "mixed_bfloat16"
    assert F.weights_sha256(model) == F.weights_sha256(backbone.model)
    x = np.stack([F.load_image(os.path.join(images, k)) for k in ("a.jpg", "b.png")])
    want = backbone(x)                                           # (2, 64, 2048) float32
    got = F.Backbone(model, backbone.feature_scale)(x)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want ** 2)) < 0.05


def test_random_weights_are_seeded(extracted):
    sha = F.weights_sha256(F.build_backbone("random", 0))
    assert sha == F.read_manifest(extracted[0])["weights_sha256"]
    assert F.weights_sha256(F.build_backbone("random", 1)) != sha
    # a weights file gives the same backbone
    path = os.path.join(extracted[0], F.read_manifest(extracted[0])["weights_file"])
    assert F.weights_sha256(F.build_backbone(path)) == sha


def test_random_weights_same_in_another_process(extracted):
    code = ("from caption_attn import features as F; "
            "print(F.weights_sha256(F.build_backbone('random', 0)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == F.read_manifest(extracted[0])["weights_sha256"]


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        F.build_backbone(str(tmp_path / "nope.h5"))


def test_imagenet_offline_fails_fast_with_advice(monkeypatch):
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    if os.path.exists(os.path.join(home, "models", F.IMAGENET_FILE)) or \
            os.path.exists(os.path.join("/tmp/.keras/models", F.IMAGENET_FILE)):
        pytest.skip("ImageNet weights already in the Keras cache")

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)       # no DNS: what offline looks like
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        F.build_backbone("imagenet")
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert "--weights imagenet" in message and "--weights random" in message
    assert f"--weights PATH/{F.IMAGENET_FILE}" in message and "~/.keras/models" in message
    assert e.value.exit_code == 2


# --------------------------------------------------------------------------- processes
RUNNER = """
import sys
from caption_attn.config import ExtractConfig
from caption_attn.features import extract_features
images, cache, shards, index = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = ExtractConfig(cache=cache, weights="random", dtype="float16", batch_size=2,
                    num_shards=shards, shard_index=index)
s = extract_features(images, cfg, progress=False)
print(s["extracted"], s["skipped"], s["failed"], s["count"])
"""


def _runner(images, cache, shards=1, index=0):
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(images), str(cache), str(shards),
                             str(index)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def _npy_files(cache):
    out = []
    for root, _, names in os.walk(cache):
        out += [os.path.join(root, n) for n in names if n.endswith(".npy")
                and not n.startswith(".")]
    return out


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path):
    images, cache = tmp_path / "images", tmp_path / "cache"
    for i in range(16):
        _write_rgb(str(images / f"img_{i:02d}.jpg"), _scene(i))
    proc = _runner(images, cache)
    deadline = time.monotonic() + 240
    while len(_npy_files(cache)) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _npy_files(cache)
    assert 3 <= len(done) < 16
    for path in done:                                           # no invalid final file
        assert F.check_feature_file(path, "float16", full=True) is None, path

    proc = _runner(images, cache)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    extracted, skipped, failed, count = map(int, out.split())
    assert skipped == len(done) and extracted == 16 - len(done) and failed == 0
    assert count == 16 and len(_npy_files(cache)) == 16
    leftovers = [n for _, _, names in os.walk(cache) for n in names if ".tmp." in n]
    assert leftovers == []


@pytest.mark.slow
def test_concurrent_shards_share_one_cache(tmp_path):
    images, cache = tmp_path / "images", tmp_path / "cache"
    keys = [f"img_{i:02d}.jpg" for i in range(10)]
    for i, key in enumerate(keys):
        _write_rgb(str(images / key), _scene(i))
    bad = ["bad_0.jpg", "bad_1.jpg", "bad_2.jpg", "bad_3.jpg"]
    for key in bad:
        (images / key).write_text("not an image")
    procs = [_runner(images, cache, 2, i) for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(list(map(int, out.split())))
    assert sum(r[0] for r in results) == len(keys)              # each image exactly once
    assert sum(r[2] for r in results) == len(bad)
    assert sorted(os.path.relpath(p, cache)[:-4] for p in _npy_files(cache)) == keys
    assert set(F.read_failed(str(cache))) == set(bad)
    m = F.read_manifest(str(cache))
    assert m["count"] == len(keys)
    with open(os.path.join(cache, "manifest.json")) as f:
        json.load(f)
