"""Caption datasets: reading COCO / Karpathy / Flickr files into records, and splits by image.

A record is one image (keyed by its path relative to the images folder) with all of its
captions; splitting works on records, so captions of one image never land in two splits.

Supported files (auto-detected from the content, or chosen with `DataConfig.format`):
- `coco`: COCO captions JSON, `images[].file_name/id` + `annotations[].image_id/caption`.
- `karpathy`: Karpathy split JSON (`dataset_coco.json`, `dataset_flickr8k.json`, the shapes
  dataset): `images[].filepath/filename/split/sentences[].raw` (+ optional `objects`).
- `flickr-token`: Flickr8k/30k `IMAGE#N<TAB>CAPTION` lines.
- `flickr-csv`: Kaggle Flickr8k `captions.txt`, a CSV with the header `image,caption`.

Flickr8k's official split comes as lists of image names beside its caption file
(`Flickr_8k.trainImages.txt`, `Flickr_8k.devImages.txt`, `Flickr_8k.testImages.txt`): a
`flickr-token` or `flickr-csv` file with them beside it is split by them (`read_split_lists`),
any other file without a split of its own by image hash (`split_images`).

Image paths are never trusted: absolute paths and paths leaving the images folder are refused
(counted, never opened), see `safe_image_key`.

Entries never silently take another image's place: a COCO `id` given to two different image
entries, one file under two ids (COCO `id`, Karpathy `cocoid` or `imgid`), and an image in two
Karpathy entries that differ (in split, `objects`, size, the spelling of its path or `sentids`:
its captions would be read twice) are refused (captions of an image spread over several COCO
annotations or Flickr lines are merged; an exact repeat of an entry is read once), and so is
one Flickr `IMAGE#N` with two different captions (one COCO annotation `id` on two different
annotations keeps both, as pycocoevalcap scores them)."""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import posixpath
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

from caption_attn.config import CAPTION_FORMATS, DataConfig, VocabConfig, check_fractions
from caption_attn.fileio import decode_utf8, one_line, parse_json
from caption_attn.errors import UserError, counted
from caption_attn.vocab import standardize

SPLITS = ("train", "val", "test")
KARPATHY_SPLITS = ("train", "val", "test", "restval")  # restval is read as train
FILE_FORMATS = tuple(f for f in CAPTION_FORMATS if f != "auto")
MAX_EXAMPLES = 5  # examples kept of refused paths and missing images
# Flickr8k's official split: (split, list of image names beside the caption file)
SPLIT_LISTS = (("train", "Flickr_8k.trainImages.txt"), ("val", "Flickr_8k.devImages.txt"),
               ("test", "Flickr_8k.testImages.txt"))
LISTS_GLOB = "Flickr_8k.*Images.txt"
LIST_FORMATS = ("flickr-token", "flickr-csv")   # the formats Flickr8k comes in

_DRIVE = re.compile(r"^[A-Za-z]:")                 # C:\x.jpg, C:x.jpg
_TOKEN_LINE = re.compile(r"^[^\t]+#\d+\t")         # 1000268201_693b08cb0e.jpg#0<TAB>...
_TOKEN_SUFFIX = re.compile(r"#\d+$")
_LEADING = re.compile(r"[\s\ufeff]*")               # whitespace and byte order marks
_LINE_BOMS = re.compile(r"^\ufeff+", re.MULTILINE)  # byte order marks starting a line


@dataclass
class ImageRecord:
    """One image and all of its captions."""

    image: str                      # path relative to the images folder, POSIX separators
    captions: list[str]             # raw captions in file order, empty ones removed
    split: Optional[str] = None     # "train" / "val" / "test" ("restval" read as "train")
    image_id: Any = None            # COCO id, Karpathy cocoid/imgid, else a running index
    objects: Optional[list] = None  # shapes ground truth: [{color, shape, size, bbox}]
    size: Optional[tuple] = None    # (height, width) in pixels when the file gives them
    # captions without a word (".", ""), as written: never trained on, but references all
    # the same, as pycocoevalcap scores them (they weigh in CIDEr and BLEU's lengths)
    wordless: list[str] = field(default_factory=list)


