"""The resumable `.npy` feature cache: file layout, checks, the failed report and the manifest.

Cache layout:
    <cache>/manifest.json            backbone, weights identity, dtype, image size, resize method,
                                     feature_scale, .npy header length, count, format version
    <cache>/<key>.npy                one file per image; key = path relative to --images
    <cache>/failed.tsv               key<TAB>reason of images that could not be extracted
    <cache>/backbone_random_seed{S}.weights.h5   random backbone weights (`--weights random`)
    <cache>/.lock                    flock'ed around every manifest / failed.tsv update

Each `.npy` is a (64, 2048) array: InceptionV3's last 8x8x2048 map (ImageNet preprocessing, no
top), flattened row-major (position = row * 8 + col) and multiplied by the cache's
`feature_scale`.

Guarantees:
- Atomic files: a feature is written to a hidden temporary name in its folder and renamed into
  place, so a killed run never leaves a truncated file under a final name. Stale temporary
  files (their process is gone) are removed by the next run.
- Resume: a file that passes the quick check (size and exact header) counts as done; the full
  check (`verify`) also reads its values.
- Identity: a cache holds features of one backbone only; `open_cache` refuses a run with other
  weights, dtype, precision or image size.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import io
import os
import re
import sys
import time
from typing import Iterable, Optional

import numpy as np

from caption_attn.backbone import (BACKBONE, FEATURE_LAYOUT, FEATURE_SHAPE, IMAGE_SIZE,
                                   PREPROCESS, Backbone, build_backbone,
                                   calibrate_feature_scale, is_imagenet_weights,
                                   random_model_from_cache, random_weights_file, weights_sha256)
from caption_attn.config import ExtractConfig
from caption_attn.errors import UserError
from caption_attn.fileio import HOST, atomic_path, read_json, write_bytes_atomic, write_json_atomic
from caption_attn.images import RESIZE_METHOD

FORMAT_VERSION = 1               # bump when the meaning of cached files changes
MANIFEST = "manifest.json"
FAILED = "failed.tsv"
LOCK = ".lock"
STALE_TEMP_AGE_S = 3600          # temp files of other hosts older than this are stale
_TEMP_RE = re.compile(r"^\.(?P<base>.+)\.tmp\.(?P<pid>\d+)\.(?P<host>.+?)(\.weights\.h5)?$")


# =========================================================================== feature files
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


def _file_size(dtype: str) -> int:
    """Bytes of every feature file of this dtype (header + data)."""
    return len(npy_header(dtype)) + int(np.prod(FEATURE_SHAPE)) * np.dtype(dtype).itemsize


def check_features(cache_dir: str, keys: list[str], dtype: str, full: bool = False,
                   workers: int = 1) -> list[Optional[str]]:
    """Per key, None if its feature file is valid, else the reason (`check_feature_file`).

    Quick (default): a file with the exact size and header passes without more reading. Full:
    every file is read and its values checked, in `workers` threads.
    """
    if full:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda k: check_feature_file(feature_path(cache_dir, k), dtype,
                                                              full=True), keys))
    header, size = npy_header(dtype), _file_size(dtype)
    return [None if _quick_valid(feature_path(cache_dir, k), header, size)
            else check_feature_file(feature_path(cache_dir, k), dtype) for k in keys]


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


def remove_stale_temp_files(cache_dir: str) -> int:
    """Remove the temporary files of writers that are gone; return how many."""
    return _scan_cache(cache_dir)[0]


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


def record_run(cache_dir: str, images_dir: str, failed: dict[str, str],
               succeeded: list[str], dtype: str) -> tuple[int, int]:
    """After a run, under the lock: merge failed.tsv, count the valid feature files (of every
    shard), and record the count and the images folder in the manifest.

    `succeeded`: keys whose file this run checked or wrote. Returns (failed.tsv entries, count).
    """
    with cache_lock(cache_dir):
        n_failed_file = _update_failed(cache_dir, failed, succeeded)
        _, count = _scan_cache(cache_dir, npy_header(dtype), _file_size(dtype), frozenset(
            feature_path(cache_dir, k) for k in succeeded))
        m = read_manifest(cache_dir)
        m["count"] = count
        m["images_dir"] = os.path.abspath(images_dir)  # informational: heatmaps in `train`
        write_json_atomic(manifest_path(cache_dir), m)
    return n_failed_file, count


# =========================================================================== manifest
_REQUIRED = ("format_version", "backbone", "weights", "weights_sha256", "dtype", "precision",
             "feature_shape", "image_size", "resize", "feature_scale", "npy_header_bytes",
             "count")


def manifest_path(cache_dir: str) -> str:
    """<cache>/manifest.json"""
    return os.path.join(cache_dir, MANIFEST)


def read_manifest(cache_dir: str) -> dict:
    """The cache's manifest.json; UserError when missing or malformed."""
    path = manifest_path(cache_dir)
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
    return read_manifest(cache_dir) if os.path.exists(manifest_path(cache_dir)) else None


def _new_manifest(cache_dir: str, cfg: ExtractConfig, backbone: Backbone, sha: str) -> dict:
    """Calibrate feature_scale, save random weights and write the manifest (lock held)."""
    scale, rms = (1.0, None) if is_imagenet_weights(cfg.weights) else \
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
        m["weights_file"] = random_weights_file(cfg.seed)
        path = os.path.join(cache_dir, m["weights_file"])
        with atomic_path(path, ".weights.h5") as tmp:  # Keras insists on this suffix
            backbone.model.save_weights(tmp)
    write_json_atomic(manifest_path(cache_dir), m)
    return m


def open_cache(cache_dir: str, cfg: ExtractConfig) -> tuple[Backbone, dict]:
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
        model = random_model_from_cache(cache_dir, existing)
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
                raise _refuse(cache_dir, "weights",
                              f"{cached} (sha256 {m['weights_sha256'][:12]}…)",
                              f"{_describe_weights(cfg.weights, cfg.seed)} (sha256 {sha[:12]}…)")
    backbone.feature_scale = float(m["feature_scale"])
    return backbone, m


def _version(module: str) -> Optional[str]:
    mod = sys.modules.get(module)
    return getattr(mod, "__version__", None)

