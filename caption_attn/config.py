"""Every default of the project, in one place, with the reason beside it.

Each dataclass field becomes one CLI flag (`--field-name`) through `cli.add_config_args`; the
`help` metadata is the flag's help text. A run saves its resolved configuration as
`config.json` (see `RunConfig`), so a run folder always says how it was made.

Every config validates itself when it is made (`Config.__post_init__`): each field's `check`
and the class's cross-field rules run before any command reads a file or starts work, and a
bad value is a `UserError` naming the flag and the value received (zero, negative, NaN and
infinite values are refused wherever they make no sense).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from caption_attn.errors import UserError
from caption_attn.fileio import read_json, write_json_atomic

Check = Callable[[Any], Optional[str]]  # value -> what is wrong with it, or None


def opt(default: Any, help: str, choices: Optional[tuple] = None, flag: Optional[str] = None,
        check: Optional[Check] = None):
    """A dataclass field carrying its CLI help (and optional choices / flag name / check)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if flag is not None:
        meta["flag"] = flag
    if check is not None:
        meta["check"] = check
    return field(default=default, metadata=meta)


def flag_name(f: dataclasses.Field) -> str:
    """The CLI flag of a config field: `--batch-size` for `batch_size`."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def integer(low: int, high: Optional[int] = None) -> Check:
    """An int (not a bool) in [low, high]."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low or \
                (high is not None and value > high):
            return f"must be an integer >= {low}" + (f" and <= {high}" if high is not None
                                                     else "")
        return None
    return check


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> Check:
    """A finite int or float in the interval; `*_open` excludes that end."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    interval = (f"> {low:g}" if low_open else f">= {low:g}") if high == math.inf else \
        f"in {left}{low:g}, {high:g}{right}"

    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value < low or value > high or \
                (low_open and value == low) or (high_open and value == high):
            return f"must be a finite number {interval}"
        return None
    return check


POSITIVE = number(0.0, low_open=True)
# Seeds that reach Keras or the sampling ops: 2**32 and more was a ValueError traceback from
# keras.utils.set_random_seed (train, demo), a TypeError from the sampling ops (caption
# --sample). make-shapes' and extract-features' seeds (numpy, Python's random) take any
SEED = integer(0, 2**32 - 1)
NON_NEGATIVE = number(0.0)
FRACTION = number(0.0, 1.0, high_open=True)   # [0, 1)
# Adam moves every weight by about the learning rate per step: past 10 every step throws the
# weights far beyond their scale (1e38: "loss became nan"), and past float32's 3.4e38 it was
# a ValueError traceback after config.json, split.json and vocab.json were written
MAX_LEARNING_RATE = 10.0
# Below this no weight moves: Adam's step of about the rate is under float32's rounding step of
# a weight of 0.01 (9e-10), and 1e-300 is float32's 0. Such a run "trained" every epoch and
# ended with exit 0 and its initial weights.
MIN_LEARNING_RATE = 1e-9
LEARNING_RATE = number(MIN_LEARNING_RATE, MAX_LEARNING_RATE)   # [1e-9, 10]
# A clip norm (0: none) below this leaves the clipped gradients of a model of millions of
# weights (about clip / sqrt(weights) each) under Adam's epsilon (1e-7), so the steps shrink
# toward none; 1e-300 is float32's 0, which zeroed every gradient. Such a run "trained" every
# epoch and ended with exit 0 and about its initial weights. Useful ones are 0.1 to 10.
# Refused by `train` (`check_train_flags`), not here: a run's config.json must still load.
MIN_CLIP_NORM = 1e-3


# The attention regulariser's weight: 1e39 is float32's inf (an infinite loss, said to be a
# divergence); the paper uses 1, the demo 3 (8 scored lower)
MAX_ATTENTION_REG = 1000.0
ATTENTION_REG = number(0.0, MAX_ATTENTION_REG)


def NON_EMPTY(value) -> Optional[str]:  # noqa: N802 - used like the constants above
    return None if value.strip() else "must not be empty"


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """`UserError` unless both fractions are in [0, 1) and leave some images for training."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        problem = FRACTION(value)
        if problem:
            raise UserError(f"--{name.replace('_', '-')} (`{name}`) {problem}, got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise UserError(f"--val-fraction + --test-fraction (`val_fraction` + `test_fraction`) "
                        f"must be < 1, got {val_fraction} + {test_fraction}")


# Fields whose flags were on the command line, set by `cli.config_from_args` while it builds
# a config (a default value typed out counts as given; see `Config.given`).
_FLAGS_GIVEN: contextvars.ContextVar = contextvars.ContextVar("flags_given",
                                                              default=frozenset())


