"""The training loop: `@tf.function` steps over bucketed tf.data batches, exact resume.

Run folder (`models/<run>/`):
    config.json      resolved RunConfig           vocab.json    vocabulary (train split only)
    split.json       image keys of train/val/test history.json  one entry per epoch
    checkpoints/     tf.train.CheckpointManager (model, optimizer, epoch, step, RNG states)
    best.keras       best model so far (Keras format) + best.json (its epoch and metric)
    logs/train, logs/validation   TensorBoard      attention/epoch_K/*.png   heatmaps
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from caption_attn import data as data_lib
from caption_attn import feature_cache, images, pipeline
from caption_attn.backbone import FEATURE_SHAPE, IMAGE_SIZE
from caption_attn.callbacks import AttentionSnapshots, EarlyStopping, TensorBoardLogger
from caption_attn.config import DTYPE_POLICIES, FEATURE_DTYPES, DecodeConfig, RunConfig, \
    config_diff
from caption_attn.fileio import atomic_path, read_json, write_json_atomic
from caption_attn.errors import UserError
from caption_attn.model import ShowAttendTell, masked_loss
from caption_attn.vocab import Vocabulary, tokenize_all

RUN_FILES = ("config.json", "vocab.json", "split.json", "history.json", "best.keras",
             "best.json")
RUN_DIRS = ("checkpoints", "logs", "attention")


@keras.saving.register_keras_serializable(package="caption_attn")
class FusedAdam(keras.optimizers.Adam):
    """Keras Adam whose per-variable update is TensorFlow's fused `ResourceApplyAdam` kernel.

    The same rule as `keras.optimizers.Adam` (m, v, then var -= lr_t m / (sqrt(v) + eps) with
    lr_t = lr sqrt(1 - b2^t) / (1 - b1^t)), in one pass over the variable and its two slots
    instead of eleven elementwise ops: 15 -> 6 ms per step for the 5 M weights of the
    benchmark model on 2 CPU cores. Slots and checkpoints are Keras Adam's own.
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not hasattr(variable, "handle"):
            return super().update_step(gradient, variable, learning_rate)
        dt = variable.dtype
        step = tf.cast(self.iterations + 1, dt)
        index = self._get_variable_index(variable)

        def constant(x):
            return tf.cast(x, dt)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=tf.pow(constant(self.beta_1), step),
            beta2_power=tf.pow(constant(self.beta_2), step), lr=constant(learning_rate),
            beta1=constant(self.beta_1), beta2=constant(self.beta_2),
            epsilon=constant(self.epsilon), grad=constant(tf.convert_to_tensor(gradient)))


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss became NaN); exit code 1."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


# ----------------------------------------------------------------------------- run folder
def open_run(run_dir: str, cfg: RunConfig, fresh: bool = False) -> list[str]:
    """Create or reopen a run folder; returns notes for the user.

    A run made with another data, vocabulary or model configuration is refused (resuming it
    would mix two models); `fresh` deletes the previous run's files first.
    """
    path = os.path.join(run_dir, "config.json")
    notes = []
    if fresh:
        for name in RUN_FILES:
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))
        for name in RUN_DIRS:
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    elif os.path.exists(path):
        saved = RunConfig.load(path)
        fixed = []
        for part in ("data", "vocab", "model"):
            fixed += config_diff(getattr(saved, part), getattr(cfg, part), part + ".")
        if fixed:
            raise UserError(
                f"{run_dir} was trained with a different configuration:\n  "
                + "\n  ".join(fixed)
                + "\nrerun with the same flags to resume, use another --run, or add --fresh "
                  "to start this run over")
        changed = config_diff(saved.train, cfg.train, "train.")
        changed = [c for c in changed if not c.startswith("train.fresh")]
        if changed:
            notes.append("resuming with changed training settings: " + "; ".join(changed))
        for name in ("captions", "cache"):
            if os.path.abspath(getattr(saved, name)) != os.path.abspath(getattr(cfg, name)):
                notes.append(f"--{name} differs from the run's first invocation "
                             f"({getattr(saved, name)})")
    os.makedirs(run_dir, exist_ok=True)
    cfg.save(path)
    return notes


