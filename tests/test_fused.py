"""The fused additive-attention kernel (caption_attn/fused.py, kernels/additive_attention.cc):
built by make, equal to TensorFlow's ops and their autodiff, used only where it can run, and
never used stale."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from caption_attn import fused, train
from caption_attn.quiet import cpu_flags
from caption_attn.recurrence import StepWeights, teacher_forced_recurrence

from test_train import NO_DECODING, small_config


# on a machine with a GPU the kernel is never chosen automatically (`fused.usable`)
GPU = bool(tf.config.list_logical_devices("GPU"))


def kernel():
    lib = fused.library()
    # make test / make demo build it first (Makefile: kernel); pytest alone does not
    assert lib is not None, fused.unavailable_note()
    return lib


def test_the_kernel_is_built_for_this_tensorflow_and_loads():
    assert fused.problem() is None, fused.unavailable_note()
    assert fused.unavailable_note() is None
    assert hasattr(kernel(), "additive_attention_scores")


def _inputs(b, p, u, seed=0):
    rng = np.random.default_rng(seed)
    keys = tf.constant(rng.normal(size=(b, p, u)).astype(np.float32))
    query = tf.constant(rng.normal(size=(b, u)).astype(np.float32))
    score = tf.constant(rng.normal(size=(u,)).astype(np.float32))
    return keys, query, score


def _reference_scores(keys, query, score):
    return tf.einsum("bpu,u->bp", tf.tanh(keys + query[:, None, :]), score)


# U = 37 and 5 are not multiples of a vector width: the rows' tails count too
SHAPES = [(3, 5, 37), (2, 64, 512), (1, 1, 5)]


@pytest.mark.parametrize("b,p,u", SHAPES)
def test_scores_and_their_gradient_equal_tensorflows_ops_and_autodiff(b, p, u):
    check_equals_tensorflow(kernel(), b, p, u)


def check_equals_tensorflow(lib, b, p, u):
    """The kernel library `lib`'s scores and gradients against TensorFlow's ops and their
    autodiff, on (b, p, u) inputs."""
    keys, query, score = _inputs(b, p, u)
    scores, e = lib.additive_attention_scores(keys, query, score)
    reference = _reference_scores(keys, query, score).numpy()
    # sums of U terms, added in another order on every CPU's vector width: near-zero scores
    # are within the rounding of the largest terms, not of themselves
    np.testing.assert_allclose(scores, reference, rtol=1e-5,
                               atol=1e-6 * np.abs(reference).max() * np.sqrt(u))
    np.testing.assert_allclose(e, tf.tanh(keys + query[:, None, :]), rtol=1e-5, atol=1e-6)
    rng = np.random.default_rng(1)
    d_scores = tf.constant(rng.normal(size=(b, p)).astype(np.float32))
    d_keys_in = tf.constant(rng.normal(size=(b, p, u)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch([keys, query, score])
        loss = tf.reduce_sum(_reference_scores(keys, query, score) * d_scores)
    expected = tape.gradient(loss, [keys, query, score])
    d_keys, d_query, d_score = lib.additive_attention_scores_grad(
        e, score, d_scores, d_keys_in)
    np.testing.assert_allclose(d_keys, d_keys_in + expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_query, expected[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_score, expected[2], rtol=1e-4, atol=1e-4)


def test_every_build_this_cpu_can_run_equals_tensorflows_ops():
    """The AVX2 build is the one an AVX2-only CPU (Zen 3) runs; on an AVX-512 machine the
    test above runs only the AVX-512 build. Every other build this CPU can run is compared
    too, each in a process of its own: a second library registering the same ops makes
    every later use of them in one process fail."""
    if fused.variant() is None:
        pytest.skip(f"no build of the kernel runs here: {fused.problem()}")
    others = [name for name, (_, needs) in fused.variants().items()
              if needs <= cpu_flags() and name != fused.variant()]
    if not others:
        pytest.skip(f"this CPU runs only the {fused.variant()} build, tested above")
    code = ("import sys, tensorflow as tf, test_fused\n"
            "lib = tf.load_op_library(sys.argv[1])\n"
            "for shape in test_fused.SHAPES:\n"
            "    test_fused.check_equals_tensorflow(lib, *shape)\n"
            "print('equal')\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    for name in others:
        done = subprocess.run(
            [sys.executable, "-c", code, fused.library_path(name)], capture_output=True,
            text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3",
                                         "PYTHONPATH": os.pathsep.join(
                                             [tests, os.path.dirname(tests)])})
        assert done.returncode == 0 and done.stdout.split() == ["equal"], (
            name, done.stderr[-3000:])


def test_inputs_of_the_wrong_shape_are_refused_not_read_out_of_bounds():
    keys, query, score = _inputs(2, 3, 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="query must be"):
        kernel().additive_attention_scores(keys, query[:, :3], score)
    with pytest.raises(tf.errors.InvalidArgumentError, match="score must be"):
        kernel().additive_attention_scores(keys, query, tf.zeros([5]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="keys must be"):
        kernel().additive_attention_scores(keys[0], query, score)
    with pytest.raises(tf.errors.InvalidArgumentError, match="d_keys_in must be"):
        kernel().additive_attention_scores_grad(keys, score, tf.zeros([2, 3]),
                                                tf.zeros([2, 3, 5]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="d_scores must be"):
        kernel().additive_attention_scores_grad(keys, score, tf.zeros([3, 2]),
                                                tf.zeros([2, 3, 4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="e must be"):
        kernel().additive_attention_scores_grad(keys[0], score, tf.zeros([3, 2]), keys[0])
    with pytest.raises(tf.errors.InvalidArgumentError, match="score must be"):
        kernel().additive_attention_scores_grad(keys, score[:3], tf.zeros([2, 3]), keys)


def _recurrence_case(seed=4):
    rng = np.random.default_rng(seed)
    b, p, u, e, T = 3, 6, 12, 5, 7

    def r(*shape):
        return tf.constant(rng.standard_normal(shape).astype(np.float32) * 0.5)
    w = StepWeights(r(u, u), r(u, 1), r(u, e), r(e), r(e, 3 * u), r(u, 3 * u), r(3 * u))
    return w, [r(T, b, 3 * u), r(b, u), r(b, p, u), r(b, p, e)], r(T, b, p)


def _values_and_grads(use_kernel, jit=False):
    w, inputs, weight = _recurrence_case()

    @tf.function(jit_compile=jit or None)
    def run(x_gates, h0, keys, encoded):
        with tf.GradientTape() as tape:
            tape.watch([x_gates, h0, keys, encoded, *w])
            hs, contexts, alphas = teacher_forced_recurrence(w, x_gates, h0, keys, encoded,
                                                             use_kernel)
            loss = (tf.reduce_sum(tf.sin(hs)) + tf.reduce_sum(contexts ** 2)
                    + tf.reduce_sum(alphas * weight))
        return [hs, contexts, alphas], tape.gradient(loss, [x_gates, h0, keys, encoded, *w])
    values, grads = run(*inputs)
    ops = {n.op for f in run.get_concrete_function(*inputs).graph.as_graph_def().library.function
           for n in f.node_def}
    return [v.numpy() for v in values], [g.numpy() for g in grads], ops


def test_the_recurrence_with_the_kernel_equals_it_with_tensorflows_ops():
    values, grads, ops = _values_and_grads(True)
    values_tf, grads_tf, ops_tf = _values_and_grads(False)
    assert {"AdditiveAttentionScores", "AdditiveAttentionScoresGrad"} <= ops
    assert not {"AdditiveAttentionScores", "AdditiveAttentionScoresGrad"} & ops_tf
    for a, b in zip(values, values_tf):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for i, (a, b) in enumerate(zip(grads, grads_tf)):
        assert np.abs(b).max() > 1e-3, i                              # every input is reached
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=i)


def test_chosen_automatically_in_float32_on_the_cpu_and_never_under_xla():
    _, grads, ops = _values_and_grads(None)
    assert ("AdditiveAttentionScoresGrad" in ops) != GPU
    # XLA cannot compile a custom op: under jit_compile the recurrence keeps TensorFlow's
    _, grads_xla, ops_xla = _values_and_grads(None, jit=True)
    assert "AdditiveAttentionScores" not in ops_xla
    for a, b in zip(grads, grads_xla):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    assert not fused.usable(tf.bfloat16) and fused.usable(tf.float32) != GPU


def test_off_with_enabled_false_and_an_error_where_asked_for_and_missing(monkeypatch):
    monkeypatch.setattr(fused, "ENABLED", False)
    assert not fused.usable(tf.float32)
    assert "AdditiveAttentionScores" not in _values_and_grads(None)[2]
    monkeypatch.setattr(fused, "library", lambda: None)
    with pytest.raises(RuntimeError, match="fused attention kernel is not used"):
        _values_and_grads(True)


@pytest.fixture
def kernels_copy(tmp_path, monkeypatch):
    """fused's paths pointed at a copy of the kernels folder, its load cache cleared."""
    folder = tmp_path / "kernels"
    real = fused.KERNELS
    before = {entry.name: entry.stat().st_mtime_ns for entry in os.scandir(real)}
    shutil.copytree(real, folder)
    for name, path in (("KERNELS", folder), ("SOURCE", folder / "additive_attention.cc"),
                       ("BUILT_FOR", folder / "_additive_attention.json")):
        monkeypatch.setattr(fused, name, str(path))
    fused.library.cache_clear()
    yield folder
    fused.library.cache_clear()
    # the build the other tests and the suite's training use is left as it was
    assert {entry.name: entry.stat().st_mtime_ns for entry in os.scandir(real)} == before


