"""The resumable `.npy` feature cache: file layout, checks, the failed report, the manifest,
the cache identity and which feature files may be used.

Cache layout:
    <cache>/manifest.json            backbone, weights identity, dtype, image size, resize method,
                                     feature_scale, .npy header length, count, format version
    <cache>/<key>.npy                one file per image; key = path relative to --images
    <cache>/index.jsonl, index/      per-file provenance index (`feature_index`): which backbone
                                     made each file, from which source image
    <cache>/failed.tsv               key<TAB>reason of images that could not be extracted
                                     (a tab, newline, CR or backslash in them as \\t \\n \\r \\\\),
                                     and FOLDER/<TAB>reason of folders that could not be listed
    <cache>/backbone_random_seed{S}.weights.h5   random backbone weights (`--weights random`)
    <cache>/.lock                    flock'ed around every manifest / failed.tsv / index update
    <cache>/.reading.lock, .writing.lock   flock'ed (shared) by every process reading or
                                     writing features: the two exclude each other
    <cache>/.extracting.<pid>.<token>.<host>   the images folder a running extraction reads,
                                     flock'ed (shared) while it runs (`extracting_from`)

Each `.npy` is a (64, 2048) array: InceptionV3's last 8x8x2048 map (ImageNet preprocessing, no
top), flattened row-major (position = row * 8 + col) and multiplied by the cache's
`feature_scale`.

Guarantees:
- Atomic files: a feature is written to a hidden temporary name in its folder and renamed into
  place, so a killed run never leaves a truncated file under a final name. Stale temporary
  files (their process is gone) are removed by the next run.
- Identity: `cache_identity` names what makes features comparable (backbone, weights sha256,
  dtype, precision, scale, image size, resize rule, preprocessing, shape, format) and its
  fingerprint; a cache holds features of one identity only (`open_cache` refuses a run with
  other settings), and every index entry carries the fingerprint of the backbone that wrote
  the file.
- Provenance: a feature file is used (`usable_features`, `feature_index.check_keys`) only
  when it has an index entry of this cache's identity whose recorded size and mtime match
  the file on disk and, where the images folder is known, whose source image size and mtime
  match the image's (in the folder the entry records it was read from, when it is missing
  from the one given). A lost manifest therefore never adopts another backbone's files, and
  a changed image or a rewritten feature file is noticed without reading either.
- One file per key: on a file system that ignores letter case (macOS, exFAT/FAT/NTFS drives,
  SMB shares, ext4 casefold) "Dog.jpg" and "dog.jpg" have one feature file. Extraction fails
  such keys where the cache folds them (`names_fold`, a probe), and a file two keys' names
  lead to is used for neither (`shared_feature_files`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import sys
import time
import unicodedata
from typing import Iterable, Optional

import numpy as np

from caption_attn.backbone import (BACKBONE, FEATURE_LAYOUT, FEATURE_SHAPE, IMAGE_SIZE,
                                   PREPROCESS, Backbone, build_backbone,
                                   calibrate_feature_scale, is_imagenet_weights,
                                   random_weights_file, weights_sha256)
from caption_attn import feature_index
from caption_attn.config import ExtractConfig
from caption_attn.errors import UserError
from caption_attn.fileio import (HOST, describe_holders, file_digest, flock, is_at,
                                 keras_file_atomic, lock_file, lock_holders, one_line,
                                 read_json, temp_name, write_bytes_atomic,
                                 write_json_atomic)
from caption_attn.images import RESIZE_METHOD, is_heatmap_file

FORMAT_VERSION = 2               # bump when the meaning of cached files changes
                                 # (2: the per-file provenance index)
MANIFEST = "manifest.json"
FAILED = "failed.tsv"
LOCK = ".lock"
READING, WRITING = ".reading.lock", ".writing.lock"   # see `using_features`
EXTRACTING = ".extracting"       # + .<pid>.<token>.<host>: see `extracting_from`
STALE_TEMP_AGE_S = 3600          # temp files of other hosts older than this are stale
# `temp_name`s, with the suffixes given to it: .weights.h5 (Keras), .old (export's earlier
# export moved aside while the new one is renamed into place: a host "HOST.old" was no host)
_TEMP_RE = re.compile(r"^\.(?P<base>.+)\.tmp\.(?P<pid>\d+)\.(?P<host>.+?)"
                      r"(\.weights\.h5|\.old)?$")


# =========================================================================== feature files
def feature_path(cache_dir: str, key: str) -> str:
    """<cache>/<key>.npy (key keeps its image extension: a.jpg -> a.jpg.npy)."""
    return os.path.join(cache_dir, *key.split("/")) + ".npy"


def npy_header(dtype: str, shape: tuple = FEATURE_SHAPE) -> bytes:
    """The exact .npy header of every feature file of this dtype (version 1.0, C order)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": tuple(shape)})
    return buf.getvalue()


def feature_file_size(dtype: str) -> int:
    """Bytes of every feature file of this dtype (header + data)."""
    return len(npy_header(dtype)) + int(np.prod(FEATURE_SHAPE)) * np.dtype(dtype).itemsize


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


# =========================================================================== folded names
# A file system that ignores letter case in file names (macOS's APFS and HFS+ as formatted by
# default, exFAT, FAT and NTFS drives, SMB shares, ext4 folders with casefold) gives two image
# keys that differ only so ("Dog.jpg", "dog.jpg": two images on the Linux folder they came
# from) ONE feature file: the one written last stood for both. Where its mtime is coarse
# (exFAT, FAT: both written within one tick) both index entries vouched for it, and `train`
# fed one image's features for the other without a word. APFS and HFS+ also ignore Unicode
# normalization ("café" in NFC and in NFD).
SHARED_FILE = ("shared with another image name (the names differ only in letter case or "
               "Unicode form, which the cache's file system does not tell apart)")
# the kinds of folding (`names_fold`): letter case ("Dog.jpg" is "dog.jpg"), Unicode
# normalization ("café" in NFC is "café" in NFD). NTFS, exFAT and FAT fold case only;
# case-sensitive APFS and ZFS with normalization=formD fold the form only; APFS and HFS+ as
# formatted by default fold both
CASE, FORM = "case", "form"
_FOLDS: dict[str, frozenset] = {}   # real path of a folder -> `names_fold`, for this process


def folded_name(key: str) -> str:
    """`key` as a file system that ignores letter case and Unicode normalization sees it: keys
    of one folded name may get one feature file. A superset of what APFS, HFS+, NTFS, exFAT,
    FAT and ext4's casefold fold (NFD, upper case, case folding, NFD): now and then a pair no
    such file system folds ("STRASSE", "Straße"), never one that one folds."""
    if key.isascii():
        return key.lower()
    nfd = unicodedata.normalize("NFD", key)
    return unicodedata.normalize("NFD", nfd.upper().casefold())


def name_variants(keys: Iterable[str]) -> list[list[str]]:
    """The groups (2 or more keys each, sorted) of `keys` that share a `folded_name`."""
    keys = keys if isinstance(keys, (set, frozenset)) else set(keys)
    if len(set(map(folded_name, keys))) == len(keys):
        return []                                   # the usual case (COCO's: 0.06 s)
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(folded_name(key), []).append(key)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def names_fold(folder: str) -> Optional[frozenset]:
    """What the file system of `folder` folds in file names: a set of CASE (a name is found
    under another that differs from it only in letter case) and FORM (... only in Unicode
    normalization), empty where it tells both apart; None when that cannot be told (no file
    can be created there). Python has no portable question for it: a hidden file is created
    (a `fileio.temp_name`, removed as stale if this process is killed meanwhile) and looked
    up under its name with the ASCII letters' case swapped, and in NFD. Asked once per
    folder (real path) in a process."""
    real = os.path.realpath(folder)
    if real not in _FOLDS:
        folds = _probe_folding(real)
        if folds is None:
            return None
        _FOLDS[real] = folds
    return _FOLDS[real]


def _probe_folding(folder: str) -> Optional[frozenset]:
    probe = temp_name(os.path.join(folder, f"CaseProbe\u00e9{secrets.token_hex(4)}"))
    name = os.path.basename(probe)   # (its "é" in NFC)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:
        return None
    try:
        swapped = "".join(c.swapcase() if c.isascii() else c for c in name)
        found = {kind for kind, other in ((CASE, swapped),
                                          (FORM, unicodedata.normalize("NFD", name)))
                 if os.path.lexists(os.path.join(folder, other))}
        return frozenset(found)
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


def _case_folded(key: str) -> str:
    """`folded_name` without the Unicode normalization."""
    return key.lower() if key.isascii() else key.upper().casefold()


