"""Tests of the shapes-dataset metrics (caption_attn/shapes_metrics.py)."""

import subprocess
import sys

import numpy as np
import pytest

from caption_attn import shapes_metrics


# --------------------------------------------------------------------------- scene accuracy
RED_CIRCLE = {"color": "red", "shape": "circle", "size": "small", "bbox": [30, 20, 10, 10]}
BLUE_SQUARE = {"color": "blue", "shape": "square", "size": "large", "bbox": [0, 60, 20, 20]}
GREEN_TRIANGLE = {"color": "green", "shape": "triangle", "size": "small",
                  "bbox": [65, 5, 10, 10]}


@pytest.mark.parametrize("caption, correct", [
    ("a red circle to the left of a blue square", True),
    ("there is a large blue square and a small red circle", True),   # order and sizes free
    ("A blue square, and a red circle.", True),                       # standardized first
    ("a red circle", False),                                          # missing object
    ("a red circle a blue square and a green triangle", False),       # extra object
    ("a red circle and a green square", False),                       # wrong color
    ("a red circle a red circle and a blue square", False),           # repeated object
    ("a red blue square and a red circle", False),                    # stray color word
    ("a red circle next to a blue square triangle", False),           # stray shape word
])
def test_scene_accuracy_cases(caption, correct):
    objects = {"k": [RED_CIRCLE, BLUE_SQUARE]}
    assert shapes_metrics.scene_accuracy({"k": caption}, objects) == float(correct)


def test_scene_accuracy_fraction_and_three_objects():
    objects = {1: [RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE], 2: [RED_CIRCLE], 3: [BLUE_SQUARE],
               4: [GREEN_TRIANGLE]}
    captions = {1: "there are three shapes a blue square a large red circle and a green "
                   "triangle", 2: "a picture of a red circle", 3: "a red square",
                4: "a green triangle and a blue square"}
    assert shapes_metrics.scene_accuracy(captions, objects) == 0.5
    with pytest.raises(ValueError, match=r"`objects`\[5\]"):
        shapes_metrics.scene_accuracy({5: "a red circle"}, objects)


# --------------------------------------------------------------------------- grounding
SIZE = 80  # 10 px per cell: RED_CIRCLE covers cell (2, 3) only, BLUE_SQUARE rows 6-7, cols 0-1


def _one_hot(*cells) -> np.ndarray:
    """Attention (T, 64) peaking at one (row, col) per step; other positions get noise."""
    attn = np.random.default_rng(0).uniform(0, 0.01, (len(cells), 64))
    for t, (r, c) in enumerate(cells):
        attn[t, r * 8 + c] = 1.0
    return attn


def _ground(words: str, cells, objects, image_size=SIZE):
    return shapes_metrics.grounding_score({"k": words.split()}, {"k": _one_hot(*cells)},
                                          {"k": objects}, image_size)


def test_grounding_right_cell_one_off_two_off():
    words = "a red circle"
    assert _ground(words, [(0, 0), (2, 3), (2, 3)], [RED_CIRCLE]) == 1.0
    assert _ground(words, [(0, 0), (3, 4), (1, 2)], [RED_CIRCLE]) == 1.0   # diagonal: counts
    assert _ground(words, [(0, 0), (2, 5), (2, 3)], [RED_CIRCLE]) == 0.5   # 2 cells off: no
    assert _ground(words, [(0, 0), (4, 3), (0, 1)], [RED_CIRCLE]) == 0.0
    # The box ends exactly at pixel 40 = the start of column 4: it does not reach column 4,
    # so column 5 stays two cells away.
    assert _ground("red", [(2, 5)], [RED_CIRCLE]) == 0.0


def test_grounding_only_scores_words_matching_an_object():
    # "square" belongs to (red, square), which is no object: not scored. "red" falls back to
    # the red circle. "the"/"of" are never scored.
    assert _ground("a red square", [(0, 0), (2, 3), (7, 7)], [RED_CIRCLE]) == 1.0
    assert _ground("a blue triangle", [(0, 0)] * 3, [RED_CIRCLE]) is None


