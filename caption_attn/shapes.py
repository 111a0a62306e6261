"""The built-in synthetic "shapes" dataset: rendering, captions and ground-truth objects.

Each image shows 1-3 filled shapes (circle / square / triangle) in one of five saturated colors
and two sizes on a plain mid-gray background, with five different captions and the objects'
ground truth (`color`, `shape`, `size`, tight `bbox`), so quality checks can compute scene
accuracy (`parse_objects`) and attention grounding (`bbox`).

Design choices, made for a captioner trained for minutes on features of a RANDOM-weight
InceptionV3 (visual differences must be strong and clean):

- Background mid gray (128, 128, 128): every color below differs from it by >= 127 in at least
  two of the three channels, so all five stand out (white would hide yellow, black would hide
  blue and purple). No anti-aliasing: every pixel is either background or exactly one object's
  color, which makes the masks and boxes exact.
- Sizes 0.22 and 0.36 of the image side (66 and 108 px at 299 px, about 1.8 and 2.9 cells of
  the 8x8 feature grid); the large area is over 2.5 times the small one for every shape. A
  linear probe on a random InceptionV3's features told circles, squares and triangles apart
  at 0.86 with sizes 0.12/0.22 and 0.90 with 0.18/0.30 (1,500 images), so bigger shapes it
  is, and larger still for the demo, which meets its targets with these (README, "Results
  on the shapes dataset").
- Boxes are at least `GAP` (0.05 of the side) apart, so objects never touch. No two objects of
  one image share (color, shape), so even a caption without sizes names each object
  unambiguously and a caption's color-shape pairs map back to single objects.
- Two-object scenes state a relation with a clearly dominant axis (|dx| >= 1.5 |dy| for left /
  right and vice versa); positions are reject-sampled from a per-image RNG.
- Captions come from three sentence bodies per object count, each with and without size words
  (six templates); five of the six are picked per image by its RNG, so its five captions
  differ. Objects are always written `[size] color shape`, and in an order that can be read
  off the image, the same in all templates of a scene: three objects left to right; of two
  objects the large one first (with equal sizes the left, or upper, one), the relation being
  the first object's. A decoder then never has to hedge between two objects for the first
  noun phrase (with both orders in the captions, it mixed the attributes of the two).

Same seed -> byte-identical PNGs and JSON: image `i` depends only on
`np.random.default_rng([seed, i])`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import re
import shutil
import stat
import string
import time
from typing import Optional

import cv2
import numpy as np

from caption_attn.config import ShapesConfig
from caption_attn.fileio import read_json, write_bytes_atomic, write_json_atomic
from caption_attn.data import split_images
from caption_attn.errors import UserError

BACKGROUND = (128, 128, 128)          # BGR mid gray (see the module docstring)
COLORS = {                            # name -> BGR, saturated and far apart
    "red": (0, 0, 255),
    "green": (0, 200, 0),
    "blue": (255, 0, 0),
    "yellow": (0, 255, 255),
    "purple": (255, 0, 170),
}
SHAPES = ("circle", "square", "triangle")
# name -> side of the shape's box / image side. A random backbone tells shapes apart better
# the more 8x8 cells an object covers (README, "Results on the shapes dataset").
SIZES = {"small": 0.22, "large": 0.36}
RELATIONS = ("left of", "right of", "above", "below")  # objects[0] relative to objects[1]

MAX_OBJECTS = 3
CAPTIONS_PER_IMAGE = 5
GAP = 0.05           # smallest gap between two objects' boxes, fraction of the image side
BORDER = 0.03        # smallest gap between a box and the image edge, fraction of the side
DOMINANCE = 1.5      # a relation's axis offset must be >= DOMINANCE x the other axis offset
ORDER_GAP = 0.10     # 3-object scenes: centers this far apart in x, so left-to-right is clear
MAX_TRIES = 10_000   # placement attempts before giving up (typical scenes need < 20)
PNG_COMPRESSION = 3  # cv2 PNG level: fast, and the flat images compress well anyway
MIN_IMAGE_SIZE = 64
DATASET_NAME = "shapes"

_PHRASES = {"left of": "to the left of", "right of": "to the right of",
            "above": "above", "below": "below"}

# Sentence bodies per object count. {a} {b} {c}: objects in reading order; {s} {o}: subject and
# object of the relation ({rel}: its phrase). Each body is used with and without size words,
# giving 2 x 3 = 6 templates per count.
TEMPLATES = {
    1: ("a {a}",
        "there is a {a}",
        "a picture of a {a}"),
    2: ("a {s} {rel} a {o}",
        "a picture of a {s} {rel} a {o}",
        "there is a {s} and a {o}"),
    3: ("a {a} a {b} and a {c}",
        "there are three shapes a {a} a {b} and a {c}",
        "a picture of a {a} a {b} and a {c}"),
}


# --------------------------------------------------------------------------- words
def caption_words() -> list[str]:
    """Every word the templates can produce, sorted."""
    words = set(COLORS) | set(SHAPES) | set(SIZES)
    for phrase in _PHRASES.values():
        words.update(phrase.split())
    for bodies in TEMPLATES.values():
        for body in bodies:
            for literal, _, _, _ in string.Formatter().parse(body):
                words.update(literal.split())
    return sorted(words)


def object_positions(words: list[str]) -> list[tuple[int, int]]:
    """(color index, shape index) of every object named in `words`: a color word followed by
    a shape word, with at most one size word in between (tolerates "red large circle" from a
    model; the templates write "large red circle")."""
    pairs = []
    for i, word in enumerate(words):
        if word not in COLORS:
            continue
        j = i + 1
        if j < len(words) and words[j] in SIZES:
            j += 1
        if j < len(words) and words[j] in SHAPES:
            pairs.append((i, j))
    return pairs


def parse_objects(caption: str) -> list[tuple[str, str]]:
    """The (color, shape) pairs a caption names, in order (see `object_positions`).

    >>> parse_objects("a large red circle to the left of a blue square")
    [('red', 'circle'), ('blue', 'square')]
    """
    words = caption.lower().split()
    return [(words[i], words[j]) for i, j in object_positions(words)]


# --------------------------------------------------------------------------- geometry
def _center(box) -> tuple[float, float]:
    x, y, w, h = box
    return x + w / 2, y + h / 2


def relation_between(box_a, box_b) -> Optional[str]:
    """Where box `a` ([x, y, w, h]) is relative to box `b`, or None when no axis dominates
    (the offset along one axis must be >= `DOMINANCE` x the offset along the other)."""
    (ax, ay), (bx, by) = _center(box_a), _center(box_b)
    dx, dy = ax - bx, ay - by
    if abs(dx) > 0 and abs(dx) >= DOMINANCE * abs(dy):
        return "left of" if dx < 0 else "right of"
    if abs(dy) > 0 and abs(dy) >= DOMINANCE * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def _separated(a, b, gap: int) -> bool:
    """Whether boxes `a` and `b` are at least `gap` pixels apart along some axis."""
    gap_x = max(a[0] - (b[0] + b[2]), b[0] - (a[0] + a[2]))
    gap_y = max(a[1] - (b[1] + b[3]), b[1] - (a[1] + a[3]))
    return max(gap_x, gap_y) >= gap


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, side: int) -> np.ndarray:
    """Boolean mask of a filled `shape` in a `side` x `side` box, cropped to its pixels."""
    canvas = np.zeros((side, side), np.uint8)
    last = side - 1
    if shape == "circle":
        radius = last // 2
        cv2.circle(canvas, (radius, radius), radius, 1, thickness=-1, lineType=cv2.LINE_8)
    elif shape == "square":
        cv2.rectangle(canvas, (0, 0), (last, last), 1, thickness=-1, lineType=cv2.LINE_8)
    elif shape == "triangle":  # upright, base = height = side
        points = np.array([[last // 2, 0], [0, last], [last, last]], np.int32)
        cv2.fillPoly(canvas, [points], 1, lineType=cv2.LINE_8)
    else:
        raise ValueError(f"`shape` must be one of {SHAPES}, got {shape!r}")
    ys, xs = np.nonzero(canvas)
    mask = canvas[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(bool)
    mask.flags.writeable = False  # shared by the cache
    return mask


def _side(size: str, image_size: int) -> int:
    return max(3, round(SIZES[size] * image_size))


# --------------------------------------------------------------------------- scenes
def _sample_objects(rng: np.random.Generator, count: int) -> list[dict]:
    """`count` objects with distinct (color, shape)."""
    colors, sizes = list(COLORS), list(SIZES)
    objects: list[dict] = []
    while len(objects) < count:
        obj = {"color": colors[rng.integers(len(colors))],
               "shape": SHAPES[rng.integers(len(SHAPES))],
               "size": sizes[rng.integers(len(sizes))]}
        if all((o["color"], o["shape"]) != (obj["color"], obj["shape"]) for o in objects):
            objects.append(obj)
    return objects


def _placement_ok(boxes: list, relation: Optional[str], image_size: int) -> bool:
    gap = round(GAP * image_size)
    if not all(_separated(a, b, gap) for i, a in enumerate(boxes) for b in boxes[i + 1:]):
        return False
    if relation is not None:
        return relation_between(boxes[0], boxes[1]) == relation
    if len(boxes) == MAX_OBJECTS:
        xs = sorted(_center(b)[0] for b in boxes)
        return all(x1 - x0 >= ORDER_GAP * image_size for x0, x1 in zip(xs, xs[1:]))
    return True


def _place(rng: np.random.Generator, dims: list, relation: Optional[str],
           image_size: int) -> list[list[int]]:
    """Reject-sample top-left corners for boxes of `dims` [(w, h)]; returns [x, y, w, h]."""
    border = round(BORDER * image_size)
    for _ in range(MAX_TRIES):
        boxes = [[int(rng.integers(border, image_size - border - w + 1)),
                  int(rng.integers(border, image_size - border - h + 1)), w, h]
                 for w, h in dims]
        if _placement_ok(boxes, relation, image_size):
            return boxes
    raise RuntimeError(f"no placement found for boxes {dims} in {image_size} px "
                       f"after {MAX_TRIES} tries")


def sample_scene(rng: np.random.Generator, image_size: int) -> tuple[list[dict], Optional[str]]:
    """Objects with `bbox` (tight, integer pixels) and the relation of objects[0] to
    objects[1] (two-object scenes, see `_subject_first`; else None). Three objects are listed
    left to right."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    objects = _sample_objects(rng, count)
    relation = RELATIONS[rng.integers(len(RELATIONS))] if count == 2 else None
    masks = [shape_mask(o["shape"], _side(o["size"], image_size)) for o in objects]
    dims = [(m.shape[1], m.shape[0]) for m in masks]
    for obj, box in zip(objects, _place(rng, dims, relation, image_size)):
        obj["bbox"] = box
    if count == MAX_OBJECTS:
        objects.sort(key=lambda o: _center(o["bbox"])[0])
    if count == 2:
        objects = _subject_first(objects, relation)
        relation = relation_between(objects[0]["bbox"], objects[1]["bbox"])
    return objects, relation