def name_differences(a: str, b: str) -> frozenset:
    """The kinds of folding (CASE, FORM) a file system needs to take keys `a` and `b` (one
    `folded_name`) for one name: FORM when they differ only in Unicode normalization, CASE
    when only in letter case, both when in both ("Café" in NFC, "café" in NFD)."""
    if unicodedata.normalize("NFD", a) == unicodedata.normalize("NFD", b):
        return frozenset({FORM})
    if _case_folded(a) == _case_folded(b):
        return frozenset({CASE})
    return frozenset({CASE, FORM})


def _first_difference(pa: list, pb: list) -> int:
    """The index of the first path component in which `pa` and `pb` differ (the last one's
    when none does)."""
    return next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), len(pa) - 1)


def meeting_folder(cache_dir: str, a: str, b: str) -> str:
    """The folder of the cache in which the feature files of keys `a` and `b` (one
    `folded_name`) would become one: that of their first path component that differs ("x/"
    and "X/" meet in the cache's top folder, "x/a.jpg" and "x/A.jpg" in x/), or its nearest
    parent there now (a folder created later gets its parent's casefold)."""
    pa = a.split("/")
    i = _first_difference(pa, b.split("/"))
    for j in range(i, 0, -1):
        folder = os.path.join(cache_dir, *pa[:j])
        if os.path.isdir(folder):
            return folder
    return cache_dir


def names_meet(cache_dir: str, a: str, b: str) -> bool:
    """The feature files of keys `a` and `b` (one `folded_name`) would be one file in this
    cache: its file system folds every kind of difference the two names have
    (`name_differences`, `names_fold`: a cache folding only Unicode forms, as case-sensitive
    APFS, keeps "Dog.jpg" and "dog.jpg" apart); when that cannot be told, as if it would."""
    folds = names_fold(meeting_folder(cache_dir, a, b))
    return folds is None or name_differences(a, b) <= folds


def one_feature_file(cache_dir: str, a: str, b: str) -> bool:
    """The feature files of keys `a` and `b` (one `folded_name`) are one file now, told
    without writing (`train` may read a read-only cache): both names are found and are one
    inode, or the listing of the folder they meet in (`meeting_folder`) lacks one of the two
    spellings (exFAT through FUSE gives each name an inode of its own)."""
    try:
        sa, sb = os.stat(feature_path(cache_dir, a)), os.stat(feature_path(cache_dir, b))
    except OSError:
        return False
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    pa, pb = (feature_path("", k).split(os.sep) for k in (a, b))
    i = _first_difference(pa, pb)
    try:
        listed = set(os.listdir(os.path.join(cache_dir, *pa[:i])))
    except OSError:
        return True
    return not {pa[i], pb[i]} <= listed


def shared_feature_files(cache_dir: str, keys: Iterable[str], index: feature_index.Index,
                         vouched_only: bool = False) -> dict[str, str]:
    """{key: another key whose feature file is the same file} for the `keys` whose feature
    file is also that of another of `keys` (unless `vouched_only`), or of a key whose index
    entry (`index`) vouches for it (for a key vouched for too: an extraction before names
    were told apart wrote both within one mtime tick, and whose features the file holds
    cannot be told). The usual cache (no two names of one `folded_name`) costs one
    `folded_name` per key and index entry (123,287 of each: 0.1 s)."""
    keys = set(keys)
    shared = {}
    for group in name_variants(keys | index.entries.keys()):
        for key in (k for k in group if k in keys):
            try:
                st = os.stat(feature_path(cache_dir, key))
            except OSError:
                continue
            other = next((o for o in group if o != key and
                          ((o in keys and not vouched_only) or index.match(o, st))
                          and one_feature_file(cache_dir, key, o)), None)
            if other is not None:
                shared[key] = other
    return shared


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temp(path: str, name: str) -> bool:
    """`name` (at `path`) is a `fileio.temp_name` of a writer that is gone: a process of this
    host that no longer runs, or another host's file older than `STALE_TEMP_AGE_S`."""
    m = _TEMP_RE.match(name)
    if m is None:
        return False
    if m["host"] == HOST:
        pid = int(m["pid"])
        return pid == os.getpid() or not _pid_alive(pid)
    with contextlib.suppress(OSError):
        return time.time() - os.path.getmtime(path) > STALE_TEMP_AGE_S
    return False


def remove_stale_temp_files(cache_dir: str) -> int:
    """Remove the temporary files of writers that are gone (feature files, index segments);
    return how many."""
    removed = 0
    for root, _, files in os.walk(cache_dir):
        for name in files:
            path = os.path.join(root, name)
            if name.startswith(".") and is_stale_temp(path, name):
                with contextlib.suppress(OSError):
                    os.remove(path)
                    removed += 1
    return removed


@contextlib.contextmanager
def cache_lock(cache_dir: str):
    """Exclusive flock on <cache>/.lock (shards share one cache), waited for; unlocked where
    the file system has no locks (`fileio.flock`: an NFS mount with `nolock` raised ENOLCK
    here, where the cache's other locks went on). Unlocked explicitly at the end: a worker
    process forked meanwhile shares the open file, which would keep it locked. A lock got on
    a file no longer at its path is let go and taken again: a first extraction that failed
    removed its new cache folder while this one waited (`_remove_if_only_locks`), and this
    one then went on under a lock of a deleted file, its .writing.lock not made: a `train`
    started then was not refused."""
    path = os.path.join(cache_dir, LOCK)
    while True:
        os.makedirs(cache_dir, exist_ok=True)
        f = open(path, "a+")
        locked = flock(f, fcntl.LOCK_EX)
        if not locked or is_at(f, path):
            break
        f.close()
    with f:
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class CacheInUse(UserError):
    """`using_features` refused: the other kind (reader or writer) holds the cache."""


@contextlib.contextmanager
def using_features(cache_dir: str, writing: bool, readers_ok: bool = False):
    """Held while this process reads the cache's features (`train`, `evaluate`) or writes
    them (`extract-features`): a shared flock on <cache>/.reading.lock or .writing.lock.
    Readers share with readers and writers (shards) with writers, but a reader and a writer
    refuse each other (`CacheInUse` naming the other's pids and commands): `extract-features`
    rewrites the file of an image that changed, so a `train` streaming the features (a cache over
    --memory-cache-gb) trained on the new ones from then on, without a word; a `train`
    started while a cache was being extracted trained on the images done so far, with a
    vocabulary fit on their captions. Both sides register under the cache's exclusive lock,
    so two starting at once cannot both miss the other. A reader of a folder that is no cache
    (no manifest: its own checks say so) or whose lock files cannot be opened (a read-only
    cache, which no extraction writes either) holds nothing. The locks go with the process,
    also when it is killed.

    A writer with `readers_ok` is not refused for readers: it holds its lock (readers that
    start later are refused) and is given the `CacheInUse` it would have raised, to raise
    itself before it rewrites or removes a feature file those readers may read (new files
    harm no one: `extract-features && train` rerun beside a running train goes on)."""
    mine, theirs = (WRITING, READING) if writing else (READING, WRITING)
    if not writing and not os.path.exists(os.path.join(cache_dir, MANIFEST)):
        yield
        return
    created = writing and not os.path.isdir(cache_dir)
    held = refusal = None
    try:
        with _exclusive(cache_dir, create=writing):
            held = lock_file(os.path.join(cache_dir, mine))
            if held is not None and not flock(held, fcntl.LOCK_SH):
                held.close()
                held = None
            other = lock_file(os.path.join(cache_dir, theirs))
            if other is not None:
                with other:
                    try:
                        flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        refusal = CacheInUse(_in_use_message(
                            cache_dir, writing, describe_holders(lock_holders(other))))
                        if not (writing and readers_ok):
                            raise refusal from None
        yield refusal
    finally:
        if held is not None:
            held.close()
        if created:   # a first extraction that failed before its manifest
            _remove_if_only_locks(cache_dir)


def _remove_if_only_locks(cache_dir: str) -> None:
    """Remove the cache folder a first extraction created when it holds nothing but the
    cache's lock files, under the cache's lock and only when no other process holds
    .writing.lock or .reading.lock: another extraction (a shard) started meanwhile writes
    into it, and removing the lock file it held let a `train` start beside it, on the
    images extracted so far. (Where the file system has no locks, none tells.)"""
    with contextlib.suppress(OSError):
        with _exclusive(cache_dir, create=False):
            if not set(os.listdir(cache_dir)) <= {READING, WRITING, LOCK}:
                return
            for name in (WRITING, READING):
                path = os.path.join(cache_dir, name)
                f = lock_file(path) if os.path.exists(path) else None
                if f is not None:
                    with f:
                        # held by another: BlockingIOError, and the folder stays
                        flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(cache_dir)


