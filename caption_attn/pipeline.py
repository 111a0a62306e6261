"""tf.data only: cached feature paths + token ids -> batches.

Features are read in-graph (`tf.io.read_file` + `tf.io.decode_raw` past the .npy header whose
length the cache manifest records), so no Python runs on the hot path. Captions are grouped by
length into buckets and padded to the bucket's boundary, so a batch of short captions is not
padded to the longest caption of the dataset, and the set of batch shapes stays small (one
XLA compilation per bucket at most).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

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


def count_batches(lengths: Sequence[int], batch_size: int, boundaries: Sequence[int]) -> int:
    """Exact number of batches `caption_dataset` yields (buckets flush their rest at the end)."""
    buckets = np.searchsorted(np.asarray(boundaries), np.asarray(lengths), side="right")
    counts = np.bincount(buckets, minlength=len(boundaries) + 1)
    return int(sum(math.ceil(c / batch_size) for c in counts))


class NpyReader:
    """Reads `.npy` feature files of one known header length, shape and dtype in-graph."""

    def __init__(self, header_bytes: int, dtype: str, shape: Sequence[int]):
        self.header_bytes = int(header_bytes)
        self.dtype = tf.as_dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self.num_bytes = int(np.prod(self.shape)) * self.dtype.size

    def __call__(self, path):
        raw = tf.io.read_file(path)                                   # scalar string
        tf.debugging.assert_equal(
            tf.strings.length(raw), self.header_bytes + self.num_bytes,
            message="feature file has the wrong size (run extract-features --verify)")
        body = tf.strings.substr(raw, self.header_bytes, self.num_bytes)
        values = tf.io.decode_raw(body, self.dtype, little_endian=True)  # (P*F,)
        return tf.reshape(values, self.shape)                         # (P, F)

    def batch(self, paths):
        """paths (B,) -> features (B, P, F); files of a batch are read one after the other,
        batches in parallel (`num_parallel_calls`)."""
        return tf.map_fn(self, paths, fn_output_signature=tf.TensorSpec(self.shape,
                                                                        self.dtype))


class FeatureTable:
    """All features of a split held in memory (a CPU variable) and gathered by index."""

    def __init__(self, reader: NpyReader, paths: Sequence[str], batch_size: int = 256):
        ds = tf.data.Dataset.from_tensor_slices(list(paths)).batch(batch_size)
        ds = ds.map(reader.batch, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
        with tf.device("/cpu:0"):
            parts = [part for part in ds]
            self.table = tf.Variable(tf.concat(parts, axis=0), trainable=False,
                                     name="feature_table")            # (N, P, F)
        self.index = {p: i for i, p in enumerate(paths)}

    def batch(self, indices):
        return tf.gather(self.table, indices)                         # (B, P, F)


def _ragged(token_lists: Sequence[Sequence[int]]) -> tf.RaggedTensor:
    lengths = np.fromiter((len(t) for t in token_lists), np.int64, len(token_lists))
    flat = np.fromiter((i for t in token_lists for i in t), np.int32, int(lengths.sum()))
    return tf.RaggedTensor.from_row_lengths(flat, lengths)


def caption_dataset(paths: Sequence[str], token_lists: Sequence[Sequence[int]],
                    batch_size: int, boundaries: Sequence[int], reader: NpyReader,
                    table: Optional[FeatureTable] = None, shuffle_seed: Optional[int] = None,
                    skip_batches: int = 0) -> tf.data.Dataset:
    """(features (B, P, F), tokens (B, L) int32) batches, one caption per row.

    Captions are shuffled (when `shuffle_seed` is given: same seed, same order), grouped by
    length and padded to their bucket boundary with 0 (`<pad>`); the features of each batch
    are read after bucketing, so buckets hold file names, not feature maps. `skip_batches`
    drops the first batches (resuming in the middle of an epoch).
    """
    keys = [table.index[p] for p in paths] if table is not None else list(paths)
    ds = tf.data.Dataset.from_tensor_slices((keys, _ragged(token_lists)))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(keys), seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.map(_dense_tokens)
    ds = ds.bucket_by_sequence_length(
        element_length_func=_num_tokens,
        bucket_boundaries=list(boundaries),
        bucket_batch_sizes=[batch_size] * (len(boundaries) + 1),
        pad_to_bucket_boundary=True)
    if skip_batches:
        ds = ds.skip(skip_batches)
    read = table.batch if table is not None else reader.batch

    def read_features(keys, tokens):                                  # (B,), (B, L)
        return read(keys), tokens                                     # (B, P, F), (B, L)

    return ds.map(read_features, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def _dense_tokens(key, tokens):
    return key, tf.identity(tokens)                                   # ragged row -> (L,)


def _num_tokens(key, tokens):
    return tf.shape(tokens)[0]


def image_dataset(paths: Sequence[str], batch_size: int, reader: NpyReader) -> tf.data.Dataset:
    """features (B, P, F) of images in the given order (for decoding and evaluation)."""
    ds = tf.data.Dataset.from_tensor_slices(list(paths)).batch(batch_size)
    return ds.map(reader.batch, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