def test_a_stale_or_missing_build_is_never_loaded_and_the_note_says_why(kernels_copy,
                                                                       monkeypatch):
    # Only refusals here: loading the copy's library would register the ops a second time in
    # this process, and every later use of them would fail.
    record = kernels_copy / "_additive_attention.json"
    built = json.loads(record.read_text())
    assert built == {"tensorflow": tf.__version__, "source_sha256": fused.source_digest(),
                     "framework_bytes": fused.framework_bytes(),
                     "variants": {name: flags for name, (flags, _) in fused.variants().items()}}
    assert built["framework_bytes"] > 0
    record.write_text(json.dumps(dict(built, tensorflow="2.0.0")))
    assert fused.library() is None
    note = fused.unavailable_note()
    assert f"built for TensorFlow 2.0.0, this is {tf.__version__}" in note
    assert "-m caption_attn.fused` builds it" in note
    # the same version number, another build of it (tensorflow-cpu, a nightly rebuilt)
    record.write_text(json.dumps(dict(built, framework_bytes=123)))
    fused.library.cache_clear()
    assert (f"built for another build of TensorFlow {tf.__version__} (its framework library "
            f"of 123 bytes, this one's {built['framework_bytes']})") in fused.unavailable_note()
    name = fused.variant()
    record.write_text(json.dumps(dict(built, variants={**built["variants"], name: ["-O1"]})))
    fused.library.cache_clear()
    assert f"its {name} build was compiled with other flags" in fused.unavailable_note()
    record.write_text(json.dumps(built))
    with open(kernels_copy / "additive_attention.cc", "a") as f:
        f.write("// changed\n")
    fused.library.cache_clear()
    assert "another version of additive_attention.cc" in fused.unavailable_note()
    record.write_text("{")
    fused.library.cache_clear()
    assert "_additive_attention.json is unreadable" in fused.unavailable_note()
    record.write_text("[1, 2]")
    fused.library.cache_clear()
    assert "_additive_attention.json is unreadable" in fused.unavailable_note()
    record.write_text(json.dumps(dict(built, variants={})))
    fused.library.cache_clear()
    assert f"its {name} build is missing from" in fused.unavailable_note()
    record.write_text(json.dumps(built))

    def unreadable():
        raise PermissionError(13, "Permission denied", tf.sysconfig.get_lib())
    with monkeypatch.context() as patched:   # not monkeypatch.undo(): kernels_copy's paths stay
        patched.setattr(fused, "framework_bytes", unreadable)
        fused.library.cache_clear()
        assert "what it was built from cannot be compared (PermissionError" in \
            fused.unavailable_note()
    os.unlink(fused.library_path(fused.variant()))
    fused.library.cache_clear()
    assert "(it is not built)" in fused.unavailable_note()


