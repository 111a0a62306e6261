"""N-grams of token ids as single int64 codes, and a hash table from code to id: the integer
machinery under CIDEr-D (`cider.py`).

An n-gram (w1, ..., wn) of ids >= 1 is coded sum_k w_k * V**(n-k) in base V (the vocabulary
size), so codes of different n never collide and n can be read back (`ngram_order`); V is at
most `MAX_VOCAB_SIZE` so that a 4-gram fits in an int64.
"""

from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np

from caption_attn.vocab import END, PAD, START

MAX_N = 4                    # CIDEr-D's n-grams are 1..4-grams
MAX_VOCAB_SIZE = 55108       # largest V with V**4 <= 2**63: a 4-gram's code fits in an int64
NONE = np.iinfo(np.int64).max   # code of an n-gram slot past the end of its sequence


def check_vocab_size(vocab_size) -> int:
    """`vocab_size` as an int, refused unless 4 <= V <= `MAX_VOCAB_SIZE`."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
            or not len((PAD, START, END)) < vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"`vocab_size` must be an int in 4..{MAX_VOCAB_SIZE} (a 4-gram is "
                         f"coded as one int64 in base V), got {vocab_size!r}")
    return int(vocab_size)


def ngram_order(codes: np.ndarray, vocab_size: int) -> np.ndarray:
    """n (1..4) of each n-gram code: an n-gram of ids >= 1 lies in [V**(n-1), V**n)."""
    v = np.int64(vocab_size)
    return 1 + (codes >= v) + (codes >= v * v) + (codes >= v * v * v)   # same shape, int


def ngram_codes(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int) -> np.ndarray:
    """Every 1..4-gram of each row of `tokens` as one int64, `NONE` past the row's length.

    An n-gram (w1, ..., wn) is coded sum_k w_k * V**(n-k); ids of real tokens are >= 1, so
    the codes of different n never collide and n can be read back (`ngram_order`).
    tokens (S, L) ints, lengths (S,) -> (S, P) int64 with P = sum over n of (L - n + 1).
    """
    s, width = tokens.shape
    t = tokens.astype(np.int64)                                       # (S, L)
    code = np.zeros((s, width), np.int64)                             # (S, L)
    parts = []
    for n in range(1, min(MAX_N, width) + 1):
        code = code[:, :width - n + 1] * vocab_size + t[:, n - 1:]    # (S, L-n+1)
        ends = np.arange(n, width + 1)                                # (L-n+1,) end positions
        parts.append(np.where(ends[None, :] <= lengths[:, None], code, NONE))  # (S, L-n+1)
    if not parts:
        return np.full((s, 0), NONE, np.int64)
    return np.concatenate(parts, axis=1)                              # (S, P)


def count_rows(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct codes of each row with their counts, `NONE` left out.

    codes (S, P) -> (row (U,) int64, code (U,) int64, count (U,) int64), sorted by row, code.
    """
    srt = np.sort(codes, axis=1)                                      # (S, P)
    first = np.ones(srt.shape, bool)                                  # (S, P)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    valid = srt != NONE                                              # (S, P)
    first &= valid
    rows, cols = np.nonzero(first)                                    # (U,) each
    group = np.cumsum(first.ravel()) - 1                              # (S*P,) distinct id
    counts = np.bincount(group[valid.ravel()], minlength=rows.size)   # (U,)
    return rows.astype(np.int64), srt[rows, cols], counts.astype(np.int64)


