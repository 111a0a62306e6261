"""The feature cache's provenance index: for every `.npy`, which backbone made it and from
which source image.

Format: JSON lines (UTF-8; an images folder whose name is not UTF-8 as its own bytes), one
object per feature file, for example

    {"key": "train2014/COCO_train2014_000000000009.jpg", "identity": "3f1c9a0b5e2d7c41",
     "size": 262272, "mtime_ns": 1718000000123456789, "ino": 1234567,
     "image_size": 161159, "image_mtime_ns": 1400000000000000000, "image_sha256": "ab12...",
     "images_dir": "/data/coco"}

    key             image path relative to --images (the feature file is <cache>/<key>.npy)
    identity        fingerprint of the cache identity the features were made with
                    (`feature_cache.cache_identity`: backbone, weights sha256, dtype, ...)
    size, mtime_ns, ino   the feature file right after it was written
    image_size, image_mtime_ns, image_sha256   the source image file as it was read
    images_dir      the absolute --images folder it was read from (<images_dir>/<key>);
                    absent from lines written before it was recorded

Files:

    <cache>/index.jsonl                      the compacted index, sorted by key
    <cache>/index/<time_ns>-<host>-<pid>-<token>.jsonl   segments of running (or killed)
                                             extractions; names sort by the time written

Writing (`SegmentWriter`): every extraction process appends its entries into its own
segments, each a new file written atomically (temporary name, fsync, rename) every
`FLUSH_SECONDS` or `FLUSH_ENTRIES` and at the end, so several processes, on several machines
sharing the folder, never write one file, and a killed process leaves whole segments only:
the files it wrote after its last segment have no entry and are extracted again. At the end
of a run, under the cache lock, `compact` merges index.jsonl and the segments into a new
index.jsonl and then deletes the merged segments.

Reading (`load_index`): the union of the segments and index.jsonl (segments first: a segment
that vanishes meanwhile was merged into the index.jsonl read after it). A key may have several
entries; the one whose recorded size and mtime_ns equal the feature file's on disk describes
it (`match`). A feature file rewritten or damaged after it was indexed has another mtime and
matches no entry: it is not used. The inode is recorded but not compared: copying a cache
(`cp -a`, `rsync -a`, `shutil.copytree`) keeps sizes and nanosecond mtimes but not inodes.
Malformed lines (e.g. a segment cut by a power loss) are skipped: their files are extracted
again.

Checking (`check_keys`): which keys' feature files an identity made from the current source
image, from the index and one stat per file (and per image), in threads (a network file
system answers each stat slowly). An image missing from the folder checked is compared only
in the folder its entry records (a same-named image of another folder is another image).

Measured (AMD EPYC, 2 cores shared with other jobs, local disk,
`benchmarks/bench_feature_index.py`): a COCO-size index (123,287 entries, 33 MB) loads in
0.5 s of CPU time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import threading
import time
from typing import Iterable, NamedTuple, Optional, Sequence

from caption_attn import interrupts
from caption_attn.errors import FREE_SPACE, WriteFailed
from caption_attn.fileio import HOST, write_bytes_atomic

INDEX = "index.jsonl"
SEGMENTS = "index"
FLUSH_SECONDS = 10.0      # a killed extraction loses at most this much indexing
FLUSH_ENTRIES = 1024      # ... or this many entries (fewer, larger segments on fast GPUs)


class Entry(NamedTuple):
    """One index line: a feature file as written, and the source image it was made from."""

    key: str
    identity: str           # cache identity fingerprint
    size: int               # feature file bytes
    mtime_ns: int           # feature file mtime
    ino: int                # feature file inode (informational)
    image_size: int
    image_mtime_ns: int
    image_sha256: str
    images_dir: Optional[str] = None   # absolute; None: not recorded (an older line)

    def to_json(self) -> str:
        fields = self._asdict()
        if fields["images_dir"] is None:
            del fields["images_dir"]
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))

    def to_line(self) -> bytes:
        """The entry's line in the index: an images folder whose name is not UTF-8 as its own
        bytes (`fileio.write_json_atomic`'s `file_names`; read back so by `_read_text`)."""
        return (self.to_json() + "\n").encode("utf-8", "surrogateescape")

    def matches_file(self, st: os.stat_result) -> bool:
        """The feature file on disk (`st`) is the one this entry recorded (`same_mtime`: also
        as a copy that keeps its modification time coarser, a tar or zip of the cache)."""
        return self.size == st.st_size and same_mtime(self.mtime_ns, st.st_mtime_ns)

    def matches_image(self, st: os.stat_result) -> bool:
        """The source image file (`st`) has the size and mtime it had when it was read."""
        return self.image_size == st.st_size and same_mtime(self.image_mtime_ns,
                                                            st.st_mtime_ns)


# The steps in which copies keep a file's modification time: NTFS and SMB 100 ns, utimes()
# (macOS cp -p, older rsync) 1 us, exFAT 10 ms, tar (GNU's default format, Go's: docker cp),
# scp -p and HFS+ 1 s, zip and FAT 2 s. A cache moved so was "changed after extraction" in
# every file, and the advice (copy it with `cp -a`) could not mend it.
COARSER_MTIME_NS = (100, 1_000, 10_000_000, 1_000_000_000, 2_000_000_000)


# zip rounds up to its 2 s; the others cut
ROUNDED_UP_NS = 2_000_000_000


def same_mtime(recorded: int, now: int) -> bool:
    """Whether modification time `now` (ns) is `recorded`, or `recorded` as a copy keeps it
    in one of `COARSER_MTIME_NS`'s steps, finer than the step (a whole number of them):
    cut, less than one step before it, or rounded up by zip, less than 2 s after one
    recorded finer than 10 ms. A file written again later is never cut; on a file system
    of full precision its time would also have to fall on a whole 2 s within 2 s of the
    recorded write to pass for zip's; one of coarse times (whole seconds, exFAT's 10 ms)
    records no time finer than 10 ms to round up from."""
    if now == recorded:
        return True
    for step in COARSER_MTIME_NS:
        if now % step or not recorded % step:
            continue
        if now < recorded and recorded - now < step:
            return True
        if step == ROUNDED_UP_NS and 0 < now - recorded < step and recorded % 10_000_000:
            return True
    return False


class ImageStamp(NamedTuple):
    """The source image as extraction read it (sha256 of the very bytes decoded)."""

    size: int
    mtime_ns: int
    sha256: str


def make_entry(key: str, identity: str, feature_stat: os.stat_result,
               image: ImageStamp, images_dir: Optional[str] = None) -> Entry:
    """The entry of a feature file just written from `images_dir`/`key` (made absolute)."""
    return Entry(key, identity, feature_stat.st_size, feature_stat.st_mtime_ns,
                 feature_stat.st_ino, image.size, image.mtime_ns, image.sha256,
                 os.path.abspath(images_dir) if images_dir is not None else None)


def index_path(cache_dir: str) -> str:
    return os.path.join(cache_dir, INDEX)


def segments_dir(cache_dir: str) -> str:
    return os.path.join(cache_dir, SEGMENTS)


# =========================================================================== writing
# what to do when the cache could not be written while extracting (a full disk)
RERUN = (f"{FREE_SPACE}: it extracts only the images whose features are not in the cache's "
         f"index yet")


class SegmentWriter:
    """Appends this process's entries to the index in atomically written segments.

    Thread-safe. Segments are flushed every `flush_seconds` (checked when an entry is added)
    or `flush_entries`, and by `close`.
    """

    def __init__(self, cache_dir: str, flush_seconds: Optional[float] = None,
                 flush_entries: Optional[int] = None):
        self.dir = segments_dir(cache_dir)
        # the token keeps names unique when a pid is reused after a killed run
        self.suffix = f"{HOST}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self._last_time_ns = 0
        self.flush_seconds = FLUSH_SECONDS if flush_seconds is None else flush_seconds
        self.flush_entries = FLUSH_ENTRIES if flush_entries is None else flush_entries
        self.pending: list[Entry] = []
        self.segments = 0
        self.entries = 0
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()

    def add(self, entry: Entry) -> None:
        with self._lock:
            self.pending.append(entry)
            if len(self.pending) >= self.flush_entries or \
                    time.monotonic() - self._last_flush >= self.flush_seconds:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._last_flush = time.monotonic()
        if not self.pending:
            return
        # names sort by time (strictly increasing within a process even if the clock steps)
        self._last_time_ns = max(time.time_ns(), self._last_time_ns + 1)
        path = os.path.join(self.dir, f"{self._last_time_ns:020d}-{self.suffix}")
        # a Ctrl-C or SIGTERM lands once the segment is written and its entries are no longer
        # pending: raised inside the write, it dropped the entries of files already on disk
        # (the last flush: those extracted since the one before), extracted again by a rerun
        with interrupts.held():
            try:
                write_bytes_atomic(path, [e.to_line() for e in self.pending], fsync=True)
            except OSError as e:   # a full disk: the entries stay pending for the next flush
                raise WriteFailed(f"the feature index's segment {path}", e, RERUN) from None
            self.segments += 1
            self.entries += len(self.pending)
            self.pending = []

    def close(self) -> None:
        self.flush()


# =========================================================================== reading
class Index:
    """Entries by key (several per key are possible, in load order: oldest first)."""

    def __init__(self, entries: Optional[dict] = None, skipped_lines: int = 0):
        self.entries: dict[str, list[Entry]] = entries if entries is not None else {}
        self.skipped_lines = skipped_lines     # malformed lines ignored while loading

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def add(self, entry: Entry) -> None:
        self.entries.setdefault(entry.key, []).append(entry)

    def match(self, key: str, st: os.stat_result) -> list[Entry]:
        """Entries of `key` that describe its feature file as it is on disk (`st`)."""
        return [e for e in self.entries.get(key, ()) if e.matches_file(st)]


def _segment_names(cache_dir: str) -> list[str]:
    """Segment files, oldest first (their names start with the time written), without
    temporary files."""
    try:
        names = os.listdir(segments_dir(cache_dir))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.endswith(".jsonl") and not n.startswith("."))


