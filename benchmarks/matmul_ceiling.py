"""The CPU's measured matmul ceiling, the yardstick the benchmarks compare model FLOP/s with.

A nominal peak (cores x clock x FLOPs/cycle) depends on a clock /proc/cpuinfo may not report
(here it shows 2.6 GHz, yet a float32 matmul runs faster than 2 cores x 2.6 GHz x 32 FLOPs
allow) and on how many FLOPs per cycle a data type really gets. A large square tf.matmul is what TensorFlow's own kernels
(oneDNN on CPU) reach on this machine in that dtype, measured in the same process.
"""

from __future__ import annotations

import time

from caption_attn.quiet import import_tensorflow

tf = import_tensorflow()   # oneDNN chosen as the CLI does (a no-op once TensorFlow is loaded)


def matmul_gflops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an (n, n) x (n, n) tf.matmul in `dtype` over `repeats` timings."""
    rng = tf.random.Generator.from_seed(0)
    a = tf.cast(rng.uniform((n, n)), dtype)
    b = tf.cast(rng.uniform((n, n)), dtype)
    product = tf.function(lambda: tf.matmul(a, b))
    product().numpy()                                               # trace, warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(3):
            product().numpy()
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * n ** 3 / best / 1e9