def other_writers(cache_dir: str) -> list[int]:
    """Pids of the other processes writing features into the cache now (other shards: they
    hold .writing.lock, `using_features`), as this machine's /proc/locks shows them: [] for
    none, off Linux, and for the writers of other machines sharing the folder."""
    f = lock_file(os.path.join(cache_dir, WRITING))
    if f is None:
        return []
    with f:
        return [pid for pid in lock_holders(f) if pid != os.getpid()]


@contextlib.contextmanager
def extracting_from(cache_dir: str, images_dir: str, num_shards: int = 1,
                    shard_index: int = 0):
    """Held while this process extracts the images of `images_dir` (shard `shard_index` of
    `num_shards`) into the cache: a marker <cache>/.extracting.<pid>.<token>.<host> naming
    the folder (and its real path) and the shard, flock'ed (shared) until the block ends,
    when it is removed. Made under the cache's lock after the markers of the other
    extractions running are read: one that is not of this extraction (`_races`: on this
    host, of another images folder by real path, a symlink or a relative path to the same
    folder being the same folder; on another host, not another shard of the same
    --num-shards) refuses this one, a `UserError` naming both folders and the cache, before
    anything is written.
    Without it two datasets extracted into one cache at once (two terminals, two datasets
    named like COCO) both passed the refusal of same-named images of another folder (the
    features of the other were not written yet), and of each same-named image the feature
    file the last writer wrote stood for both, unchecked. Shards of one folder share the
    cache. --replace-other-images does not pass it: it replaces the features of a folder
    extracted before, it does not race its extraction.

    A marker its process left (killed, crashed) holds no lock: it is removed and ignored
    (where the file system has no locks: when it names a process of this host that is gone;
    another host's is then ignored, and left). Where the marker cannot be made (a cache
    this user cannot write into) the extraction goes on unmarked, as it fails writing
    anyway."""
    here = os.path.realpath(images_dir)
    path = os.path.join(cache_dir, f"{EXTRACTING}.{os.getpid()}.{secrets.token_hex(4)}.{HOST}")
    with cache_lock(cache_dir):
        others = [m for m in _extractions(cache_dir)
                  if _races(m, here, num_shards, shard_index)]
        if others:
            raise UserError(_other_folder_message(cache_dir, images_dir, others,
                                                  num_shards, shard_index))
        marker = _make_marker(path, {"images_dir": os.path.abspath(images_dir),
                                     "real_path": here, "pid": os.getpid(), "host": HOST,
                                     "num_shards": num_shards, "shard_index": shard_index})
    try:
        yield
    finally:
        if marker is not None:
            with contextlib.suppress(OSError):
                os.remove(path)
            with contextlib.suppress(OSError):   # (a process forked meanwhile shares it)
                fcntl.flock(marker.fileno(), fcntl.LOCK_UN)
            marker.close()


def _make_marker(path: str, fields: dict):
    """The marker `extracting_from` holds: `path` written with `fields` (JSON, ASCII: a
    folder name that is not UTF-8 as \\udcXX escapes) and flock'ed (shared); None when it
    cannot be made. The caller holds the cache's lock: no other process reads it meanwhile."""
    try:
        f = open(path, "w+", encoding="ascii")
    except OSError:
        return None
    try:
        flock(f, fcntl.LOCK_SH)   # False where there are no locks: told by its pid then
        f.write(json.dumps(fields) + "\n")
        f.flush()
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    return f


def _extractions(cache_dir: str) -> list[dict]:
    """The fields (`extracting_from`) of the markers of the extractions running into the
    cache, by name; those of extractions that are gone are removed (the caller holds the
    cache's lock)."""
    try:
        names = sorted(n for n in os.listdir(cache_dir) if n.startswith(EXTRACTING + "."))
    except OSError:
        return []
    running = []
    for name in names:
        path = os.path.join(cache_dir, name)
        f = None
        for mode in ("r+", "r"):   # ("r": another user's; never created here: "a+")
            with contextlib.suppress(OSError):
                f = open(path, mode, encoding="ascii", errors="replace")
                break
        if f is None:
            continue             # removed meanwhile (its extraction ended), or unreadable
        with f:
            try:
                fields = json.loads(f.read())
                fields = fields if isinstance(fields, dict) else {}
            except (ValueError, OSError):
                fields = {}      # cut short by a crash: unlocked, removed below
            try:
                state = "gone" if flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB) else _by_pid(fields)
            except BlockingIOError:
                state = "running"
            if state == "running" and fields:
                running.append(fields)
            elif state == "gone":
                with contextlib.suppress(OSError):
                    os.remove(path)
    return running


def _by_pid(fields: dict) -> str:
    """"running" or "gone" for the marker `fields` of a file system without locks, as its
    process on this host runs or not (this process's own: an earlier one of its pid);
    "unknown" for another host's."""
    pid = fields.get("pid")
    if fields.get("host") != HOST or not isinstance(pid, int) or isinstance(pid, bool):
        return "unknown"
    return "running" if pid != os.getpid() and _pid_alive(pid) else "gone"


def _shard_of_marker(fields: dict) -> Optional[tuple[int, int]]:
    """(num_shards, shard_index) an extraction's marker records; None in one written before
    they were recorded (or damaged)."""
    n, i = fields.get("num_shards"), fields.get("shard_index")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, i)):
        return None
    return n, i


def _races(fields: dict, here: str, num_shards: int, shard_index: int) -> bool:
    """Whether the running extraction whose marker holds `fields` refuses this one (of the
    folder whose real path is `here`, shard `shard_index` of `num_shards`). One of this
    host: when it reads another folder (real paths). Another host's folder path means
    nothing here (a local copy, another mount point, a container's /data): it is another
    shard of the same extraction when it runs the same --num-shards with another
    --shard-index (README: several machines for extraction), and refuses this one
    otherwise. A marker that records no shard (written before they were: one version
    back) is compared by real path, as then: an old version of the same folder on a
    shared mount goes on, one of another folder is refused, as it was."""
    if fields.get("host") == HOST:
        return fields.get("real_path") != here
    shard = _shard_of_marker(fields)
    if shard is None:
        return fields.get("real_path") != here
    return not (shard[0] == num_shards and shard[1] != shard_index)


def _other_folder_message(cache_dir: str, images_dir: str, others: list[dict],
                          num_shards: int = 1, shard_index: int = 0) -> str:
    """The refusal of `extracting_from`: the extractions of other folders (`others`, their
    markers' fields) running into the cache, named by pid and command (another host's: by
    pid, host and shard), and what to do (this extraction: shard `shard_index` of
    `num_shards`)."""
    folders = list(dict.fromkeys(one_line(str(m.get("images_dir"))) for m in others))
    here = [m.get("pid") for m in others if m.get("host") == HOST]
    away = [m for m in others if m.get("host") != HOST]
    elsewhere = [f"pid {m.get('pid')} on {one_line(str(m.get('host')))}"
                 + (f", shard {s[1]}/{s[0]}" if (s := _shard_of_marker(m)) else "")
                 for m in away]
    who = describe_holders([p for p in here if isinstance(p, int)])   # " (pid N: COMMAND)"
    if elsewhere:
        who = (f"{who[:-1]}; " if who else " (") + "; ".join(elsewhere) + ")"
    n = len(others)
    them = ("another extract-features" if n == 1 else f"{n} other extract-features") + who
    return (f"--images {one_line(images_dir)}: {them} {'is' if n == 1 else 'are'} extracting "
            f"the images of {' and '.join(folders)} into --cache {one_line(cache_dir)} now: "
            f"two images folders extracted into one cache at once mix their features (a cache "
            f"holds one feature file per image path: of same-named images, the one written "
            f"last would stand for both, unchecked; --replace-other-images does not change "
            f"that). Extract this dataset into another --cache (one per dataset), or wait for "
            f"that extraction to end and run this command again (shards of one --images "
            f"folder may run together)" + (_other_host_note(away, num_shards, shard_index)
                                           if away else ""))


def _other_host_note(away: list[dict], num_shards: int, shard_index: int) -> str:
    """What `_other_folder_message` adds of the extractions of other hosts (`away`)."""
    note = (f". Another machine's extraction is told apart by its shard, not its folder (a "
            f"path of that machine): shards of one extraction on several machines run "
            f"together when each runs the same --num-shards with its own --shard-index "
            f"(this one: shard {shard_index}/{num_shards})")
    if any(_shard_of_marker(m) is None for m in away):
        note += (", but an older caption-attn records no shard (its extraction of another "
                 "folder path is refused): run this version on every machine")
    return note


@contextlib.contextmanager
def _exclusive(cache_dir: str, create: bool):
    """`cache_lock`, or (`create` False) that lock when its file can be opened at all."""
    if create:
        with cache_lock(cache_dir):
            yield
        return
    f = lock_file(os.path.join(cache_dir, LOCK))
    if f is None:
        yield
        return
    with f:
        flock(f, fcntl.LOCK_EX)
        yield


