"""The optimizer of `train`: Adam through TensorFlow's fused kernel, and the learning rate of
each training stage (cross-entropy, then self-critical)."""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from caption_attn.config import TrainConfig


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

    def _update_model_variables_moving_average(self, trainable_variables):
        """`--ema`'s average with the momentum `min(ema_momentum, (1 + t) / (10 + t))` at step
        t (the first step's weights at t = 0), as `tf.train.ExponentialMovingAverage` with
        `num_updates`: Keras' fixed momentum kept the starting weights in the average for
        thousands of steps (0.995^76 = 68 % of them after a reduced demo's 76 steps, whose
        best model then captioned at BLEU-4 0.00); this one averages about the last t / 9
        steps until that reaches the momentum's own window (200 steps at 0.995)."""
        if not self.use_ema:
            return
        t = tf.cast(self.iterations, tf.float32)
        momentum = tf.where(t > 0, tf.minimum(tf.constant(self.ema_momentum, tf.float32),
                                              (1.0 + t) / (10.0 + t)), 0.0)
        for variable, average in zip(trainable_variables,
                                     self._model_variables_moving_average):
            if average is None:   # Keras' none for a variable that takes its gradient as is
                continue
            m = tf.cast(momentum, average.dtype)
            average.assign(m * average + (1.0 - m) * tf.cast(variable, average.dtype))


class StagedLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """`--learning-rate` (constant, or cosine-decayed over the cross-entropy steps) while
    `self_critical` is 0, `--scst-learning-rate` while it is 1. The trainer sets the flag at
    the start of every epoch, so a resumed run gets the rate of its stage; nothing of the
    schedule is checkpointed, so changed rates apply on resume.

    The cosine's position is the optimizer's step plus `shift`, which the trainer sets at
    every epoch's start to make it `epoch x steps per epoch` there (`at_epoch`): the decay
    goes on from the fraction of training done, in epochs. 0 when the epochs kept their
    steps (the same rates as an uninterrupted run); after a change of steps per epoch
    (another --batch-size, other data) the steps already taken, counted in the old epochs,
    stood elsewhere on the new curve: up to past its end, at a learning rate of 0."""

    def __init__(self, cfg: TrainConfig, cross_entropy_steps: int):
        self.xe_rate = cfg.learning_rate
        self.cosine = keras.optimizers.schedules.CosineDecay(
            cfg.learning_rate, max(1, cross_entropy_steps)) \
            if cfg.lr_schedule == "cosine" else None
        self.scst_rate = cfg.scst_learning_rate
        self.self_critical = tf.Variable(0, dtype=tf.int32, trainable=False,
                                         name="self_critical_stage")
        self.shift = tf.Variable(0, dtype=tf.int64, trainable=False, name="schedule_shift")

    def at_epoch(self, epoch: int, steps_per_epoch: int, first: int) -> None:
        """Place 0-based `epoch`, whose first step is the optimizer's step `first`, at
        `epoch * steps_per_epoch` of the cosine (see the class docstring)."""
        self.shift.assign(epoch * steps_per_epoch - first)

    def __call__(self, step):
        xe = self.cosine(tf.cast(step, tf.int64) + self.shift) if self.cosine is not None \
            else tf.constant(self.xe_rate)
        return tf.where(self.self_critical > 0, tf.constant(self.scst_rate, xe.dtype), xe)

    def get_config(self):
        return {"learning_rate": self.xe_rate, "scst_learning_rate": self.scst_rate}


def make_optimizer(cfg: TrainConfig, learning_rate: StagedLearningRate):
    """FusedAdam on `learning_rate`, keeping Keras' moving average of the weights when `--ema`
    is set (the averages are slots of the optimizer: checkpoints with and without them do not
    restore into each other); float16 precision adds Keras' loss scaling."""
    optimizer = FusedAdam(learning_rate, use_ema=cfg.ema > 0, ema_momentum=cfg.ema or 0.99)
    if cfg.precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def inner(optimizer):
    """The Adam inside a `LossScaleOptimizer` (or the optimizer itself)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


class AveragedWeights:
    """The weights `--ema` averages, swapped into the model while a block runs
    (`with averaged():`), so that validation, the best model and the sample heatmaps see the
    average, and the trained weights put back after it, so that checkpoints and the next steps
    hold each where it belongs (as `keras.callbacks.SwapEMAWeights` does for `fit`). A block
    inside another changes nothing; without `--ema` no block does.

    A swap is one `tf.function` call, which also flips `swapped`: no Python runs between two
    variables' assignments, where a Ctrl-C could leave some weights swapped and others not,
    and `put(False)` puts the trained weights back whatever stopped a block (the trainer
    calls it before every checkpoint).
    """

    def __init__(self, optimizer):
        adam = inner(optimizer)   # built: its averages pair with the variables it was built on
        averages = adam._model_variables_moving_average if adam.use_ema else []
        self.pairs = [(v, a) for v, a in zip(adam._trainable_variables, averages)
                      if a is not None]
        self.swapped = tf.Variable(False, trainable=False, name="averaged_weights_in")
        self._swap = tf.function(self._swap_all, autograph=False) if self.pairs else None

    def _swap_all(self):
        for variable, average in self.pairs:
            trained = tf.identity(variable.value)
            variable.assign(average.value)
            average.assign(trained)
        self.swapped.assign(tf.logical_not(self.swapped))

    def put(self, averaged: bool) -> None:
        """The averaged weights in the model (True) or the trained ones (False)."""
        if self._swap is not None and bool(self.swapped.numpy()) != averaged:
            self._swap()

    @contextlib.contextmanager
    def __call__(self):
        if self._swap is None or bool(self.swapped.numpy()):
            yield
            return
        try:
            self.put(True)
            yield
        finally:
            self.put(False)
