"""Every default of the project, in one place, with the reason beside it.

Each dataclass field becomes one CLI flag (`--field-name`) through `cli.add_config_args`; the
`help` metadata is the flag's help text. A run saves its resolved configuration as
`config.json` (see `RunConfig`), so a run folder always says how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from caption_attn.errors import UserError
from caption_attn.fileio import read_json, write_json_atomic


def opt(default: Any, help: str, choices: Optional[tuple] = None, flag: Optional[str] = None):
    """A dataclass field carrying its CLI help (and optional choices / flag name)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if flag is not None:
        meta["flag"] = flag
    return field(default=default, metadata=meta)


CAPTION_FORMATS = ("auto", "coco", "karpathy", "flickr-token", "flickr-csv")
# The float types of the project, each list defined once: how cached features are stored, and
# the compute precisions of the backbone and of training.
FEATURE_DTYPES = ("float32", "float16")
BACKBONE_PRECISIONS = ("float32", "bfloat16")
TRAIN_PRECISIONS = ("float32", "bfloat16", "float16")


@dataclass
class DataConfig:
    """Where the captions come from and how images are split."""

    format: str = opt("auto", "caption file format; `auto` detects it from the content",
                      choices=CAPTION_FORMATS)
    val_fraction: float = opt(0.05, "fraction of images held out for validation when the "
                              "file has no split of its own (Karpathy files do)")
    test_fraction: float = opt(0.05, "fraction of images held out for testing when the file "
                               "has no split of its own")
    seed: int = opt(0, "seed of the split by image and, in `train`, of weight init, "
                    "shuffling and dropout")


@dataclass
class VocabConfig:
    """Vocabulary fit on the train split only (never on val/test: no leakage)."""

    vocab_size: int = opt(5000, "keep the K most frequent words (ties broken alphabetically); "
                          "special tokens come on top of these")
    min_count: int = opt(1, "drop words seen fewer than N times in the train split")
    max_length: int = opt(40, "captions longer than N words are truncated (COCO's p99.9 is "
                          "about 30 words)")


@dataclass
class ShapesConfig:
    """The built-in synthetic dataset (`make-shapes`)."""

    num_images: int = opt(1000, "number of images to render")
    seed: int = opt(0, "same seed gives byte-identical images and captions")
    image_size: int = opt(299, "side of the square images in pixels (InceptionV3's input "
                          "size, so extraction does not resample them)")
    val_fraction: float = opt(0.1, "fraction of images in the val split")
    test_fraction: float = opt(0.1, "fraction of images in the test split")


@dataclass
class ExtractConfig:
    """The offline InceptionV3 pass (`extract-features`)."""

    cache: str = opt("features_cache", "folder of the feature cache")
    weights: str = opt("imagenet", "backbone weights: `imagenet` (Keras download), `random` "
                       "(seeded, offline; saved into the cache) or a path to a weights file")
    seed: int = opt(0, "seed of `--weights random`")
    dtype: str = opt("float32", "dtype of the cached .npy files; float16 halves the cache",
                     choices=FEATURE_DTYPES)
    precision: str = opt("float32", "compute precision of the backbone; bfloat16 is mixed "
                         "precision (fast on CPUs with AVX512-BF16/AMX and on GPUs)",
                         choices=BACKBONE_PRECISIONS)
    batch_size: int = opt(32, "images per backbone call")
    num_shards: int = opt(1, "split the images into N disjoint shards (one per machine)")
    shard_index: int = opt(0, "which shard this process extracts (0-based)")
    verify: bool = opt(False, "fully check every cached file (header, shape, dtype, finite) "
                       "and re-extract the bad ones")
    strict: bool = opt(False, "exit non-zero if any image failed")
    workers: int = opt(0, "image decoding threads (0: one per CPU core)")


@dataclass
class ModelConfig:
    """Show, Attend and Tell decoder sizes. Changing any of these breaks resume."""

    embedding_dim: int = opt(256, "word embedding and projected feature size (TF tutorial)")
    units: int = opt(512, "GRU units and attention size (TF tutorial)")
    dropout: float = opt(0.5, "dropout before the output layer (Show, Attend and Tell)")
    attention_reg: float = opt(1.0, "weight of the doubly stochastic attention regulariser "
                               "mean_i (1 - sum_t alpha_ti)^2 over the 64 positions (Show, "
                               "Attend and Tell eq. 14; averaged as in sgrvinod's tutorial)")
    feature_norm: bool = opt(True, "standardise each feature channel with its mean and "
                             "variance over (up to 1,000) training images before the "
                             "encoder; off: raw features")


