"""`extract-features`: every image of this shard -> `<cache>/<image key>.npy`.

The pipeline: a thread pool decodes and resizes images (as `images.load_image`) a little ahead
of the model, the backbone runs on full batches, and a writer thread writes each feature file
atomically, so neither decoding nor disk I/O stalls the model. Bad images do not stop the run:
they go to failed.tsv with a short reason. The decode workers also hash each image's bytes,
and every file written gets a provenance index entry (`feature_index`: this backbone's
identity, the feature file's stat, the image's size, mtime and sha256).

A rerun resumes (`_plan`): a feature file counts as done only if its index entry has this
cache's identity, its stat matches the entry and its source image's size and mtime match too
(an image with a new mtime but the same sha256 is only re-indexed); everything else is
extracted again and reported (one that fails then loses its old file: not counted, not used).
`--verify` also hashes every image and reads every feature file fully (the files of images
it finds changed under the same size and mtime are removed before any is extracted).
shard = sha256(key) mod num_shards, and shards may write into one cache concurrently; an
extraction of another images folder running into the cache refuses this one before anything
is written (`feature_cache.extracting_from`: their same-named images' features would mix).
Keys that differ only in letter case or Unicode form ("Dog.jpg", "dog.jpg") get one feature
file on a --cache whose file system ignores that (macOS, exFAT/FAT/NTFS drives, SMB): where
the cache's probe (`feature_cache.names_fold`) says so, every key of such a pair fails before
anything is written (`_folded_together`, across shards), and a key whose file is already
another key's by the index is not extracted over it (`HELD`), unless that key's image is
gone from --images or is this one: one image renamed, extracted again (`_a_pair`).
The cache itself (layout, checks, manifest, identity) is `feature_cache`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import hashlib
import os
import queue
import sys
import threading
import time
from typing import Iterable, NamedTuple, Optional

import cv2
import numpy as np

from caption_attn import feature_cache, feature_index, interrupts
from caption_attn import progress as progress_lib
from caption_attn.backbone import (IMAGE_SIZE, Backbone, check_weights_flag,
                                   refuse_aborting_precision)
from caption_attn.config import MAX_WORKERS, ExtractConfig
from caption_attn.data import image_key_problem
from caption_attn.errors import OutOfMemory, UserError, WriteFailed, counted, out_of_memory
from caption_attn.feature_cache import FAILED, check_feature_file, feature_path, npy_header
from caption_attn.feature_index import (IMAGE_CHANGED, RERUN, ImageStamp, SegmentWriter,
                                        make_entry)
from caption_attn.fileio import (check_utf8_path, describe_holders, longest_temp_name,
                                 one_line, usable_cores, write_bytes_atomic)
from caption_attn.images import (IMAGE_EXTENSIONS, TOO_LARGE, ImageError, decode_image,
                                 heatmaps_note, is_heatmap_file, left_out_note, list_images,
                                 printable_name, read_image_file, resize_image)
from caption_attn.run import check_folder_writable


def shard_of(key: str, num_shards: int) -> int:
    """Deterministic shard of an image key (independent of list order and of the machine)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % num_shards


def _read_image(path: str) -> tuple[np.ndarray, ImageStamp]:
    """(uint8 (299, 299, 3) pixels, the file's size, mtime and sha256 of the bytes decoded);
    raises ImageError. Runs in the decode pool (sha256 of a 160 KB COCO JPEG: 0.09 ms CPU)."""
    try:
        data, st = read_image_file(path)
        stamp = ImageStamp(st.st_size, st.st_mtime_ns, hashlib.sha256(data).hexdigest())
        return resize_image(decode_image(data)), stamp
    except MemoryError:   # failed.tsv said "error (MemoryError: )"
        raise ImageError(TOO_LARGE) from None


# a feature file's name the cache's file system refuses (exFAT/FAT: ':' '?' '"'..., EINVAL;
# not in its character set, EILSEQ; a folder longer than its limit): that image fails, the
# others are written (it stopped the whole run, and every rerun at it again)
NAME_REFUSED = (errno.EINVAL, errno.EILSEQ, errno.ENAMETOOLONG)


