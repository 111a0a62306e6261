"""Serving speed of `caption-attn export`: the loaded SavedModel vs the in-process Captioner.

Self-contained: renders JPEGs (640x480, like COCO, so both sides decode and resize them),
makes a random-backbone feature cache of them and a run folder (its split.json and
vocab.json written as `train` writes them) holding an untrained decoder at the COCO sizes
(E 256, U 512, V 5001; it never emits <end>, so every caption takes all `--max-length` steps
on both sides), exports it with `--tflite`, and measures on the same files:

  captioner   `Captioner.caption_images(paths)`: OpenCV decode + resize, backbone, decoder
              (what `caption-attn caption` runs), files read from disk
  savedmodel  the export, loaded with tf.saved_model.load: file bytes -> captions, all in
              the graph (tf.data decode + resize, backbone, beam search, words)
  tflite      the export's captioner.tflite on one image already resized (greedy;
              `--tflite-quantize` float16 or dynamic for a quantized one)

At batch 1 each side captions every image alone (per-image latency p50, p95); at batch 32 it
captions all of them in one call (images/s, best of the rounds: other processes only ever
slow a round down). Rounds alternate between the sides. The process CPU time per image
(median) is printed too: it is less sensitive to other jobs than the rates. It also prints
how often the two give the same caption on these resized JPEGs.

    .venv/bin/python benchmarks/bench_export.py --images 32 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from caption_attn.quiet import import_tensorflow  # noqa: E402

import_tensorflow()  # without its start-up notices, as the CLI (real warnings still shown)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench_extract import render_images  # noqa: E402
from machine import check_precisions, cpu_name, describe, run_in_temp_folder  # noqa: E402
from caption_attn import export, extract  # noqa: E402
from caption_attn.captioner import Captioner  # noqa: E402
from caption_attn.config import (TFLITE_QUANTIZATIONS, DecodeConfig, ExportConfig,  # noqa: E402
                                 ExtractConfig, ModelConfig, RunConfig, VocabConfig)
from caption_attn.fileio import write_json_atomic  # noqa: E402
from caption_attn.images import load_image  # noqa: E402
from caption_attn.model import ShowAttendTell  # noqa: E402
from caption_attn.run import RunFolder  # noqa: E402
from caption_attn.train_data import load_train_data  # noqa: E402
from caption_attn.vocab import Vocabulary  # noqa: E402


def make_run(folder: str, args) -> tuple[str, list[str]]:
    """A run folder with an untrained COCO-size decoder on a random-backbone cache of
    `args.images` rendered JPEGs; returns (run folder, image paths)."""
    images = os.path.join(folder, "images")
    os.makedirs(images)
    keys = render_images(images, args.images, 640, 480)
    cache = os.path.join(folder, "cache")
    extract.extract_features(images, ExtractConfig(
        cache=cache, weights="random", dtype="float16", precision=args.precision,
        batch_size=16), progress=False)
    captions = os.path.join(folder, "captions.json")   # one each; the first two train, val
    write_json_atomic(captions, {"images": [
        {"filename": k, "split": ("train", "val")[i] if i < 2 else "test",
         "sentences": [{"raw": "a picture"}]} for i, k in enumerate(keys)]})
    run = RunFolder(os.path.join(folder, "run"))
    os.makedirs(run.path)
    cfg = RunConfig(captions=captions, cache=cache,
                    vocab=VocabConfig(max_length=args.max_length - 1), model=ModelConfig())
    cfg.save(run.config)
    # split.json and vocab.json as `train` writes them (export refuses a run without the
    # former); the vocabulary is made up at --vocab words, not built from the captions
    data = load_train_data(cfg, run, reuse=False)
    vocab = Vocabulary([f"w{i}" for i in range(args.vocab - 4)])
    dataclasses.replace(data, vocab=vocab).fix_in(run, captions)
    keras.utils.set_random_seed(0)
    model = ShowAttendTell(args.vocab, ModelConfig.embedding_dim, ModelConfig.units)
    run.save_best(model, epoch=1, monitor="val_loss", value=0.0)
    return run.path, [os.path.join(images, k) for k in keys]


def read(paths):
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(f.read())
    return out


def timed(fn, cpu: list) -> float:
    """Wall seconds of fn(); its process CPU seconds are appended to `cpu`."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    cpu.append(time.process_time() - start_cpu)
    return time.perf_counter() - start


def measure(sides: dict, lite, paths: list, pixels: list, rounds: int) -> dict:
    """Wall and CPU seconds: {side: {"single", "single_cpu", "batch", "batch_cpu"}} for each
    of `sides` (paths -> captions), plus "tflite": {"single", "single_cpu"}."""
    for call in sides.values():                      # trace / warm up both batch sizes
        call(paths[:1])
        call(paths)
    lite(image=pixels[0])
    times = {name: {k: [] for k in ("single", "single_cpu", "batch", "batch_cpu")}
             for name in [*sides, "tflite"]}
    for _ in range(rounds):                          # rounds alternate between the sides
        for name, call in sides.items():
            t = times[name]
            t["single"] += [timed(lambda: call([p]), t["single_cpu"]) for p in paths]
            t["batch"].append(timed(lambda: call(paths), t["batch_cpu"]))
        t = times["tflite"]
        t["single"] += [timed(lambda: lite(image=x), t["single_cpu"]) for x in pixels]
    return times


