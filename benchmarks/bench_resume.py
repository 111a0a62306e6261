"""Fixed costs of `train` reruns at COCO size: one with nothing left to train, and a resume
near the end of an epoch.

Self-contained and offline: writes a synthetic caption file of --images images x 5 captions
(default 123,287 = COCO 2014 train + val) shaped like Karpathy's dataset_coco.json (tokens,
ids, sentids; ~130 MB), and a feature cache of sparse float16 files (the real size and
`.npy` header, no disk blocks) indexed as `extract-features` would, into a temp folder, then

  rerun   trains a tiny model to its end on --train-images / --val-images of the images (the
          rest are test images: the whole file is still parsed and every image's features
          checked, as on COCO), then times `train.train` again with the same settings, the
          full load (split.json without its record of the caption file's bytes, as a run
          made before it: the caption file is parsed, tokenized and fingerprinted) and the
          rerun that decides "nothing to train" without parsing it, alternating, --rounds
          each; TensorFlow is imported before (4.5-6.5 s of a `caption-attn train` call)
  skip    `pipeline.caption_dataset` over 5 captions per image in batches of 64 (COCO:
          616,435 captions, 9,638 batches): seconds from building the dataset to its first
          batch without a skip and skipping --skip batches (a resume near the epoch's end)

    .venv/bin/python benchmarks/bench_resume.py                  # ~3 min on 2 cores
    .venv/bin/python benchmarks/bench_resume.py --images 20000 --skip 1500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from caption_attn.quiet import import_tensorflow  # noqa: E402

import_tensorflow()  # without its start-up notices, as the CLI (real warnings still shown)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from caption_attn import feature_cache, feature_index, pipeline, train  # noqa: E402
from caption_attn.config import (DataConfig, ModelConfig, RunConfig,  # noqa: E402
                                 TrainConfig, VocabConfig)
from caption_attn.fileio import write_json_atomic  # noqa: E402
from caption_attn.train_data import hash_seed  # noqa: E402
from bench_train import synthetic_manifest  # noqa: E402
from machine import describe, run_in_temp_folder  # noqa: E402

BATCH = 64
WORDS = 9000


def image_key(i: int) -> str:
    folder = "val2014" if i % 3 == 0 else "train2014"
    return f"{folder}/COCO_{folder}_{i:012d}.jpg"


def caption_lengths(n: int, rng) -> np.ndarray:
    """Words per caption: lognormal around COCO's ~10."""
    return np.clip(np.round(np.exp(rng.normal(np.log(9.5), 0.25, n))), 3, 38).astype(int)


def write_dataset(root: str, images: int, train_images: int, val_images: int) -> tuple:
    """(captions.json, cache): Karpathy entries (the first `train_images` train, the next
    `val_images` val, the rest test) and a sparse float16 cache indexed like an extraction."""
    rng = np.random.default_rng(0)
    zipf = 1.0 / np.arange(1, WORDS + 1)
    zipf /= zipf.sum()
    cache = os.path.join(root, "cache")
    for folder in ("train2014", "val2014"):
        os.makedirs(os.path.join(cache, folder))
    header = feature_cache.npy_header("float16")
    size = feature_cache.feature_file_size("float16")
    manifest = synthetic_manifest(images)
    fingerprint = feature_cache.cache_identity(manifest)["fingerprint"]
    writer = feature_index.SegmentWriter(cache, flush_seconds=1e9, flush_entries=1024)
    no_image = feature_index.ImageStamp(0, 0, "")
    lengths = caption_lengths(images * 5, rng)
    words = rng.choice(WORDS, size=int(lengths.sum()), p=zipf)
    entries, start = [], 0
    for i in range(images):
        key = image_key(i)
        with open(feature_cache.feature_path(cache, key), "wb") as f:
            f.write(header)
            f.truncate(size)                       # sparse: no disk blocks past the header
            writer.add(feature_index.make_entry(key, fingerprint, os.fstat(f.fileno()),
                                                no_image))
        sentences = []
        for k in range(5):
            n = lengths[i * 5 + k]
            tokens = [f"w{w}" for w in words[start:start + n]]
            start += n
            sentences.append({"tokens": tokens, "raw": " ".join(tokens).capitalize() + ".",
                              "imgid": i, "sentid": i * 5 + k})
        split = "train" if i < train_images else "val" if i < train_images + val_images \
            else "test"
        folder, name = key.split("/")
        entries.append({"filepath": folder, "sentids": list(range(i * 5, i * 5 + 5)),
                        "filename": name, "imgid": i, "split": split, "sentences": sentences,
                        "cocoid": 100_000 + i})
    writer.close()
    feature_index.compact(cache, lambda k: feature_cache.feature_path(cache, k))
    captions = os.path.join(root, "captions.json")
    with open(captions, "w") as f:
        json.dump({"images": entries, "dataset": "coco"}, f)
    write_json_atomic(os.path.join(cache, "manifest.json"), manifest)
    return captions, cache