def _subject_first(objects: list[dict], relation: str) -> list[dict]:
    """The pair ordered so a caption's first object is predictable from the image: the large
    one, or with equal sizes the first in reading order."""
    axis = 1 if relation in ("above", "below") else 0
    return sorted(objects, key=lambda o: (o["size"] != "large", _center(o["bbox"])[axis]))


def render(objects: list[dict], image_size: int) -> np.ndarray:
    """BGR uint8 image (image_size, image_size, 3) of `objects` on the background."""
    image = np.empty((image_size, image_size, 3), np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        x, y, w, h = obj["bbox"]
        mask = shape_mask(obj["shape"], _side(obj["size"], image_size))  # (h, w)
        image[y:y + h, x:x + w][mask] = COLORS[obj["color"]]
    return image


# --------------------------------------------------------------------------- captions
def _words(obj: dict, with_size: bool) -> str:
    name = f"{obj['color']} {obj['shape']}"
    return f"{obj['size']} {name}" if with_size else name


def make_captions(objects: list[dict], relation: Optional[str],
                  rng: np.random.Generator) -> list[str]:
    """`CAPTIONS_PER_IMAGE` different captions: templates picked by `rng`, in template order."""
    variants = [(body, with_size) for body in TEMPLATES[len(objects)]
                for with_size in (True, False)]
    picks = sorted(rng.choice(len(variants), CAPTIONS_PER_IMAGE, replace=False))
    captions = []
    for k in picks:
        body, with_size = variants[k]
        slots = dict(zip("abc", (_words(o, with_size) for o in objects)))
        if relation is not None:
            slots.update(s=_words(objects[0], with_size), o=_words(objects[1], with_size),
                         rel=_PHRASES[relation])
        captions.append(body.format(**slots))
    assert len(set(captions)) == len(captions), captions
    return captions


# --------------------------------------------------------------------------- dataset
def filename(index: int, num_images: int) -> str:
    """`shape_00000.png`; more digits only past 100,000 images."""
    digits = max(5, len(str(num_images - 1)))
    return f"shape_{index:0{digits}d}.png"


def make_example(index: int, seed: int, image_size: int) -> tuple[np.ndarray, dict]:
    """Image `index` of the dataset of `seed`: (BGR image, record without file name/split)."""
    rng = np.random.default_rng([seed, index])
    objects, relation = sample_scene(rng, image_size)
    captions = make_captions(objects, relation, rng)
    record = {
        "sentences": [{"raw": c, "tokens": c.split()} for c in captions],
        "objects": [{"color": o["color"], "shape": o["shape"], "size": o["size"],
                     "bbox": o["bbox"]} for o in objects],
        "relation": relation,
    }
    return render(objects, image_size), record


def _write_png(path: str, image: np.ndarray) -> None:
    """Encode and write via a temporary file, so a crash leaves no truncated PNG."""
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise RuntimeError(f"cv2 could not encode {path}")
    write_bytes_atomic(path, buf.tobytes())


def _prepare(out_dir: str, replace: bool) -> tuple[str, str]:
    """Create OUT/images. A folder that already holds files is refused, unless `replace` and
    it holds only a dataset of this command (images/ and captions.json, and the temporary
    file of a captions.json a kill cut short), which is deleted first: new images must never
    mix with old ones, nor an old captions.json describe them."""
    images_dir = os.path.join(out_dir, "images")
    captions = os.path.join(out_dir, "captions.json")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir}: exists and is not a folder")
    present = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if present and not replace:
        raise UserError(f"{out_dir}: not empty ({', '.join(present[:3])}"
                        f"{' ...' if len(present) > 3 else ''}); choose an empty or new "
                        f"folder, or add --replace to delete the dataset made there before")
    temps = [name for name in present if _own_file(out_dir, name, _OWN_CAPTIONS_TEMP)]
    others = [name for name in present
              if name not in ("images", "captions.json") and name not in temps]
    if others:
        raise UserError(f"{out_dir}: holds files that are not a shapes dataset "
                        f"({', '.join(others[:3])}); --replace only deletes images/ and "
                        f"captions.json: choose an empty or new folder")
    _check_made_here(out_dir, images_dir, captions)
    try:
        for name in temps:
            os.remove(os.path.join(out_dir, name))
        if os.path.exists(captions):
            os.remove(captions)
        if os.path.isdir(images_dir):
            shutil.rmtree(images_dir)
        os.makedirs(images_dir)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot write the dataset there ({e.strerror})") from None
    return images_dir, captions


