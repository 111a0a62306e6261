"""Tests of the InceptionV3 backbone (caption_attn/backbone.py): seeded random weights, their
identity, folded batch norms, bfloat16, the feature scale and the offline ImageNet error.

The backbone is `weights="random"` (no network); `extracted` and `backbone` are the session's
float16 extraction and the backbone rebuilt from its manifest (conftest.py).
"""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from caption_attn.backbone import IMAGENET_FILE, Backbone, build_backbone, weights_sha256
from caption_attn.errors import UserError
from caption_attn.feature_cache import feature_path, read_manifest
from caption_attn.images import load_image, resize_image
from image_samples import GOOD, scene

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_float16_keeps_activations(images, extracted, backbone):
    """The power-of-two feature_scale keeps float16 from flushing random-init activations."""
    cache = extracted[0]
    scale = read_manifest(cache)["feature_scale"]
    batch = np.stack([load_image(os.path.join(images, k)) for k in GOOD[:4]])
    f32 = backbone(batch)                                        # (4, 64, 2048) scaled
    f16 = np.stack([np.load(feature_path(cache, k)) for k in GOOD[:4]]).astype(np.float32)
    nonzero32, nonzero16 = np.mean(f32 != 0), np.mean(f16 != 0)
    assert abs(nonzero32 - nonzero16) < 1e-3
    rms = np.sqrt(np.mean(f32 ** 2))
    assert 0.25 < rms < 4                                        # calibrated to ~1
    assert np.sqrt(np.mean((f16 - f32) ** 2)) / rms < 2e-3
    # without the scale (RMS ~1e-3) several % of the activations would be float16 subnormals
    # (< 6.1e-5: fewer mantissa bits, the smallest flushed to zero); with it almost none
    nonzero = f32 != 0
    assert np.mean(np.abs(f32[nonzero] / scale) < 6.1e-5) > 0.01
    assert np.mean(np.abs(f32[nonzero]) < 6.1e-5) < 1e-3
    assert np.all(f16[np.abs(f32) > 1e-6] != 0)


def test_from_manifest_reproduces_cached_features(images, extracted, backbone):
    cache = extracted[0]
    assert backbone.feature_scale == read_manifest(cache)["feature_scale"]
    got = backbone(load_image(os.path.join(images, "sub/c.jpg"))[None])[0]    # (64, 2048)
    want = np.load(feature_path(cache, "sub/c.jpg")).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_folded_batchnorm_matches_keras_model(backbone):
    """Backbone folds BN into the convs; the result equals the plain Keras model's."""
    import keras

    x = np.stack([resize_image(scene(3)), resize_image(scene(4))])    # (2, 299, 299, 3)
    plain = backbone.model(keras.applications.inception_v3.preprocess_input(
        x.astype(np.float32)), training=False)
    plain = np.asarray(plain).reshape(2, 64, 2048) * backbone.feature_scale
    got = Backbone(backbone.model, backbone.feature_scale)(x)   # not rounded to the cache's
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())


def clone_folded(model):
    """The folding `fold_batchnorm` did before it ran the model's own graph: a second Keras
    model (`keras.models.clone_model`) with each BatchNormalization passed through and its
    convolution given the folded kernel and bias. Kept as the reference of the features."""
    import keras

    pairs = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            pairs[layer.input._keras_history[0].name] = layer

    class PassThrough(keras.layers.Layer):
        def call(self, x, training=None, mask=None):
            return x

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return PassThrough(name=layer.name, dtype=layer.dtype_policy.name)
        config = layer.get_config()
        if layer.name in pairs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name in pairs:
            bn = pairs[layer.name]
            gamma = bn.gamma.numpy().astype(np.float64) if bn.scale else 1.0
            beta = bn.beta.numpy().astype(np.float64) if bn.center else 0.0
            factor = gamma / np.sqrt(bn.moving_variance.numpy().astype(np.float64)
                                     + bn.epsilon)                         # (C_out,)
            copy.get_layer(layer.name).set_weights([
                (layer.kernel.numpy() * factor).astype(np.float32),
                (beta - bn.moving_mean.numpy() * factor).astype(np.float32)])
    return copy


