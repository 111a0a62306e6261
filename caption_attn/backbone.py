"""The InceptionV3 backbone and the feature grid it produces.

The grid is defined here once: every other module (cache, model, plots, metrics, export) reads
these constants instead of repeating 8, 64 or 2048.

Also here: building the backbone (`imagenet`, seeded `random` or a weights file), the identity
of its weights (`weights_sha256`), the inference `Backbone` (batch norms folded, one
tf.function) and the power-of-two `feature_scale` calibrated for non-ImageNet weights. Keras and
TensorFlow are imported inside the functions that need them, so importing the constants stays
cheap.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
import os
import random
import socket
import sys

import cv2
import numpy as np

from caption_attn.config import BACKBONE_PRECISIONS as PRECISIONS
from caption_attn.config import DTYPE_POLICIES
from caption_attn.errors import UserError
from caption_attn.fileio import file_digest
from caption_attn.quiet import cpu_flags, nvidia_gpus, onednn_on

IMAGE_SIZE = 299                        # InceptionV3's native input side (pixels)
GRID = 8                                # the `mixed10` map is GRID x GRID positions
NUM_PIXELS = GRID * GRID                # 64 attention positions, row-major: p = row * 8 + col
FEATURE_DIM = 2048                      # channels of `mixed10`
FEATURE_SHAPE = (NUM_PIXELS, FEATURE_DIM)  # one cached feature file

BACKBONE = "InceptionV3"
PREPROCESS = "keras.applications.inception_v3.preprocess_input (x / 127.5 - 1)"
FEATURE_LAYOUT = "row-major 8x8 grid: position = row * 8 + col"

# Keras' own file name, URL and md5 of the no-top ImageNet weights (keras.applications).
IMAGENET_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
                + IMAGENET_FILE)
IMAGENET_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"
DOWNLOAD_TIMEOUT_S = 30          # per socket operation: a black-holed network fails, not hangs
CALIBRATION_SEED = 20240601      # synthetic calibration images for feature_scale


@contextlib.contextmanager
def _build_scope(precision: str, seed: int):
    """Keras dtype policy and Python RNG state for building the backbone, restored afterwards.

    Keras draws the seed of every unseeded initializer from Python's `random` when the layer is
    created, so seeding it gives identical weights in every process (and in both precisions:
    mixed policies keep float32 variables).
    """
    import keras

    previous_policy, previous_state = keras.config.dtype_policy(), random.getstate()
    keras.config.set_dtype_policy(DTYPE_POLICIES[precision])
    random.seed(seed)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous_policy)
        random.setstate(previous_state)


# oneDNN instruction sets (its documented ONEDNN_MAX_CPU_ISA values) without native bfloat16
# compute
ISA_WITHOUT_BFLOAT16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                        "AVX512_CORE_VNNI"}
XLA_WIDE_VECTORS = "--xla_cpu_prefer_vector_width=512"


def _onednn_cap(environ) -> str:
    """The instruction set oneDNN is capped at (`ONEDNN_MAX_CPU_ISA`, or its old name
    `DNNL_MAX_CPU_ISA`), upper case; "" when it is not."""
    return (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").upper()


# The ONEDNN_MAX_CPU_ISA caps under which oneDNN has no kernel for a precision's ops, while
# TensorFlow still hands it those ops by the CPU's flags: the process dies at the first matmul
# (SIGSEGV, or SIGABRT from an uncaught dnnl::error; no Python error), or TensorFlow raises at
# the first convolution ("could not create a primitive descriptor"). Measured with TensorFlow
# 2.21 on an Intel Xeon with AMX (model 207): bfloat16 failed under every cap of the AVX2
# family and below and ran under AVX512_CORE and above (oneDNN emulates it there: not native,
# see `ISA_WITHOUT_BFLOAT16`); float16 failed under every cap below AVX512_CORE_FP16.
ISA_ABORTING = {"bfloat16": ISA_WITHOUT_BFLOAT16 - {"AVX512_CORE", "AVX512_CORE_VNNI"},
                "float16": ISA_WITHOUT_BFLOAT16 | {"AVX512_CORE_BF16"}}


def onednn_aborts_on(precision: str, cpuinfo: str = "/proc/cpuinfo", environ=os.environ,
                     gpus=None) -> str:
    """The `ONEDNN_MAX_CPU_ISA` cap (or `DNNL_MAX_CPU_ISA`) under which `precision`'s ops
    would abort this process (`ISA_ABORTING`), upper case; "" where they run.

    TensorFlow hands bfloat16 ops to oneDNN on CPUs with AVX512F or AVX-NE-CONVERT, float16
    ones on CPUs with AVX512BW and AVX512-FP16 or AMX-FP16, or with AVX-NE-CONVERT (its
    `IsDataTypeSupportedByOneDNNOnThisCPU`), whatever the cap. Elsewhere (an AVX2-only CPU
    such as Zen 3) they run on Eigen's kernels, as they do where oneDNN is off
    (`quiet.onednn_on`). With an NVIDIA GPU (`gpus`: its /dev/nvidiaN devices) they run
    there: not refused (not measured). Nor is `AVX2_VNNI_2` on a CPU with AVX-NE-CONVERT,
    whose own instruction set it is, with oneDNN kernels for both (not measured: the Xeon
    above has no AVX-NE-CONVERT, so its oneDNN fell back to `AVX2_VNNI`)."""
    cap = _onednn_cap(environ)
    if cap not in ISA_ABORTING.get(precision, ()):
        return ""
    flags = cpu_flags(cpuinfo)
    if cap == "AVX2_VNNI_2" and "avx_ne_convert" in flags:
        return ""
    handed = ("avx_ne_convert" in flags
              or ("avx512f" in flags if precision == "bfloat16" else
                  "avx512bw" in flags and bool(flags & {"avx512_fp16", "amx_fp16"})))
    if not handed or not onednn_on(cpuinfo, environ) or (nvidia_gpus() if gpus is None
                                                          else gpus):
        return ""
    return cap


def refuse_aborting_precision(precision: str, what: str, instead: str) -> None:
    """`UserError` where `precision`'s ops would abort the process here (`onednn_aborts_on`),
    before anything is written: `what` names the flag or file that asks for the precision,
    `instead` says what else would do."""
    cap = onednn_aborts_on(precision)
    if cap:
        raise UserError(f"{what}: oneDNN capped at {cap} (ONEDNN_MAX_CPU_ISA) has no "
                        f"{precision} kernels, and TensorFlow hands {precision} ops to it on "
                        f"this CPU, so the process would abort at its first one: unset "
                        f"ONEDNN_MAX_CPU_ISA, or {instead}")


def prefer_wide_xla_vectors(cpuinfo: str = "/proc/cpuinfo", environ=os.environ) -> None:
    """Ask XLA (`XLA_FLAGS`) for 512-bit vectors in its CPU code where AVX-512 runs at full
    clock: Intel CPUs with AMX (Sapphire Rapids and later) and AMD CPUs with AVX512-BF16
    (Zen 4 and later). XLA's default, 256 bits, spares older Intel AVX-512 cores (Cooper Lake
    included, although it has AVX512-BF16) their lower clock under wide vectors; on these it
    leaves half of every vector unused (the compiled decoding loop took 0.91x the time greedy
    and 0.95x beam-3 with 512, on Intel with AMX).

    Nothing changes where `XLA_FLAGS` already choose a width, cap XLA's instruction set
    (`--xla_cpu_max_isa`) or name a `--flagfile`, or oneDNN is capped below AVX512-BF16
    (`ONEDNN_MAX_CPU_ISA=AVX2`; the README imitates an AVX2-only CPU with both caps).
    XLA reads its flags at its first compile in the process: call this before it. The flag
    stays in the environment, so child processes (the same TensorFlow) inherit it."""
    current = environ.get("XLA_FLAGS", "")
    flags = cpu_flags(cpuinfo)
    full_clock = "amx_bf16" in flags or {"avx512_bf16", "AuthenticAMD"} <= flags
    user_chose = ("xla_cpu_prefer_vector_width", "xla_cpu_max_isa", "--flagfile")
    if not full_clock or any(flag in current for flag in user_chose) \
            or _onednn_cap(environ) in ISA_WITHOUT_BFLOAT16:
        return
    environ["XLA_FLAGS"] = f"{current} {XLA_WIDE_VECTORS}".strip()


def native_bfloat16(cpuinfo: str = "/proc/cpuinfo", environ=os.environ) -> bool:
    """Whether bfloat16 runs natively here: on a GPU of compute capability 8.0 or more
    (Ampere on; a T4 or V100 has no bfloat16 units), or a CPU with AVX512-BF16 or AMX whose
    bfloat16 ops TensorFlow gives to oneDNN. On others (AVX2-only CPUs) TensorFlow emulates
    it, slower than float32, so no automatic choice may pick it there. Nor where oneDNN is
    off (`TF_ENABLE_ONEDNN_OPTS=0`: Eigen's kernels, as on an AVX2-only CPU; not measured),
    nor where `ONEDNN_MAX_CPU_ISA` (or its old name `DNNL_MAX_CPU_ISA`) caps oneDNN below
    AVX512-BF16: TensorFlow still sends bfloat16 ops to oneDNN by the CPU's flags, which
    emulates them under `AVX512_CORE` and has no kernel for them below (the process aborts:
    `onednn_aborts_on`)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:   # the ops run on the first one (a ROCm GPU gives no capability: float32)
        found = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        return tuple(found or (0, 0)) >= (8, 0)
    if _onednn_cap(environ) in ISA_WITHOUT_BFLOAT16 or not onednn_on(cpuinfo, environ):
        return False
    return bool(cpu_flags(cpuinfo) & {"avx512_bf16", "amx_bf16"})


def imagenet_weights_path(verify: bool = True, recorded_in: str = "") -> str:
    """Path of Keras' cached ImageNet weights, downloading them once; UserError when offline,
    advising `--weights PATH` (extract-features), or, with `recorded_in` (the manifest of a
    cache extracted with them: `caption` and `export` have no --weights), where to put the
    file. `verify` False takes a file already there without reading all of it for its md5,
    for a check before the model loads (`Backbone.check_manifest`; the build then verifies)."""
    import keras

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        # Keras prints "Downloading data from ..." and its bar on stdout, where `caption
        # --json` writes its JSON (which began with them): they are progress, for stderr
        with contextlib.redirect_stdout(sys.stderr):
            return keras.utils.get_file(IMAGENET_FILE, IMAGENET_URL, cache_subdir="models",
                                        file_hash=IMAGENET_MD5 if verify else None)
    except Exception as e:  # URL/DNS/timeout errors arrive as plain Exception from Keras
        if recorded_in:
            raise UserError(
                f"{recorded_in}: the features were extracted with the ImageNet weights, which "
                f"Keras has not cached here and cannot download ({e}); the backbone that made "
                f"the features cannot be rebuilt without them: copy {IMAGENET_FILE} from a "
                f"machine that has it into ~/.keras/models/ here (where Keras keeps it; "
                f"$KERAS_HOME/models/ if KERAS_HOME is set)") from None
        raise UserError(
            f"--weights imagenet: cannot get the InceptionV3 ImageNet weights ({e}). Without "
            f"network: copy {IMAGENET_FILE} from a machine that has it (Keras keeps it in "
            f"~/.keras/models/) and pass `--weights PATH/{IMAGENET_FILE}` (or put it into "
            f"~/.keras/models/ here), or use `--weights random` for offline trials (random "
            f"features only exercise the pipeline).") from None
    finally:
        socket.setdefaulttimeout(previous)


def is_imagenet_weights(weights: str) -> bool:
    """`imagenet`, or a file identical to Keras' ImageNet weights (same features: scale 1)."""
    if weights == "imagenet":
        return True
    if weights == "random" or os.path.getsize(weights) < 1 << 20:
        return False
    return file_digest(weights, "md5") == IMAGENET_MD5


def build_backbone(weights: str = "imagenet", seed: int = 0, precision: str = "float32"):
    """keras.Model: InceptionV3 without top, input (299, 299, 3), output (8, 8, 2048).

    `weights`: "imagenet" (Keras' download/cache), "random" (seeded init) or a weights file.
    `precision`: "bfloat16" builds it under the "mixed_bfloat16" policy (float32 variables).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}")
    if weights == "random":
        return _inception_v3(precision, seed)
    if weights == "imagenet":
        path = imagenet_weights_path()
        return load_backbone(path, precision, seed, f"--weights imagenet ({path})")
    check_weights_flag(weights)
    return load_backbone(weights, precision, seed, f"--weights {weights}")


def check_weights_flag(weights: str) -> None:
    """A `UserError` naming --weights unless it is `imagenet`, `random` or a file (what it
    holds is read with the backbone); needs no TensorFlow."""
    why = "" if weights in ("imagenet", "random") else _not_a_file(weights)
    if why:
        raise UserError(f"--weights {weights}: {why} (expected `imagenet`, `random` or the "
                        f"path of an InceptionV3 weights file such as {IMAGENET_FILE})")


def _not_a_file(path: str) -> str:
    """Why `path` is no weights file ("is a folder", "no such file"); "" when it is one."""
    return "" if os.path.isfile(path) else "is a folder" if os.path.isdir(path) else \
        "no such file"


def load_backbone(path: str, precision: str, seed: int, named: str):
    """InceptionV3 without top with the weights of file `path`; UserError, `named` (the flag
    or manifest that gave the file) first, when they do not load into it."""
    model = _inception_v3(precision, seed, draw_kernels=False)   # loaded below
    try:
        model.load_weights(path)
    except Exception as e:
        raise UserError(f"{named}: cannot load it into InceptionV3 without top "
                        f"({type(e).__name__}: {e})") from None
    return model


def _inception_v3(precision: str, seed: int, draw_kernels: bool = True):
    """keras.applications.InceptionV3 without top, built in `_build_scope`. `draw_kernels`
    False: its kernels are left zero (Keras' "glorot_uniform" resolves to zeros while it is
    built, by a custom-object scope of this thread), for a model whose weights are loaded
    right after: drawing its 21.8 M random numbers took 0.3 s of a one-image `caption`."""
    import keras

    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}")
    zeros = {"glorot_uniform": keras.initializers.Zeros}
    with _build_scope(precision, seed), (contextlib.nullcontext() if draw_kernels else
                                         keras.utils.custom_object_scope(zeros)):
        return keras.applications.InceptionV3(include_top=False, weights=None,
                                              input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))


def weights_sha256(model) -> str:
    """Identity of a model's weights: sha256 over every weight array (dtype, shape, bytes)."""
    h = hashlib.sha256()
    for array in model.get_weights():
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def fold_batchnorm(model):
    """Inference form of `model` with every Conv2D -> BatchNormalization pair folded into one
    Conv2D with bias (kernel * gamma / sqrt(var + eps), bias = beta - mean * that): a
    `FoldedModel`.

    Same function up to float rounding, ~7% less CPU time in float32 and ~20% in mixed
    bfloat16 (InceptionV3 has 94 such pairs). Returns `model` itself when the graph is not
    made of such pairs. The folded convolutions keep each layer's dtype policy.

    Only the 94 folded convolutions are made, each on its own: a second Keras model
    (`keras.models.clone_model`: every pooling, activation and concatenation made and called
    again) took 1.3 s of a one-image `caption`, for the same graph and features to the bit.
    """
    import keras

    pairs = {}  # conv name -> its BatchNormalization
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            history = getattr(layer.input, "_keras_history", None)
            conv = history[0] if history else None
            if not isinstance(conv, keras.layers.Conv2D) or conv.use_bias or \
                    conv.name in pairs or layer.axis not in (-1, 3):
                return model
            pairs[conv.name] = layer

    folded = {}  # conv name -> the Conv2D with bias that replaces it and its BN
    for layer in model.layers:
        if layer.name not in pairs:
            continue
        bn = pairs[layer.name]
        gamma = bn.gamma.numpy().astype(np.float64) if bn.scale else 1.0
        beta = bn.beta.numpy().astype(np.float64) if bn.center else 0.0
        variance = bn.moving_variance.numpy().astype(np.float64)
        factor = gamma / np.sqrt(variance + bn.epsilon)                     # (C_out,)
        kernel = layer.kernel.numpy() * factor                              # (kh, kw, C_in, C_out)
        bias = beta - bn.moving_mean.numpy() * factor                       # (C_out,)
        # zeros: no random kernel drawn only to be overwritten
        conv = layer.__class__.from_config({**layer.get_config(), "use_bias": True,
                                            "kernel_initializer": "zeros"})
        conv.build(layer.input.shape)
        conv.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
        folded[layer.name] = conv
    skipped = [bn.name for bn in pairs.values()]
    if FoldedModel.runs_on(model):
        return FoldedModel(model, folded, skipped)
    return _cloned(model, folded, skipped)


def _cloned(model, replaced: dict, skipped):
    """`FoldedModel(model, replaced, skipped)` as a second Keras model
    (`keras.models.clone_model`, public): for a Keras whose functional internals, which
    `FoldedModel` runs, are not the ones it was written for (`FoldedModel.runs_on`): 1.3 s
    slower to build, the same features to the bit (a test)."""
    import keras

    def clone(layer):
        if layer.name in skipped:
            return _pass_through_class()(name=layer.name, dtype=layer.dtype_policy.name)
        return replaced.get(layer.name, layer)   # the others shared: made once, no copy
    return keras.models.clone_model(model, clone_function=clone)


@functools.lru_cache(maxsize=None)
def _pass_through_class():
    """Keras layer class defined on first use (Keras is imported lazily in this module)."""
    import keras

    class PassThrough(keras.layers.Layer):
        """Stands in for a BatchNormalization folded into the preceding convolution."""

        def call(self, x, training=None, mask=None):
            return x

    return PassThrough


class FoldedModel:
    """`model`'s graph of layers run with `replaced` layers (name -> layer) in their place and
    the `skipped` ones (names) passing their input through: what `fold_batchnorm` makes.

    Called as `model` would be (`Functional.call`: inputs standardised, each layer that takes
    `training` given it), so the TensorFlow ops are those of a Keras model of the replaced
    layers. `variables`: those it computes with (an export saves them), not the unfolded
    ones it leaves out.
    """

    @staticmethod
    def runs_on(model) -> bool:
        """Whether `model` (a Keras Functional model) has the internals `__call__` runs, as
        Keras 3.15 has them: they are not Keras' public API, and another version may differ
        (`fold_batchnorm` then builds a second Keras model instead)."""
        try:
            graph = inspect.signature(model._run_through_graph).parameters
        except (AttributeError, TypeError, ValueError):
            return False
        return "operation_fn" in graph and callable(getattr(model, "_standardize_inputs", 0))

    def __init__(self, model, replaced: dict, skipped):
        self.model = model
        self.replaced = dict(replaced)
        self.skipped = frozenset(skipped)

    @property
    def variables(self) -> list:
        kept = [layer for layer in self.model.layers
                if layer.name not in self.replaced and layer.name not in self.skipped]
        return [v for layer in [*self.replaced.values(), *kept] for v in layer.variables]

    def __call__(self, inputs, training=None):
        def operation(op):
            if op.name in self.skipped:
                return lambda x, *args, **kwargs: x
            layer = self.replaced.get(op.name, op)

            def call(*args, **kwargs):
                if training is not None and \
                        "training" in getattr(layer, "_call_context_args", ()):
                    kwargs["training"] = training
                return layer(*args, **kwargs)
            return call
        inputs = self.model._standardize_inputs(inputs)                    # as Functional.call
        outputs = self.model._run_through_graph(inputs, operation_fn=operation)
        return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 \
            else outputs


class Backbone:
    """uint8 images (B, 299, 299, 3) -> float32 features (B, 64, 2048) times `feature_scale`.

    Wraps the Keras model (batch norms folded into the convolutions, see `fold_batchnorm`) in
    one tf.function: preprocess_input, model, reshape, cast, scale. Any batch size works
    without retracing. `jit_compile=True` compiles it with XLA (slower on CPU: 10% in float32,
    2.4x in bfloat16 measured; may help on GPU; each new batch size compiles again).
    `self.model` is the unfolded model (its weights are the cache's identity).
    """

    def __init__(self, model, feature_scale: float = 1.0, jit_compile: bool = False,
                 stored_dtype: str = "float32"):
        import tensorflow as tf

        self.model = model
        self.feature_scale = float(feature_scale)  # applied in __call__ (exact: a power of 2)
        # the dtype of the cache's files: training read the features rounded to it, so
        # `caption` and the export give the model them so too (float16: ~5e-4 relative)
        self.stored_dtype = stored_dtype
        self.inference_model = fold_batchnorm(model)
        spec = tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 3), tf.uint8)
        self._forward = tf.function(self.forward, input_signature=[spec],
                                    jit_compile=jit_compile, autograph=False)

    def forward(self, images):
        """The graph of `__call__` without the scale, for callers that build their own
        tf.function (the export): uint8 (B, 299, 299, 3) -> float32 (B, 64, 2048)."""
        import keras
        import tensorflow as tf

        preprocess = keras.applications.inception_v3.preprocess_input
        x = preprocess(tf.cast(images, tf.float32))                 # (B, 299, 299, 3) in [-1, 1]
        y = self.inference_model(x, training=False)                 # (B, 8, 8, 2048)
        return tf.reshape(tf.cast(y, tf.float32), (-1,) + FEATURE_SHAPE)  # (B, 64, 2048)

    def features(self, images):
        """The graph of `__call__`, for callers that build their own tf.function (the
        export): `forward` times the scale, rounded to the cache's file dtype and back."""
        import tensorflow as tf

        features = self.forward(images) * self.feature_scale          # (B, 64, 2048) float32
        if self.stored_dtype == "float32":
            return features
        return tf.cast(tf.cast(features, self.stored_dtype), tf.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3) or \
                images.dtype != np.uint8:
            raise ValueError(f"`images` must be uint8 (B, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got "
                             f"{images.dtype} {images.shape}")
        features = self._forward(images).numpy()                    # (B, 64, 2048) float32
        if self.feature_scale != 1.0:
            features *= self.feature_scale
        if self.stored_dtype != "float32":   # as extraction stores them, and training reads
            features = features.astype(self.stored_dtype).astype(np.float32)
        return features

    @staticmethod
    def check_manifest(cache_dir: str, verify: bool = False) -> tuple[dict, str]:
        """(manifest, weights file) of the cache: what `from_manifest` needs, checked from the
        manifest alone, no model built: features made from images as this version makes them,
        and the weights file it records there (`manifest_weights_file`; `verify`: an ImageNet
        file md5-checked). `caption` and `export` call it before they load the run's model:
        a weights file gone was found after that and the first batch of images."""
        from caption_attn import feature_cache  # imported here: it imports this module

        m = feature_cache.read_manifest(cache_dir)
        feature_cache.refuse_other_images_to_features(
            cache_dir, m, "captioned with this version, images would give the model other "
            "features than it was trained on: caption with the version that made the cache, "
            "or train a run on a cache this version extracts")
        return m, manifest_weights_file(cache_dir, m, verify)

    @classmethod
    def from_manifest(cls, cache_dir: str, jit_compile: bool = False) -> "Backbone":
        """Exactly the backbone that made the cache (weights checked against its sha256)."""
        from caption_attn.feature_cache import manifest_path

        m, path = cls.check_manifest(cache_dir, verify=True)
        if m["weights"] == "random":
            model = random_model_from_cache(cache_dir, m)
        else:   # named by the manifest: `caption` and `export` have no --weights
            model = load_backbone(path, m["precision"], m.get("seed") or 0,
                                  f"{manifest_path(cache_dir)}: the weights {path} it records")
            sha = weights_sha256(model)
            if sha != m["weights_sha256"]:
                raise UserError(f"{manifest_path(cache_dir)}: the cache was made "
                                f"with weights sha256 {m['weights_sha256'][:12]}…, but "
                                f"{m['weights']} now has {sha[:12]}… (the weights file changed?)")
        return cls(model, m["feature_scale"], jit_compile=jit_compile, stored_dtype=m["dtype"])