@dataclass
class TrainConfig:
    """The training loop (`train`)."""

    epochs: int = opt(20, "maximum number of epochs")
    batch_size: int = opt(64, "captions per step (global batch over all replicas)")
    learning_rate: float = opt(1e-3, "Adam learning rate")
    lr_schedule: str = opt("constant", "learning-rate schedule over all steps",
                           choices=("constant", "cosine"))
    clip_norm: float = opt(5.0, "clip gradients by this global norm (0 disables)")
    monitor: str = opt("val_loss", "metric for early stopping and the best model; val_bleu4 "
                       "decodes the validation images each epoch (loss and BLEU stop agreeing "
                       "late in training)", choices=("val_loss", "val_bleu4"))
    patience: int = opt(3, "epochs without improvement before stopping")
    min_delta: float = opt(0.0, "smallest change of the monitored metric that counts as "
                           "improvement")
    max_steps: Optional[int] = opt(None, "stop after this many training steps in total "
                                   "(for quick trials)")
    precision: str = opt("float32", "compute precision: bfloat16 (CPU/GPU) or float16 with "
                         "loss scaling (GPU)", choices=TRAIN_PRECISIONS)
    xla: bool = opt(False, "compile the training step with XLA (jit_compile)")
    strategy: str = opt("default", "tf.distribute strategy: `mirrored` uses all local GPUs, "
                        "`multi-worker` reads TF_CONFIG",
                        choices=("default", "mirrored", "multi-worker"))
    fresh: bool = opt(False, "delete the run's previous files (checkpoints, config, vocabulary, "
                       "split, history, best model, logs) and start over")
    checkpoint_every: int = opt(0, "also checkpoint every N steps (0: only at epoch ends)")
    bleu_images: int = opt(500, "validation images decoded for val_bleu4")
    sample_images: int = opt(4, "fixed validation images whose captions and attention are "
                             "logged each epoch")
    memory_cache_gb: float = opt(4.0, "keep the train and val features in memory when they "
                                 "fit in this many GiB (0 disables; building the table needs "
                                 "about twice that for a moment); otherwise they stream from "
                                 "disk")


@dataclass
class DecodeConfig:
    """Decoding (`caption`, `evaluate`)."""

    beam: int = opt(3, "beam width; 1 is greedy decoding")
    length_penalty: float = opt(0.0, "GNMT length penalty alpha for beam search: scores are "
                                "log p / ((5 + length) / 6)^alpha (0: plain log p)")
    sample: bool = opt(False, "sample captions instead of searching (see --temperature, "
                       "--top-k); prints one sample per image")
    temperature: float = opt(1.0, "sampling temperature (with --sample)")
    top_k: int = opt(0, "sample only among the K most likely words (0: all; with --sample)")
    seed: int = opt(0, "sampling seed (with --sample)")
    max_length: Optional[int] = opt(None, "longest caption in words, <end> included "
                                    "(default: the run's --max-length + 1)")
    batch_size: int = opt(64, "images decoded together")
    xla: bool = opt(False, "compile the decoding loop with XLA: about 1.4 s more per batch "
                    "size, then faster per batch (worth it for `evaluate` on many images)")

    @property
    def method(self) -> str:
        return "sample" if self.sample else "greedy" if self.beam == 1 else "beam"


@dataclass
class DemoConfig:
    """The end-to-end offline demo (`demo`); sized for a 2-core CPU and 10 minutes."""

    workdir: str = opt("demo_work", "folder for everything the demo makes")
    num_images: int = opt(3000, "shapes images to render (80/10/10 split); fewer images train "
                          "faster but recognise shapes worse")
    epochs: int = opt(12, "training epochs (about 22 s each on 2 cores)")
    embedding_dim: int = opt(128, "embedding size (smaller than the COCO default 256: the "
                             "shapes vocabulary has 25 words)")
    units: int = opt(256, "GRU and attention units (COCO default 512)")
    batch_size: int = opt(32, "captions per step (more steps per epoch than 64 learned "
                          "faster in the same time)")
    learning_rate: float = opt(2e-3, "Adam learning rate, cosine-decayed over the run (3e-3 "
                               "sometimes got stuck)")
    dropout: float = opt(0.3, "output dropout")
    attention_reg: float = opt(3.0, "doubly stochastic attention weight; higher than the "
                               "COCO default 1.0 because it measurably helped here (scene "
                               "accuracy 0.40 / 0.65 / 0.69 / 0.49 at 0.1 / 1 / 3 / 8, "
                               "measured in short runs before features were standardised)")
    beam: int = opt(3, "beam width for evaluation and captions")
    show: int = opt(4, "test images captioned with heatmaps at the end")
    seed: int = opt(0, "seed of the dataset, the random backbone and training")
    fresh: bool = opt(False, "delete what an earlier demo made in --workdir (dataset, "
                      "feature cache, run, heatmaps) and start over")


@dataclass
class RunConfig:
    """Everything a run was made with; saved as `models/<run>/config.json`."""

    captions: str = ""
    cache: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return from_dict(cls, d)

    def save(self, path: str) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str) -> "RunConfig":
        return cls.from_dict(read_json(path))


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