@dataclass
class CaptionSet:
    """The records of one caption file plus what was dropped while reading it."""

    path: str
    format: str                     # one of FILE_FORMATS
    records: list[ImageRecord]      # sorted by image key, each with >= 1 caption
    skipped_empty: int = 0          # captions without a word skipped (empty, "...")
    refused: list[str] = field(default_factory=list)  # distinct unsafe image paths, as written
    has_split: bool = False         # True when the file carries its own split (Karpathy)
    uncaptioned: list[str] = field(default_factory=list)  # images left out: no usable caption
    # how `load_dataset` split the records: "file" (Karpathy), "lists" (Flickr8k's official
    # lists beside the file) or "hash" (`split_images`); None before (`load_captions`)
    split_source: Optional[str] = None
    split_note: Optional[str] = None      # what `train` says about the split (lists or hash)
    unlisted: list[str] = field(default_factory=list)  # left out: in none of the lists
    # list path -> the names in it that are no image of the file (nor one left out for want
    # of a usable caption), in list order: dropped, said in `split_note` and by `describe`
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    stamp: Optional[dict] = None          # `file_stamp` of the bytes read
    # the images of `uncaptioned` whose captions all lack a word (".", "!!"), as records with
    # no `captions` and those as `wordless`: never trained on, but pycocoevalcap scores an
    # image against such references (`evaluate` does too, when the image is in the split)
    wordless_only: list[ImageRecord] = field(default_factory=list)
    # (line, image) of the CSV rows that repeat an earlier row exactly, read once
    repeated: list[tuple[int, str]] = field(default_factory=list)

    @property
    def refused_paths(self) -> int:
        """How many distinct image paths were refused (never opened)."""
        return len(self.refused)

    @property
    def refused_examples(self) -> list[str]:
        """The first few refused paths, as written."""
        return self.refused[:MAX_EXAMPLES]

    def refused_note(self) -> Optional[str]:
        """What a command that uses the captions says about the refused image paths (None
        when there are none): their captions are left out, not silently."""
        if not self.refused_paths:
            return None
        empty = sum(not p.strip().lstrip("\ufeff").strip() for p in self.refused)
        why, fix = (("empty", "give every image its file name") if empty == self.refused_paths
                    else ("empty, absolute or outside the images folder", "give every image "
                          "its file name, relative to the images folder") if empty
                    else ("absolute or outside the images folder",
                          "write them relative to the images folder"))
        return (f"{self.refused_paths} image path(s) in {self.path} are refused ({why})"
                f"{_examples(self.refused_examples)}: their captions are left out; {fix}")

    def empty_note(self) -> Optional[str]:
        """What a command that uses the captions says about the empty captions it skipped and
        the images they (or a COCO image without annotations) left without a usable caption,
        which are left out (None when there are none)."""
        left_out = (f"have no usable caption and are left out"
                    f"{_examples(self.uncaptioned[:MAX_EXAMPLES])}")
        if not self.skipped_empty:
            return (f"{len(self.uncaptioned)} image(s) in {self.path} {left_out}"
                    if self.uncaptioned else None)
        note = (f"{self.skipped_empty} caption(s) in {self.path} are skipped as empty (no word "
                f"once punctuation is removed)")
        return note + (f"; {len(self.uncaptioned)} image(s) {left_out}" if self.uncaptioned
                       else "")

    def repeated_note(self, images: Optional[set] = None, of: str = "") -> Optional[str]:
        """What a command that uses the captions says of the CSV rows read once as repeats of
        an earlier row (None when there are none), of `images` only when given (`of` says
        which: " for images of the test split"): a CSV does not number an image's captions,
        so a file joined with an overlap and two annotators' identical captions look alike."""
        rows = [r for r in self.repeated if images is None or r[1] in images]
        if not rows:
            return None
        n, (line, image) = len(rows), rows[0]
        one = n == 1
        # (a token file's lines without #N: read once as silently as IMAGE#N repeated was)
        row, unnumbered = (("line", "a line without #N does not number them") if
                           self.format == "flickr-token" else ("row", "a CSV does not number "
                                                                      "them"))
        return (f"{counted(n, row)} of {self.path}{of} repeat{'s' if one else ''} an earlier "
                f"{row} of the same image and caption (e.g. line {line}, {image!r}) and "
                f"{'is' if one else 'are'} read once, as {row}s of a file joined with an "
                f"overlap; captions written alike for one image by two annotators are read "
                f"once too ({unnumbered}; Flickr8k.token.txt's IMAGE#N keeps both)")

    def keys_to_extract(self) -> list[str]:
        """The images `extract-features --captions` is given: every record's, and every
        refused path as written, which it lists in failed.tsv as a bad image path (left out
        of the keys, they were dropped without a word)."""
        return [r.image for r in self.records] + self.refused

    def split(self, name: str) -> list[ImageRecord]:
        """Records of split `name` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"`name` must be one of {SPLITS}, got {name!r}")
        return [r for r in self.records if r.split == name]

    @property
    def num_captions(self) -> int:
        return sum(len(r.captions) for r in self.records)


# --------------------------------------------------------------------------- image paths
def _is_absolute(path: str) -> bool:
    """POSIX or Windows absolute path (`/x`, `\\x`, `\\\\server\\x`, `C:\\x`, `C:x`)."""
    return path.startswith(("/", "\\")) or bool(_DRIVE.match(path))


def safe_image_key(raw: str) -> Optional[str]:
    """Normalised POSIX path of `raw` relative to the images folder, or None if unsafe.

    Backslashes count as separators. Absolute paths, drive letters, NUL bytes and paths that
    leave the folder after normalisation (`../x.jpg`, `a/../../x.jpg`) are refused.
    """
    # a byte order mark inside the file (files joined with `cat`, each with its BOM) starts a
    # line: it is no part of the image's name, which would be "missing" with it
    path = raw.strip().lstrip("\ufeff").strip()
    if not path or "\0" in path or _is_absolute(path):
        return None
    path = posixpath.normpath(path.replace("\\", "/"))
    if path in (".", "..") or path.startswith("../"):
        return None
    return path


def image_key_problem(key: str) -> Optional[str]:
    """Why `key` is not an image key as `safe_image_key` returns them, or None if it is one.

    For keys that did not come through a caption file (e.g. given to `extract_features`): the
    reason is what failed.tsv says about such an image.
    """
    safe = safe_image_key(key)
    if safe is None:
        return "bad image path (must be relative and inside the images folder)"
    if safe != key:
        return "bad image path (must be normalised, with / separators)"
    return None


def _has_word(caption: str) -> bool:
    """`caption` keeps a word once standardised (a letter or digit comes first in practice:
    the whole standardisation only runs for the rest)."""
    return any(ch.isalnum() for ch in caption) or bool(standardize(caption))


# --------------------------------------------------------------------------- collecting records
_UNKEYED = object()   # `_Collector.add`'s key not given


class _Collector:
    """Merges (image path, captions) entries into records; counts what it drops."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[str, ImageRecord] = {}
        self.skipped_empty = 0
        self.refused: dict[str, None] = {}  # distinct refused raw paths, in file order
        self.uncaptioned: dict[str, None] = {}  # keys given no usable caption (so far)
        self.bare: dict[str, None] = {}  # of those, keys given no caption at all (so far)
        self.wordless: dict[str, list[str]] = {}  # captions without a word, per key
        self.silent: dict[str, ImageRecord] = {}  # keys first seen with only such captions
        self.repeated: list[tuple[int, str]] = []  # (line, image) of CSV rows read once

    def add(self, raw_path: str, captions: list[str], where: str, split: Optional[str] = None,
            image_id: Any = None, objects: Optional[list] = None,
            size: Optional[tuple] = None, key: Any = _UNKEYED) -> None:
        """Add captions of one image; `where` locates the entry in the file for errors.
        `key`: `safe_image_key(raw_path)` when the parser has it already."""
        key = safe_image_key(raw_path) if key is _UNKEYED else key
        if key is None:
            self.refused.setdefault(raw_path, None)
            return
        # a caption with no word once standardised ("...", "-") is empty too: trained on, it
        # would teach the model to end at once
        kept = [c.strip() for c in captions if _has_word(c)]
        self.skipped_empty += len(captions) - len(kept)
        if len(kept) < len(captions):
            self.wordless.setdefault(key, []).extend(c for c in captions if not _has_word(c))
        if not kept:
            self.uncaptioned.setdefault(key, None)  # unless a later entry gives it one
            if captions and key not in self.records:
                self.silent.setdefault(key, ImageRecord(key, [], split, image_id, objects, size))
            if not captions:  # a COCO image without annotations, a Karpathy one without
                self.bare.setdefault(key, None)  # sentences
            return
        record = self.records.get(key)
        if record is None:
            self.records[key] = ImageRecord(key, kept, split, image_id, objects, size)
            return
        if record.split != split:
            raise UserError(f"{self.path}: {where}: image {key!r} has split {split!r} here but "
                            f"{record.split!r} earlier; an image must be in one split")
        # Ground truth given twice must agree: the record keeps only the first, and scoring
        # would judge the captions of both entries against it.
        for name, earlier, here in (("objects", record.objects, objects),
                                    ("size", record.size, size)):
            if earlier is not None and here is not None and earlier != here:
                raise UserError(f"{self.path}: {where}: image {key!r} has other {name} here "
                                f"than earlier ({here!r}, not {earlier!r}); the entries of an "
                                f"image must agree")
        record.captions.extend(kept)

    def finish(self, fmt: str, has_split: bool) -> CaptionSet:
        """The CaptionSet, records sorted by key; no usable caption at all is an error."""
        records = [self.records[k] for k in sorted(self.records)]
        for record in records:
            record.wordless = self.wordless.get(record.image, [])
        refused = list(self.refused)
        if not records:
            bare = (f", {len(self.bare)} images without "
                    f"{'annotations' if fmt == 'coco' else 'sentences'}" if self.bare else "")
            raise UserError(f"no usable captions in {self.path} ({self.skipped_empty} empty "
                            f"captions, {len(refused)} refused image paths{bare})")
        uncaptioned = sorted(k for k in self.uncaptioned if k not in self.records)
        wordless_only = [self.silent[k] for k in uncaptioned if k in self.silent]
        for record in wordless_only:
            record.wordless = self.wordless[record.image]
        return CaptionSet(self.path, fmt, records, self.skipped_empty, refused, has_split,
                          uncaptioned, "file" if has_split else None,
                          wordless_only=wordless_only, repeated=self.repeated)


# --------------------------------------------------------------------------- reading files
def _read_text(path: str) -> str:
    """The file decoded as UTF-8 (a leading BOM removed), every line end as LF
    (`_universal_newlines`); unreadable input is a UserError."""
    return _read_file(path)[0]


