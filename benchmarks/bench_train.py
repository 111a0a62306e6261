"""Training throughput: caption_attn's step vs the TensorFlow tutorial's, in one run.

Self-contained and offline: writes a synthetic Karpathy caption file and a float16 feature
cache (random features, COCO-like caption lengths: mean ~12 tokens with <start>/<end>, a tail
to 40) into a temp folder, then

  ours       the production `train.Trainer` step (bucketed tf.data batches, attention keys
             once per batch, one tf.while_loop over time) over one epoch
  reference  the tutorial's way: every batch padded to the dataset's longest caption,
             W1(features) recomputed at every step, the time loop unrolled in Python inside
             tf.function, decoder called once per step with a length-1 GRU, over the first
             --reference-batches batches of the same epoch

  timed in --rounds alternating rounds (ours, reference, ours, ...) after each side's first
  step; each side's best round counts, so a spell of other load on the machine, which only
  ever slows a round down, moves the ratio less than in one pass of each (all rounds printed)

  self-critical  one epoch of the trainer's SCST step (--scst-samples 5 per image, the mean
             baseline, CIDEr-D rewards against the synthetic references): sampled captions
             trained per second and the share of the steps' time spent computing the reward.
             The decoder is untrained, so samples rarely end before --max-length (39 tokens,
             3x a COCO caption): a worst case for both figures

and prints captions/s of both and their ratio, the first-step (trace + compile) time, and the
model-FLOP utilisation (useful FLOPs of real tokens, forward + backward = 3x forward) against
the CPU's matmul ceiling in the same precision (a 2048x2048 tf.matmul, `--matmul-size`, measured
in this run, see matmul_ceiling.py).

    .venv/bin/python benchmarks/bench_train.py                 # E 256, U 512, V 5001, B 64
    .venv/bin/python benchmarks/bench_train.py --precision bfloat16 --xla
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from caption_attn.quiet import import_tensorflow  # noqa: E402

import_tensorflow()  # without its start-up notices, as the CLI (real warnings still shown)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from caption_attn import feature_cache, feature_index, fused, train  # noqa: E402
from caption_attn.backbone import FEATURE_SHAPE, IMAGE_SIZE  # noqa: E402
from caption_attn.config import (ModelConfig, RunConfig, TrainConfig, VocabConfig,  # noqa: E402
                                 write_json_atomic)
from matmul_ceiling import matmul_gflops  # noqa: E402
from machine import (check_precisions, describe, interleaved,  # noqa: E402
                     run_in_temp_folder)

P, F = FEATURE_SHAPE


# ----------------------------------------------------------------------------- data
def caption_lengths(n: int, rng) -> np.ndarray:
    """Token counts incl. <start>/<end>: lognormal body (mean ~12), 2% tail up to 40."""
    body = np.exp(rng.normal(np.log(11.5), 0.22, n))
    tail = rng.uniform(20, 40, n)
    lengths = np.where(rng.random(n) < 0.02, tail, body)
    return np.clip(np.round(lengths), 5, 40).astype(int)


def synthetic_manifest(count: int) -> dict:
    """The manifest of a float16 cache of `count` synthetic feature files (no backbone)."""
    return {
        "format_version": feature_cache.FORMAT_VERSION, "backbone": "synthetic", "weights": "none",
        "weights_sha256": "", "dtype": "float16", "precision": "float32",
        "feature_shape": [P, F], "image_size": IMAGE_SIZE, "resize": "", "preprocess": "",
        "feature_layout": "", "feature_scale": 1.0,
        "npy_header_bytes": len(feature_cache.npy_header("float16")), "count": count}


def cover_every_word(captions: list[list[str]], words: list[str], rng) -> None:
    """Puts every word of `words` that no caption uses in place of a word used more than
    once, so each occurs and the captions keep their drawn lengths (in place). The trainer
    fits its vocabulary on captions cut to --max-length: the one long caption of every word
    that this replaces (until stop 36) gave V 2864, not 5001."""
    counts = collections.Counter(w for c in captions for w in c)
    missing = [w for w in words if w not in counts]
    for i in reversed(range(len(captions))):
        for j in rng.permutation(len(captions[i])):
            if not missing:
                return
            if counts[captions[i][j]] > 1:
                counts[captions[i][j]] -= 1
                captions[i][j] = missing.pop()
    if missing:
        raise SystemExit(f"{len(missing)} of the {len(words)} words do not fit in the "
                         "captions: fewer --vocab words or more --images")


def write_dataset(root: str, images: int, per_image: int, vocab_words: int, seed: int = 0,
                  val_images: int = 2):
    """Karpathy captions.json (the first `val_images` images val, the rest train) + a float16
    feature cache, whose train captions use every one of the `vocab_words` words: the
    vocabulary is exactly vocab_words + 4 tokens."""
    if not 0 <= val_images < images:
        raise SystemExit(f"{images} images with {val_images} val ones leave no train image: "
                         "more --images")
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab_words)]
    zipf = 1.0 / np.arange(1, vocab_words + 1)
    zipf /= zipf.sum()
    cache = os.path.join(root, "cache")
    os.makedirs(cache)
    header = feature_cache.npy_header("float16")
    captions = []                                   # each image's captions, as word lists
    manifest = synthetic_manifest(images)
    fingerprint = feature_cache.cache_identity(manifest)["fingerprint"]
    index = feature_index.SegmentWriter(cache)      # so the files count as this cache's own
    no_image = feature_index.ImageStamp(0, 0, "")
    for i in range(images):
        name = f"img{i:05d}.jpg"
        feats = rng.random((P, F), dtype=np.float32).astype(np.float16)
        path = feature_cache.feature_path(cache, name)
        with open(path, "wb") as f:
            f.write(header + feats.tobytes())
        index.add(feature_index.make_entry(name, fingerprint, os.stat(path), no_image))
        captions.append([list(rng.choice(words, size=n - 2, p=zipf))
                         for n in caption_lengths(per_image, rng)])
    train = [c for per_image_captions in captions[val_images:] for c in per_image_captions]
    cover_every_word(train, words, rng)
    entries = [{"filename": f"img{i:05d}.jpg", "split": "val" if i < val_images else "train",
                "sentences": [{"raw": " ".join(c)} for c in image_captions]}
               for i, image_captions in enumerate(captions)]
    index.close()
    write_json_atomic(os.path.join(root, "captions.json"), {"images": entries})
    write_json_atomic(os.path.join(cache, "manifest.json"), manifest)
    return os.path.join(root, "captions.json"), cache


# ----------------------------------------------------------------------------- reference
class RefAttention(keras.layers.Layer):
    """The tutorial's BahdanauAttention: W1(features) inside every call."""

    def __init__(self, units):
        super().__init__()
        self.W1, self.W2, self.V = (keras.layers.Dense(units), keras.layers.Dense(units),
                                    keras.layers.Dense(1))

    def call(self, features, hidden):                                 # (B, P, E), (B, U)
        score = self.V(tf.tanh(self.W1(features) + self.W2(hidden[:, None])))  # (B, P, 1)
        weights = tf.nn.softmax(score, axis=1)                        # (B, P, 1)
        return tf.reduce_sum(weights * features, axis=1), weights     # (B, E)