X86_AVX512 = {"avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl"}


@pytest.mark.parametrize("flags,environ,expected", [
    (X86_AVX512, {}, "avx512"),
    (X86_AVX512 - {"avx512bw"}, {}, "avx2"),
    # oneDNN capped at AVX2 stands in for an AVX2-only CPU: the kernel follows
    (X86_AVX512, {"ONEDNN_MAX_CPU_ISA": "avx2"}, "avx2"),
    (X86_AVX512, {"DNNL_MAX_CPU_ISA": "AVX2_VNNI"}, "avx2"),
    (X86_AVX512, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "avx512"),
    (X86_AVX512, {"ONEDNN_MAX_CPU_ISA": "ALL"}, "avx512"),          # oneDNN's "no cap"
    ({"avx2", "fma"}, {}, "avx2"),
    ({"avx", "sse4_2"}, {}, None),
])
def test_each_cpu_loads_the_build_it_runs(monkeypatch, flags, environ, expected):
    monkeypatch.setattr(fused, "_x86", lambda: True)
    monkeypatch.setattr(fused, "cpu_flags", lambda: set(flags))
    assert fused.variant(environ) == expected
    if expected is None:
        monkeypatch.setattr(fused, "variant", lambda: None)
        assert "lacks AVX2 or FMA" in fused.problem()
        monkeypatch.setattr(fused, "cpu_flags", lambda: set())      # /proc/cpuinfo unread
        assert "/proc/cpuinfo cannot be read" in fused.problem()


