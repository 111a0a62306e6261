"""tf.distribute helpers of `train`: choosing the strategy, the chief, and checking that every
worker resumes from the same step."""

from __future__ import annotations

import os
from typing import Optional

import tensorflow as tf

from caption_attn.errors import UserError


def make_strategy(name: str, devices: Optional[list] = None) -> tf.distribute.Strategy:
    """`default` (one device), `mirrored` (all local GPUs) or `multi-worker` (TF_CONFIG)."""
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


def _cluster(strategy: tf.distribute.Strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver if resolver is not None and resolver.cluster_spec().as_dict() else None


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run folder (the chief, or worker 0 without a chief)."""
    resolver = _cluster(strategy)
    if resolver is None:
        return True
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def task_id(strategy: tf.distribute.Strategy) -> int:
    resolver = _cluster(strategy)
    return 0 if resolver is None else int(resolver.task_id)


def distribute_dataset(strategy: tf.distribute.Strategy, make):
    """`strategy.distribute_datasets_from_function` of `make(replicas, replica_ids)`, which
    returns the batches of this input pipeline's replicas (R replicas in all; the ids of the
    ones fed by this pipeline)."""
    replicas = strategy.num_replicas_in_sync

    def dataset(ctx: tf.distribute.InputContext):
        local = replicas // ctx.num_input_pipelines
        first = ctx.input_pipeline_id * local
        return make(replicas, list(range(first, first + local)))
    return strategy.distribute_datasets_from_function(dataset)


def first_local(strategy: tf.distribute.Strategy, value):
    """The value of this process's first replica."""
    return strategy.experimental_local_results(value)[0]


def check_workers_agree(strategy: tf.distribute.Strategy, step: int, restored: Optional[str],
                        checkpoints: str) -> None:
    """Multi-worker: every worker must start from the same step, or the all-reduced gradients
    would mix different models. Raised on every worker alike."""
    if _cluster(strategy) is None:
        return
    value = tf.constant(float(step))

    def spread():
        ctx = tf.distribute.get_replica_context()
        mean = ctx.all_reduce("mean", value)
        return ctx.all_reduce("sum", tf.square(value - mean)), mean
    spread_sum, mean = (float(first_local(strategy, x)) for x in
                        tf.function(lambda: strategy.run(spread))())
    if spread_sum > 0:
        raise UserError(
            f"the workers restored different checkpoints (this worker: step {step} from "
            f"{restored or 'none'}; mean over workers {mean:.1f}). Every worker must see the "
            f"chief's {checkpoints} (a shared filesystem), or each its own scratch folder from "
            f"the same run")
