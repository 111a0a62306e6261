"""The fused additive-attention kernel (`kernels/additive_attention.cc`): a TensorFlow custom
op for the CPU that computes the attention scores of a training step's time loop in one pass
over the keys, and their gradient in another (`recurrence.teacher_forced_recurrence`).

`make` builds it (`python -m caption_attn.fused`, where `--check` does not find it usable)
beside its source, with the compiler flags of the TensorFlow installed (`tf.sysconfig`), one
library per instruction set (`variants`: on x86-64 one for AVX-512 and one for AVX2, whose
tanh takes more instructions); `BUILT_FOR` records which TensorFlow, source and flags they
were built from. Each process loads the one its CPU runs (`variant`). Where none is built,
or they were built for another TensorFlow, source or flags, training runs the same
computation in TensorFlow's ops, with a note (`unavailable_note`). It is only used in
float32, on CPUs, outside XLA: bfloat16, GPUs and the step `--xla` compiles keep TensorFlow's
ops (the validation and self-critical steps, which `--xla` leaves uncompiled, use it).
Decoding and the exported SavedModel/TFLite never use it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

if __name__ == "__main__":   # the program: without TensorFlow's start-up notices, as the CLI
    from caption_attn.quiet import import_tensorflow
    import_tensorflow()

import tensorflow as tf  # noqa: E402

from caption_attn.fileio import file_digest, write_json_atomic  # noqa: E402
from caption_attn.quiet import cpu_flags  # noqa: E402

KERNELS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
SOURCE = os.path.join(KERNELS, "additive_attention.cc")
# {"tensorflow": version, "framework_bytes": size, "source_sha256": digest,
#  "variants": {name: instruction-set flags}}
BUILT_FOR = os.path.join(KERNELS, "_additive_attention.json")
BUILD_COMMAND = f"{sys.executable} -m caption_attn.fused"

# name -> (compiler flags, /proc/cpuinfo flags the CPU needs), best first. x86-64: every CPU
# kind of this project has AVX2 and FMA; the AVX-512 build computes tanh, the kernel's main
# cost, in half the instructions where the CPU has it (and oneDNN is not capped below it).
X86_VARIANTS = {
    "avx512": (["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
               {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma"}),
    "avx2": (["-mavx2", "-mfma"], {"avx2", "fma"}),
}
OTHER_VARIANTS = {"generic": ([], set())}

# False turns the kernel off for this process (benchmarks compare both paths)
ENABLED = True


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def variants() -> dict:
    return X86_VARIANTS if _x86() else OTHER_VARIANTS


def library_path(name: str) -> str:
    return os.path.join(KERNELS, f"_additive_attention_{name}.so")


def variant(environ=os.environ) -> Optional[str]:
    """The build this CPU runs, or None: the first of `variants` whose instructions
    /proc/cpuinfo lists; not AVX-512 where oneDNN is capped below it (`ONEDNN_MAX_CPU_ISA`,
    to stand in for an AVX2-only CPU)."""
    flags = cpu_flags()
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    for name, (_, needs) in variants().items():
        if name == "avx512" and cap not in ("", "ALL") and not cap.startswith("AVX512") and \
                not cap.startswith("AVX10"):
            continue
        if needs <= flags:
            return name
    return None


def framework_bytes() -> Optional[int]:
    """The size of TensorFlow's libtensorflow_framework, which the kernel links to: another
    build of the same version (tensorflow-cpu, a nightly rebuilt) has another."""
    for name in sorted(os.listdir(tf.sysconfig.get_lib())):
        if name.startswith("libtensorflow_framework.so"):
            return os.path.getsize(os.path.join(tf.sysconfig.get_lib(), name))
    return None


def source_digest() -> str:
    return file_digest(SOURCE)


def build(compiler: Optional[str] = None, log=print) -> None:
    """Compiles every variant of the kernel for the TensorFlow of this Python into temporary
    files; only once all have compiled, replaces the libraries and records them in
    `BUILT_FOR` (removed first, written last). Raises RuntimeError naming what failed, with
    the libraries and record found left as they were (an OSError while replacing them
    leaves no record: nothing is loaded until a build completes)."""
    compiler = compiler or os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH: install g++ (or set CXX) "
                           "to build the fused attention kernel")
    log(f"building the fused attention kernel for TensorFlow {tf.__version__} "
        f"({', '.join(variants())}) in {os.path.relpath(KERNELS)}")
    digest = source_digest()
    built = {}
    try:
        for name, (flags, _) in variants().items():
            fd, built[name] = tempfile.mkstemp(prefix="_additive_attention_", suffix=".so.tmp",
                                               dir=KERNELS)
            os.close(fd)
            command = [compiler, "-shared", "-fPIC", "-O3", "-DNDEBUG", "-w", *flags, SOURCE, "-o",
                       built[name], *tf.sysconfig.get_compile_flags(),
                       *tf.sysconfig.get_link_flags()]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE} failed (exit {done.returncode}): "
                                   f"{shlex.join(command)}\n{done.stderr[-4000:]}")
        if source_digest() != digest:
            raise RuntimeError(f"{SOURCE} changed while it was compiled: build it again")
        with contextlib.suppress(FileNotFoundError):     # a build beside this one
            os.unlink(BUILT_FOR)
        for name, tmp in built.items():
            os.chmod(tmp, 0o755)                          # mkstemp's are the owner's only
            os.replace(tmp, library_path(name))
        write_json_atomic(BUILT_FOR, {
            "tensorflow": tf.__version__, "framework_bytes": framework_bytes(),
            "source_sha256": digest,
            "variants": {name: flags for name, (flags, _) in variants().items()}})
    finally:
        for tmp in built.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
    if library.cache_info().currsize and library() is not None:
        # TensorFlow and dlopen keep a loaded library by its path: this process runs the old
        log("note: this process keeps the kernel it had loaded; the new build is used from "
            "the next one")
    else:
        library.cache_clear()


def problem() -> Optional[str]:
    """Why the kernel's library for this CPU (`variant`) cannot be loaded here, or None."""
    name = variant()
    if name is None:
        if not cpu_flags():
            return "/proc/cpuinfo cannot be read to tell which build this CPU runs"
        return "this CPU lacks AVX2 or FMA, which the kernel is built for"
    if not os.path.exists(BUILT_FOR) or not os.path.exists(library_path(name)):
        return "it is not built"
    try:
        with open(BUILT_FOR) as f:
            built = json.load(f)
        tf_version, digest = built["tensorflow"], built["source_sha256"]
        framework = built["framework_bytes"]
        if name not in built["variants"]:
            return f"its {name} build is missing from {BUILT_FOR}"
        if built["variants"][name] != variants()[name][0]:
            return f"its {name} build was compiled with other flags than fused.py's"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{BUILT_FOR} is unreadable ({e!r})"
    if tf_version != tf.__version__:
        return f"it was built for TensorFlow {tf_version}, this is {tf.__version__}"
    try:
        here, source = framework_bytes(), source_digest()
    except OSError as e:
        return f"what it was built from cannot be compared ({e!r})"
    if framework != here:
        return (f"it was built for another build of TensorFlow {tf_version} (its framework "
                f"library of {framework} bytes, this one's {here})")
    if digest != source:
        return f"it was built from another version of {os.path.basename(SOURCE)}"
    return None


