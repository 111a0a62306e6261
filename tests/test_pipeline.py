import collections
import itertools
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from caption_attn import pipeline
from caption_attn.errors import UserError

SHAPE = (64, 2048)


def _write(tmp_path, n, dtype="float16"):
    paths = []
    for i in range(n):
        path = str(tmp_path / f"img{i}.npy")
        np.save(path, np.full(SHAPE, i, dtype=dtype))   # image i's features are all == i
        paths.append(path)
    header = len(open(paths[0], "rb").read()) - np.prod(SHAPE) * np.dtype(dtype).itemsize
    return paths, pipeline.NpyReader(header, dtype, SHAPE)


def _captions(n_images, per_image=3, seed=0):
    rng = np.random.default_rng(seed)
    image_index, tokens = [], []
    for i in range(n_images):
        for _ in range(per_image):
            length = int(rng.integers(3, 30))
            tokens.append([1] + [10 + i] * (length - 2) + [2])  # body encodes the image
            image_index.append(i)
    return image_index, tokens


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_reader_matches_numpy(tmp_path, dtype):
    path = str(tmp_path / "x.npy")
    value = np.random.default_rng(0).standard_normal(SHAPE).astype(dtype)
    np.save(path, value)
    header = 128
    assert len(open(path, "rb").read()) == header + value.nbytes
    out = pipeline.NpyReader(header, dtype, SHAPE)(tf.constant(path))
    np.testing.assert_array_equal(out.numpy(), value)


def test_feature_statistics_match_numpy_and_cap_the_sample(tmp_path):
    rng = np.random.default_rng(0)
    values = [(rng.standard_normal(SHAPE) * rng.random(SHAPE[1]) * 3 + i).astype(np.float32)
              for i in range(5)]
    paths = []
    for i, value in enumerate(values):
        paths.append(str(tmp_path / f"f{i}.npy"))
        np.save(paths[-1], value)
    reader = pipeline.NpyReader(128, "float32", SHAPE)
    mean, variance = pipeline.feature_statistics(reader, paths, batch_size=2)
    flat = np.concatenate(values).astype(np.float64)                  # (5 * 64, 2048)
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(variance, flat.var(0), rtol=1e-6, atol=1e-9)
    # capped: the statistics of exactly one 3-image subset, the same one for the same seed
    mean3, _ = pipeline.feature_statistics(reader, paths, max_images=3, seed=1)
    subsets = [np.concatenate([values[j] for j in c]).astype(np.float64).mean(0)
               for c in itertools.combinations(range(5), 3)]
    assert sum(np.allclose(mean3, m, atol=1e-6) for m in subsets) == 1
    np.testing.assert_array_equal(
        mean3, pipeline.feature_statistics(reader, paths, max_images=3, seed=1)[0])


def test_reader_rejects_wrong_size(tmp_path):
    path = str(tmp_path / "bad.npy")
    np.save(path, np.zeros((10, 2048), np.float16))
    reader = pipeline.NpyReader(128, "float16", SHAPE)
    with pytest.raises(tf.errors.InvalidArgumentError, match="wrong size"):
        reader(tf.constant(path))


def test_bucket_boundaries():
    b = pipeline.bucket_boundaries(42)
    assert b == sorted(b) and b[-1] == 43 and all(x <= 43 for x in b)
    assert pipeline.bucket_boundaries(5) == [6]


