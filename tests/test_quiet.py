"""The CLI prints no TensorFlow start-up noise on stderr; real warnings still show."""

import os
import subprocess
import sys

import pytest

from caption_attn.quiet import NOISE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_tensorflow_command_prints_only_its_own_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "CAPTION_ATTN"))}
    done = subprocess.run([sys.executable, "-m", "caption_attn", "evaluate", "--run",
                           str(tmp_path / "none")], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": ROOT}, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"caption-attn evaluate: error: --run {tmp_path / 'none'}: not a training run (no "
        f"such folder); train one with `caption-attn train --run {tmp_path / 'none'} ...`"]


def test_only_known_notices_are_dropped():
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796042317.277416   22035 port.cc:153] oneDNN custom operations are on. "
        "You may see slightly different numerical results",
        "I0000 00:00:1796042317.277832   22035 cudart_stub.cc:31] Could not find cuda drivers "
        "on your machine, GPU will not be used.",
        "E0000 00:00:1.0 1 cuda_executor.cc:1228] failed call to cuInit: INTERNAL: CUDA error",
        "I0000 00:00:1.0 1 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to "
        "use available CPU instructions in performance-critical operations.",
        "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
        "TensorFlow with the appropriate compiler flags.",
        "E0000 00:00:1796052927.627816   15194 util.cc:131] oneDNN supports DT_HALF only on "
        "platforms with AVX-512. Falling back to the default Eigen-based implementation if "
        "present.",
        "E0000 00:00:1796129823.509269    6244 util.cc:131] oneDNN supports DT_INT32 only on "
        "platforms with AVX-512. Falling back to the default Eigen-based implementation if "
        "present."]
    real = ["W0000 00:00:1.0 1 op_kernel.cc:1857] OP_REQUIRES failed at save_restore: DATA_LOSS",
            "E0000 00:00:1.0 1 meta_optimizer.cc:961] layout failed: INVALID_ARGUMENT",
            "Traceback (most recent call last):"]
    assert all(NOISE.search(line) for line in noise)
    assert not any(NOISE.search(line) for line in real)


@pytest.fixture(scope="module")
def library_import():
    """A process that imports TensorFlow as a library does (`import_tensorflow()`: no
    `freeze`), counting the garbage collector's passes from its start, then meets float16 and
    int32: stdout's lines, stderr. One process for the two tests that read it (each process
    imports TensorFlow: ~4 s of CPU)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "CAPTION_ATTN"))}
    code = ("import gc\n"
            "from caption_attn.quiet import import_tensorflow\n"
            "runs = []\n"
            "gc.callbacks.append(lambda phase, info: phase == 'start' and runs.append(1))\n"
            "tf = import_tensorflow()\n"
            "tf.zeros([3]) + 1\n"
            "print(len(runs), gc.isenabled(), gc.get_freeze_count() > 100_000)\n"
            "x = tf.constant([1.0, 2.0], tf.float16)\n"
            "i = tf.transpose(tf.constant([[1, 2]], tf.int32))\n"
            "print(float(tf.reduce_sum(tf.cast(x, tf.float32))) + float(tf.reduce_sum(i)))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": ROOT}, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines(), done.stderr


def test_float16_and_int32_after_the_quiet_import_print_nothing(library_import):
    """oneDNN's one-off notice of the first type it leaves to Eigen is met while stderr is
    captured: DT_HALF on AMD Zen (every float16 feature cache), DT_INT32 on Intel with AMX
    (the first training step's int32 transpose)."""
    lines, stderr = library_import
    assert lines[1:] == ["6.0"]                              # lines[0]: the collector's
    assert stderr == ""


def test_the_runtime_can_still_be_configured_when_the_types_are_met_later():
    """A multi-worker strategy configures TF's runtime before any tensor exists: the quiet
    import then leaves oneDNN's notice to `meet_dtypes`, called afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "CAPTION_ATTN"))}
    code = ("from caption_attn.quiet import import_tensorflow, meet_dtypes\n"
            "tf = import_tensorflow(meet_dtypes=False)\n"
            "tf.config.threading.set_inter_op_parallelism_threads(1)  # before any tensor\n"
            "meet_dtypes()\n"
            "tf.transpose(tf.constant([[1, 2]], tf.int32))\n"
            "print(float(tf.reduce_sum(tf.constant([1.0, 2.0], tf.float16))))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": ROOT}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3.0" and done.stderr == ""


def test_a_benchmark_prints_no_start_up_notices():
    """`make bench` runs the benchmark scripts: they import TensorFlow as the CLI does
    (bench_train also imports Keras, which would import TensorFlow loudly before it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "CAPTION_ATTN"))}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"),
                           "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "--reference-batches" in done.stdout
    assert done.stderr == ""


