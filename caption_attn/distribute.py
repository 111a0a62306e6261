"""tf.distribute helpers of `train`: choosing the strategy, the chief, and checking that every
worker resumes from the same step."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
from typing import Optional

import tensorflow as tf

from caption_attn.errors import UserError


def check_strategy(name: str, environ=os.environ) -> None:
    """UserError unless `name` is a strategy and, for `multi-worker`, TF_CONFIG describes a
    cluster of more than one process and this worker's place in it. Checked before the run
    folder is touched: TF's own errors (a JSONDecodeError, a KeyError) came as tracebacks once
    --fresh had deleted the previous run, and a TF_CONFIG without a cluster silently trained
    as one worker alone."""
    if name not in ("default", "mirrored", "multi-worker"):
        raise UserError(f"--strategy must be default, mirrored or multi-worker, got {name!r}")
    if name != "multi-worker":
        _refuse_cluster_without_multi_worker(name, environ)
        return
    if "TF_CONFIG" not in environ:
        raise UserError("--strategy multi-worker needs the TF_CONFIG environment "
                        "variable (cluster and task of this worker)")
    example = ('e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}')
    try:
        config = json.loads(environ["TF_CONFIG"])
    except ValueError as e:
        raise UserError(f"--strategy multi-worker: the TF_CONFIG environment variable is not "
                        f"JSON ({e}); set it to this worker's cluster and task, {example}") \
            from None
    if not isinstance(config, dict):
        raise UserError(f"--strategy multi-worker: the TF_CONFIG environment variable is a "
                        f"JSON {type(config).__name__}, not an object; {example}")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(v, list) and v and all(isinstance(a, str) and a for a in v)
            for v in cluster.values()):
        raise UserError(f"--strategy multi-worker: TF_CONFIG has no \"cluster\" (an object "
                        f"of task types, each a list of \"host:port\" addresses), so this "
                        f"process would train alone as one worker; {example}, or use "
                        f"--strategy default on one machine")
    others = sorted(set(cluster) - {"chief", "worker"})
    if others or len(cluster.get("chief", [])) > 1:
        raise UserError(f"--strategy multi-worker: the TF_CONFIG cluster may hold one "
                        f"\"chief\" and \"worker\"s, got "
                        f"{', '.join(f'{k} x{len(v)}' for k, v in cluster.items())}")
    if sum(len(v) for v in cluster.values()) < 2:
        raise UserError(f"--strategy multi-worker: the TF_CONFIG cluster has one process, so it "
                        f"would train alone; list every worker ({example}), or use "
                        f"--strategy default on one machine")
    if not isinstance(task, dict) or not isinstance(task.get("type"), str) \
            or task["type"] not in cluster \
            or not isinstance(task.get("index"), int) or isinstance(task.get("index"), bool) \
            or not 0 <= task["index"] < len(cluster[task["type"]]):
        raise UserError(f"--strategy multi-worker: TF_CONFIG's \"task\" must name this "
                        f"process's place in the cluster ({', '.join(cluster)}), as "
                        f"{{\"type\": \"worker\", \"index\": i}} with i from 0 to the number "
                        f"of that type's addresses - 1, got {json.dumps(task)}")


def _refuse_cluster_without_multi_worker(name: str, environ) -> None:
    """UserError when TF_CONFIG describes a cluster of several processes but the strategy is
    not multi-worker: each worker (launched with the cluster's TF_CONFIG, the flag forgotten)
    would train alone and write the same run folder, every one as its chief."""
    try:
        config = json.loads(environ.get("TF_CONFIG", ""))
    except ValueError:
        return              # no cluster TensorFlow could read either
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if not isinstance(cluster, dict):
        return
    count = sum(len(v) for v in cluster.values() if isinstance(v, list))
    if count > 1:
        raise UserError(f"--strategy {name}: the TF_CONFIG environment variable describes a "
                        f"cluster of {count} processes, which only --strategy multi-worker "
                        f"uses: with {name} every worker would train alone and write the same "
                        f"run folder; add --strategy multi-worker, or unset TF_CONFIG to train "
                        f"on this machine alone")


def make_strategy(name: str, devices: Optional[list] = None) -> tf.distribute.Strategy:
    """`default` (one device), `mirrored` (all local GPUs) or `multi-worker` (TF_CONFIG)."""
    check_strategy(name)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=devices)
    with _python_signal_handlers_kept():
        return tf.distribute.MultiWorkerMirroredStrategy()


@contextlib.contextmanager
def _python_signal_handlers_kept():
    """Python's handlers of SIGTERM and SIGINT set again once the block has run: building a
    MultiWorkerMirroredStrategy starts TensorFlow's coordination service, which installs a
    SIGTERM handler of its own in C++ (a preemption notifier that logs "SIGTERM caught" and
    returns), so `kill` of a worker or the chief did nothing: it trained to its end, exit 0.
    (`signal.getsignal` still showed Python's handler, which no longer ran.) Outside the main
    thread, where Python cannot set handlers, nothing is done."""
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            if handler is not None:           # None: a handler not set from Python, left be
                signal.signal(signum, handler)


def strategy_notes(name: str, strategy: tf.distribute.Strategy, xla: bool = False) -> list[str]:
    """Notes on what the strategy makes of the flags: --strategy mirrored that found a single
    device (no GPU, or one) trains as --strategy default would, and --xla is not applied with
    more than one replica (`Steps.compile`), which the user asking for them should be told."""
    notes = []
    replicas = strategy.num_replicas_in_sync
    if name == "mirrored" and replicas == 1:
        devices = ", ".join(getattr(strategy.extended, "worker_devices", ())) or "one device"
        notes.append(f"--strategy mirrored found one device ({devices}; it uses every local "
                     f"GPU, and this machine has "
                     f"{len(tf.config.list_physical_devices('GPU'))}): training on one "
                     f"replica, as --strategy default does")
    if xla and replicas > 1:
        notes.append(f"--xla is not applied with {replicas} replicas (it compiles the step of "
                     f"one device only): the training step runs without XLA")
    return notes


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


def single_process(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process trains alone (no TF_CONFIG cluster): it can save a checkpoint
    without the other workers, whose saves are collectives."""
    return _cluster(strategy) is None


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


def check_workers_agree(strategy: tf.distribute.Strategy, step: Optional[int] = None,
                        restored: Optional[str] = None, checkpoints: str = "",
                        agree: Optional[dict] = None) -> None:
    """Multi-worker: every worker must start with the same settings and data, `agree`
    ({what: its hex digest}, e.g. "flags": `RunConfig.settings_digest(with_train=True)`,
    "vocabulary", "split", ...), and from the same `step` (None: not compared), or the
    all-reduced gradients would mix different models (a worker started with another
    --learning-rate trained on, exit 0, its weights 0.09 apart after 10 steps; one with
    another --seed fed other captions) or different data (a worker whose cache lacked a few
    train features fitted another vocabulary: one word's gradients were summed with another
    word's). Raised on every worker alike, naming what differs: each compares the spread
    over all workers, the same numbers everywhere. A collective: every worker calls it at
    the same point."""
    if _cluster(strategy) is None:
        return
    agree = dict(agree or {})
    # the step, then each digest's first 64 bits as four 16-bit numbers: float64 sums of
    # them (and of their squares) are exact, so equal values have a spread of exactly 0
    chunks = [int(digest[i:i + 4] or "0", 16) for digest in agree.values()
              for i in range(0, 16, 4)]
    value = tf.constant([float(step or 0)] + [float(c) for c in chunks],
                        tf.float64)   # (1 + 4P,)

    def spread():
        ctx = tf.distribute.get_replica_context()
        mean = ctx.all_reduce("mean", value)
        return ctx.all_reduce("sum", tf.square(value - mean)), mean
    spread_sum, mean = (first_local(strategy, x).numpy() for x in
                        tf.function(lambda: strategy.run(spread))())
    differ = [what for i, what in enumerate(agree) if spread_sum[1 + 4 * i:5 + 4 * i].any()]
    if differ:
        raise UserError(
            f"the workers were started with other settings or data: they differ in their "
            f"{', '.join(differ)} (this worker's: "
            f"{', '.join(f'{what} sha256 {agree[what][:12]}…' for what in differ)}); every "
            f"worker must run the same `caption-attn train` command (but for the paths of "
            f"--captions, --cache and --run and --memory-cache-gb) on the same caption data "
            f"and a copy of the same feature cache, the same train and val images' features "
            f"usable (each worker's notes say which images it skipped)")
    if step is not None and spread_sum[0] > 0:
        raise UserError(
            f"the workers restored different checkpoints (this worker: step {step} from "
            f"{restored or 'none'}; mean over workers {mean[0]:.1f}). Every worker must see the "
            f"chief's {checkpoints} (a shared filesystem), or each its own scratch folder from "
            f"the same run")


# TensorFlow's words for a collective op or the coordination service that lost a worker
# (only these: a collective that failed on this worker, say NCCL's error, is its own news)
_LOST_WORKER = re.compile(r"Collective ops is aborted by|Socket closed|stopped sending "
                          r"heartbeats|tasks have crashed|tasks are unhealthy|Connection refused"
                          r"|failed to connect to all addresses", re.IGNORECASE)
_TASK = re.compile(r"/job:(chief|worker)/(?:replica:\d+/)?task:(\d+)")


def other_worker_stopped(error: BaseException, environ=os.environ) -> Optional[str]:
    """The one line `train --strategy multi-worker` ends with when `error` (or an error it was
    raised from) is TensorFlow's word that a collective op lost another worker of the run:
    one stopped (Ctrl-C, SIGTERM, a crash) or can no longer be reached. The surviving worker
    printed ~100 lines and a traceback of CollectiveReduceV2 ("Socket closed" from the chief,
    "The tasks have crashed" from a worker), where rerunning every worker resumes the run;
    unless the other one failed (a damaged feature file its table met, a full disk): its own
    output says why, and a rerun fails alike until that is fixed, which the line says.
    The worker named is the one other than this process (`environ`'s TF_CONFIG) that
    TensorFlow's message names, if it names one. None for any other error, and when this
    process's own Ctrl-C or SIGTERM is in the chain (its stop is the news)."""
    kinds = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
             tf.errors.InternalError)
    chain = []
    while error is not None and all(error is not e for e in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    if any(isinstance(e, KeyboardInterrupt) for e in chain):   # this process's own stop
        return None
    for error in chain:
        text = getattr(error, "message", None) or str(error)
        if isinstance(error, kinds) and _LOST_WORKER.search(text):
            others = {(job, int(index)) for job, index in _TASK.findall(text)} - {_this_task(
                environ)}
            who = ""
            if len(others) == 1:
                job, index = others.pop()
                who = " (chief)" if job == "chief" else f" ({job} {index})"
            return (f"another worker of this multi-worker run stopped{who}: if it failed, "
                    f"its own output says why (fix that first); then rerun the same command "
                    f"on every worker to resume from the last checkpoint")
    return None


def _this_task(environ) -> Optional[tuple]:
    """(task type, index) of this process in TF_CONFIG, or None."""
    try:
        task = json.loads(environ.get("TF_CONFIG", ""))["task"]
        return task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError):
        return None