@contextlib.contextmanager
def flags_given(names):
    """Configs created inside see `names` (field names) as given on the command line."""
    token = _FLAGS_GIVEN.set(frozenset(names))
    try:
        yield
    finally:
        _FLAGS_GIVEN.reset(token)


class Config:
    """Base of the config dataclasses: type, range and cross-field checks on creation."""

    def __post_init__(self):
        # kept with the config: checks made after it was created (`inspect` and `train`
        # refusing --val-fraction for a Karpathy file) ran outside `flags_given`, and took a
        # flag typed with its default value for one not given
        self._flags_given = _FLAGS_GIVEN.get()
        self.validate()

    def given(self, names) -> set:
        """Those of the fields `names` that the user set: on the command line (even to their
        default value, see `flags_given`: the flags given when this config was made) or, for a
        config made in Python, to a value other than the default. `check_together` refuses a
        flag by this, not by its value."""
        fields = type(self).__dataclass_fields__
        return {name for name in names
                if name in self._flags_given or getattr(self, name) != fields[name].default}

    def typed(self, names) -> set:
        """Those of the fields `names` given on the command line (`flags_given`), whatever
        their value: for a note on a flag the user typed, which a config made in Python (a
        test's, the demo's) has none of."""
        return set(names) & self._flags_given

    def validate(self) -> None:
        """`UserError` naming the first invalid flag and its value."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            problem = _type_problem(hints[f.name], value)
            if problem is None and value is not None:
                if "choices" in f.metadata and value not in f.metadata["choices"]:
                    problem = f"must be one of {', '.join(map(str, f.metadata['choices']))}"
                elif "check" in f.metadata:
                    problem = f.metadata["check"](value)
            if problem:
                raise UserError(f"{flag_name(f)} (`{f.name}`) {problem}, got {value!r}")
        self.check_together()

    def check_together(self) -> None:
        """Rules between fields; `UserError` naming the flags."""


def _type_problem(kind, value) -> Optional[str]:
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if dataclasses.is_dataclass(kind):
        return None if isinstance(value, kind) else f"must be a {kind.__name__}"
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) \
            else "must be an integer"
    if kind is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else "must be a number"
    if kind is str:
        return None if isinstance(value, str) else "must be a string"
    return None


CAPTION_FORMATS = ("auto", "coco", "karpathy", "flickr-token", "flickr-csv")
# what a folder walk (`images.list_images`) takes for an image, any case (decoding goes by the
# bytes, not the name); here for the --help texts. .jfif / .pjpeg / .pjp: JPEGs as browsers
# on Windows save them
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".pjpeg", ".pjp", ".png", ".bmp", ".dib",
                    ".gif", ".webp", ".tif", ".tiff")
# Longest caption `--max-length` accepts, in words: four times COCO's longest captions (about
# 50 words), yet small enough that a typo (100000 for 100) is refused instead of decoding
# samples and drawing heatmap panels for minutes. Decoding adds one for <end>, so a run
# trained at the bound decodes with its default length.
MAX_CAPTION_WORDS = 200
# make-shapes keeps every record in memory until captions.json is written (~10 KB each): a
# typo such as 1000000000 was OOM-killed after minutes, leaving images without captions.json
MAX_SHAPES_IMAGES = 200_000
# extract-features allocates its batch of 299x299 pixels up front: --batch-size 1000000 died
# with a MemoryError traceback (250 GiB); `caption` holds one batch of images (and the
# backbone's activations of it); larger batches than this gain nothing on any device
MAX_IMAGE_BATCH = 1024
# extract-features' decoding threads: each may hold a decoded image, and --workers 100000
# started threads until "can't start new thread" (a traceback, after the cache folder was
# made) or the memory ran out. Decoding gains nothing past the cores of any one machine.
MAX_WORKERS = 256
# Widest beam `--beam` accepts: four times the 3-5 of captioning papers, past which beam search
# is known to give shorter, blander captions, not better ones. Each beam decodes like another
# image (tensors of --batch-size x beam rows, 64 x units each, every step): --beam 100000
# tried to allocate hundreds of GB, or crawled, without a word of why.
MAX_BEAM = 20


def beam_width(value) -> Optional[str]:
    """`--beam`'s check: an integer in [1, MAX_BEAM], saying why there is a bound."""
    problem = integer(1, MAX_BEAM)(value)
    if problem and isinstance(value, int) and value > MAX_BEAM:
        problem += (" (each beam costs the memory and time of another image, and beams "
                    "wider than the usual 3-5 give shorter, blander captions, not better ones)")
    return problem
