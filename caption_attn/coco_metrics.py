"""Coco-caption scores and the COCO results JSON; no TensorFlow needed.

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
- The jar's output must be one line per caption and nothing else: a JVM option that logs to
  stdout (JAVA_TOOL_OPTIONS=-Xlog:gc) adds lines that would shift every caption onto another
  image; then the jar counts as failed and the Python tokenizer is used, with a note.

One change to the tokens, where pycocoevalcap has no answer: Chinese and Japanese captions
(no spaces between words) are scored with each character a word, as the vocabulary
(`vocab.standardize`) makes them, on both sides, and their own punctuation dropped as the
vocabulary drops it (`_cjk_as_words`). PTB splits neither, so a reference was one
token against the model's characters and every metric 0 (exit 0, no note). Captions without
such characters are untouched.

Nothing is printed: `COCOEvalCap.evaluate`'s progress lines ("tokenization...") are not used,
BLEU runs with `verbose=0` (else it prints `{'testlen': ...}`), and the jars' stderr logs
("PTBTokenizer tokenized N tokens ...") are captured. Nothing is redirected either, so prints
of other threads (a training loop) are never swallowed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
import unicodedata
from typing import Hashable, Optional, Union

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from caption_attn.fileio import write_json_atomic
from caption_attn.vocab import CJK_CHARACTER, standardize

COCO_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

PTB_JAR = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                       ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
PTB_COMMAND = ["java", "-cp", PTB_JAR, "edu.stanford.nlp.process.PTBTokenizer",
               "-preserveLines", "-lowerCase"]  # as ptbtokenizer.py, minus the file argument
PUNCTUATIONS = frozenset(ptbtokenizer.PUNCTUATIONS)
NOTE_NO_METEOR = "METEOR needs Java (not found on PATH); reported the rest"
NOTE_CIDER_ONE_IMAGE = ("CIDEr left out: it needs at least 2 images (its document frequencies "
                        "come from the scored references, and with one image every word's "
                        "weight is 0, so any caption scores 0)")
NOTE_CJK = ("Chinese/Japanese characters scored as one word each, as the vocabulary splits "
            "them (PTB's tokenizer splits neither them nor their punctuation, which is "
            "dropped from the captions that hold such characters, as the vocabulary drops "
            "it)")
NOTE_PY_TOKENIZER = ("tokenized with a pure-Python imitation of the Java PTBTokenizer: scores "
                     "may differ slightly from pycocoevalcap's")

_LINE_BREAKS = re.compile("[\n\r\v\f\u2028\u2029]")  # all end a line in the jar
_SURROGATE = re.compile("[\ud800-\udfff]")

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
        # half a surrogate pair (json.loads takes "\ud83d") cannot go to the Java jars as
        # UTF-8: a UnicodeEncodeError from deep inside the tokenizer otherwise
        for name, text in [("hypotheses", caption)] + [("references", r) for r in refs]:
            if _SURROGATE.search(text):
                raise ValueError(f"`{name}`[{key!r}] holds half of a UTF-16 surrogate pair, "
                                 f"not a character: {text!r}")


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
    out_lines = done.stdout.decode(errors="replace").split("\n")
    if done.returncode != 0:
        raise RuntimeError(f"Stanford PTBTokenizer failed (exit {done.returncode}): "
                           f"{done.stderr.decode(errors='replace').strip()[-500:]}")
    # One line out per line in, and nothing else: a line more (the JVM's own log on stdout,
    # e.g. JAVA_TOOL_OPTIONS=-Xlog:gc, prints "[0.011s][info][gc] Using G1" first) would put
    # every later caption on the image before it, and only the count can tell.
    if len(out_lines) < len(keys) or any(out_lines[len(keys):]):
        found = len(out_lines) - (out_lines[-1] == "")
        raise RuntimeError(f"Stanford PTBTokenizer printed {found} lines for {len(keys)} "
                           f"captions (does a JVM option, e.g. in JAVA_TOOL_OPTIONS, print "
                           f"to its output? first line: {out_lines[0][:100]!r})")
    return _group(keys, out_lines)


_PY_REPLACE = {"\u201c": ' " ', "\u201d": ' " ', "\u2018": " ' ", "\u2019": "'",
               "\u2026": " ... ", "\x85": " ... ", "\u2014": " -- ", "\u2013": " -- ",
               # the jar's fractions and currency signs, as it writes them
               "\u00bc": " 1/4 ", "\u00bd": " 1/2 ", "\u00be": " 3/4 ", "\u2153": " 1/3 ",
               "\u2154": " 2/3 ", "\u20ac": " $ ", "\u00a3": " # ", "\u00a2": " cents ",
               # zero-width spaces and marks separate words; a soft hyphen joins them
               "\u200b": " ", "\u200e": " ", "\u200f": " ", "\ufeff": " ", "\u00ad": ""}
_PY_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-",
                "{": "-lcb-", "}": "-rcb-"}  # lowercased, so ptbtokenizer.py keeps them too
_PY_SPLITS = {"cannot": "can not", "gonna": "gon na", "wanna": "wan na", "gotta": "got ta",
              "gimme": "gim me", "lemme": "lem me"}
_BEYOND_BMP = re.compile("[\U00010000-\U0010ffff]")  # the jar drops them (untokenizable)
_CLITIC = r"(?:s|re|ve|ll|d|m)\b"  # after an apostrophe: it's, we're, you've, we'll, she'd
# The jar's abbreviations that keep their period, as CoreNLP 3.4.1 has them (checked with the
# jar, tests/test_coco_metrics.py): any case, but a letter in brackets only as written there
# (a capital: "Ill." keeps it, "ill." does not; "MFG." neither).
_ABBREV = (r"jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu(?:rs)?|fri"
           r"|ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb"
           r"|nev|okla|penn|tenn|va|vt|wisc?|wyo|(?-i:A)(?:z|rk)|(?-i:D)el|(?-i:I)ll|(?-i:L)a"
           r"|(?-i:M)(?:ass|iss)|(?-i:O)re|(?-i:P)a|(?-i:T)ex|(?-i:W)ash"
           r"|mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt"
           r"|cpl|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mme"
           r"|mlle|ph|jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq|inc|cos?|corp|pp?t(?-i:y)s?|ltd"
           r"|plc|bancorp|dept|bhd|assn|univ|intl|sys|invt|elec|natl|m(?-i:[ft])g|etc|al"
           r"|seq|vs|alex|wm|jos|cie|cf|treas|ft|tel|est|ext|sq|bldg")
# Words before which the jar takes a single letter's period for a sentence end ("plan b. The
# dog" -> "plan b . the dog"), as capitalised (THE too, not "the"), followed by a space: the
# ones found among 160 common words tried with the jar; it has more, induced from the WSJ.
_STARTERS = ("A An The He In It There They She We This Her Then As At If But So You Our Their "
             "These That What When While After Since Some Many One Here Now However Yet Once "
             "Last Other Such More").split()
_STARTER = "(?:" + "|".join(f"(?-i:{w[0]}){w[1:]}" for w in _STARTERS) + r")\s"
_STARTS_A_SENTENCE = re.compile(r"\s*" + _STARTER, re.IGNORECASE)
_LETTER_AND_PERIOD = re.compile(r"[a-z]\.", re.IGNORECASE)
# Matched on the caption as written (case counts for "AT&T" against "b & w"), IGNORECASE.
_PY_TOKEN = re.compile(rf"""
      <[a-z][\w-]*>                          # SGML-like tags stay whole: <unk>, <end>
    | [a-z0-9][^\s"<>|()]*@(?:[^\s"<>|().]+\.)*[^\s"<>|().]+   # e-mail: user@example.com
    | [<>]?[:;=][-o*']?[()\[\]dp\\{{@|](?!\w)   # smileys: :) :-( ;p
    | \.\.\.                                  # ellipsis
    | --                                      # dash
    | [!?]+                                   # "!!" and "?!" stay one token
    | \w+?(?=n't\b)                           # "do" of "don't", "ca" of "can't"
    | n't\b
    | '{_CLITIC}                               # 's 're 've 'll 'd 'm
    | 'n'|'n(?!\w)                            # 'n' of rock'n'roll, rock 'n roll, more'n
    | 't(?=(?:is|was)\b)                       # 'tis, 'twas
    | '(?:em|cause|til)\b                      # 'em, 'cause, 'til
    | (?<![^\W\d_])'\d+s?(?!\w|'s|")            # '90s, 5'10 (not '80's, 5'10" nor it'5)
    | (?<!\w)y'(?=[^\W\d_])                      # y' of y'all, y'know
    | (?:\d+[.,])?\w+(?:-\w+)+                  # well-known, 3-year-old, 4.5-inch
    | \d+(?:[.,:]\d+)+(?=[^\W\d_])            # 3.5 of 3.5mm, 1,000 of 1,000s
    | [^\W\d_](?:\.[^\W\d_])+\.?(?!\w)         # acronyms: u.s. a.b.c
    | (?:{_ABBREV})\.(?!\w)                   # titles etc. keep their period: mr. etc.
    | (?<!\w)[a-z]\.(?!\w|\s+{_STARTER})        # so does a single letter: "plan b." "b&w."
    | (?:ca|figs?|prop|nos?|art|pp|op)\.(?=\s*\d)   # before a number: no. 5, fig. 3
    | (?-i:[A-Z]+&[A-Z]+)\b                   # AT&T, B&W whole; b&w is b & w
    | c\+\+|[cf]\#                            # C++, C#, F#
    | \#[^\W\d_]\w*                            # #hashtag (but "# 1")
    | [-+]\.?\d+(?:[.,]\d+)*                   # signed numbers: -5, +1, -.5
    | @?\w+(?:[/.]\w+|'(?!{_CLITIC}|n'|n\b)[^\W\d_]\w*)*   # 2nd, 4x4, 1/2, 3.5, o'neil
      (?:[,:]\d+)*                             # 1,000  10:30
    | \S                                      # any other character on its own
""", re.VERBOSE | re.IGNORECASE)


def _py_tokenize_line(line: str, before_a_sentence: bool = False) -> str:
    """One caption, PTB-tokenized and lowercased (before punctuation removal).
    `before_a_sentence`: the next caption starts with a word of `_STARTERS`, which the jar,
    reading all captions as one text, sees after this one's last period."""
    text = _BEYOND_BMP.sub(" ", line)
    for old, new in _PY_REPLACE.items():
        text = text.replace(old, new)
    tokens = [t.lower() for t in _PY_TOKEN.findall(text)]
    if before_a_sentence and tokens and _LETTER_AND_PERIOD.fullmatch(tokens[-1]):
        tokens[-1:] = [tokens[-1][0], "."]   # "vitamin c." then "A dog ...": "vitamin c ."
    tokens = [_PY_BRACKETS.get(t, _PY_SPLITS.get(t, t)) for t in tokens]
    # a smiley's bracket as a bracket token's: ":)" -> ":-rrb-"
    tokens = [t[:-1] + _PY_BRACKETS[t[-1]] if len(t) > 1 and t[0] in "<>:;=" and
              t[-1] in _PY_BRACKETS else t for t in tokens]
    return " ".join("``" if t == '"' else t for t in tokens)


def ptb_tokenize_python(captions_for_image: dict[Key, list[str]]) -> dict[Key, list[str]]:
    """A pure-Python imitation of `ptb_tokenize_java` for machines without Java: lowercase,
    PTB splitting (clitics, n't, punctuation, brackets) and the same punctuation removal.
    Common captions come out identical, and so do the 326 of tests/ptb_tricky_captions.txt;
    what still differs: a single letter's period before a sentence-starting word that is not
    in `_STARTERS` (the jar's list is longer), other characters the jar cannot tokenize
    (it drops e.g. "\u20b9"), "v1.2.3" (jar: "v1 .2.3"), "1,000-2,000" (jar: "1,000-2 ,000")
    and more such constructs, rare in captions."""
    keys, lines = _sentences(captions_for_image)
    starts = [False] * len(lines)   # whether the next line that is not blank starts a sentence
    for i in range(len(lines) - 2, -1, -1):
        after = lines[i + 1]
        starts[i] = bool(_STARTS_A_SENTENCE.match(after + "\n")) if after.strip() else starts[i + 1]
    return _group(keys, [_py_tokenize_line(line, s) for line, s in zip(lines, starts)])


# --------------------------------------------------------------------------- coco metrics
class _Meteor(Meteor):
    """pycocoevalcap's METEOR without its `__del__`, which waits for the scorer's lock: a
    Ctrl-C inside `compute_score` left the lock taken, and `evaluate` printed "interrupted",
    then hung for ever in that `__del__` (`_meteor` ends the Java process itself)."""

    def __del__(self):
        pass


def _meteor(gts: dict, res: dict) -> float:
    """pycocoevalcap's METEOR; its Java process is always ended here (`_Meteor` has no
    `__del__` to do it), and what it writes on stderr is read and dropped: pycocoevalcap pipes it and never reads it, so a JVM
    writing more than a pipe holds (64 KB: warnings, a stack trace) stopped both processes,
    each waiting for the other, and `evaluate` hung."""
    meteor = _Meteor()
    proc = meteor.meteor_p
    drain = threading.Thread(target=_read_to_the_end, args=(proc.stderr,), daemon=True)
    drain.start()
    try:
        score, _ = meteor.compute_score(gts, res)
        return float(score)
    finally:
        proc.kill()
        proc.wait()
        drain.join(timeout=10)   # the pipe's end: the process is gone
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()


def _read_to_the_end(stream) -> None:
    """Read `stream` until it ends, dropping what it holds."""
    while stream.read(65536):
        pass


def _cjk_as_words(gts: dict, res: dict, notes: list[str]) -> tuple[dict, dict]:
    """References and hypotheses with each Chinese/Japanese character a word of its own and
    the non-ASCII punctuation, symbols and spaces of the captions holding one gone (、 。 ，
    ！ ・, the ideographic space: Unicode categories P, S, Z and C, which the vocabulary
    drops; a letter such as 々 is kept, as it keeps it; ASCII punctuation is left to PTB),
    with a note, when any caption has such a character; else as they are. The vocabulary
    makes each such character a word, PTB's tokenizer keeps a run of them one token: a
    reference "一只狗在跑。" was one token, no hypothesis of the model ("一 只 狗 在 跑")
    matched any n-gram of it, and every metric was 0."""
    captions = [c for caps in (*gts.values(), *res.values()) for c in caps]
    if not any(CJK_CHARACTER.search(c) for c in captions if not c.isascii()):
        return gts, res
    notes.append(NOTE_CJK)

    def split(caption: str) -> str:
        # only a caption that has one: the others' non-ASCII symbols are PTB's to tokenize
        # (one CJK reference made "man’s" of every English caption "man s", not "man 's")
        if caption.isascii() or not CJK_CHARACTER.search(caption):
            return caption
        caption = "".join(" " if not ch.isascii() and unicodedata.category(ch)[0] in "PSZC"
                          else ch for ch in caption)
        return CJK_CHARACTER.sub(r" \1 ", caption)
    return ({k: [split(c) for c in caps] for k, caps in gts.items()},
            {k: [split(c) for c in caps] for k, caps in res.items()})


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
    document frequencies come from the scored references, so it needs several images: with
    one it is left out, and a note says why.
    """
    _check_inputs(references, hypotheses)
    java = java_available() if use_java is None else bool(use_java)
    if use_java and not java_available():
        raise ValueError(f"`use_java` is {use_java!r} but no working `java` is on PATH")
    notes: list[str] = []
    gts = {k: list(references[k]) for k in hypotheses}
    res = {k: [h] for k, h in hypotheses.items()}
    gts, res = _tokenize_both(*_cjk_as_words(gts, res, notes), java, notes)
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
    if len(res) > 1:
        metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    else:  # log(N / df) is 0 for every n-gram: 0.0 whatever the caption
        notes.append(NOTE_CIDER_ONE_IMAGE)
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