@pytest.fixture(scope="module")
def bfloat16_model():
    """The seeded random backbone (seed 0) in bfloat16, built once for the tests that read it
    (each build draws InceptionV3's 21.8 M random kernel numbers)."""
    return build_backbone("random", 0, precision="bfloat16")


@pytest.mark.parametrize("precision", [
    "float32", pytest.param("bfloat16", marks=pytest.mark.precision("bfloat16"))])
def test_folded_batchnorm_gives_the_features_of_a_cloned_model_bit_for_bit(
        backbone, precision, monkeypatch, request):
    """The folded backbone runs the model's own graph of layers with the folded convolutions
    in their place, building no second Keras model (`clone_model` took 1.3 s of a one-image
    `caption`): the features of every cache extracted before are the same to the last bit,
    in both precisions, and only the folded convolutions hold variables (what an export
    saves)."""
    import keras
    import tensorflow as tf

    model = backbone.model if precision == "float32" else request.getfixturevalue("bfloat16_model")
    reference = clone_folded(model)
    with monkeypatch.context() as patch:
        patch.setattr(keras.models, "clone_model", lambda *a, **k: pytest.fail("cloned"))
        ours = Backbone(model, backbone.feature_scale)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(ours.inference_model.variables) == 2 * len(convs) == 188
    assert {v.name for v in ours.inference_model.variables} == {"kernel", "bias"}
    pixels = np.stack([resize_image(scene(i)) for i in range(3)])       # (3, 299, 299, 3)
    old = Backbone(model, backbone.feature_scale)
    old.inference_model = reference
    old._forward = tf.function(old.forward, autograph=False,
                               input_signature=[tf.TensorSpec((None, 299, 299, 3), tf.uint8)])
    want, got = old(pixels), ours(pixels)
    assert got.dtype == want.dtype == np.float32
    assert np.array_equal(got, want)
    assert np.array_equal(ours(pixels[1:2]), old(pixels[1:2]))        # one image: caption


def test_a_keras_without_the_graph_internals_folds_into_a_cloned_model(backbone,
                                                                        monkeypatch):
    """`FoldedModel` runs Keras' functional internals (`_run_through_graph`), which are not
    its public API: under a Keras whose internals differ, `fold_batchnorm` builds a second
    model with `keras.models.clone_model` instead, of the same features to the bit, rather
    than every extraction and caption failing."""
    from caption_attn.backbone import FoldedModel

    assert FoldedModel.runs_on(backbone.model)          # this Keras: the quick way
    assert not FoldedModel.runs_on(object())
    folded = Backbone(backbone.model, backbone.feature_scale)    # not rounded to the cache's
    monkeypatch.setattr(FoldedModel, "runs_on", staticmethod(lambda model: False))
    cloned = Backbone(backbone.model, backbone.feature_scale)
    assert not isinstance(cloned.inference_model, FoldedModel)
    assert len(cloned.inference_model.variables) == 188
    assert {v.name for v in cloned.inference_model.variables} == {"kernel", "bias"}
    pixels = np.stack([resize_image(scene(i)) for i in range(2)])       # (2, 299, 299, 3)
    assert np.array_equal(cloned(pixels), folded(pixels))
    assert isinstance(folded.inference_model, FoldedModel)


@pytest.mark.precision("bfloat16")
def test_bfloat16_backbone_close_to_float32(images, backbone, bfloat16_model):
    import keras

    model = bfloat16_model                                      # build_backbone has run
    assert keras.config.dtype_policy().name == "float32"        # policy restored
    assert model.layers[1].dtype_policy.name == "mixed_bfloat16"
    assert weights_sha256(model) == weights_sha256(backbone.model)
    x = np.stack([load_image(os.path.join(images, k)) for k in ("a.jpg", "b.png")])
    want = backbone(x)                                           # (2, 64, 2048) float32
    got = Backbone(model, backbone.feature_scale)(x)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.sqrt(np.mean((got - want) ** 2)) / np.sqrt(np.mean(want ** 2)) < 0.05