def test_the_program_imports_tensorflow_without_garbage_collections(library_import):
    """Importing TensorFlow (with Keras, and the matplotlib Keras imports) makes ~370,000
    objects that live as long as the process: the collector's passes over them found
    nothing to free and took 0.2 s of a one-image `caption` with the CLI's thresholds (0.7 s
    with Python's). For the program (`freeze`) none runs while it imports, what it made is
    frozen (no later pass scans it) and the collector is left on, or off, as it was; a
    library call (no `freeze`) leaves the collector alone."""
    code = ("import gc, sys\n"
            "from caption_attn.quiet import import_tensorflow\n"
            "runs = []\n"
            "gc.callbacks.append(lambda phase, info: phase == 'start' and runs.append(1))\n"
            "if sys.argv[1] == 'off':\n"
            "    gc.disable()\n"
            "import_tensorflow(freeze=sys.argv[1] != 'library')\n"
            "import tensorflow as tf\n"
            "tf.zeros([3]) + 1\n"
            "print(len(runs), gc.isenabled(), gc.get_freeze_count() > 100_000)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_CPP", "CAPTION_ATTN"))}
    for case, extra, want in [("on", {}, ["0", "True", "True"]),
                              ("on", {"CAPTION_ATTN_TF_LOGS": "1"}, ["0", "True", "True"]),
                              ("off", {}, ["0", "False", "True"])]:
        done = subprocess.run([sys.executable, "-c", code, case], capture_output=True,
                              text=True, env={**env, **extra, "PYTHONPATH": ROOT}, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == want, (case, extra)
    runs, enabled, frozen = library_import[0][0].split()        # a library's import
    assert int(runs) > 0 and enabled == "True" and frozen == "False"


def test_the_cli_asks_for_the_frozen_import(monkeypatch):
    """Every TensorFlow command of the program imports it with `freeze` (in a process where
    TensorFlow is imported already, such as this one, that changes nothing)."""
    from caption_attn import cli, quiet

    calls = []
    monkeypatch.setattr(quiet, "import_tensorflow", lambda **kwargs: calls.append(kwargs))
    assert cli.main(["evaluate", "--run", os.path.join(ROOT, "no such run")]) == 2
    assert calls == [{"meet_dtypes": True, "freeze": True}]


def test_an_nvidia_gpu_tensorflow_cannot_use_is_a_warning():
    """On a machine with an NVIDIA GPU (/dev/nvidiaN) where TensorFlow finds none (pip's
    TensorFlow without its CUDA libraries, a driver it cannot load), everything would run on
    the CPU, many times slower: the quiet import must not leave that unsaid."""
    from caption_attn.quiet import gpu_unused_warning

    one, two = ["/dev/nvidia0"], ["/dev/nvidia1", "/dev/nvidia0"]
    said = gpu_unused_warning(one, found=[], built_with_cuda=True, environ={})
    assert said.startswith("/dev/nvidia0 is an NVIDIA GPU, but TensorFlow can use none")
    assert "runs on the CPU" in said and "tensorflow[and-cuda]" in said
    assert "nvidia-smi" in said and "CUDA_VISIBLE_DEVICES=-1" in said
    assert gpu_unused_warning(two, found=[], built_with_cuda=True, environ={}).startswith(
        "/dev/nvidia0 and /dev/nvidia1 are NVIDIA GPUs, but TensorFlow can use none")
    assert gpu_unused_warning(["/dev/nvidia10", "/dev/nvidia2"], found=[],
                              built_with_cuda=True, environ={}).startswith(
        "/dev/nvidia2 and /dev/nvidia10 are")
    without = gpu_unused_warning(one, found=[], built_with_cuda=False, environ={})
    assert "this TensorFlow is built without CUDA" in without and "and-cuda" in without
    assert "CUDA_VISIBLE_DEVICES=-1" in without
    # nothing to say: no NVIDIA device, TensorFlow found a GPU, or the user hid them all
    assert gpu_unused_warning([], found=[], built_with_cuda=True, environ={}) is None
    assert gpu_unused_warning(one, found=["GPU:0"], built_with_cuda=True, environ={}) is None
    for hidden in ("-1", "", " "):
        assert gpu_unused_warning(one, found=[], built_with_cuda=True,
                                  environ={"CUDA_VISIBLE_DEVICES": hidden}) is None
    # a device list that hides none, or names one TensorFlow then cannot use: said, with it
    assert "TensorFlow can use none of CUDA_VISIBLE_DEVICES=5 (" in gpu_unused_warning(
        one, found=[], built_with_cuda=True, environ={"CUDA_VISIBLE_DEVICES": "5"})


def test_no_gpu_notices_are_kept_where_an_nvidia_gpu_is(capfd):
    """"Could not find cuda drivers" and "failed call to cuInit" are noise on a CPU-only
    machine, but TensorFlow's reason why a present GPU is left idle: kept there."""
    from caption_attn.quiet import NO_GPU, known_notices_dropped

    lines = ["I0000 00:00:1.0 1 cudart_stub.cc:31] Could not find cuda drivers on your "
             "machine, GPU will not be used.",
             "E0000 00:00:1.0 1 cuda_executor.cc:1228] failed call to cuInit: INTERNAL: CUDA "
             "error", "I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on."]
    assert [bool(NO_GPU.search(line)) for line in lines] == [True, True, False]
    for keep, want in ((None, ""), (NO_GPU, "\n".join(lines[:2]) + "\n")):
        with known_notices_dropped(keep=keep):
            os.write(2, ("\n".join(lines) + "\n").encode())
        assert capfd.readouterr().err == want


def test_the_quiet_import_warns_of_an_nvidia_gpu_tensorflow_cannot_use():
    """The import as the CLI and the benchmarks make it, on this CPU-only machine with a
    /dev/nvidia0 made up: TensorFlow's line that it found no CUDA driver is kept and one
    warning line follows; where CUDA_VISIBLE_DEVICES=-1 hides the GPUs by choice, nothing."""
    import tensorflow as tf

    from caption_attn.quiet import NO_GPU, nvidia_gpus
    if nvidia_gpus():
        pytest.skip("this machine has NVIDIA GPUs: the made-up one would be no test")

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TF_CPP", "CAPTION_ATTN", "CUDA_VISIBLE"))}
    code = ("from caption_attn import quiet\n"
            "quiet.nvidia_gpus = lambda: ['/dev/nvidia0']\n"
            "tf = quiet.import_tensorflow()\n"
            "print(len(tf.config.list_physical_devices('GPU')))\n")
    for extra, warned in (({}, True), ({"CUDA_VISIBLE_DEVICES": "-1"}, False)):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**env, **extra, "PYTHONPATH": ROOT}, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["0"]
        lines = done.stderr.splitlines()
        if warned:
            assert [line for line in lines if line.startswith("warning: ")] == [
                f"warning: {quiet_warning()}"] and lines[-1].startswith("warning: ")
            # TensorFlow says it found no CUDA driver where it is built with CUDA (pip's)
            assert any(NO_GPU.search(line) for line in lines) == tf.test.is_built_with_cuda(), \
                done.stderr
        else:
            assert done.stderr == ""


def quiet_warning() -> str:
    import tensorflow as tf

    from caption_attn.quiet import gpu_unused_warning
    return gpu_unused_warning(["/dev/nvidia0"], found=[],
                              built_with_cuda=tf.test.is_built_with_cuda(), environ={})