# The float types of the project, each list defined once: how cached features are stored, and
# the compute precisions of the backbone and of training.
FEATURE_DTYPES = ("float32", "float16")
BACKBONE_PRECISIONS = ("float32", "bfloat16")
TRAIN_PRECISIONS = ("float32", "bfloat16", "float16")
# Early-stopping metrics, and whether larger is better.
MONITORS = {"val_loss": "min", "val_bleu4": "max", "val_cider": "max"}


@dataclass
class DataConfig(Config):
    """Where the captions come from and how images are split."""

    format: str = opt("auto", "caption file format; `auto` detects it from the content",
                      choices=CAPTION_FORMATS)
    val_fraction: float = opt(0.05, "fraction of images held out for validation when the "
                              "file has no split of its own (Karpathy files do, and Flickr8k "
                              "files with the official lists beside them)",
                              check=FRACTION)
    test_fraction: float = opt(0.05, "fraction of images held out for testing when the file "
                               "has no split of its own", check=FRACTION)
    seed: int = opt(0, "seed of the split by image and, in `train`, of weight init, "
                    "shuffling and dropout", check=SEED)

    def check_together(self) -> None:
        check_fractions(self.val_fraction, self.test_fraction)


@dataclass
class VocabConfig(Config):
    """Vocabulary fit on the train split only (never on val/test: no leakage)."""

    vocab_size: int = opt(5000, "keep the K most frequent words (ties broken alphabetically); "
                          "special tokens come on top of these", check=integer(1))
    min_count: int = opt(1, "drop words seen fewer than N times in the train split",
                         check=integer(1))
    max_length: int = opt(40, "captions longer than N words are truncated (COCO's p99.9 is "
                          f"about 30 words; at most {MAX_CAPTION_WORDS})",
                          check=integer(1, MAX_CAPTION_WORDS))


@dataclass
class ShapesConfig(Config):
    """The built-in synthetic dataset (`make-shapes`)."""

    num_images: int = opt(1000, "number of images to render (at most "
                          f"{MAX_SHAPES_IMAGES:,}: about 10 KB of memory and 4 ms of a core "
                          "each, and COCO has 123,287)", check=integer(1, MAX_SHAPES_IMAGES))
    seed: int = opt(0, "same seed gives byte-identical images and captions", check=integer(0))
    image_size: int = opt(299, "side of the square images in pixels (InceptionV3's input "
                          "size, so extraction does not resample them; 64 to 4096: "
                          "extraction shrinks every image to 299 anyway, and a 4096 image "
                          "is 48 MB in memory)", check=integer(64, 4096))
    val_fraction: float = opt(0.1, "fraction of images in the val split", check=FRACTION)
    test_fraction: float = opt(0.1, "fraction of images in the test split", check=FRACTION)
    replace: bool = opt(False, "write into OUT even if it already holds a dataset made before "
                        "by make-shapes (deleted first); OUT may hold nothing else (any "
                        "other file is refused, never deleted)")

    def check_together(self) -> None:
        check_fractions(self.val_fraction, self.test_fraction)


@dataclass
class ExtractConfig(Config):
    """The offline InceptionV3 pass (`extract-features`)."""

    cache: str = opt("features_cache", "folder of the feature cache", check=NON_EMPTY)
    weights: str = opt("imagenet", "backbone weights: `imagenet` (Keras download), `random` "
                       "(seeded, offline; saved into the cache) or a path to a weights file",
                       check=NON_EMPTY)
    seed: int = opt(0, "seed of `--weights random`", check=integer(0))
    dtype: str = opt("float32", "dtype of the cached .npy files; float16 halves the cache",
                     choices=FEATURE_DTYPES)
    precision: str = opt("float32", "compute precision of the backbone; bfloat16 is mixed "
                         "precision (fast on CPUs with AVX512-BF16/AMX and on GPUs)",
                         choices=BACKBONE_PRECISIONS)
    batch_size: int = opt(32, f"images per backbone call (at most {MAX_IMAGE_BATCH}: a "
                          "batch's pixels take 268 KB and the backbone's activations tens of "
                          "MB per image)", check=integer(1, MAX_IMAGE_BATCH))
    num_shards: int = opt(1, "split the images into N disjoint shards (one per machine)",
                          check=integer(1))
    shard_index: int = opt(0, "which shard this process extracts (0-based)",
                           check=integer(0))
    verify: bool = opt(False, "fully check every cached file (header, shape, dtype, finite) "
                       "and every image's sha256 against the index, and re-extract the bad "
                       "ones")
    strict: bool = opt(False, "exit non-zero if any image failed")
    workers: int = opt(0, f"image decoding threads (0: one per CPU core this process may run "
                       f"on, as taskset or Slurm set it; at most {MAX_WORKERS})",
                       check=integer(0, MAX_WORKERS))
    replace_other_images: bool = opt(False, "extract images of --images whose same-named "
                                     "images of another folder this cache holds features of "
                                     "(refused without it: their features would be replaced, "
                                     "under the runs trained on them)")

    def check_together(self) -> None:
        # `--weights imagenet --seed 7` ended with exit 0 and `seed: null` in the manifest:
        # only random weights are seeded (extraction itself has nothing random)
        if self.given(("seed",)) and self.weights != "random":
            raise UserError(f"--seed seeds --weights random only; with --weights "
                            f"{self.weights} it would change nothing: leave it out")
        if self.shard_index >= self.num_shards:
            raise UserError(f"--shard-index must be in [0, --num-shards) = [0, "
                            f"{self.num_shards}), got {self.shard_index}")