def _in_use_message(cache_dir: str, writing: bool, who: str) -> str:
    """The refusal of `using_features`; `who` names the other kind's processes, " (pid N:
    COMMAND)" (`fileio.describe_holders`), as the other locks' refusals do."""
    if writing:
        return (f"--cache {cache_dir}: a `caption-attn train` or `evaluate`{who} is reading "
                f"its features now; extracting would change feature files under it: wait "
                f"for it to end, or extract into another --cache")
    return (f"--cache {cache_dir}: `caption-attn extract-features`{who} is writing into it "
            f"now; its features are not all there yet and may still change: wait for it to "
            f"end, then rerun")


# failed.tsv's fields escape what would end a field or a line (a file may be named "a\tb.jpg"
# or "a\nb.jpg"), the text format of PostgreSQL's COPY and Python's csv module's escapechar
_TSV_ESCAPE = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_TSV_UNESCAPE = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def _tsv_unescape(field: str) -> str:
    return re.sub(r"\\(.)", lambda m: _TSV_UNESCAPE.get(m.group(1), m.group(0)), field)


def read_failed(cache_dir: str) -> dict[str, str]:
    """failed.tsv as {key: reason} (empty when absent)."""
    out = {}
    with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(cache_dir, FAILED), encoding="utf-8", newline="\n") as f:
            for line in f:
                key, _, reason = line.rstrip("\n").partition("\t")
                if key:
                    out[_tsv_unescape(key)] = _tsv_unescape(reason)
    return out


def _update_failed(cache_dir: str, failed: dict[str, str], succeeded: Iterable[str],
                   walked: bool = False) -> int:
    """Merge this run into failed.tsv (caller holds the lock); return the entries written.
    `walked`: this run listed every folder under --images, so its unreadable folders
    ("FOLDER/" keys) replace those of earlier runs."""
    entries = read_failed(cache_dir)
    for key in succeeded:
        entries.pop(key, None)
    if walked:
        entries = {k: r for k, r in entries.items() if not k.endswith("/")}
    entries.update({k: " ".join(r.split()) for k, r in failed.items()})
    lines = [f"{key.translate(_TSV_ESCAPE)}\t{entries[key].translate(_TSV_ESCAPE)}\n"
             .encode("utf-8") for key in sorted(entries)]
    path = os.path.join(cache_dir, FAILED)
    if lines or os.path.exists(path):
        write_bytes_atomic(path, lines)
    return len(entries)


def add_images_folder(cache_dir: str, images_dir: str) -> bool:
    """Record `images_dir` among the folders the cache was extracted from before features of
    its images are written (`record_run` makes it the last one at the end). Recorded only
    there, an extraction stopped midway (Ctrl-C, a kill) left its folder unnamed: a new run
    on the other folder's captions, checked in the cache's last folder, was not refused for
    names both folders share (`_refuse_shared_names`), and trained those captions on the
    last folder's features. Returns whether it was not recorded before."""
    here = os.path.abspath(images_dir)
    return _change_images_folders(cache_dir, lambda folders: None if here in folders else
                                  folders[:-1] + [here] + folders[-1:])   # the last stays last


def remove_images_folder(cache_dir: str, images_dir: str) -> None:
    """Undo `add_images_folder` for an extraction stopped before it wrote a feature file:
    the cache holds nothing of that folder (a kill leaves it recorded: a refusal to come
    that names it, `_refuse_shared_names`, is mended by --images)."""
    here = os.path.abspath(images_dir)
    _change_images_folders(cache_dir, lambda folders: [d for d in folders if d != here])


def _change_images_folders(cache_dir: str, change) -> bool:
    """The manifest's `images_dirs` as `change(folders)` makes them, under the cache's lock
    (None: left as they are). Returns whether they were written."""
    with cache_lock(cache_dir):
        m = read_manifest(cache_dir)
        folders = change(images_folders(m))
        if folders is None:
            return False
        m["images_dirs"] = folders
        write_json_atomic(manifest_path(cache_dir), m, file_names=True)
        return True


def record_run(cache_dir: str, images_dir: str, failed: dict[str, str],
               succeeded: list[str], manifest: dict, walked: bool = False) -> tuple[int, int]:
    """After a run, under the lock: merge failed.tsv, compact the index (every shard's
    segments), count the feature files of this cache's identity, and record the count and the
    images folder in the manifest.

    `succeeded`: keys whose file this run checked or wrote; `walked`: the run listed every
    folder under `images_dir` (see `_update_failed`). Returns (failed.tsv entries, count).
    """
    fingerprint = cache_identity(manifest)["fingerprint"]
    with cache_lock(cache_dir):
        n_failed_file = _update_failed(cache_dir, failed, succeeded, walked)
        index, _ = feature_index.compact(cache_dir, lambda key: feature_path(cache_dir, key))
        count = sum(entries[-1].identity == fingerprint for entries in index.entries.values())
        m = read_manifest(cache_dir)
        m["count"] = count
        here = os.path.abspath(images_dir)
        m["images_dir"] = here  # the source images `train` and `evaluate` check by default
        m["images_dirs"] = [d for d in images_folders(m) if d != here] + [here]
        write_json_atomic(manifest_path(cache_dir), m, file_names=True)
    return n_failed_file, count


def other_images_folders(manifest: dict, images_dir: str) -> list[str]:
    """The other images folders the cache was extracted from that are folders on this
    machine, the newest first: where `usable_features` and `describe_problems` take the
    folder an index entry records for an image missing from `images_dir`, and `extract`
    looks for a folder whose same-named images it would replace."""
    found = []
    for folder in reversed(images_folders(manifest)):
        if not os.path.isdir(folder):
            continue
        with contextlib.suppress(OSError):
            if os.path.samefile(folder, images_dir):
                continue
        found.append(folder)
    return found


def images_folders(manifest: dict) -> list[str]:
    """Every images folder the cache was extracted from (absolute paths, the last one last):
    an extraction from another folder is refused where it would replace features of their
    images (`extract`)."""
    folders = manifest.get("images_dirs")
    if isinstance(folders, list) and all(isinstance(d, str) for d in folders):
        return list(folders)
    last = manifest.get("images_dir")   # a cache made before the list was recorded
    return [last] if isinstance(last, str) and last else []


# =========================================================================== manifest
_REQUIRED = ("format_version", "backbone", "weights", "weights_sha256", "dtype", "precision",
             "feature_shape", "image_size", "resize", "feature_scale", "npy_header_bytes",
             "count")
_REQUIRED_V2 = ("preprocess", "feature_layout")


def manifest_path(cache_dir: str) -> str:
    """<cache>/manifest.json"""
    return os.path.join(cache_dir, MANIFEST)


def read_manifest(cache_dir: str) -> dict:
    """The cache's manifest.json; UserError when missing or malformed."""
    path = manifest_path(cache_dir)
    if os.path.isfile(cache_dir):   # (it said "CACHE/manifest.json: no ... manifest")
        raise UserError(f"{cache_dir}: is a file, not a folder: a feature cache is the folder "
                        f"`extract-features --cache FOLDER` makes")
    if not os.path.exists(path):
        raise UserError(f"{path}: no feature cache manifest (run `extract-features --cache "
                        f"{cache_dir}` first)")
    m = read_json(path, file_names=True)   # images_dir(s): any bytes a folder name has
    missing = [k for k in _REQUIRED if not isinstance(m, dict) or k not in m]
    if not missing and m["format_version"] == FORMAT_VERSION:
        missing = [k for k in _REQUIRED_V2 if k not in m]
    if missing:
        raise UserError(f"{path}: malformed manifest, missing {missing}")
    if m["format_version"] == 1:
        raise UserError(
            f"{path}: a cache of format 1, made by an older caption_attn that did not record "
            f"which backbone and which source image made each feature file, so its files "
            f"cannot be checked. Extract the features again into a new folder (`caption-attn "
            f"extract-features --cache NEW_FOLDER ...` with the same --weights, --seed, "
            f"--dtype and --precision: {_settings_text(m)}) and use that, or delete "
            f"{cache_dir} and extract into it.")
    if m["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path}: cache format version {m['format_version']}, this version "
                        f"reads {FORMAT_VERSION}; extract into a new --cache folder")
    if m["weights"] == "random" and "weights_file" not in m:
        raise UserError(f"{path}: malformed manifest, random weights without `weights_file`")
    wrong = [f"{k} {m[k]!r} (not {what})" for k, (types, what) in _TYPES.items()
             if k in m and (not isinstance(m[k], types) or isinstance(m[k], bool))]
    if wrong:   # (a string header size ended in a traceback; a string scale read as another
        raise UserError(f"{path}: malformed manifest: {'; '.join(wrong)}; extract into a "
                        f"new --cache folder")   # backbone's features)
    return m