class _Writer:
    """Background thread writing feature files and their index entries, so disk I/O never
    stalls the model."""

    def __init__(self, header: bytes, dtype: str, max_items: int, index: SegmentWriter,
                 fingerprint: str, images_dir: str, written: Optional[list] = None):
        self.header, self.dtype = header, np.dtype(dtype)
        self.index, self.fingerprint, self.images_dir = index, fingerprint, images_dir
        self.queue: queue.Queue = queue.Queue(maxsize=max_items)
        # what failed, naming the file whose write failed (not the one being queued): a
        # feature file, or the index segment its entry went into
        self.error: Optional[UserError] = None
        # keys written and indexed (the caller's list: it still has them after a Ctrl-C)
        self.written: list[str] = [] if written is None else written
        self.failed: dict[str, str] = {}   # key -> why: its name refused (`NAME_REFUSED`)
        self.thread = threading.Thread(target=self._run, name="feature-writer", daemon=True)
        self.thread.start()

    def put(self, key: str, path: str, features: np.ndarray, stamp: ImageStamp) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((key, path, features, stamp))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after an error
            key, path, features, stamp = item
            try:  # write_bytes_atomic creates the key's sub-folders
                written = write_bytes_atomic(
                    path, (self.header, features.astype(self.dtype).tobytes()))
                self.index.add(make_entry(key, self.fingerprint, written, stamp,
                                          self.images_dir))
                self.written.append(key)
            except UserError as e:   # the index's segment (`SegmentWriter`), named by it
                self.error = e
            except OSError as e:
                # a name is refused where a file or folder is made or renamed (the error names
                # it); an EINVAL of a write or fsync is the disk's, as any other error
                if e.errno not in NAME_REFUSED or e.filename is None:
                    self.error = WriteFailed(one_line(path), e, RERUN)
                    continue
                self.failed[key] = (
                    f"its feature file's name is refused by the --cache file system "
                    f"({e.strerror}): rename the image (exFAT and FAT take none of : * ? \" "
                    f"< > | nor control characters), or extract into a --cache on a Linux file "
                    f"system")
            except Exception as e:  # noqa: BLE001 - reported by the main thread
                self.error = WriteFailed(one_line(path), e, RERUN)

    def close(self) -> None:
        """Waits until the queued files are written and indexed. A Ctrl-C or SIGTERM lands
        after (a second one at once): it ended the wait and the thread wrote on past the
        index's last segment (files without an entry, extracted again), or died mid-file."""
        with interrupts.held():
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
                  dtype: str, batch_size: int, workers: int, progress,
                  index: SegmentWriter, fingerprint: str,
                  written: Optional[list] = None) -> tuple[list[str], dict[str, str]]:
    """Decode (thread pool) -> backbone (batches) -> write (writer thread, index entries into
    `index` with `fingerprint`).

    `progress`: a keras.utils.Progbar over `keys` (never finalized here). Returns (keys
    written, {key: failure reason}); `written`, if given, is that list, filled as they are
    (what was written when an interrupt or error ends the run).
    """
    failed: dict[str, str] = {}
    header = npy_header(dtype)
    writer = _Writer(header, dtype, 2 * batch_size, index, fingerprint, images_dir, written)
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode")
    lookahead = 2 * batch_size + workers  # next batch is decoded while the model runs
    pending: collections.deque = collections.deque()
    todo = iter(keys)
    batch = np.zeros((batch_size, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)  # (B, 299, 299, 3)
    batch_keys: list[str] = []
    stamps: list[ImageStamp] = []

    def submit() -> None:
        key = next(todo, None)
        if key is not None:
            pending.append((key, pool.submit(_read_image, os.path.join(images_dir, key))))

    def run_batch() -> None:
        n = len(batch_keys)
        try:
            feats = backbone(batch[:n])                              # (n, 64, 2048) float32
        except Exception as e:
            oom = _out_of_memory(e, batch_size)
            if oom is None:
                raise
            raise oom from None
        stored = feats.astype(dtype)                                 # (n, 64, 2048) dtype
        finite = np.isfinite(stored).reshape(n, -1).all(axis=1)      # (n,)
        for key, row, ok, stamp in zip(batch_keys, stored, finite, stamps):
            if ok:
                writer.put(key, feature_path(cache_dir, key), row, stamp)
            else:
                failed[key] = f"non-finite features in {dtype}"
        batch_keys.clear()
        stamps.clear()
        _show(progress, len(writer.written) + writer.queue.qsize(),
              len(failed) + len(writer.failed))

    try:
        for _ in range(lookahead):
            submit()
        while pending:
            key, future = pending.popleft()
            submit()
            try:
                batch[len(batch_keys)], stamp = future.result()
                batch_keys.append(key)
                stamps.append(stamp)
            except Exception as e:  # noqa: BLE001 - one bad image never stops the run
                failed[key] = str(e) if isinstance(e, ImageError) else \
                    f"error ({type(e).__name__}: {e})"
                _show(progress, len(writer.written) + writer.queue.qsize(),
                      len(failed) + len(writer.failed))
                continue
            if len(batch_keys) == batch_size:
                run_batch()
        if batch_keys:
            run_batch()
    finally:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        finally:   # a Ctrl-C in that wait skipped it: the writer wrote on, unwaited
            writer.close()
    if writer.error is not None:
        raise writer.error
    return writer.written, {**failed, **writer.failed}


def _out_of_memory(error: Exception, batch_size: int) -> Optional[OutOfMemory]:
    """The one-line `UserError` (exit 1) of TensorFlow's out-of-memory `error` in the backbone
    (a --batch-size too large for a GPU: it was a traceback), else None."""
    what = out_of_memory(error)
    if what is None:
        return None
    return OutOfMemory(f"out of memory in the backbone at --batch-size {batch_size} ({what}); "
                       f"rerun with a lower --batch-size: the feature files written so far "
                       f"are kept, and the command rerun goes on with the rest", what)


# why an image the caption file names is not extracted: a heatmap `caption --plot-attention`
# drew (`images.is_heatmap_file`) is no photo of the dataset
HEATMAP = ("a heatmap caption-attn drew (caption --plot-attention), not a photo: take it out "
           "of the caption file")


# why an image is not extracted whose feature file would be another's too (`FOLDED`,
# `_folded_together`), or is already (`HELD`, `_extract_into_cache`); `folded_why` says why
FOLDED = "would share its feature file with "
HELD = "its feature file is already that of "


def folded_why(a: str, b: str) -> str:
    """Why keys `a` and `b` (one `folded_name`) share a feature file, and what to do: the
    advice for a pair differing in case only named a case-sensitive file system, which does
    not help a pair differing in Unicode form (case-sensitive APFS folds the form)."""
    kinds = feature_cache.name_differences(a, b)
    what = " and ".join(w for k, w in ((feature_cache.CASE, "letter case"),
                                        (feature_cache.FORM, "Unicode form (NFC, NFD)"))
                        if k in kinds)
    where = "a case-sensitive file system" if feature_cache.FORM not in kinds else \
        "a Linux file system such as ext4, xfs or btrfs (without casefold)"
    return (f" (the names differ only in {what}, which the file system of --cache does not "
            f"tell apart): use a --cache on {where}, or rename one of the images")


# why an image is extracted again whose feature file another key's index entry vouches for,
# when that key's image is gone or is this one (`_a_pair`): one image renamed
RENAMED = "its feature file was that of "
RENAMED_WHY = (", an image now gone from --images or this one under another spelling (renamed "
               "only in letter case or Unicode form)")


def _folded_together(images_dir: str, cache: str, keys: list[str],
                     variants: Optional[list] = None) -> dict[str, str]:
    """{key: reason (FOLDED)} for the `keys` whose feature file would be that of another of
    them in `cache` (`feature_cache.names_meet`): every key of such a pair fails, since the
    file there, if any, may be either's (removed: `_extract_into_cache`). Only keys whose
    image is there count: a caption file naming an image also in another case loses
    nothing when that name is missing. `variants` receives the groups of such keys this
    cache tells apart."""
    failed: dict[str, str] = {}
    for group in feature_cache.name_variants(keys):
        present = [k for k in group if os.path.lexists(os.path.join(images_dir, k))]
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                if feature_cache.names_meet(cache, a, b):
                    why = folded_why(a, b)
                    failed.setdefault(a, f"{FOLDED}{one_line(b)}{why}")
                    failed.setdefault(b, f"{FOLDED}{one_line(a)}{why}")
        if variants is not None and len(present) > 1 and not set(present) & failed.keys():
            variants.append(present)
    return failed


def _a_pair(images_dir: str, key: str, other: str, recorded: Iterable = ()) -> bool:
    """`key` and `other`, whose feature file is one on the cache's file system, are two
    images: `other`'s image is still under `images_dir`, or under a folder its index entries
    record (`recorded`: a cache holds several folders' features, and another folder's
    "Dog.jpg" beside this one's "dog.jpg" is another picture, whose features a rename would
    overwrite with exit 0), and is another file than `key`'s. Otherwise `key` is `other`
    renamed only in letter case ("IMG.JPG" now "img.jpg": the old name gone, or on a folder
    that ignores case too, found as the same file): held, it was never extracted again, and
    every run failed. A `key` whose image is missing is taken for a pair: extracting it
    would fail and remove `other`'s features."""
    mine = os.path.join(images_dir, key)
    if not os.path.lexists(mine):
        return True
    for folder in dict.fromkeys([images_dir, *(f for f in recorded if f)]):
        theirs = os.path.join(folder, other)
        if not os.path.lexists(theirs):
            continue
        try:
            if not os.path.samefile(mine, theirs):
                return True
        except OSError:   # (a dangling link, a file removed meanwhile)
            return True
    return False


def _shard_keys(images_dir: str, cfg: ExtractConfig, keys: Optional[list[str]],
                left_out: Optional[list] = None, heatmaps: Optional[list] = None,
                variants: Optional[list] = None) -> tuple[list[str], dict[str, str]]:
    """(this shard's keys to extract, {this shard's unusable keys: reason}); without `keys`,
    the folders under `images_dir` that cannot be listed are failures too ("FOLDER/", in
    every shard: each shard's images in them are missed), `left_out` receives the files
    the walk did not take for their extension and `heatmaps` the heatmaps caption-attn drew
    it left out. A heatmap named in `keys` (a .png) fails as `HEATMAP`; keys whose feature
    files would be one on the cache's file system fail in every shard (`_folded_together`,
    `variants`: its groups the cache tells apart). (`images_dir` is a folder:
    `check_flags`.)"""
    folders: dict[str, str] = {}
    walked = keys is None
    if walked:
        keys = list_images(images_dir, folders, left_out, heatmaps=heatmaps)
        if not keys and not folders:
            raise UserError(f"--images {images_dir}: no image files found (extensions "
                            f"{', '.join(IMAGE_EXTENSIONS)})"
                            + (f"; {left_out_note(left_out, 'there')}" if left_out else "")
                            + (f"; {heatmaps_note(heatmaps, 'there')}" if heatmaps else ""))
    keys = sorted(set(keys))
    # a file name that is not UTF-8 (caf\xe9.jpg) is 'caf\udce9.jpg' here: no shard hash,
    # index line or feature file name can hold it, so it fails under a readable name
    undecodable = {k for k in keys if printable_name(k) != k}
    keys = [k for k in keys if k not in undecodable]
    name_max = _name_max(cfg.cache)
    failed = {k: reason for k in keys
              if (reason := image_key_problem(k) or _name_problem(k, name_max))}
    failed.update({printable_name(k): "file name is not valid UTF-8: rename the file"
                   for k in undecodable})
    failed.update(_folded_together(images_dir, cfg.cache, [k for k in keys if k not in failed],
                                   variants))
    mine = [k for k in keys if k not in failed
            and shard_of(k, cfg.num_shards) == cfg.shard_index]
    failed = {k: r for k, r in failed.items() if shard_of(k, cfg.num_shards) == cfg.shard_index}
    if not walked:   # the walk left them out; read only for this shard's .png names
        failed.update({k: HEATMAP for k in mine if k.lower().endswith(".png")
                       and is_heatmap_file(os.path.join(images_dir, k), links=True)})
        mine = [k for k in mine if k not in failed]
    failed.update({printable_name(k): r for k, r in folders.items()})
    return mine, failed


def _name_max(cache_dir: str) -> int:
    """The longest file name (bytes) the file system of `cache_dir` (or of its nearest
    existing parent) takes; 255 when it does not say."""
    probe = os.path.abspath(cache_dir)
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        return os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _name_problem(key: str, name_max: int) -> Optional[str]:
    """Why `key`'s feature file cannot be written (its temporary name, `fileio.temp_name`
    with the longest pid, is the longest name written), or None. Without this an image whose
    name is legal but near the limit (80 CJK characters are 240 bytes) stopped the whole run
    with ENAMETOOLONG at its turn."""
    base = os.path.basename(feature_path("", key))   # the feature file's own name
    longest = longest_temp_name(base)
    if longest <= name_max:
        return None
    return (f"file name too long for the feature cache (the feature file's temporary name "
            f"needs {longest} bytes, the file system takes {name_max}): rename the image")


class _Plan(NamedTuple):
    done: list[str]            # keys whose feature file is kept as it is
    todo: list[str]            # keys to extract: no file, or `redo`
    redo: dict[str, str]       # key -> why its existing feature file is extracted again
    reindexed: int             # images with a new mtime but the same bytes (entry refreshed)
    others: dict[str, str]     # key of `redo` -> the other images folder whose image of that
                               # name (as it is now) its features are of
    copies: set                # those of the folders this folder is a copy of
    unmarked: list[str]        # keys of `redo` whose image `--verify` found changed under
                               # the same size and mtime: nothing else tells their features
                               # are outdated (`_remove_unmarked`)
    entries: list              # refreshed index entries, written once nothing is refused: a
                               # refused run (another folder's same-named images) wrote them,
                               # and this folder's kept images recorded as the other's


_UNREADABLE = ""   # `_image_sha256` of an image that exists but cannot be read
# why `--verify` extracts an image again whose size and mtime are those its index entry
# records: only its sha256 differs, so no other command can tell (`_Plan.unmarked`)
SAME_STAT_CHANGED = f"{IMAGE_CHANGED} (same size and modification time, other content)"


def _image_sha256(images_dir: str, key: str) -> Optional[str]:
    """The image's sha256 now; None when it is gone (its features still are those of the
    image as it was); _UNREADABLE when it cannot be read (e.g. no read permission) or is no
    regular file. Read as the decode path reads it (`images.read_image_file`): an image
    replaced by a FIFO (or a link to /dev/zero) hung the rerun here, before its progress
    bar, in a pool thread even Ctrl-C waited for."""
    try:
        data, _ = read_image_file(os.path.join(images_dir, key))
    except ImageError as e:
        return None if str(e) == "missing" else _UNREADABLE
    return hashlib.sha256(data).hexdigest()


def _plan(cache: str, keys: list[str], manifest: dict, images_dir: str, verify: bool,
          workers: int, loaded: Optional[feature_index.Index] = None,
          again: Optional[dict[str, str]] = None) -> _Plan:
    """Which of `keys` are done (see the module docstring), and the entries that re-index
    images that only got a new mtime (`_Plan.entries`). `verify`: also the sha256 of every
    image and a full read of every file.
    `loaded`: the cache's index, when already loaded. `again`: {key: why} of keys whose
    existing file is extracted again whatever their entries say."""
    again = again or {}
    fingerprint = feature_cache.cache_identity(manifest)["fingerprint"]
    loaded = feature_index.load_index(cache) if loaded is None else loaded
    size = feature_cache.feature_file_size(manifest["dtype"])
    checks = dict(zip(keys, feature_index.check_keys(cache, keys, loaded, fingerprint, size,
                                                     images_dir)))
    kept = [k for k, c in checks.items() if c.reason in (None, IMAGE_CHANGED)
            and k not in again]
    redo = {k: c.reason for k, c in checks.items()
            if c.reason not in (None, IMAGE_CHANGED, "missing")}
    redo.update({k: r for k, r in again.items() if checks[k].reason != "missing"})
    to_hash = [k for k in kept if verify or checks[k].reason == IMAGE_CHANGED]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        hashes = dict(zip(to_hash, pool.map(lambda k: _image_sha256(images_dir, k), to_hash)))
        for key in to_hash:
            if hashes[key] == _UNREADABLE:
                # changed (its stat) and unreadable: extracted again, so the pipeline lists it
                # in failed.tsv with the reason and removes the outdated file; kept as done,
                # train refused it as changed and sent the user back here. With --verify
                # and the same stat, the features are still of the image as it is.
                if checks[key].reason:
                    redo[key] = IMAGE_CHANGED
            elif hashes[key] is not None and hashes[key] != checks[key].entry.image_sha256:
                redo[key] = IMAGE_CHANGED if checks[key].reason else SAME_STAT_CHANGED
        kept = [k for k in kept if k not in redo]
        if verify:
            results = pool.map(lambda k: check_feature_file(checks[k].path, manifest["dtype"],
                                                            full=True), kept)
            redo.update({k: r for k, r in zip(kept, list(results)) if r is not None})
    reindexed, entries = 0, []
    here = os.path.abspath(images_dir)
    recorded_here = {f for f in {c.entry.images_dir for c in checks.values() if c.entry}
                     if f is not None and os.path.realpath(f) == os.path.realpath(here)}
    for key in kept:
        check = checks[key]
        if key not in redo and check.reason == IMAGE_CHANGED and hashes.get(key):
            entries.append(check.entry._replace(image_size=check.image_stat.st_size,
                                                image_mtime_ns=check.image_stat.st_mtime_ns,
                                                images_dir=here))
            reindexed += 1
        elif key not in redo and check.reason is None and check.image_stat is not None \
                and check.entry.images_dir not in recorded_here:
            # kept, its image here the one it was made from: the entry records this folder
            # (an older index recorded none; a copy's images are this folder's from now on)
            entries.append(check.entry._replace(images_dir=here))
    done = [k for k in kept if k not in redo]
    todo = [k for k in keys if k in redo or checks[k].reason == "missing"]
    others = _of_other_folders({k: checks[k].entry for k, r in redo.items()
                                if r.startswith(IMAGE_CHANGED)}, manifest, images_dir)
    # only the kept images found here are this folder's: a caption file's key whose image
    # is missing here keeps its features too, and counting those, another dataset sharing
    # a few names with the cache's folder passed for a copy of it (their features replaced)
    found_here = {k: checks[k].entry for k in done if checks[k].image_stat is not None}
    copies = {folder for folder in set(others.values())
              if _is_copy_of(folder, found_here, sum(f == folder for f in others.values()))}
    unmarked = [k for k, r in redo.items() if r == SAME_STAT_CHANGED]
    return _Plan(done, todo, redo, reindexed, others, copies, unmarked, entries)


def _same_image(folder: str, key: str, entry) -> bool:
    """FOLDER/key is the image `entry` (an index entry) was made from (size and mtime)."""
    try:
        return entry.matches_image(os.stat(os.path.join(folder, key)))
    except OSError:
        return False


def _of_other_folders(entries: dict, manifest: dict, images_dir: str) -> dict[str, str]:
    """{key: FOLDER} for the feature files about to be extracted again because this folder's
    image changed (`entries`: their index entries) that are the features of FOLDER/key as it
    is now, FOLDER another images folder the cache was extracted from (the newest first):
    same name, other content, and extracting would replace that folder's features. Also
    those whose entry records FOLDER, when the image is gone from it: its features stand for
    it in every run on FOLDER's captions (a missing source image keeps its features), and
    replacing them with this folder's image went without a word."""
    folders = feature_cache.other_images_folders(manifest, images_dir)
    recorded = feature_index.recorded_folders(folders, {e.images_dir for e in entries.values()})
    found = {}
    for key, entry in entries.items():
        folder = next((f for f in folders if _same_image(f, key, entry)), None)
        mine = recorded.get(entry.images_dir)
        if folder is None and mine and not os.path.lexists(os.path.join(mine, key)):
            folder = mine
        if folder is not None:
            found[key] = folder
    return found


def _is_copy_of(folder: str, done: dict, changed: int) -> bool:
    """This images folder is a copy of `folder` (`cp -a`, `rsync -a`): at least as many of
    its images whose features are kept (`done`: key -> index entry, of images found in this
    folder only) are also, by size and mtime, `folder`'s images of those names as
    `changed`, its images of `folder`'s names with other content. Those are then edits of
    the same dataset, extracted as before; a folder with fewer in common is another dataset
    (one image copied into a folder of others made the whole folder pass for a copy, and
    its other images replaced `folder`'s features)."""
    same = 0
    for key, entry in done.items():
        same += _same_image(folder, key, entry)
        if same >= changed:
            return True
    return False


def _refuse_replacing(images_dir: str, others: dict[str, str]) -> UserError:
    """The refusal of an extraction that would replace the features of another folder's
    same-named images: they stood in for that folder's images without a word (a note after
    the fact was all), for every run on its captions (`train` checks the cache's last
    --images, this folder from then on)."""
    by_folder = collections.Counter(others.values())
    folder, n = by_folder.most_common(1)[0]
    example = next(k for k, f in others.items() if f == folder)
    more = f" (and {len(others) - n} of other folders)" if len(others) > n else ""
    return UserError(
        f"--images {images_dir}: {n} of its images{more} have the names of images of "
        f"{folder} whose features this cache holds, with other content (e.g. "
        f"{one_line(example)}): extracting would replace those features, and runs on "
        f"{folder}'s captions would train on or be scored against these images. A cache holds "
        f"one feature file per image path: extract this dataset into another --cache (one "
        f"per dataset), or, if these images are to replace those, add --replace-other-images")


def _naming_unmarked(error: UserError, unmarked: list[str]) -> UserError:
    """`error` (a refusal that stops the run before `_remove_unmarked`) also naming the
    feature files `--verify` found outdated (`_Plan.unmarked`): they stay as they are, and
    the refusal was all the run said, so `train` and `evaluate` went on with them."""
    if not unmarked:
        return error
    n = len(unmarked)
    return type(error)(
        f"{error.message}. Also, --verify found {counted(n, 'image')} whose content changed "
        f"under the same size and modification time (e.g. {one_line(unmarked[0])}): "
        f"{'its feature file is' if n == 1 else 'their feature files are'} still of the "
        f"image as it was, and `train` and `evaluate`, which compare only sizes and "
        f"modification times, use {'it' if n == 1 else 'them'} until an `extract-features "
        f"--verify` gets past this refusal", error.exit_code, error.lines)


def _remove_unmarked(cache: str, unmarked: list[str]) -> None:
    """Remove the feature files `--verify` found outdated (`_Plan.unmarked`) once the run's
    refusals have passed: their index entries still vouch for them (the image's size and
    mtime are the recorded ones), so a run that stopped before their turn (Ctrl-C, a kill,
    random weights that could not be read) left them to `train`, which took the features
    of the image as it was. Removed, they are "missing" until extracted, as the file of a
    changed image that fails now (`outdated`)."""
    for key in unmarked:
        with contextlib.suppress(FileNotFoundError):
            os.remove(feature_path(cache, key))


def _extract_with_progress(backbone: Backbone, images_dir: str, todo: list[str],
                           cfg: ExtractConfig, workers: int, progress: bool,
                           index: SegmentWriter, fingerprint: str,
                           written: list) -> tuple[list[str], dict[str, str]]:
    """`_run_pipeline` over `todo` with OpenCV set up and a progress bar: one line redrawn on
    a terminal; in a log file a plain line a minute and one at the end; none without
    `progress`. `written` receives the keys written as they are."""
    bar = progress_lib.bar(len(todo), progress, unit_name="image", stateful=["failed"],
                           periodic=True)
    with _opencv_settings():
        written, failed = _run_pipeline(backbone, images_dir, cfg.cache, todo, cfg.dtype,
                                        cfg.batch_size, workers, bar, index, fingerprint,
                                        written)
    _show(bar, len(written), len(failed), finalize=True)
    return written, failed


def extract_features(images_dir: str, cfg: ExtractConfig, keys: Optional[list[str]] = None,
                     progress: bool = True) -> dict:
    """Extract the features of this shard's images into `cfg.cache`; return a summary.

    `keys`: image paths relative to `images_dir` (e.g. from a caption file); default: every
    image file under it but the heatmaps `caption --plot-attention` drew. Bad images do not
    stop the run: they are listed in failed.tsv, and so are the folders under it that cannot
    be listed (as "FOLDER/", without `keys`) and such heatmaps that `keys` names (`HEATMAP`).
    Summary: images (in this shard), extracted, skipped (already done), invalid {key: why its
    existing file was extracted again}, repaired (how many of those were), stale_removed {key:
    why its existing file was to be extracted again, but the image failed, or `HEATMAP`: the
    file was removed}, changed_images (of them, because the source image changed), reindexed
    (images with a new mtime but the same bytes), failed, failures {key: reason}, seconds,
    images_per_s, cache, manifest, failed_file, count (the cache's feature files, so far when
    other_writers: the pids of other extractions, e.g. shards, still writing into the cache on
    this machine; still_writing says so for the summary), feature_scale, stale_temp_removed,
    replaced_others {key: the other images folder whose same-named image's features were
    replaced, with `cfg.replace_other_images` or from a folder this one is a copy of},
    left_out (files under `images_dir` a walk without `keys` did not take for their
    extension), heatmaps (the heatmaps such a walk left out), case_variants (groups of keys
    differing only in letter case or Unicode form that this cache keeps apart: a copy on a
    file system that ignores case would not), images_dir, exit_code (1 when
    `cfg.strict` and something failed, or when nothing could be extracted) and message.
    Refused (`UserError`, nothing written) while an extraction of another images folder runs
    into `cfg.cache` (`feature_cache.extracting_from`), with `cfg.replace_other_images` too.
    """
    start = time.monotonic()
    check_flags(images_dir, cfg)
    # while a train or evaluate reads the cache, refused only before rewriting or removing a
    # feature file (`busy`): new ones harm no reader, and a script's `extract-features &&
    # train`, rerun beside a running train, goes on as before. While an extraction of another
    # images folder writes into it, refused at once (shards of this folder go on together, as
    # do other machines' shards of this --num-shards)
    with feature_cache.using_features(cfg.cache, writing=True, readers_ok=True) as busy, \
            feature_cache.extracting_from(cfg.cache, images_dir, cfg.num_shards,
                                          cfg.shard_index):
        return _extract_into_cache(images_dir, cfg, keys, progress, start, busy)


def check_flags(images_dir: str, cfg: ExtractConfig) -> None:
    """The refusals of `extract_features` that read no image, no caption file and no
    TensorFlow: the CLI makes them before it imports TensorFlow and reads `--captions` (a
    COCO file's seconds), and `extract_features` first of all."""
    refuse_aborting_precision(cfg.precision, f"--precision {cfg.precision}",
                              "use --precision float32 (with another --cache, if this one was "
                              "extracted in bfloat16)")
    # train and evaluate refuse such a cache (TensorFlow reads its files): refused first
    check_utf8_path("--cache", cfg.cache, "reads the feature files (`train`, `evaluate`)")
    check_folder_writable(cfg.cache, "--cache")  # before the backbone is built
    feature_cache.check_cache_folder(cfg.cache)
    if not os.path.isdir(images_dir):
        raise UserError(f"--images {images_dir}: not a folder")
    check_weights_flag(cfg.weights)


def _extract_into_cache(images_dir: str, cfg: ExtractConfig, keys: Optional[list[str]],
                        progress: bool, start: float, busy: Optional[UserError]) -> dict:
    """`extract_features` once the cache is this process's to write; `busy` (readers use
    it) is raised if an existing feature file is to be extracted again, before any is."""
    left_out: list[str] = []
    heatmaps: list[str] = []
    variants: list[list[str]] = []
    mine, failed = _shard_keys(images_dir, cfg, keys, left_out, heatmaps, variants)
    # a caption file's images none of which is in --images (the dataset's folder above
    # them: /data/Flickr8k for /data/Flickr8k/Images): those with features counted as
    # "already done", exit 0 even with --strict (`_exit_status` says it now)
    none_here = keys is not None and bool(mine) and \
        not any(os.path.lexists(os.path.join(images_dir, k)) for k in mine)
    cache = cfg.cache
    # features an extraction before heatmaps were left out made of a heatmap the caption
    # file names, and the file keys that differ only in case would share: removed below, as
    # those of an image that fails now (`outdated`)
    drawn = {k: r for k, r in failed.items() if (r == HEATMAP or r.startswith(FOLDED))
             and os.path.lexists(feature_path(cache, k))}
    backbone, manifest = feature_cache.open_cache(cache, cfg)
    stale = feature_cache.remove_stale_temp_files(cache)
    loaded = feature_index.load_index(cache)
    # a file another key's index entry vouches for (same name but for letter case): not
    # replaced; removed when this key's entry vouches for it too (it may be either's). Unless
    # that key's image is gone or is this one (`_a_pair`): one image renamed, extracted again,
    # its write replacing the file (the old key's entry then vouches for it no more, or, with
    # a coarse mtime, with this key's too: `usable_features` gives it to neither, and the
    # next run extracts it again)
    held = feature_cache.shared_feature_files(cache, mine, loaded, vouched_only=True)
    renamed = {k: f"{RENAMED}{one_line(o)}{RENAMED_WHY}" for k, o in held.items()
               if not _a_pair(images_dir, k, o,
                              [e.images_dir for e in loaded.entries.get(o, ())])}
    held = {k: o for k, o in held.items() if k not in renamed}
    for key, other in held.items():
        failed[key] = f"{HELD}{one_line(other)}{folded_why(key, other)}"
        with contextlib.suppress(OSError):
            if loaded.match(key, os.stat(feature_path(cache, key))):
                drawn[key] = failed[key]
    mine = [k for k in mine if k not in held]
    folders = sum(k.endswith("/") for k in failed)   # unlistable: no image of their own
    n_bad_keys = len(failed) - folders
    fingerprint = feature_cache.cache_identity(manifest)["fingerprint"]
    workers = cfg.workers or min(usable_cores(), MAX_WORKERS)
    index = SegmentWriter(cache)
    plan, so_far, added = None, [], False   # so_far: the keys written, as they are
    try:
        plan = _plan(cache, mine, manifest, images_dir, cfg.verify, workers, loaded, renamed)
        refused = {k: f for k, f in plan.others.items() if f not in plan.copies}
        if refused and not cfg.replace_other_images:
            raise _naming_unmarked(_refuse_replacing(images_dir, refused), plan.unmarked)
        if busy is not None and (plan.redo or drawn):   # rewritten or removed
            raise _naming_unmarked(busy, plan.unmarked)
        for entry in plan.entries:
            index.add(entry)
        _remove_unmarked(cache, plan.unmarked)
        if backbone is None and plan.todo:  # a random backbone's cache: its saved weights
            backbone = Backbone.from_manifest(cache)
        if plan.todo:
            added = feature_cache.add_images_folder(cache, images_dir)
        t0 = time.monotonic()
        written, bad = _extract_with_progress(backbone, images_dir, plan.todo, cfg, workers,
                                              progress, index, fingerprint, so_far)
        extract_seconds = time.monotonic() - t0
    except BaseException as e:
        # entries of every file written so far, even when interrupted; a failed write of
        # them (the disk that failed a feature file) is not news enough to hide why it ended
        with contextlib.suppress(WriteFailed):
            index.close()
            # Ctrl-C, SIGTERM: what is kept (said only once their entries are written)
            if isinstance(e, KeyboardInterrupt) and plan is not None and plan.todo:
                print(_interrupted_note(cfg, len(so_far), len(plan.todo), len(plan.done)),
                      file=sys.stderr, flush=True)
        if added and not so_far:     # nothing of the folder in the cache after all
            with contextlib.suppress(OSError, UserError):     # (kept: a refusal names it)
                feature_cache.remove_images_folder(cache, images_dir)
        raise
    index.close()
    failed.update(bad)
    # a file to redo whose image now fails keeps features of the image as it was, or damaged
    # ones: removed, so neither the count nor the index vouches for it (train skips the image)
    outdated = {k: r for k, r in plan.redo.items() if k in bad} | drawn
    for key in outdated:
        with contextlib.suppress(FileNotFoundError):
            os.remove(feature_path(cache, key))
    n_failed_file, count = feature_cache.record_run(cache, images_dir, failed,
                                                    plan.done + written, manifest,
                                                    walked=keys is None)
    # shards still writing: the count is of the files so far (the last one's is the cache's)
    writers = feature_cache.other_writers(cache)
    rewritten = set(plan.redo) & set(written)
    summary = {
        "images": len(mine) + n_bad_keys,
        "extracted": len(written), "skipped": len(plan.done),
        "invalid": {k: r for k, r in plan.redo.items() if k in rewritten},
        "repaired": len(rewritten), "stale_removed": outdated,
        "changed_images": sum(plan.redo[k].startswith(IMAGE_CHANGED) for k in rewritten),
        "reindexed": plan.reindexed,
        "failed": len(failed) - folders, "unreadable_folders": folders,
        "failures": dict(sorted(failed.items())),
        "seconds": time.monotonic() - start, "extract_seconds": extract_seconds,
        "images_per_s": len(written) / extract_seconds if extract_seconds > 0 and written
        else 0.0,
        "cache": cache, "manifest": feature_cache.manifest_path(cache),
        "failed_file": os.path.join(cache, FAILED), "failed_file_entries": n_failed_file,
        "count": count, "other_writers": writers, "still_writing": _still_writing(writers),
        "dtype": cfg.dtype, "weights": manifest["weights"],
        "feature_scale": manifest["feature_scale"], "stale_temp_removed": stale,
        "shard": f"{cfg.shard_index}/{cfg.num_shards}",
        "replaced_others": {k: f for k, f in plan.others.items() if k in rewritten},
        "left_out": left_out, "heatmaps": heatmaps, "images_dir": images_dir,
        "case_variants": variants, "none_in_images": len(mine) if none_here else 0,
    }
    summary["exit_code"], summary["message"] = _exit_status(summary, cfg.strict)
    return summary


def _interrupted_note(cfg: ExtractConfig, kept: int, todo: int, done: int) -> str:
    """What an extraction stopped by Ctrl-C or SIGTERM leaves (`kept` of the `todo` feature
    files to extract were written and indexed; `done` were there before) and that the same
    command goes on with the rest, as `train` says of its checkpoint."""
    before = f" ({done} were there before)" if done else ""
    # (a note, not in the name of `extract-features`: the demo extracts too)
    shard = f" (shard {cfg.shard_index}/{cfg.num_shards})" if cfg.num_shards > 1 else ""
    if not kept:
        return (f"note: feature extraction stopped before any of the {todo} feature files "
                f"to extract{shard} was written into {one_line(cfg.cache)}{before}: the same "
                f"command extracts them")
    return (f"note: feature extraction stopped after {kept} of the {todo} feature files to "
            f"extract{shard}, written and kept in {one_line(cfg.cache)}{before}: "
            f"the same command continues from there (only the other {todo - kept} are "
            f"extracted)")


def _exit_status(s: dict, strict: bool) -> tuple[int, str]:
    if s.get("none_in_images"):
        return 1, (f"none of the {counted(s['none_in_images'], 'image')} the caption file "
                   f"names is in --images {s['images_dir']}: give the folder the caption "
                   f"file's image names are relative to")
    folders = s.get("unreadable_folders", 0)
    if (s["failed"] or folders) and s["extracted"] + s["skipped"] == 0:
        return 1, "nothing could be extracted"
    if strict and (s["failed"] or folders):
        also = f" and {folders} folder(s) could not be read" if folders else ""
        return 1, f"{s['failed']} image(s) failed{also} and --strict is set"
    return 0, "ok"


def _listed(items) -> str:
    """(image key, reason) pairs as "KEY: REASON; ...", each on one line (`fileio.one_line`):
    a failed image named "a<newline>b.jpg" split the summary's line and could forge one."""
    return "; ".join(f"{one_line(k)}: {one_line(r)}" for k, r in items)


def _still_writing(pids: list[int]) -> str:
    """"; another extract-features (pid P: COMMAND) is still writing into it" for the other
    writers of the cache (`feature_cache.other_writers`), "" for none; said as they run (a
    command is read from /proc)."""
    if not pids:
        return ""
    who = "another extract-features" if len(pids) == 1 else \
        f"{len(pids)} other extract-features"
    return (f"; {who}{describe_holders(pids)} {'is' if len(pids) == 1 else 'are'} still "
            f"writing into it")


def format_summary(summary: dict) -> str:
    """Human-readable summary for the CLI (several lines)."""
    s = summary
    writers = s.get("other_writers") or []
    again = [f"{s['changed_images']} changed image(s)"] if s["changed_images"] else []
    if s["repaired"] > s["changed_images"]:
        again.append(f"{s['repaired'] - s['changed_images']} unusable feature file(s)")
    lines = [f"extracted {s['extracted']}"
             + (f" (again: {', '.join(again)})" if again else "")
             + f", skipped {s['skipped']} already done, failed {s['failed']} of {s['images']} "
             f"images" + (f" ({s['unreadable_folders']} folder(s) could not be read)"
                          if s.get("unreadable_folders") else "")
             + f" (shard {s['shard']}) in {s['seconds']:.1f} s"
             + (f" ({s['images_per_s']:.1f} images/s)" if s["extracted"] else ""),
             f"cache {s['cache']}: {s['count']} feature files{' so far' if writers else ''} "
             f"({s['dtype']}, weights {s['weights']}, feature_scale {s['feature_scale']:g})"
             + s.get("still_writing", "")]
    if s["invalid"]:
        shown = list(s["invalid"].items())[:3]
        lines.append("extracted again: " + _listed(shown)
                     + (" ..." if len(s["invalid"]) > len(shown) else ""))
    if s.get("replaced_others"):
        folders = sorted(set(s["replaced_others"].values()))
        lines.append(f"note: {len(s['replaced_others'])} of these images had been extracted "
                     f"from {', '.join(folders)}: same path, other "
                     f"content, so their features are now this folder's: give `train` "
                     f"--images {folders[0]} for a run on that folder's captions (it then "
                     f"leaves these images out as changed). A cache holds one feature file "
                     f"per image path: extract another dataset into another --cache")
    if s["stale_removed"]:
        shown = list(s["stale_removed"].items())[:3]
        lines.append(f"removed {len(s['stale_removed'])} outdated feature file(s) whose image "
                     f"fails now: " + _listed(shown)
                     + (" ..." if len(s["stale_removed"]) > len(shown) else ""))
    if s.get("left_out"):
        lines.append("note: " + left_out_note(s["left_out"], f"under --images {s['images_dir']}"))
    if s.get("heatmaps"):
        lines.append("note: " + heatmaps_note(s["heatmaps"], f"under --images {s['images_dir']}")
                     + " (`caption --plot-attention` marks each PNG it writes)")
    if s.get("case_variants"):
        n = sum(len(g) for g in s["case_variants"])
        lines.append(f"note: {n} image names differ from another only in letter case or "
                     f"Unicode form (e.g. {' and '.join(map(one_line, s['case_variants'][0]))})"
                     f": this --cache keeps their feature files apart, a copy of it on a file "
                     f"system that ignores case (macOS, exFAT, FAT or NTFS drives, SMB shares)"
                     f" would not (`train` would then leave them out)")
    if s["reindexed"]:
        lines.append(f"{s['reindexed']} image(s) had a new modification time but the same "
                     f"content: re-indexed, not extracted again")
    if s["failures"]:
        shown = list(s["failures"].items())[:5]
        lines.append(f"failed images are listed in {s['failed_file']}: "
                     + _listed(shown)
                     + (" ..." if len(s["failures"]) > len(shown) else ""))
    return "\n".join(lines)  # an exit_code's message is the caller's (the CLI: on stderr)
