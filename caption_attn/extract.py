"""`extract-features`: every image of this shard -> `<cache>/<image key>.npy`.

The pipeline: a thread pool decodes and resizes images (`images.load_image`) a little ahead of
the model, the backbone runs on full batches, and a writer thread writes each feature file
atomically, so neither decoding nor disk I/O stalls the model. Bad images do not stop the run:
they go to failed.tsv with a short reason. A rerun resumes (files that pass the cache's check
are skipped); shard = sha256(key) mod num_shards, and shards may write into one cache
concurrently. The cache itself (layout, checks, manifest) is `feature_cache`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import os
import queue
import sys
import threading
import time
from typing import Optional

import cv2
import numpy as np

from caption_attn import feature_cache
from caption_attn.backbone import IMAGE_SIZE, Backbone
from caption_attn.config import ExtractConfig
from caption_attn.data import image_key_problem
from caption_attn.errors import UserError
from caption_attn.feature_cache import FAILED, feature_path, npy_header
from caption_attn.fileio import write_bytes_atomic
from caption_attn.images import IMAGE_EXTENSIONS, ImageError, list_images, load_image


def shard_of(key: str, num_shards: int) -> int:
    """Deterministic shard of an image key (independent of list order and of the machine)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % num_shards


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


def _show(bar, done: int, failed: int, finalize: bool = False) -> None:
    """Progress of `bar` (a keras.utils.Progbar over the images to extract); the failed count
    is shown (as a stateful value) once there is one."""
    bar.update(done + failed, [("failed", failed)] if failed else None, finalize=finalize)


def _run_pipeline(backbone: Backbone, images_dir: str, cache_dir: str, keys: list[str],
                  dtype: str, batch_size: int, workers: int,
                  progress) -> tuple[list[str], dict[str, str]]:
    """Decode (thread pool) -> backbone (batches) -> write (writer thread).

    `progress`: a keras.utils.Progbar over `keys` (never finalized here). Returns (keys
    written, {key: failure reason}).
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
        _show(progress, len(writer.written) + writer.queue.qsize(), len(failed))

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
                _show(progress, len(writer.written) + writer.queue.qsize(), len(failed))
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


def _shard_keys(images_dir: str, cfg: ExtractConfig,
                keys: Optional[list[str]]) -> tuple[list[str], dict[str, str]]:
    """(this shard's keys to extract, {this shard's unusable keys: reason})."""
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
    return mine, failed


def _extract_with_progress(backbone: Backbone, images_dir: str, todo: list[str],
                           cfg: ExtractConfig, workers: int,
                           progress: bool) -> tuple[list[str], dict[str, str]]:
    """`_run_pipeline` over `todo` with OpenCV set up and a progress bar: one line redrawn on
    a terminal, one line at the end when the output is a log file, none without `progress`."""
    import keras

    verbose = 0 if not (progress and todo) else 1 if sys.stdout.isatty() else 2
    bar = keras.utils.Progbar(len(todo), verbose=verbose, stateful_metrics=["failed"],
                              unit_name="image")
    with _opencv_settings():
        written, failed = _run_pipeline(backbone, images_dir, cfg.cache, todo, cfg.dtype,
                                        cfg.batch_size, workers, bar)
    _show(bar, len(written), len(failed), finalize=True)
    return written, failed


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
    mine, failed = _shard_keys(images_dir, cfg, keys)
    n_bad_keys = len(failed)
    cache = cfg.cache
    backbone, manifest = feature_cache.open_cache(cache, cfg)
    stale = feature_cache.remove_stale_temp_files(cache)

    # Resume: keep files that pass the check (quick by default, full with verify).
    workers = cfg.workers or os.cpu_count() or 1
    checks = feature_cache.check_features(cache, mine, cfg.dtype, full=cfg.verify,
                                          workers=workers)
    done = [k for k, reason in zip(mine, checks) if reason is None]
    invalid = {k: r for k, r in zip(mine, checks) if r is not None and r != "missing"}
    todo = [k for k, reason in zip(mine, checks) if reason is not None]

    t0 = time.monotonic()
    written, bad = _extract_with_progress(backbone, images_dir, todo, cfg, workers, progress)
    extract_seconds = time.monotonic() - t0
    failed.update(bad)
    n_failed_file, count = feature_cache.record_run(cache, images_dir, failed, done + written,
                                                    cfg.dtype)
    summary = {
        "images": len(mine) + n_bad_keys,
        "extracted": len(written), "skipped": len(done),
        "repaired": len(set(invalid) & set(written)), "invalid": invalid,
        "failed": len(failed), "failures": dict(sorted(failed.items())),
        "seconds": time.monotonic() - start, "extract_seconds": extract_seconds,
        "images_per_s": len(written) / extract_seconds if extract_seconds > 0 and written
        else 0.0,
        "cache": cache, "manifest": feature_cache.manifest_path(cache),
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