class RefDecoder(keras.layers.Layer):
    """The tutorial's RNN_Decoder: a length-1 GRU call per step, its state not passed in."""

    def __init__(self, embedding_dim, units, vocab_size):
        super().__init__()
        self.units = units
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim)
        self.gru = keras.layers.GRU(units, return_sequences=True, return_state=True)
        self.fc1, self.fc2 = keras.layers.Dense(units), keras.layers.Dense(vocab_size)
        self.attention = RefAttention(units)

    def call(self, x, features, hidden):                              # (B, 1), (B, P, E), (B, U)
        context, _ = self.attention(features, hidden)                 # (B, E)
        x = tf.concat([context[:, None], self.embedding(x)], -1)      # (B, 1, 2E)
        output, state = self.gru(x)                                   # (B, 1, U), (B, U)
        x = self.fc1(output)                                          # (B, 1, U)
        return self.fc2(tf.reshape(x, (-1, self.units))), state       # (B, V), (B, U)


def reference_step(embedding_dim, units, vocab_size, max_tokens):
    encoder = keras.layers.Dense(embedding_dim, activation="relu")
    decoder = RefDecoder(embedding_dim, units, vocab_size)
    optimizer = keras.optimizers.Adam()
    loss_object = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def loss_function(real, pred):
        mask = tf.cast(real != 0, pred.dtype)
        return tf.reduce_mean(loss_object(real, pred) * mask)

    @tf.function
    def step(img_tensor, target):                                     # (B, P, F), (B, L)
        loss = 0.0
        hidden = tf.zeros((tf.shape(target)[0], units))
        dec_input = target[:, :1]
        with tf.GradientTape() as tape:
            feats = encoder(tf.cast(img_tensor, tf.float32))
            for i in range(1, max_tokens):                            # Python-unrolled
                predictions, hidden = decoder(dec_input, feats, hidden)
                loss += loss_function(target[:, i], predictions)
                dec_input = target[:, i:i + 1]
        variables = encoder.trainable_variables + decoder.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss / max_tokens
    return step


