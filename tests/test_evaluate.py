"""Tests of the caption metrics (caption_attn/evaluate.py)."""

import json
import os
import shutil

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from caption_attn import evaluate

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java on PATH")

# Punctuation, case, clitics, brackets and an empty hypothesis, over 4 images (CIDEr needs
# several images for its document frequencies to be non-trivial).
REFERENCES = {
    1: ["A red circle.", "There is a red circle!", "a picture of a red circle"],
    2: ["A blue square above a green triangle.", "a green triangle below a blue square"],
    "img3": ["A dog's ball (red) on the grass, isn't it?", "a dog plays with a ball"],
    4: ["Two people walk on a beach.", "A couple walking on the sand -- at dusk."],
}
HYPOTHESES = {1: "a red circle", 2: "a blue square above a green circle",
              "img3": "", 4: "Two people walking on the beach."}
COCO_NAMES = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


def _direct_coco(references, hypotheses, with_meteor: bool) -> dict:
    """What COCOEvalCap.evaluate computes, called directly on pycocoevalcap."""
    gts = {k: [{"caption": c} for c in references[k]] for k in hypotheses}
    res = {k: [{"caption": h}] for k, h in hypotheses.items()}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    out = {}
    score, _ = Bleu(4).compute_score(gts, res)
    out.update(zip(COCO_NAMES[:4], score))
    if with_meteor:
        out["METEOR"] = Meteor().compute_score(gts, res)[0]
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


# --------------------------------------------------------------------------- coco metrics
@needs_java
def test_coco_metrics_java_tokenizer_equals_pycocoevalcap(monkeypatch, capfd):
    """Java PTB tokenization through stdin gives pycocoevalcap's exact BLEU/ROUGE/CIDEr; METEOR
    (slow to start) is stubbed here and compared in the slow test below."""
    monkeypatch.setattr(evaluate, "_meteor", lambda gts, res: 0.5)
    metrics, notes = evaluate.coco_metrics(REFERENCES, HYPOTHESES)
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""  # no chatter, not even the jar's stderr
    expected = _direct_coco(REFERENCES, HYPOTHESES, with_meteor=False)
    assert notes == []
    assert list(metrics) == COCO_NAMES
    assert {k: v for k, v in metrics.items() if k != "METEOR"} == expected
    assert 0 < metrics["Bleu_1"] < 1 and metrics["CIDEr"] > 0


@needs_java
def test_python_tokenizer_matches_java_on_typical_captions():
    captions = {i: [c] for i, c in enumerate([
        "A man's dog (brown) runs, quickly!",
        '"Hello," she said -- it\'s 3.5 m/s... can\'t',
        "Two dogs; one cat: a well-known 3-year-old boy's toy & more? Yes.",
        "The U.S. flag's 'big' [bracket] {brace} $5 50% #1 @home a/b",
        "Mr. Smith isn't here. Dogs' toys. O'Neil cannot go, gonna",
        "café naïve … “smart quotes” ‘single’ — em–dash", "a red circle .", "", "what?! no",
        "line\rbreak and\u2028separator",
    ])}
    assert evaluate.ptb_tokenize_python(captions) == evaluate.ptb_tokenize_java(captions)


@pytest.mark.slow
@needs_java
def test_coco_metrics_equal_pycocoevalcap_including_meteor():
    metrics, notes = evaluate.coco_metrics(REFERENCES, HYPOTHESES, use_java=True)
    assert notes == []
    assert metrics == _direct_coco(REFERENCES, HYPOTHESES, with_meteor=True)
    assert 0 < metrics["METEOR"] < 1