def test_grounding_three_objects_and_counts():
    objects = [BLUE_SQUARE, RED_CIRCLE, GREEN_TRIANGLE]
    words = "a blue square a red circle and a green triangle".split()
    cells = [(0, 0), (7, 0), (5, 2),     # blue, square: on the box / one row above it
             (0, 0), (2, 3), (4, 3),     # red: on it; circle: two rows below -> no
             (0, 0), (0, 0), (0, 6), (1, 7)]  # green / triangle: on it
    attention = {"k": _one_hot(*cells, (0, 0))}  # one extra row: the <end> step
    score = shapes_metrics.grounding_score({"k": words}, attention, {"k": objects}, SIZE)
    assert score == 5 / 6
    out = shapes_metrics.shapes_metrics({"k": " ".join(words)}, {"k": words}, attention,
                                        {"k": objects}, SIZE)
    assert out == {"scene_accuracy": 1.0, "scene_images": 1, "grounding": 5 / 6,
                   "grounding_images": 1, "grounded_words": 5, "matched_words": 6}


def test_grounding_two_objects_of_one_color_and_shape():
    # Each mention of "red circle" may land on either red circle: the second circle alone
    # was kept, and a mention on the first one (perfect attention) counted as missed.
    far = {**RED_CIRCLE, "bbox": [65, 65, 10, 10]}                  # cells (6..7, 6..7)
    words = "a red circle and a red circle"
    cells = [(0, 0), (2, 3), (2, 3), (0, 0), (0, 0), (7, 7), (7, 7)]
    assert _ground(words, cells, [RED_CIRCLE, far]) == 1.0
    assert _ground(words, cells, [far, RED_CIRCLE]) == 1.0
    assert _ground("a red circle", [(0, 0), (5, 0), (5, 0)], [RED_CIRCLE, far]) == 0.0


def test_grounding_per_image_height_width():
    # 80 rows x 160 columns: cells are 10 px tall and 20 px wide, so x = 30..40 is column 1.
    size = {"k": (80, 160)}
    assert _ground("red circle", [(2, 1), (2, 2)], [RED_CIRCLE], size) == 1.0
    assert _ground("red circle", [(2, 3), (2, 3)], [RED_CIRCLE], size) == 0.0


def test_grounding_checks_attention_shape():
    with pytest.raises(ValueError, match=r"`attention`\['k'\] must have shape"):
        shapes_metrics.grounding_score({"k": ["a", "red", "circle"]},
                                       {"k": np.zeros((2, 64))}, {"k": [RED_CIRCLE]}, SIZE)


def test_importing_needs_no_tensorflow():
    """Scoring stays usable (and quick to import) where TensorFlow and Keras are not."""
    code = ("import sys, caption_attn.shapes_metrics; "
            "loaded = {'tensorflow', 'keras'} & set(sys.modules); assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_scene_accuracy_by_number_of_objects():
    objects = {"one": [RED_CIRCLE], "two": [BLUE_SQUARE, RED_CIRCLE],
               "two_b": [BLUE_SQUARE, GREEN_TRIANGLE]}
    captions = {"one": "a red circle", "two": "a blue square and a red circle",
                "two_b": "a blue square and a red triangle"}
    assert shapes_metrics.scene_accuracy_by_objects(captions, objects) == {"1": 1.0,
                                                                           "2": 0.5}


def test_grounding_leaves_out_objects_without_a_box():
    """Ground truth without `bbox` (a Karpathy file's objects may have none) raised KeyError
    after the whole split was decoded; such objects are not grounded against."""
    words = {"k": ["a", "red", "circle", "and", "a", "blue", "square"]}
    attention = {"k": np.full((7, 64), 1 / 64)}
    no_box = {k: v for k, v in BLUE_SQUARE.items() if k != "bbox"}
    with_box = shapes_metrics.grounding_score(words, attention, {"k": [RED_CIRCLE]}, 100)
    assert shapes_metrics.grounding_score(words, attention, {"k": [RED_CIRCLE, no_box]},
                                          100) == with_box
