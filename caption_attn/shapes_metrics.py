"""Metrics of the shapes dataset: scene accuracy and attention grounding; no TensorFlow needed.

Inputs are dicts keyed by anything hashable (image key): `captions` maps a key to one
generated caption, `words` to its words, `attention` to its (T, grid * grid) attention and
`objects` to the image's ground-truth objects (`shapes.py`: color, shape, size, bbox).
"""

from __future__ import annotations

import collections
from typing import Hashable, Optional, Union

import numpy as np

from caption_attn.backbone import GRID
from caption_attn.shapes import COLORS, SHAPES, object_positions, parse_objects
from caption_attn.vocab import tokenize

# "scene_images" / "grounding_images": how many images each was computed over (those with
# ground-truth objects; for grounding, those with their size too)
SHAPES_METRICS = ("scene_accuracy", "scene_images", "grounding", "grounding_images",
                  "grounded_words", "matched_words")
GROUNDING_REACH = 1    # a word is grounded if its attention peak is <= this many cells away

Key = Hashable


def _objects_of(objects: dict, key: Key) -> list[dict]:
    objs = objects.get(key)
    if not isinstance(objs, list):
        raise ValueError(f"`objects`[{key!r}] must be a list of ground-truth objects (a "
                         f"shapes dataset), got {objs!r}")
    return objs


def _scene_correct(caption: str, objs: list[dict]) -> bool:
    """Whether `caption` names exactly the objects of `objs`, each once, and nothing else."""
    words = tokenize(caption)
    named = collections.Counter(parse_objects(" ".join(words)))
    truth = collections.Counter((o["color"], o["shape"]) for o in objs)
    n_colors = sum(w in COLORS for w in words)
    n_shapes = sum(w in SHAPES for w in words)
    return named == truth and n_colors == n_shapes == len(objs)


def scene_accuracy(captions: dict[Key, str], objects: dict[Key, list[dict]]) -> float:
    """Fraction of images whose caption names exactly the (color, shape) multiset of the
    image's objects and no other color or shape word (captions are `standardize`d first)."""
    if not captions:
        raise ValueError("`captions` is empty: nothing to score")
    correct = sum(_scene_correct(c, _objects_of(objects, k)) for k, c in captions.items())
    return correct / len(captions)


def scene_accuracy_by_objects(captions: dict[Key, str],
                              objects: dict[Key, list[dict]]) -> dict[str, float]:
    """`scene_accuracy` of the images with 1, 2, 3, ... objects: {"1": ..., "2": ...}."""
    groups: dict = collections.defaultdict(list)
    for key, caption in captions.items():
        objs = _objects_of(objects, key)
        groups[str(len(objs))].append(_scene_correct(caption, objs))
    return {n: sum(ok) / len(ok) for n, ok in sorted(groups.items(), key=lambda g: int(g[0]))}


def _cells(bbox, height: float, width: float, grid: int) -> tuple[int, int, int, int]:
    """(first row, last row, first col, last col) of the grid cells box [x, y, w, h] overlaps
    with positive area; cell (r, c) covers rows r*H/grid..(r+1)*H/grid."""
    x, y, w, h = bbox
    def span(start, size, extent):
        first = int(np.floor(start * grid / extent))
        last = int(np.ceil((start + size) * grid / extent)) - 1
        return min(max(first, 0), grid - 1), min(max(last, first, 0), grid - 1)
    (r0, r1), (c0, c1) = span(y, h, height), span(x, w, width)
    return r0, r1, c0, c1


def _near(position: int, cells: tuple[int, int, int, int], grid: int) -> bool:
    """Whether attention `position` (r * grid + c) is within `GROUNDING_REACH` cells
    (Chebyshev) of the cell block `cells`."""
    r, c = divmod(position, grid)
    r0, r1, c0, c1 = cells
    return max(r0 - r, 0, r - r1, c0 - c, 0, c - c1) <= GROUNDING_REACH