@pytest.mark.slow
def test_build_compiles_every_variant_for_this_tensorflow_and_records_them(kernels_copy):
    for name in os.listdir(kernels_copy):
        if name.startswith("_additive_attention"):
            os.unlink(kernels_copy / name)
    assert fused.problem() == "it is not built"
    lines = []
    fused.build(log=lines.append)
    assert "for TensorFlow " + tf.__version__ in lines[0]
    assert fused.problem() is None
    assert sorted(built(kernels_copy)) == sorted(               # no temp file left
        ["_additive_attention.json"]
        + [os.path.basename(fused.library_path(v)) for v in fused.variants()])
    # loaded and run in a process of its own: a second library registering the same ops
    # makes every later use of them in this one fail ("Multiple OpKernel registrations")
    done = subprocess.run(
        [sys.executable, "-c", "import sys, tensorflow as tf; "
         "k = tf.load_op_library(sys.argv[1]); "
         "print(float(k.additive_attention_scores(tf.zeros([1, 2, 3]), tf.zeros([1, 3]), "
         "tf.ones([3]))[0][0, 0]))", fused.library_path(fused.variant())],
        capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0 and done.stdout.split() == ["0.0"], done.stderr[-2000:]


def built(folder):
    """The build's files in `folder`, temporary ones included."""
    return [name for name in os.listdir(folder) if name.startswith("_additive_attention")]


def contents(folder):
    """Each of the build's files in `folder` by name: its bytes."""
    return {name: (folder / name).read_bytes() for name in built(folder)}


def test_a_failed_build_names_the_command_and_keeps_the_working_library(kernels_copy):
    before = contents(kernels_copy)
    (kernels_copy / "additive_attention.cc").write_text("this is not C++\n")
    with pytest.raises(RuntimeError,
                       match=r"compiling \S+additive_attention\.cc failed \(exit \d+\): "):
        fused.build(log=lambda *_: None)
    assert contents(kernels_copy) == before
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-cxx'"):
        fused.build(compiler="no-such-cxx", log=lambda *_: None)


def test_training_in_float32_on_the_cpu_says_when_the_kernel_is_not_used(shapes_data,
                                                                         tmp_path,
                                                                         monkeypatch):
    def notes(run):
        logs = []
        cfg = small_config(shapes_data, epochs=1, max_steps=1, **NO_DECODING)
        train.train(cfg, str(tmp_path / run), progress=False, log=logs.append)
        return [line for line in logs if "fused attention kernel" in line]
    assert notes("built") == []
    monkeypatch.setattr(fused, "library", lambda: None)
    monkeypatch.setattr(fused, "problem", lambda: "it is not built")
    assert notes("missing") == [
        "note: the fused attention kernel is not used (it is not built): training runs the "
        "same computation in TensorFlow's ops, slower; `" + fused.BUILD_COMMAND + "` builds "
        "it (make test and make demo do)"]


def test_a_source_changed_during_the_build_replaces_nothing(kernels_copy, monkeypatch):
    # the digest recorded must be the text compiled: one taken after an edit mid-build
    # would let a library of the old text pass for the new one
    before = contents(kernels_copy)
    digests = iter(["a" * 64, "b" * 64])
    monkeypatch.setattr(fused, "source_digest", lambda: next(digests))
    with pytest.raises(RuntimeError, match="changed while it was compiled: build it again"):
        fused.build(compiler="true", log=lambda *_: None)             # "compiles" nothing
    assert contents(kernels_copy) == before


def test_a_build_in_a_process_that_loaded_the_kernel_says_it_keeps_the_old(kernels_copy,
                                                                          monkeypatch):
    lines = []
    monkeypatch.setattr(fused, "problem", lambda: None)
    monkeypatch.setattr(tf, "load_op_library", lambda path: "loaded " + path)
    assert fused.library().startswith("loaded ")
    fused.build(compiler="true", log=lines.append)
    assert lines[-1] == ("note: this process keeps the kernel it had loaded; the new build "
                         "is used from the next one")
    assert fused.library().startswith("loaded ")                      # still the cached one