@dataclass
class ModelConfig(Config):
    """Show, Attend and Tell decoder sizes. Changing any of these breaks resume."""

    embedding_dim: int = opt(256, "word embedding and projected feature size (TF tutorial)",
                             check=integer(1))
    units: int = opt(512, "GRU units and attention size (TF tutorial)", check=integer(1))
    dropout: float = opt(0.5, "dropout before the output layer (Show, Attend and Tell)",
                         check=FRACTION)
    attention_reg: float = opt(1.0, "weight of the doubly stochastic attention regulariser "
                               "mean_i (1 - sum_t alpha_ti)^2 over the 64 positions (Show, "
                               "Attend and Tell eq. 14; averaged as in sgrvinod's tutorial; "
                               f"at most {MAX_ATTENTION_REG:g})", check=ATTENTION_REG)
    feature_norm: bool = opt(True, "standardise each feature channel with its mean and "
                             "variance over (up to 1,000) training images before the "
                             "encoder (default: on); --no-feature-norm: raw features")


@dataclass
class TrainConfig(Config):
    """The training loop (`train`)."""

    epochs: int = opt(20, "maximum number of epochs (cross-entropy and self-critical together)",
                      check=integer(1))
    batch_size: int = opt(64, "captions per step (global batch over all replicas); in "
                          "self-critical epochs, sampled captions per step", check=integer(1))
    learning_rate: float = opt(1e-3, f"Adam learning rate ({MIN_LEARNING_RATE:g} to "
                               f"{MAX_LEARNING_RATE:g})",
                               check=LEARNING_RATE)
    lr_schedule: str = opt("constant", "learning-rate schedule over the cross-entropy steps",
                           choices=("constant", "cosine"))
    clip_norm: float = opt(5.0, f"clip gradients by this global norm (0 disables; else at "
                                f"least {MIN_CLIP_NORM:g})", check=NON_NEGATIVE)
    ema: float = opt(0.0, "keep an exponential moving average of the weights with this "
                     "momentum (0.995 averages about the last 200 steps, fewer during the "
                     "first ~1800) and validate, choose and save the best model, and draw "
                     "the sample heatmaps with it; the steps train the weights as they are. "
                     "On or off is fixed for a run: a resume cannot change it, only the "
                     "momentum (0: off)", check=FRACTION)
    monitor: Optional[str] = opt(None, "metric for early stopping and the best model: "
                                 "val_loss, val_bleu4 or val_cider (the last two decode up to "
                                 "--bleu-images validation images each epoch; loss and BLEU "
                                 "stop agreeing late in training) (default: val_loss, and "
                                 "val_cider in self-critical epochs)",
                                 choices=tuple(MONITORS))
    patience: int = opt(3, "epochs without improvement before stopping", check=integer(0))
    min_delta: float = opt(0.0, "smallest change of the monitored metric that counts as "
                           "improvement", check=NON_NEGATIVE)
    max_steps: Optional[int] = opt(None, "stop after this many training steps in total "
                                   "(quick trials; the learning-rate schedule still spans "
                                   "--epochs, so a later rerun continues as if never "
                                   "stopped; an epoch stopped mid-way is checkpointed, and "
                                   "validated and recorded once a rerun finishes it)",
                                   check=integer(1))
    precision: str = opt("float32", "compute precision: bfloat16 (CPU/GPU) or float16 with "
                         "loss scaling (GPU)", choices=TRAIN_PRECISIONS)
    xla: bool = opt(False, "compile the cross-entropy training step with XLA "
                         "(jit_compile; not the self-critical step)")
    strategy: str = opt("default", "tf.distribute strategy: `mirrored` uses all local GPUs, "
                        "`multi-worker` reads TF_CONFIG",
                        choices=("default", "mirrored", "multi-worker"))
    fresh: bool = opt(False, "delete the run's previous files (checkpoints, config, vocabulary, "
                       "split, history, best model, logs, heatmaps, evaluation results) and "
                       "start over")
    checkpoint_every: int = opt(0, "also checkpoint every N steps (0: only at epoch ends)",
                                check=integer(0))
    bleu_images: int = opt(500, "validation images decoded for val_bleu4 / val_cider",
                           check=integer(0))
    sample_images: int = opt(4, "fixed validation images whose captions and attention are "
                             "logged each epoch", check=integer(0))
    memory_cache_gb: float = opt(4.0, "keep the train and val features in memory when they "
                                 "fit in this many GiB (0 disables; building the table needs "
                                 "about twice that for a moment); otherwise they stream from "
                                 "disk", check=NON_NEGATIVE)
    # Self-critical sequence training (Rennie et al. 2017), after cross-entropy.
    scst_after: Optional[int] = opt(None, "epochs after this one are self-critical (CIDEr-D "
                                    "reward on sampled captions); none: cross-entropy only",
                                    check=integer(0))
    scst_samples: int = opt(5, "captions sampled per image in self-critical epochs (as "
                            "self-critical.pytorch)", check=integer(1))
    scst_baseline: str = opt("mean", "reward baseline: `mean` of the image's other samples "
                             "(\"new self-critical\") or the `greedy` caption's reward",
                             choices=("mean", "greedy"))
    scst_learning_rate: float = opt(5e-5, "Adam learning rate of the self-critical epochs (as "
                                    f"self-critical.pytorch; {MIN_LEARNING_RATE:g} to "
                                    f"{MAX_LEARNING_RATE:g})", check=LEARNING_RATE)

    def check_together(self) -> None:
        if self.monitor in ("val_bleu4", "val_cider") and self.bleu_images < 1:
            raise UserError(f"--monitor {self.monitor} decodes --bleu-images validation images "
                            f"each epoch: --bleu-images must be >= 1, got {self.bleu_images}")
        if self.scst_after is not None:
            if self.scst_after >= self.epochs:
                raise UserError(f"--scst-after {self.scst_after} leaves no self-critical epoch: "
                                f"it must be below --epochs ({self.epochs})")
            if self.scst_baseline == "mean" and self.scst_samples < 2:
                raise UserError(f"--scst-baseline mean compares each sample with the image's "
                                f"other samples: --scst-samples must be >= 2, got "
                                f"{self.scst_samples}")

    def monitor_for(self, epoch: int) -> str:
        """The early-stopping metric of 0-based `epoch`: `monitor`, else val_cider in
        self-critical epochs and val_loss before."""
        if self.monitor is not None:
            return self.monitor
        return "val_cider" if self.is_scst(epoch) else "val_loss"

    def is_scst(self, epoch: int) -> bool:
        """Whether 0-based `epoch` is self-critical."""
        return self.scst_after is not None and epoch >= self.scst_after

    @property
    def scst_after_flag(self) -> str:
        """--scst-after as it is written on the command line ("none" when never)."""
        return "none" if self.scst_after is None else str(self.scst_after)

    @property
    def cross_entropy_epochs(self) -> int:
        """The epochs the cross-entropy learning-rate schedule spans."""
        return self.epochs if self.scst_after is None else self.scst_after