# an image, or fileio's temporary file of one (`.shape_N.png.tmp.<pid>.<host>`, left by a
# killed run); the whole name, so `shape_00003.png.orig` or `shape_1.png.backup/` is not ours
_OWN_IMAGE = re.compile(r"shape_\d+\.png|\.shape_\d+\.png\.tmp\.\d+\..+")
# fileio's temporary file of captions.json (`write_json_atomic`), left by a run killed while
# writing it (seconds for 100k+ images, all drawn by then)
_OWN_CAPTIONS_TEMP = re.compile(r"\.captions\.json\.tmp\.\d+\..+")


def _own_file(folder: str, name: str, pattern: re.Pattern) -> bool:
    """Whether `folder`/`name` is one make-shapes wrote: a regular file (not a folder, nor a
    link, whose name proves nothing of what it holds) whose whole name `pattern` matches."""
    return bool(pattern.fullmatch(name)) and \
        stat.S_ISREG(os.lstat(os.path.join(folder, name)).st_mode)


def _check_made_here(out_dir: str, images_dir: str, captions: str) -> None:
    """`UserError` unless OUT/images and OUT/captions.json are (what is left of) a dataset of
    this command: images named shape_N.png, a captions.json of dataset "shapes". A dataset
    of one's own in the same layout is never deleted by --replace."""
    if os.path.exists(captions):
        try:
            saved = read_json(captions)
        except UserError:  # unreadable or not JSON: not ours
            saved = None
        own = isinstance(saved, dict) and saved.get("dataset") == DATASET_NAME
        if not own:
            raise UserError(f"{captions}: not written by make-shapes (no \"dataset\": "
                            f"\"{DATASET_NAME}\"); --replace only deletes a dataset it made: "
                            f"choose an empty or new folder")
    if os.path.islink(images_dir):
        # rmtree refuses a link only after captions.json was deleted, and its target is
        # someone's folder, not one this command made
        raise UserError(f"{images_dir}: a link, not make-shapes' images folder; choose an "
                        f"empty or new folder")
    if os.path.isdir(images_dir):
        others = sorted(n for n in os.listdir(images_dir)
                        if not _own_file(images_dir, n, _OWN_IMAGE))
        if others:
            raise UserError(f"{out_dir}: images/{others[0]} was not made by make-shapes; "
                            f"--replace only deletes a dataset it made: choose an empty or "
                            f"new folder")
    elif os.path.exists(images_dir):
        raise UserError(f"{images_dir}: a file, not make-shapes' images folder; choose an "
                        f"empty or new folder")