# manifest fields read as numbers, lists or text: their JSON types
_TYPES = {"npy_header_bytes": (int, "an integer"), "count": (int, "an integer"),
          "image_size": (int, "an integer"), "feature_scale": ((int, float), "a number"),
          "feature_shape": (list, "a list"), "dtype": (str, "text"),
          "precision": (str, "text"), "backbone": (str, "text"), "weights": (str, "text"),
          "weights_sha256": (str, "text"), "resize": (str, "text"),
          "images_dir": (str, "text"), "weights_file": (str, "text")}


def _describe_weights(weights: str, seed: Optional[int]) -> str:
    return f"random (seed {seed})" if weights == "random" else weights


def _settings(cfg: ExtractConfig) -> dict:
    """Manifest fields an extraction must agree with (besides the weights)."""
    return {"format_version": FORMAT_VERSION, "dtype": cfg.dtype, "precision": cfg.precision,
            "feature_shape": list(FEATURE_SHAPE), **IMAGES_TO_FEATURES}


# How this version turns an image into features. A cache whose manifest records otherwise was
# made by another version: `caption` and `export` (which decode, resize and scale images with
# this one) would give its runs' models other features than they were trained on.
IMAGES_TO_FEATURES = {"backbone": BACKBONE, "image_size": IMAGE_SIZE, "resize": RESIZE_METHOD,
                       "preprocess": PREPROCESS, "feature_layout": FEATURE_LAYOUT}


def refuse_other_images_to_features(cache_dir: str, m: dict, why: str) -> None:
    """`UserError` when the cache's features were made from images otherwise than this
    version makes them (`IMAGES_TO_FEATURES`); `why` says what that would spoil, and what
    to do."""
    other = [f"{k} {m.get(k)!r} (this version: {v!r})"
             for k, v in IMAGES_TO_FEATURES.items() if m.get(k) != v]
    if other:
        raise UserError(f"{manifest_path(cache_dir)}: its features were made from the images "
                        f"by another version of caption_attn: {'; '.join(other)}; {why}")


class OtherCache(UserError):
    """A cache of other settings than asked for; `cache`, `made` ("dtype float32") and
    `wanted` kept for callers that say it in their own terms (the demo)."""

    def __init__(self, cache: str, made: str, wanted, hint: str = ""):
        super().__init__(f"--cache {cache} holds features made with {made}, this run asks "
                         f"for {wanted}; a cache holds one backbone's features only: use "
                         f"another --cache folder{hint}")
        self.cache, self.made, self.wanted = cache, made, wanted


def _refuse(cache_dir: str, what: str, cached, wanted, hint: str = "") -> OtherCache:
    return OtherCache(cache_dir, f"{what} {cached}", wanted, hint)


def _check_settings(cache_dir: str, m: dict, cfg: ExtractConfig) -> None:
    """Refuse cheap mismatches before building anything."""
    for key, value in _settings(cfg).items():
        if m.get(key) != value:
            flag = {"dtype": " (or --dtype {})", "precision": " (or --precision {})"}.get(key, "")
            raise _refuse(cache_dir, key, m.get(key), value, flag.format(m.get(key)))
    # by name only where the weights cannot be the same: seeded random ones of another seed,
    # random and ImageNet. A weights file is compared by its sha256 (`open_cache`): the
    # random backbone a cache saved, given as --weights PATH, is the cache's backbone
    kinds = {m["weights"], cfg.weights}
    mine, theirs = _describe_weights(cfg.weights, cfg.seed), \
        _describe_weights(m["weights"], m.get("seed"))
    if (kinds == {"random"} and m.get("seed") != cfg.seed) or kinds == {"imagenet", "random"}:
        raise _refuse(cache_dir, "weights", theirs, mine)


def check_settings(cache_dir: str, cfg: ExtractConfig) -> None:
    """`_check_settings` of an existing cache, before `extract-features` parses its caption
    file (seconds to a minute at COCO's size): a forgotten --dtype float16 was refused only
    after that. `open_cache` checks again, under the cache's lock."""
    m = _read_manifest_if_any(cache_dir) if os.path.isdir(cache_dir) else None
    if m is not None:
        _check_settings(cache_dir, m, cfg)


def _read_manifest_if_any(cache_dir: str) -> Optional[dict]:
    return read_manifest(cache_dir) if os.path.exists(manifest_path(cache_dir)) else None


def _new_manifest(cache_dir: str, cfg: ExtractConfig, backbone: Backbone, sha: str) -> dict:
    """Calibrate feature_scale, save random weights and write the manifest (lock held)."""
    scale, rms = (1.0, None) if is_imagenet_weights(cfg.weights) else \
        calibrate_feature_scale(backbone)
    weights = cfg.weights if cfg.weights in ("imagenet", "random") \
        else os.path.abspath(cfg.weights)
    m = {**_settings(cfg), "weights": weights, "weights_sha256": sha,
         "seed": cfg.seed if cfg.weights == "random" else None,
         "feature_scale": scale, "calibration_rms": rms,
         "npy_header_bytes": len(npy_header(cfg.dtype)), "count": 0,
         "index": feature_index.INDEX,
         "keras_version": _version("keras"), "tensorflow_version": _version("tensorflow")}
    m["identity_fingerprint"] = cache_identity(m)["fingerprint"]  # for people; recomputed
    if cfg.weights == "random":
        m["weights_file"] = random_weights_file(cfg.seed)
        path = os.path.join(cache_dir, m["weights_file"])
        with keras_file_atomic(path, ".weights.h5", backbone.model) as tmp:  # Keras' suffix
            backbone.model.save_weights(tmp)
    write_json_atomic(manifest_path(cache_dir), m, file_names=True)
    return m


def check_cache_folder(cache_dir: str) -> None:
    """UserError when `cache_dir` exists, is no feature cache (neither a manifest.json nor
    the provenance index, with which a cache that lost its manifest is recovered) and holds
    other files (hidden ones aside): a run folder, photos, another tool's output would get
    feature files, an index and backbone weights among them."""
    if not os.path.isdir(cache_dir) or any(
            os.path.exists(os.path.join(cache_dir, name))
            for name in (MANIFEST, feature_index.INDEX, feature_index.SEGMENTS)):
        return
    # the cache's own first files (a first run killed between saving the random weights and
    # writing the manifest left them) are no other files
    own = re.compile(r"backbone_random_seed[0-9]+\.weights\.h5|" + re.escape(FAILED))
    others = sorted(n for n in os.listdir(cache_dir)
                    if not n.startswith(".") and not own.fullmatch(n))
    if others:
        shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
        raise UserError(f"--cache {cache_dir}: not a feature cache (no {MANIFEST}) and not "
                        f"empty (it holds {shown}); extract into a new or empty folder, e.g. "
                        f"features_cache")


def open_cache(cache_dir: str, cfg: ExtractConfig) -> tuple[Optional[Backbone], dict]:
    """The run's backbone, and the cache manifest created or checked against it.

    The backbone is built outside the lock (seconds); creating the manifest happens under it,
    re-reading first, since another shard may have created it meanwhile. An existing cache of
    a random backbone asked for `--weights random` extracts with its own saved weights: the
    backbone is then None, for `Backbone.from_manifest` to build only if there is something
    to extract. Any other backbone is built here, since its weights must be checked against
    the cache's: by sha256, whatever they are called (`--weights PATH` of the random
    backbone a cache saved is that backbone; a cache of `--weights PATH` takes `--weights
    random --seed S` of the same weights).
    """
    existing = None
    if os.path.isdir(cache_dir):  # (a failed first run leaves no empty cache folder behind)
        with cache_lock(cache_dir):
            existing = _read_manifest_if_any(cache_dir)
    if existing is not None:
        _check_settings(cache_dir, existing, cfg)  # cheap refusals before building anything
        if existing["weights"] == "random" and cfg.weights == "random":
            return None, existing
    model = build_backbone(cfg.weights, cfg.seed, cfg.precision)
    backbone, sha = Backbone(model), weights_sha256(model)

    with cache_lock(cache_dir):
        m = _read_manifest_if_any(cache_dir)
        if m is None:
            m = _new_manifest(cache_dir, cfg, backbone, sha)
        else:
            _check_settings(cache_dir, m, cfg)
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



# =========================================================================== identity
# What makes two sets of features interchangeable. The weights' name or path is not part of it
# (a weights file may move; its sha256 is the identity).
IDENTITY_FIELDS = ("format_version", "backbone", "weights_sha256", "dtype", "precision",
                   "feature_scale", "image_size", "resize", "preprocess", "feature_shape",
                   "feature_layout")


