"""Caption metrics: coco-caption scores, the COCO results JSON and the shapes-dataset metrics.

Inputs are dicts keyed by anything hashable (image key or COCO id): `references` maps a key to
its reference captions, `hypotheses` maps a key to one generated caption. Only the keys of
`hypotheses` are scored; each must have references.

`coco_metrics` reproduces pycocoevalcap's `COCOEvalCap.evaluate` (PTB tokenization of both
sides, then Bleu(4), Meteor(), Rouge(), Cider()) without SPICE, with two deliberate changes to
the plumbing, not to the numbers:

- The Stanford PTBTokenizer jar is fed through stdin instead of pycocoevalcap's temporary
  file, which `PTBTokenizer.tokenize` creates inside its own package folder: that fails when
  site-packages is read-only (a system or container install, another user's venv) and leaves
  the file behind when the process is killed mid-run. The jar, flags and post-processing are
  the same, so the tokens are identical (tests compare against `PTBTokenizer` itself).
- pycocoevalcap only turns "\\n" inside a caption into a space; the jar also ends a line at
  "\\r", "\\v", "\\f", U+2028 and U+2029, which would shift every later caption onto the wrong
  image. Those become spaces too.

Nothing is printed: `COCOEvalCap.evaluate`'s progress lines ("tokenization...") are not used,
BLEU runs with `verbose=0` (else it prints `{'testlen': ...}`), and the jars' stderr logs
("PTBTokenizer tokenized N tokens ...") are captured. Nothing is redirected either, so prints
of other threads (a training loop) are never swallowed.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import subprocess
from typing import Hashable, Optional, Union

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from caption_attn.backbone import GRID
from caption_attn.fileio import write_json_atomic
from caption_attn.shapes import COLORS, SHAPES, object_positions, parse_objects
from caption_attn.vocab import standardize, tokenize

COCO_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
DISPLAY_NAMES = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                 "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr",
                 "scene_accuracy": "scene accuracy", "grounding": "grounding",
                 "images": "images", "grounded_words": "grounded words",
                 "matched_words": "matched words"}
SHAPES_METRICS = ("scene_accuracy", "grounding", "images", "grounded_words", "matched_words")
GROUNDING_REACH = 1    # a word is grounded if its attention peak is <= this many cells away

PTB_JAR = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                       ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
PTB_COMMAND = ["java", "-cp", PTB_JAR, "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase"]  # as ptbtokenizer.py, minus the file argument
PUNCTUATIONS = frozenset(ptbtokenizer.PUNCTUATIONS)
NOTE_NO_METEOR = "METEOR needs Java (not found on PATH); reported the rest"
NOTE_PY_TOKENIZER = ("tokenized with a pure-Python imitation of the Java PTBTokenizer: scores "
                     "may differ slightly from pycocoevalcap's")

_LINE_BREAKS = re.compile("[\n\r\v\f\u2028\u2029]")  # all end a line in the jar

Key = Hashable


# --------------------------------------------------------------------------- input checks
def _check_inputs(references: dict, hypotheses: dict) -> None:
    """ValueError unless every hypothesis is a string with >= 1 reference caption."""
    if not hypotheses:
        raise ValueError("`hypotheses` is empty: nothing to score")
    missing = [k for k in hypotheses if k not in references]
    if missing:
        raise ValueError(f"`hypotheses` has {len(missing)} key(s) without references, e.g. "
                         f"{missing[:3]!r}")
    for key, caption in hypotheses.items():
        if not isinstance(caption, str):
            raise ValueError(f"`hypotheses`[{key!r}] must be a string, got {caption!r}")
        refs = references[key]
        if not isinstance(refs, (list, tuple)) or not refs \
                or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"`references`[{key!r}] must be a non-empty list of strings, "
                             f"got {refs!r}")


# --------------------------------------------------------------------------- BLEU-4 (no Java)
def corpus_bleu4(references: dict[Key, list[str]], hypotheses: dict[Key, str]) -> float:
    """Corpus BLEU-4 of pycocoevalcap's `Bleu` scorer on `vocab.standardize`d text.

    No Java (cheap enough for every epoch's `val_bleu4`); it differs from `coco_metrics`'
    Bleu_4 only by tokenization.
    """
    _check_inputs(references, hypotheses)
    gts = {k: [standardize(r) for r in references[k]] for k in hypotheses}
    res = {k: [standardize(h)] for k, h in hypotheses.items()}
    score, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(score[3])


# --------------------------------------------------------------------------- tokenization
def java_available() -> bool:
    """Whether a working `java` is on PATH.

    Runs `java -version`, since e.g. macOS ships a `/usr/bin/java` stub that only prints an
    install hint when no JDK is installed.
    """
    java = shutil.which("java")
    if java is None:
        return False
    try:
        done = subprocess.run([java, "-version"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _sentences(captions_for_image: dict[Key, list[str]]) -> tuple[list[Key], list[str]]:
    """(key per caption, caption per line) in dict order, line breaks made spaces."""
    keys = [k for k, v in captions_for_image.items() for _ in v]
    lines = [_LINE_BREAKS.sub(" ", c) for v in captions_for_image.values() for c in v]
    return keys, lines


def _group(keys: list[Key], lines: list[str]) -> dict[Key, list[str]]:
    """Tokenized lines grouped by key, PTB punctuation tokens dropped (as ptbtokenizer.py)."""
    out: dict[Key, list[str]] = {}
    for key, line in zip(keys, lines):
        words = [w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS]
        out.setdefault(key, []).append(" ".join(words))
    return out


def ptb_tokenize_java(captions_for_image: dict[Key, list[str]]) -> dict[Key, list[str]]:
    """pycocoevalcap's `PTBTokenizer().tokenize`, with captions as plain strings, through
    stdin (no temporary file) and with the jar's stderr log captured."""
    keys, lines = _sentences(captions_for_image)
    done = subprocess.run(PTB_COMMAND, input="\n".join(lines).encode(), capture_output=True)
    out_lines = done.stdout.decode().split("\n")
    if done.returncode != 0 or len(out_lines) < len(keys):
        raise RuntimeError(f"Stanford PTBTokenizer failed (exit {done.returncode}, "
                           f"{len(out_lines)} lines for {len(keys)} captions): "
                           f"{done.stderr.decode(errors='replace').strip()[-500:]}")
    return _group(keys, out_lines)


_PY_REPLACE = {"\u201c": ' " ', "\u201d": ' " ', "\u2018": " ' ", "\u2019": "'",
               "\u2026": " ... ", "\x85": " ... ", "\u2014": " -- ", "\u2013": " -- "}
_PY_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-",
                "{": "-lcb-", "}": "-rcb-"}  # lowercased, so ptbtokenizer.py keeps them too