# ----------------------------------------------------------------------------- measuring
def model_flops(lengths, encoded_images: int, E, U, V) -> float:
    """Forward FLOPs of our model: the encoder and key projection once per encoded image,
    the recurrent steps (T = length - 1) and output layer per caption."""
    per_image = 2 * (P * F * E + P * E * U + E * U)
    per_step = 2 * (U * U + P * U + P * E + U * E + E * 3 * U * 2 + U * 3 * U
                    + U * E + E * E + E * V)
    return float(encoded_images * per_image + sum((n - 1) * per_step for n in lengths))


def prepare_ours(trainer):
    """The trainer's epoch of batches, its step traced on the first: (batches, first step s)."""
    ds = trainer.inputs.captions("train", epoch=0)
    trainer._compile(ds.element_spec)
    batches = list(ds)
    t0 = time.perf_counter()
    float(trainer.train_step(batches[0])["loss"])
    return batches, time.perf_counter() - t0


def time_ours(trainer, batches) -> tuple[float, float]:
    """One pass of our step over `batches`: (captions/s, captions per CPU second)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for batch in batches:
        out = trainer.train_step(batch)
    float(out["loss"])
    captions = sum(int(b[2].shape[0]) for b in batches)
    return captions / (time.perf_counter() - t0), captions / (time.process_time() - c0)


def best(rounds: list) -> tuple:
    """Each figure's best over the rounds: [(a, b), ...] -> (max a, max b)."""
    return tuple(max(column) for column in zip(*rounds))


def time_scst(trainer) -> dict:
    """One epoch of self-critical steps (K samples per image, the run's baseline): sampled
    captions trained per second, and the share of the steps' wall time spent in the reward
    (CIDEr-D + baseline + advantages, the numpy part called by tf.numpy_function)."""
    scst = trainer.scst
    spent = []

    def timed_rewards(*args, _rewards=scst._rewards):
        t0 = time.perf_counter()
        out = _rewards(*args)
        spent.append(time.perf_counter() - t0)
        return out
    scst._rewards = timed_rewards                      # before the step is traced
    ds = trainer.inputs.images(epoch=1)
    trainer.steps.compile_scst(ds.element_spec)
    step = trainer.steps.scst_step
    batches = list(ds)
    t0 = time.perf_counter()
    float(step(batches[0], tf.constant(0, tf.int64))["loss"])
    compile_s = time.perf_counter() - t0
    spent.clear()
    captions = 0.0
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        out = step(batch, tf.constant(i, tf.int64))
        captions += float(out["captions"])
    seconds = time.perf_counter() - t0
    return {"captions_per_s": captions / seconds, "first_step_s": compile_s,
            "reward_share": sum(spent) / seconds, "images_per_step": trainer.inputs.images_per_step,
            "samples": trainer.cfg.train.scst_samples, "steps": len(batches)}


def prepare_reference(step, batches, max_tokens):
    """The batches padded to `max_tokens`, the step traced on the first:
    (padded batches, first step s)."""
    padded = [(f, tf.pad(t, [[0, 0], [0, max_tokens - t.shape[1]]])) for f, t in batches]
    t0 = time.perf_counter()
    float(step(*padded[0]))
    return padded, time.perf_counter() - t0