def _word_targets(words: list[str], objs: list[dict]) -> dict[int, list[dict]]:
    """Word index -> candidate objects, for each color or shape word matching an object.

    A word of a parsed (color, shape) pair that names objects -> those objects (two red
    circles: either). Any other color word -> every object of that color (grounded if near
    any). Any other shape word -> none (not scored).
    """
    by_pair: dict[tuple, list[dict]] = {}
    for o in objs:
        by_pair.setdefault((o["color"], o["shape"]), []).append(o)
    targets: dict[int, list[dict]] = {}
    for i, j in object_positions(words):
        same = by_pair.get((words[i], words[j]))
        if same:
            targets[i] = targets[j] = same
    for i, word in enumerate(words):
        if word in COLORS and i not in targets:
            same_color = [o for o in objs if o["color"] == word]
            if same_color:
                targets[i] = same_color
    return targets


def _image_hw(image_size, key: Key) -> tuple[float, float]:
    size = image_size[key] if isinstance(image_size, dict) else image_size
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > 0:
        return float(size), float(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and min(size) > 0:
        return float(size[0]), float(size[1])
    raise ValueError(f"`image_size` must be a positive int or (height, width) per key, got "
                     f"{size!r} for {key!r}")


def _grounding_counts(words: dict, attention: dict, objects: dict, image_size,
                      grid: int) -> tuple[int, int]:
    """(grounded words, matched words) over all images of `words`."""
    grounded = matched = 0
    for key, ws in words.items():
        attn = np.asarray(attention[key])  # (T, grid * grid)
        if attn.ndim != 2 or attn.shape[1] != grid * grid or attn.shape[0] < len(ws):
            raise ValueError(f"`attention`[{key!r}] must have shape (T >= {len(ws)} words, "
                             f"{grid * grid}), got {attn.shape}")
        height, width = _image_hw(image_size, key)
        for t, candidates in _word_targets(list(ws), _objects_of(objects, key)).items():
            candidates = [o for o in candidates if o.get("bbox") is not None]
            if not candidates:  # ground truth without boxes: nothing to ground against
                continue
            peak = int(np.argmax(attn[t]))
            matched += 1
            grounded += any(_near(peak, _cells(o["bbox"], height, width, grid), grid)
                            for o in candidates)
    return grounded, matched


def grounding_score(words: dict[Key, list[str]], attention: dict[Key, np.ndarray],
                    objects: dict[Key, list[dict]],
                    image_size: Union[int, dict[Key, tuple[int, int]]],
                    grid: int = GRID) -> Optional[float]:
    """Fraction of generated color/shape words whose attention peak lies on their object.

    For each word t of `words[key]` that matches an object (see `_word_targets`), the argmax
    of `attention[key][t]` (row t: the step that produced word t; position p = r * grid + c)
    must be within one cell (Chebyshev distance <= 1) of the cells the object's `bbox`
    [x, y, w, h] (pixels of an image of `image_size`: int side, or (height, width) per key)
    overlaps. None when no word matched an object.
    """
    grounded, matched = _grounding_counts(words, attention, objects, image_size, grid)
    return grounded / matched if matched else None


def shapes_metrics(captions: dict[Key, str], words: dict[Key, list[str]],
                   attention: dict[Key, np.ndarray], objects: dict[Key, list[dict]],
                   image_size, grid: int = GRID) -> dict:
    """{"scene_accuracy" over the images of `captions`, "scene_images" (their count),
    "grounding" over the images of `words` (None if no word matched), "grounding_images"
    (their count), "grounded_words" (words on their object), "matched_words" (color/shape
    words matching an object)}. `words` may hold fewer images than `captions`: grounding
    needs each image's size, scene accuracy does not."""
    grounded, matched = _grounding_counts(words, attention, objects, image_size, grid)
    return {"scene_accuracy": scene_accuracy(captions, objects), "scene_images": len(captions),
            "grounding": grounded / matched if matched else None,
            "grounding_images": len(words), "grounded_words": grounded,
            "matched_words": matched}