_PY_SPLITS = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta"}
_CLITIC = r"(?:s|re|ve|ll|d|m)\b"  # after an apostrophe: it's, we're, you've, we'll, she'd
_PY_TOKEN = re.compile(rf"""
      \.\.\.                                  # ellipsis
    | --                                      # dash
    | [!?]+                                   # "!!" and "?!" stay one token
    | \w+?(?=n't\b)                           # "do" of "don't", "ca" of "can't"
    | n't\b
    | '{_CLITIC}                               # 's 're 've 'll 'd 'm
    | \w+(?:-\w+)+                             # well-known, 3-year-old
    | \d+(?:[.,:/]\d+)*                       # 3.5  1,000  10:30  1/2
    | (?:[^\W\d_]\.){{2,}}                    # abbreviations: u.s.
    | (?:mr|mrs|ms|dr|st)\.                   # titles keep their period
    | @?\w+(?:[/&.]\w+|'(?!{_CLITIC})\w+)*   # words: a/b, o'neil, @home
    | \S                                      # any other character on its own
""", re.VERBOSE)


def _py_tokenize_line(line: str) -> str:
    """One caption, PTB-tokenized and lowercased (before punctuation removal)."""
    text = line.lower()
    for old, new in _PY_REPLACE.items():
        text = text.replace(old, new)
    tokens = [_PY_BRACKETS.get(t, _PY_SPLITS.get(t, t)) for t in _PY_TOKEN.findall(text)]
    return " ".join("``" if t == '"' else t for t in tokens)