def report(times: dict, n: int, figures: dict, args) -> None:
    """Print the table and add its figures to `figures`."""
    print(f"{describe()}; {n} JPEGs 640x480, beam {args.beam}, {args.max_length} steps, "
          f"V {args.vocab}, backbone {args.precision}")
    print(f"{'':12s} {'batch 1 p50':>12s} {'p95':>8s} {'CPU/img':>9s} {'batch ' + str(n):>12s} "
          f"{'CPU/img':>9s}")
    for name, t in times.items():
        p50, p95 = np.percentile(t["single"], [50, 95]) * 1e3
        cpu1 = np.median(t["single_cpu"]) * 1e3
        figures.update({f"{name}_p50_ms": p50, f"{name}_p95_ms": p95,
                        f"{name}_cpu_ms_batch1": cpu1})
        line = f"{name:12s} {p50:9.1f} ms {p95:5.1f} ms {cpu1:6.0f} ms"
        if t["batch"]:
            rate, cpu_n = n / min(t["batch"]), np.median(t["batch_cpu"]) * 1e3 / n
            figures.update({f"{name}_images_per_s": rate, f"{name}_cpu_ms_per_image": cpu_n})
            line += f" {rate:7.1f} img/s {cpu_n:6.0f} ms"
        else:
            line += f"   (greedy, {args.tflite_quantize}, {figures['tflite_mb']:.1f} MB)"
        print(line)
    ratio = figures["savedmodel_images_per_s"] / figures["captioner_images_per_s"]
    cpu_ratio = figures["captioner_cpu_ms_per_image"] / figures["savedmodel_cpu_ms_per_image"]
    figures.update({"savedmodel_vs_captioner": ratio, "cpu_savedmodel_vs_captioner": cpu_ratio})
    print(f"SavedModel / Captioner at batch {n}: {ratio:.2f} in images/s, {cpu_ratio:.2f} in "
          f"CPU time per image; same captions on {figures['same_captions']}/{n} resized JPEGs "
          f"(largest log-probability difference {figures['max_score_difference']:.1e}); "
          f"export took {figures['export_seconds']:.0f} s")


def run_benchmark(args, folder: str) -> dict:
    run, paths = make_run(folder, args)
    decode_cfg = DecodeConfig(beam=args.beam, max_length=args.max_length)
    out = os.path.join(folder, "export")
    t0 = time.perf_counter()
    no_check = {} if args.tflite_quantize == "none" else {"check_images": 0}  # not timed
    info = export.export_run(run, out, decode_cfg, ExportConfig(
        tflite=True, tflite_quantize=args.tflite_quantize, **no_check), log=lambda m: 0)
    export_s = time.perf_counter() - t0

    captioner = Captioner.from_run(run, decode_cfg)
    serve = tf.saved_model.load(out).signatures["serving_default"]
    with open(os.path.join(out, export.TFLITE_FILE), "rb") as f:
        lite = export.interpreter(f.read())
    sides = {"captioner": lambda batch: captioner.caption_images(batch),
             "savedmodel": lambda batch: serve(images=tf.constant(read(batch), tf.string))}
    times = measure(sides, lite, paths, [load_image(p)[None] for p in paths], args.rounds)

    results, _ = captioner.caption_images(paths)
    got = serve(images=tf.constant(read(paths), tf.string))
    same = sum(got["captions"][i].numpy().decode() == results[p][1][0].text
               for i, p in enumerate(paths))
    score_diff = np.abs(got["scores"].numpy() - [results[p][1][0].log_prob for p in paths])
    figures = {"cpu": cpu_name(), "load_average": os.getloadavg(), "images": len(paths),
               "beam": args.beam, "max_length": args.max_length, "vocab": args.vocab,
               "precision": args.precision, "tflite_quantize": args.tflite_quantize,
               "export_seconds": export_s, "tflite_mb": info["tflite"]["bytes"] / 1e6,
               "same_captions": same, "max_score_difference": float(score_diff.max())}
    report(times, len(paths), figures, args)
    return figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32, help="images (and the large batch)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--beam", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=5001)
    ap.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                    help="the backbone's compute precision (the cache's --precision)")
    ap.add_argument("--tflite-quantize", default="none", choices=TFLITE_QUANTIZATIONS)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    check_precisions(ap, "--precision", [args.precision])
    if args.images < 2:   # the run's split needs a train and a val image
        ap.error(f"--images must be at least 2, got {args.images}")
    return run_in_temp_folder("bench_export_", run_benchmark, args)


if __name__ == "__main__":
    sys.exit(main())
