"""Tests of the coco-caption metrics (caption_attn/coco_metrics.py)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from caption_attn import coco_metrics

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


# A stand-in for METEOR's jar speaking its stdin protocol (SCORE lines -> statistics, an
# EVAL line -> a score per image and the total) after writing 1.6 MB on stderr first.
FAKE_METEOR = r"""
import sys
sys.stderr.write("warning " * 200000)
sys.stderr.flush()
for line in sys.stdin:
    if line.startswith("SCORE"):
        print("1 2 3", flush=True)
    elif line.startswith("EVAL"):
        print("0.25\n" * line.count("|||") + "0.25", flush=True)
"""


def test_meteor_reads_what_java_writes_on_stderr(monkeypatch, tmp_path):
    """pycocoevalcap pipes METEOR's stderr and never reads it: a JVM writing more than a pipe
    holds (64 KB) waited for us while we waited for its score, and `evaluate` hung."""
    import threading

    script = tmp_path / "fake_meteor.py"
    script.write_text(FAKE_METEOR)
    started = []

    class FakeMeteor(coco_metrics._Meteor):
        def __init__(self):
            self.meteor_p = subprocess.Popen([sys.executable, str(script)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE)
            self.lock = threading.Lock()
            started.append(self.meteor_p)

    monkeypatch.setattr(coco_metrics, "_Meteor", FakeMeteor)
    gts = {1: ["a red circle"], 2: ["a blue square"]}
    res = {1: ["a red circle"], 2: ["a square"]}
    scores = []
    worker = threading.Thread(target=lambda: scores.append(coco_metrics._meteor(gts, res)),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)
    try:
        assert not worker.is_alive(), "METEOR hung on its full stderr pipe"
        assert scores == [0.25]
        assert started[0].poll() is not None   # the process is ended
    finally:
        for proc in started:
            proc.kill()


def test_an_interrupted_meteor_does_not_hang_the_exit():
    """Ctrl-C inside pycocoevalcap's compute_score left its lock taken: `evaluate` printed
    "interrupted", then hung for ever in Meteor.__del__, which waits for that lock."""
    import threading

    meteor = object.__new__(coco_metrics._Meteor)
    meteor.lock = threading.Lock()
    meteor.lock.acquire()                    # as the interrupt left it
    meteor.meteor_p = None
    ended = threading.Event()
    threading.Thread(target=lambda: (meteor.__del__(), ended.set()), daemon=True).start()
    assert ended.wait(10), "METEOR's clean-up waits on the lock the interrupt left taken"
    assert issubclass(coco_metrics._Meteor, Meteor)   # pycocoevalcap's scorer otherwise


# --------------------------------------------------------------------------- coco metrics
@needs_java
def test_coco_metrics_java_tokenizer_equals_pycocoevalcap(monkeypatch, capfd):
    """Java PTB tokenization through stdin gives pycocoevalcap's exact BLEU/ROUGE/CIDEr; METEOR
    (slow to start) is stubbed here and compared in the slow test below."""
    monkeypatch.setattr(coco_metrics, "_meteor", lambda gts, res: 0.5)
    metrics, notes = coco_metrics.coco_metrics(REFERENCES, HYPOTHESES)
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""  # no chatter, not even the jar's stderr
    expected = _direct_coco(REFERENCES, HYPOTHESES, with_meteor=False)
    assert notes == []
    assert list(metrics) == COCO_NAMES
    assert {k: v for k, v in metrics.items() if k != "METEOR"} == expected
    assert 0 < metrics["Bleu_1"] < 1 and metrics["CIDEr"] > 0


def test_python_tokenizer_keeps_a_generated_unk_whole():
    # as the Java PTBTokenizer does: split into "< unk >", a caption with <unk> lost BLEU-4
    # 0.50 -> 0.32 and CIDEr 3.79 -> 3.34 on a machine without Java
    assert coco_metrics.ptb_tokenize_python({1: ["A red <unk> .", "a<unk>b <END>"]}) == {
        1: ["a red <unk>", "a <unk> b <end>"]}


# What the Java PTBTokenizer (Stanford CoreNLP 3.4.1) prints for each, checked with the jar:
# a digit run glued to letters stays one word (the number rule used to win: "2 nd", "4 x4"
# took Bleu_4 0.5759 -> 0.6721 without Java), "&" splits unless both sides are capitals, and
# a list of abbreviations keep their period.
PTB_CASES = {
    "a 2nd floor, 1st place": "a 2nd floor 1st place",
    "a 3D model, 3d glasses": "a 3d model 3d glasses",
    "a 4x4 truck, a 2x4.": "a 4x4 truck a 2x4",
    "at 10am or 10pm, a 12oz can": "at 10am or 10pm a 12oz can",
    "a 3rd base, a 4th, 21st century, the 1980s": "a 3rd base a 4th 21st century the 1980s",
    "a 50mm lens, route 66a, in 2nd.": "a 50mm lens route 66a in 2nd",
    "the 3.5mm jack, 1,000s of people, 10:30am": "the 3.5 mm jack 1,000 s of people 10:30 am",
    "a b&w photo, q&a, AT&T, B&W, R&B, At&T": "a b & w photo q & a at&t b&w r&b at & t",
    "dogs etc. and Jr. Smith, cat vs. dog": "dogs etc. and jr. smith cat vs. dog",
    "the No. 5 bus on Main Ave. in Jan. etc.": "the no. 5 bus on main ave. in jan. etc.",
    "a no. and 5 lb. of approx. mph.": "a no and 5 lb of approx mph",
    "www.google.com, a.b and file.jpg": "www.google.com a.b and file.jpg",
    # a single letter keeps its period (initials, "plan b."): "b&w." at the end was "b & w"
    "an old b&w. q&a. the letter a. plan B. I. x.": "an old b & w. q & a. the letter a. "
                                                   "plan b. i. x.",
    "a... a.. dog, (a.) 5x. é. a.b.c": "a. a. dog -lrb- a. -rrb- 5x é a.b.c",
    # the jar's own abbreviations (some need a capital: "Ill." but "ill.")
    "the Univ. and Dept. of Ph.D. students": "the univ. and dept. of ph.d. students",
    "Calif. ill. Ill. Tue. Esq. Mfg. MFG. fig. approx. May. Sat.":
        "calif. ill ill. tue. esq. mfg. mfg fig approx may sat",
    # 'n', 'tis, 'em, '90s; gimme and lemme split as gonna
    "rock'n'roll! rock 'n' roll, rock 'n roll, more'n": "rock 'n' roll rock 'n' roll rock 'n "
                                                       "roll more 'n",
    "'Tis 'twas 'em 'cause 'til 'round the '90s, '80's, 5'10 tall, it'5":
        "'t is 't was 'em 'cause 'til round the '90s 80 's 5 '10 tall it 5",
    "gimme lemme o'neil's c'mon d'ye": "gim me lem me o'neil 's c'mon d'ye",
    # signed numbers, hashtags, C++, e-mail addresses, smileys
    "-5 degrees, +1 vote, 1+1, -.5, $-5 and a -a": "-5 degrees +1 vote 1 +1 -.5 $ -5 and a a",
    "#tag #1 a#b C++ c# F# j# a++": "#tag # 1 a #b c++ c# f# j # a + +",
    "mail user@example.com or e-mail:a@b.c": "mail user@example.com or e-mail:a@b.c",
    "a dog :) :-( ;) :D =) note:do this 5:p": "a dog :-rrb- :--lrb- ;-rrb- :d =-rrb- note do "
                                             "this 5 :p",
    # ... but not before a word that may start a sentence, then a space: "plan b . the dog"
    "plan b. The dog, x. A cat, b&w. Then, y. there": "plan b the dog x a cat b & w. then y. "
                                                     "there",
    # fractions and currency signs as the jar writes them; zero-width space, soft hyphen
    "\u00bd cup, 1\u00bc mile, \u20ac5, \u00a35, 5\u00a2": "1/2 cup 1 1/4 mile $ 5 # 5 5 cents",
    "a dog\u200bhouse, a dog\u00adhouse, y'all, y'know, a 4.5-inch knife":
        "a dog house a doghouse y' all y' know a 4.5-inch knife",
    # characters beyond the BMP (emoji, flags) are dropped by the jar as untokenizable
    "a dog \U0001F600 smiles, a\U0001F436b, a \U0001F1FA\U0001F1F8 flag \u263a \u2665":
        "a dog smiles a b a flag \u263a \u2665",
}


def test_python_tokenizer_digits_glued_to_letters_ampersands_and_abbreviations():
    captions = {i: [c] for i, c in enumerate(PTB_CASES)}
    assert coco_metrics.ptb_tokenize_python(captions) == {
        i: [t] for i, t in enumerate(PTB_CASES.values())}


@needs_java
def test_python_tokenizer_cases_are_what_the_jar_prints():
    captions = {i: [c] for i, c in enumerate(PTB_CASES)}
    assert coco_metrics.ptb_tokenize_java(captions) == {
        i: [t] for i, t in enumerate(PTB_CASES.values())}


@needs_java
def test_python_tokenizer_matches_java_on_typical_captions():
    captions = {i: [c] for i, c in enumerate([
        "A man's dog (brown) runs, quickly!",
        '"Hello," she said -- it\'s 3.5 m/s... can\'t',
        "Two dogs; one cat: a well-known 3-year-old boy's toy & more? Yes.",
        "The U.S. flag's 'big' [bracket] {brace} $5 50% #1 @home a/b",
        "Mr. Smith isn't here. Dogs' toys. O'Neil cannot go, gonna",
        "café naïve … “smart quotes” ‘single’ — em–dash", "a red circle .", "", "what?! no",
        "line\rbreak and\u2028separator", "a red <unk> .", "a<unk>b <UNK> dog <end>",
    ])}
    assert (coco_metrics.ptb_tokenize_python(captions)
            == coco_metrics.ptb_tokenize_java(captions))


def test_python_tokenizer_reads_a_single_letters_period_before_the_next_caption():
    # The jar reads all captions as one text: "vitamin c." keeps its period before a caption
    # "the end" but not before "A dog ..." (a sentence start), even one of another image.
    captions = {1: ["Vitamin C.", "A bottle of pills.", "plan b.", "", "The end"],
                2: ["grade a.", "the end"], 3: ["a b&w."], 4: ["   ", "Then it rained"]}
    assert coco_metrics.ptb_tokenize_python(captions) == {
        1: ["vitamin c", "a bottle of pills", "plan b", "", "the end"],
        2: ["grade a.", "the end"], 3: ["a b & w"], 4: ["", "then it rained"]}


# Captions written to differ between the two tokenizers (contractions, hyphens, numbers,
# quotes, ellipses, &, $, %, slashes, brackets, abbreviations, smileys, emoji, non-ASCII
# letters), one per line. Left out as known differences (see ptb_tokenize_python):
# "v1.2.3" (jar: "v1 .2.3"), "1,000-2,000" (jar: "1,000-2 ,000").
TRICKY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ptb_tricky_captions.txt")


@needs_java
def test_python_tokenizer_matches_java_on_tricky_captions():
    with open(TRICKY, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")[:-1]
    assert len(lines) > 300
    each = {i: [c] for i, c in enumerate(lines)}
    python, java = coco_metrics.ptb_tokenize_python(each), coco_metrics.ptb_tokenize_java(each)
    assert {i: (lines[i], python[i]) for i in each if python[i] != java[i]} == {}
    together = {1: lines}   # as one image's references: each caption before the next
    assert coco_metrics.ptb_tokenize_python(together) == coco_metrics.ptb_tokenize_java(together)


@needs_java
def test_a_jvm_that_logs_to_stdout_cannot_shift_captions_onto_other_images(monkeypatch):
    # JAVA_TOOL_OPTIONS=-Xlog:gc makes the JVM print "[0.011s][info][gc] Using G1" before the
    # tokens: every caption went to the image before it (BLEU-4 1.0 -> 0.0001, exit 0). Now
    # the extra line is seen, and the Python tokenizer is used, with notes saying why.
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Xlog:gc")
    with pytest.raises(RuntimeError, match=r"printed [4-9] lines for 3 captions .*"
                                           r"JAVA_TOOL_OPTIONS.*\[info\]\[gc\]"):
        coco_metrics.ptb_tokenize_java({1: ["a dog runs"], 2: ["a cat"], 3: ["a red car"]})
    monkeypatch.setattr(coco_metrics, "_meteor", lambda gts, res: 0.5)
    refs = {1: ["a brown dog runs home"], 2: ["a cat sits on a mat"],
            3: ["a red car is parked"]}
    metrics, notes = coco_metrics.coco_metrics(refs, {k: v[0] for k, v in refs.items()},
                                               use_java=True)
    assert metrics["Bleu_4"] == pytest.approx(1.0)
    assert "the Java PTBTokenizer failed" in notes[0]
    assert notes[1] == coco_metrics.NOTE_PY_TOKENIZER


@pytest.mark.slow
@needs_java
def test_coco_metrics_equal_pycocoevalcap_including_meteor():
    metrics, notes = coco_metrics.coco_metrics(REFERENCES, HYPOTHESES, use_java=True)
    assert notes == []
    assert metrics == _direct_coco(REFERENCES, HYPOTHESES, with_meteor=True)
    assert 0 < metrics["METEOR"] < 1


def test_coco_metrics_without_java_skips_meteor_with_a_note(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(coco_metrics, "ptb_tokenize_java", None)  # would fail if called
    references = {1: ["A red circle.", "a picture of a red circle"],
                  2: ["A blue square above a green triangle."],
                  3: ["There is a large purple triangle"]}
    hypotheses = {1: "A red circle", 2: "a blue square above a triangle.", 3: "a purple square"}
    metrics, notes = coco_metrics.coco_metrics(references, hypotheses)
    assert coco_metrics.java_available() is False
    assert coco_metrics.NOTE_NO_METEOR in notes and coco_metrics.NOTE_PY_TOKENIZER in notes
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
    metrics, notes = coco_metrics.coco_metrics({1: ["a cat"]}, {1: "a cat"}, use_java=False)
    assert "METEOR" not in metrics and any("`use_java` is False" in n for n in notes)
    monkeypatch.setattr(coco_metrics, "java_available", lambda: False)
    with pytest.raises(ValueError, match="`use_java`"):
        coco_metrics.coco_metrics({1: ["a cat"]}, {1: "a cat"}, use_java=True)


def test_cider_of_one_image_is_left_out_with_a_note():
    """CIDEr's idf comes from the scored references: with one image every n-gram has idf 0, so
    even a perfect caption scored CIDEr 0.0000 (evaluate on a one-image split, exit 0)."""
    metrics, notes = coco_metrics.coco_metrics({1: ["a red circle", "a circle"]},
                                               {1: "a red circle"}, use_java=False)
    assert "CIDEr" not in metrics and metrics["Bleu_1"] > 0.99
    assert any(n.startswith("CIDEr left out: it needs at least 2 images") for n in notes)
    metrics, notes = coco_metrics.coco_metrics({1: ["a red circle"], 2: ["a blue square"]},
                                               {1: "a red circle", 2: "a blue square"},
                                               use_java=False)
    assert metrics["CIDEr"] > 0 and not any("CIDEr" in n for n in notes)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match=r"`hypotheses` has 1 key\(s\) without references.*'b'"):
        coco_metrics.corpus_bleu4({"a": ["x"]}, {"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="`hypotheses` is empty"):
        coco_metrics.coco_metrics({"a": ["x"]}, {}, use_java=False)
    with pytest.raises(ValueError, match=r"`references`\['a'\] must be a non-empty list"):
        coco_metrics.corpus_bleu4({"a": []}, {"a": "x"})


def test_half_a_surrogate_pair_is_named_not_a_unicode_error_from_the_jar():
    # json.loads("\"\\ud83d\"") gives a lone surrogate: with Java it crashed with a
    # UnicodeEncodeError from the tokenizer's stdin, naming neither the image nor the text
    refs = json.loads('{"a": ["a dog \\ud83d runs"], "b": ["a cat"]}')
    for use_java in (False, True):
        with pytest.raises(ValueError, match=r"`references`\['a'\] holds half of a UTF-16 "
                                             r"surrogate pair"):
            coco_metrics.coco_metrics(refs, {"a": "a dog", "b": "a cat"}, use_java=use_java)
    with pytest.raises(ValueError, match=r"`hypotheses`\['b'\] holds half"):
        coco_metrics.corpus_bleu4({"a": ["x"], "b": ["y"]}, {"a": "x", "b": "y\udc00"})


# --------------------------------------------------------------------------- BLEU-4
def test_corpus_bleu4_identical_disjoint_and_standardized():
    refs = {1: ["a red circle to the left of a blue square"],
            2: ["there is a large green triangle and a small red square"]}
    same = {1: "A red circle, to the left of a BLUE square!",
            2: "there is a large green triangle and a small red square"}
    assert coco_metrics.corpus_bleu4(refs, same) == pytest.approx(1.0, abs=1e-6)
    disjoint = {1: "dogs run fast on wet grass today", 2: "people eat pizza in big cities"}
    assert coco_metrics.corpus_bleu4(refs, disjoint) < 1e-6
    partial = coco_metrics.corpus_bleu4(refs, {1: same[1], 2: "there is a large green circle"})
    assert 0.1 < partial < 0.99
    assert coco_metrics.corpus_bleu4(refs, {1: same[1]}) == pytest.approx(1.0, abs=1e-6)  # subset



CJK_REFERENCES = {"a.jpg": ["一只狗在草地上跑。", "草地上有一只小狗，它在跑！"],
                  "b.jpg": ["两个人在海边散步。", "「海边」有两个人在走路"],
                  "c.jpg": ["人々が公園を歩いている。", "公園で人々が歩く"],
                  "d.jpg": ["コーヒー・カップが机の上にある", "机の上のコーヒー・カップ"]}


def test_chinese_and_japanese_captions_score_as_the_vocabulary_splits_them():
    """Each CJK character is a word of the vocabulary (`vocab.standardize`), which is what the
    model says; PTB keeps a run of them one token, so every reference was one token matching
    nothing the model could say and every metric was 0 (exit 0, no note). Both sides are now
    split as the vocabulary splits them, their punctuation dropped (、。・; 々, a letter, kept):
    the model saying a reference as the vocabulary writes it scores as an English one does."""
    from caption_attn.vocab import standardize
    said = {k: standardize(refs[0]) for k, refs in CJK_REFERENCES.items()}
    assert said["a.jpg"] == "一 只 狗 在 草 地 上 跑" and "人 々 が" in said["c.jpg"]
    metrics, notes = coco_metrics.coco_metrics(CJK_REFERENCES, said, use_java=False)
    assert coco_metrics.NOTE_CJK in notes
    assert metrics["Bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ROUGE_L"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["CIDEr"] > 1.0
    wrong = {k: standardize(CJK_REFERENCES[o][0]) for k, o in
             zip(CJK_REFERENCES, ["b.jpg", "c.jpg", "d.jpg", "a.jpg"])}
    worse, _ = coco_metrics.coco_metrics(CJK_REFERENCES, wrong, use_java=False)
    assert worse["Bleu_1"] < 0.5 and worse["CIDEr"] < 0.5 * metrics["CIDEr"]


def test_the_java_tokenizer_keeps_cjk_characters_split_as_the_python_one():
    """The scores above with Java differ only by its tokenizer (METEOR aside, whose jar
    takes half a minute to load): the split CJK captions are the same tokens from both."""
    if not coco_metrics.java_available():
        pytest.skip("no java on PATH")
    notes = []
    gts, res = coco_metrics._cjk_as_words({k: list(v) for k, v in CJK_REFERENCES.items()},
                                          {"a.jpg": ["一 只 狗 在 跑"]}, notes)
    assert notes == [coco_metrics.NOTE_CJK]
    tokens = coco_metrics.ptb_tokenize_java(gts)
    assert tokens == coco_metrics.ptb_tokenize_python(gts)
    assert tokens["a.jpg"][0] == "一 只 狗 在 草 地 上 跑"
    assert tokens["d.jpg"][0] == "コ ー ヒ ー カ ッ プ が 机 の 上 に あ る"
    assert coco_metrics.ptb_tokenize_java(res) == {"a.jpg": ["一 只 狗 在 跑"]}


def test_captions_without_cjk_characters_are_scored_as_pycocoevalcap_tokenizes_them():
    """The CJK splitting leaves other captions alone, full-width punctuation included (no
    note): their tokens are PTB's."""
    refs = {1: ["a dog runs on the grass\uff0c fast"], 2: ["two people walk by the sea"]}
    gts = {k: list(v) for k, v in refs.items()}
    res = {1: ["a dog runs"], 2: ["two people walk"]}
    notes = []
    assert coco_metrics._cjk_as_words(gts, res, notes) == (gts, res) and notes == []
    _, notes = coco_metrics.coco_metrics(refs, {1: "a dog runs", 2: "two people"},
                                         use_java=False)
    assert coco_metrics.NOTE_CJK not in notes