def check_train_flags(tc: TrainConfig) -> None:
    """UserError for flag combinations `train` refuses (checked here, not by TrainConfig: the
    config.json of a run made before must still load for `caption` and `evaluate`). Needs no
    TensorFlow and reads nothing: the CLI makes it with the flags' other checks (it came after
    `import tensorflow` and the checks of the caption file and cache)."""
    if 0 < tc.clip_norm < MIN_CLIP_NORM:
        raise UserError(f"--clip-norm {tc.clip_norm:g}: a clip norm below {MIN_CLIP_NORM:g} "
                        f"leaves the clipped gradients under Adam's epsilon (1e-7), so the "
                        f"steps shrink toward none; give 0 (no clipping) or at least "
                        f"{MIN_CLIP_NORM:g} (0.1 to 10 are usual)")
    if tc.scst_after is None:
        ignored = [flag_name(TrainConfig.__dataclass_fields__[name]) for name in
                   ("scst_samples", "scst_baseline", "scst_learning_rate")
                   if name in tc.given(("scst_samples", "scst_baseline", "scst_learning_rate"))]
        if ignored:
            raise UserError(f"{', '.join(ignored)} set{'s' if len(ignored) == 1 else ''} the "
                            f"self-critical epochs, which only --scst-after N turns on (this "
                            f"call trains none): add --scst-after, or leave "
                            f"{'it' if len(ignored) == 1 else 'them'} out")
        return
    if tc.monitor is None and tc.bleu_images < 1:
        raise UserError(f"--scst-after {tc.scst_after}: early stopping and the best model "
                        f"follow val_cider in self-critical epochs, which decodes --bleu-images "
                        f"validation images: --bleu-images must be >= 1, got {tc.bleu_images} "
                        f"(or add --monitor val_loss)")
    if tc.scst_samples > tc.batch_size:
        # a self-critical step takes --batch-size // --scst-samples images, at least one
        raise UserError(f"--scst-samples {tc.scst_samples} is more than --batch-size "
                        f"{tc.batch_size}: a self-critical step samples --scst-samples "
                        f"captions of each of its images and takes --batch-size captions, so "
                        f"it could not hold even one image's samples (it would take "
                        f"{tc.scst_samples}); raise --batch-size to at least "
                        f"{tc.scst_samples} or lower --scst-samples")
    if tc.scst_after == 0 and tc.lr_schedule == "cosine":
        raise UserError("--lr-schedule cosine decays the learning rate of the cross-entropy "
                        "epochs, but --scst-after 0 trains none (every epoch is "
                        "self-critical, at the constant --scst-learning-rate): leave "
                        "--lr-schedule out, or give --scst-after the cross-entropy epochs")