def names_and_splits(cfg: ShapesConfig) -> tuple[list[str], dict]:
    """The file names of the dataset `cfg` renders, in order, and each one's split (the
    demo checks a dataset it reuses against them)."""
    names = [filename(i, cfg.num_images) for i in range(cfg.num_images)]
    return names, split_images(names, cfg.val_fraction, cfg.test_fraction, cfg.seed)


def make_shapes(out_dir: str, cfg: ShapesConfig) -> dict:
    """Render the dataset into `OUT/images/shape_*.png` and `OUT/captions.json` (Karpathy
    layout plus `objects` and `relation` per image). Images are written first, the JSON last
    (atomically), so a captions.json never points to missing images.

    Returns {"images": n, "images_dir": ..., "captions": path of the JSON, "seconds": wall,
    "notes": [a line for each split asked for that got no image]}.
    """
    start = time.perf_counter()
    images_dir, captions_path = _prepare(out_dir, cfg.replace)
    names, splits = names_and_splits(cfg)

    def work(index: int) -> dict:
        image, record = make_example(index, cfg.seed, cfg.image_size)
        _write_png(os.path.join(images_dir, names[index]), image)
        return {"filename": names[index], "imgid": index, "split": splits[names[index]],
                "width": cfg.image_size, "height": cfg.image_size, **record}

    # cv2 releases the GIL while drawing and encoding; map() keeps index order, and every
    # image depends only on (seed, index), so the output does not depend on the threads.
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            records = list(pool.map(work, range(cfg.num_images)))
        write_json_atomic(captions_path, {"dataset": DATASET_NAME, "images": records})
    except BaseException:
        # stopped (Ctrl-C, SIGTERM, an error) before captions.json was written: the images
        # drawn so far go, so the same command can run again (it refused a folder holding
        # part of a dataset, without --replace)
        if not os.path.exists(captions_path):
            shutil.rmtree(images_dir, ignore_errors=True)
        raise
    return {"images": cfg.num_images, "images_dir": images_dir, "captions": captions_path,
            "seconds": time.perf_counter() - start, "notes": empty_split_notes(cfg, splits)}


def empty_split_notes(cfg: ShapesConfig, splits: dict) -> list[str]:
    """A note for each split asked for (a fraction above 0) that got no image: a few images
    round it to none (round(5 x 0.1) = 0), which made a dataset without val and test images
    without a word, found only by train or evaluate; and one when train got none."""
    notes = []
    if "train" not in splits.values():
        notes.append(f"--num-images {cfg.num_images} leaves the train split no image (val "
                     f"and test take them all): use more images or smaller --val-fraction / "
                     f"--test-fraction")
    for split in ("val", "test"):
        fraction = getattr(cfg, f"{split}_fraction")
        if fraction > 0 and split not in splits.values():
            enough = math.floor(0.5 / fraction)   # round(n x f) >= 1 from n x f > 0.5
            while round(enough * fraction) < 1:    # (0.5 / f rounded down, in floats)
                enough += 1
            notes.append(f"--num-images {cfg.num_images} gives the {split} split no image "
                         f"(round({cfg.num_images} x {fraction:g}) = 0): use --num-images "
                         f"{enough} or more, or a larger --{split}-fraction")
    return notes