def test_random_weights_are_seeded(extracted):
    sha = weights_sha256(build_backbone("random", 0))
    assert sha == read_manifest(extracted[0])["weights_sha256"]
    assert weights_sha256(build_backbone("random", 1)) != sha
    # a weights file gives the same backbone
    path = os.path.join(extracted[0], read_manifest(extracted[0])["weights_file"])
    assert weights_sha256(build_backbone(path)) == sha


def test_a_caches_random_backbone_is_read_without_keras_load_weights(extracted, monkeypatch):
    """The random backbone saved in a cache is read straight from its h5 file (Keras' own
    `load_weights` walks every attribute of every layer: 0.8 s of a one-image `caption`), into
    exactly the weights of the manifest's sha256."""
    import keras

    from caption_attn.backbone import random_model_from_cache

    m = read_manifest(extracted[0])
    monkeypatch.setattr(keras.Model, "load_weights",
                        lambda *a, **k: pytest.fail("read by Keras' load_weights"))
    assert weights_sha256(random_model_from_cache(extracted[0], m)) == m["weights_sha256"]


def test_a_backbone_whose_weights_are_loaded_draws_no_random_kernels(extracted, monkeypatch):
    """The random backbone of a cache and a weights file are built without drawing the 21.8 M
    random numbers of InceptionV3's kernels (0.3 s of a one-image `caption`) that their loaded
    weights replace; a seeded random backbone still draws them, the same as before."""
    import keras

    from caption_attn.backbone import random_model_from_cache

    m = read_manifest(extracted[0])
    path = os.path.join(extracted[0], m["weights_file"])
    with monkeypatch.context() as patch:
        patch.setattr(keras.initializers.GlorotUniform, "__call__",
                      lambda *a, **k: pytest.fail("random kernels drawn"))
        assert weights_sha256(random_model_from_cache(extracted[0], m)) == m["weights_sha256"]
        assert weights_sha256(build_backbone(path)) == m["weights_sha256"]
        model = build_backbone(path, precision="bfloat16")
        assert model.layers[1].dtype_policy.name == "mixed_bfloat16"
        assert weights_sha256(model) == m["weights_sha256"]
    assert keras.initializers.get("glorot_uniform").__class__ is keras.initializers.GlorotUniform
    assert weights_sha256(build_backbone("random", 0)) == m["weights_sha256"]


def test_weights_the_direct_reader_gets_wrong_or_cannot_read_are_read_by_keras(
        extracted, monkeypatch, tmp_path):
    """Where the direct read does not give the manifest's weights (a file of another Keras
    layout) or cannot read the file, Keras' `load_weights` reads it: the backbone is the
    cache's all the same. A file without a layer's group is not read at all (no weight
    half assigned)."""
    import h5py

    from caption_attn import backbone as backbone_lib

    cache = extracted[0]
    m = read_manifest(cache)
    real = backbone_lib.read_saved_weights

    def misread(model, path):
        done = real(model, path)
        model.weights[0].assign(np.zeros(model.weights[0].shape, np.float32))
        return done
    for reader in (misread, lambda model, path: False):
        monkeypatch.setattr(backbone_lib, "read_saved_weights", reader)
        model = backbone_lib.random_model_from_cache(cache, m)
        assert weights_sha256(model) == m["weights_sha256"]

    other = str(tmp_path / "other.weights.h5")
    with h5py.File(os.path.join(cache, m["weights_file"]), "r") as f, \
            h5py.File(other, "w") as g:
        for key in f["layers"]:
            if key != "conv2d_93":
                f.copy(f["layers"][key], g.require_group("layers"), name=key)
    model = build_backbone("random", 1)
    before = weights_sha256(model)
    assert real(model, other) is False
    assert weights_sha256(model) == before