_TYPES = (str, str, int, int, int, int, int, str)   # of Entry's fields (bool is no int here)


def _entry(r) -> Entry:
    """The Entry of one parsed line; KeyError or TypeError unless `r` is an object with every
    field, of its type (a list as "key" stopped every reader: unhashable); "images_dir" may be
    absent (a line written before it was recorded)."""
    e = Entry(r["key"], r["identity"], r["size"], r["mtime_ns"], r["ino"], r["image_size"],
              r["image_mtime_ns"], r["image_sha256"], r.get("images_dir"))
    if tuple(map(type, e[:-1])) != _TYPES or not isinstance(e.images_dir, (str, type(None))):
        raise TypeError("an index field of another type")
    return e


def _parse_lines(text: str, index: Index) -> None:
    """Add the entries of JSON-lines `text` to `index`; malformed lines (not JSON, not an
    object, a field missing or of another type) are counted and skipped."""
    # lines end at "\n" alone: JSON leaves U+2028, U+2029 and U+0085 in a name unescaped,
    # and `splitlines` split an entry there (read under another key, or skipped)
    lines = text.split("\n")
    try:  # the fast path: one parse of the whole text (0.43 s CPU for 123k lines)
        rows = json.loads("[" + ",".join(line for line in lines if line.strip()) + "]")
        entries = [_entry(r) for r in rows]
    except (json.JSONDecodeError, KeyError, TypeError):
        entries = []
        for line in lines:
            try:
                r = json.loads(line) if line.strip() else None
                if r is not None:
                    entries.append(_entry(r))
            except (json.JSONDecodeError, KeyError, TypeError):
                index.skipped_lines += 1
    by_key = index.entries
    for entry in entries:
        if entry.key in by_key:
            by_key[entry.key].append(entry)
        else:
            by_key[entry.key] = [entry]


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _load(cache_dir: str, segment_names: Iterable[str]) -> Index:
    index = Index()
    texts = [_read_text(os.path.join(segments_dir(cache_dir), n)) for n in segment_names]
    main = _read_text(index_path(cache_dir))  # after the segments (see the module docstring)
    for text in [main] + texts:               # index.jsonl first: it is the oldest
        if text:
            _parse_lines(text, index)
    return index


