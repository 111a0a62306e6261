"""Cost of the feature cache's provenance checks, at COCO size.

Part 1 (no TensorFlow): a synthetic cache of N keys (default 123,287 = COCO 2014 train + val)
with sparse feature files of the real size (262,272 bytes of float16, no disk blocks) and
sparse source images, indexed by `SegmentWriter` in 1,024-entry segments as an extraction
would. Prints the time to load the index from the segments, to compact it (stat of every
feature file, one index.jsonl), to load the compacted index, and `usable_features` for all
keys without and with the source-image check.

Part 2: `pipeline.NpyReader` reading real float16 feature files in batches of 64 through
`image_dataset`: with the in-graph checks (size, header bytes, all finite), the same reader
with the problem codes ignored, and the reader as it was before (size assert only),
alternating, median of the repeats.

    .venv/bin/python benchmarks/bench_feature_index.py            # N = 123,287
    .venv/bin/python benchmarks/bench_feature_index.py --keys 20000 --files 256
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from caption_attn import feature_cache, feature_index  # noqa: E402
from caption_attn.backbone import FEATURE_SHAPE  # noqa: E402
from machine import describe  # noqa: E402

MANIFEST = {"format_version": feature_cache.FORMAT_VERSION, "backbone": "InceptionV3",
            "weights": "imagenet", "weights_sha256": "0" * 64, "dtype": "float16",
            "precision": "float32", "feature_scale": 1.0, "image_size": 299, "resize": "r",
            "preprocess": "p", "feature_shape": list(FEATURE_SHAPE), "feature_layout": "l"}


class Seconds(float):
    """Wall-clock seconds that also carry the process' CPU seconds (the machine may be
    shared: CPU time is what the code costs, wall time what a user waits)."""

    cpu = 0.0

    def __format__(self, spec):
        return f"{float(self):{spec}} s wall, {self.cpu:{spec}} s CPU"


def _timed(fn):
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    seconds = Seconds(time.perf_counter() - start)
    seconds.cpu = time.process_time() - cpu
    return out, seconds


def _sparse(path: str, size: int) -> os.stat_result:
    with open(path, "wb") as f:
        f.truncate(size)
        return os.fstat(f.fileno())


def build_cache(root: str, n: int) -> tuple[str, str, list[str]]:
    """(cache, images, keys): sparse files, indexed in segments of 1,024 entries."""
    cache, images = os.path.join(root, "cache"), os.path.join(root, "images")
    keys = [f"{'train' if i % 3 else 'val'}2014/COCO_{i:012d}.jpg" for i in range(n)]
    for folder in ("train2014", "val2014"):
        os.makedirs(os.path.join(cache, folder))
        os.makedirs(os.path.join(images, folder))
    fingerprint = feature_cache.cache_identity(MANIFEST)["fingerprint"]
    size = feature_cache.feature_file_size("float16")
    writer = feature_index.SegmentWriter(cache, flush_seconds=1e9, flush_entries=1024)
    for i, key in enumerate(keys):
        image = _sparse(os.path.join(images, key), 160_000 + i % 1000)
        stamp = feature_index.ImageStamp(image.st_size, image.st_mtime_ns, f"{i:064x}")
        st = _sparse(feature_cache.feature_path(cache, key), size)
        writer.add(feature_index.make_entry(key, fingerprint, st, stamp))
    writer.close()
    return cache, images, keys


def bench_index(n: int) -> None:
    root = tempfile.mkdtemp(prefix="bench_index_")
    try:
        (cache, images, keys), seconds = _timed(lambda: build_cache(root, n))
        print(f"built {n:,} sparse feature files + images and their index: {seconds:.1f}")
        index, seconds = _timed(lambda: feature_index.load_index(cache))
        segments = len(os.listdir(feature_index.segments_dir(cache)))
        print(f"load_index from {segments} segments ({len(index):,} entries): {seconds:.2f}")
        _, seconds = _timed(lambda: feature_index.compact(
            cache, lambda k: feature_cache.feature_path(cache, k)))
        mb = os.path.getsize(feature_index.index_path(cache)) / 1e6
        print(f"compact (stat every file, write index.jsonl of {mb:.0f} MB): {seconds:.2f}")
        times = [_timed(lambda: feature_index.load_index(cache))[1] for _ in range(3)]
        print(f"load_index compacted: {min(times):.2f} (best of 3)")
        (paths, problems), seconds = _timed(
            lambda: feature_cache.usable_features(cache, keys, MANIFEST))
        assert len(paths) == n and not problems
        print(f"usable_features, {n:,} keys, no source check: {seconds:.2f}")
        (paths, problems), seconds = _timed(
            lambda: feature_cache.usable_features(cache, keys, MANIFEST, images))
        assert len(paths) == n and not problems, list(problems.items())[:3]
        print(f"usable_features, {n:,} keys, with the source check: {seconds:.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_reader(files: int, repeats: int) -> None:
    from caption_attn.quiet import import_tensorflow
    tf = import_tensorflow()   # oneDNN chosen as the CLI does, its start-up notices dropped

    from caption_attn import pipeline

    class BeforeReader(pipeline.NpyReader):
        """The reader before the checks: only the size asserted (message without the path)."""

        def batch(self, paths):
            return tf.map_fn(self._one, paths, fn_output_signature=tf.TensorSpec(
                self.shape, self.dtype))

        def _one(self, path):
            raw = tf.io.read_file(path)
            tf.debugging.assert_equal(tf.strings.length(raw), self.header_bytes + self.num_bytes)
            body = tf.strings.substr(raw, self.header_bytes, self.num_bytes)
            return tf.reshape(tf.io.decode_raw(body, self.dtype, little_endian=True),
                              self.shape)

    class UncheckedReader(pipeline.NpyReader):
        """Today's reader with the problem codes ignored (no Assert, no finiteness test)."""

        def batch(self, paths):
            return tf.map_fn(self._read, paths, fn_output_signature=(
                tf.TensorSpec(self.shape, self.dtype), tf.TensorSpec([], tf.int32)))[0]

    root = tempfile.mkdtemp(prefix="bench_reader_")
    try:
        rng = np.random.default_rng(0)
        paths = []
        for i in range(files):
            paths.append(os.path.join(root, f"f{i}.npy"))
            np.save(paths[-1], rng.standard_normal(FEATURE_SHAPE).astype(np.float16))
        readers = {"checked": pipeline.NpyReader(128, "float16", FEATURE_SHAPE),
                   "unchecked": UncheckedReader(128, "float16", FEATURE_SHAPE),
                   "before": BeforeReader(128, "float16", FEATURE_SHAPE)}
        times = {name: [] for name in readers}
        cpu = {name: [] for name in readers}
        for _ in range(repeats + 1):                         # the first round warms up
            for name, reader in readers.items():
                ds = pipeline.image_dataset(paths, 64, reader)
                _, seconds = _timed(lambda: [None for _batch in ds])
                times[name].append(float(seconds))
                cpu[name].append(seconds.cpu)
        med = {name: statistics.median(t[1:]) for name, t in times.items()}
        med_cpu = {name: statistics.median(t[1:]) for name, t in cpu.items()}
        batches = files / 64
        for name in readers:
            print(f"NpyReader {name:9s}: {files / med[name]:6.0f} files/s, per batch of 64: "
                  f"{med[name] * 1e3 / batches:5.1f} ms wall, "
                  f"{med_cpu[name] * 1e3 / batches:5.1f} ms CPU")
        for ref in ("unchecked", "before"):
            print(f"checked vs {ref}: {100 * (med['checked'] / med[ref] - 1):+.1f}% wall, "
                  f"{100 * (med_cpu['checked'] / med_cpu[ref] - 1):+.1f}% CPU")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=123_287)
    parser.add_argument("--files", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print(describe())
    bench_index(args.keys)
    bench_reader(args.files, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
