"""TensorFlow without its start-up noise on stderr.

TensorFlow 2.21 logs through absl before absl's logging is initialised, so neither
`TF_CPP_MIN_LOG_LEVEL` nor absl flags silence what its libraries print while they load: on a
CPU-only machine, "All log messages before absl::InitializeLog() ...", "oneDNN custom
operations are on ...", "Could not find cuda drivers ...", CPU-feature and cuInit notices,
each twice, and on the first float16 tensor "oneDNN supports DT_HALF only on platforms with
AVX-512" (at ERROR level, although nothing is wrong: float16 ops then run on Eigen).
`import_tensorflow` imports it (lets it look for GPUs and meet a float16 tensor) with the
process's stderr (file descriptor 2) sent to a temporary file, then writes back every line
that is not one of those known notices: real warnings and errors are still shown. Set
`CAPTION_ATTN_TF_LOGS=1` to see everything.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|\] oneDNN custom operations are on"
    r"|\] Could not find cuda drivers on your machine"
    r"|\] failed call to cuInit"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
    r"|\] Unable to register cu(DNN|FFT|BLAS) factory"
    r"|\] TF-TRT Warning: Could not find TensorRT"
    r"|\] oneDNN supports DT_HALF only on platforms with AVX-512")


def import_tensorflow(meet_float16: bool = True):
    """`import tensorflow`, its start-up notices dropped (see the module docstring).

    `meet_float16`: also create a float16 tensor while stderr is captured, which initialises
    TensorFlow's runtime. A process that must configure the runtime first (a multi-worker
    strategy sets up collective ops) passes False and calls `meet_float16` afterwards."""
    if "tensorflow" in sys.modules or os.environ.get("CAPTION_ATTN_TF_LOGS") == "1":
        import tensorflow as tf
        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # what it does silence: INFO
    with _known_notices_dropped():
        import tensorflow as tf
        tf.config.list_physical_devices("GPU")  # the GPU probe logs too (cuInit)
        if meet_float16:
            tf.zeros([1], tf.float16)
    return tf


def meet_float16() -> None:
    """oneDNN logs at ERROR level, once per process, that it leaves float16 to Eigen when it
    first meets a float16 tensor (every float16 feature cache); meet one now, that line
    dropped. No-op with `CAPTION_ATTN_TF_LOGS=1`."""
    if os.environ.get("CAPTION_ATTN_TF_LOGS") == "1":
        return
    import tensorflow as tf
    with _known_notices_dropped():
        tf.zeros([1], tf.float16)


@contextlib.contextmanager
def _known_notices_dropped():
    """File descriptor 2 sent to a temporary file inside; afterwards every line of it that
    is not a `NOISE` notice is written to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not NOISE.search(line)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