def _forward_cost(lengths, batch_size, boundaries, step_rows=pipeline.STEP_ROWS):
    """merged_boundaries' model: a batch padded to T tokens costs T x (step_rows + rows)."""
    buckets = np.searchsorted(np.asarray(boundaries), np.asarray(lengths), side="right")
    total = 0
    for k, edge in enumerate(boundaries):
        rows = int((buckets == k).sum())
        total += (edge - 1) * (step_rows * -(-rows // batch_size) + rows) if rows else 0
    return total


def test_merged_boundaries_merge_the_small_buckets_of_a_small_split():
    """bench_epoch's validation set: 200 captions in 11 buckets, five of 1-3 captions. The
    merged buckets keep the last boundary (every caption has one), are boundaries of the
    ladder (tf.data pads to them), need fewer batches and cost less in the model."""
    b = pipeline.bucket_boundaries(40)
    counts = {7: 7, 9: 33, 11: 62, 13: 48, 15: 26, 17: 14, 19: 3, 23: 3, 27: 1, 31: 1, 39: 2}
    lengths = [n for n, c in counts.items() for _ in range(c)]
    merged = pipeline.merged_boundaries(lengths, 256, b)
    assert merged == [12, 18, 40, 41]
    assert set(merged) <= set(b) and merged[-1] == b[-1] and merged == sorted(merged)
    assert pipeline.count_batches(lengths, 256, merged) == 3 < \
        pipeline.count_batches(lengths, 256, b) == 11
    assert _forward_cost(lengths, 256, merged) < 0.6 * _forward_cost(lengths, 256, b)
    # no other choice of kept boundaries costs less (the dynamic programme is exact)
    inner = b[:-1]
    for mask in range(2 ** len(inner)):
        other = [e for i, e in enumerate(inner) if mask >> i & 1] + [b[-1]]
        assert _forward_cost(lengths, 256, merged) <= _forward_cost(lengths, 256, other)


def test_merged_boundaries_keep_full_buckets_apart():
    """A large split (COCO's 25k val captions) fills its buckets: merging them would pad
    thousands of captions to a longer length, so every occupied boundary stays; with no
    caption at all only the last one is left, and one occupied bucket keeps its own."""
    b = pipeline.bucket_boundaries(40)
    lengths = [edge - 1 for edge in b[:8] for _ in range(1024)]   # 4 full batches each
    assert pipeline.merged_boundaries(lengths, 256, b)[:8] == b[:8]
    assert pipeline.merged_boundaries([], 256, b) == [b[-1]]
    assert pipeline.merged_boundaries([5] * 300, 64, b) == [8, b[-1]]   # not padded to 40


def _batches(ds):
    """(features per caption (B, P, F), tokens (B, L)) of each batch."""
    return [(tf.gather(f, i).numpy(), t.numpy()) for f, i, t in ds]


def test_every_caption_once_with_its_own_features(tmp_path):
    paths, reader = _write(tmp_path, 20)
    index, tokens = _captions(20)
    boundaries = pipeline.bucket_boundaries(30)
    ds = pipeline.caption_dataset([paths[i] for i in index], tokens, 8, boundaries, reader,
                                  shuffle_seed=3)
    batches = _batches(ds)
    assert len(batches) == pipeline.count_batches([len(t) for t in tokens], 8, boundaries)
    seen = collections.Counter()
    for feats, toks in batches:
        assert feats.shape[1:] == SHAPE and toks.shape[0] == feats.shape[0] <= 8
        assert toks.shape[1] + 1 in boundaries            # padded to a bucket boundary only
        for f, t in zip(feats, toks):
            real = t[t != 0]
            assert real[0] == 1 and real[-1] == 2
            assert (f == real[1] - 10).all()              # features belong to the caption
            seen[tuple(real)] += 1
    assert sum(seen.values()) == len(tokens)
    assert seen == collections.Counter(tuple(t) for t in tokens)


def test_bucketing_pads_less_than_longest_caption(tmp_path):
    paths, reader = _write(tmp_path, 20)
    index, tokens = _captions(20)
    ds = pipeline.caption_dataset([paths[i] for i in index], tokens, 8,
                                  pipeline.bucket_boundaries(30), reader, shuffle_seed=0)
    real = sum(len(t) for t in tokens)
    padded = sum(t.size for _, t in _batches(ds))
    longest = max(len(t) for t in tokens) * len(tokens)
    assert padded < 0.8 * longest and padded >= real


def test_shuffle_is_seeded_and_skip_resumes(tmp_path):
    paths, reader = _write(tmp_path, 12)
    index, tokens = _captions(12)
    args = ([paths[i] for i in index], tokens, 4, pipeline.bucket_boundaries(30), reader)
    a = _batches(pipeline.caption_dataset(*args, shuffle_seed=1))
    b = _batches(pipeline.caption_dataset(*args, shuffle_seed=1))
    c = _batches(pipeline.caption_dataset(*args, shuffle_seed=2))
    assert all((x[1].shape == y[1].shape) and (x[1] == y[1]).all() for x, y in zip(a, b))
    assert any(x[1].shape != y[1].shape or (x[1] != y[1]).any() for x, y in zip(a, c))
    skipped = _batches(pipeline.caption_dataset(*args, shuffle_seed=1, skip_batches=3))
    assert len(skipped) == len(a) - 3
    assert all((x[1] == y[1]).all() for x, y in zip(a[3:], skipped))


def _keyed_batches(ds):
    """(image keys (B,), tokens (B, L)) of each batch, features not compared (`_batches`)."""
    return [(tf.gather(k, i).numpy() if k.dtype == tf.string else k.numpy(), t.numpy())
            for k, i, t in ds]


@pytest.mark.parametrize("batch_size,per_image,seed", [(4, 3, 1), (8, 5, 2), (3, 1, 7)])
def test_skip_yields_exactly_the_rest_of_the_epoch(tmp_path, batch_size, per_image, seed):
    """A resume skips the batches already trained and must train exactly the rest of the
    uninterrupted epoch, batch for batch: every skip from 0 to past the end, through the
    end-of-epoch flush of the buckets' partial batches (which come in bucket order)."""
    paths, reader = _write(tmp_path, 10)
    index, tokens = _captions(10, per_image=per_image, seed=seed)
    table = pipeline.FeatureTable(reader, paths)
    args = ([paths[i] for i in index], tokens, batch_size, pipeline.bucket_boundaries(30),
            reader, table)
    whole = _batches(pipeline.caption_dataset(*args, shuffle_seed=seed))
    lengths = [len(t) for t in tokens]
    assert len(whole) == pipeline.count_batches(lengths, batch_size, args[3])
    for skip in range(len(whole) + 2):
        rest = _batches(pipeline.caption_dataset(*args, shuffle_seed=seed, skip_batches=skip))
        assert len(rest) == max(0, len(whole) - skip)
        for (f1, t1), (f2, t2) in zip(whole[skip:], rest):
            np.testing.assert_array_equal(t1, t2)
            np.testing.assert_array_equal(f1, f2)


def test_skip_drops_the_trained_captions_before_tf_data(tmp_path):
    """The skipped batches' captions are left out before bucketing (found by replaying the
    bucketing in numpy), not run through tf.data and dropped by `Dataset.skip`: resuming
    near the end of a COCO epoch (616k captions, 9,000 of 9,638 batches of 64 skipped) took
    30 s of bucketing before the first step. Also streamed from files, and with replicas."""
    paths, reader = _write(tmp_path, 6)
    index, tokens = _captions(6)
    args = ([paths[i] for i in index], tokens, 4, pipeline.bucket_boundaries(30), reader)
    for replicas in (1, 2):
        ds = pipeline.caption_dataset(*args, shuffle_seed=0, skip_batches=2,
                                      num_replicas=replicas, replica_ids=range(replicas))
        assert b"SkipDataset" not in ds._as_serialized_graph().numpy()
    whole = _keyed_batches(pipeline.caption_dataset(*args, shuffle_seed=0))
    rest = _keyed_batches(pipeline.caption_dataset(*args, shuffle_seed=0, skip_batches=2))
    assert len(rest) == len(whole) - 2
    for (k1, t1), (k2, t2) in zip(whole[2:], rest):
        np.testing.assert_array_equal(k1, k2)
        np.testing.assert_array_equal(t1, t2)


def test_self_critical_skip_yields_the_rest_of_the_epoch(tmp_path):
    paths, reader = _write(tmp_path, 11)
    whole = [(f.numpy(), i.numpy()) for f, i in
             pipeline.shuffled_image_dataset(paths, 3, reader, None, seed=4)]
    for skip in range(len(whole) + 2):
        ds = pipeline.shuffled_image_dataset(paths, 3, reader, None, seed=4, skip_batches=skip)
        assert b"SkipDataset" not in ds._as_serialized_graph().numpy()
        rest = [(f.numpy(), i.numpy()) for f, i in ds]
        assert len(rest) == max(0, len(whole) - skip)
        for (f1, i1), (f2, i2) in zip(whole[skip:], rest):
            np.testing.assert_array_equal(f1, f2)
            np.testing.assert_array_equal(i1, i2)


def test_memory_table_gives_the_same_batches(tmp_path):
    paths, reader = _write(tmp_path, 10)
    index, tokens = _captions(10)
    table = pipeline.FeatureTable(reader, paths)
    args = ([paths[i] for i in index], tokens, 4, pipeline.bucket_boundaries(30), reader)
    streamed = _batches(pipeline.caption_dataset(*args, shuffle_seed=5))
    cached = _batches(pipeline.caption_dataset(*args, table=table, shuffle_seed=5))
    assert len(streamed) == len(cached)
    for (f1, t1), (f2, t2) in zip(streamed, cached):
        np.testing.assert_array_equal(f1, f2)
        np.testing.assert_array_equal(t1, t2)


def test_no_python_functions_in_the_graph(tmp_path):
    paths, reader = _write(tmp_path, 4)
    index, tokens = _captions(4)
    ds = pipeline.caption_dataset([paths[i] for i in index], tokens, 4,
                                  pipeline.bucket_boundaries(30), reader, shuffle_seed=0)
    graph = ds._as_serialized_graph().numpy()
    assert b"ReadFile" in graph and b"DecodeRaw" in graph
    assert b"PyFunc" not in graph and b"EagerPyFunc" not in graph


def test_no_autotuning_thread(tmp_path):
    """Deleting an autotuned iterator can wait up to a minute for its tuning thread (#11)."""
    paths, reader = _write(tmp_path, 4)
    index, tokens = _captions(4)
    train = pipeline.caption_dataset([paths[i] for i in index], tokens, 4,
                                     pipeline.bucket_boundaries(30), reader, shuffle_seed=0)
    images = pipeline.image_dataset(paths, 3, reader)
    scst = pipeline.shuffled_image_dataset(paths, 3, reader, None, seed=0)
    for ds in (train, images, scst):
        assert ds.options().autotune.enabled is False


def test_image_dataset_keeps_order(tmp_path):
    paths, reader = _write(tmp_path, 7)
    feats = np.concatenate([f.numpy() for f in pipeline.image_dataset(paths, 3, reader)])
    assert feats.shape == (7,) + SHAPE
    assert [int(f[0, 0]) for f in feats] == list(range(7))


def test_each_image_read_once_per_batch(tmp_path):
    paths, reader = _write(tmp_path, 6)
    index, tokens = _captions(6, per_image=5)
    ds = pipeline.caption_dataset([paths[i] for i in index], tokens, 64,
                                  pipeline.bucket_boundaries(30), reader, shuffle_seed=0)
    reads, captions = 0, 0
    for features, image_index, toks in ds:
        assert features.shape[0] == len(np.unique(image_index.numpy()))
        reads, captions = reads + features.shape[0], captions + toks.shape[0]
    assert reads < captions      # captions of one image that share a batch share a read


def test_grouped_order_keeps_captions_of_an_image_together():
    keys = ["a", "b", "a", "c", "b", "a"]
    order = pipeline.grouped_order(keys, seed=4)
    assert sorted(order) == list(range(6))
    runs = [keys[i] for i in order]
    assert sum(1 for x, y in zip(runs, runs[1:]) if x != y) == 2   # three contiguous groups
    assert (order == pipeline.grouped_order(keys, seed=4)).all()


@pytest.mark.parametrize("replicas", [2, 3])
def test_replica_slices_partition_each_batch(tmp_path, replicas):
    paths, reader = _write(tmp_path, 8)
    index, tokens = _captions(8)
    args = ([paths[i] for i in index], tokens, 5, pipeline.bucket_boundaries(30), reader)
    whole = _batches(pipeline.caption_dataset(*args, shuffle_seed=2))
    parts = _batches(pipeline.caption_dataset(*args, shuffle_seed=2, num_replicas=replicas,
                                              replica_ids=list(range(replicas))))
    assert len(parts) == replicas * len(whole)
    for b, (feats, toks) in enumerate(whole):
        slices = parts[b * replicas:(b + 1) * replicas]
        sizes = [s[1].shape[0] for s in slices]
        assert max(sizes) - min(sizes) <= 1
        np.testing.assert_array_equal(np.concatenate([s[1] for s in slices]), toks)
        np.testing.assert_array_equal(np.concatenate([s[0] for s in slices]), feats)
    second = _batches(pipeline.caption_dataset(*args, shuffle_seed=2, num_replicas=replicas,
                                               replica_ids=[1]))
    assert [s[1].shape for s in second] == [s[1].shape for s in parts[1::replicas]]


def test_pad_images_fixes_the_feature_rows_to_the_batch(tmp_path):
    paths, reader = _write(tmp_path, 6)
    index, tokens = _captions(6, per_image=5)
    args = ([paths[i] for i in index], tokens, 7, pipeline.bucket_boundaries(30), reader)
    padded = list(pipeline.caption_dataset(*args, shuffle_seed=1, pad_images=True))
    plain = _batches(pipeline.caption_dataset(*args, shuffle_seed=1))
    for (f, i, t), (per_caption, toks) in zip(padded, plain):
        assert f.shape[0] == t.shape[0]
        np.testing.assert_array_equal(tf.gather(f, i).numpy(), per_caption)


# --------------------------------------------------------------------------- damaged files
def _damaged(tmp_path, n=6):
    """n good float16 files in a folder whose name has a space and parentheses; damage
    files 1 (NaN), 2 (Inf), 3 (garbage bytes in the header), 4 (garbage data of the right
    size: random float16 bits hold NaN/Inf patterns), 5 (truncated)."""
    folder = tmp_path / "my (features)"
    folder.mkdir()
    paths, reader = _write(folder, n)
    for i, value in ((1, np.nan), (2, -np.inf)):
        array = np.full(SHAPE, i, np.float16)
        array[7, 99] = value
        np.save(paths[i], array)
    raw = open(paths[3], "rb").read()
    open(paths[3], "wb").write(raw[:10] + b"garbage!" + raw[18:])
    bits = np.random.default_rng(0).integers(0, 2**16, np.prod(SHAPE), dtype=np.uint16)
    bits[:10] = 0x7C00                                                 # make sure: +Inf
    open(paths[4], "wb").write(raw[:128] + bits.tobytes())
    open(paths[5], "wb").write(raw[:-2])
    return paths, reader


@pytest.mark.parametrize("i,reason", [(1, "non-finite values"), (2, "non-finite values"),
                                      (3, "bad .npy header"), (4, "non-finite values"),
                                      (5, "wrong size")])
def test_reader_names_a_damaged_file(tmp_path, i, reason):
    paths, reader = _damaged(tmp_path)
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        reader(tf.constant(paths[i]))
    assert f"damaged feature file: {paths[i]} ({reason})" in e.value.message
    assert "extract-features --verify" in e.value.message
    assert pipeline.damaged_from_error(e.value)[0] == paths[i]
    np.testing.assert_array_equal(reader(tf.constant(paths[0])).numpy(), 0)


def test_damaged_file_fails_the_dataset_naming_it(tmp_path):
    paths, reader = _damaged(tmp_path)
    index, tokens = _captions(2)
    ds = pipeline.caption_dataset([paths[i] for i in index], tokens, 4,
                                  pipeline.bucket_boundaries(30), reader)
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        list(ds)
    assert pipeline.damaged_from_error(e.value)[0] == paths[1]
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        list(pipeline.image_dataset(paths[4:], 2, reader))
    assert pipeline.damaged_from_error(e.value)[0] == paths[4]
    assert pipeline.damaged_from_error(ValueError("something else")) is None


def test_a_feature_file_that_cannot_be_read_is_named(tmp_path):
    # deleted or replaced by a folder after the checks: TensorFlow's NotFoundError (or
    # FailedPreconditionError) traceback; now `checked` names it as a damaged file does
    paths, reader = _write(tmp_path, 4)
    os.remove(paths[2])
    os.rename(paths[3], paths[3] + ".gone")
    os.mkdir(paths[3])
    for i, reason in ((2, "missing"), (3, "unreadable: is a directory")):
        with pytest.raises(pipeline.DamagedFeatures) as e:
            list(pipeline.checked(pipeline.image_dataset(paths[:2] + [paths[i]], 2, reader)))
        assert (e.value.path, e.value.reason) == (paths[i], reason)
        assert str(e.value) == f"damaged feature file: {paths[i]} ({reason})"
        with pytest.raises(tf.errors.OpError) as e:
            reader(tf.constant(paths[i]))                              # eagerly: the same
        assert pipeline.damaged_from_error(e.value) == (paths[i], reason)
    with pytest.raises(UserError, match=re.escape(
            f"1 damaged feature file(s): damaged feature file: {paths[2]} (missing)")):
        pipeline.FeatureTable(reader, paths[:3])
    assert list(pipeline.image_dataset([], 2, reader)) == []           # no paths: no batch
    with pytest.raises(tf.errors.InvalidArgumentError):                # other errors pass
        list(pipeline.checked(tf.data.Dataset.from_tensors(1.0).map(
            lambda x: tf.debugging.check_numerics(x * np.nan, "not a feature file"))))


def test_memory_table_refuses_damaged_files_naming_them(tmp_path):
    paths, reader = _damaged(tmp_path)
    with pytest.raises(UserError) as e:
        pipeline.FeatureTable(reader, paths, batch_size=4)
    message = str(e.value)
    assert message.startswith("5 damaged feature file(s): ")
    for i, reason in ((1, "non-finite values"), (3, "bad .npy header"), (5, "wrong size")):
        assert f"damaged feature file: {paths[i]} ({reason})" in message
    assert "extract-features --verify" in message and paths[0] not in message


def test_decoding_batches_read_ahead_within_a_memory_bound(monkeypatch):
    """`evaluate --batch-size 1024` read a batch per core ahead (512 MB each) into a prefetch
    buffer that grew as needed: 5.1 GB at its peak on 2 cores."""
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert pipeline.batches_read_at_once(64) == 16            # 32 MB a batch: every core
    assert pipeline.batches_read_at_once(1024) == 2           # 512 MB: 1 GB in flight
    assert pipeline.batches_read_at_once(4096) == 1
