"""CIDEr-D on token ids, vectorised with numpy: the reward of self-critical training
(`scst.py`) and the `val_cider` of early stopping.

    df = DocumentFrequency.build(train_references, vocab_size)   # {image index: [id lists]}
    df.save(path); df = DocumentFrequency.load(path, vocab_size)
    reward = CiderD(train_references, df, with_end=True)         # once per run
    rewards = reward(image_index, sampled_ids)                   # (N,), (N, T) -> (N,)

No TensorFlow: the caller hands over numpy arrays of ids. A candidate has no `<start>`; it
ends at its first `<end>` or `<pad>` (a row with neither was cut at the maximum length).

**The score** is coco-caption's CIDEr-D, as `CiderScorer` of ruotianluo/cider (used by
self-critical.pytorch) computes it: for n = 1..4, tf x idf vectors with
idf = log(N) - log(max(1, df)) (N: train images counted, df: train images whose references
hold the n-gram, 0 for n-grams no train image has); per reference, the clipped dot product
sum min(v_cand, v_ref) * v_ref over the norms, times a Gaussian length penalty
exp(-delta**2 / (2 * 6**2)); mean over n, mean over the image's references, x10. coco-caption's
"length" counts bigrams (tokens - 1, 0 for an empty caption); kept as is, so the scores match.
pycocoevalcap's `Cider`, which `evaluate` reports, is the same formula, clipping and length
penalty included; it differs only in counting df over the references being scored instead of
the train split. Given exactly the references a df was counted on, it returns our rewards
to 1e-9 (tests/test_cider.py); it does not hold an unclipped variant.

**`<end>` in the n-grams** (`with_end`). SacreEOS (Hu et al. 2023) measured that putting
the end-of-sequence token into SCST's CIDEr-D changes results by up to 4 points, and papers
rarely say which they did. With `with_end=True`, `<end>` is appended to every reference and
kept as the last token of a candidate that produced it; a candidate cut at the maximum length
has none. The training reward uses it by default, as self-critical.pytorch does (its
references carry <eos> and its candidates keep the 0 they produced): a caption earns the
n-grams that end the references ("a horse <end>") only by finishing, so captions cut
mid-phrase ("a man riding a", cut or stopped) score lower. Without it, the same words score
the same whether the caption finished or was cut, and nothing in the reward discourages
endings like "... with a" (self-critical.pytorch's rewards.py carries a separate penalty
for captions ending in "a", "an", "the", "with", "of", "on", "in"). Validation CIDEr for
monitoring uses `with_end=False`: then the score is the evaluation metric's (words only),
comparable with `evaluate`'s CIDEr.
One df table serves both: it is counted with `<end>` appended, and n-grams of words alone
are counted the same either way.

**`<unk>` matches nothing.** References are encoded with the run's vocabulary, so a word
out of it is `<unk>` there ("a <unk> on grass" for "a zebra on grass"). A candidate's `<unk>`
is scored as a word no reference holds: it earns nothing, as the "<unk>" of a caption
matches no real word in `evaluate`'s CIDEr. (self-critical.pytorch lets it match, so its
reward pays a policy for saying `<unk>` in place of any rare word, and its validation
CIDEr ranked "a <unk> on grass" above "a on grass", which `evaluate` ranks below.) Its
df is 0, as that of a word no train image has.

**Layout for speed.** An n-gram of ids is one int64, sum w_k * V**(n-k) (V <= 55108 so that
V**4 fits; refused above). `CiderD` is built once per run: for every reference image the
distinct n-grams of its references (sorted ids, one contiguous segment per image) with their
count in each reference, each reference's tf-idf norm per n and its length. A call extracts
the candidates' n-grams (row sorts), looks their ids and df up in a hash table (`CodeIndex`),
gathers the segments of the batch's images and matches both with one `np.searchsorted` of a
few thousand keys, then sums with `np.bincount`: no Python loop over captions or n-grams.

**Measured** (2 cores of an AMD EPYC, shared with other jobs; numpy 2.4; synthetic COCO:
5 captions of 8-16 word ids, Zipf-like over V = 10,000, per image; independent words make far
more distinct 3- and 4-grams than real captions, so sizes are upper bounds):
- df of 113,287 images: 12.4M distinct 1..4-grams (92% in one image only), counted in
  9.3 s (100,000 images: 3.9-8.8 s over four runs); JSON 69.3 MB, written in 3.4 s, read
  in 2.2 s. Layouts tried on it: codes and counts as plain numbers 184 MB; {"5 17 2": df}
  197 MB (and 34 s to parse); per n, gaps between sorted codes plus counts 93 MB; the one
  kept (below) 69.3 MB. gzip would bring it to 30.5 MB but took 14.5 s to compress; a run
  writes the file once, so it stays plain JSON through `fileio`'s atomic writer and reader,
  whose errors name the file.
- `CiderD` over 100,000 images (21.3M distinct (image, n-gram) pairs): built in 9-16 s; it
  shares the df's codes (89 MB) and adds 390 MB (hash table 134, df counts 44, per-image
  n-gram ids 85 and counts per reference 106, norms 16); building it peaks 1.1 GB above that.
- A batch of 64 images x K = 5 candidates of <= 16 tokens (benchmarks/bench_reward.py,
  five runs): 3.2-3.6 ms of CPU time; wall-clock 3.2-3.3 ms when the machine was quiet,
  7.2-7.8 ms when other jobs competed for its 2 cores: ~98,000 candidates/s, ~3% of a
  100 ms training step. Looking the n-grams up with `np.searchsorted` in the sorted df
  codes instead of `CodeIndex` took 7.8 ms of CPU time.

**df JSON layout**: {"format", "version", "vocab_size", "num_images", "ngrams": {n: {df:
"gaps"}}}: per n and per document frequency, the sorted codes of those n-grams as one string
of space-separated gaps (first code, then differences). Grouping by df stores no count per
n-gram; gaps have about half the digits of codes; strings keep the indented JSON writer from
putting 12M numbers on lines of their own.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from caption_attn.errors import UserError
from caption_attn.fileio import read_json, write_json_atomic
from caption_attn.ngrams import (MAX_N, CodeIndex, check_ids, check_vocab_size,
                                 count_rows, flatten_references, image_ngrams,
                                 ngram_codes, ngram_order, words)
from caption_attn.vocab import START, UNK

DF_FORMAT = "caption_attn.cider.document_frequency"
DF_VERSION = 1


# --------------------------------------------------------------------------- document freq.
class DocumentFrequency:
    """How many train images have each n-gram in their references, as coco-caption counts.

    codes:      (D,) int64 sorted n-gram codes (`ngram_codes`, base `vocab_size`)
    counts:     (D,) int64 document frequency of each: images whose references (as a set)
                hold the n-gram, 1..num_images
    num_images: train images counted (CIDEr-D's idf is log(num_images) - log(max(1, df)))

    The references are counted with `<end>` appended (as self-critical.pytorch's
    prepro_ngrams.py does), so one table serves the reward with and without `<end>`: the
    n-grams of words alone are counted the same either way.
    """

    def __init__(self, codes: np.ndarray, counts: np.ndarray, num_images: int,
                 vocab_size: int):
        self.vocab_size = check_vocab_size(vocab_size)
        if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) \
                or num_images < 1:
            raise ValueError(f"`num_images` must be an int >= 1, got {num_images!r}")
        self.num_images = int(num_images)
        self.codes = np.asarray(codes, np.int64)                      # (D,)
        self.counts = np.asarray(counts, np.int64)                    # (D,)
        if self.codes.ndim != 1 or self.codes.shape != self.counts.shape:
            raise ValueError(f"`codes` and `counts` must be 1-D of one length, got shapes "
                             f"{self.codes.shape} and {self.counts.shape}")
        if self.codes.size and (np.any(np.diff(self.codes) <= 0) or self.codes[0] < 1
                                or self.codes[-1] >= self.vocab_size ** MAX_N):
            raise ValueError("`codes` must be strictly increasing n-gram codes in "
                             f"1..{self.vocab_size}**{MAX_N}-1")
        if self.counts.size and (self.counts.min() < 1 or self.counts.max() > num_images):
            raise ValueError(f"`counts` must be in 1..`num_images` ({num_images}), got "
                             f"{self.counts.min()}..{self.counts.max()}")

    @classmethod
    def build(cls, references: Mapping[int, Sequence[Sequence[int]]],
              vocab_size: int) -> "DocumentFrequency":
        """Count the n-grams of `references` {train image index: [id sequences]} (see `pack`
        for the accepted sequences)."""
        vocab_size = check_vocab_size(vocab_size)
        keys, sequences, image_of = flatten_references(references)
        pairs = image_ngrams(sequences, image_of, vocab_size, with_end=True, per_slot=False)
        # An image counts once per n-gram however many of its captions hold it.
        codes, counts = np.unique(pairs["code"], return_counts=True)  # (D,) each
        return cls(codes, counts, num_images=keys.size, vocab_size=vocab_size)

    def __len__(self) -> int:
        return int(self.codes.size)

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """Document frequency of each code (0 for n-grams of no train image); same shape."""
        if not self.codes.size:
            return np.zeros(np.shape(codes), np.int64)
        at = np.searchsorted(self.codes, codes).clip(max=self.codes.size - 1)  # same shape
        return np.where(self.codes[at] == codes, self.counts[at], 0)  # same shape

    def get(self, ngram: Sequence[int]) -> int:
        """Document frequency of one n-gram given as ids, e.g. `df.get((5, 17))`."""
        if not 1 <= len(ngram) <= MAX_N:
            raise ValueError(f"`ngram` must have 1..{MAX_N} ids, got {tuple(ngram)!r}")
        code = 0
        for w in ngram:
            code = code * self.vocab_size + int(w)
        return int(self.lookup(np.array([code], np.int64))[0])

    # ------------------------------------------------------------------ JSON file
    def to_json(self) -> dict:
        """The JSON layout (see the module docstring): per n, per document frequency, the
        sorted codes of those n-grams as one string of space-separated gaps."""
        order = ngram_order(self.codes, self.vocab_size)              # (D,)
        groups: dict[str, dict[str, str]] = {}
        for n in range(1, MAX_N + 1):
            codes, counts = self.codes[order == n], self.counts[order == n]     # (D_n,)
            by_df = np.argsort(counts, kind="stable")                 # (D_n,) codes stay sorted
            codes, counts = codes[by_df], counts[by_df]
            values, starts = np.unique(counts, return_index=True)     # (G,) each
            groups[str(n)] = {
                str(v): " ".join(map(str, np.diff(c, prepend=0).tolist()))
                for v, c in zip(values.tolist(), np.split(codes, starts[1:]))}
        return {"format": DF_FORMAT, "version": DF_VERSION, "vocab_size": self.vocab_size,
                "num_images": self.num_images, "ngrams": groups}

    @classmethod
    def from_json(cls, d, source: str = "document frequencies") -> "DocumentFrequency":
        """Inverse of `to_json`; a malformed `d` is a `UserError` naming `source`."""
        def fail(what: str):
            raise UserError(f"{source}: not valid caption_attn document frequencies ({what})")

        if not isinstance(d, dict) or d.get("format") != DF_FORMAT:
            fail(f"expected \"format\": \"{DF_FORMAT}\"")
        if d.get("version") != DF_VERSION:
            fail(f"version {d.get('version')!r}, this code reads {DF_VERSION}")
        try:
            vocab_size = check_vocab_size(d.get("vocab_size"))
        except ValueError as e:
            fail(str(e))
        groups = d.get("ngrams")
        if not isinstance(groups, dict) or set(groups) - {str(n) for n in range(1, MAX_N + 1)}:
            fail("\"ngrams\" must map n in 1..4 to {document frequency: codes}")
        codes, counts = [], []
        for n, by_df in groups.items():
            if not isinstance(by_df, dict) or not all(
                    value.isdigit() and isinstance(gaps, str) for value, gaps in by_df.items()):
                fail(f"\"ngrams\"[\"{n}\"] must map document frequencies to strings of codes")
            for value, gaps in by_df.items():
                where = f"\"ngrams\"[\"{n}\"][\"{value}\"]"
                try:
                    steps = np.fromstring(gaps, np.int64, sep=" ")    # (D_g,) gaps
                except ValueError:
                    fail(f"{where} holds something else than integers")
                group = np.cumsum(steps)                              # (D_g,) codes
                if steps.size == 0 or steps.min() < 1 \
                        or np.any(ngram_order(group, vocab_size) != int(n)):
                    fail(f"{where} must be increasing codes of {n}-grams")
                codes.append(group)
                counts.append(np.full(steps.size, int(value), np.int64))
        codes = np.concatenate(codes) if codes else np.zeros(0, np.int64)      # (D,)
        counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)   # (D,)
        order = np.argsort(codes)                                     # (D,)
        try:
            return cls(codes[order], counts[order], d.get("num_images"), vocab_size)
        except ValueError as e:
            fail(str(e))

    def save(self, path: str) -> None:
        """Write the table to `path` as JSON, atomically."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str, vocab_size: Optional[int] = None) -> "DocumentFrequency":
        """Read a table written by `save`; a missing, truncated or malformed file, or one for
        another `vocab_size` (when given), is a `UserError` naming `path`."""
        df = cls.from_json(read_json(path), source=path)
        if vocab_size is not None and df.vocab_size != vocab_size:
            raise UserError(f"{path}: document frequencies of a vocabulary of "
                            f"{df.vocab_size} ids, but this run's has {vocab_size}; delete "
                            "the file to count them again")
        return df


# --------------------------------------------------------------------------- CIDEr-D
class CiderD:
    """CIDEr-D of sampled captions against their image's references, a batch at a time.

    references: {image index: [id sequences]} (see `pack`), the images whose captions will
                be scored (the train split for the reward, val for monitoring)
    df:         `DocumentFrequency` of the train split (idf = log(df.num_images) -
                log(max(1, df)), 0-count n-grams included, as coco-caption)
    sigma:      width of the Gaussian length penalty (coco-caption: 6)
    with_end:   `<end>` is a token of the n-grams: appended to every reference and kept as
                the last token of a candidate that produced it (see the module docstring)

    Built once: the n-grams of every reference image with their count in each reference,
    each reference's tf-idf norms per n and length; `__call__` then only extracts the
    candidates' n-grams and matches them against their own image's.
    """

    def __init__(self, references: Mapping[int, Sequence[Sequence[int]]],
                 df: DocumentFrequency, sigma: float = 6.0, with_end: bool = True):
        if not isinstance(df, DocumentFrequency):
            raise ValueError(f"`df` must be a DocumentFrequency, got {type(df).__name__}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
            raise ValueError(f"`sigma` must be a number > 0, got {sigma!r}")
        if not isinstance(with_end, bool):
            raise ValueError(f"`with_end` must be True or False, got {with_end!r}")
        self.sigma, self.with_end = float(sigma), with_end
        self.vocab_size, self.num_df_images = df.vocab_size, df.num_images
        self._image_keys, sequences, image_of = flatten_references(references)
        t = image_ngrams(sequences, image_of, self.vocab_size, with_end, per_slot=True)
        # One id per n-gram of the df table or of the references (val references may hold
        # n-grams no train image has: added with df 0). The table and batches use ids, in
        # the order of the codes: `__call__` finds a candidate's n-grams by a binary search
        # of each image's ids, sorted as its codes are. (Appended after the df's codes, the
        # new n-grams' ids broke that order, and val_cider missed real matches: 199 of 200
        # COCO-like val images scored low, by up to 57 %.)
        index, counts = CodeIndex(df.codes), df.counts
        ids = index.find(t["code"])                                        # (M,)
        extra = np.unique(t["code"][ids < 0])                              # (E,)
        if extra.size:
            codes = np.union1d(df.codes, extra)                            # (G,) = (D + E,)
            counts = np.zeros(codes.size, np.int64)                        # (G,)
            counts[np.searchsorted(codes, df.codes)] = df.counts
            index = CodeIndex(codes)
            ids = index.find(t["code"])                                    # (M,)
        self._index, self._shares_df_codes = index, not extra.size
        self._df = counts.astype(np.min_scalar_type(df.num_images))        # (G,)
        self._ref_ids = ids.astype(index._table.dtype)                     # (M,)
        self._ref_tf = t["tf"]                                             # (M, R)
        self._segment = np.searchsorted(t["image"], np.arange(self._image_keys.size + 1))  # (I+1,)
        self._num_refs = np.bincount(image_of)                             # (I,)
        r = self._ref_tf.shape[1]
        lengths = np.zeros((self._image_keys.size, r), np.int64)           # (I, R)
        lengths[image_of, t["slot"]] = t["length"]
        self._ref_bigrams = np.maximum(lengths - 1, 0)                     # (I, R)
        self._ref_norm = self._reference_norms(t["image"], r)              # (I, R, 4)

    @property
    def nbytes(self) -> int:
        """Memory of the tables built here (the df's codes are shared, not counted)."""
        own = (self._index._table, self._df, self._ref_ids, self._ref_tf, self._ref_norm,
               self._ref_bigrams, self._segment, self._num_refs, self._image_keys)
        return sum(a.nbytes for a in own) + (0 if self._shares_df_codes
                                             else self._index.codes.nbytes)

    def _idf(self, ids: np.ndarray) -> np.ndarray:
        """idf of each n-gram id (-1: no train image has it, df 0); same shape, float64."""
        counts = np.where(ids >= 0, self._df[ids.clip(0)], 0)              # same shape
        return np.log(float(self.num_df_images)) - np.log(np.maximum(1.0, counts))

    def _reference_norms(self, image: np.ndarray, r: int, chunk: int = 1 << 20) -> np.ndarray:
        """Euclidean norm of each reference's tf-idf vector per n: (I, R, 4) float64."""
        squares = np.zeros(self._image_keys.size * r * MAX_N)              # (I*R*4,)
        slots = np.arange(r)                                                # (R,)
        for lo in range(0, image.size, chunk):
            ids = self._ref_ids[lo:lo + chunk]                             # (C,)
            vec = self._ref_tf[lo:lo + chunk] * self._idf(ids)[:, None]    # (C, R)
            n = ngram_order(self._index.codes[ids], self.vocab_size) - 1   # (C,)
            where = ((image[lo:lo + chunk, None] * r + slots) * MAX_N + n[:, None])  # (C, R)
            squares += np.bincount(where.ravel(), (vec * vec).ravel(), squares.size)
        return np.sqrt(squares).reshape(self._image_keys.size, r, MAX_N)   # (I, R, 4)

    def _rows(self, image_index: np.ndarray) -> np.ndarray:
        """Reference row of each image index; a `ValueError` for one without references."""
        at = np.searchsorted(self._image_keys, image_index).clip(max=self._image_keys.size - 1)
        missing = self._image_keys[at] != image_index                       # (N,)
        if missing.any():
            raise ValueError(f"`image_index` {int(image_index[missing][0])} has no "
                             f"references ({missing.sum()} of {image_index.size} such)")
        return at

    def __call__(self, image_index, candidates) -> np.ndarray:
        """CIDEr-D of each candidate against the references of its image.

        image_index: (N,) ints, keys of `references`
        candidates:  (N, T) ids without `<start>`: words, then `<end>` and `<pad>`s, or T
                     words if the caption was cut at the maximum length; a candidate ends at
                     its first `<end>` or `<pad>`
        -> (N,) float64 rewards (coco-caption's scale: x10)
        """
        image_index = np.asarray(image_index)
        candidates = np.asarray(candidates)
        if image_index.ndim != 1 or not np.issubdtype(image_index.dtype, np.integer):
            raise ValueError(f"`image_index` must be a 1-D int array, got shape "
                             f"{image_index.shape} of {image_index.dtype}")
        if candidates.ndim != 2 or candidates.shape[0] != image_index.size or \
                not np.issubdtype(candidates.dtype, np.integer):
            raise ValueError(f"`candidates` must be an int array (N={image_index.size}, T), "
                             f"got shape {candidates.shape} of {candidates.dtype}")
        check_ids(candidates, self.vocab_size, "candidates")
        # A candidate's <unk> matches nothing: as <start>, which no reference holds (`pack`
        # drops the leading one). A reference's <unk> stands for a word out of the
        # vocabulary; "a <unk> on grass" must not match "a zebra on grass" (see the module
        # docstring).
        candidates = np.where(candidates == UNK, START, candidates)
        n_cand, r = image_index.size, self._ref_tf.shape[1]
        rows = self._rows(image_index)                                      # (N,)
        tokens, length = words(candidates, self.with_end)                  # (N, T+1), (N,)
        cand, code, tf = count_rows(ngram_codes(tokens, length, self.vocab_size))  # (U,) each
        n = ngram_order(code, self.vocab_size) - 1                          # (U,) 0..3

        ids = self._index.find(code)                                        # (U,) -1: no df
        vec = tf * self._idf(ids)                                           # (U,) tf-idf
        norm = np.sqrt(np.bincount(cand * MAX_N + n, vec * vec, n_cand * MAX_N)
                       ).astype(np.float64).reshape(n_cand, MAX_N)          # (N, 4)

        # Match against the references of the batch's images only: their table rows,
        # gathered, keyed image-in-batch * G + id (sorted: images in order, ids within).
        images, local = np.unique(rows, return_inverse=True)                # (B,), (N,)
        lo, hi = self._segment[images], self._segment[images + 1]           # (B,) each
        span = hi - lo                                                      # (B,)
        gathered = np.repeat(lo - np.cumsum(span) + span, span) + np.arange(span.sum())  # (Mb,)
        size = self._index.codes.size
        keys = np.repeat(np.arange(images.size), span) * size + self._ref_ids[gathered]  # (Mb,)
        want = local[cand] * size + ids                                     # (U,)
        at = np.searchsorted(keys, want).clip(max=max(keys.size - 1, 0))    # (U,)
        hit = (ids >= 0) & (keys[at] == want) if keys.size else np.zeros(ids.size, bool)  # (U,)
        ref_vec = self._ref_tf[gathered[at[hit]]] * self._idf(ids[hit])[:, None]  # (H, R)
        clipped = np.minimum(vec[hit, None], ref_vec) * ref_vec             # (H, R)
        where = ((cand[hit] * MAX_N + n[hit])[:, None] * r + np.arange(r))  # (H, R)
        dot = np.bincount(where.ravel(), clipped.ravel(), n_cand * MAX_N * r
                          ).astype(np.float64).reshape(n_cand, MAX_N, r)    # (N, 4, R)

        denom = norm[:, :, None] * self._ref_norm[rows].transpose(0, 2, 1)  # (N, 4, R)
        sim = np.divide(dot, denom, out=np.zeros_like(dot), where=denom != 0)  # (N, 4, R)
        delta = np.maximum(length - 1, 0)[:, None] - self._ref_bigrams[rows]  # (N, R)
        penalty = np.exp(-(delta * delta) / (2 * self.sigma ** 2))          # (N, R)
        real = np.arange(r) < self._num_refs[rows][:, None]                 # (N, R)
        per_ref = np.where(real, sim.mean(axis=1) * penalty, 0.0)           # (N, R)
        return 10.0 * per_ref.sum(axis=1) / self._num_refs[rows]            # (N,)
