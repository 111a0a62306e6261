"""CIDEr-D reward speed and document-frequency size at COCO scale (synthetic token ids).

Self-contained, no TensorFlow: `--images` train images x 5 reference captions of 8-16 word
ids drawn Zipf-like (p ~ 1/rank) from a vocabulary of `--vocab-size`. Independent words make
far more distinct 3- and 4-grams than real captions ("a man riding a", "on top of a"), so
the df table, its JSON and the reference tables are upper bounds for COCO's.

Measures, once: building the document frequencies, writing and reading their JSON, building
`CiderD` over every train image (what a training run does at start-up), peak memory. Then
the reward of batches of `--batch` images x `--samples` candidates: each candidate one of
its image's references with ~half its words replaced and a length of 8-16, ending with
<end>, one in ten cut at T=16 without it; milliseconds per batch, median of `--repeats`.

    .venv/bin/python benchmarks/bench_reward.py
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from caption_attn.quiet import import_tensorflow  # noqa: E402

import_tensorflow()  # caption_attn.scst imports it: without its start-up notices, as the CLI
from caption_attn.cider import CiderD, DocumentFrequency  # noqa: E402
from caption_attn.scst import advantages  # noqa: E402
from caption_attn.vocab import END, PAD, UNK  # noqa: E402
from machine import cpu_name  # noqa: E402

MAX_LENGTH = 16


def zipf_words(rng, size: int, vocab_size: int) -> np.ndarray:
    """Word ids UNK..V-1 with p ~ 1/rank (`<unk>` the most frequent, as on COCO)."""
    p = 1.0 / np.arange(1, vocab_size - UNK + 1)
    return rng.choice(np.arange(UNK, vocab_size), size=size, p=p / p.sum())


def synthetic_references(num_images: int, vocab_size: int, seed: int) -> dict:
    """{image: 5 id lists of 8-16 words}."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, MAX_LENGTH + 1, num_images * 5)
    words = zipf_words(rng, int(lengths.sum()), vocab_size).tolist()
    ends = np.cumsum(lengths).tolist()
    captions = [words[e - n:e] for e, n in zip(ends, lengths.tolist())]
    return {i: captions[5 * i:5 * i + 5] for i in range(num_images)}


def synthetic_candidates(references: dict, images: np.ndarray, samples: int,
                         vocab_size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(image index (B*K,), candidates (B*K, 16)): see the module docstring."""
    index = np.repeat(images, samples)                                  # (N,)
    out = np.full((index.size, MAX_LENGTH), PAD, np.int64)             # (N, T)
    for row, image in enumerate(index.tolist()):
        ref = references[image][rng.integers(len(references[image]))]
        words = np.array(ref + ref, np.int64)[:rng.integers(8, MAX_LENGTH + 1)]
        swap = rng.random(words.size) < 0.5
        words[swap] = zipf_words(rng, int(swap.sum()), vocab_size)
        if rng.random() < 0.1:
            words = np.resize(words, MAX_LENGTH)                        # cut, no <end>
        out[row, :words.size] = words
        if words.size < MAX_LENGTH:
            out[row, words.size] = END
    return index, out


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="train images (COCO: 113k)")
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=64, help="images per batch")
    parser.add_argument("--samples", type=int, default=5, help="K sampled captions per image")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores visible); numpy {np.__version__}")
    references, t_synth = timed(lambda: synthetic_references(args.images, args.vocab_size,
                                                             args.seed))
    print(f"synthetic references: {args.images} images x 5, vocabulary {args.vocab_size} "
          f"({t_synth:.1f} s to make)")
    df, t_build = timed(lambda: DocumentFrequency.build(references, args.vocab_size))
    print(f"document frequencies: {len(df):,} distinct 1..4-grams (with <end>), built in "
          f"{t_build:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cider_df.json")
        _, t_save = timed(lambda: df.save(path))
        size = os.path.getsize(path)
        _, t_load = timed(lambda: DocumentFrequency.load(path))
    print(f"df JSON: {size / 1e6:.1f} MB ({size / len(df):.1f} bytes per n-gram), written in "
          f"{t_save:.1f} s, read in {t_load:.1f} s")
    reward, t_init = timed(lambda: CiderD(references, df, with_end=True))
    print(f"CiderD over all {args.images} images built in {t_init:.1f} s; its tables add "
          f"{reward.nbytes / 1e6:.0f} MB to the df's; peak RSS so far "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

    rng = np.random.default_rng(args.seed + 1)
    batches = [synthetic_candidates(references, rng.choice(args.images, args.batch,
                                                           replace=False),
                                    args.samples, args.vocab_size, rng)
               for _ in range(8)]
    n = args.batch * args.samples
    wall, cpu, rewards = [], [], []
    for i in range(args.repeats + 2):
        index, candidates = batches[i % len(batches)]
        t0, c0 = time.perf_counter(), time.process_time()
        r = reward(index, candidates)
        advantages(r.reshape(args.batch, args.samples), "mean")
        if i >= 2:                                                     # 2 warm-up calls
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        rewards.append(r)
    ms, cpu_ms = 1000 * float(np.median(wall)), 1000 * float(np.median(cpu))
    print(f"reward + mean-baseline advantages, {args.batch} images x K={args.samples} = {n} "
          f"candidates of <= {MAX_LENGTH} tokens (mean reward "
          f"{float(np.mean(np.concatenate(rewards))):.3f}):")
    print(f"  {ms:.2f} ms per batch wall-clock (median of {args.repeats}; min "
          f"{1000 * min(wall):.2f}, max {1000 * max(wall):.2f}) = {n / ms * 1000:,.0f} "
          f"candidates/s, {ms:.1f}% of a 100 ms training step")
    print(f"  {cpu_ms:.2f} ms per batch of this process's CPU time (median; the wall-clock "
          "figure also holds waits for other processes on a shared machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