def pack(sequences: Sequence[Sequence[int]], with_end: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reference id sequences as a padded array and lengths, each as `words` + `<end>`.

    A sequence may be `Vocabulary.encode`d (leading `<start>`, `<end>`, padding) or bare word
    ids: a leading `<start>` is dropped and it is cut at the first `<end>` or `<pad>`.
    -> tokens (S, L + 1) int64, lengths (S,) int64 (`<end>` included when `with_end`).
    """
    lengths = np.fromiter((len(s) for s in sequences), np.int64, len(sequences))   # (S,)
    flat = np.fromiter(itertools.chain.from_iterable(sequences), np.int64,
                       int(lengths.sum()))                            # (sum lengths,)
    width = int(lengths.max(initial=0)) + 1
    tokens = np.zeros((len(sequences), width), np.int64)              # (S, L + 1)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    tokens[np.repeat(np.arange(len(sequences)), lengths), cols] = flat
    starts = tokens[:, 0] == START                                    # (S,)
    tokens[starts, :-1] = tokens[starts, 1:]
    tokens[starts, -1] = PAD
    return words(tokens, with_end, end_if_missing=True)


def words(tokens: np.ndarray, with_end: bool,
           end_if_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Cut each row at its first `<end>` or `<pad>`; with `with_end`, keep `<end>` as a last
    token where the row has one (or everywhere with `end_if_missing`: references).

    tokens (S, T) -> (tokens (S, T + 1) int64, lengths (S,) int64).
    """
    s, width = tokens.shape
    stop = (tokens == END) | (tokens == PAD)                          # (S, T)
    has_stop = stop.any(axis=1)                                       # (S,)
    first = stop.argmax(axis=1) if width else np.zeros(s, np.int64)   # (S,)
    words = np.where(has_stop, first, width)                          # (S,) word count
    out = np.zeros((s, width + 1), np.int64)                          # (S, T + 1)
    out[:, :width] = tokens
    if not with_end:
        return out, words
    ended = np.zeros(s, bool)                                         # (S,)
    ended[has_stop] = tokens[has_stop, words[has_stop]] == END
    ended |= end_if_missing
    out[np.arange(s)[ended], words[ended]] = END
    return out, words + ended                                         # (S, T + 1), (S,)


def check_ids(tokens: np.ndarray, vocab_size: int, name: str) -> None:
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
        raise ValueError(f"`{name}` holds ids outside 0..{vocab_size - 1} (`vocab_size` "
                         f"{vocab_size}), e.g. {int(bad[0])}")


def flatten_references(references: Mapping[int, Sequence[Sequence[int]]]
                        ) -> tuple[np.ndarray, list, np.ndarray]:
    """(image keys (I,) int64 sorted, sequences in that order, image row of each (S,))."""
    if not isinstance(references, Mapping) or not references:
        raise ValueError(f"`references` must be a non-empty dict image index -> list of id "
                         f"sequences, got {type(references).__name__} of "
                         f"{len(references) if hasattr(references, '__len__') else '?'}")
    keys = sorted(references)
    bad = [k for k in keys if isinstance(k, bool) or not isinstance(k, (int, np.integer))
           or k < 0]
    if bad:
        raise ValueError(f"`references` keys must be image indices (ints >= 0), got {bad[:3]!r}")
    empty = [k for k in keys if not len(references[k])]
    if empty:
        raise ValueError(f"`references`[{empty[0]!r}] has no reference caption")
    sequences = [s for k in keys for s in references[k]]
    counts = np.array([len(references[k]) for k in keys], np.int64)   # (I,)
    image_of = np.repeat(np.arange(len(keys)), counts)                # (S,)
    return np.array(keys, np.int64), sequences, image_of


def image_ngrams(sequences: list, image_of: np.ndarray, vocab_size: int, with_end: bool,
                  per_slot: bool, chunk: int = 4096) -> dict:
    """The distinct n-grams of each image's references, optionally with their count in each
    reference ("slot": the reference's place among its image's references).

    Works on `chunk` images at a time, each image one row of its references' n-gram codes
    sorted in place: no (600k captions, P) code matrix of 300 MB for COCO, and 2.5x faster
    than `np.unique` of each chunk's (image, n-gram) pairs (df of 113k images: 23.5 -> 9.3 s).
    -> {"image": (M,) int64 image row, "code": (M,) int64 n-gram, sorted by image then code;
        "tf" (per_slot only): (M, R) count of the n-gram in each of the image's R reference
        slots (R: most references of an image); "slot": (S,) int64 slot of each sequence;
        "length": (S,) int64 tokens of each sequence (`<end>` included when `with_end`)}
    """
    per_image = np.bincount(image_of)                                 # (I,)
    first_seq = np.concatenate([[0], np.cumsum(per_image)])           # (I + 1,)
    slot = np.arange(len(sequences)) - first_seq[image_of]            # (S,)
    width = int(per_image.max())
    images, codes, tfs, lengths = [], [], [], []
    for lo in range(0, per_image.size, chunk):
        hi = min(lo + chunk, per_image.size)
        s0, s1 = first_seq[lo], first_seq[hi]
        tokens, length = pack(sequences[s0:s1], with_end)            # (C, L+1), (C,)
        check_ids(tokens, vocab_size, "references")
        seq_codes = ngram_codes(tokens, length, vocab_size)           # (C, P)
        p = seq_codes.shape[1]
        grid = np.full((hi - lo, width, p), NONE, np.int64)          # (I_c, R, P)
        grid[image_of[s0:s1] - lo, slot[s0:s1]] = seq_codes
        grid = grid.reshape(hi - lo, width * p)                       # (I_c, R*P)
        if per_slot:
            order = np.argsort(grid, axis=1)                          # (I_c, R*P)
            grid = np.take_along_axis(grid, order, axis=1)            # (I_c, R*P) sorted
        else:
            grid.sort(axis=1)                                         # (I_c, R*P) sorted
        first = np.ones(grid.shape, bool)                             # (I_c, R*P)
        first[:, 1:] = grid[:, 1:] != grid[:, :-1]
        valid = grid != NONE                                         # (I_c, R*P)
        first &= valid
        rows, cols = np.nonzero(first)                                # (M_c,) each
        images.append(rows + lo)
        codes.append(grid[rows, cols])
        lengths.append(length)
        if per_slot:
            group = (np.cumsum(first.ravel()) - 1)[valid.ravel()]     # (n-grams,) pair id
            tf = np.bincount(group * width + (order // p).ravel()[valid.ravel()],
                             minlength=rows.size * width)             # (M_c * R,)
            tfs.append(tf.reshape(rows.size, width).astype(np.min_scalar_type(tf.max(initial=0))))
    out = {"image": np.concatenate(images), "code": np.concatenate(codes), "slot": slot,
           "length": np.concatenate(lengths)}
    if per_slot:
        out["tf"] = np.concatenate(tfs)
    return out


# --------------------------------------------------------------------------- code -> id
class CodeIndex:
    """Hash table from n-gram codes to their position in `codes`, for lookups in batches.

    Open addressing with linear probing in a power-of-two table at most 40% full, slot of a
    code = the top bits of code * 0x9E3779B97F4A7C15 (Fibonacci hashing). A lookup costs
    ~1.5 probes of two random reads, where a binary search of a 10M-code table costs ~23
    dependent ones: 11k batch n-grams against 12.4M codes took 0.75 ms instead of 4.8 ms
    (`np.searchsorted` even with the queries sorted).
    codes: (G,) distinct int64, in any order; the table holds G ids (int32 while G < 2**31).
    """

    _MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, codes: np.ndarray):
        self.codes = np.asarray(codes, np.int64)                          # (G,)
        self.bits = max(4, math.ceil(math.log2(max(2.5 * self.codes.size, 2))))
        dtype = np.int32 if self.codes.size < 2 ** 31 else np.int64
        self._table = np.full(1 << self.bits, -1, dtype)                  # (2**bits,)
        self._mask = (1 << self.bits) - 1
        pending = np.arange(self.codes.size)                              # (G,) ids to place
        slot = self._slots(self.codes)                                    # (G,)
        while pending.size:
            free = self._table[slot] < 0                                  # (P,)
            # Several ids may aim at one free slot: one write wins, the rest read it back.
            self._table[slot[free]] = pending[free]
            placed = self._table[slot] == pending                         # (P,)
            pending, slot = pending[~placed], (slot[~placed] + 1) & self._mask

    def _slots(self, codes: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):                                  # mod 2**64 wanted
            mixed = codes.astype(np.uint64) * self._MULTIPLIER            # same shape
        return (mixed >> np.uint64(64 - self.bits)).astype(np.int64)      # same shape

    def find(self, queries: np.ndarray) -> np.ndarray:
        """Position of each query in `codes`, -1 if absent: (Q,) int64 -> (Q,) int64."""
        queries = np.asarray(queries, np.int64)
        found = np.full(queries.size, -1, np.int64)                       # (Q,)
        todo = np.arange(queries.size)                                    # (Q,) unresolved
        slot = self._slots(queries)                                       # (Q,)
        while todo.size:
            held = self._table[slot]                                      # (P,) id or -1
            taken = held >= 0                                             # (P,)
            match = taken.copy()
            match[taken] = self.codes[held[taken]] == queries[todo[taken]]
            found[todo[match]] = held[match]
            probe = taken & ~match                                        # (P,) keep probing
            todo, slot = todo[probe], (slot[probe] + 1) & self._mask
        return found
