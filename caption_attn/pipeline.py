"""tf.data only: cached feature paths + token ids -> batches.

Features are read in-graph (`tf.io.read_file` + `tf.io.decode_raw` past the .npy header whose
length the cache manifest records), so no Python runs on the hot path. Every file read is
checked in-graph (size, the exact header bytes, every value finite); a damaged one fails with
`tf.errors.InvalidArgumentError` whose message holds "damaged feature file: <path> (<reason>)"
and the fix, which `damaged_from_error` extracts. Captions are grouped by length into
buckets and padded to the bucket's boundary, so a batch of short captions is not padded to the
longest caption of the dataset, and the set of batch shapes stays small (one XLA compilation
per bucket at most).
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from caption_attn.backbone import FEATURE_SHAPE
from caption_attn.errors import TrainingError, UserError
from caption_attn.feature_cache import npy_header

AUTOTUNE = tf.data.AUTOTUNE
# Padded lengths (in tokens, <start> and <end> included) that batches are cut to. Dense where
# captions are common (COCO: mean ~12, p95 ~18 tokens), sparse in the tail.
_LADDER = (8, 10, 12, 14, 16, 18, 20, 24, 28, 32, 40, 48, 64, 96, 128, 192, 256)


def bucket_boundaries(max_tokens: int) -> list[int]:
    """Bucket boundaries for captions of at most `max_tokens` tokens.

    `tf.data`'s bucketing puts a caption of length L in the first bucket with L < boundary
    and pads it to boundary - 1, so the last boundary is max_tokens + 1.
    """
    return [b for b in _LADDER if b <= max_tokens] + [max_tokens + 1]


# What one time step of a forward pass costs besides its rows, in rows: a batch padded to T
# tokens costs about T x (STEP_ROWS + its rows). A rough estimate from bench_epoch's
# validation pass (E 256, U 512, V 5001) on 2 Zen 5 cores: 11 batches, 211 time steps and
# ~2,400 caption-steps took 0.49 s, ~1-2 ms per time step against ~27 us of arithmetic per
# caption-step, so a step is worth 40-70 rows there; 32 errs on the side of keeping
# buckets apart (padding costs arithmetic on every CPU).
STEP_ROWS = 32


def merged_boundaries(lengths: Sequence[int], batch_size: int, boundaries: Sequence[int],
                      step_rows: int = STEP_ROWS) -> list[int]:
    """The boundaries among `boundaries` (the last one always) that cut captions of `lengths`
    tokens into the buckets a forward-only pass runs fastest: adjacent buckets are merged
    where one longer time loop over more rows costs less than a loop per bucket. A small
    split (a validation set of 200 captions spread over 11 buckets, five of them holding 1-3
    captions) otherwise runs a whole time loop for a handful of captions, bound by the
    loop's per-step cost, not by arithmetic; full buckets of a large split stay apart.
    Exact by dynamic programming over the groups of consecutive buckets, with a batch of
    `batch_size` rows padded to T tokens costing T x (`step_rows` + rows)."""
    edges = list(boundaries)
    counts = bucket_counts(lengths, edges)[:len(edges)]   # none at or above the last edge
    padded = [b - 1 for b in edges]        # tf.data pads bucket k to boundary k - 1

    def cost(first: int, last: int) -> float:          # buckets first..last as one
        rows = int(counts[first:last + 1].sum())
        return padded[last] * (step_rows * math.ceil(rows / batch_size) + rows) if rows else 0.0

    best, cut = [0.0] + [math.inf] * len(edges), [0] * (len(edges) + 1)
    for end in range(1, len(edges) + 1):               # best[end]: buckets 0..end-1
        for start in range(end):
            c = best[start] + cost(start, end - 1)
            if c < best[end]:
                best[end], cut[end] = c, start
    kept, end = [], len(edges)
    while end:
        kept.append(edges[end - 1])
        end = cut[end]
    return sorted(kept)


def bucket_counts(lengths: Sequence[int], boundaries: Sequence[int]) -> np.ndarray:
    """Captions of `lengths` tokens per bucket of `caption_dataset` (len(boundaries) + 1:
    bucket k holds boundaries[k - 1] <= length < boundaries[k])."""
    buckets = np.searchsorted(np.asarray(boundaries), np.asarray(lengths, np.int64),
                              side="right")
    return np.bincount(buckets, minlength=len(boundaries) + 1)


def count_batches(lengths: Sequence[int], batch_size: int, boundaries: Sequence[int]) -> int:
    """Exact number of batches `caption_dataset` yields for captions of `lengths` tokens
    (buckets flush their rest at the end)."""
    return int(sum(math.ceil(c / batch_size) for c in bucket_counts(lengths, boundaries)))


# In-graph checks of a feature file: problem codes and their reasons (`NpyReader.inspect`).
PROBLEMS = ("ok", "wrong size", "bad .npy header", "non-finite values")
DAMAGED = "damaged feature file: "
FIX = ("run `caption-attn extract-features --verify` with the cache's --captions/--images "
       "and --cache: it re-extracts damaged feature files")
_DAMAGED_RE = re.compile(re.escape(DAMAGED) + r"(.+?) \((" +
                         "|".join(re.escape(p) for p in PROBLEMS[1:]) + r")\)")


# A feature file that cannot be read at all (deleted, made unreadable or a folder since the
# run started) fails tf.io.read_file: "...: Iterator::Root::...: PATH; No such file or
# directory\n\t [[...ReadFile]]" from a dataset, "...}} PATH; reason [Op:ReadFile]" eagerly.
_READ_FAILED_RES = (re.compile(r"Iterator(?:::\w+)+: ([^\n]+?\.npy); ([^\n\[]+?)\s*(?:\n|\[)"),
                    re.compile(r"\}\} ([^\n]+?\.npy); ([^\n\[]+?)\s*(?:\n|\[)"))
# what iterating a dataset of feature files raises for a damaged or unreadable one
READ_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.NotFoundError,
               tf.errors.PermissionDeniedError, tf.errors.FailedPreconditionError)


def damaged_from_error(exc: BaseException) -> Optional[tuple[str, str]]:
    """(feature file, what is wrong with it) named by an `NpyReader` check failure (e.g. the
    `tf.errors.InvalidArgumentError` raised while iterating a dataset: one of PROBLEMS) or
    by its failure to read the file (one of `READ_ERRORS`: "missing", or "unreadable:
    REASON"), else None."""
    message = getattr(exc, "message", None) or str(exc)
    m = _DAMAGED_RE.search(message)
    if m:
        return m.group(1), m.group(2)
    if "ReadFile" in message:
        for pattern in _READ_FAILED_RES:
            m = pattern.search(message)
            if m:
                reason = m.group(2).strip()
                return m.group(1), ("missing" if reason == "No such file or directory"
                                    else f"unreadable: {reason[:1].lower()}{reason[1:]}")
    return None


class DamagedFeatures(Exception):
    """A feature file that failed the in-graph checks, or could not be read, while a batch
    was read (`checked`)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{DAMAGED}{path} ({reason})")
        self.path, self.reason = path, reason

    def advice(self, repair: str, then: str) -> str:
        """The file, what is wrong with it and `repair` (the full `extract-features --verify`
        command of the cache), then what to do after it."""
        return f"{self}: repair the cache with `{repair}`, then {then}"

    def stop(self, repair: str, step: Optional[int] = None) -> TrainingError:
        """The error that ends training here; `step`: where a checkpoint was saved, so that
        the rerun continues from it (None: none)."""
        resume = "" if step is None else \
            f": it continues from step {step} (a checkpoint was saved)"
        return TrainingError(self.advice(repair, "rerun this command" + resume))


def checked(batches):
    """Iterate a dataset of feature batches, turning the error of a damaged or unreadable
    feature file (`damaged_from_error`) into `DamagedFeatures`; other errors pass."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except READ_ERRORS as e:
            found = damaged_from_error(e)
            if found is None:
                raise
            raise DamagedFeatures(*found) from None
        yield batch


class NpyReader:
    """Reads `.npy` feature files of one known header, shape and dtype in-graph, checked.

    Each file's size, header bytes (byte-identical to the header `extract-features` writes)
    and finiteness are checked; a failure names the file (`DAMAGED`) and the fix (`FIX`).
    Measured cost of the checks: see `benchmarks/bench_feature_index.py` (README, Speed).
    """

    def __init__(self, header_bytes: int, dtype: str, shape: Sequence[int]):
        self.header_bytes = int(header_bytes)
        self.dtype = tf.as_dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.num_bytes = int(np.prod(self.shape)) * self.dtype.size
        self.header = npy_header(dtype, self.shape)
        if len(self.header) != self.header_bytes:
            raise UserError(f"npy_header_bytes {self.header_bytes} does not match the .npy "
                            f"header of {dtype} {self.shape} ({len(self.header)} bytes): the "
                            f"cache manifest is damaged")

    @classmethod
    def from_manifest(cls, manifest: dict) -> "NpyReader":
        """The reader of a feature cache, from its `manifest.json` contents."""
        return cls(manifest["npy_header_bytes"], manifest["dtype"], manifest["feature_shape"])

    def has_file(self, path: str) -> bool:
        """Whether `path` exists with exactly the size of a feature file of this cache (a
        cheap check; `feature_cache.usable_features` also checks the file's provenance)."""
        try:
            return os.stat(path).st_size == self.header_bytes + self.num_bytes
        except OSError:
            return False

    def _read(self, path):
        """path (scalar string) -> (features (P, F), problem code: 0, 1 wrong size or 2 bad
        header); a file of the wrong size yields zeros."""
        raw = tf.io.read_file(path)                                   # scalar string
        size_ok = tf.equal(tf.strings.length(raw), self.header_bytes + self.num_bytes)
        header_ok = tf.equal(tf.strings.substr(raw, 0, self.header_bytes), self.header)
        values = tf.cond(                                             # (P*F,)
            size_ok,
            lambda: tf.io.decode_raw(tf.strings.substr(raw, self.header_bytes, self.num_bytes),
                                     self.dtype, little_endian=True),
            lambda: tf.zeros([int(np.prod(self.shape))], self.dtype))
        code = tf.where(size_ok, tf.where(header_ok, 0, 2), 1)
        return tf.reshape(values, self.shape), code                  # (P, F), ()

    def inspect_batch(self, paths):
        """paths (B,) -> (features (B, P, F), problem codes (B,) int32: index in PROBLEMS),
        never failing. Files are read and decoded one after the other; the finiteness test
        runs once on the whole batch (see `benchmarks/bench_feature_index.py` for the cost)."""
        values, codes = tf.map_fn(self._read, paths, fn_output_signature=(   # (B, P, F), (B,)
            tf.TensorSpec(self.shape, self.dtype), tf.TensorSpec([], tf.int32)))
        finite = tf.reduce_all(tf.math.is_finite(values), axis=[1, 2])   # (B,)
        return values, tf.where(tf.equal(codes, 0) & ~finite, 3, codes)

    def batch(self, paths):
        """paths (B,) -> features (B, P, F); InvalidArgumentError naming the first damaged
        file (`DAMAGED`) and the fix (`FIX`)."""
        values, codes = self.inspect_batch(paths)                     # (B, P, F), (B,)
        bad = tf.concat([codes > 0, [True]], axis=0)                  # (B + 1,) never empty
        first = tf.argmax(tf.cast(bad, tf.int32), output_type=tf.int32)
        path = tf.concat([paths, [""]], axis=0)[first]
        reason = tf.gather(PROBLEMS, tf.concat([codes, [0]], axis=0)[first])
        check = tf.debugging.Assert(tf.reduce_all(codes == 0), [tf.strings.join(
            [DAMAGED, path, " (", reason, ")"]), FIX])
        with tf.control_dependencies([check]):
            return tf.identity(values)                                # (B, P, F)

    def __call__(self, path):
        """path (scalar string) -> features (P, F), checked as in `batch`."""
        return self.batch(tf.reshape(path, [1]))[0]                   # (P, F)


class FeatureTable:
    """All features of a split held in memory (a CPU variable) and gathered by index.

    Every row is checked while the table is built; damaged files are a `UserError` naming
    them (before training starts)."""

    def __init__(self, reader: NpyReader, paths: Sequence[str], batch_size: int = 256,
                 fix: str = FIX):
        problems = []
        with tf.device("/cpu:0"):
            ds = tf.data.Dataset.from_tensor_slices(list(paths)).batch(batch_size)
            parts = []
            batches = ds.map(reader.inspect_batch, num_parallel_calls=AUTOTUNE).prefetch(
                AUTOTUNE)
            try:
                for start, (features, codes) in zip(range(0, len(paths), batch_size),
                                                    checked(batches)):
                    parts.append(features)                            # (B, P, F)
                    problems += [(paths[start + i], PROBLEMS[c])
                                 for i, c in enumerate(codes.numpy()) if c]
            except DamagedFeatures as e:                              # not readable at all
                problems.append((e.path, e.reason))
            if problems:
                raise UserError(damaged_files_message(problems, fix=fix))
            self.table = tf.Variable(tf.concat(parts, axis=0), trainable=False,
                                     name="feature_table")            # (N, P, F)
        self.index = {p: i for i, p in enumerate(paths)}

    def batch(self, indices):
        return tf.gather(self.table, indices)                         # (B, P, F)


def damaged_files_message(problems: Sequence[tuple[str, str]], examples: int = 5,
                          fix: str = FIX) -> str:
    """One message for damaged feature files [(path, reason)]: each named, then `fix` (a
    sentence starting lower-case)."""
    shown = "; ".join(f"{DAMAGED}{path} ({reason})" for path, reason in problems[:examples])
    more = f" and {len(problems) - examples} more" if len(problems) > examples else ""
    return f"{len(problems)} damaged feature file(s): {shown}{more}. {fix[0].upper()}{fix[1:]}"


def feature_statistics(reader: NpyReader, paths: Sequence[str], max_images: int = 1000,
                       seed: int = 0, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance (F,) float64 over all positions of up to `max_images`
    feature files (a seeded sample of `paths`; pass only training images)."""
    paths = sorted(paths)
    if len(paths) > max_images:
        chosen = np.random.default_rng(seed).choice(len(paths), max_images, replace=False)
        paths = [paths[i] for i in sorted(chosen)]
    count, total, total_sq = 0, 0.0, 0.0
    for batch in checked(image_dataset(paths, batch_size, reader)):
        x = batch.numpy().astype(np.float64).reshape(-1, reader.shape[-1])   # (B*P, F)
        count += x.shape[0]
        total = total + x.sum(axis=0)
        total_sq = total_sq + np.square(x).sum(axis=0)
    mean = total / count
    return mean, np.maximum(total_sq / count - np.square(mean), 0.0)


def _ragged(token_lists: Sequence[Sequence[int]]) -> tf.RaggedTensor:
    lengths = np.fromiter((len(t) for t in token_lists), np.int64, len(token_lists))
    flat = np.fromiter((i for t in token_lists for i in t), np.int32, int(lengths.sum()))
    return tf.RaggedTensor.from_row_lengths(flat, lengths)


def grouped_order(keys: Sequence, seed: int) -> np.ndarray:
    """Caption order of one epoch: images shuffled, each image's captions shuffled and kept
    together, so a batch usually holds several captions of one image and the encoder runs
    once for them (the `seq_per_img` of neuraltalk2 and self-critical.pytorch)."""
    rng = np.random.default_rng(seed)
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    images = list(groups.values())
    return np.concatenate([rng.permutation(images[i]) for i in rng.permutation(len(images))])


def first_batches(lengths: np.ndarray, batch_size: int, boundaries: Sequence[int],
                  count: int) -> np.ndarray:
    """Which captions (of `lengths` tokens, in the order given) the first `count` batches
    of `caption_dataset`'s bucketing hold, as a bool mask: tf.data's
    `bucket_by_sequence_length` replayed in numpy. A bucket yields a batch when its
    `batch_size`-th caption arrives; at the end the buckets' partial batches follow in
    bucket order (`count_batches`). The first batches hold, of every bucket, a prefix of
    its captions in arrival order, so bucketing the captions without them yields exactly
    the batches that followed them (`Dataset.skip` ran every skipped batch through the
    bucketing instead: 30-37 s to resume near the end of a COCO epoch, 9,000 of 9,638
    batches of 64, now 1.5-2.5 s, building the dataset included)."""
    buckets = np.searchsorted(np.asarray(boundaries), lengths, side="right")   # (C,)
    members = [np.flatnonzero(buckets == b) for b in range(len(boundaries) + 1)]
    # (arrival of its last caption, bucket, batch's index in its bucket) of each full batch
    full = sorted((int(m[end - 1]), b, end // batch_size) for b, m in enumerate(members)
                  for end in range(batch_size, len(m) + 1, batch_size))
    flushed = [(b, len(m) // batch_size + 1) for b, m in enumerate(members)
               if len(m) % batch_size]
    taken = [0] * len(members)                    # batches of each bucket among the first
    for b, index in [(b, i) for _, b, i in full] + flushed:
        if count <= 0:
            break
        taken[b], count = index, count - 1
    mask = np.zeros(len(lengths), bool)
    for b, m in enumerate(members):
        mask[m[:taken[b] * batch_size]] = True
    return mask


def caption_dataset(paths: Sequence[str], token_lists: Sequence[Sequence[int]],
                    batch_size: int, boundaries: Sequence[int], reader: NpyReader,
                    table: Optional[FeatureTable] = None, shuffle_seed: Optional[int] = None,
                    skip_batches: int = 0, num_replicas: int = 1,
                    replica_ids: Sequence[int] = (0,),
                    pad_images: bool = False) -> tf.data.Dataset:
    """(features (N, P, F), image_index (B,), tokens (B, L) int32) batches, one caption per
    row of `tokens`; `features` hold each image of the batch once (N <= B) and caption b uses
    row image_index[b].

    Captions are shuffled by `grouped_order` when `shuffle_seed` is given (same seed, same
    order), grouped by length and padded to their bucket boundary with 0 (`<pad>`); features
    are read after bucketing, so buckets hold file names, not feature maps. `skip_batches`
    drops the first batches (resuming in the middle of an epoch): their captions are left
    out before bucketing (`first_batches` finds them), and the rest yields exactly the
    batches that followed them in the whole epoch.

    (Bucketing by the longest caption of each image instead kept an image's captions in one
    batch, 4.7 captions per encoded image instead of 1.5, but was not faster on a 2-core CPU,
    where the time loop dominates, and cut the shapes demo's scene accuracy from 0.84 to 0.67:
    batches of few images are worse for learning.)

    `pad_images` pads `features` with zero rows to B rows, so batch shapes depend on (B, L)
    only: for XLA, which compiles once per shape.

    With `num_replicas` R > 1 every global batch is cut into R consecutive row slices (sizes
    differ by at most one) and the slices of `replica_ids` are yielded one after the other,
    each with its own images: the form `tf.distribute`'s `distribute_datasets_from_function`
    expects. The union of the slices is exactly the single-replica batch.
    """
    keys = [table.index[p] for p in paths] if table is not None else list(paths)
    tokens = list(token_lists)
    if shuffle_seed is not None:
        order = grouped_order(keys, shuffle_seed)
        keys, tokens = [keys[i] for i in order], [tokens[i] for i in order]
    if skip_batches:
        lengths = np.fromiter(map(len, tokens), np.int64, len(tokens))
        kept = np.flatnonzero(~first_batches(lengths, batch_size, boundaries, skip_batches))
        keys, tokens = [keys[i] for i in kept], [tokens[i] for i in kept]
    keys = tf.constant(keys, tf.string if table is None else tf.int32)  # typed when empty
    ds = tf.data.Dataset.from_tensor_slices((keys, _ragged(tokens))).map(_dense_tokens)
    ds = ds.bucket_by_sequence_length(
        element_length_func=_num_tokens,
        bucket_boundaries=list(boundaries),
        bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
        pad_to_bucket_boundary=True)
    if num_replicas > 1:
        def slices(keys, tokens):
            return _replica_slices(keys, tokens, num_replicas, replica_ids)
        ds = ds.flat_map(slices)
    read = table.batch if table is not None else reader.batch

    def read_features(keys, tokens):                                  # (B,), (B, L)
        unique, image_index = tf.unique(keys)                         # (N,), (B,)
        features = read(unique)                                       # (N, P, F)
        if pad_images:  # zero rows up to B: shapes depend on (B, L) only (XLA compiles less)
            extra = tf.shape(keys)[0] - tf.shape(unique)[0]
            features = tf.pad(features, [[0, extra], [0, 0], [0, 0]])  # (B, P, F)
        return features, image_index, tokens                          # (N, P, F), (B,), (B, L)

    return _static(ds.map(read_features, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE))


def _static(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` without tf.data's autotuning thread (AUTOTUNE values keep their defaults: a map's
    parallelism is the number of cores, a prefetch buffer grows as needed).

    Deleting an autotuned iterator joins that thread, and in TF 2.21 the join sometimes (4 of
    11 demo epochs here) waits for the thread's next scheduled round, 10, 20, 41, 82 s, then
    every 60 s after the iterator's first element: an epoch of 28 s then ends 13 s after its
    last step. The pipeline only gathers rows of a table or reads files; without the tuner it
    yields batches as fast or faster (in memory: 440-480 instead of 140-340 batches/s alone
    on 2 cores), far above what the training step takes (issue #11).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def _replica_slices(keys, tokens, num_replicas: int, replica_ids: Sequence[int]):
    """The rows of `replica_ids` out of R near-equal consecutive slices of one batch (of
    `keys` and the matching rows of `tokens`)."""
    n = tf.shape(keys)[0]
    bounds = [(n * r) // num_replicas for r in range(num_replicas + 1)]
    starts = tf.stack([bounds[r] for r in replica_ids])
    ends = tf.stack([bounds[r + 1] for r in replica_ids])

    def take(start, end):
        return keys[start:end], tokens[start:end]                     # (b,), (b, L)
    return tf.data.Dataset.from_tensor_slices((starts, ends)).map(take)


def _dense_tokens(key, tokens):
    return key, tf.identity(tokens)                                   # ragged row -> (L,)


def _num_tokens(key, tokens):
    return tf.shape(tokens)[0]


def shuffled_image_dataset(paths: Sequence[str], batch_size: int, reader: NpyReader,
                           table: Optional[FeatureTable], seed: int, skip_batches: int = 0,
                           num_replicas: int = 1,
                           replica_ids: Sequence[int] = (0,)) -> tf.data.Dataset:
    """(features (N, P, F), image ids (N,) int32) batches of every image once, in an order
    shuffled by `seed`; an image's id is its position in `paths` (self-critical training
    rewards each image's samples against that image's references). `skip_batches` resumes
    mid-epoch (the images of the batches skipped are left out before batching); replicas as
    in `caption_dataset`."""
    order = np.random.default_rng(seed).permutation(len(paths))       # (I,)
    keys = [table.index[paths[i]] for i in order] if table is not None \
        else [paths[i] for i in order]
    keys, order = keys[skip_batches * batch_size:], order[skip_batches * batch_size:]
    keys = tf.constant(keys, tf.string if table is None else tf.int32)  # typed when empty
    ds = tf.data.Dataset.from_tensor_slices((keys, order.astype(np.int32))).batch(batch_size)
    if num_replicas > 1:
        ds = ds.flat_map(lambda k, i: _replica_slices(k, i, num_replicas, replica_ids))
    read = table.batch if table is not None else reader.batch
    return _static(ds.map(lambda k, i: (read(k), i), num_parallel_calls=AUTOTUNE)
                   .prefetch(AUTOTUNE))


# Bytes of decoding batches read ahead of the decoder at most (`image_dataset`).
READ_AHEAD_BYTES = 1 << 30


def image_dataset(paths: Sequence[str], batch_size: int, reader: NpyReader) -> tf.data.Dataset:
    """features (B, P, F) of images in the given order (for decoding and evaluation).

    Batches are read ahead of the decoder on up to every core, but never more than
    `READ_AHEAD_BYTES` of them at once, and one waits ready: `evaluate --batch-size 1024`
    (512 MB of float32 features a batch) had a batch per core in flight and a prefetch buffer
    growing as needed, 5.1 GB at its peak on 2 cores, where 64 took 2 GB."""
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), tf.string)).batch(
        batch_size)                                    # typed: no paths is no float32 tensor
    return _static(ds.map(reader.batch, num_parallel_calls=batches_read_at_once(batch_size))
                   .prefetch(1))


def batches_read_at_once(batch_size: int) -> int:
    """`image_dataset`'s parallel reads: one per core, within `READ_AHEAD_BYTES`."""
    batch_bytes = batch_size * int(np.prod(FEATURE_SHAPE)) * 4   # float32 (B, P, F)
    return max(1, min(os.cpu_count() or 1, READ_AHEAD_BYTES // batch_bytes))