def _timed(fn) -> tuple:
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def measure_rerun(args, root: str, captions: str, cache: str) -> dict:
    run = os.path.join(root, "run")
    cfg = RunConfig(captions=captions, cache=cache, data=DataConfig(),
                    vocab=VocabConfig(), model=ModelConfig(embedding_dim=16, units=16,
                                                           feature_norm=False),
                    train=TrainConfig(epochs=1, batch_size=BATCH, sample_images=0,
                                      bleu_images=0))
    _, seconds, _ = _timed(lambda: train.train(cfg, run, progress=False, log=lambda *a: None))
    print(f"trained the run to its end: {seconds:.1f} s")
    split = os.path.join(run, "split.json")
    times = {"full load": [], "quick": []}
    for _ in range(args.rounds):
        with open(split) as f:
            recorded = json.load(f)
        recorded.pop("caption_file")
        write_json_atomic(split, recorded)         # as a run made before the record
        for name in times:                         # the full load records it again
            summary, wall, cpu = _timed(lambda: train.train(cfg, run, progress=False,
                                                            log=lambda *a: None))
            assert summary["steps_now"] == 0, summary
            times[name].append((wall, cpu))
            print(f"rerun, {name:9s}: {wall:5.2f} s wall, {cpu:5.2f} s CPU")
    full, quick = (statistics.median(w for w, _ in times[n]) for n in times)
    print(f"rerun with nothing left to train (median of {args.rounds}): full load "
          f"{full:.2f} s, without parsing the captions {quick:.2f} s ({full / quick:.1f}x)")
    return {"rerun_full_s": full, "rerun_quick_s": quick}


def measure_skip(args, images: int) -> dict:
    rng = np.random.default_rng(1)
    lengths = caption_lengths(images * 5, rng) + 2               # with <start> and <end>
    tokens = [list(rng.integers(4, WORDS, n)) for n in lengths]
    keys = [i // 5 for i in range(len(tokens))]                  # rows of a feature table

    class Table:                       # a feature table of 1x1 maps: the key/token part alone
        index = {k: k for k in set(keys)}
        batch = staticmethod(lambda indices: tf.zeros([tf.shape(indices)[0], 1, 1]))

    boundaries = pipeline.bucket_boundaries(42)
    total = pipeline.count_batches(lengths, BATCH, boundaries)
    figures = {"batches_per_epoch": float(total)}
    for skip in (0, min(args.skip, total - 1)):
        def first():
            ds = pipeline.caption_dataset(keys, tokens, BATCH, boundaries, None, Table(),
                                          shuffle_seed=hash_seed(0, 1), skip_batches=skip)
            return next(iter(ds))
        _, wall, cpu = _timed(first)
        print(f"caption_dataset of {len(tokens):,} captions ({total:,} batches of {BATCH}), "
              f"skipping {skip:,}: first batch after {wall:.2f} s wall, {cpu:.2f} s CPU")
        figures[f"first_batch_skip_{'none' if skip == 0 else 'many'}_s"] = wall
    return figures


def measure(args, root: str) -> dict:
    (captions, cache), seconds, _ = _timed(lambda: write_dataset(
        root, args.images, args.train_images, args.val_images))
    print(f"wrote {args.images:,} images x 5 captions "
          f"({os.path.getsize(captions) / 1e6:.0f} MB) and their sparse features: "
          f"{seconds:.0f} s")
    return {**measure_rerun(args, root, captions, cache), **measure_skip(args, args.images)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=123_287)
    parser.add_argument("--train-images", type=int, default=300)
    parser.add_argument("--val-images", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip", type=int, default=9000)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    print(describe())
    return run_in_temp_folder("bench_resume_", measure, args)


if __name__ == "__main__":
    sys.exit(main())