def load_index(cache_dir: str) -> Index:
    """The union of index.jsonl and every segment (no lock needed)."""
    return _load(cache_dir, _segment_names(cache_dir))


def compact(cache_dir: str, feature_path) -> tuple[Index, dict[str, os.stat_result]]:
    """Merge the segments into index.jsonl; the caller holds the cache lock.

    Keeps, per key, the newest entry that matches its feature file on disk (entries of files
    since rewritten, damaged or deleted are dropped). `feature_path(key)` is the key's `.npy`.
    Returns the compacted index and the feature files' stats.
    """
    names = _segment_names(cache_dir)
    index = _load(cache_dir, names)
    kept, stats = Index(), {}
    for key in sorted(index.entries):
        try:
            st = os.stat(feature_path(key))
        except OSError:
            continue
        matching = index.match(key, st)
        if matching:
            kept.add(matching[-1])
            stats[key] = st
    # rewritten only when something changed: a rerun of a complete COCO cache rewrote and
    # fsynced its 33 MB index every time (3.6 s)
    if names or index.skipped_lines or len(kept) != len(index):
        try:
            write_bytes_atomic(index_path(cache_dir), [
                e.to_line() for entries in kept.entries.values() for e in entries], fsync=True)
        except OSError as e:   # a full disk: the segments stay, and the entries in them
            raise WriteFailed(f"the feature index {index_path(cache_dir)}", e,
                              f"{FREE_SPACE}: the features extracted are kept (their entries "
                              f"stay in the index's segments)") from None
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(segments_dir(cache_dir), name))
    return kept, stats