def test_random_weights_same_in_another_process(extracted):
    code = ("from caption_attn.backbone import build_backbone, weights_sha256; "
            "print(weights_sha256(build_backbone('random', 0)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == read_manifest(extracted[0])["weights_sha256"]


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        build_backbone(str(tmp_path / "nope.h5"))
    with pytest.raises(UserError, match=f"--weights {tmp_path}: is a folder"):
        build_backbone(str(tmp_path))


def test_imagenet_offline_fails_fast_with_advice(monkeypatch):
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    if os.path.exists(os.path.join(home, "models", IMAGENET_FILE)) or \
            os.path.exists(os.path.join("/tmp/.keras/models", IMAGENET_FILE)):
        pytest.skip("ImageNet weights already in the Keras cache")

    def offline(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)       # no DNS: what offline looks like
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        build_backbone("imagenet")
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert "--weights imagenet" in message and "--weights random" in message
    assert f"--weights PATH/{IMAGENET_FILE}" in message and "~/.keras/models" in message
    assert e.value.exit_code == 2


@pytest.mark.parametrize("flags, native", [("fpu avx2 fma", False),
                                           ("avx2 avx512f avx512_bf16", True),
                                           ("avx2 amx_bf16 amx_tile", True),
                                           ("avx2 avx512f avx512bw", False)])
def test_bfloat16_is_chosen_only_where_it_is_native(tmp_path, flags, native):
    from caption_attn.backbone import native_bfloat16
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert native_bfloat16(str(cpuinfo), environ={}) is native     # whatever the caller's cap


@pytest.mark.parametrize("environ, native", [({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
                                             ({"DNNL_MAX_CPU_ISA": "avx512_core"}, False),
                                             ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),
                                             ({"ONEDNN_MAX_CPU_ISA": "ALL"}, True)])
def test_a_onednn_cap_below_bfloat16_is_not_native(tmp_path, environ, native):
    """`ONEDNN_MAX_CPU_ISA=AVX2` on an AVX512-BF16 CPU (how the README approximates an
    AVX2-only machine): TensorFlow would abort in bfloat16, so no automatic choice of it."""
    from caption_attn.backbone import native_bfloat16
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16\n")
    assert native_bfloat16(str(cpuinfo), environ) is native


@pytest.mark.parametrize("chosen, native", [("0", False), ("false", False), ("1", True),
                                            ("", True)])
def test_bfloat16_is_not_native_where_onednn_is_turned_off(tmp_path, chosen, native):
    """`TF_ENABLE_ONEDNN_OPTS=0` on an AVX512-BF16 or AMX CPU: TensorFlow runs bfloat16 ops on
    Eigen's kernels, as on an AVX2-only CPU, yet the demo picked bfloat16 there."""
    from caption_attn.backbone import native_bfloat16
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n")
    environ = {"TF_ENABLE_ONEDNN_OPTS": chosen} if chosen else {}
    assert native_bfloat16(str(cpuinfo), environ) is native


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((7, 0), False),
                                                ((8, 0), True), ((9, 0), True), (None, False)])
def test_bfloat16_is_native_only_on_gpus_that_have_it(tmp_path, monkeypatch, capability,
                                                       native):
    """Any GPU counted as native bfloat16: a T4 (7.5) or V100 (7.0), which have no bfloat16
    units, got it from the demo. From Ampere (8.0) on they have; a GPU whose compute
    capability TensorFlow does not give is not counted. The CPU's flags do not matter then."""
    import tensorflow as tf
    from caption_attn.backbone import native_bfloat16
    gpu = tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: [gpu] if kind == "GPU" else [])
    details = {} if capability is None else {"compute_capability": capability}
    monkeypatch.setattr(tf.config.experimental, "get_device_details",
                        lambda device: details if device is gpu else {})
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16\n")
    assert native_bfloat16(str(cpuinfo), environ={}) is native


AMX_XEON = "GenuineIntel avx2 fma avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile"
ZEN5 = "AuthenticAMD avx2 fma avx512f avx512bw avx512_vnni avx512_bf16"
ZEN3 = "AuthenticAMD avx2 fma"
SKYLAKE_SP = "GenuineIntel avx2 fma avx512f avx512bw"           # AVX-512, oneDNN off by default
CAP = "ONEDNN_MAX_CPU_ISA"