# Beyond these, float32 overflows: ((5 + 201) / 6)^alpha passes 3.4e38 at alpha 25 (scores
# then NaN, beams dead, images without a caption), a temperature under ~1e-38 rounds to 0.
MAX_LENGTH_PENALTY = 10.0
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6


@dataclass
class DecodeConfig(Config):
    """Decoding (`caption`, `evaluate`)."""

    beam: int = opt(3, f"beam width; 1 is greedy decoding (at most {MAX_BEAM})",
                    check=beam_width)
    length_penalty: float = opt(0.0, "GNMT length penalty alpha for beam search: scores are "
                                "log p / ((5 + length) / 6)^alpha (0: plain log p; at most "
                                f"{MAX_LENGTH_PENALTY:g}, GNMT used 0.6-1)",
                                check=number(0.0, MAX_LENGTH_PENALTY))
    sample: bool = opt(False, "sample captions instead of searching (see --temperature, "
                       "--top-k); prints one sample per image")
    temperature: float = opt(1.0, "sampling temperature (with --sample; towards 0 it "
                             f"approaches greedy decoding; in [{MIN_TEMPERATURE:g}, "
                             f"{MAX_TEMPERATURE:g}])",
                             check=number(MIN_TEMPERATURE, MAX_TEMPERATURE))
    top_k: int = opt(0, "sample only among the K most likely words (0: all; with --sample)",
                     check=integer(0, 2**31 - 1))
    seed: int = opt(0, "sampling seed (with --sample); the same samples with and without "
                    "--xla and at any --batch-size", check=SEED)
    max_length: Optional[int] = opt(None, "longest caption in words, <end> included; at "
                                    f"most {MAX_CAPTION_WORDS + 1} (default: the run's "
                                    "--max-length + 1)",
                                    check=integer(1, MAX_CAPTION_WORDS + 1))
    batch_size: int = opt(64, "images decoded together; `caption` reads that many at a time "
                          f"and prints their captions before reading more (at most "
                          f"{MAX_IMAGE_BATCH})", check=integer(1, MAX_IMAGE_BATCH))
    xla: bool = opt(False, "compile the decoding loop of every batch with XLA (by default "
                    "only batches of --xla-min-images or more are)")
    xla_min_images: int = opt(32, "batches of at least this many images of a float32 model "
                              "decode in one XLA-compiled loop: about 1.2-2 s to compile "
                              "once per batch size, then ~1.0-1.8x faster by CPU and method "
                              "(README, Speed) (`evaluate`, `caption` of many images); "
                              "smaller batches, such as a one-image `caption`, and --sample "
                              "batches compile nothing. 0: never (not with --xla, which "
                              "compiles every batch)",
                              check=integer(0))

    @property
    def method(self) -> str:
        return "sample" if self.sample else "greedy" if self.beam == 1 else "beam"

    def check_together(self) -> None:
        """Flags of one decoding method given to another are refused, not ignored (given:
        on the command line, even with the default value, see `Config.given`)."""
        given = self.given(("beam", "length_penalty", "temperature", "top_k", "seed"))
        flag = {name: "--" + name.replace("_", "-") for name in given}
        if self.sample and given & {"beam", "length_penalty"}:
            name = sorted(given & {"beam", "length_penalty"})[0]
            raise UserError(f"{flag[name]} {getattr(self, name)} applies to beam search, not "
                            f"to --sample: leave one of them out")
        if not self.sample and given & {"temperature", "top_k", "seed"}:
            name = sorted(given & {"temperature", "top_k", "seed"})[0]
            raise UserError(f"{flag[name]} {getattr(self, name)} applies to sampling: add "
                            f"--sample, or leave it out")
        if self.beam == 1 and "length_penalty" in given:
            raise UserError(f"--length-penalty {self.length_penalty} ranks the hypotheses of a "
                            f"beam search: it does nothing with --beam 1 (greedy)")
        if self.xla and self.given(("xla_min_images",)):
            raise UserError(f"--xla-min-images {self.xla_min_images} chooses the batches XLA "
                            f"compiles, but --xla compiles every batch: leave one of them out")