# =========================================================================== checking keys
NOT_INDEXED = ("not in the cache's index (its extraction was interrupted, or extract-features "
               "did not write it)")
REWRITTEN = "changed after extraction (size or modification time differ from the index)"
OTHER_BACKBONE = "made by another backbone (cache identity {})"
IMAGE_CHANGED = "source image changed since extraction"

# stat() in parallel: no gain measured on a local disk; on a network file system each stat
# waits for the server, and threads wait together
STAT_THREADS = 8


class KeyCheck(NamedTuple):
    """What the index says about one key's feature file."""

    path: str                             # <cache>/<key>.npy
    entry: Optional[Entry]                # the entry of this identity matching the file
    reason: Optional[str]                 # None: usable as it is
    image_stat: Optional[os.stat_result]  # the source image now (None: not checked / gone)


def _stat(path: str):
    """os.stat_result, None when missing, or the reason it cannot be read."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"unreadable ({e.strerror})"


def _stat_all(paths: list[str]) -> list:
    """`_stat` of every path, in STAT_THREADS threads (network file systems answer slowly)."""
    if len(paths) < 1000:
        return [_stat(p) for p in paths]
    step = -(-len(paths) // (4 * STAT_THREADS))
    with concurrent.futures.ThreadPoolExecutor(STAT_THREADS) as pool:
        parts = pool.map(lambda i: [_stat(p) for p in paths[i:i + step]],
                         range(0, len(paths), step))
        return [st for part in parts for st in part]


def _check_file(key: str, st, index: Index, fingerprint: str,
                size: int) -> tuple[list, Optional[str]]:
    """(entries of this identity matching the file, the reason it cannot be used)."""
    if not isinstance(st, os.stat_result):
        return [], st or "missing"
    entries = index.entries.get(key, [])
    if len(entries) == 1 and entries[0].identity == fingerprint and st.st_size == size and \
            entries[0].matches_file(st):
        return entries, None                          # the usual case, 123k times on COCO
    matching = [e for e in entries if e.matches_file(st)]
    if not matching:
        return [], REWRITTEN if entries else NOT_INDEXED
    mine = [e for e in matching if e.identity == fingerprint]
    if not mine:
        return [], OTHER_BACKBONE.format(matching[-1].identity)
    if st.st_size != size:
        return [], f"wrong size ({st.st_size} bytes, expected {size})"
    return mine, None


def _with_image(path: str, mine: list, reason: Optional[str], image_st) -> KeyCheck:
    """The KeyCheck of a feature file, given the source image's stat (None: not checked)."""
    if not mine:
        return KeyCheck(path, None, reason, None)
    if not isinstance(image_st, os.stat_result):      # not checked, or gone: features stand
        return KeyCheck(path, mine[-1], None, None)
    same = [e for e in mine if e.matches_image(image_st)]
    return KeyCheck(path, (same or mine)[-1], None if same else IMAGE_CHANGED, image_st)