def test_coco_metrics_without_java_skips_meteor_with_a_note(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(evaluate, "ptb_tokenize_java", None)  # would fail if called
    references = {1: ["A red circle.", "a picture of a red circle"],
                  2: ["A blue square above a green triangle."],
                  3: ["There is a large purple triangle"]}
    hypotheses = {1: "A red circle", 2: "a blue square above a triangle.", 3: "a purple square"}
    metrics, notes = evaluate.coco_metrics(references, hypotheses)
    assert evaluate.java_available() is False
    assert evaluate.NOTE_NO_METEOR in notes and evaluate.NOTE_PY_TOKENIZER in notes
    assert list(metrics) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    # Expected: the scorers on the hand-tokenized captions (lowercase, "." removed).
    gts = {1: ["a red circle", "a picture of a red circle"],
           2: ["a blue square above a green triangle"], 3: ["there is a large purple triangle"]}
    res = {1: ["a red circle"], 2: ["a blue square above a triangle"], 3: ["a purple square"]}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    assert [metrics[f"Bleu_{n}"] for n in range(1, 5)] == bleu
    assert metrics["ROUGE_L"] == Rouge().compute_score(gts, res)[0]
    assert metrics["CIDEr"] == Cider().compute_score(gts, res)[0]


def test_coco_metrics_use_java_false_and_true_without_java(monkeypatch):
    metrics, notes = evaluate.coco_metrics({1: ["a cat"]}, {1: "a cat"}, use_java=False)
    assert "METEOR" not in metrics and any("`use_java` is False" in n for n in notes)
    monkeypatch.setattr(evaluate, "java_available", lambda: False)
    with pytest.raises(ValueError, match="`use_java`"):
        evaluate.coco_metrics({1: ["a cat"]}, {1: "a cat"}, use_java=True)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match=r"`hypotheses` has 1 key\(s\) without references.*'b'"):
        evaluate.corpus_bleu4({"a": ["x"]}, {"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="`hypotheses` is empty"):
        evaluate.coco_metrics({"a": ["x"]}, {}, use_java=False)
    with pytest.raises(ValueError, match=r"`references`\['a'\] must be a non-empty list"):
        evaluate.corpus_bleu4({"a": []}, {"a": "x"})


# --------------------------------------------------------------------------- BLEU-4
def test_corpus_bleu4_identical_disjoint_and_standardized():
    refs = {1: ["a red circle to the left of a blue square"],
            2: ["there is a large green triangle and a small red square"]}
    same = {1: "A red circle, to the left of a BLUE square!",
            2: "there is a large green triangle and a small red square"}
    assert evaluate.corpus_bleu4(refs, same) == pytest.approx(1.0, abs=1e-6)
    disjoint = {1: "dogs run fast on wet grass today", 2: "people eat pizza in big cities"}
    assert evaluate.corpus_bleu4(refs, disjoint) < 1e-6
    partial = evaluate.corpus_bleu4(refs, {1: same[1], 2: "there is a large green circle"})
    assert 0.1 < partial < 0.99
    assert evaluate.corpus_bleu4(refs, {1: same[1]}) == pytest.approx(1.0, abs=1e-6)  # subset


# --------------------------------------------------------------------------- results JSON
def test_write_results(tmp_path):
    path = tmp_path / "out" / "results.json"
    evaluate.write_results(str(path), {"b.png": "a red circle", "a.png": "a blue square"},
                           {"a.png": 7, "b.png": "coco_42"})
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"image_id": "coco_42", "caption": "a red circle"},
        {"image_id": 7, "caption": "a blue square"}]
    assert os.listdir(tmp_path / "out") == ["results.json"]  # no temporary file left
    with pytest.raises(ValueError, match="`image_ids` has no id"):
        evaluate.write_results(str(path), {"c.png": "x"}, {"a.png": 7})


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
    assert evaluate.scene_accuracy({"k": caption}, objects) == float(correct)


def test_scene_accuracy_fraction_and_three_objects():
    objects = {1: [RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE], 2: [RED_CIRCLE], 3: [BLUE_SQUARE],
               4: [GREEN_TRIANGLE]}
    captions = {1: "there are three shapes a blue square a large red circle and a green "
                   "triangle", 2: "a picture of a red circle", 3: "a red square",
                4: "a green triangle and a blue square"}
    assert evaluate.scene_accuracy(captions, objects) == 0.5
    with pytest.raises(ValueError, match=r"`objects`\[5\]"):
        evaluate.scene_accuracy({5: "a red circle"}, objects)


# --------------------------------------------------------------------------- grounding
SIZE = 80  # 10 px per cell: RED_CIRCLE covers cell (2, 3) only, BLUE_SQUARE rows 6-7, cols 0-1


def _one_hot(*cells) -> np.ndarray:
    """Attention (T, 64) peaking at one (row, col) per step; other positions get noise."""
    attn = np.random.default_rng(0).uniform(0, 0.01, (len(cells), 64))
    for t, (r, c) in enumerate(cells):
        attn[t, r * 8 + c] = 1.0
    return attn


def _ground(words: str, cells, objects, image_size=SIZE):
    return evaluate.grounding_score({"k": words.split()}, {"k": _one_hot(*cells)},
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
    score = evaluate.grounding_score({"k": words}, attention, {"k": objects}, SIZE)
    assert score == 5 / 6
    out = evaluate.shapes_metrics({"k": " ".join(words)}, {"k": words}, attention,
                                  {"k": objects}, SIZE)
    assert out == {"scene_accuracy": 1.0, "grounding": 5 / 6, "images": 1,
                   "grounded_words": 5, "matched_words": 6}


def test_grounding_per_image_height_width():
    # 80 rows x 160 columns: cells are 10 px tall and 20 px wide, so x = 30..40 is column 1.
    size = {"k": (80, 160)}
    assert _ground("red circle", [(2, 1), (2, 2)], [RED_CIRCLE], size) == 1.0
    assert _ground("red circle", [(2, 3), (2, 3)], [RED_CIRCLE], size) == 0.0


def test_grounding_checks_attention_shape():
    with pytest.raises(ValueError, match=r"`attention`\['k'\] must have shape"):
        evaluate.grounding_score({"k": ["a", "red", "circle"]}, {"k": np.zeros((2, 64))},
                                 {"k": [RED_CIRCLE]}, SIZE)


# --------------------------------------------------------------------------- printing
def test_format_metrics_table():
    metrics = {"Bleu_1": 0.71234, "Bleu_2": 0.5, "Bleu_3": 0.4, "Bleu_4": 0.3,
               "ROUGE_L": 0.6, "CIDEr": 1.23456}
    lines = evaluate.format_metrics(metrics).splitlines()
    assert [line.split("  ")[0].strip() for line in lines] == [
        "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert lines[0].endswith("0.7123") and lines[4].endswith("n/a")
    assert lines[6].endswith("1.2346")
    assert len({len(line) for line in lines}) == 1  # values right-aligned in one column
    shapes = {"scene_accuracy": 0.25, "grounding": None, "images": 12, "grounded_words": 0,
              "matched_words": 0}
    table = evaluate.format_metrics({**metrics, **shapes})
    assert "scene accuracy" in table and table.splitlines()[-3].endswith(" 12")
    assert table.splitlines()[8].endswith("n/a")  # grounding None