TFLITE_QUANTIZATIONS = ("none", "float16", "dynamic")


@dataclass
class ExportConfig(Config):
    """The TFLite model and the --out folder (`export`)."""

    tflite: bool = opt(False, "also write DIR/captioner.tflite (one resized image, greedy "
                       "decoding, built-in TFLite ops) and DIR/vocab.json")
    tflite_quantize: str = opt("none", "weights of the TFLite model: `float16` halves the "
                               "file, `dynamic` stores int8 weights (about a quarter); either "
                               "is compared with the float model on the run's test images",
                               choices=TFLITE_QUANTIZATIONS)
    check_images: int = opt(100, "test-split images on which a quantized TFLite model's "
                            "greedy captions are compared with the float model's (0: no "
                            "check)", check=integer(0))
    force: bool = opt(False, "replace --out even if it is an export of another run, or an "
                             "export holding other files besides one (its assets.extra/ is "
                             "kept), or a folder of only what an export writes without its "
                             "export.json; never a folder holding other files without one, "
                             "the run, its cache or its images")

    def check_together(self) -> None:
        if self.tflite_quantize != "none" and not self.tflite:
            raise UserError(f"--tflite-quantize {self.tflite_quantize} applies to the TFLite "
                            f"model: add --tflite")
        if self.given(("check_images",)) and self.tflite_quantize == "none":
            raise UserError(f"--check-images {self.check_images} compares a quantized TFLite "
                            f"model with the float one: add --tflite --tflite-quantize "
                            f"float16|dynamic, or leave it out")


@dataclass
class DemoConfig(Config):
    """The end-to-end offline demo (`demo`), sized for a 2-core CPU (3-14 minutes by CPU
    kind: the README's Shapes results)."""

    workdir: str = opt("demo_work", "folder for everything the demo makes", check=NON_EMPTY)
    num_images: int = opt(3000, "shapes images to render (80/10/10 split); fewer images train "
                          "faster but recognise shapes worse (at least 20: every split needs "
                          f"images; at most {MAX_SHAPES_IMAGES:,})",
                          check=integer(20, MAX_SHAPES_IMAGES))
    epochs: int = opt(12, "training epochs, all of them trained (early stopping's patience "
                      "is set to --epochs; cross-entropy about 17 s each on 2 Zen 4 cores, "
                      "self-critical about 1.3-1.6x that)", check=integer(1))
    scst_after: Optional[int] = opt(10, "epochs after this one are self-critical (CIDEr-D "
                                    "reward: in a trial run 2 of them raised scene accuracy "
                                    "from 0.92 to 0.95; on a Zen 3, 10 cross-entropy "
                                    "epochs before them scored 0.970, with the earlier "
                                    "form of the loss 0.957, and 11 then 0.950); "
                                    "equal to --epochs: cross-entropy only", check=integer(0))
    embedding_dim: int = opt(128, "embedding size (smaller than the COCO default 256: the "
                             "shapes vocabulary has 25 words)", check=integer(1))
    units: int = opt(256, "GRU and attention units (COCO default 512)", check=integer(1))
    batch_size: int = opt(32, "captions per step (more steps per epoch than 64 learned "
                          "faster in the same time)", check=integer(1))
    learning_rate: float = opt(2e-3, "Adam learning rate, cosine-decayed over the "
                               "cross-entropy epochs (3e-3 sometimes got stuck); the "
                               "self-critical ones take train's --scst-learning-rate 5e-5 "
                               f"({MIN_LEARNING_RATE:g} to {MAX_LEARNING_RATE:g})",
                               check=LEARNING_RATE)
    dropout: float = opt(0.3, "output dropout", check=FRACTION)
    ema: float = opt(0.995, "train's --ema: the best model is the moving average of the "
                     "weights (on an Intel Xeon with AMX, scene accuracy with training seeds "
                     "0-4: 0.953 / 0.960 / 0.960 / 0.943 / 0.960, without it 0.947 / 0.960 / "
                     "0.940 / 0.940 / 0.960; 0: off)", check=FRACTION)
    attention_reg: float = opt(3.0, "doubly stochastic attention weight; higher than the "
                               "COCO default 1.0 because it measurably helped here (scene "
                               "accuracy 0.40 / 0.65 / 0.69 / 0.49 at 0.1 / 1 / 3 / 8, "
                               "measured in short runs before features were standardised; at most "
                               f"{MAX_ATTENTION_REG:g})", check=ATTENTION_REG)
    beam: int = opt(3, f"beam width for evaluation and captions (at most {MAX_BEAM})",
                    check=beam_width)
    show: int = opt(4, "test images captioned with heatmaps at the end", check=integer(0))
    seed: int = opt(0, "seed of the dataset, the random backbone and training",
                    check=SEED)
    fresh: bool = opt(False, "delete what an earlier demo made in --workdir (dataset, "
                      "feature cache, run, heatmaps) and start over")

    def check_together(self) -> None:
        if self.scst_after is not None and self.scst_after > self.epochs:
            raise UserError(f"--scst-after {self.scst_after} must be at most --epochs "
                            f"({self.epochs}); equal to --epochs trains cross-entropy only")
        samples = TrainConfig.scst_samples            # the demo trains with train's default
        if self.scst_after is not None and self.scst_after < self.epochs \
                and self.batch_size < samples:
            # said here in the demo's flags: train's message names --scst-samples, which the
            # demo does not have
            raise UserError(f"--batch-size {self.batch_size}: the demo's self-critical epochs "
                            f"(after --scst-after {self.scst_after}) sample {samples} captions "
                            f"of each image, and a step takes --batch-size captions: use "
                            f"--batch-size {samples} or more, or --scst-after {self.epochs} "
                            f"(cross-entropy only)")


