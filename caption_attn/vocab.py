"""Text standardisation and the word vocabulary.

Special tokens have fixed ids (`PAD`, `START`, `END`, `UNK`); code compares ids, never
strings. The vocabulary is fit on the train split only and saved as JSON.
"""

from __future__ import annotations

import collections
import hashlib
import re
import sys
import unicodedata
from typing import Iterable, Sequence

from caption_attn.fileio import read_json, write_json_atomic
from caption_attn.errors import UserError

PAD, START, END, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")

_SPACES = re.compile(r"\s+")
# Characters that join or hide inside words (soft hyphen, zero-width (non-)joiner, word joiner,
# BOM): removed, so "co\u00adoperate" is "cooperate" and an emoji's ZWJ leaves no word behind.
_REMOVED = dict.fromkeys(map(ord, "\u00ad\u200c\u200d\u2060\ufeff"))
# Scripts written without spaces between words: each Han ideograph, hiragana and katakana is a
# word of its own (as BERT's tokenizer does), else a whole Chinese caption was one "word".
CJK_CHARACTER = re.compile("([\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
                  "\uff66-\uff9f\U00020000-\U0003134f])")


def _strip_punctuation(text: str) -> str:
    # Unicode categories P* (punctuation), S* (symbols) and C* (control, format such as the
    # zero-width space, unassigned) become spaces, so "dog's" -> "dog s" (two words) and
    # letters of any script are kept.
    return "".join(" " if unicodedata.category(ch)[0] in "PSC" else ch for ch in text)


# `_strip_punctuation` of ASCII text as one str.translate (the per-character category lookups
# were most of the time of a COCO-sized caption file's tokenization)
_ASCII_PUNCTUATION = {c: " " for c in range(128) if unicodedata.category(chr(c))[0] in "PSC"}


def standardize(text: str) -> str:
    """Lowercase, strip punctuation, collapse whitespace; non-ASCII letters are kept, each
    CJK character is a word, and pieces without a letter or digit (an emoji's variation
    selector, a lone combining mark) are dropped.

    >>> standardize("  A Café,  near the SEA! ")
    'a café near the sea'
    """
    if text.isascii():   # nearly every caption: no normalising, nothing to remove or split
        return _SPACES.sub(" ", text.lower().translate(_ASCII_PUNCTUATION)).strip()
    # NFC again after lower() and the removals, which can leave text NFC would change ("J" +
    # combining caron lowers to "j" + caron, one character in NFC): a word saved so was not
    # what tokenize makes of it when read back
    text = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).lower()
                                 .translate(_REMOVED))
    text = _SPACES.sub(" ", _strip_punctuation(text)).strip()
    if text.isascii():
        return text
    words = _SPACES.sub(" ", CJK_CHARACTER.sub(r" \1 ", text)).strip().split(" ")
    return " ".join(w for w in words if any(ch.isalnum() for ch in w))


def tokenize(text: str) -> list[str]:
    """Standardised words of `text`."""
    s = standardize(text)
    return s.split(" ") if s else []


def tokenize_all(captions: Iterable[str]) -> list[list[str]]:
    """`tokenize` of each caption, for callers that keep a whole dataset's words: the words
    are interned, so a repeated word costs one pointer (300k captions of 8-16 words held in
    56 MB instead of 250 MB)."""
    return [[sys.intern(w) for w in tokenize(c)] for c in captions]