def random_weights_file(seed: int) -> str:
    """File name, inside the cache, of the random backbone with this seed."""
    return f"backbone_random_seed{seed}.weights.h5"


def manifest_weights_file(cache_dir: str, m: dict, verify: bool = True) -> str:
    """The file the backbone of the cache of manifest `m` loads its weights from: the random
    backbone saved in the cache, the weights file extraction was given (absolute path), or
    Keras' copy of the ImageNet weights (downloaded if it has none; `verify`: see
    `imagenet_weights_path`). UserError naming the manifest and the file when it is not
    there (a cache copied without its random weights, a weights file deleted since, ImageNet
    weights offline): the commands that read it have no --weights to name."""
    from caption_attn.feature_cache import manifest_path

    where = manifest_path(cache_dir)
    if m["weights"] == "imagenet":
        return imagenet_weights_path(verify, recorded_in=where)
    if m["weights"] == "random":
        path = os.path.join(cache_dir, m["weights_file"])
        what, fix = "the random backbone saved in", ("put the file back (copy it with the "
                                                     "cache), or extract the images into a "
                                                     "new cache")
    else:
        path = m["weights"]
        what, fix = "the weights file", ("put the file back at that path (the same weights: "
                                         "they are checked against the manifest's sha256)")
    why = _not_a_file(path)
    if why:
        raise UserError(f"{where}: the features were extracted with {what} {path}: {why}; "
                        f"the backbone that made the features cannot be rebuilt without it: "
                        f"{fix}")
    return path