def ptb_tokenize_python(captions_for_image: dict[Key, list[str]]) -> dict[Key, list[str]]:
    """A pure-Python imitation of `ptb_tokenize_java` for machines without Java: lowercase,
    PTB splitting (clitics, n't, punctuation, brackets) and the same punctuation removal.
    Common captions come out identical; rare constructs (some abbreviations, units glued to
    numbers, "rock'n'roll") may differ."""
    keys, lines = _sentences(captions_for_image)
    return _group(keys, [_py_tokenize_line(line) for line in lines])


# --------------------------------------------------------------------------- coco metrics
def _meteor(gts: dict, res: dict) -> float:
    """pycocoevalcap's METEOR; its Java process is always ended (its `__del__` would wait
    forever on the scorer's lock if `compute_score` raised while holding it)."""
    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
        return float(score)
    finally:
        proc = meteor.meteor_p
        proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        if meteor.lock.locked():
            meteor.lock.release()


def _tokenize_both(gts: dict, res: dict, java: bool, notes: list[str]) -> tuple[dict, dict]:
    """PTB-tokenize references and hypotheses, with Java when `java`, else in Python."""
    if java:
        try:
            return ptb_tokenize_java(gts), ptb_tokenize_java(res)
        except (OSError, RuntimeError) as e:
            notes.append(f"the Java PTBTokenizer failed ({e}); fell back to Python")
    notes.append(NOTE_PY_TOKENIZER)
    return ptb_tokenize_python(gts), ptb_tokenize_python(res)


def coco_metrics(references: dict[Key, list[str]], hypotheses: dict[Key, str],
                 use_java: Optional[bool] = None) -> tuple[dict, list[str]]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr as pycocoevalcap's `COCOEvalCap.evaluate`.

    Returns ({"Bleu_1": ..., "Bleu_4": ..., "METEOR": ..., "ROUGE_L": ..., "CIDEr": ...},
    notes). `use_java` None uses Java when available; False skips it (Python tokenizer, no
    METEOR); True requires it. Without Java, METEOR is left out and the notes say why. CIDEr's
    document frequencies come from the scored references, so it needs several images.
    """
    _check_inputs(references, hypotheses)
    java = java_available() if use_java is None else bool(use_java)
    if use_java and not java_available():
        raise ValueError(f"`use_java` is {use_java!r} but no working `java` is on PATH")
    notes: list[str] = []
    gts = {k: list(references[k]) for k in hypotheses}
    res = {k: [h] for k, h in hypotheses.items()}
    gts, res = _tokenize_both(gts, res, java, notes)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=1 prints to stdout
    metrics = {f"Bleu_{n}": float(s) for n, s in enumerate(bleu, start=1)}
    if java:
        try:
            metrics["METEOR"] = _meteor(gts, res)
        except (OSError, ValueError) as e:
            notes.append(f"METEOR failed ({type(e).__name__}: {e}); reported the rest")
    elif use_java is None:
        notes.append(NOTE_NO_METEOR)
    else:
        notes.append("METEOR skipped (`use_java` is False); reported the rest")
    metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return metrics, notes


def write_results(path: str, hypotheses: dict[Key, str],
                  image_ids: dict[Key, Union[int, str]]) -> None:
    """COCO results JSON `[{"image_id": ..., "caption": ...}]` in `hypotheses` order, written
    atomically."""
    missing = [k for k in hypotheses if k not in image_ids]
    if missing:
        raise ValueError(f"`image_ids` has no id for {len(missing)} hypothesis key(s), e.g. "
                         f"{missing[:3]!r}")
    write_json_atomic(path, [{"image_id": image_ids[k], "caption": caption}
                             for k, caption in hypotheses.items()])


# --------------------------------------------------------------------------- shapes metrics
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

    A word of a parsed (color, shape) pair that names an object -> that object. Any other
    color word -> every object of that color (grounded if near any). Any other shape word ->
    none (not scored).
    """
    by_pair = {(o["color"], o["shape"]): o for o in objs}
    targets: dict[int, list[dict]] = {}
    for i, j in object_positions(words):
        obj = by_pair.get((words[i], words[j]))
        if obj is not None:
            targets[i] = targets[j] = [obj]
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
    """{"scene_accuracy", "grounding" (None if no word matched), "images", "grounded_words"
    (words on their object), "matched_words" (color/shape words matching an object)}."""
    grounded, matched = _grounding_counts(words, attention, objects, image_size, grid)
    return {"scene_accuracy": scene_accuracy(captions, objects),
            "grounding": grounded / matched if matched else None,
            "images": len(captions), "grounded_words": grounded, "matched_words": matched}