def cache_identity(manifest: dict) -> dict:
    """The identity of a cache's features, JSON-serialisable, to record and compare.

    {field: value} for IDENTITY_FIELDS, plus `weights` and `seed` (to name the weights and
    rebuild the extraction command; not fingerprinted), `fingerprint` (16 hex digits of the
    sha256 of the fields' canonical JSON; the index stores it per file) and `description`
    (one line for people, e.g. "InceptionV3, random weights (seed 0, sha256 1a2b3c4d…),
    float16 files, bfloat16 compute, scale 1024").
    """
    fields = {name: manifest.get(name) for name in IDENTITY_FIELDS}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    identity = {**fields, "weights": manifest.get("weights"), "seed": manifest.get("seed"),
                "fingerprint": hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]}
    identity["description"] = describe_identity(identity)
    return identity


def _weights_text(identity: dict) -> str:
    weights, sha = identity.get("weights"), str(identity.get("weights_sha256") or "?")[:8]
    if weights == "random":
        return f"random weights (seed {identity.get('seed')}, sha256 {sha}…)"
    if weights == "imagenet":
        return f"ImageNet weights (sha256 {sha}…)"
    return f"weights {os.path.basename(str(weights))} (sha256 {sha}…)"


def describe_identity(identity: dict) -> str:
    """One line: backbone, weights, file dtype, compute precision, feature scale."""
    scale = identity.get("feature_scale")
    scale = f"{scale:g}" if isinstance(scale, (int, float)) else scale
    return (f"{identity.get('backbone')}, {_weights_text(identity)}, {identity.get('dtype')} "
            f"files, {identity.get('precision')} compute, scale {scale}")


def describe_difference(a: dict, b: dict) -> str:
    """The identity fields in which `a` and `b` differ, "field: A vs B; ..." ("" if none)."""
    parts = []
    for name in IDENTITY_FIELDS:
        x, y = a.get(name), b.get(name)
        if x == y:
            continue
        if name == "weights_sha256":
            parts.append(f"weights: {_weights_text(a)} vs {_weights_text(b)}")
        elif any(isinstance(v, str) and len(v) > 40 for v in (x, y)):
            parts.append(f"{name}: differs ({x!r} vs {y!r})")
        else:
            parts.append(f"{name}: {x} vs {y}")
    return "; ".join(parts)


def _settings_text(identity: dict) -> str:
    """The extract-features flags that make features of this identity (a weights file's
    path quoted for the shell, as the commands' other paths: one with a space broke the
    command pasted)."""
    flags = f"--weights {shlex.quote(str(identity.get('weights')))}"
    if identity.get("weights") == "random":
        flags += f" --seed {identity.get('seed')}"
    return f"{flags} --dtype {identity.get('dtype')} --precision {identity.get('precision')}"


def repair_command(cache_dir: str, manifest: dict, captions: Optional[str] = None,
                   images_dir: Optional[str] = None) -> str:
    """The `extract-features --verify` command that re-checks and re-extracts the damaged
    files of this cache, with every flag its manifest needs (weights, seed, dtype, precision),
    so that it is not refused for a missing one. --images is `images_dir`, the folder the
    caller checks the images in (a run's, moved since: `train --images NEW`), else the one
    recorded at extraction: the old folder was refused as none, or re-extracted another
    dataset's same-named images into the run's features."""
    images_dir = images_dir or manifest.get("images_dir")
    images = shlex.quote(images_dir) if images_dir else "IMAGES_DIR"
    with_captions = f" --captions {shlex.quote(captions)}" if captions else ""
    return (f"caption-attn extract-features --verify --images {images}{with_captions} "
            f"--cache {shlex.quote(cache_dir)} {_settings_text(cache_identity(manifest))}")


def refuse_other_identity(recorded: dict, manifest: dict, what: str, cache_dir: str) -> None:
    """UserError when the cache's identity differs from `recorded` (a `cache_identity` saved
    earlier, e.g. by the run that trained on it); `what` names the recorder ("run
    models/coco"). The message names both identities, the differences and the fix."""
    current = cache_identity(manifest)
    if current["fingerprint"] == recorded.get("fingerprint"):
        return
    raise UserError(
        f"{what} was trained on features of {recorded.get('description')}, but --cache "
        f"{cache_dir} holds {current['description']} ({describe_difference(recorded, current)}"
        f"). Use the cache it was trained on, or extract one like it: `caption-attn "
        f"extract-features --cache NEW_FOLDER {_settings_text(recorded)} ...`")


# =========================================================================== provenance
IMAGE_DIGEST_CHARS = 16   # of an image's sha256, as a run records the images it was trained on


def usable_features(cache_dir: str, keys: Iterable[str], manifest: dict,
                    images_dir: Optional[str] = None,
                    image_digests: Optional[dict] = None,
                    other_folders: bool = True,
                    unfound: Optional[list] = None) -> tuple[dict, dict]:
    """({key: feature path} usable, {key: reason} not usable) for `keys`, cheaply.

    Usable: the key's feature file has an index entry made with this manifest's identity, the
    file's size and mtime equal the recorded ones (so it was not rewritten or damaged since),
    and, when `images_dir` is given, its source image has the size and mtime it had when it
    was read. An image missing from `images_dir` is checked in the folder its features were
    extracted from, as its index entry records it, when that is another folder the cache was
    extracted from (`images_folders`; with `other_folders`): a cache of two folders (COCO's
    train2014 and val2014) checked in the last one found none of the first's images there and
    took their features whatever those images had become. Only there: a same-named image of
    another folder is another image (after `--replace-other-images` and a deletion it was
    called changed). One whose entry records no folder (an index written before it did) is
    looked for in each other folder in turn, the newest first. One missing there is accepted.
    `images_dir=None` skips the source check, e.g.
    when the images are on another machine. A file that is also another key's (names that
    differ only in letter case on a file system that ignores it: `shared_feature_files`) is
    not usable (SHARED_FILE). No array is read: values changed in place without
    a new mtime are caught by `pipeline.NpyReader`'s in-graph checks and by `extract-features
    --verify`. `describe_problems` summarises the reasons with the fix. Measured for 123,287
    keys: see the README's feature-cache section (`benchmarks/bench_feature_index.py`).
    `image_digests`, when given, receives key -> IMAGE_DIGEST_CHARS hex digits of the sha256
    of the image each usable file was extracted from (as its index entry records it).
    `unfound`, when given, receives the usable keys whose source image was found nowhere
    (with `images_dir`: their features were taken unchecked, `unfound_images_note`).
    """
    keys = list(keys)
    fingerprint = cache_identity(manifest)["fingerprint"]
    index = feature_index.load_index(cache_dir)
    more = other_images_folders(manifest, images_dir) \
        if images_dir is not None and other_folders else []
    checks = feature_index.check_keys(cache_dir, keys, index, fingerprint,
                                      feature_file_size(manifest["dtype"]), images_dir, more)
    shared = shared_feature_files(cache_dir, keys, index)
    paths, problems = {}, {}
    for k, c in zip(keys, checks):
        if c.reason is not None or k in shared:
            problems[k] = c.reason or SHARED_FILE
            continue
        paths[k] = c.path
        if unfound is not None and images_dir is not None and c.image_stat is None:
            unfound.append(k)
        if image_digests is not None and c.entry is not None and c.entry.image_sha256:
            image_digests[k] = c.entry.image_sha256[:IMAGE_DIGEST_CHARS]
    return paths, problems


def usable_features_checked_in(cache_dir: str, keys: Iterable[str], manifest: dict,
                               checked_in: Optional[str], known: dict,
                               image_digests: Optional[dict] = None,
                               unfound: Optional[list] = None) -> tuple[dict, dict]:
    """`usable_features` with the source images checked where a run checked them before
    (`checked_in`, `RunFolder.images_dir`; None: the cache's last folder). A key whose image
    differs there but matches the cache's last images folder is usable only if `known` (the
    run's recorded image digests) has it: `check_image_digests` then compares the contents,
    so a dataset copied elsewhere with new modification times and indexed again still
    counts, while an image the run never had features of, left out as changed when it
    trained (another folder's same-named image, `--replace-other-images`), stays out.
    When its features are of the image the run recorded, the image where the run checks
    it must hold those bytes, too: checked only in the last folder, an image edited in the
    run's folder beside an old copy there was taken with the old copy's features. (Hashed:
    only these keys, whose index entries are another folder's; in the copied dataset above,
    each of them at every resume and `evaluate`. Features of another image are taken for
    `check_image_digests` to refuse, naming them.)"""
    keys = list(keys)
    last = source_images(manifest)
    paths, problems = usable_features(cache_dir, keys, manifest, checked_in or last,
                                      image_digests, unfound=unfound)
    # only an image that is in the last folder, the same there: one missing there was taken
    # as it was, though it had changed where the run checked it
    retry = [k for k, why in problems.items() if why == feature_index.IMAGE_CHANGED
             and k in known and last and os.path.isfile(os.path.join(last, k))]
    if checked_in and last and retry and os.path.realpath(checked_in) != os.path.realpath(last):
        found: dict = {}
        more, _ = usable_features(cache_dir, retry, manifest, last, found,
                                  other_folders=False)
        for k in more:
            if found.get(k) != known[k] or _same_bytes_as_recorded(
                    os.path.join(checked_in, k), known[k], os.path.join(last, k)):
                paths[k] = more[k]
                del problems[k]
                if image_digests is not None and k in found:
                    image_digests[k] = found[k]
    return paths, problems