class Vocabulary:
    """Word <-> id mapping with the special tokens at ids 0..3.

    `words` are the regular words in id order (ids 4, 5, ...).
    """

    def __init__(self, words: Sequence[str]):
        words = list(words)
        clash = sorted(set(words) & set(SPECIAL_TOKENS))
        if clash:
            raise ValueError(f"`words` must not contain special tokens; got {clash}")
        if len(set(words)) != len(words):
            raise ValueError("`words` must be unique")
        self.tokens: list[str] = list(SPECIAL_TOKENS) + words
        self._ids = {w: i for i, w in enumerate(self.tokens)}

    @classmethod
    def fit(cls, captions: Iterable[str], vocab_size: int = 5000,
            min_count: int = 1) -> "Vocabulary":
        """Most frequent words of `captions` (count desc, then alphabetical), top `vocab_size`
        among those seen at least `min_count` times."""
        return cls.fit_words((tokenize(c) for c in captions), vocab_size, min_count)

    @classmethod
    def fit_words(cls, word_lists: Iterable[Sequence[str]], vocab_size: int = 5000,
                  min_count: int = 1) -> "Vocabulary":
        """`fit` on captions already split by `tokenize` (callers that also encode them
        tokenise each caption once)."""
        if vocab_size < 1:
            raise ValueError(f"`vocab_size` must be >= 1, got {vocab_size}")
        if min_count < 1:
            raise ValueError(f"`min_count` must be >= 1, got {min_count}")
        counts = collections.Counter(w for words in word_lists for w in words)
        ranked = sorted((w for w, n in counts.items() if n >= min_count),
                        key=lambda w: (-counts[w], w))
        return cls(ranked[:vocab_size])

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def id(self, word: str) -> int:
        return self._ids.get(word, UNK)

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """`<start>` + word ids (unknown words -> `<unk>`) + `<end>`; at most `max_length`
        words before `<end>`."""
        return self.encode_words(tokenize(text), max_length)

    def encode_words(self, words: Sequence[str], max_length: int | None = None) -> list[int]:
        """`encode` of a caption already split by `tokenize`."""
        if max_length is not None:
            words = words[:max_length]
        return [START] + [self.id(w) for w in words] + [END]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of `ids`, stopping at `<end>` and skipping `<pad>`/`<start>`."""
        words = []
        for i in ids:
            i = int(i)
            if i == END:
                break
            if i in (PAD, START):
                continue
            words.append(self.tokens[i] if 0 <= i < len(self.tokens) else SPECIAL_TOKENS[UNK])
        return words

    def digest(self) -> str:
        """sha256 of the tokens in id order: the model's weights are tied to this order."""
        return hashlib.sha256("\n".join(self.tokens).encode()).hexdigest()

    def save(self, path: str) -> None:
        write_json_atomic(path, {"special_tokens": list(SPECIAL_TOKENS),
                                 "words": self.tokens[len(SPECIAL_TOKENS):]})

    @classmethod
    def load(cls, path: str) -> "Vocabulary":
        d = read_json(path)
        if not isinstance(d, dict) or list(d.get("special_tokens", [])) != list(SPECIAL_TOKENS) \
                or not isinstance(d.get("words"), list):
            raise UserError(f"{path}: not a caption_attn vocabulary (expected special_tokens "
                            f"{list(SPECIAL_TOKENS)} and a words list)")
        bad = [w for w in d["words"] if not isinstance(w, str) or not w]
        if bad:
            raise UserError(f"{path}: words must be non-empty strings, got {bad[:3]!r}")
        try:
            return cls(d["words"])
        except ValueError as e:  # duplicates or special tokens among the words
            raise UserError(f"{path}: {e}") from None

    def refuse_words_never_tokenized(self, path: str) -> None:
        """UserError naming the first word `tokenize` never makes (hand-edited "Dog", "two
        words", or made by a version that tokenized otherwise, e.g. a whole Chinese caption
        as one word): resuming training, every caption holding it would be encoded with
        <unk> instead, silently. Decoding never tokenizes, so `caption`, `evaluate` and
        `export` use such a vocabulary as it is."""
        words = self.tokens[len(SPECIAL_TOKENS):]
        odd = next((w for w in words if tokenize(w) != [w]), None)
        if odd is not None:
            raise UserError(f"{path}: {odd!r} is not a word as captions are tokenized "
                            f"({tokenize(odd)!r}): the vocabulary was edited by hand or made "
                            f"by a version that tokenized captions otherwise, so training on "
                            f"would encode the captions holding it with <unk>; restore the "
                            f"file, or retrain the run (train --fresh)")