# --------------------------------------------------------------------------- printing
def _format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.4f}"


def format_metrics(metrics: dict) -> str:
    """Aligned table: the coco metrics (missing ones as n/a), then the shapes metrics present
    (merge `coco_metrics` and `shapes_metrics` results into one flat dict)."""
    rows = [(DISPLAY_NAMES[k], _format_value(metrics.get(k))) for k in COCO_METRICS]
    rows += [(DISPLAY_NAMES[k], _format_value(metrics[k])) for k in SHAPES_METRICS
             if k in metrics]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>8}" for name, value in rows)


# --------------------------------------------------------------------------- a run's split
def evaluate_run(run_dir: str, split: str = "test", cfg=None, out: Optional[str] = None,
                 progress: bool = True, use_java: Optional[bool] = None) -> dict:
    """Decode a split of a trained run from its feature cache, score it, write the files.

    Writes the COCO results JSON (`[{"image_id", "caption"}]`) and the metrics JSON (`out`,
    default `<run>/eval/<split>_metrics.json`; results next to it as `*_results.json`).
    Returns the metrics dict (also holding the paths written).
    """
    import keras

    from caption_attn import data, pipeline
    from caption_attn.captioner import Captioner
    from caption_attn.config import DecodeConfig
    from caption_attn.fileio import read_json
    from caption_attn.errors import UserError
    from caption_attn.feature_cache import feature_path, read_manifest

    captioner = Captioner.from_run(run_dir, cfg or DecodeConfig())
    run_cfg = captioner.run_cfg
    splits = read_json(os.path.join(run_dir, "split.json"))["splits"]
    if split not in splits:
        raise UserError(f"--split must be one of {sorted(splits)}, got {split!r}")
    records = {r.image: r for r in data.load_dataset(run_cfg.captions, run_cfg.data).records}
    manifest = read_manifest(run_cfg.cache)
    reader = pipeline.NpyReader.from_manifest(manifest)
    keys = [k for k in splits[split] if k in records]
    valid = {k: reader.has_file(feature_path(run_cfg.cache, k)) for k in keys}
    without = [k for k in keys if not valid[k]]
    keys = [k for k in keys if valid[k]]
    if not keys:
        raise UserError(f"no images of the {split} split have features in {run_cfg.cache}")
    bar = keras.utils.Progbar(len(keys), verbose=1 if progress else 0, unit_name="image")
    batches = pipeline.image_dataset([feature_path(run_cfg.cache, k) for k in keys],
                                     captioner.cfg.batch_size, reader)
    decoded = captioner.decode_batches((b.numpy() for b in batches), bar)
    best = {k: c[0] for k, c in zip(keys, decoded)}
    hypotheses = {k: c.text for k, c in best.items()}
    references = {k: records[k].captions for k in keys}
    metrics, notes = coco_metrics(references, hypotheses, use_java=use_java)
    if without:
        notes.append(f"{len(without)} images of the {split} split were left out: their feature "
                     f"file in {run_cfg.cache} is missing or has the wrong size (e.g. "
                     f"{without[0]}); run extract-features --verify to repair the cache")
    result = {"run": run_dir, "split": split, "images": len(keys),
              "images_without_features": len(without),
              "decode": {"method": captioner.cfg.method, "beam": captioner.cfg.beam,
                         "length_penalty": captioner.cfg.length_penalty},
              **metrics, "notes": notes}
    objects = {k: records[k].objects for k in keys if records[k].objects is not None}
    if objects:
        sizes = {k: records[k].size or (manifest["image_size"],) * 2 for k in objects}
        result.update(shapes_metrics({k: hypotheses[k] for k in objects},
                                     {k: best[k].words for k in objects},
                                     {k: best[k].attention for k in objects}, objects, sizes))
    out = out or os.path.join(run_dir, "eval", f"{split}_metrics.json")
    results_path = os.path.splitext(out)[0].removesuffix("_metrics") + "_results.json"
    write_results(results_path, hypotheses, {k: records[k].image_id for k in keys})
    result.update(metrics_file=out, results_file=results_path)
    write_json_atomic(out, result)
    return result