def random_model_from_cache(cache_dir: str, m: dict):
    """The random backbone saved in a cache (manifest `m`), checked against its sha256.

    Its weights are read by `read_saved_weights`; where that does not give the manifest's
    weights (or cannot read the file), by Keras' `load_weights`, whose result decides."""
    path = manifest_weights_file(cache_dir, m)
    model = _inception_v3(m["precision"], m["seed"], draw_kernels=False)   # loaded below
    if read_saved_weights(model, path) and weights_sha256(model) == m["weights_sha256"]:
        return model
    try:
        model.load_weights(path)
    except Exception as e:
        raise UserError(f"{path}: cannot load the cached backbone weights ({e})") from None
    if weights_sha256(model) != m["weights_sha256"]:
        raise UserError(f"{path}: weights do not match the sha256 in the manifest (file "
                        f"replaced or corrupt); extract into a new --cache folder")
    return model


def read_saved_weights(model, path: str) -> bool:
    """Keras' `model.load_weights(path)` of the `.weights.h5` file `model.save_weights` wrote
    for a model of this architecture, read directly: one h5 group per layer of `model.layers`,
    `layers/<class name in snake case>[_N]/vars/<i>` (N counting the layers of that class
    before it, as Keras names them), its arrays in the order of `layer.weights`. Keras' own
    reader walks every attribute of every layer: 0.8 s for InceptionV3's 376 arrays, this
    0.1 s. False, the model untouched, where the file is not laid out so; a layout read
    wrongly is the caller's to catch (`random_model_from_cache` checks the sha256)."""
    import h5py
    from keras.src.utils.naming import to_snake_case

    counts: dict = {}
    arrays = []   # (variable, its saved array)
    try:
        with h5py.File(path, "r") as f:
            for layer in model.layers:
                name = to_snake_case(type(layer).__name__)
                counts[name] = counts.get(name, -1) + 1
                key = f"{name}_{counts[name]}" if counts[name] else name
                weights = layer.weights
                if not weights:
                    continue
                saved = f["layers"][key]["vars"]
                if len(saved) != len(weights):
                    return False
                for i, w in enumerate(weights):
                    array = saved[str(i)][()]
                    if array.shape != tuple(w.shape):
                        return False
                    arrays.append((w, array))
    except (OSError, KeyError, ValueError, TypeError):   # no such file, group or array
        return False
    for w, array in arrays:
        w.assign(array)
    return True


def calibration_images(n: int = 4) -> np.ndarray:
    """Fixed synthetic images (n, 299, 299, 3) uint8: smooth colour noise at several scales."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    images = []
    for i in range(n):
        side = 4 * 2 ** (i % 4)                                     # 4, 8, 16, 32 blobs across
        low = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        images.append(cv2.resize(low, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_CUBIC))
    return np.stack(images)


def calibrate_feature_scale(backbone: Backbone) -> tuple[float, float]:
    """(power-of-two scale making the features' RMS ~1, the RMS before scaling).

    A randomly initialised InceptionV3 outputs tiny activations (RMS ~1e-3; ~5% of the
    non-zero ones are below float16's normal range 6.1e-5, where it keeps fewer bits, and the
    smallest, ~1e-9, become 0). Scaling by a power of two is exact and keeps them. `backbone`
    must be unscaled (feature_scale 1).
    """
    assert backbone.feature_scale == 1.0
    feats = backbone(calibration_images())                          # (4, 64, 2048)
    rms = float(np.sqrt(np.mean(np.square(feats, dtype=np.float64))))
    if not math.isfinite(rms) or rms == 0.0:
        return 1.0, rms
    return float(2.0 ** round(-math.log2(rms))), rms