def _same_bytes_as_recorded(image: str, digest: str, copy: str) -> bool:
    """Whether the file `image` holds the bytes whose sha256 begins with `digest` (a run's
    record); `copy`, a file of those bytes, tells most changes by its size alone."""
    if not isinstance(digest, str) or not digest:    # an edited split.json's
        return False
    try:
        return os.path.getsize(image) == os.path.getsize(copy) and \
            file_digest(image)[:len(digest)] == digest
    except OSError:     # gone or unreadable since it was checked: not the recorded bytes
        return False


def source_images(manifest: dict) -> Optional[str]:
    """The images folder a cache was extracted from (recorded in its manifest) when it is on
    this machine: `usable_features` then checks the images against the index; else None."""
    folder = manifest.get("images_dir")
    return folder if folder and os.path.isdir(folder) else None


# A new run without --images checks its features' source images in the cache's last images
# folder, where another dataset's same-named images look right (a cache of another dataset;
# another dataset extracted into it with --replace-other-images): `shared_names` and
# `other_images_beside` look for the caption file's images elsewhere, at a bounded cost
SAMPLE_NAMES = 256   # caption file image names looked up in each images folder of the cache
PROBE_NAMES = 8      # ... in the caption file's folder and in each of its subfolders
HASH_NAMES = 3       # images of a folder beside the caption file hashed (COCO's: 0.1 ms each)
MAX_BESIDE = 32      # subfolders of the caption file's folder looked into