# ----------------------------------------------------------------------------- data
@dataclasses.dataclass
class TrainData:
    vocab: Vocabulary
    splits: dict                  # split -> image keys (all of them, as saved in split.json)
    items: dict                   # split -> (feature paths, token id lists), one per caption
    references: dict              # split -> {image key: [raw captions]}
    feature_paths: dict           # image key -> .npy path (images with valid features only)
    reader: pipeline.NpyReader
    manifest: dict
    skipped_captions: int         # captions whose image has no features
    skipped_images: int


def _check_manifest(cache: str) -> dict:
    manifest = feature_cache.read_manifest(cache)
    shape = list(manifest.get("feature_shape", []))
    if shape != list(FEATURE_SHAPE):
        raise UserError(f"{cache}/manifest.json: feature_shape {shape}, expected "
                        f"{list(FEATURE_SHAPE)}")
    if manifest.get("dtype") not in FEATURE_DTYPES:
        raise UserError(f"{cache}/manifest.json: dtype {manifest.get('dtype')!r}, expected "
                        f"one of {FEATURE_DTYPES}")
    return manifest


def load_train_data(cfg: RunConfig, run_dir: str) -> TrainData:
    """Captions, split, vocabulary and feature files of a run (reused from the run folder
    when resuming, so the split and vocabulary never change under a run)."""
    manifest = _check_manifest(cfg.cache)
    reader = pipeline.NpyReader.from_manifest(manifest)
    captions = data_lib.load_dataset(cfg.captions, cfg.data)
    split_path = os.path.join(run_dir, "split.json")
    if os.path.exists(split_path):
        splits = read_json(split_path)["splits"]
    else:
        splits = {s: sorted(r.image for r in captions.split(s)) for s in data_lib.SPLITS}
    records = {r.image: r for r in captions.records}
    paths, skipped_images, skipped_captions = {}, 0, 0
    for key in (k for keys in splits.values() for k in keys):
        path = feature_cache.feature_path(cfg.cache, key)
        if key in records and reader.has_file(path):
            paths[key] = path
        elif key in records:
            skipped_images += 1
            skipped_captions += len(records[key].captions)
    words = {k: tokenize_all(records[k].captions) for k in paths}  # for vocabulary and ids
    vocab_path = os.path.join(run_dir, "vocab.json")
    if os.path.exists(vocab_path):
        vocab = Vocabulary.load(vocab_path)
    else:
        vocab = Vocabulary.fit_words((w for k in splits["train"] if k in paths
                                      for w in words[k]),
                                     cfg.vocab.vocab_size, cfg.vocab.min_count)
    items, references = {}, {}
    for split, keys in splits.items():
        keys = [k for k in keys if k in paths]
        pairs = [(paths[k], vocab.encode_words(w, cfg.vocab.max_length))
                 for k in keys for w in words[k]]
        items[split] = ([p for p, _ in pairs], [t for _, t in pairs])
        references[split] = {k: records[k].captions for k in keys}
    if not items["train"][0]:
        raise UserError(f"no training captions have features in {cfg.cache}; run "
                        f"`caption-attn extract-features` for {cfg.captions} first")
    if not items["val"][0]:
        raise UserError(
            f"the val split of {cfg.captions} has no images with features in {cfg.cache} "
            f"({len(splits['val'])} val images); validation drives early stopping and the "
            f"best model. Give the caption file val images, raise --val-fraction (for files "
            f"without splits), or extract their features")
    # Split and vocabulary are fixed for the life of the run from here on.
    if not os.path.exists(split_path):
        write_json_atomic(split_path, {"captions": os.path.abspath(cfg.captions),
                                       "format": captions.format, "splits": splits})
    if not os.path.exists(vocab_path):
        vocab.save(vocab_path)
    return TrainData(vocab, splits, items, references, paths, reader, manifest,
                     skipped_captions, skipped_images)