def time_reference(step, padded) -> tuple[float, float]:
    """One pass of the tutorial's step: (captions/s, captions per CPU second)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for f, t in padded:
        out = step(f, t)
    float(out)
    captions = sum(int(t.shape[0]) for _, t in padded)
    return captions / (time.perf_counter() - t0), captions / (time.process_time() - c0)


def reference_batches(trainer, embedding_dim, units, count):
    """The tutorial's step over the first `count` batches of our epoch (each caption with its
    image's features): (step, padded batches, first step s)."""
    keras.utils.set_random_seed(0)
    max_tokens = max(len(t) for t in trainer.inputs.items["train"][1])
    batches = [(tf.gather(f, i), t) for f, i, t in
               list(trainer.inputs.captions("train", epoch=0))[:count]]
    step = reference_step(embedding_dim, units, len(trainer.data.vocab), max_tokens)
    return (step, *prepare_reference(step, batches, max_tokens))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--captions-per-image", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=4997, help="words (+4 special = 5001)")
    ap.add_argument("--embedding-dim", type=int, default=256)
    ap.add_argument("--units", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--xla", action="store_true")
    ap.add_argument("--no-fused-kernel", action="store_true",
                    help="our step with TensorFlow's ops for the attention scores, not the "
                         "fused kernel (caption_attn/fused.py), to compare the two")
    ap.add_argument("--reference-batches", type=int, default=6,
                    help="batches timed for the (slow) reference step; 0 skips it (a smoke "
                         "run: no speedup is printed)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (one epoch of ours, the reference batches), alternating; "
                         "each side's best round counts")
    ap.add_argument("--matmul-size", type=int, default=2048,
                    help="N of the N x N matmul yardstick of the MFU (default 2048)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    check_precisions(ap, "--precision", [args.precision])
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.no_fused_kernel:
        fused.ENABLED = False
    return run_in_temp_folder("bench_train_", measure, args, report)


def measure(args, root: str) -> dict:
    """Writes the synthetic dataset into `root`, times both steps; returns the figures."""
    captions, cache = write_dataset(root, args.images, args.captions_per_image, args.vocab)
    cfg = RunConfig(captions=captions, cache=cache,
                    vocab=VocabConfig(vocab_size=args.vocab, max_length=38),
                    model=ModelConfig(embedding_dim=args.embedding_dim, units=args.units),
                    train=TrainConfig(batch_size=args.batch_size, precision=args.precision,
                                      xla=args.xla, memory_cache_gb=4.0, epochs=2,
                                      scst_after=1))
    run = os.path.join(root, "run")
    train.open_run(run, cfg)
    trainer = train.Trainer(cfg, run, progress=False, log=lambda *a: None)
    V = len(trainer.data.vocab)
    lengths = [len(t) for t in trainer.inputs.items["train"][1]]
    max_tokens = max(lengths)
    batches, compile_s = prepare_ours(trainer)
    timers = [lambda: time_ours(trainer, batches)]
    ref_compile_s = None
    if args.reference_batches > 0:
        ref_step, padded, ref_compile_s = reference_batches(
            trainer, args.embedding_dim, args.units, args.reference_batches)
        timers.append(lambda: time_reference(ref_step, padded))
    ours_rounds, *ref_rounds = interleaved(args.rounds, *timers)
    ref_rounds = ref_rounds[0] if ref_rounds else None
    ours, ours_cpu = best(ours_rounds)
    ref, ref_cpu = best(ref_rounds) if ref_rounds else (None, None)
    traces = trainer.train_step.experimental_get_tracing_count()
    per_image = sum(int(b[2].shape[0]) for b in batches) / \
        sum(int(b[0].shape[0]) for b in batches)
    flops = model_flops(lengths, round(len(lengths) / per_image), args.embedding_dim,
                        args.units, V) * 3
    peak = matmul_gflops(args.precision, args.matmul_size)
    ours_gflops = flops / (len(lengths) / ours) / 1e9

    scst = time_scst(trainer)

    return {
        "setup": {"embedding_dim": args.embedding_dim, "units": args.units, "vocab": V,
                  "batch_size": args.batch_size, "precision": args.precision, "xla": args.xla,
                  "captions": len(lengths), "mean_tokens": float(np.mean(lengths)),
                  "max_tokens": max_tokens, "threads": os.cpu_count(),
                  "matmul_size": args.matmul_size,
                  # what the step traced above ran (`fused.usable`), or why not
                  "fused_kernel": fused_kernel_state(args.precision, args.xla)},
        "rounds": args.rounds,
        "ours_rounds_captions_per_s": [r[0] for r in ours_rounds],
        "reference_rounds_captions_per_s": [r[0] for r in ref_rounds] if ref_rounds else None,
        "ours_captions_per_s": ours, "ours_first_step_s": compile_s,
        "ours_traces": traces, "ours_batch_shapes": len({int(b[2].shape[1]) for b in batches}),
        "captions_per_encoded_image": per_image,
        "reference_captions_per_s": ref, "reference_first_step_s": ref_compile_s,
        "speedup": ours / ref if ref else None,
        # per second of process CPU time (all threads): what other load on the machine
        # changes less than wall time, since ours and the reference run at different moments
        "ours_captions_per_cpu_s": ours_cpu, "reference_captions_per_cpu_s": ref_cpu,
        "speedup_cpu_time": ours_cpu / ref_cpu if ref else None,
        "load_average": os.getloadavg()[0],
        "model_gflops_per_s": ours_gflops, "matmul_gflops_per_s": peak,
        "mfu": ours_gflops / peak, "scst": scst, "cpu": describe(),
    }


def fused_kernel_state(precision: str, xla: bool) -> str:
    """Whether our step runs the fused attention kernel, and if not, why."""
    if not fused.ENABLED:
        return "off (--no-fused-kernel)"
    if precision != "float32":
        return "off (float32 only)"
    if tf.config.list_logical_devices("GPU"):
        return "off (GPU)"
    if fused.library() is None:
        return f"off ({fused.problem() or 'it does not load'})"
    return "off in the XLA-compiled step (on in the self-critical step)" if xla else "on"


def report(figures: dict) -> None:
    s = figures["setup"]
    ours, ref = figures["ours_captions_per_s"], figures["reference_captions_per_s"]
    print(figures["cpu"])
    print(f"setup: E {s['embedding_dim']}, U {s['units']}, V {s['vocab']}, batch "
          f"{s['batch_size']}, {s['precision']}{' + XLA' if s['xla'] else ''}, "
          f"{s['captions']} captions, mean {s['mean_tokens']:.1f} tokens, max "
          f"{s['max_tokens']}, fused attention kernel {s.get('fused_kernel', '?')}")
    print("rounds     ours " + ", ".join(f"{x:.1f}" for x in figures["ours_rounds_captions_per_s"])
          + (" | reference " + ", ".join(f"{x:.1f}" for x in
                                         figures["reference_rounds_captions_per_s"])
             if ref is not None else "") + " captions/s (the best of each counts)")
    print(f"ours       {ours:8.1f} captions/s   first step {figures['ours_first_step_s']:5.1f} s"
          f"   traces {figures['ours_traces']}, {figures['ours_batch_shapes']} batch shapes, "
          f"{figures['captions_per_encoded_image']:.2f} captions per encoded image")
    if ref is None:
        print("reference  skipped (--reference-batches 0): no speedup")
    else:
        print(f"reference  {ref:8.1f} captions/s   first step "
              f"{figures['reference_first_step_s']:5.1f} s   (padded to {s['max_tokens']}, "
              f"keys every step, Python-unrolled)")
        print(f"speedup    {ours / ref:8.2f} x   (per CPU second: "
              f"{figures['speedup_cpu_time']:.2f} x, {figures['ours_captions_per_cpu_s']:.1f} "
              f"vs {figures['reference_captions_per_cpu_s']:.1f} captions; load average "
              f"{figures['load_average']:.1f} on {s['threads']} CPUs)")
    print(f"MFU        {100 * figures['mfu']:8.1f} %  ({figures['model_gflops_per_s']:.1f} model "
          f"GFLOP/s of the CPU's {figures['matmul_gflops_per_s']:.0f} GFLOP/s "
          f"{s['matmul_size']}x{s['matmul_size']} {s['precision']} matmul)")
    sc = figures["scst"]
    print(f"self-critical {sc['captions_per_s']:8.1f} sampled captions/s  "
          f"({sc['images_per_step']} images x {sc['samples']} samples per step, first step "
          f"{sc['first_step_s']:.1f} s; "
          f"cross-entropy {ours:.1f} captions/s); reward {100 * sc['reward_share']:.1f} % of "
          f"the steps' time (target <= 20 %: {'met' if sc['reward_share'] <= 0.2 else 'NOT met'})")


if __name__ == "__main__":
    sys.exit(main())
