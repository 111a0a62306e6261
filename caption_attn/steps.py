"""The compiled steps of `train` and what they add up to over an epoch.

`Steps` holds one cross-entropy training step, its evaluation twin and one self-critical
step, each a `tf.function` that runs on every replica of a distribution strategy and returns
a dict of numbers; `EpochTotals` sums those dicts over an epoch by name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import tensorflow as tf

from caption_attn import distribute
from caption_attn.config import RunConfig

# Per-replica shares of these are added up over replicas; every other output is already
# global (all-reduced inside the step) and taken from the first replica.
SUMMED = ("loss", "ce", "reward", "baseline", "advantage", "advantage_sq", "entropy", "tokens",
          "ce_sum", "reg_sum", "caption_count")


@dataclasses.dataclass
class EpochTotals:
    """Running sums over the steps of one epoch, by name; checkpointed as one vector (so an
    epoch resumed mid-way continues them). `loss` and `ce` are summed times the step's
    captions; the self-critical fields are sums over sampled captions (tokens for entropy);
    `steps` counts the steps whose gradients were applied (the mean gradient norm's count)."""

    FIELDS = ("loss", "ce", "gradient_norm", "captions", "steps", "reward", "baseline",
              "advantage", "advantage_sq", "entropy", "tokens")
    sums: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(EpochTotals.FIELDS,
                                                                         0.0))

    @classmethod
    def from_vector(cls, vector) -> "EpochTotals":
        return cls(dict(zip(cls.FIELDS, (float(x) for x in vector))))

    def vector(self) -> np.ndarray:
        return np.array([self.sums[f] for f in self.FIELDS], np.float64)

    def add(self, step: dict) -> None:
        n = step["captions"]
        self.sums["loss"] += step["loss"] * n
        self.sums["ce"] += step.get("ce", 0.0) * n
        # float16 loss scaling skips steps whose gradients overflowed: not in the mean norm,
        # neither in its sum nor in its count (`steps`: the steps whose gradients were applied;
        # they were counted, and one skip in ten logged a mean norm 10 % low)
        if math.isfinite(step["gradient_norm"]):
            self.sums["gradient_norm"] += step["gradient_norm"]
            self.sums["steps"] += 1
        for name in ("captions", "reward", "baseline", "advantage", "advantage_sq", "entropy",
                     "tokens"):
            self.sums[name] += step.get(name, 0.0)

    def logs(self, self_critical: bool) -> dict:
        """Epoch means for history.json and TensorBoard."""
        s, n = self.sums, max(self.sums["captions"], 1.0)
        out = {"loss": s["loss"] / n, "gradient_norm": s["gradient_norm"] / max(s["steps"], 1)}
        if not self_critical:
            return {**out, "ce": s["ce"] / n}
        mean_advantage = s["advantage"] / n
        return {**out, "reward": s["reward"] / n, "baseline": s["baseline"] / n,
                "advantage_std": math.sqrt(max(s["advantage_sq"] / n - mean_advantage ** 2, 0.0)),
                "entropy": s["entropy"] / max(s["tokens"], 1.0)}


