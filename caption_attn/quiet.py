"""TensorFlow without its start-up noise on stderr.

TensorFlow 2.21 logs through absl before absl's logging is initialised, so neither
`TF_CPP_MIN_LOG_LEVEL` nor absl flags silence what its libraries print while they load: on a
CPU-only machine, "All log messages before absl::InitializeLog() ...", "oneDNN custom
operations are on ...", "Could not find cuda drivers ...", CPU-feature and cuInit notices,
each twice, and, once per process, "oneDNN supports DT_... only on platforms with AVX-512"
(at ERROR level, although nothing is wrong: that op then runs on Eigen). That last one comes
with the first tensor type oneDNN leaves to Eigen: DT_HALF at the first float16 tensor on a CPU
without AVX512-FP16 (AMD Zen), DT_INT32 at the first int32 transpose (the first training step)
on an Intel CPU with AMX, where float16 is oneDNN's. `import_tensorflow` imports it (lets it
look for GPUs and meet both types) with the process's stderr (file descriptor 2) sent to a
temporary file, then writes back every line that is not one of those known notices: real
warnings and errors are still shown. On a machine with an NVIDIA GPU that TensorFlow cannot
use, its CUDA and cuInit lines are not noise: they are kept, and a warning follows
(`gpu_unused_warning`). Set `CAPTION_ATTN_TF_LOGS=1` to see everything.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import os
import re
import shlex
import sys
import tempfile
from typing import Optional

NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|\] oneDNN custom operations are on"
    r"|\] Could not find cuda drivers on your machine"
    r"|\] failed call to cuInit"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
    r"|\] Unable to register cu(DNN|FFT|BLAS) factory"
    r"|\] TF-TRT Warning: Could not find TensorRT"
    r"|\] oneDNN supports DT_\w+ only on platforms with AVX-512"
    r"|^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.$")

# Those of `NOISE` that say TensorFlow found no GPU it can use: noise on a machine without an
# NVIDIA GPU; on a machine with one (`nvidia_gpus`), TensorFlow's reason why it is left idle,
# kept (`import_tensorflow`), with `gpu_unused_warning` saying what that means.
NO_GPU = re.compile(r"\] Could not find cuda drivers on your machine|\] failed call to cuInit")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set:
    """The words of /proc/cpuinfo (its feature flags, "AuthenticAMD"/"GenuineIntel", ...);
    empty where it cannot be read."""
    try:
        with open(cpuinfo) as f:
            return set(f.read().split())
    except OSError:
        return set()


# TensorFlow turns oneDNN on by itself (Linux) only on CPUs with one of these (its
# `DefaultOneDnnPolicy`); /proc/cpuinfo's names
ONEDNN_BY_DEFAULT = {"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8",
                     "amx_bf16"}


def onednn_on_avx2_cpus(cpuinfo: str = "/proc/cpuinfo", environ=os.environ,
                        gpus: Optional[list] = None) -> None:
    """Turn TensorFlow's oneDNN kernels on (`TF_ENABLE_ONEDNN_OPTS=1`) on AVX2-only x86 CPUs
    (AVX2 and FMA, no AVX-512: AMD Zen 3 and older, Intel's client cores before AVX-VNNI),
    where TensorFlow leaves them off: it turns them on by itself only with one of
    `ONEDNN_BY_DEFAULT`. Every op there ran on Eigen, which took 1.2x the time of oneDNN's
    AVX2 kernels for the InceptionV3 backbone and 1.17x for a training step under the AVX2
    caps that imitate Zen 3 (they kept oneDNN on, as CPUs with AVX512-BF16 or AMX have it),
    and 1.19x for the step on a real Zen 3 (the README's Speed).

    Nothing changes where the user chose (`TF_ENABLE_ONEDNN_OPTS` set, whatever its value),
    on CPUs with AVX-512 but none of `ONEDNN_BY_DEFAULT` (Skylake-SP: not measured), without
    AVX2 and FMA (nor on other architectures), or where an NVIDIA GPU is present (`gpus`: its
    /dev/nvidiaN devices; the heavy ops run there, and oneDNN beside one was not measured).
    bfloat16 ops keep Eigen's kernels on these CPUs (TensorFlow gives them to oneDNN only
    with AVX512F or AVX-NE-CONVERT). TensorFlow reads the variable once, as it loads: call
    this before (`import_tensorflow` does)."""
    if "TF_ENABLE_ONEDNN_OPTS" in environ:
        return
    flags = cpu_flags(cpuinfo)
    if not {"avx2", "fma"} <= flags or "avx512f" in flags or flags & ONEDNN_BY_DEFAULT:
        return
    if nvidia_gpus() if gpus is None else gpus:
        return
    environ["TF_ENABLE_ONEDNN_OPTS"] = "1"


def nvidia_gpus() -> list:
    """The NVIDIA GPU devices of this machine (/dev/nvidiaN), without importing TensorFlow."""
    return glob.glob("/dev/nvidia[0-9]*")


def gpus_expected(devices: list, environ=os.environ) -> bool:
    """Whether TensorFlow should find a GPU here: this machine has NVIDIA GPUs (`devices`, its
    /dev/nvidiaN) and `CUDA_VISIBLE_DEVICES` does not hide them all (-1 or empty: the CPU by
    choice)."""
    return bool(devices) and \
        environ.get("CUDA_VISIBLE_DEVICES", "0").strip() not in ("", "-1")


def gpu_unused_warning(devices: list, found: list, built_with_cuda: bool,
                       environ=os.environ) -> Optional[str]:
    """What a user must hear where this machine has NVIDIA GPUs (`devices`, its /dev/nvidiaN)
    but TensorFlow found none it can use (`found`, its physical GPUs): everything then runs
    on the CPU, many times slower, and the notices that say so are dropped as noise on
    CPU-only machines. None where there is no such device, a GPU was found, or
    `CUDA_VISIBLE_DEVICES` hides them all (`gpus_expected`)."""
    if found or not gpus_expected(devices, environ):
        return None
    names = sorted(devices, key=lambda name: (len(name), name))   # nvidia2 before nvidia10
    what = (f"{names[0]} is an NVIDIA GPU" if len(names) == 1 else
            f"{', '.join(names[:-1])} and {names[-1]} are NVIDIA GPUs")
    # into the environment this process runs in (make's: .venv)
    pip = f"`{shlex.quote(sys.executable)} -m pip install 'tensorflow[and-cuda]'`"
    chosen = environ.get("CUDA_VISIBLE_DEVICES")
    by_choice = "CUDA_VISIBLE_DEVICES=-1 runs on the CPU without this warning"
    if not built_with_cuda:
        return (f"{what}, but this TensorFlow is built without CUDA: everything runs on the "
                f"CPU, many times slower. For a CUDA build with its libraries (a "
                f"tensorflow-cpu uninstalled first): {pip}; {by_choice}")
    return (f"{what}, but TensorFlow can use none"
            + (f" of CUDA_VISIBLE_DEVICES={chosen}" if chosen is not None else "")
            + " (a driver or CUDA library it cannot load: TensorFlow's lines above, or all of "
              "them with CAPTION_ATTN_TF_LOGS=1, say which): everything runs on the CPU, many "
              f"times slower. Check the driver with nvidia-smi, and install TensorFlow's CUDA "
              f"libraries: {pip}; {by_choice}")


def onednn_on(cpuinfo: str = "/proc/cpuinfo", environ=os.environ) -> bool:
    """Whether TensorFlow runs its oneDNN kernels: as `TF_ENABLE_ONEDNN_OPTS` says (1 or
    true, 0 or false, in any case), else, as TensorFlow does for an unset or other value, on
    CPUs with one of `ONEDNN_BY_DEFAULT`."""
    chosen = environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower()
    if chosen in ("0", "false", "1", "true"):
        return chosen in ("1", "true")
    return bool(cpu_flags(cpuinfo) & ONEDNN_BY_DEFAULT)


def import_tensorflow(meet_dtypes: bool = True, freeze: bool = False):
    """`import tensorflow`, its start-up notices dropped (see the module docstring).

    `meet_dtypes`: also meet oneDNN's Eigen fallback while stderr is captured (`_meet`), which
    initialises TensorFlow's runtime. A process that must configure the runtime first (a
    multi-worker strategy sets up collective ops) passes False and calls `meet_dtypes`
    afterwards. oneDNN is turned on first where TensorFlow would leave an AVX2-only CPU
    without it (`onednn_on_avx2_cpus`). Where this machine has an NVIDIA GPU that TensorFlow
    cannot use, its notices saying so are kept and a warning follows (`gpu_unused_warning`).
    `freeze` (the `caption-attn` program, whose process it is): no garbage collection while
    TensorFlow imports, and what the process holds then frozen (`frozen_after`). Nothing of
    either when TensorFlow is imported already."""
    if "tensorflow" in sys.modules:
        import tensorflow as tf
        return tf
    devices = nvidia_gpus()
    with frozen_after() if freeze else contextlib.nullcontext():
        onednn_on_avx2_cpus()   # read as TensorFlow loads
        if os.environ.get("CAPTION_ATTN_TF_LOGS") == "1":
            import tensorflow as tf
            found = tf.config.list_physical_devices("GPU") if devices else []
        else:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # what it does silence: INFO
            with known_notices_dropped(keep=NO_GPU if gpus_expected(devices) else None):
                import tensorflow as tf
                found = tf.config.list_physical_devices("GPU")  # the probe logs (cuInit)
                if meet_dtypes:
                    _meet(tf)
    warning = devices and gpu_unused_warning(devices, found, tf.test.is_built_with_cuda())
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return tf


@contextlib.contextmanager
def frozen_after():
    """The garbage collector off inside; then every object it tracks frozen (`gc.freeze`:
    no later collection scans them) and the collector on again if it was. For TensorFlow's
    import: the ~370,000 objects it makes (with Keras and the matplotlib Keras imports) live
    as long as the process, and no cycle among them is garbage (a full collection right
    after frees nothing), but the collector scanned them while they were made and again in
    its next passes: 0.2 s of a one-image `caption` with the CLI's thresholds
    (`cli.entry`), 0.7 s with Python's. What the process held before is frozen too: for a
    program, not for a library call in someone else's process."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
        gc.freeze()
    finally:
        if enabled:
            gc.enable()


def meet_dtypes() -> None:
    """oneDNN logs at ERROR level, once per process, the first tensor type it leaves to Eigen
    (the module docstring); meet it now, that line dropped. No-op with
    `CAPTION_ATTN_TF_LOGS=1`."""
    if os.environ.get("CAPTION_ATTN_TF_LOGS") == "1":
        return
    import tensorflow as tf
    with known_notices_dropped():
        _meet(tf)


def _meet(tf) -> None:
    """The ops that bring oneDNN's one-off fallback notice: a float16 tensor where oneDNN has
    no float16 (every float16 feature cache meets one), an int32 transpose where it has
    (a training step's first). About 1 ms."""
    tf.zeros([1], tf.float16)
    tf.transpose(tf.zeros([1, 1], tf.int32))


@contextlib.contextmanager
def known_notices_dropped(keep: Optional[re.Pattern] = None):
    """File descriptor 2 sent to a temporary file inside; afterwards every line of it that
    is not a `NOISE` notice, or is one that `keep` matches, is written to stderr."""
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
                    if line.strip() and (not NOISE.search(line)
                                         or keep is not None and keep.search(line))]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