def check_keys(cache_dir: str, keys: list[str], index: Index, fingerprint: str,
               size: int, images_dir: Optional[str] = None,
               more_dirs: Sequence[str] = ()) -> list[KeyCheck]:
    """Whether each key's feature file is one this identity made (index + stat, nothing read).

    Reasons: "missing", NOT_INDEXED, REWRITTEN, OTHER_BACKBONE, "wrong size", and with
    `images_dir` IMAGE_CHANGED (size or mtime differ; `entry` is then set). A source image
    missing there is looked for in the folder its entry records it was read from, when that
    is one of `more_dirs` (the cache's other images folders on this machine:
    `feature_cache.usable_features`): another folder's image of that name is another image
    (`--replace-other-images` gave the name a later folder's features, and that image may be
    gone since); an entry that records no folder (an older index) is looked for in each of
    `more_dirs` in turn. One gone from there is no reason: the features still are those of
    the image as it was.
    """
    prefix = os.path.join(cache_dir, "")
    paths = [prefix + key + ".npy" for key in keys]   # = feature_path (keys use "/")
    found = [_check_file(key, st, index, fingerprint, size)
             for key, st in zip(keys, _stat_all(paths))]
    image_stats = [None] * len(keys)
    if images_dir is not None:
        todo = [i for i, (mine, _) in enumerate(found) if mine]
        image_prefix = os.path.join(images_dir, "")
        for i, st in zip(todo, _stat_all([image_prefix + keys[i] for i in todo])):
            image_stats[i] = st
        todo = [i for i in todo if image_stats[i] is None]
        if todo and more_dirs:
            folders = recorded_folders(more_dirs, {found[i][0][-1].images_dir for i in todo})
            recorded = [(i, folders[d]) for i in todo
                        if (d := found[i][0][-1].images_dir) in folders]
            for (i, _), st in zip(recorded, _stat_all([os.path.join(f, keys[i])
                                                       for i, f in recorded])):
                image_stats[i] = st
            # an entry that records no folder (an older index): each other folder in turn, the
            # newest first (a rare false "changed" after --replace-other-images and a deletion
            # is a refusal that says so; a change left unseen would be silent)
            todo = [i for i in todo if found[i][0][-1].images_dir is None]
            for folder in more_dirs:
                image_prefix = os.path.join(folder, "")
                for i, st in zip(todo, _stat_all([image_prefix + keys[i] for i in todo])):
                    image_stats[i] = st
                todo = [i for i in todo if image_stats[i] is None]
                if not todo:
                    break
    return [_with_image(path, mine, reason, image_st)
            for path, (mine, reason), image_st in zip(paths, found, image_stats)]


def recorded_folders(more_dirs: Sequence[str], recorded: set) -> dict[str, str]:
    """{images folder an entry records (of `recorded`): the folder of `more_dirs` it is} (by
    real path: a folder recorded through a symbolic link is the same folder)."""
    real = {os.path.realpath(d): d for d in reversed(more_dirs)}
    return {r: real[os.path.realpath(r)] for r in recorded
            if r is not None and os.path.realpath(r) in real}
