"""Decoding throughput: batched greedy / beam-3 in one compiled loop vs one image at a time.

Self-contained: a randomly initialised decoder at the COCO sizes (E 256, U 512, V 5001) and
random feature maps. Every method decodes the full `--max-length` steps (an untrained model
rarely emits <end>, and the reference loop never stops early either), so the figures compare
the same work:

  batched greedy   `captioner.make_decoder` on a (B, 64, 2048) batch: tf.function +
                   tf.while_loop over steps, all images at once
  batched beam-3   the same with beam search (3 hypotheses per image)
  one at a time    the TensorFlow tutorial's `evaluate()`: for each image, a Python loop over
                   steps calling the model eagerly and taking the argmax

    .venv/bin/python benchmarks/bench_decode.py --batch 256
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from caption_attn.captioner import make_decoder  # noqa: E402
from caption_attn.config import DecodeConfig, write_json_atomic  # noqa: E402
from caption_attn.model import ShowAttendTell  # noqa: E402
from caption_attn.vocab import START  # noqa: E402


def time_batched(model, features, cfg: DecodeConfig, max_length: int, repeats: int) -> float:
    decoder = make_decoder(model, cfg, max_length)
    decoder(features[:2])                                   # trace once (any batch size)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        decoder(features).tokens.numpy()
        best = min(best, time.perf_counter() - t0)
    return features.shape[0] / best


def time_one_at_a_time(model, features, max_length: int) -> float:
    t0 = time.perf_counter()
    for i in range(features.shape[0]):
        state, context = model.init_decoder(features[i:i + 1])
        token = tf.constant([START])
        words = []
        for _ in range(max_length):
            logits, state, _ = model.decode_step(token, state, context)
            token = tf.argmax(logits, axis=-1, output_type=tf.int32)
            words.append(int(token[0]))
    return features.shape[0] / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--one-at-a-time", type=int, default=8,
                    help="images decoded one by one (the rate is per image)")
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=5001)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)

    keras.utils.set_random_seed(0)
    model = ShowAttendTell(args.vocab, 256, 512)
    features = tf.constant(np.random.default_rng(0).random((args.batch, 64, 2048),
                                                           dtype=np.float32))
    greedy = time_batched(model, features, DecodeConfig(beam=1), args.max_length, args.repeats)
    beam = time_batched(model, features, DecodeConfig(beam=3), args.max_length, args.repeats)
    single = time_one_at_a_time(model, features[:args.one_at_a_time], args.max_length)
    figures = {"batch": args.batch, "max_length": args.max_length,
               "greedy_captions_per_s": greedy, "beam3_captions_per_s": beam,
               "one_at_a_time_captions_per_s": single,
               "greedy_speedup": greedy / single, "beam3_speedup": beam / single}
    print(f"decoder E 256, U 512, V {args.vocab}; {args.max_length} steps per caption")
    print(f"batched greedy  ({args.batch} images) {greedy:9.1f} captions/s  "
          f"{greedy / single:7.1f} x")
    print(f"batched beam-3  ({args.batch} images) {beam:9.1f} captions/s  "
          f"{beam / single:7.1f} x")
    print(f"one at a time, eager             {single:9.1f} captions/s      1.0 x")
    if args.json:
        write_json_atomic(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
