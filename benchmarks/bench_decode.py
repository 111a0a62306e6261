"""Decoding throughput: batched greedy / beam-3 in one compiled loop vs one image at a time.

Self-contained: a randomly initialised decoder at the COCO sizes (E 256, U 512, V 5001) and
random feature maps. Every method decodes the full `--max-length` steps (an untrained model
rarely emits <end>, and the reference loop never stops early either), so the figures compare
the same work:

  batched greedy   `captioner.make_decoder` on a (B, 64, 2048) batch with the default
                   settings of `caption`/`evaluate`: one tf.function + tf.while_loop over
                   steps for all images at once, XLA-compiled for batches of
                   `--xla-min-images` (32) or more (on a CPU in one slice per core,
                   decoded side by side), the GRU's input gates looked up in
                   the model's gate table (`fixed_weights`, as the `Captioner`); the
                   one-off compile and table are printed separately, not counted in the rate
  batched beam-3   the same with beam search (3 hypotheses per image)
  nothing compiled the same loops without XLA (`--xla-min-images 0`)
  one image        the default settings on a batch of one (a one-image `caption`: no XLA)
  one at a time    the TensorFlow tutorial's `evaluate()`: for each image, a Python loop over
                   steps calling the model eagerly and taking the argmax

The sides alternate in `--rounds` rounds (a pass one at a time, then every batched method
`--repeats` times; a last pass one at a time after them) and each side's best counts: other
load on the machine only ever slows a measurement down, and when every batched method was
timed in one short window between two passes, a slow spell in that window decided the ratio.

    .venv/bin/python benchmarks/bench_decode.py --batch 256
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from caption_attn.quiet import import_tensorflow  # noqa: E402

import_tensorflow()  # without its start-up notices, as the CLI (real warnings still shown)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from caption_attn.captioner import make_decoder  # noqa: E402
from caption_attn.config import DecodeConfig  # noqa: E402
from caption_attn.fileio import write_json_atomic  # noqa: E402
from caption_attn.model import ShowAttendTell  # noqa: E402
from caption_attn.vocab import START  # noqa: E402
from machine import describe, interleaved  # noqa: E402


def batched_decoder(model, features, cfg: DecodeConfig, max_length: int):
    """(the decoder `caption` builds for `cfg`, seconds of its first call incl. tracing)."""
    decoder = make_decoder(model, cfg, max_length, fixed_weights=True)  # as the Captioner's
    t0 = time.perf_counter()
    decoder(features).tokens.numpy()             # trace (and XLA-compile, gate table) once
    return decoder, time.perf_counter() - t0


def time_batched(decoder, features, repeats: int) -> float:
    """captions/s of `decoder` on `features` at the best of `repeats` calls."""
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


ROWS = (  # name, label, beam, DecodeConfig overrides, batch of one
    ("greedy", "batched greedy", 1, {}, False),
    ("beam3", "batched beam-3", 3, {}, False),
    ("greedy_plain", "batched greedy, nothing compiled", 1, {"xla_min_images": 0}, False),
    ("beam3_plain", "batched beam-3, nothing compiled", 3, {"xla_min_images": 0}, False),
    ("greedy_one", "one image, greedy", 1, {}, True),
    ("beam3_one", "one image, beam-3", 3, {}, True),
)
TARGETS = {"greedy": 100, "beam3": 40}   # issue #11: x the one-at-a-time decoder, no --xla


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--one-at-a-time", type=int, default=8,
                    help="images decoded one by one (the rate is per image)")
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=5001)
    ap.add_argument("--repeats", type=int, default=2,
                    help="calls of each batched method per round (its best counts)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds alternating one-at-a-time passes and the batched methods")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    for name in ("batch", "one_at_a_time", "max_length", "vocab", "repeats", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")

    # each row builds its own decoders on purpose: tf.function's retracing advice is noise here
    tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(0)
    model = ShowAttendTell(args.vocab, 256, 512)
    features = tf.constant(np.random.default_rng(0).random((args.batch, 64, 2048),
                                                           dtype=np.float32))
    inputs = {name: features[:1] if one else features for name, _, _, _, one in ROWS}
    decoders, firsts = {}, {}
    for name, _, beam, overrides, _ in ROWS:
        decoders[name], firsts[name] = batched_decoder(
            model, inputs[name], DecodeConfig(beam=beam, **overrides), args.max_length)

    def yardstick():
        return time_one_at_a_time(model, features[:args.one_at_a_time], args.max_length)
    timers = [functools.partial(time_batched, decoders[name], inputs[name], args.repeats)
              for name in decoders]
    passes, *per_row = interleaved(args.rounds, yardstick, *timers)
    passes.append(yardstick())                   # and once after the last round
    rounds = dict(zip(decoders, per_row))
    single = max(passes)
    rates = {name: (max(rounds[name]), firsts[name]) for name in decoders}

    print(describe())
    print(f"decoder E 256, U 512, V {args.vocab}; {args.max_length} steps per caption; "
          f"{args.batch} images per batch; each side's best of {args.rounds} rounds "
          f"alternating (one at a time: {args.rounds + 1} passes); TensorFlow {tf.__version__}")
    print(f"{'':34s} {'captions/s':>10s} {'speedup':>8s} {'first call':>11s}")
    print(f"{'one at a time, eager':34s} {single:10.1f} {1:7.1f}x   (passes "
          + ", ".join(f"{p:.1f}" for p in passes) + ")")
    figures = {"cpu": describe(), "batch": args.batch, "max_length": args.max_length,
               "rounds": args.rounds, "one_at_a_time_captions_per_s": single,
               "one_at_a_time_passes": passes}
    for name, label, *_ in ROWS:
        rate, first = rates[name]
        figures.update({f"{name}_captions_per_s": rate, f"{name}_speedup": rate / single,
                        f"{name}_first_call_s": first,
                        f"{name}_rounds_captions_per_s": rounds[name]})
        print(f"{label:34s} {rate:10.1f} {rate / single:7.1f}x {first:10.1f}s   (rounds "
              + ", ".join(f"{r:.1f}" for r in rounds[name]) + ")")
    print("issue #11 targets, default settings: " + "; ".join(
        f"{name} {figures[name + '_speedup']:.1f}x (>= {target}x: "
        f"{'met' if figures[name + '_speedup'] >= target else 'NOT met'})"
        for name, target in TARGETS.items()))
    if args.json:
        write_json_atomic(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