@pytest.mark.parametrize("flags, environ, precision, gpus, want", [
    (AMX_XEON, {CAP: "AVX2"}, "bfloat16", [], "AVX2"),
    (AMX_XEON, {CAP: "AVX2"}, "float16", [], "AVX2"),
    (AMX_XEON, {"DNNL_MAX_CPU_ISA": "avx2_vnni"}, "bfloat16", [], "AVX2_VNNI"),
    (AMX_XEON, {CAP: "AVX512_CORE"}, "bfloat16", [], ""),          # emulated by oneDNN: runs
    (AMX_XEON, {CAP: "AVX512_CORE"}, "float16", [], "AVX512_CORE"),
    (AMX_XEON, {CAP: "AVX512_CORE_BF16"}, "float16", [], "AVX512_CORE_BF16"),
    (AMX_XEON, {CAP: "AVX512_CORE_FP16"}, "float16", [], ""),
    (AMX_XEON, {}, "bfloat16", [], ""),
    (AMX_XEON, {CAP: "AVX2"}, "float32", [], ""),
    (AMX_XEON, {CAP: "AVX2", "TF_ENABLE_ONEDNN_OPTS": "0"}, "bfloat16", [], ""),  # Eigen's
    (AMX_XEON, {CAP: "AVX2", "TF_ENABLE_ONEDNN_OPTS": "yes"}, "bfloat16", [], "AVX2"),  # unread
    (AMX_XEON, {CAP: "AVX2_VNNI_2"}, "bfloat16", [], "AVX2_VNNI_2"),
    (AMX_XEON, {CAP: "AVX2"}, "bfloat16", ["/dev/nvidia0"], ""),
    (ZEN5, {CAP: "AVX2"}, "bfloat16", [], "AVX2"),
    (ZEN5, {CAP: "AVX2"}, "float16", [], ""),           # no AVX512-FP16: Eigen's kernels
    (ZEN3, {CAP: "AVX2", "TF_ENABLE_ONEDNN_OPTS": "1"}, "bfloat16", [], ""),
    (SKYLAKE_SP, {CAP: "AVX2"}, "bfloat16", [], ""),
    (SKYLAKE_SP, {CAP: "AVX2", "TF_ENABLE_ONEDNN_OPTS": "true"}, "bfloat16", [], "AVX2"),
    ("GenuineIntel avx2 fma avx_vnni avx_ne_convert", {CAP: "AVX2"}, "float16", [], "AVX2"),
    ("GenuineIntel avx2 fma avx_vnni avx_ne_convert", {CAP: "AVX2_VNNI_2"}, "float16", [], ""),
])
def test_a_precision_oneDNN_cannot_run_under_its_cap_is_known_before_it_aborts(
        tmp_path, flags, environ, precision, gpus, want):
    """Under `ONEDNN_MAX_CPU_ISA` below a precision's kernels, TensorFlow still hands that
    precision's ops to oneDNN where the CPU's flags say so, and the process aborts; on other
    CPUs, or with oneDNN off, Eigen runs them."""
    from caption_attn.backbone import onednn_aborts_on
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nvendor_id\t: x\nflags\t\t: {flags}\n")
    assert onednn_aborts_on(precision, str(cpuinfo), environ, gpus) == want


_LOW_PRECISION_OPS = """
import sys
import tensorflow as tf
dtype = tf.as_dtype(sys.argv[1])
x = tf.ones([2, 16, 16, 8], dtype)
y = tf.nn.conv2d(x, tf.ones([3, 3, 8, 8], dtype), 1, "SAME")
z = tf.matmul(tf.reshape(y, [-1, 8]), tf.ones([8, 64], dtype))
print("ran", float(tf.reduce_sum(tf.cast(z, tf.float32))))
"""