def file_stamp(raw: bytes) -> dict:
    """What a run records of the bytes of the caption file it last read (split.json's
    `caption_file`): their size and sha256. A rerun whose file has the same bytes reads the
    same caption data, so one with nothing left to train need not parse it again
    (`train.rerun_without_data`; hashing COCO's Karpathy file takes 0.1 s, parsing,
    tokenizing and fingerprinting it 25 s)."""
    return _stamp([raw])


def caption_file_stamp(path: str) -> Optional[dict]:
    """`file_stamp` of the file at `path` now, read in chunks; None when it cannot be read
    (the full load says why)."""
    try:
        with open(path, "rb") as f:
            return _stamp(iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return None


def _stamp(chunks: Iterable[bytes]) -> dict:
    """{size, sha256} of the bytes `chunks` hold, one after the other."""
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _read_file(path: str) -> tuple[str, dict]:
    """(`_read_text`'s text, `file_stamp` of the bytes it was decoded from)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise _cannot_read(path, e) from None
    return _universal_newlines(decode_utf8(path, raw)), file_stamp(raw)


def _cannot_read(path: str, e: OSError) -> UserError:
    """What a caption file that cannot be read (`e`: why) is told."""
    why = ("caption file not found" if e.errno == errno.ENOENT else
           "is a folder, expected a caption file" if e.errno == errno.EISDIR else
           f"cannot read ({e.strerror})")
    return UserError(f"{one_line(path)}: {why}")


def check_caption_file(path: str) -> None:
    """`load_captions`' refusal of a `path` that is no file (missing, a folder), for the
    commands that make it before they import TensorFlow: `train --captions TYPO` was told
    after 3-6 s. `path` is not opened: a named pipe's writer would lose its one reader."""
    try:
        if stat.S_ISDIR(os.stat(path).st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
    except OSError as e:
        raise _cannot_read(path, e) from None


def check_images_folder(images_dir: str) -> None:
    """`train --images`' refusal of a path that is no folder, also made before TensorFlow's
    import (`cli.check_flags`): the same words, said seconds sooner."""
    if not os.path.isdir(images_dir):
        raise UserError(f"--images {images_dir}: "
                        f"{'not a folder' if os.path.exists(images_dir) else 'no such folder'}"
                        f" (the images folder of the caption file: leave it out to use the "
                        f"one recorded in the cache)")


def _universal_newlines(text: str) -> str:
    """`text` with every CRLF and bare CR as LF, as Python's universal newlines (and the csv
    module) read line ends: a file with CR-only (classic Mac) line ends, or with LF and bare
    CR mixed (lines pasted from such a file), was read as one line where the CRs were, a
    token file's lines after it as part of one caption (exit 0)."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without a byte order mark at its start: the first line of
    a file joined into another by `cat`) of `_universal_newlines` text."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removeprefix("\ufeff")


def _supported() -> str:
    return ", ".join(FILE_FORMATS)


def _json_format(obj: Any) -> Optional[str]:
    """`coco` / `karpathy` from the JSON structure, or None."""
    if not isinstance(obj, dict):
        return None
    if "annotations" in obj:
        return "coco"
    images = obj.get("images")
    first = images[0] if isinstance(images, list) and images else None
    if "dataset" in obj and images is not None or \
            isinstance(first, dict) and ("sentences" in first or "filename" in first):
        return "karpathy"
    if isinstance(first, dict) and "file_name" in first:
        return "coco"
    return None


def _is_csv_header(line: str) -> bool:
    try:
        fields = next(csv.reader([line]), [])
    except csv.Error:  # e.g. a stray carriage return: not the header
        return False
    return [f.strip().lower() for f in fields] == ["image", "caption"]


def _parse_json(path: str, text: str) -> Any:
    """`parse_json`, but JSON after a second byte order mark (the first is gone: `decode_utf8`)
    is refused saying so: "cannot detect the caption format from line 1 ('{...')" hid it."""
    start = _LEADING.match(text).end()
    if "\ufeff" in text[:start] and text[start:start + 1] in ("{", "["):
        raise UserError(f"{path}: a second byte order mark (U+FEFF) is at the start, before "
                        f"its JSON (saved with a BOM twice, or joined to another file?); "
                        f"remove it: a JSON file may start with one BOM at most")
    return parse_json(path, text)


def _sniff(path: str, text: str) -> tuple[str, Any]:
    """(format, parsed JSON or None) detected from the content."""
    stripped = text[_LEADING.match(text).end():]
    if not stripped:   # whitespace and byte order marks only
        raise UserError(f"{path}: file is empty; supported caption formats: {_supported()}")
    if stripped[0] in "{[":
        obj = _parse_json(path, text)
        fmt = _json_format(obj)
        if fmt is None:
            raise UserError(f"{path}: cannot detect the caption format: JSON that is neither "
                            f"COCO (`images` + `annotations`) nor Karpathy (`images[]."
                            f"sentences`); supported formats: {_supported()} (choose one "
                            f"with --format)")
        return fmt, obj
    number, first = next((n, line) for n, line in _lines(text) if line.strip())
    if _TOKEN_LINE.match(first):
        return "flickr-token", None
    if _is_csv_header(first):
        return "flickr-csv", None
    raise UserError(f"{path}: cannot detect the caption format from line {number} "
                    f"({first[:60]!r}); supported formats: {_supported()} (choose one with "
                    f"--format)")


def detect_format(path: str) -> str:
    """The format of caption file `path`, one of FILE_FORMATS."""
    return _sniff(path, _read_text(path))[0]


# --------------------------------------------------------------------------- JSON helpers
def _get(obj: Any, key: str, kind: type, path: str, where: str) -> Any:
    """`obj[key]`, which must exist and be a `kind`; otherwise a UserError naming the key."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {where} must be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise UserError(f"{path}: {where} has no `{key}` key")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{path}: {where}.{key} must be {_kind_name(kind)}, got "
                        f"{type(value).__name__}")
    return value


def _kind_name(kind) -> str:
    names = {list: "a list", str: "a string", dict: "an object", int: "an integer"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _top(obj: Any, path: str, name: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError(f"{path}: {name} JSON must be an object with an `images` list, got a "
                        f"{type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------- parsers
def _image_size(image: dict) -> Optional[tuple]:
    """(height, width) from an image entry's `height`/`width` keys, if both are finite
    positive numbers (grounding maps boxes onto the 8x8 grid with them: an infinite size put
    every box in cell 0); otherwise None, and grounding leaves the image out with a note."""
    h, w = image.get("height"), image.get("width")
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             and v > 0 for v in (h, w))
    return (h, w) if ok else None


def _check_coco_identity(path: str, images: list, i: int, image_id: Any, file_name: str,
                         entries: dict, ids: dict) -> None:
    """`UserError` unless `images[i]` is a new image (new id, new file) or an exact repeat.

    Annotations find their image by id, so a second image with the same id would take the
    captions of the first; and one file under two ids would merge two images' captions.
    `entries` (id -> first index) and `ids` (image key -> id) are updated.
    """
    first = entries.setdefault(image_id, i)
    if images[first] != images[i]:
        raise UserError(f"{path}: images[{i}] and images[{first}] have the same id "
                        f"{image_id!r} but are different entries (file_name "
                        f"{images[first]['file_name']!r} and {file_name!r}); every image needs "
                        f"its own `id`")
    key = safe_image_key(file_name)  # unsafe paths are refused and counted later
    if key is not None and ids.setdefault(key, image_id) != image_id:
        other = ids[key]
        raise UserError(f"{path}: images[{i}] (id {image_id!r}) and images[{entries[other]}] "
                        f"(id {other!r}) are both the file {key!r}; list every image once, "
                        f"with one `id`")


def _parse_coco(path: str, obj: Any, out: _Collector) -> None:
    obj = _top(obj, path, "COCO captions")
    images = _get(obj, "images", list, path, "COCO captions JSON")
    annotations = _get(obj, "annotations", list, path, "COCO captions JSON")
    names, sizes, entries = {}, {}, {}  # id -> file name, size, index in `images`
    ids = {}                              # image key -> id
    for i, image in enumerate(images):
        file_name = _get(image, "file_name", str, path, f"images[{i}]")
        image_id = _get(image, "id", (int, str), path, f"images[{i}]")
        _check_coco_identity(path, images, i, image_id, file_name, entries, ids)
        names[image_id], sizes[image_id] = file_name, _image_size(image)
    seen = set()  # (JSON type, id, type, image id, caption stripped) of the annotations read
    annotated = set()  # image ids with an annotation
    for j, ann in enumerate(annotations):
        where = f"annotations[{j}]"
        image_id = _get(ann, "image_id", (int, str), path, where)
        caption = _get(ann, "caption", str, path, where)
        if image_id not in names:
            raise UserError(f"{path}: {where}.image_id {image_id!r} is not the `id` of any "
                            f"entry of `images`{_other_type_hint(image_id, names)}")
        # an annotation listed twice (files merged with an overlap) is one caption, as an
        # image listed twice is one image: kept twice, it weighed double in training and in
        # CIDEr (which averages over the references). One id on different annotations (a
        # converter numbering each image's captions from 0) keeps both, as pycocoevalcap
        # scores them (its `imgToAnns` keeps every annotation). So a repeat (the same id,
        # image and caption) is looked for among all the earlier annotations, not only its
        # id's first: b.jpg's caption 0 listed twice was kept twice after a.jpg's caption 0
        ann_id = ann.get("id")
        if isinstance(ann_id, (int, str)) and not isinstance(ann_id, bool):
            same = (type(ann_id), ann_id, type(image_id), image_id, caption.strip())
            if same in seen:
                continue
            seen.add(same)
        annotated.add(image_id)
        out.add(names[image_id], [caption], where, image_id=image_id, size=sizes[image_id])
    for image_id in names.keys() - annotated:  # no caption at all: left out, not silently
        out.add(names[image_id], [], f"images[{entries[image_id]}]", image_id=image_id)


def _other_type_hint(image_id: Any, names: dict) -> str:
    """"(`images` has the id 7 as a number)" when `image_id` is "7" (or 7 and `images` has
    "7"): ids must have the same JSON type to match."""
    other = (int(image_id) if isinstance(image_id, str) and image_id.strip().isascii()
             and image_id.strip().isdecimal()   # "²" is a digit to isdigit, not to int()
             else str(image_id) if isinstance(image_id, int) else None)
    if other is None or other not in names:
        return ""
    kind = "a number" if isinstance(other, int) else "a string"
    return f" (`images` has the id {other!r} as {kind}: ids must be of the same JSON type)"


def _karpathy_path(image: dict, path: str, where: str) -> str:
    """`filepath/filename`, or `filename` alone; an absolute filename stays absolute."""
    filename = _get(image, "filename", str, path, where)
    filepath = image.get("filepath")
    if filepath is None or filepath == "" or _is_absolute(filename.strip()):
        return filename
    if not isinstance(filepath, str):
        raise UserError(f"{path}: {where}.filepath must be a string, got "
                        f"{type(filepath).__name__}")
    return f"{filepath}/{filename}"


def _karpathy_split(image: dict, path: str, where: str) -> str:
    split = _get(image, "split", str, path, where)
    if split not in KARPATHY_SPLITS:
        raise UserError(f"{path}: {where}.split is {split!r}; allowed: "
                        f"{', '.join(KARPATHY_SPLITS)} (restval is read as train)")
    return "train" if split == "restval" else split


def _objects(image: dict, path: str, where: str) -> Optional[list]:
    """The image's ground-truth `objects` (shapes: `[{color, shape, size, bbox}]`), checked
    here: scene accuracy reads `color` and `shape`, grounding `bbox` [x, y, w, h]."""
    objects = image.get("objects")
    if objects is None:
        return None
    if not isinstance(objects, list):
        raise UserError(f"{path}: {where}.objects must be a list, got "
                        f"{type(objects).__name__}")
    for k, o in enumerate(objects):
        at = f"{where}.objects[{k}]"
        _get(o, "color", str, path, at)
        _get(o, "shape", str, path, at)
        box = o.get("bbox")
        if box is not None and not (isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in box)):
            raise UserError(f"{path}: {at}.bbox must be [x, y, w, h] in pixels, got {box!r}")
    return objects


def _check_karpathy_id(path: str, field: Optional[str], i: int, image_id: Any,
                       key: Optional[str], entries: dict, ids: dict) -> None:
    """`UserError` if `images[i]`'s id (its `field`: `cocoid`, else `imgid`; None when it has
    neither and its index stands in) is an earlier entry's of another image file: files merged
    by hand (each numbering `imgid` from 0) gave two images one id in the results file, which
    COCO's evaluation then scores as one image. And if its file is an earlier entry's under
    another id: its captions were merged into one record under the first id (COCO's parser
    refuses one file under two ids too). `entries` (id -> (index, key)) and `ids` (key ->
    (index, field, id)) are updated."""
    if key is None:                       # unsafe paths are refused and counted later
        return
    first, other = entries.setdefault(image_id, (i, key))
    if other != key:
        raise UserError(f"{path}: images[{i}] ({key!r}) and images[{first}] ({other!r}) have "
                        f"the same {field or 'imgid'} {image_id!r}; the results file would "
                        f"give both images one id (files merged by hand?): give every image "
                        f"its own `{field or 'imgid'}`")
    if field is None:                     # no id given: nothing to contradict
        return
    first, first_field, first_id = ids.setdefault(key, (i, field, image_id))
    if (first_field, first_id) != (field, image_id):
        raise UserError(f"{path}: images[{i}] ({field} {image_id!r}) and images[{first}] "
                        f"({first_field} {first_id!r}) are both the file {key!r}; list every "
                        f"image once, with one `{field}`")


def _parse_karpathy(path: str, obj: Any, out: _Collector) -> None:
    obj = _top(obj, path, "Karpathy split")
    images = _get(obj, "images", list, path, "Karpathy split JSON")
    entries = {}                          # image id -> (index, image key) of its first entry
    ids = {}                              # image key -> (index, id field, id) of its first
    firsts = {}                           # image key -> (index, entry) of its first entry
    for i, image in enumerate(images):
        where = f"images[{i}]"
        raw_path = _karpathy_path(image, path, where)
        key = safe_image_key(raw_path)    # None: refused and counted by `out`
        first, entry = firsts.setdefault(key, (i, image)) if key else (i, image)
        # an exact repeat (files joined with an overlap) is one entry, as in COCO's `images`:
        # read twice, its captions weighed double in training and in CIDEr
        if first != i and entry == image:
            continue
        split = _karpathy_split(image, path, where)
        sentences = _get(image, "sentences", list, path, where)
        captions = [_get(s, "raw", str, path, f"{where}.sentences[{k}]")
                    for k, s in enumerate(sentences)]
        objects = _objects(image, path, where)
        id_field = next((f for f in ("cocoid", "imgid") if image.get(f) is not None), None)
        # an integer or a string, as COCO's `id` (a list or an object crashed the duplicate
        # check with a TypeError, and would have been the results file's image_id)
        image_id = i if id_field is None else _get(image, id_field, (int, str), path, where)
        _check_karpathy_id(path, id_field, i, image_id, key, entries, ids)
        out.add(raw_path, captions, where, split=split, image_id=image_id, objects=objects,
                size=_image_size(image), key=key)
        if first != i:  # after `out.add`, which names another split, objects or size
            _refuse_second_entry(path, i, first, key, entry, image, id_field)


def _refuse_second_entry(path: str, i: int, first: int, key: str, entry: dict, image: dict,
                         id_field: Optional[str]) -> None:
    """`images[i]` is another entry of the image of `images[first]` (`entry`), not an exact
    repeat: refused, as COCO's parser refuses two different `images` entries of one id. Merged,
    an image listed twice with its path spelled otherwise (`train2014/` and `train2014`) or
    other `sentids` had each caption read twice, weighing double in training and in CIDEr."""
    differ = sorted(k for k in {**entry, **image} if entry.get(k) != image.get(k))
    ident = f" ({id_field} {image[id_field]!r})" if id_field else ""
    raise UserError(f"{path}: images[{i}] and images[{first}] are both the image {key!r}{ident}, "
                    f"but different entries (they differ in {', '.join(differ)}): its captions "
                    f"would be read twice; list every image once, with all its captions")


def _parse_flickr_token(path: str, text: str, out: _Collector) -> None:
    # IMAGE#N (or (IMAGE, caption) for a name without #N) -> (its caption, line): a line
    # repeated (files joined with an overlap; whitespace around the caption aside) is one
    # caption, another caption of one IMAGE#N (Flickr8k.token.txt joined with its lemma
    # file: both were kept) is refused
    seen = {}
    for number, line in _lines(text):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab:
            raise UserError(f"{path}: line {number}: expected `IMAGE#N<TAB>CAPTION`, got "
                            f"{line[:60]!r} (a line ends at a line feed, CRLF or a bare "
                            f"carriage return)")
        name, stripped = _csv_name(name), caption.strip()
        image = _TOKEN_SUFFIX.sub("", name)
        key = safe_image_key(image)   # (a refused path's lines are left out anyway)
        # by the image as the records key it: `./a.jpg#0` is a.jpg#0, one caption
        same = image if key is None else key
        suffix = name[len(image):]
        ident = same + suffix if suffix else (same, stripped)
        earlier, at = seen.setdefault(ident, (stripped, number))
        if at != number:
            if earlier == stripped:
                if not suffix and key is not None:   # no #N: maybe two annotators' alike
                    out.repeated.append((number, key))   # captions, said (a refused path's
                continue                                 # lines are left out anyway)
            raise UserError(f"{path}: line {number}: {name!r} has another caption here than "
                            f"on line {at} ({stripped[:60]!r}, not {earlier[:60]!r}): an "
                            f"IMAGE#N is one caption (two files joined, such as "
                            f"Flickr8k.token.txt and Flickr8k.lemma.token.txt?); keep one of "
                            f"the lines")
        out.add(image, [caption], f"line {number}", key=key)


def _csv_rows(path: str, text: str) -> Iterator[tuple[int, list[str]]]:
    """(first line number of the row, fields); malformed CSV is a UserError with the line.

    A byte order mark starting a line (files joined with `cat`, each with its BOM) goes
    before the csv module reads it: it took `\\ufeff"image"` for an unquoted field, quotes
    and all (pandas' `quoting=QUOTE_ALL`), so a second header was an image '"image"' and a
    quoted name with a comma three fields. A line inside a quoted field is refused anyway."""
    reader = csv.reader(io.StringIO(_LINE_BOMS.sub("", text), newline=""), strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise UserError(f"{path}: line {start}: malformed CSV ({e}; an unterminated "
                            f"quote?)") from None
        if reader.line_num != start:
            raise UserError(f"{path}: line {start}: a quoted field runs over several lines "
                            f"(to line {reader.line_num}); an unterminated quote?")
        yield start, row


def _csv_name(field: str) -> str:
    """A CSV field without surrounding spaces, nor a byte order mark after them (one that
    starts a line, as a file joined into another by `cat` leaves, `_csv_rows` removed)."""
    return field.strip().lstrip("\ufeff").strip()


def _is_header_row(row: list[str]) -> bool:
    return [_csv_name(f).lower() for f in row] == ["image", "caption"]


def _parse_flickr_csv(path: str, text: str, out: _Collector) -> None:
    rows = ((n, row) for n, row in _csv_rows(path, text) if any(f.strip() for f in row))
    number, header = next(rows, (1, []))
    if not _is_header_row(header):
        raise UserError(f"{path}: line {number}: expected the CSV header `image,caption`, "
                        f"got {','.join(header)[:60]!r}")
    seen = set()  # (image, caption): a row repeated (files joined) is one caption, whitespace
    # around them aside
    for number, row in rows:
        if _is_header_row(row):  # the header of a file joined with `cat`: not an image
            continue
        if len(row) != 2:
            raise UserError(f"{path}: line {number}: expected 2 fields (image,caption), got "
                            f"{len(row)}; quote captions that contain commas")
        key = safe_image_key(row[0])   # (a refused path's rows are left out anyway)
        # by the image as the records key it: `./a.jpg` is a.jpg
        same = (_csv_name(row[0]) if key is None else key, row[1].strip())
        if same in seen:
            if key is not None:
                out.repeated.append((number, key))
            continue
        seen.add(same)
        out.add(row[0], [row[1]], f"line {number}", key=key)


def load_captions(path: str, format: str = "auto") -> CaptionSet:
    """Parse caption file `path` (no split assigned except a Karpathy file's own)."""
    if format not in CAPTION_FORMATS:
        raise UserError(f"unknown caption format {format!r}; supported: auto, {_supported()}")
    text, stamp = _read_file(path)
    obj = None
    if format == "auto":
        format, obj = _sniff(path, text)
    elif format in ("coco", "karpathy"):
        obj = _parse_json(path, text)
    out = _Collector(path)
    if format == "coco":
        _parse_coco(path, obj, out)
    elif format == "karpathy":
        _parse_karpathy(path, obj, out)
    elif format == "flickr-token":
        _parse_flickr_token(path, text, out)
    else:
        _parse_flickr_csv(path, text, out)
    captions = out.finish(format, has_split=format == "karpathy")
    captions.stamp = stamp
    if format not in ("coco", "karpathy"):
        for index, record in enumerate(captions.records):  # index in key order: stable
            record.image_id = index
        for index, record in enumerate(captions.wordless_only, len(captions.records)):
            record.image_id = index  # after the others, whose ids stay as they were
    return captions


def load_dataset(path: str, cfg: DataConfig, lists: bool = True) -> CaptionSet:
    """Parse `path` and give every record a split: the file's own (Karpathy), Flickr8k's
    official lists beside a Flickr8k file (`read_split_lists`; not with `lists=False`: a run
    split by image hash before keeps that split), else `split_images` by image with `cfg`'s
    fractions and seed. `split_source` and `split_note` say which."""
    captions = load_captions(path, cfg.format)
    if captions.has_split:
        return captions
    official = read_split_lists(path) if lists and captions.format in LIST_FORMATS else None
    if official is not None:
        _split_by_lists(captions, *official)
        return captions
    assignment = split_images((r.image for r in captions.records), cfg.val_fraction,
                              cfg.test_fraction, cfg.seed)
    for record in captions.records:
        record.split = assignment[record.image]
    captions.split_source = "hash"
    why = (f"Flickr8k's official lists {LISTS_GLOB} are not beside {path}"
           if captions.format in LIST_FORMATS and not has_split_lists(path)
           else f"{path} has no split of its own")
    captions.split_note = (f"split by image hash (--val-fraction {cfg.val_fraction}, "
                           f"--test-fraction {cfg.test_fraction}, --seed {cfg.seed}): {why}")
    return captions


def _split_list_paths(captions_path: str) -> list[tuple[str, str]]:
    """(split, path) of Flickr8k's official lists beside `captions_path`."""
    folder = os.path.dirname(captions_path)
    return [(split, os.path.join(folder, name)) for split, name in SPLIT_LISTS]


def split_list_path(captions_path: str, split: str) -> str:
    """The path of Flickr8k's official list of `split` ("train", "val": the dev list, "test")
    beside `captions_path`."""
    return dict(_split_list_paths(captions_path))[split]


def has_split_lists(captions_path: str) -> bool:
    """Whether any of Flickr8k's official split lists lies beside `captions_path`."""
    return any(os.path.lexists(p) for _, p in _split_list_paths(captions_path))


def _read_list(path: str) -> str:
    """A split list's text, read as a caption file is (every line end as LF: a list with
    CR-only line ends was one line naming no image); unreadable is a UserError naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, expected Flickr8k's split list (an image name a "
                        f"line)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read Flickr8k's split list ({e.strerror})") from None
    return _universal_newlines(decode_utf8(path, raw))


def read_split_lists(captions_path: str) -> Optional[tuple[dict[str, str], dict]]:
    """(image key -> "train" / "val" / "test", list path -> its image keys in list order) of
    Flickr8k's official lists beside caption file `captions_path` (`SPLIT_LISTS`: the dev
    list is the val split), or None when none of them is there. Without them the README's
    Flickr8k run was split by image hash: the official test and dev images trained on. Some
    of the lists only, a list that cannot be read, an image named in two lists, or a line
    that is no image name (a token file's `a.jpg#0` or a tab: it named no image, dropped
    without a word) are a UserError naming the file."""
    paths = _split_list_paths(captions_path)
    present = [os.path.lexists(p) for _, p in paths]
    if not any(present):
        return None
    if not all(present):
        missing = [p for (_, p), there in zip(paths, present) if not there]
        found = [os.path.basename(p) for (_, p), there in zip(paths, present) if there]
        raise UserError(f"{captions_path}: Flickr8k's official split lists beside it are "
                        f"incomplete: {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} missing (only "
                        f"{' and '.join(found)} {'is' if len(found) == 1 else 'are'} there); "
                        f"put all three beside it, or move them away to split by image hash "
                        f"(--val-fraction, --test-fraction)")
    splits, where = {}, {}   # image key -> split, (list, line) naming it first
    named = {path: [] for _, path in paths}
    for split, path in paths:
        for number, line in _lines(_read_list(path)):
            name = line.strip()
            if not name:
                continue
            if "\t" in name or _TOKEN_SUFFIX.search(name):
                raise UserError(f"{path}: line {number}: expected an image name, got "
                                f"{line[:60]!r}: a Flickr8k split list names one image a "
                                f"line, without `#N` or a tab (those are the caption file's)")
            key = safe_image_key(name) or name   # an unsafe name matches no record
            if key not in where:
                named[path].append(key)
            if splits.setdefault(key, split) != split:
                other, at = where[key]
                raise UserError(f"{path}: line {number}: {name!r} is also in {other} (line "
                                f"{at}): an image must be in one split; remove it from one "
                                f"of the lists")
            where.setdefault(key, (path, number))
    return splits, named


def _split_by_lists(captions: CaptionSet, official: dict[str, str],
                    named: dict[str, list[str]]) -> None:
    """Give `captions`' records the split of Flickr8k's `official` lists (`named`: list path
    -> its image keys); the records in none of them are left out (`unlisted`), and the names
    of a list that are no image of the file are dropped (`unmatched`: a note, as Flickr8k's
    own lists name only its images, but a user's may not), both said in `split_note`."""
    listed = [r for r in captions.records if r.image in official]
    if not listed:
        raise UserError(f"{captions.path}: none of its {len(captions.records)} images is in "
                        f"Flickr8k's official split lists beside it ({LISTS_GLOB}): the "
                        f"lists of another dataset? Move them away to split by image hash")
    captions.unlisted = [r.image for r in captions.records if r.image not in official]
    for record in listed:
        record.split = official[record.image]
    captions.records, captions.split_source = listed, "lists"
    names = [name for _, name in SPLIT_LISTS]
    captions.split_note = (f"split by Flickr8k's official lists beside {captions.path} "
                           f"({names[0]}, {names[1]} as val, {names[2]})")
    if captions.unlisted:
        captions.split_note += (f"; {len(captions.unlisted)} image(s) in none of them are "
                                f"left out{_examples(captions.unlisted[:MAX_EXAMPLES])}")
    known = {r.image for r in captions.records} | set(captions.uncaptioned)
    for path, keys in named.items():
        unmatched = [k for k in keys if k not in known]
        if unmatched:
            captions.unmatched[path] = unmatched
            captions.split_note += (f"; {len(unmatched)} name(s) in {path} are in no caption "
                                    f"data of {captions.path}"
                                    f"{_examples(unmatched[:MAX_EXAMPLES])}")


def refuse_unused_fractions(captions: CaptionSet, cfg: DataConfig,
                            seed_splits_only: bool = False) -> None:
    """--val-fraction / --test-fraction given for a caption file with its own split (Karpathy)
    or split by Flickr8k's official lists beside it would be silently ignored: refused, by
    `train` and `inspect` alike, as a decoding flag given to another method is. So is
    --seed where it only seeds the split (`seed_splits_only`: `inspect`; train's seeds the
    model's initialisation, shuffling and dropout too)."""
    names = ("val_fraction", "test_fraction") + (("seed",) if seed_splits_only else ())
    given = sorted(cfg.given(names))
    if captions.split_source in ("file", "lists") and given:
        flag, value = "--" + given[0].replace("_", "-"), getattr(cfg, given[0])
        whose = (f"{captions.path} is a {captions.format} file whose images carry their "
                 f"split" if captions.split_source == "file" else
                 f"Flickr8k's official lists beside {captions.path} ({LISTS_GLOB}) give its "
                 f"split")
        undo = ("edit the file's splits" if captions.split_source == "file" else
                "move the lists away to split by image hash")
        does = "seeds (in inspect, only) the split of" if given[0] == "seed" else "splits"
        raise UserError(f"{flag} {value} {does} files without a split of their own, but "
                        f"{whose}, which train uses: leave {flag} out (or {undo})")


def split_images(keys: Iterable[str], val_fraction: float, test_fraction: float,
                 seed: int) -> dict[str, str]:
    """Deterministic split by image: key -> "train" / "val" / "test".

    Images are ranked by a hash of (seed, key), so the result does not depend on the order of
    `keys`; the first round(n * test_fraction) go to test, the next round(n * val_fraction) to
    val, the rest to train (`check_fractions` first).
    """
    check_fractions(val_fraction, test_fraction)
    keys = sorted(set(keys))
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{seed}\0{k}".encode()).digest())
    n_test = round(len(ranked) * test_fraction)
    n_val = round(len(ranked) * val_fraction)
    out = {}
    for i, key in enumerate(ranked):
        out[key] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


# --------------------------------------------------------------------------- fingerprint
DIGEST_CHARS = 12  # per-image caption digest kept in split.json: enough to count changes


def _captions_digest(captions: list[str]) -> str:
    return hashlib.sha256(json.dumps(captions, ensure_ascii=False).encode()).hexdigest()


def _truth_digest(record: ImageRecord) -> Optional[str]:
    """Short digest of an image's ground truth for scene accuracy and grounding: its
    `objects` and its size (which places their boxes on the attention grid); None when it
    has no objects."""
    if record.objects is None:
        return None
    size = None if record.size is None else list(record.size)
    text = json.dumps([record.objects, size], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]


def _per_split(digests: dict, splits: dict) -> dict:
    """split -> the short `digests` of its images, in the order of `splits` (None for an
    image without one)."""
    return {s: [digests[k][:DIGEST_CHARS] if k in digests else None for k in keys]
            for s, keys in splits.items()}


def caption_fingerprint(records: Iterable[ImageRecord], splits: dict) -> dict:
    """What a run records of its caption data (split.json `caption_data`): `sha256` over the
    parsed records (every image key with its split and raw captions, in key order; the file's
    path and bytes do not matter, so a moved or reformatted file matches), `unordered_sha256`
    the same with each image's captions sorted (equal when only their order differs), and
    `digests`, a short digest of each image's captions per split, in the order of `splits`
    (None for an image `records` lacks), from which `caption_changes` counts what differs;
    `unordered_digests` the same of each image's captions sorted (its references as a set:
    what `evaluate` compares; runs recorded before it have only `digests`).
    `objects` holds the same per split for the images' ground-truth objects and size
    (`objects_changes`; None for an image without objects), or {} when no image has
    objects; the sha256s leave them out: training does not read them."""
    by_key = {r.image: r for r in records}
    total, unordered = hashlib.sha256(), hashlib.sha256()
    full, as_set = {}, {}
    for key in sorted(by_key):
        record = by_key[key]
        full[key] = _captions_digest(record.captions)
        as_set[key] = _captions_digest(sorted(record.captions))
        total.update(f"{key}\t{record.split}\t{full[key]}\n".encode())
        unordered.update(f"{key}\t{record.split}\t{as_set[key]}\n".encode())
    digests, unordered_digests = _per_split(full, splits), _per_split(as_set, splits)
    truth = {k: _truth_digest(r) for k, r in by_key.items() if r.objects is not None}
    objects = {s: [truth.get(k) for k in keys] for s, keys in splits.items()} if truth else {}
    return {"sha256": total.hexdigest(), "unordered_sha256": unordered.hexdigest(),
            "digests": digests, "unordered_digests": unordered_digests, "objects": objects}


def caption_changes(recorded: dict, splits: dict, records: Iterable[ImageRecord],
                    only: Optional[str] = None) -> Optional[str]:
    """How `records` differ from the caption data a run `recorded` (`caption_fingerprint`,
    with the run's `splits`), e.g. "3 of 40 images have other captions (e.g. 'a.png'), 2 images
    added (e.g. 'b.png')"; None when they are the same. The same captions in another order
    (the file's lines reordered) are said to be that: they change the batches a resume
    replays. With `only` (the references `evaluate` scores against, a set), just that split's
    images: other captions (in any order: `unordered_digests`), or not in `records`; None when
    all are the same. A run recorded before `unordered_digests` has only the digests of each
    image's captions in order: compared in order, unless the whole data is the same in any
    order (`unordered_sha256`; a run recorded before that compares them in order)."""
    by_key = {r.image: r for r in records}
    now = caption_fingerprint(by_key.values(), {})
    if only is None and now["sha256"] == recorded.get("sha256"):
        return None
    reordered = now["unordered_sha256"] == recorded.get("unordered_sha256")
    if only is not None and reordered:
        return None
    as_set = only is not None and isinstance(recorded.get("unordered_digests"), dict)
    digests = recorded.get("unordered_digests" if as_set else "digests")
    digests = digests if isinstance(digests, dict) else {}
    known = {}  # image key -> (split, digest) as recorded; None: not in the data then
    for split, keys in splits.items():
        if only in (None, split):
            known.update((k, (split, d)) for k, d in zip(keys, digests.get(split) or []))
    trained = sorted(k for k in known if known[k][1] is not None)
    kept = [k for k in trained if k in by_key]
    groups = [  # (one, several, image keys)
        ("{n} of {m} images has other captions", "{n} of {m} images have other captions", [
            k for k in kept if _captions_digest(
                sorted(by_key[k].captions) if as_set else by_key[k].captions)[:DIGEST_CHARS]
            != known[k][1]]),
        ("1 image is in another split", "{n} images are in another split",
         [] if only else [k for k in kept if by_key[k].split != known[k][0]]),
        ("1 image added", "{n} images added",
         [] if only else sorted(set(by_key) - set(trained))),
        ("1 image removed", "{n} images removed", [k for k in trained if k not in by_key]),
    ]
    if reordered:  # only the order differs: the images of other captions are the reordered
        keys = groups[0][2]
        return (f"the same captions in another order in {len(keys)} of {len(trained)} images"
                f"{_examples(keys[:1])}, which changes the batches a resume replays")
    parts = [(one if len(keys) == 1 else several).format(n=len(keys), m=len(trained))
             + f" (e.g. {keys[0]!r})" for one, several, keys in groups if keys]
    if only is not None:
        return ", ".join(parts) or None
    return ", ".join(parts) or "the captions differ"


def list_changes(recorded: dict, splits: dict, captions: CaptionSet) -> Optional[str]:
    """For `captions` split by Flickr8k's official lists (`_split_by_lists`), when they differ
    from the caption data a run `recorded` (`caption_fingerprint`, with the run's `splits`)
    only in what the lists say now, how, naming the lists: e.g. "1 image is in another list
    ('a.jpg': train then, Flickr_8k.devImages.txt now), 1 image is in none of them now
    ('b.jpg': test then)"; None when the captions of an image differ, an image is gone from
    the file, or nothing moved (`caption_changes` says what then)."""
    by_key = {r.image: r for r in captions.records}
    digests = recorded.get("digests") if isinstance(recorded.get("digests"), dict) else {}
    was = {}  # image key -> (split, captions digest) as recorded
    for split, keys in splits.items():
        was.update((k, (split, d)) for k, d in zip(keys, digests.get(split) or []))
    unlisted = set(captions.unlisted)
    for key, (_, digest) in was.items():
        if key in by_key and _captions_digest(by_key[key].captions)[:DIGEST_CHARS] != digest \
                or key not in by_key and key not in unlisted:
            return None
    lists = dict(SPLIT_LISTS)
    moved = [k for k in sorted(was) if k in by_key and by_key[k].split != was[k][0]]
    gone = [k for k in sorted(was) if k in unlisted]
    new = [k for k in sorted(by_key) if k not in was]
    parts = [(f"{len(keys)} image{' is' if len(keys) == 1 else 's are'} {what} ({keys[0]!r}: "
              f"{how(keys[0])})") for keys, what, how in (
        (moved, "in another list", lambda k: f"{was[k][0]} then, {lists[by_key[k].split]} now"),
        (gone, "in none of them now", lambda k: f"{was[k][0]} then"),
        (new, "newly listed", lambda k: f"in {lists[by_key[k].split]}")) if keys]
    return ", ".join(parts) or None


def objects_changes(recorded: dict, splits: dict, records: Iterable[ImageRecord],
                    split: str) -> Optional[str]:
    """How the ground-truth objects (and size) of the images of `split` in `records` differ
    from those the run `recorded` (`caption_fingerprint`'s `objects`, with the run's
    `splits`), e.g. "2 of 8 images have other objects (e.g. 'a.png')"; None when they are the
    same, or when the run did not record them (`recorded` has no `objects`: see
    `objects_recorded`). Images gone from `records` are `caption_changes`' news."""
    if not objects_recorded(recorded):
        return None
    by_key = {r.image: r for r in records}
    digests = recorded["objects"].get(split)
    known = dict(zip(splits.get(split, []), digests if isinstance(digests, list) else []))
    kept = [k for k in splits.get(split, []) if k in by_key]
    other = sorted(k for k in kept if _truth_digest(by_key[k]) != known.get(k))
    if not other:
        return None
    verb = "has" if len(other) == 1 else "have"
    return f"{len(other)} of {len(kept)} images {verb} other objects (e.g. {other[0]!r})"


def objects_recorded(recorded: Optional[dict]) -> bool:
    """Whether a run's caption data (`RunFolder.caption_data`) holds the digests of its
    images' ground-truth objects (runs made before they were recorded do not)."""
    return isinstance(recorded, dict) and isinstance(recorded.get("objects"), dict)


# --------------------------------------------------------------------------- statistics
def _percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of a sorted, non-empty list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _caption_lengths(words: dict) -> dict:
    lengths = sorted(len(w) for lists in words.values() for w in lists)
    return {"mean": round(sum(lengths) / len(lengths), 2), "p50": _percentile(lengths, 50),
            "p95": _percentile(lengths, 95), "max": lengths[-1]}


def _missing_images(captions: CaptionSet, images_dir: Optional[str]) -> Optional[dict]:
    if images_dir is None:
        return None
    missing = [r.image for r in captions.records
               if not os.path.isfile(os.path.join(images_dir, r.image))]
    return {"count": len(missing), "examples": missing[:MAX_EXAMPLES]}


def _vocab_size(captions: CaptionSet, words: dict, vocab_cfg: VocabConfig) -> int:
    from caption_attn.vocab import Vocabulary

    train = (w[:vocab_cfg.max_length] for r in captions.split("train")   # as `train` fits it
             for w in words[r.image])
    try:
        return len(Vocabulary.fit_words(train, vocab_cfg.vocab_size, vocab_cfg.min_count))
    except ValueError as e:
        raise UserError(str(e)) from None


def describe(captions_path: str, data_cfg: DataConfig, vocab_cfg: VocabConfig,
             images_dir: Optional[str] = None) -> dict:
    """JSON-able statistics of a caption file (the `inspect` command).

    `vocab_size` counts the 4 special tokens; caption lengths are in words (no start/end).
    """
    if images_dir is not None and not os.path.isdir(images_dir):
        raise UserError(f"--images {images_dir}: " + ("a file, not a folder" if
                        os.path.exists(images_dir) else "images folder not found"))
    from caption_attn.vocab import SPECIAL_TOKENS, tokenize_all

    captions = load_dataset(captions_path, data_cfg)
    refuse_unused_fractions(captions, data_cfg,   # as train does: its split would be shown
                            seed_splits_only=True)
    words = {r.image: tokenize_all(r.captions) for r in captions.records}
    vocab_size = _vocab_size(captions, words, vocab_cfg)
    return {
        "file": captions_path,
        "format": captions.format,
        "images": len(captions.records),
        "captions": captions.num_captions,
        "splits": {s: len(captions.split(s)) for s in SPLITS},
        "split_source": _split_source(captions, data_cfg),
        "skipped_empty_captions": captions.skipped_empty,
        "unlisted_images": {"count": len(captions.unlisted),
                            "examples": captions.unlisted[:MAX_EXAMPLES]},
        "unmatched_list_names": {path: {"count": len(names), "examples": names[:MAX_EXAMPLES]}
                                 for path, names in captions.unmatched.items()},
        "uncaptioned_images": {"count": len(captions.uncaptioned),
                               "examples": captions.uncaptioned[:MAX_EXAMPLES]},
        "refused_paths": {"count": captions.refused_paths,
                          "examples": captions.refused_examples},
        "repeated_rows": {"count": len(captions.repeated),
                          "examples": list(dict.fromkeys(
                              image for _, image in captions.repeated))[:MAX_EXAMPLES]},
        "missing_images": _missing_images(captions, images_dir),
        "vocab_size": vocab_size,
        # a vocabulary of the special tokens alone is refused by `train` (every word <unk>)
        "vocab_note": (f"no word (every one seen fewer than --min-count {vocab_cfg.min_count} "
                       f"times), which `train` refuses"
                       if vocab_size == len(SPECIAL_TOKENS) and captions.split("train")
                       else ""),
        "caption_length": _caption_lengths(words),
    }


def _split_source(captions: CaptionSet, cfg: DataConfig) -> str:
    """How `describe` says the records were split (after "split ")."""
    if captions.split_source == "file":
        return "file"
    if captions.split_source == "lists":
        n = len(captions.unlisted)
        return (f"by Flickr8k's official lists {LISTS_GLOB} beside the file"
                + (f"; {counted(n, 'image')} in none of them left out"
                   f"{_examples(captions.unlisted[:MAX_EXAMPLES])}" if n else "")
                + _unmatched_summary(captions.unmatched))
    return (f"by image hash (val {cfg.val_fraction}, test {cfg.test_fraction}, seed "
            f"{cfg.seed})" + (f": Flickr8k's official lists {LISTS_GLOB} are not beside the "
                              f"file" if captions.format in LIST_FORMATS else ""))


def _unmatched_summary(unmatched: dict[str, list[str]]) -> str:
    """"; 2 names in LIST, 1 name in LIST2 in no caption data (e.g. 'x', 'y')" (the first of
    each list), or "" when every list name is an image of the file."""
    if not unmatched:
        return ""
    counts = ", ".join(f"{counted(len(names), 'name')} in "
                       f"{os.path.basename(path)}" for path, names in unmatched.items())
    firsts = [names[0] for names in unmatched.values()]
    return f"; {counts} in no caption data{_examples(firsts)}"


def _examples(items: list[str]) -> str:
    return f" (e.g. {', '.join(repr(x) for x in items)})" if items else ""


def format_description(stats: dict) -> str:
    """`describe`'s statistics as a compact aligned text report."""
    splits, length = stats["splits"], stats["caption_length"]
    refused, missing = stats["refused_paths"], stats["missing_images"]
    uncaptioned = stats["uncaptioned_images"]
    repeated = stats["repeated_rows"]
    rows = [
        ("file", stats["file"]),
        ("format", stats["format"]),
        ("images", str(stats["images"])),
        ("captions", str(stats["captions"])),
        ("splits", f"train {splits['train']}, val {splits['val']}, test {splits['test']} "
                   f"images (split {stats['split_source']})"),
        ("empty captions", f"{stats['skipped_empty_captions']} skipped"),
        ("no caption", f"{counted(uncaptioned['count'], 'image')} "
                       f"left out{_examples(uncaptioned['examples'])}"),
        ("refused paths", f"{refused['count']}{_examples(refused['examples'])}"),
        *([("repeated rows", f"{repeated['count']} read once"
                             f"{_examples(repeated['examples'])}")]
          if repeated["count"] else []),
        ("missing images", "not checked (no images folder given)" if missing is None
         else f"{missing['count']}{_examples(missing['examples'])}"),
        ("vocabulary", f"{stats['vocab_size']} tokens (train split, incl. 4 special tokens)"
                       + (f": {stats['vocab_note']}" if stats.get("vocab_note") else "")),
        ("caption length", f"mean {length['mean']}, p50 {length['p50']}, p95 "
                           f"{length['p95']}, max {length['max']} words"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