@functools.lru_cache(maxsize=None)
def library():
    """The loaded kernel's module (`additive_attention_scores`,
    `additive_attention_scores_grad`), or None where `problem` or loading says no."""
    if problem() is not None:
        return None
    path = library_path(variant())
    try:
        return tf.load_op_library(path)
    except (tf.errors.OpError, OSError, RuntimeError) as e:
        _load_errors[path] = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        return None


_load_errors: dict = {}   # library path -> why TensorFlow did not load it


def unavailable_note() -> Optional[str]:
    """What a float32 training run on the CPU is told where the kernel is not used."""
    if library() is not None:
        return None
    why = problem()
    if why is None:
        path = library_path(variant())
        why = f"{path} does not load into this TensorFlow: {_load_errors.get(path, '?')}"
    return (f"the fused attention kernel is not used ({why}): training runs the same "
            f"computation in TensorFlow's ops, slower; `{BUILD_COMMAND}` builds it (make test "
            "and make demo do)")


def usable(dtype) -> bool:
    """Whether the recurrence being traced now, whose keys have `dtype`, runs the kernel:
    float32 on a machine without GPUs, outside XLA (which cannot compile a custom op)."""
    if not ENABLED or tf.as_dtype(dtype) != tf.float32 or library() is None:
        return False
    if tf.config.list_logical_devices("GPU"):
        return False
    try:   # TensorFlow's own test of an XLA context, not a public API: where it moved, the
        # kernel is left out (TensorFlow's ops, slower) rather than handed to XLA
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
        return not control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())
    except (ImportError, AttributeError):
        return False


def main(argv=None) -> int:
    """`python -m caption_attn.fused [--check]`: build the kernel (or, with --check, only say
    whether it is usable here)."""
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--check"]):
        print(f"usage: {BUILD_COMMAND} [--check]", file=sys.stderr)
        return 2
    if not args:
        try:
            build()
        except (RuntimeError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    note = unavailable_note()
    print(note or f"the fused attention kernel is usable: {library_path(variant())}")
    return 1 if note else 0


if __name__ == "__main__":
    sys.exit(main())