# ----------------------------------------------------------------------------- strategy
def make_strategy(name: str, devices: Optional[list] = None) -> tf.distribute.Strategy:
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi-worker":
        if "TF_CONFIG" not in os.environ:
            raise UserError("--strategy multi-worker needs the TF_CONFIG environment "
                            "variable (cluster and task of this worker)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise UserError(f"--strategy must be default, mirrored or multi-worker, got {name!r}")


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Builds model, optimizer, datasets and steps for one run folder and trains it."""

    def __init__(self, cfg: RunConfig, run_dir: str, images_dir: Optional[str] = None,
                 strategy: Optional[tf.distribute.Strategy] = None, progress: bool = True,
                 log=print):
        self.cfg, self.run_dir, self.progress, self.log = cfg, run_dir, progress, log
        tc = cfg.train
        if tc.precision == "float16" and not tf.config.list_physical_devices("GPU"):
            log("note: --precision float16 is meant for GPUs; on a CPU it is slow, prefer "
                "bfloat16")
        self.strategy = strategy or make_strategy(tc.strategy)
        self.chief = _is_chief(self.strategy)
        self.data = load_train_data(cfg, run_dir)
        self.images_dir = images_dir or self.data.manifest.get("images_dir")
        keras.utils.set_random_seed(cfg.data.seed)
        self.boundaries = pipeline.bucket_boundaries(cfg.vocab.max_length + 2)
        train_lengths = [len(t) for t in self.data.items["train"][1]]
        self.steps_per_epoch = pipeline.count_batches(train_lengths, tc.batch_size,
                                                      self.boundaries)
        self.total_steps = tc.epochs * self.steps_per_epoch
        if tc.max_steps:
            self.total_steps = min(self.total_steps, tc.max_steps)
        self._build_state()
        self._table = self._maybe_table()

    # -- model, optimizer, checkpoint -----------------------------------------------
    def _build_state(self) -> None:
        tc, mc = self.cfg.train, self.cfg.model
        with self.strategy.scope():
            policy = keras.DTypePolicy(DTYPE_POLICIES[tc.precision])
            self.model = ShowAttendTell(len(self.data.vocab), mc.embedding_dim, mc.units,
                                        mc.dropout, dtype=policy, name="show_attend_tell")
            lr = tc.learning_rate
            if tc.lr_schedule == "cosine":
                lr = keras.optimizers.schedules.CosineDecay(lr, max(1, self.total_steps))
            self.optimizer = FusedAdam(lr)
            if tc.precision == "float16":
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.model.trainable_variables)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
            self.epoch_sums = tf.Variable(tf.zeros([4], tf.float64), trainable=False)
        rng = [v.value for v in self.model.non_trainable_variables
               if "seed_generator" in v.path]
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, epoch=self.epoch, step=self.step,
            step_in_epoch=self.step_in_epoch, epoch_sums=self.epoch_sums, rng=rng)
        ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        if not self.chief:  # other workers write to a scratch folder (TF's convention)
            ckpt_dir = os.path.join(ckpt_dir, f"worker_{self.strategy.cluster_resolver.task_id}")
        self.manager = tf.train.CheckpointManager(self.checkpoint, ckpt_dir, max_to_keep=3)
        if mc.feature_norm and not self._latest_checkpoint():  # else: restored
            train_paths = {self.data.feature_paths[k] for k in self.data.splits["train"]
                           if k in self.data.feature_paths}
            self.model.feature_norm.set_statistics(*pipeline.feature_statistics(
                self.data.reader, train_paths, seed=self.cfg.data.seed))

    def _maybe_table(self) -> Optional[pipeline.FeatureTable]:
        gb = self.cfg.train.memory_cache_gb
        d = self.data
        paths = sorted({d.feature_paths[k] for split in ("train", "val")  # never the test split
                        for k in d.splits[split] if k in d.feature_paths})
        if gb <= 0 or len(paths) * d.reader.num_bytes > gb * 2**30:
            return None
        return pipeline.FeatureTable(d.reader, paths)

    def _latest_checkpoint(self) -> Optional[str]:
        """What every worker restores: the chief's latest checkpoint (readable by all workers
        on a shared filesystem), else this worker's own (its scratch folder)."""
        chief = tf.train.latest_checkpoint(os.path.join(self.run_dir, "checkpoints"))
        return chief or self.manager.latest_checkpoint

    def restore(self) -> bool:
        latest = self._latest_checkpoint()
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
        self._check_workers_agree(latest)
        if not latest:
            return False
        if self.cfg.train.lr_schedule == "constant":  # a changed --learning-rate applies
            self._inner_optimizer().learning_rate.assign(self.cfg.train.learning_rate)
        return True

    def _check_workers_agree(self, latest: Optional[str]) -> None:
        """Multi-worker: every worker must start from the same step, or the all-reduced
        gradients would mix different models. Raised on every worker alike."""
        resolver = getattr(self.strategy, "cluster_resolver", None)
        if resolver is None or not resolver.cluster_spec().as_dict():
            return
        step = tf.constant(float(self.step.numpy()))

        def spread():
            ctx = tf.distribute.get_replica_context()
            mean = ctx.all_reduce("mean", step)
            return ctx.all_reduce("sum", tf.square(step - mean)), mean
        spread_sum, mean = (float(self._first(x)) for x in
                            tf.function(lambda: self.strategy.run(spread))())
        if spread_sum > 0:
            raise UserError(
                f"the workers restored different checkpoints (this worker: step "
                f"{int(step.numpy())} from {latest or 'none'}; mean over workers {mean:.1f}). "
                f"Every worker must see the chief's {self.run_dir}/checkpoints (a shared "
                f"filesystem), or each its own scratch folder from the same run")

    def _inner_optimizer(self):
        return getattr(self.optimizer, "inner_optimizer", self.optimizer)

    # -- datasets ---------------------------------------------------------------------
    def dataset(self, split: str, epoch: Optional[int] = None, skip: int = 0):
        """Distributed batches of one epoch; every replica gets its slice of each global
        batch (`pipeline.caption_dataset`), so any replica count sees the same data."""
        paths, tokens = self.data.items[split]
        seed = None if epoch is None else hash_seed(self.cfg.data.seed, epoch)
        replicas = self.strategy.num_replicas_in_sync

        def make(ctx: tf.distribute.InputContext):
            local = replicas // ctx.num_input_pipelines
            first = ctx.input_pipeline_id * local
            return pipeline.caption_dataset(
                paths, tokens, self.cfg.train.batch_size, self.boundaries, self.data.reader,
                self._table, shuffle_seed=seed, skip_batches=skip, num_replicas=replicas,
                replica_ids=list(range(first, first + local)), pad_images=self.cfg.train.xla)
        return self.strategy.distribute_datasets_from_function(make)

    # -- steps ------------------------------------------------------------------------
    def _losses(self, features, image_index, tokens, training: bool):
        """Per-replica loss whose sum over replicas is the global mean objective."""
        ctx = tf.distribute.get_replica_context()
        inputs, targets = tokens[:, :-1], tokens[:, 1:]               # (B, T) each
        tokens_global = ctx.all_reduce("sum", tf.reduce_sum(
            tf.cast(targets != 0, tf.float32)))
        captions_global = ctx.all_reduce("sum", tf.cast(tf.shape(tokens)[0], tf.float32))
        logits, alphas = self.model((features, image_index, inputs),
                                    training=training)                # (B,T,V), (B,T,P)
        ce_sum, _, reg_sum = masked_loss(logits, targets, alphas,
                                         self.cfg.model.attention_reg)
        ce = ce_sum / tf.maximum(tokens_global, 1.0)
        reg = reg_sum / tf.maximum(captions_global, 1.0)
        return ce + reg, ce, captions_global

    def _train_replica(self, features, image_index, tokens):
        ctx = tf.distribute.get_replica_context()
        with tf.GradientTape() as tape:
            loss, ce, n = self._losses(features, image_index, tokens, training=True)
            scaled = self.optimizer.scale_loss(loss)
        variables = self.model.trainable_variables
        # Embedding gradients arrive as IndexedSlices; dense (V x E) keeps the math simple.
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(scaled, variables)]
        grads = ctx.all_reduce("sum", grads)                          # global gradient
        scale = getattr(self.optimizer, "dynamic_scale", None)
        unscale = 1.0 if scale is None else tf.cast(scale, tf.float32)
        norm = tf.linalg.global_norm(grads) / unscale
        clip = self.cfg.train.clip_norm
        if clip > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip * unscale, use_norm=norm * unscale)
        # The optimizer sums gradients over replicas once more: hand it 1/R of the total.
        grads = [g / ctx.num_replicas_in_sync for g in grads]
        self.optimizer.apply_gradients(zip(grads, variables))
        return loss, ce, norm, n

    def _eval_replica(self, features, image_index, tokens):
        loss, ce, n = self._losses(features, image_index, tokens, training=False)
        return loss, ce, n

    def _compile(self, element_spec):
        jit = self.cfg.train.xla
        reduce = self._reduce

        def train_step(batch):
            out = self.strategy.run(self._train_replica, args=batch)
            loss, ce, norm, n = out
            return reduce(loss), reduce(ce), self._first(norm), self._first(n)

        def eval_step(batch):
            loss, ce, n = self.strategy.run(self._eval_replica, args=batch)
            return reduce(loss), reduce(ce), self._first(n)

        self.train_step = tf.function(train_step, input_signature=[element_spec],
                                      jit_compile=jit and self.strategy.num_replicas_in_sync
                                      == 1, reduce_retracing=True)
        self.eval_step = tf.function(eval_step, input_signature=[element_spec],
                                     reduce_retracing=True)

    def _reduce(self, value):
        return self.strategy.reduce("sum", value, axis=None)

    def _first(self, value):
        return self.strategy.experimental_local_results(value)[0]

    # -- epochs -----------------------------------------------------------------------
    def _run_train_epoch(self, epoch: int, callbacks) -> dict:
        # Counters live in Python during the epoch (no eager op per step) and are copied into
        # the checkpointed variables before every save (`_save_checkpoint`).
        step, in_epoch = int(self.step.numpy()), int(self.step_in_epoch.numpy())
        sums = self.epoch_sums.numpy() if in_epoch else np.zeros(4)  # loss*n, ce*n, norm, n
        ds = self.dataset("train", epoch=epoch, skip=in_epoch)
        # verbose 2 (one line per epoch) when the output is a log file, not a terminal
        verbose = 0 if not self.progress else 1 if sys.stdout.isatty() else 2
        bar = keras.utils.Progbar(self.steps_per_epoch, stateful_metrics=["loss", "cap/s"],
                                  verbose=verbose)
        if in_epoch:
            bar.update(in_epoch)
        loss_scaling = hasattr(self.optimizer, "dynamic_scale")
        earlier = sums[3]  # captions trained before a restart in this epoch: not in the speed
        start = time.perf_counter()
        for batch in ds:
            loss, ce, norm, n = (float(x) for x in self.train_step(batch))
            if not math.isfinite(loss) or not (math.isfinite(norm) or loss_scaling):
                raise TrainingError(
                    f"the loss became {loss} at epoch {epoch + 1}, step {step + 1}; training "
                    f"stopped. The last good checkpoint is kept in {self.manager.directory}. "
                    f"Try a lower --learning-rate, --clip-norm 5, or --precision float32.")
            step, in_epoch = step + 1, in_epoch + 1
            # float16 loss scaling skips steps whose gradients overflowed: not counted in the
            # mean gradient norm
            sums += (loss * n, ce * n, norm if math.isfinite(norm) else 0.0, n)
            seconds = time.perf_counter() - start
            bar.update(in_epoch, [("loss", sums[0] / sums[3]),
                                  ("cap/s", (sums[3] - earlier) / max(seconds, 1e-9))])
            callbacks.on_train_batch_end(step, {"loss": loss, "gradient_norm": norm,
                                                "global_step": step})
            every = self.cfg.train.checkpoint_every
            if every and step % every == 0:
                self._save_checkpoint(step, in_epoch, sums)
            if self.cfg.train.max_steps and step >= self.cfg.train.max_steps:
                break
        self._set_counters(step, in_epoch, sums)
        return {"loss": sums[0] / max(sums[3], 1), "ce": sums[1] / max(sums[3], 1),
                "gradient_norm": sums[2] / max(in_epoch, 1),
                "captions_per_second": (sums[3] - earlier) / max(time.perf_counter() - start,
                                                                 1e-9),
                "steps": in_epoch}

    def _set_counters(self, step: int, in_epoch: int, sums) -> None:
        self.step.assign(step)
        self.step_in_epoch.assign(in_epoch)
        self.epoch_sums.assign(np.asarray(sums, np.float64))

    def _save_checkpoint(self, step: int, in_epoch: int, sums) -> None:
        # Every worker saves (a collective under multi-worker); non-chiefs into scratch folders.
        self._set_counters(step, in_epoch, sums)
        self.manager.save(checkpoint_number=step)

    def evaluate_loss(self, split: str = "val") -> Optional[dict]:
        if not self.data.items[split][0]:
            return None
        total = np.zeros(3)
        for batch in self.dataset(split):
            loss, ce, n = (float(x) for x in self.eval_step(batch))
            total += (loss * n, ce * n, n)
        return {"loss": total[0] / total[2], "ce": total[1] / total[2]}

    # -- decoding for BLEU and samples ---------------------------------------------------
    def greedy_captions(self, keys: list[str]) -> dict:
        """key -> (words, attention (len(words), P)) by batched greedy decoding."""
        from caption_attn.captioner import make_decoder, to_captions

        if not hasattr(self, "_greedy"):
            self._greedy = make_decoder(self.model, DecodeConfig(beam=1),
                                        self.cfg.vocab.max_length + 1)
        paths = [self.data.feature_paths[k] for k in keys]
        out = {}
        for start, feats in enumerate(pipeline.image_dataset(paths, 128, self.data.reader)):
            result = self._greedy(tf.cast(feats, tf.float32))
            for key, captions in zip(keys[start * 128:], to_captions(result, self.data.vocab)):
                best = captions[0]
                out[key] = (best.words, best.attention[:max(len(best.words), 1)])
        return out

    def bleu4(self, split: str = "val") -> Optional[float]:
        from caption_attn.coco_metrics import corpus_bleu4

        refs = self.data.references[split]
        keys = sorted(refs)[:self.cfg.train.bleu_images]
        if not keys:
            return None
        hyps = {k: " ".join(words) for k, (words, _) in self.greedy_captions(keys).items()}
        return corpus_bleu4({k: refs[k] for k in keys}, hyps)

    def _samples(self):
        """Callable epoch -> sample list, decoded once per epoch and shared by callbacks."""
        keys = sorted(self.data.references["val"])[:self.cfg.train.sample_images]
        cache = {}

        def samples(epoch):
            if not keys:
                return []
            if epoch not in cache:
                cache.clear()
                cache[epoch] = self._render_samples(keys)
            return cache[epoch]
        return samples

    def _render_samples(self, keys):
        from caption_attn import plot

        out = []
        for key, (words, attention) in self.greedy_captions(keys).items():
            image = self._image(key)
            caption = " ".join(words)
            shown = words or ["<end>"]
            fig = plot.attention_figure(image, shown, attention[:len(shown)],
                                        title=f"{key}: {caption}")
            out.append({"image": key, "caption": caption, "png": plot.figure_to_png(fig)})
        return out

    def _image(self, key: str) -> np.ndarray:
        if self.images_dir:
            try:
                return images.load_image(os.path.join(self.images_dir, key))
            except images.ImageError:
                pass
        return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)

    # -- best model ---------------------------------------------------------------------
    def _save_best(self, epoch: int, value: float) -> None:
        if not self.chief:
            return
        with atomic_path(os.path.join(self.run_dir, "best.keras"), ".keras") as tmp:
            self.model.save(tmp)
        write_json_atomic(os.path.join(self.run_dir, "best.json"),
                          {"epoch": epoch + 1, "monitor": self.cfg.train.monitor_for(epoch),
                           "value": value})

    def _restore_best(self) -> None:
        path = os.path.join(self.run_dir, "best.keras")
        if os.path.exists(path):
            best = keras.saving.load_model(path, compile=False)
            self.model.set_weights(best.get_weights())

    # -- main -------------------------------------------------------------------------
    def fit(self) -> dict:
        tc = self.cfg.train
        resumed = self.restore()
        history_path = os.path.join(self.run_dir, "history.json")
        history = read_json(history_path) if os.path.exists(history_path) and resumed else []
        done = int(self.epoch.numpy())
        history = [h for h in history if h["epoch"] <= done]
        self._compile(self.dataset("train", epoch=0).element_spec)
        early = EarlyStopping(tc.monitor_for(done), patience=tc.patience, min_delta=tc.min_delta,
                              initial_history=history, save_best=self._save_best,
                              restore_best=self._restore_best)
        samples = self._samples()
        cbs = [early]
        if self.chief:
            cbs += [TensorBoardLogger(os.path.join(self.run_dir, "logs"), self._hparams(),
                                      samples),
                    AttentionSnapshots(os.path.join(self.run_dir, "attention"), samples)]
        callbacks = keras.callbacks.CallbackList(cbs, model=self.model)
        self._describe(resumed, done)
        self.model.stop_training = False
        callbacks.on_train_begin()
        self._repair_best(early, done)
        stop_reason = "epochs"
        start = time.perf_counter()
        epoch = done
        while epoch < tc.epochs and not self.model.stop_training:
            if tc.max_steps and int(self.step.numpy()) >= tc.max_steps:
                stop_reason = "max_steps"
                break
            if self.progress:
                self.log(f"Epoch {epoch + 1}/{tc.epochs}")
            callbacks.on_epoch_begin(epoch)
            t0 = time.perf_counter()
            logs = self._run_train_epoch(epoch, callbacks)
            logs.update(self._validate())
            logs["learning_rate"] = float(self._lr())
            logs["seconds"] = time.perf_counter() - t0
            finished = logs["steps"] == self.steps_per_epoch
            if finished:
                self.epoch.assign(epoch + 1)
                self.step_in_epoch.assign(0)
            entry = {"epoch": epoch + 1, **{k: _plain(v) for k, v in logs.items()}}
            history.append(entry)
            if self.chief:  # history first: a kill before the checkpoint redoes the epoch
                write_json_atomic(history_path, history)
            self.manager.save(checkpoint_number=int(self.step.numpy()))
            callbacks.on_epoch_end(epoch, entry)
            if self.progress:
                self.log(_epoch_line(entry))
            if not finished:
                stop_reason = "max_steps"
                break
            epoch += 1
        if self.model.stop_training:
            stop_reason = "early_stopping"
        callbacks.on_train_end()
        return self._summary(history, early, stop_reason, time.perf_counter() - start)

    def _validate(self) -> dict:
        logs = {}
        val = self.evaluate_loss("val")
        if val is not None:
            logs["val_loss"], logs["val_ce"] = val["loss"], val["ce"]
        if self.cfg.train.monitor_for(int(self.epoch.numpy())) == "val_bleu4":
            logs["val_bleu4"] = self.bleu4("val")
        return logs

    def _repair_best(self, early: EarlyStopping, done: int) -> None:
        """If the process died between the checkpoint and saving the best model, the best
        epoch is the restored one: save it now."""
        if early.best_epoch is None or early.best_epoch + 1 != done:
            return
        best_path = os.path.join(self.run_dir, "best.json")
        saved = read_json(best_path).get("epoch") if os.path.exists(best_path) else None
        if saved != done:
            self._save_best(early.best_epoch, early.best)

    def _lr(self):
        lr = self._inner_optimizer().learning_rate
        return lr.numpy() if hasattr(lr, "numpy") else lr

    def _hparams(self) -> dict:
        tc, mc = self.cfg.train, self.cfg.model
        return {"embedding_dim": mc.embedding_dim, "units": mc.units, "dropout": mc.dropout,
                "attention_reg": mc.attention_reg, "vocab_size": len(self.data.vocab),
                "batch_size": tc.batch_size, "learning_rate": tc.learning_rate,
                "lr_schedule": tc.lr_schedule, "clip_norm": tc.clip_norm,
                "precision": tc.precision, "seed": self.cfg.data.seed}

    def _describe(self, resumed: bool, done: int) -> None:
        d = self.data
        n_train = len(d.items["train"][0])
        self.log(f"{'resuming after epoch ' + str(done) if resumed else 'training'}: "
                 f"{n_train} train captions ({len(d.references['train'])} images), "
                 f"{len(d.items['val'][0])} val captions, vocabulary {len(d.vocab)}, "
                 f"{self.steps_per_epoch} steps/epoch, "
                 f"{self.strategy.num_replicas_in_sync} replica(s), features "
                 f"{'in memory' if self._table is not None else 'streamed from disk'}")
        if d.skipped_captions:
            self.log(f"skipped {d.skipped_captions} captions of {d.skipped_images} images "
                     f"without features in {self.cfg.cache}")

    def _summary(self, history, early, reason, seconds) -> dict:
        last = history[-1] if history else {}
        return {"run": self.run_dir, "epochs": len(history), "steps": int(self.step.numpy()),
                "stopped_by": reason, "monitor": early.monitor,
                "best_epoch": None if early.best_epoch is None else early.best_epoch + 1,
                "best_value": None if early.best_epoch is None else float(early.best),
                "final_loss": last.get("loss"), "final_val_loss": last.get("val_loss"),
                "seconds": seconds, "skipped_captions": self.data.skipped_captions,
                "best_model": os.path.join(self.run_dir, "best.keras")}


