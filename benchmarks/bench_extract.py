"""Throughput of `extract-features`: model-only vs end-to-end, float32 vs mixed bfloat16.

Self-contained: renders its own JPEGs (640x480, like COCO) into a temp folder and uses a random
backbone (no network). For each precision it measures

  model-only  the backbone on in-memory uint8 batches (B, 299, 299, 3)
  end-to-end  image files -> decode/resize (thread pool) -> backbone -> .npy writer thread,
              the pipeline of `extract_features`, with a warm backbone (tracing excluded)

repeats the pair `--repeats` times interleaved and keeps the best of each (other processes on
the machine only ever slow a run down). CPU ms/image (process time) is printed too: it is less
sensitive to other load than images/s.

It also prints the yardstick for the bfloat16/float32 ratio: the backbone's GFLOP/s in each
precision next to what a 2048x2048 tf.matmul (`--matmul-size`) reaches on this CPU in that
precision (matmul_ceiling.py), and the matmul's own bfloat16/float32 ratio. Without AMX a CPU's
bf16 dot products (AVX512-BF16) do at most twice the fp32 FMA work per cycle, so that ratio is
<= 2.

    .venv/bin/python benchmarks/bench_extract.py --images 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from caption_attn.quiet import import_tensorflow  # noqa: E402

import_tensorflow()  # without its start-up notices, as the CLI (real warnings still shown)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from caption_attn import backbone as backbone_lib  # noqa: E402
from caption_attn import extract  # noqa: E402
from caption_attn.backbone import Backbone, build_backbone  # noqa: E402
from caption_attn.config import FEATURE_DTYPES  # noqa: E402
from caption_attn.feature_index import SegmentWriter  # noqa: E402
from caption_attn.fileio import write_json_atomic  # noqa: E402
from caption_attn.images import load_image  # noqa: E402
from machine import check_precisions, describe  # noqa: E402
from matmul_ceiling import matmul_gflops  # noqa: E402


def render_images(folder: str, n: int, width: int, height: int, seed: int = 0) -> list[str]:
    """n JPEGs of random coloured shapes on a gradient; returns their keys."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]          # (1, W, 1)
    keys = []
    for i in range(n):
        base = rng.uniform(0, 1, (1, 1, 3)).astype(np.float32)                  # (1, 1, 3)
        img = np.ascontiguousarray(np.broadcast_to(ramp * base, (height, width, 3)),
                                   dtype=np.uint8)                              # (H, W, 3)
        for _ in range(6):
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            r = int(rng.integers(10, height // 3))
            if rng.random() < 0.5:
                cv2.circle(img, (x, y), r, color, -1, cv2.LINE_AA)
            else:
                cv2.rectangle(img, (x - r, y - r), (x + r, y + r), color, -1)
        img = cv2.GaussianBlur(img, (3, 3), 0)
        key = f"img_{i:05d}.jpg"
        cv2.imwrite(os.path.join(folder, key), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        keys.append(key)
    return keys


def backbone_gflop(model) -> float:
    """Multiply-add FLOPs (x2) of one image through the backbone's convolutions (the rest,
    pooling and concatenation, is well under 1 %)."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, c_in, c_out = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            total += 2 * h * w * kh * kw * c_in * c_out
    return total / 1e9


def time_model(backbone: Backbone, images: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(images/s, CPU ms/image) of the backbone alone over `images` (N, 299, 299, 3)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(images), batch_size):
        backbone(images[i:i + batch_size])                                      # (B, 64, 2048)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(images) / wall, 1000 * cpu / len(images)


def time_pipeline(backbone: Backbone, images_dir: str, keys: list[str], batch_size: int,
                  workers: int, dtype: str) -> tuple[float, float]:
    """(images/s, CPU ms/image) of files -> cache through extract_features' pipeline."""
    import keras

    cache = tempfile.mkdtemp(prefix="bench_cache_")
    try:
        index = SegmentWriter(cache)   # provenance entries, written as extract-features does
        wall, cpu = time.perf_counter(), time.process_time()
        with extract._opencv_settings():
            written, failed = extract._run_pipeline(backbone, images_dir, cache, keys, dtype,
                                                    batch_size, workers,
                                                    keras.utils.Progbar(len(keys), verbose=0),
                                                    index, "bench")
        index.close()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert len(written) == len(keys) and not failed, failed
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return len(keys) / wall, 1000 * cpu / len(keys)


def default_precisions() -> list[str]:
    """float32 and bfloat16, or float32 alone where oneDNN's cap would abort in bfloat16
    (`ONEDNN_MAX_CPU_ISA=AVX2` on an AVX-512 CPU; said on stdout)."""
    cap = backbone_lib.onednn_aborts_on("bfloat16")
    if cap:
        print(f"note: bfloat16 left out: oneDNN capped at {cap} (ONEDNN_MAX_CPU_ISA) would "
              f"abort in it on this CPU")
        return ["float32"]
    return ["float32", "bfloat16"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64, help="number of images (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="images per backbone call")
    p.add_argument("--precisions", help="comma-separated: float32, bfloat16 (default: both, "
                   "bfloat16 left out where oneDNN's cap would abort in it)")
    p.add_argument("--dtype", default="float16", choices=FEATURE_DTYPES, help="cache dtype")
    p.add_argument("--workers", type=int, default=0, help="decode threads (0: CPU count)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats, best kept")
    p.add_argument("--size", default="640x480", help="rendered image size WxH")
    p.add_argument("--matmul-size", type=int, default=2048,
                   help="N of the N x N matmul yardstick (default 2048)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    precisions = args.precisions.split(",") if args.precisions else default_precisions()
    check_precisions(p, "--precisions", precisions)
    width, height = (int(v) for v in args.size.lower().split("x"))
    workers = args.workers or os.cpu_count() or 1

    folder = tempfile.mkdtemp(prefix="bench_images_")
    try:
        keys = render_images(folder, args.images, width, height)
        images = np.stack([load_image(os.path.join(folder, k)) for k in keys])
        t = time.perf_counter()
        for k in keys:
            load_image(os.path.join(folder, k))
        decode_ms = 1000 * (time.perf_counter() - t) / len(keys)
        print(describe())
        print(f"{len(keys)} images {width}x{height} JPEG, batch {args.batch_size}, "
              f"{workers} decode threads, cache dtype {args.dtype}, {os.cpu_count()} CPUs; "
              f"decode+resize {decode_ms:.1f} ms/image (one thread)")

        results, matmul = {}, {}
        for precision in precisions:
            backbone = Backbone(build_backbone("random", 0, precision))
            gflop = backbone_gflop(backbone.model)
            matmul[precision] = matmul_gflops(precision, args.matmul_size)
            backbone(images[:args.batch_size])                                  # trace, warm up
            best = {"model": (0.0, 0.0), "e2e": (0.0, 0.0)}
            for _ in range(args.repeats):
                m = time_model(backbone, images, args.batch_size)
                e = time_pipeline(backbone, folder, keys, args.batch_size, workers, args.dtype)
                best["model"] = max(best["model"], m)
                best["e2e"] = max(best["e2e"], e)
            results[precision] = best
            (mi, mc), (ei, ec) = best["model"], best["e2e"]
            print(f"{precision:>9}: model-only {mi:6.1f} images/s ({mc:4.0f} CPU ms/image)   "
                  f"end-to-end {ei:6.1f} images/s ({ec:4.0f} CPU ms/image)   "
                  f"end-to-end/model-only {ei / mi:.2f}")
            print(f"{'':>9}  backbone {gflop:.2f} GFLOP/image -> {mi * gflop:5.0f} GFLOP/s "
                  f"model-only = {100 * mi * gflop / matmul[precision]:.0f} % of this CPU's "
                  f"{matmul[precision]:.0f} GFLOP/s {precision} matmul "
                  f"({args.matmul_size}x{args.matmul_size})")
        if {"float32", "bfloat16"} <= set(results):
            f32, b16 = results["float32"], results["bfloat16"]
            print(f"bfloat16/float32: model-only {b16['model'][0] / f32['model'][0]:.2f}x, "
                  f"end-to-end {b16['e2e'][0] / f32['e2e'][0]:.2f}x, CPU time per image "
                  f"{f32['model'][1] / b16['model'][1]:.2f}x less")
            print(f"bfloat16/float32 of the CPU's {args.matmul_size}x{args.matmul_size} matmul "
                  f"(the ceiling): {matmul['bfloat16'] / matmul['float32']:.2f}x")
        if args.json:
            write_json_atomic(args.json, {
                "cpu": describe(), "images": len(keys), "batch_size": args.batch_size,
                **{f"{p}_{stage}_images_per_s": best[key][0]
                   for p, best in results.items()
                   for stage, key in (("model_only", "model"), ("end_to_end", "e2e"))},
                **{f"{p}_matmul_gflops_per_s": g for p, g in matmul.items()}})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