@pytest.mark.slow
def test_what_aborts_under_a_cap_is_what_this_cpu_does():
    """`onednn_aborts_on` against TensorFlow itself on the machine running the tests: a
    convolution and a matmul in each low precision, in a fresh process (oneDNN reads its cap
    as it starts) under a cap that aborts where the CPU hands the precision to oneDNN (an
    AVX-512 machine) and under one that does not. A process it calls safe must run them, and
    one it refuses must die (on Zen 3 nothing is refused: Eigen runs them)."""
    from caption_attn.backbone import onednn_aborts_on
    cases = [("bfloat16", "AVX2"), ("bfloat16", "AVX512_CORE"), ("float16", "AVX2"),
             ("float16", "AVX512_CORE_FP16")]
    # oneDNN on or off as in this process (conftest: as the CLI chooses)
    procs = [subprocess.Popen([sys.executable, "-c", _LOW_PRECISION_OPS, precision],
                              env={**os.environ, CAP: cap},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for precision, cap in cases]
    try:
        for (precision, cap), proc in zip(cases, procs):
            out, err = proc.communicate(timeout=300)
            if onednn_aborts_on(precision, environ={**os.environ, CAP: cap}):
                # killed (SIGSEGV, SIGABRT), or TensorFlow's error: oneDNN's, not another
                assert proc.returncode in (-11, -6) or "primitive descriptor" in err, \
                    (precision, cap, proc.returncode, err[-2000:])
            else:
                assert proc.returncode == 0 and out.startswith("ran"), \
                    (precision, cap, proc.returncode, err[-2000:])
    finally:
        for proc in procs:
            proc.kill()


@pytest.mark.parametrize("flags, environ, want", [
    ("AuthenticAMD avx2 avx512f avx512_bf16", {}, "--xla_cpu_prefer_vector_width=512"),  # Zen 4
    ("GenuineIntel avx2 avx512f amx_bf16 amx_tile", {"XLA_FLAGS": "--xla_dump_to=/tmp/x"},
     "--xla_dump_to=/tmp/x --xla_cpu_prefer_vector_width=512"),   # the user's flags kept
    ("AuthenticAMD fpu avx2 fma", {}, None),                         # AVX2 only (Zen 3)
    ("GenuineIntel avx2 avx512f avx512bw", {}, None),                # Skylake: clocks down
    ("GenuineIntel avx2 avx512f avx512_bf16", {}, None),             # Cooper Lake: clocks down
    ("AuthenticAMD avx2 avx512f avx512_bf16", {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"},
     "--xla_cpu_prefer_vector_width=256"),                           # the user's choice
    ("AuthenticAMD avx2 avx512f avx512_bf16", {"XLA_FLAGS": "--flagfile=/tmp/f"},
     "--flagfile=/tmp/f"),                                           # may choose one: kept
    ("GenuineIntel avx2 avx512f amx_bf16", {"ONEDNN_MAX_CPU_ISA": "AVX2"}, None),  # "Zen 3"
    ("GenuineIntel avx2 avx512f amx_bf16", {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"},
     "--xla_cpu_max_isa=AVX2"),                                      # XLA capped by the user
    ("GenuineIntel avx2 avx512f amx_bf16", {"DNNL_MAX_CPU_ISA": "avx512_core_vnni"}, None),
])
def test_xla_gets_512_bit_vectors_only_where_they_run_at_full_speed(tmp_path, flags, environ,
                                                                     want):
    from caption_attn.backbone import prefer_wide_xla_vectors
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    prefer_wide_xla_vectors(str(cpuinfo), environ)
    assert environ.get("XLA_FLAGS") == want
    prefer_wide_xla_vectors(str(cpuinfo), environ)                   # idempotent
    assert environ.get("XLA_FLAGS") == want


def test_xla_vector_width_is_chosen_only_for_decoders_that_compile(monkeypatch):
    """`make_decoder` asks for the width before XLA's first compile (XLA reads its flags
    once), and only when it may compile: not for training's validator (nothing compiled)."""
    from caption_attn import captioner
    from caption_attn.config import DecodeConfig
    from caption_attn.model import ShowAttendTell
    calls = []
    monkeypatch.setattr(captioner, "prefer_wide_xla_vectors", lambda: calls.append(1))
    model = ShowAttendTell(12, 8, 16)
    captioner.make_decoder(model, DecodeConfig(beam=1, xla_min_images=0), 5)
    captioner.make_decoder(model, DecodeConfig(sample=True), 5)
    assert calls == []
    captioner.make_decoder(model, DecodeConfig(beam=3), 5)
    captioner.make_decoder(model, DecodeConfig(beam=1, xla=True), 5)
    assert calls == [1, 1]


# TensorFlow's own default (`DefaultOneDnnPolicy`, Linux): oneDNN on only where the CPU has one
# of these; on an AVX2-only CPU (AMD Zen 3) every op ran on Eigen, the training step at 1.19x
# the time of oneDNN's AVX2 kernels on a real Zen 3 (README: Speed).
@pytest.mark.parametrize("flags, environ, gpus, want", [
    ("AuthenticAMD fpu avx avx2 fma", {}, [], "1"),                  # Zen 3: turned on
    ("GenuineIntel avx avx2 fma avx512f avx512bw", {}, [], None),    # Skylake-SP: unmeasured
    ("AuthenticAMD avx2 fma avx512f avx512_bf16 avx512_vnni", {}, [], None),  # Zen 4: already
    ("GenuineIntel avx2 fma avx512f amx_bf16 amx_tile", {}, [], None),        # AMX: already
    ("GenuineIntel avx2 fma avx_vnni", {}, [], None),                # Alder Lake: already
    ("AuthenticAMD avx2 fma", {"TF_ENABLE_ONEDNN_OPTS": "0"}, [], "0"),  # the user's choice
    ("AuthenticAMD avx2 fma", {"TF_ENABLE_ONEDNN_OPTS": "false"}, [], "false"),
    ("AuthenticAMD avx2 fma", {}, ["/dev/nvidia0"], None),           # a GPU does the work
    ("GenuineIntel avx fma", {}, [], None),                          # no AVX2: left to TF
    ("", {}, [], None),                                              # cpuinfo unreadable / ARM
])
def test_onednn_is_turned_on_where_tensorflow_leaves_avx2_cpus_without_it(
        tmp_path, flags, environ, gpus, want):
    from caption_attn.quiet import onednn_on_avx2_cpus
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n" if flags else "")
    onednn_on_avx2_cpus(str(cpuinfo), environ, gpus=gpus)
    assert environ.get("TF_ENABLE_ONEDNN_OPTS") == want
    onednn_on_avx2_cpus(str(cpuinfo), environ, gpus=gpus)           # idempotent
    assert environ.get("TF_ENABLE_ONEDNN_OPTS") == want


def test_import_tensorflow_chooses_onednn_before_tensorflow_loads():
    """TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, as it loads: `quiet.import_tensorflow`
    (the CLI's and the benchmarks' import) must apply the choice before that."""
    code = ("import sys\n"
            "from caption_attn import quiet\n"
            "seen = []\n"
            "quiet.onednn_on_avx2_cpus = lambda: seen.append('tensorflow' in sys.modules)\n"
            "quiet.import_tensorflow()\n"
            "print(seen, 'tensorflow' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[False] True", done.stdout


def test_the_test_suite_chooses_onednn_as_the_cli_does():
    """The tests run TensorFlow as the CLI does: conftest applies the same choice before any
    test module imports TensorFlow (on an AVX2-only CPU the suite ran on Eigen otherwise)."""
    import conftest
    assert conftest.ONEDNN_CHOSEN_BEFORE_TENSORFLOW is True


def test_keras_download_messages_go_to_stderr_not_stdout(monkeypatch, capsys):
    """Keras' get_file prints "Downloading data from ..." and its progress bar on stdout:
    `caption --json` (a run of an ImageNet cache on a machine without the weights cached)
    printed them before its JSON, which no JSON reader could then load, exit 0."""
    import sys

    import keras

    from caption_attn import backbone as backbone_lib

    def get_file(*args, **kwargs):
        print("Downloading data from https://storage.googleapis.com/...")
        sys.stdout.write("87910968/87910968 ━━━━━━━━━━━━━━━━━━━━ 1s 0us/step\n")
        return "/keras/models/" + backbone_lib.IMAGENET_FILE
    monkeypatch.setattr(keras.utils, "get_file", get_file)
    assert backbone_lib.imagenet_weights_path().endswith(backbone_lib.IMAGENET_FILE)
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("Downloading data from ")