def hash_seed(seed: int, epoch: int) -> int:
    """Shuffle seed of one epoch: a resumed run replays exactly the same order."""
    return (seed * 1_000_003 + epoch) % (2**31 - 1)


def _plain(value):
    return float(value) if isinstance(value, (np.floating, float)) else value


def _epoch_line(entry: dict) -> str:
    parts = [f"{k}={entry[k]:.4f}" for k in ("loss", "val_loss", "val_bleu4")
             if entry.get(k) is not None]
    return (f"epoch {entry['epoch']}: " + " ".join(parts)
            + f" ({entry['captions_per_second']:.0f} captions/s, {entry['seconds']:.1f} s)")


def train(cfg: RunConfig, run_dir: str, images_dir: Optional[str] = None,
          progress: bool = True, log=print) -> dict:
    """Train (or resume) the run in `run_dir`; returns a summary dict."""
    for note in open_run(run_dir, cfg, fresh=cfg.train.fresh):
        log("note: " + note)
    trainer = Trainer(cfg, run_dir, images_dir=images_dir, progress=progress, log=log)
    return trainer.fit()


def format_summary(summary: dict) -> str:
    best = ("" if summary["best_epoch"] is None else
            f", best {summary['monitor']}={summary['best_value']:.4f} at epoch "
            f"{summary['best_epoch']}")
    return (f"trained {summary['epochs']} epochs ({summary['steps']} steps) in "
            f"{summary['seconds']:.0f} s, stopped by {summary['stopped_by']}{best}\n"
            f"best model: {summary['best_model']}\n"
            f"TensorBoard: tensorboard --logdir {os.path.join(summary['run'], 'logs')}")