def name_sample(keys: Iterable[str], n: int) -> list[str]:
    """At most `n` of `keys`, spread evenly over them in sorted order (first and last in)."""
    keys = sorted(keys)
    if len(keys) <= n:
        return keys
    return [keys[i * (len(keys) - 1) // (n - 1)] for i in range(n)]


def _is_file(st) -> bool:
    return isinstance(st, os.stat_result) and stat.S_ISREG(st.st_mode)


def shared_names(manifest: dict, keys: Iterable[str]) -> Optional[tuple[str, list, int, int]]:
    """(a name, the cache's images folders holding it, how many names are held by more than
    one, how many were looked up) when more than one of the folders the cache was extracted
    from (those on this machine, one per real path) hold an image of one of `keys`' names
    (the caption file's); None otherwise. The cache holds one feature file per name, of one
    folder's image: which folder holds the caption file's images cannot be told. COCO's
    train2014 and val2014 extracted into one cache share no name. A sample of SAMPLE_NAMES
    names is looked up (one stat each per folder)."""
    folders, seen = [], set()
    for folder in images_folders(manifest):
        real = os.path.realpath(folder)
        if real not in seen and os.path.isdir(folder):
            seen.add(real)
            folders.append(folder)
    if len(folders) < 2:
        return None
    sample = name_sample(keys, SAMPLE_NAMES)
    held: dict = {k: [] for k in sample}
    for folder in folders:
        prefix = os.path.join(folder, "")
        for k, st in zip(sample, feature_index._stat_all([prefix + k for k in sample])):
            if _is_file(st):
                held[k].append(folder)
    shared = [k for k in sample if len(held[k]) > 1]
    return (shared[0], held[shared[0]], len(shared), len(sample)) if shared else None


def other_images_beside(captions: str, digests: dict, checked_in: Optional[str]
                        ) -> Optional[tuple[str, str, Optional[str]]]:
    """(a folder, an image name, a folder holding the very images or None) when the caption
    file's folder or one of its subfolders (`images/` beside a shapes captions.json) holds
    images of the caption file's names, most of a sample of PROBE_NAMES of `digests`'
    (image name -> digest of the image its features were extracted from: `usable_features`'
    image_digests), of other content than those (sha256 of HASH_NAMES of them): the cache of
    another dataset with the same file names, whose features checked in its own folder
    (`checked_in`) looked right. The third: a folder beside the caption file that is the one
    checked (by real path) or holds the very images (a copy of it): two datasets of the same
    names side by side (data/A/, data/B/, both caption files in data/), of which the caption
    file may describe either (or a resized copy beside the originals); that case alone said
    nothing, and A's captions trained on B's features. None when no folder of other content
    is there (heatmaps `caption` drew are none). At most one listing, (1 + MAX_BESIDE) x
    PROBE_NAMES stats and heatmap checks, and HASH_NAMES reads per folder."""
    sample = name_sample(digests, PROBE_NAMES)
    base = os.path.dirname(os.path.abspath(captions))
    try:
        with os.scandir(base) as entries:
            subfolders = sorted(e.path for e in entries if e.is_dir())[:MAX_BESIDE]
    except OSError:
        return None
    if not sample:
        return None
    checked = os.path.realpath(checked_in) if checked_in else None
    other = same = None
    for folder in [base] + subfolders:
        if os.path.realpath(folder) == checked:
            same = same or folder                   # its images are the features'
            continue
        prefix = os.path.join(folder, "")
        # (heatmaps `caption --plot-attention` drew beside the images bear their names)
        present = [k for k in sample if _is_file(feature_index._stat(prefix + k))
                   and not is_heatmap_file(prefix + k)]
        if 2 * len(present) <= len(sample):
            continue                                # not the caption file's images
        differ = []
        for k in present[:HASH_NAMES]:
            with contextlib.suppress(OSError):
                if file_digest(prefix + k)[:IMAGE_DIGEST_CHARS] != digests[k]:
                    differ.append(k)
        if differ:
            other = other or (folder, differ[0])
        else:
            same = same or folder                   # the images the features were made of
    return (*other, same) if other else None


def unchecked_images_note(cache: str, manifest: dict, checked_in: Optional[str],
                          recorded: Optional[str] = None,
                          fix: str = "; give --images FOLDER (where the caption file's "
                                     "images are now) to check them") -> Optional[str]:
    """What to say when no source image was checked (`checked_in` None) because the folder
    they were checked in (`recorded`: a run's; else the one `cache` was extracted from) is
    gone from this machine (renamed, moved, another machine): the features were taken as
    they are, which a changed image's would have been too; None when they were checked (or
    no folder was ever recorded)."""
    recorded = recorded or manifest.get("images_dir")
    if checked_in is not None or not isinstance(recorded, str) or not recorded:
        return None
    return (f"the source images were not checked against their features in {cache}: "
            f"{recorded}, where they were, is not a folder on this machine{fix}")


def unfound_images_note(unfound: list, usable: int, folder: str, cache: str) -> Optional[str]:
    """What to say of the `unfound` of `usable` images with features whose source image is
    not in `folder` (nor in another folder the cache was extracted from): their features
    were taken unchecked (a folder given one level off named the checks' folder all the
    same). None when there are none."""
    if not unfound:
        return None
    n = len(unfound)
    which, verb = ("the image", "is not") if usable == 1 else \
        (f"none of the {usable} images", "is") if n == usable else \
        (f"{n} of the {usable} images", "is not" if n == 1 else "are not")
    return (f"{which} with features in {cache} {verb} in {folder} (e.g. no "
            f"{os.path.join(folder, unfound[0])}): {'its' if n == 1 else 'their'} "
            f"features were taken unchecked, as a changed image's would be")


def cache_images_folders(cache: str) -> list[str]:
    """Every images folder the feature cache `cache` was extracted from (`images_folders`),
    none when the cache cannot be read yet (its own checks say why, later): folders the
    run's files (train's --run, caption's --plot-attention, export's --out) must not go
    into. The last one alone let `train --run` into an earlier one. Only those there now:
    one recorded by an extraction killed before its first image, or gone since, holds no
    image a heatmap could be taken for."""
    try:
        return [d for d in images_folders(read_manifest(cache)) if os.path.isdir(d)]
    except (UserError, OSError):
        return []


def _why_failed(key: str, failed: dict[str, str]) -> Optional[str]:
    """Why failed.tsv (`failed`) says `key` has no features: its own entry, or that of a
    folder above it that could not be listed ("FOLDER/: reason"); None if neither."""
    if key in failed:
        return failed[key]
    parts = key.split("/")[:-1]
    for i in range(len(parts), 0, -1):
        folder = "/".join(parts[:i]) + "/"
        if folder in failed:
            return f"{folder}: {failed[folder]}"
    return None


def extract_command(cache_dir: str, manifest: Optional[dict] = None,
                    captions: Optional[str] = None, images_dir: Optional[str] = None) -> str:
    """The `extract-features` command that extracts a caption file's missing or outdated
    features into this cache: --captions (when known), --images (`images_dir`, else as
    recorded at extraction) and every flag the manifest needs; "--cache DIR ..." without a
    manifest. Without --captions and --images a rerun extracted the cache's last folder
    again, which need not hold the caption file's images under its names."""
    if manifest is None:
        return f"caption-attn extract-features --cache {cache_dir} ..."
    images = images_dir or manifest.get("images_dir")
    with_captions = f"--captions {shlex.quote(captions)} " if captions else ""
    return (f"caption-attn extract-features {with_captions}--images "
            f"{shlex.quote(images) if images else 'IMAGES_DIR'} --cache "
            f"{shlex.quote(cache_dir)} {_settings_text(cache_identity(manifest))}")


def _under_other_names(missing: list[str], cache_dir: str) -> Optional[tuple[int, str, str]]:
    """(how many, a missing key, the key the cache holds it under) when feature files of the
    cache end with `missing` keys under a folder prefix ("train2017/a.jpg" for "a.jpg"): the
    cache was extracted with an --images above the folder the caption file's names are
    relative to. The prefix of most of them; None when there is none."""
    wanted = set(missing)
    found: dict[str, list] = {}
    for key in feature_index.load_index(cache_dir).entries:
        parts = key.split("/")
        for i in range(1, len(parts)):
            tail = "/".join(parts[i:])
            if tail in wanted:
                found.setdefault("/".join(parts[:i]), []).append((tail, key))
    if not found:
        return None
    pairs = max(found.values(), key=len)
    return len({tail for tail, _ in pairs}), pairs[0][0], pairs[0][1]


def _changed_elsewhere(cache_dir: str, keys: list[str], manifest: dict,
                       images: str) -> dict[str, str]:
    """{key: images folder} for the `keys` (of changed images) missing from `images` that
    `usable_features` found changed in another folder the cache was extracted from: the one
    the index entry of the key's feature file records, which holds the image (one recording
    none: the newest that holds it). Extracting them again reads them there."""
    keys = [k for k in keys if not os.path.isfile(os.path.join(images, k))]
    folders = other_images_folders(manifest, images) if keys else []
    if not folders:
        return {}
    index = feature_index.load_index(cache_dir)
    fingerprint = cache_identity(manifest)["fingerprint"]
    recorded = {}
    for key in keys:   # the entry `usable_features` went by
        with contextlib.suppress(OSError):
            mine = [e for e in index.match(key, os.stat(feature_path(cache_dir, key)))
                    if e.identity == fingerprint]
            if mine:
                recorded[key] = mine[-1].images_dir
    where = feature_index.recorded_folders(folders, set(recorded.values()))
    found = {k: where[r] for k, r in recorded.items()
             if r in where and os.path.isfile(os.path.join(where[r], k))}
    # an entry that records no folder (an older index): each other folder in turn, the newest
    # first, as `feature_index.check_keys` looked for it
    for key in (k for k, r in recorded.items() if r is None):
        folder = next((f for f in folders if os.path.isfile(os.path.join(f, key))), None)
        if folder is not None:
            found[key] = folder
    return found


def _fix_commands(cache_dir: str, manifest: Optional[dict], captions: Optional[str],
                  groups: list[tuple[Optional[str], list[str]]]) -> str:
    """"`COMMAND`: it extracts exactly these again" for (images folder, keys) `groups`; with
    several folders a command each, "`COMMAND` (for N of them, e.g. KEY) and ...: they ..."."""
    settings = " with the cache's settings" if manifest is None else ""
    if len(groups) == 1:
        return (f"`{extract_command(cache_dir, manifest, captions, groups[0][0])}`{settings}: "
                f"it extracts exactly these again")
    return " and ".join(f"`{extract_command(cache_dir, manifest, captions, folder)}`{settings} "
                        f"(for {len(keys)} of them, e.g. {one_line(keys[0])})"
                        for folder, keys in groups) + ": they extract exactly these again"


def describe_problems(problems: dict, cache_dir: str, examples: int = 3,
                      manifest: Optional[dict] = None, captions: Optional[str] = None,
                      images_dir: Optional[str] = None) -> str:
    """One paragraph for `usable_features`' problems: counts per reason, a few files, the fix.

    Missing files of images that failed to extract (failed.tsv) are told apart, with the
    reason: extracting them again fails the same way, so the images must be fixed. With the
    cache's `manifest`, the fix is the whole `extract-features` command (`extract_command`:
    `captions`, the images folder `images_dir` or the recorded one); changed images found in
    other folders the cache was extracted from (`usable_features`) get a command each of
    those folders; missing files the cache holds under a longer path (extracted from a folder
    above the caption file's) are named, with the folder to extract from instead."""
    failed_file = read_failed(cache_dir)
    failed = {k: why for k, r in problems.items()
              if r == "missing" and (why := _why_failed(k, failed_file)) is not None}
    parts = []
    rest = {k: r for k, r in problems.items() if k not in failed}
    images = images_dir or (manifest or {}).get("images_dir")
    changed = [k for k, r in rest.items() if r == feature_index.IMAGE_CHANGED]
    moved = _changed_elsewhere(cache_dir, changed, manifest or {}, images) \
        if changed and images else {}
    if rest:
        by_reason: dict = {}
        for key, reason in rest.items():
            by_reason.setdefault(reason, []).append(key)
        # each reason with its own examples (all of them after the last reason read as that
        # reason's: "5 changed; 1 missing (e.g. a, b, c)" where a and c were changed ones)
        counts = "; ".join(
            f"{len(keys)} {reason} (e.g. "
            f"{', '.join(feature_path(cache_dir, k) for k in keys[:examples])})"
            for reason, keys in sorted(by_reason.items(), key=lambda item: -len(item[1])))
        elsewhere = _under_other_names(by_reason["missing"], cache_dir) \
            if "missing" in by_reason else None
        named = ""
        if elsewhere is not None:
            n, key, held = elsewhere
            prefix = held[:-len(key) - 1]
            folder = os.path.join(images, *prefix.split("/")) if images else \
                f"the folder {prefix}/ of the images"
            named = (f" {n} of the missing ones are in the cache under a longer path (e.g. "
                     f"{one_line(key)} as {one_line(held)}): feature files are named after "
                     f"the image's path relative to --images, and the caption file's names "
                     f"are relative to {one_line(folder)}: extract with --images "
                     f"{one_line(folder)} instead.")
            images = folder if images else None
        if SHARED_FILE in by_reason:   # (the rerun lists them in failed.tsv, with the fix)
            named += (f" Of the images sharing a file, extract-features extracts none: it "
                      f"lists them in {os.path.join(cache_dir, FAILED)} with what to do.")
        copied = (f"If {cache_dir} was copied without its modification times (`cp -r`), copy "
                  f"it again with `cp -a` or `rsync -a`; otherwise rerun" if
                  feature_index.REWRITTEN in by_reason else "Rerun")
        others = [f for f in images_folders(manifest or {}) if images is None or
                  os.path.realpath(f) != os.path.realpath(images)]
        # (an image changed in the folder its features were extracted from replaces none)
        replacing = (f" (refused, naming the folder, if these names' features are now of "
                     f"another images folder's images, e.g. {one_line(others[-1])}'s: add "
                     f"--replace-other-images to replace them then)"
                     if set(changed) - set(moved) and others else "")
        groups = [(images, [k for k in rest if k not in moved])]
        for folder in dict.fromkeys(moved.values()):
            groups.append((folder, [k for k, f in moved.items() if f == folder]))
        fix = _fix_commands(cache_dir, manifest, captions, [g for g in groups if g[1]])
        parts.append(f"{len(rest)} feature file(s) in {cache_dir} cannot be used: {counts}."
                     f"{named} {copied} {fix}{replacing} (--verify "
                     f"also reads every other file's values)")
    if failed:
        shown = "; ".join(f"{one_line(k)} ({one_line(why)})"
                          for k, why in list(failed.items())[:examples])
        parts.append(f"{len(failed)} image(s) failed to extract, so they have no feature file "
                     f"in {cache_dir} (listed in {os.path.join(cache_dir, FAILED)}): {shown}"
                     f"{' ...' if len(failed) > examples else ''}. Extracting them again fails "
                     f"the same way: fix or remove these images (or their captions), then "
                     f"rerun `{extract_command(cache_dir, manifest, captions, images)}`")
    return ". ".join(parts)