class Steps:
    """The steps of one model, optimizer and strategy (see the module docstring).

    `scst` is called to get the `SelfCritical` objective the first time a self-critical step
    is compiled.
    """

    def __init__(self, model, optimizer, strategy: tf.distribute.Strategy, cfg: RunConfig,
                 scst: Callable):
        self.model, self.optimizer, self.strategy, self.cfg = model, optimizer, strategy, cfg
        self._scst_factory = scst
        self.train_step = self.eval_step = self.scst_step = None
        self._jit = False   # the train step is XLA-compiled (set by `compile`)

    def _apply(self, tape: tf.GradientTape, scaled_loss) -> tf.Tensor:
        """All-reduce the gradients, clip them by their global norm, apply them; returns the
        (unscaled) global norm."""
        ctx = tf.distribute.get_replica_context()
        variables = self.model.trainable_variables
        # Embedding gradients arrive as IndexedSlices; dense (V x E) keeps the math simple.
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(scaled_loss, variables)]
        grads = ctx.all_reduce("sum", grads)                          # global gradient
        scale = getattr(self.optimizer, "dynamic_scale", None)
        unscale = 1.0 if scale is None else tf.cast(scale, tf.float32)
        norm = tf.linalg.global_norm(grads) / unscale
        clip = self.cfg.train.clip_norm
        if clip > 0:
            # Within the clip norm the factor is 1: the gradients as they are, without a pass
            # over all 5 M of them (a NaN norm still takes the clipping branch).
            grads = tf.cond(
                norm <= clip, lambda: grads,
                lambda: tf.clip_by_global_norm(grads, clip * unscale, use_norm=norm * unscale)[0])
        # The optimizer sums gradients over replicas once more: hand it 1/R of the total.
        if ctx.num_replicas_in_sync > 1:
            grads = [g / ctx.num_replicas_in_sync for g in grads]
        self.optimizer.apply_gradients(zip(grads, variables))
        return norm

    def _cross_entropy(self, features, image_index, tokens, training: bool):
        """Teacher-forced objective of one replica's captions, whose sum over replicas is the
        global mean: (loss, ce, captions of the global batch)."""
        ctx = tf.distribute.get_replica_context()
        inputs, targets = tokens[:, :-1], tokens[:, 1:]               # (B, T) each
        tokens_global = ctx.all_reduce("sum", tf.reduce_sum(tf.cast(targets != 0, tf.float32)))
        captions_global = ctx.all_reduce("sum", tf.cast(tf.shape(tokens)[0], tf.float32))
        ce_sum, _, reg_sum = self.model.teacher_forced_loss(
            features, image_index, inputs, targets, training, self.cfg.model.attention_reg,
            real_tokens_only=not (training and self._jit))           # XLA: static shapes
        ce = ce_sum / tf.maximum(tokens_global, 1.0)
        return ce + reg_sum / tf.maximum(captions_global, 1.0), ce, captions_global

    def _train_replica(self, features, image_index, tokens):
        with tf.GradientTape() as tape:
            loss, ce, n = self._cross_entropy(features, image_index, tokens, training=True)
            scaled = self.optimizer.scale_loss(loss)
        return {"loss": loss, "ce": ce, "gradient_norm": self._apply(tape, scaled),
                "captions": n}

    def _eval_replica(self, features, image_index, tokens):
        """Sums over one replica's captions; the split's loss is their ratio (`evaluate_loss`)."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]               # (B, T) each
        ce_sum, tokens_sum, reg_sum = self.model.teacher_forced_loss(
            features, image_index, inputs, targets, False, self.cfg.model.attention_reg)
        return {"ce_sum": ce_sum, "tokens": tokens_sum, "reg_sum": reg_sum,
                "caption_count": tf.cast(tf.shape(tokens)[0], tf.float32)}

    def _scst_replica(self, features, image_ids, seed):
        ctx = tf.distribute.get_replica_context()
        scored = self.scst.score(features, image_ids, seed)           # no gradient
        with tf.GradientTape() as tape:
            loss_sum, tokens, entropy = self.scst.loss(features, scored)
            loss = loss_sum / tf.maximum(ctx.all_reduce("sum", tokens), 1.0)
            scaled = self.optimizer.scale_loss(loss)
        norm = self._apply(tape, scaled)
        a = scored.advantage                                          # (N, K)
        return {"loss": loss, "gradient_norm": norm,
                "captions": ctx.all_reduce("sum", tf.cast(tf.size(a), tf.float32)),
                "reward": tf.reduce_sum(scored.rewards),
                "baseline": tf.reduce_sum(scored.baseline), "advantage": tf.reduce_sum(a),
                "advantage_sq": tf.reduce_sum(tf.square(a)), "entropy": entropy,
                "tokens": tokens}

    def _distributed(self, replica_fn):
        """strategy.run of `replica_fn`, its outputs reduced as `SUMMED` says."""
        def run(*args):
            out = self.strategy.run(replica_fn, args=args)
            return {k: self.strategy.reduce("sum", v, axis=None) if k in SUMMED
                    else distribute.first_local(self.strategy, v) for k, v in out.items()}
        return run

    def compile(self, element_spec) -> None:
        """The cross-entropy train and eval steps, traced once for every bucket shape."""
        jit = self._jit = self.cfg.train.xla and self.strategy.num_replicas_in_sync == 1
        self.train_step = tf.function(
            lambda batch: self._distributed(self._train_replica)(*batch),
            input_signature=[element_spec], jit_compile=jit, reduce_retracing=True,
            autograph=False)
        self.eval_step = tf.function(
            lambda batch: self._distributed(self._eval_replica)(*batch),
            input_signature=[element_spec], reduce_retracing=True, autograph=False)

    def compile_scst(self, element_spec) -> None:
        """The self-critical step (not XLA: the reward is numpy, through tf.numpy_function);
        it takes (batch, seed) with the sampling seed of the step."""
        self.scst = self._scst_factory()
        self.scst_step = tf.function(
            lambda batch, seed: self._distributed(self._scst_replica)(*batch, seed),
            input_signature=[element_spec, tf.TensorSpec([], tf.int64)],
            reduce_retracing=True, autograph=False)