@dataclass
class RunConfig(Config):
    """Everything a run was made with; saved as `models/<run>/config.json`."""

    captions: str = ""
    cache: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # training settings that may differ between the workers of one multi-worker run
    PER_MACHINE = ("memory_cache_gb", "fresh")

    def settings_digest(self, with_train: bool = False) -> str:
        """sha256 of the data, vocab and model settings (split.json's `settings_sha256`: a
        run keeps them for its whole life, its checkpoints were made with them); with
        `with_train`, also the training settings less `PER_MACHINE` (what every worker of a
        multi-worker run must train with). Paths are never part of it."""
        parts = {part: dataclasses.asdict(getattr(self, part))
                 for part in ("data", "vocab", "model")}
        if with_train:
            parts["train"] = {k: v for k, v in dataclasses.asdict(self.train).items()
                              if k not in self.PER_MACHINE}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return from_dict(cls, d)

    def save(self, path: str) -> None:
        """Write config.json; `train.fresh` always false there: it says what one call did to
        the run folder, not how the run was made (recorded, the next rerun's note listed
        `train.fresh: True -> False` among its changed settings)."""
        kept = dataclasses.replace(self, train=dataclasses.replace(self.train, fresh=False))
        write_json_atomic(path, kept.to_dict(), file_names=True)  # captions, cache

    @classmethod
    def load(cls, path: str) -> "RunConfig":
        return cls.from_dict(read_json(path, file_names=True))


def from_dict(cls, d: dict):
    """Build dataclass `cls` from a dict, recursing into nested dataclasses.

    Unknown keys are an error (a typo in a hand-edited config must not pass silently).
    """
    if not isinstance(d, dict):
        raise UserError(f"expected a JSON object for {cls.__name__}, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise UserError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in d.items():
        default = fields[name].default_factory if fields[name].default_factory is not \
            dataclasses.MISSING else None
        if default is not None and dataclasses.is_dataclass(default):
            value = from_dict(default, value)
        kwargs[name] = value
    return cls(**kwargs)


def config_diff(a, b, prefix: str = "") -> list[str]:
    """Human-readable differences between two dataclasses of the same type."""
    out = []
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(va):
            out += config_diff(va, vb, prefix + f.name + ".")
        elif va != vb:
            out.append(f"{prefix}{f.name}: {va!r} -> {vb!r}")
    return out


# Keras dtype policy of each --precision: float32 variables everywhere, compute in the
# named type (float16 needs loss scaling, which `train` adds).
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16",
                  "float16": "mixed_float16"}