def test_one_cjk_caption_leaves_the_other_captions_as_pycocoevalcap_tokenizes_them():
    """The split is per caption: one reference with a CJK character (a sign's "寿司") dropped
    the non-ASCII punctuation and symbols of every caption of the split, so "man’s" became
    "man s" (not PTB's "man 's") and "5°" lost its symbol, changing every English score
    (exit 0, a note about CJK captions only)."""
    english = {1: ["the man\u2019s dog runs on the grass", "it is 5\u00b0 outside"],
               2: ["two people walk by the sea"]}
    res = {1: ["the man\u2019s dog runs"], 2: ["two people walk"]}
    gts = {**{k: list(v) for k, v in english.items()}, 3: ["a sign reads 寿司。"]}
    notes = []
    split_gts, split_res = coco_metrics._cjk_as_words(gts, res, notes)
    assert notes == [coco_metrics.NOTE_CJK]
    assert split_res == res
    assert {k: split_gts[k] for k in english} == english
    assert split_gts[3][0].split() == ["a", "sign", "reads", "寿", "司"]
    tokens = coco_metrics.ptb_tokenize_python(split_gts)
    assert tokens[1] == coco_metrics.ptb_tokenize_python(english)[1]
    assert "man 's" in tokens[1][0]

# --------------------------------------------------------------------------- results JSON
def test_write_results(tmp_path):
    path = tmp_path / "out" / "results.json"
    coco_metrics.write_results(str(path), {"b.png": "a red circle", "a.png": "a blue square"},
                               {"a.png": 7, "b.png": "coco_42"})
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"image_id": "coco_42", "caption": "a red circle"},
        {"image_id": 7, "caption": "a blue square"}]
    assert os.listdir(tmp_path / "out") == ["results.json"]  # no temporary file left
    with pytest.raises(ValueError, match="`image_ids` has no id"):
        coco_metrics.write_results(str(path), {"c.png": "x"}, {"a.png": 7})


def test_importing_needs_no_tensorflow():
    """Scoring stays usable (and quick to import) where TensorFlow and Keras are not."""
    code = ("import sys, caption_attn.coco_metrics; "
            "loaded = {'tensorflow', 'keras'} & set(sys.modules); assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
