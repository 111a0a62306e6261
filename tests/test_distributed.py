"""Distributed training in subprocesses: two replicas give one device's losses; multi-worker
training resumes every worker from the chief's checkpoint."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest

from train_subprocess import ENV, read_history, train_cmd


SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from caption_attn import train
    from caption_attn.config import DataConfig, ModelConfig, RunConfig, TrainConfig, VocabConfig
    captions, cache, root = sys.argv[1:4]
    out = {}
    two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    for name, strategy, ema in (("one", tf.distribute.get_strategy(), 0.0), ("two", two, 0.0),
                                ("one_ema", tf.distribute.get_strategy(), 0.9),
                                ("two_ema", two, 0.9)):
        cfg = RunConfig(captions=captions, cache=cache, data=DataConfig(seed=3),
                        vocab=VocabConfig(max_length=20),
                        model=ModelConfig(embedding_dim=32, units=64, dropout=0.0),
                        train=TrainConfig(epochs=2, batch_size=15, learning_rate=0.01,
                                          sample_images=0, ema=ema))
        run = f"{root}/{name}"
        train.open_run(run, cfg)
        trainer = train.Trainer(cfg, run, strategy=strategy, progress=False, log=lambda *a: 0)
        trainer.fit()
        out[name] = {"replicas": strategy.num_replicas_in_sync,
                     "history": json.load(open(f"{run}/history.json"))}
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_two_replicas_give_the_same_losses_as_one_device(shapes_data, tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, shapes_data["captions"],
                           shapes_data["cache"], str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["one"]["replicas"] == 1 and out["two"]["replicas"] == 2
    assert out["one_ema"]["replicas"] == 1 and out["two_ema"]["replicas"] == 2
    for one, two in (("one", "two"), ("one_ema", "two_ema")):
        for a, b in zip(out[one]["history"], out[two]["history"]):
            assert abs(a["loss"] - b["loss"]) < 1e-4
            assert abs(a["val_loss"] - b["val_loss"]) < 1e-4
            assert abs(a["gradient_norm"] - b["gradient_norm"]) < 1e-3
    # --ema: the same steps, validated with the average (--ema's val_loss the mirrored
    # replicas' average too, above)
    for a, b in zip(out["one"]["history"], out["one_ema"]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["val_loss"] != pytest.approx(b["val_loss"], rel=1e-5)


DROPOUT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from caption_attn.model import ReplicaDropout
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        layer = ReplicaDropout(0.5, seed=1)
    masks = []
    for _ in range(3):   # three steps: a new mask each, per replica
        out = strategy.run(tf.function(lambda: layer(tf.ones([4, 64]), training=True)))
        masks += [[r.numpy().tolist() for r in strategy.experimental_local_results(out)]]
    one = ReplicaDropout(0.5, seed=1)(tf.ones([4, 64]), training=True)
    keras_one = keras.layers.Dropout(0.5, seed=1)(tf.ones([4, 64]), training=True)
    print(json.dumps({"masks": masks, "one_is_keras": bool(np.array_equal(one, keras_one))}))
""")


def test_each_replica_draws_its_own_dropout_mask():
    """Keras' Dropout under --strategy mirrored: its seed generator's state is one mirrored
    variable, so every replica drew the same mask (row i of each replica's slice dropped the
    same units: two replicas trained differently from one device with dropout > 0). One
    device keeps Keras' own masks."""
    done = subprocess.run([sys.executable, "-c", DROPOUT], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    masks = [m for step in out["masks"] for m in step]   # replica 0, 1 of step 1, 2, 3
    # all different: per replica, per step, and replica 1's not replica 0's of a later step
    # (the replica id added to the seed, which advances by 1 a step, shifted one sequence)
    assert len({json.dumps(m) for m in masks}) == 6
    for mask in masks:
        assert {v for row in mask for v in row} <= {0.0, 2.0}   # kept units scaled by 2
    assert out["one_is_keras"]


def _free_ports(n):
    import socket
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _multi_worker(shapes_data, run, epochs, flags=((), ())):
    """Two `train --strategy multi-worker` processes on localhost (worker i with the extra
    `flags[i]`); their (code, output)."""
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        env = {**ENV, "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                               "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            train_cmd(shapes_data, run, epochs) + ["--strategy", "multi-worker",
                                                   *flags[index]], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout=600), p.stdout.read()) for p in procs]


@pytest.mark.slow
def test_multi_worker_resume_restores_every_worker_from_the_chief(shapes_data, tmp_path):
    """(With --ema: each worker validates with the moving average, restored with the rest of
    the chief's checkpoint: both workers print the same epoch-2 loss and val_loss.)"""
    import shutil
    run = str(tmp_path / "run")
    ema = ["--ema", "0.9"]
    # --memory-cache-gb may differ between the workers (each machine's own)
    for code, out in _multi_worker(shapes_data, run, epochs=1,
                                   flags=(ema, ema + ["--memory-cache-gb", "0"])):
        assert code == 0, out
    assert [h["epoch"] for h in read_history(run)] == [1]
    # the second worker lost its scratch checkpoints (a new machine): it must restore the
    # chief's, not start from scratch and mix a fresh model into the chief's gradients
    shutil.rmtree(os.path.join(run, "checkpoints", "worker_1"))
    results = _multi_worker(shapes_data, run, epochs=2, flags=(ema, ema))
    for code, out in results:
        assert code == 0, out
        assert "resuming after epoch 1" in out
    lines = [[line for line in out.splitlines() if line.startswith("epoch 2:")]
             for _, out in results]
    assert lines[0] and lines[0][0].split("(")[0] == lines[1][0].split("(")[0]  # same loss
    history = read_history(run)
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["loss"] < history[0]["loss"]

    # workers that restore different steps are refused, each with the same message
    for name in os.listdir(os.path.join(run, "checkpoints")):
        if name.startswith("ckpt-") or name == "checkpoint":
            os.remove(os.path.join(run, "checkpoints", name))
    # (with its history and best model kept, a run without checkpoints is refused before
    # that: test_faults.py::test_resume_of_a_trained_run_without_checkpoints_is_refused)
    for name in ("history.json", "best.keras", "best.weights.h5", "best.json"):
        os.remove(os.path.join(run, name))
    for code, out in _multi_worker(shapes_data, run, epochs=3, flags=(ema, ema)):
        assert code == 2 and "the workers restored different checkpoints" in out, out


@pytest.mark.slow
def test_multi_worker_workers_started_with_other_settings_are_refused(shapes_data, tmp_path):
    """A worker started with another --learning-rate (or --seed: other captions in its
    slices) trained on with exit 0, its weights 0.09 apart from the chief's after 10 steps,
    every gradient a sum over two models. Both are refused alike, before a step (that a path
    or --memory-cache-gb may differ: the test above)."""
    run = str(tmp_path / "run")
    for code, out in _multi_worker(shapes_data, run, epochs=1,
                                   flags=(["--learning-rate", "0.01"],
                                          ["--learning-rate", "0.001"])):
        assert code == 2, out
        assert "the workers were started with other settings" in out, out
    # refused before any of them wrote the run folder (the odd worker's config.json got the
    # matching rerun refused as a changed configuration)
    assert not os.path.exists(run) or os.listdir(run) in ([], [".train.lock"]), os.listdir(run)


SIGTERM_AFTER_STRATEGY = textwrap.dedent("""
    import json, os, signal, sys
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"chief": [sys.argv[1]]},
                                          "task": {"type": "chief", "index": 0}})
    from caption_attn import cli, distribute
    from caption_attn.quiet import import_tensorflow
    signal.signal(signal.SIGTERM, cli._terminated)     # as `cli.entry` sets it
    import_tensorflow(meet_dtypes=False)
    distribute.check_strategy = lambda name: None      # one process: enough to build it
    distribute.make_strategy("multi-worker")
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):        # the handler runs at the main thread's next bytecodes
            sum(range(1000))
        print("SIGTERM went unnoticed")
    except cli.Terminated:
        print("terminated")
""")


def test_sigterm_stops_multi_worker_training_as_the_others():
    """TensorFlow's coordination service, set up by MultiWorkerMirroredStrategy, installs
    its own SIGTERM handler (a preemption notifier that logs "SIGTERM caught" and returns):
    `kill` of a multi-worker worker or chief did nothing, and it trained to its end, exit 0
    (the README: SIGTERM stops training, exit 143). Python's handler is put back."""
    port, = _free_ports(1)
    done = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_STRATEGY, f"localhost:{port}"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "terminated", done.stdout + done.stderr


# what the surviving process of a two-process run got when the other was stopped (TF 2.21)
WORKER_SAW = (  # the chief stopped: the worker's pending all-reduce lost its socket
    "{{function_node __inference_<lambda>_3534}} Collective ops is aborted by: Socket closed\n"
    "Additional GRPC error information from remote target /job:chief/replica:0/task:0 while "
    "calling /tensorflow.WorkerService/RecvBuf:\n:UNKNOWN:Error received from peer  "
    "{grpc_status:14, grpc_message:\"Socket closed\"}\nThe error could be from a previous "
    "operation. Restart your program to reset.\n\t [[{{node CollectiveReduceV2}}]] "
    "[Op:__inference_<lambda>_3534]")
CHIEF_SAW = (   # the worker stopped: the coordination service missed its heartbeats
    "{{function_node __inference_<lambda>_4409}} Collective ops is aborted by: Error reported "
    "from /job:worker/task:0: The following tasks are unhealthy (stopped sending heartbeats):"
    "\n/job:worker/replica:0/task:0\nThe tasks have crashed. Check the task logs for an "
    "earlier error, or scheduler events (e.g. preemption, eviction) to debug further.\nThe "
    "error could be from a previous operation. Restart your program to reset.\n\t "
    "[[{{node CollectiveReduceV2}}]] [Op:__inference_<lambda>_4409]")
TWO = {"chief": ["localhost:1"], "worker": ["localhost:2"]}


def _tf_config(task_type, cluster=TWO):
    return {"TF_CONFIG": json.dumps({"cluster": cluster,
                                     "task": {"type": task_type, "index": 0}})}


def test_another_workers_stop_is_recognised_and_named():
    import tensorflow as tf
    from caption_attn.distribute import other_worker_stopped
    rerun = "rerun the same command on every worker to resume from the last checkpoint"
    said = other_worker_stopped(tf.errors.UnavailableError(None, None, WORKER_SAW),
                                _tf_config("worker"))
    assert said and "another worker of this multi-worker run stopped" in said
    assert "(chief)" in said and said.endswith(rerun) and "\n" not in said
    # one that failed (a damaged feature file, a full disk) says why in its own output: the
    # rerun alone would fail alike
    assert "if it failed, its own output says why (fix that first)" in said
    said = other_worker_stopped(tf.errors.UnavailableError(None, None, CHIEF_SAW),
                                _tf_config("chief"))
    assert said and "(worker 0)" in said and said.endswith(rerun)
    for cls in (tf.errors.AbortedError, tf.errors.CancelledError, tf.errors.InternalError):
        assert other_worker_stopped(cls(None, None, CHIEF_SAW), _tf_config("chief"))
    # the task named cannot be told (one of several, or only this one's): none is named
    three = {"chief": ["a:1"], "worker": ["b:1", "c:1"]}
    said = other_worker_stopped(tf.errors.UnavailableError(
        None, None, WORKER_SAW.replace("task:0 while", "task:0, /job:worker/task:1 while")),
        _tf_config("worker", three))
    assert said and "stopped:" in said and "(" not in said.split(":")[0]
    # wrapped in another error (raised while handling it): still recognised
    try:
        try:
            raise tf.errors.UnavailableError(None, None, WORKER_SAW)
        except tf.errors.UnavailableError as e:
            raise RuntimeError("saving the checkpoint failed") from e
    except RuntimeError as e:
        assert other_worker_stopped(e, _tf_config("worker"))
    # errors that are not about the collectives or other workers stay as they were
    for error in (tf.errors.UnavailableError(None, None, "gs://bucket/x: connection reset"),
                  tf.errors.InternalError(None, None, "Failed to allocate memory"),
                  tf.errors.InvalidArgumentError(None, None, WORKER_SAW),
                  RuntimeError("Collective ops is aborted by: Socket closed"),
                  # a collective that failed on this worker: its own error, not a lost worker
                  tf.errors.InternalError(None, None, "NCCL error in CollectiveReduceV2: "
                                                      "unhandled cuda error"),
                  tf.errors.UnavailableError(None, None, "coordination service agent: "
                                                         "not connected yet")):
        assert other_worker_stopped(error, _tf_config("worker")) is None, error
    # this process's own Ctrl-C or SIGTERM whose clean-up met a cancelled collective: the
    # stop is the news (exit 130 / 143), not another worker
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise tf.errors.CancelledError(None, None, WORKER_SAW)
    except tf.errors.CancelledError as e:
        assert other_worker_stopped(e, _tf_config("worker")) is None


@pytest.mark.parametrize("strategy, said", [("multi-worker", True), ("default", False)])
def test_train_says_another_workers_stop_in_one_line(monkeypatch, capsys, tmp_path,
                                                     strategy, said):
    """The surviving worker of a multi-worker run whose other worker was stopped (Ctrl-C,
    SIGTERM, a crash) printed ~100 lines and a TensorFlow traceback of CollectiveReduceV2;
    it says which worker stopped and what to do, exit 1. Not for other strategies."""
    import tensorflow as tf
    from caption_attn import cli, train
    monkeypatch.setenv("TF_CONFIG", _tf_config("worker")["TF_CONFIG"])

    def stopped(*args, **kwargs):
        raise tf.errors.UnavailableError(None, None, WORKER_SAW)
    monkeypatch.setattr(train, "train", stopped)
    monkeypatch.setattr(cli, "check_input_paths", lambda args: None)   # (none is read)
    args = ["train", "--captions", str(tmp_path / "c.json"), "--cache", str(tmp_path / "c"),
            "--run", str(tmp_path / "run"), "--strategy", strategy]
    if not said:
        with pytest.raises(tf.errors.UnavailableError):
            cli.main(args)
        return
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["caption-attn train: error: another worker of this multi-worker run "
                   "stopped (chief): if it failed, its own output says why (fix that first); "
                   "then rerun the same command on every worker to resume from the last "
                   "checkpoint"], err


def _small(shapes_data, cache=None, **train):
    from caption_attn.config import DataConfig, ModelConfig, RunConfig, TrainConfig, VocabConfig
    return RunConfig(captions=shapes_data["captions"], cache=cache or shapes_data["cache"],
                     data=DataConfig(seed=1), vocab=VocabConfig(max_length=20),
                     model=ModelConfig(embedding_dim=32, units=64),
                     train=TrainConfig(epochs=1, batch_size=16, sample_images=0, **train))


def _cache_without_a_train_feature(shapes_data, tmp_path):
    """A copy of the shapes cache without the feature file of one train image (a machine whose
    copy lost it, or whose extraction skipped it)."""
    import shutil
    from caption_attn import train
    data = train.load_train_data(_small(shapes_data), str(tmp_path / "probe"), reuse=False)
    path = data.feature_paths[sorted(data.caption_ids["train"])[0]]
    cache = str(tmp_path / "cache_without_one")
    shutil.copytree(shapes_data["cache"], cache)
    os.remove(os.path.join(cache, os.path.relpath(path, shapes_data["cache"])))
    return cache


def test_workers_are_compared_on_their_data_not_only_their_flags(shapes_data, tmp_path,
                                                                 monkeypatch):
    """The workers compared their flags only: one whose cache lacked a few train features (or
    whose caption file was another version) fitted its own vocabulary and split, fed other
    images, and the mirrored weights trained on mixed token ids, exit 0. Each part of what
    they read is compared, so the refusal names the one that differs."""
    from caption_attn import distribute, train
    seen = []
    monkeypatch.setattr(distribute, "check_workers_agree",
                        lambda strategy, step=None, restored=None, checkpoints="", agree=None:
                        seen.append(agree) if agree is not None else None)
    for name, cache in (("chief", shapes_data["cache"]),
                        ("worker", _cache_without_a_train_feature(shapes_data, tmp_path))):
        cfg = _small(shapes_data, cache=cache)
        train.open_run(str(tmp_path / name), cfg)
        train.Trainer(cfg, str(tmp_path / name), progress=False, log=lambda *a: 0)
    chief, worker = seen
    assert list(chief) == ["flags", "vocabulary", "split", "caption data", "feature cache",
                           "train and val images with usable features"]
    assert all(isinstance(v, str) and len(v) >= 16 for v in chief.values()), chief
    differ = {k for k in chief if chief[k] != worker[k]}
    # (the vocabulary may differ too: its words counted without that image's captions)
    assert differ - {"vocabulary"} == {"train and val images with usable features"}, differ


def test_a_worker_does_not_rewrite_the_chiefs_config(shapes_data, tmp_path, monkeypatch):
    """Every worker wrote config.json, the last one winning: a shared run folder's then named
    a worker's --cache and --memory-cache-gb, which `evaluate` and the chief's resumes used.
    Another worker writes it only where there is none (its own run folder)."""
    from caption_attn import distribute, train
    from caption_attn.config import RunConfig
    run = str(tmp_path / "run")
    chief = _small(shapes_data, memory_cache_gb=4.0)
    train.open_run(run, chief)                                  # the chief's config.json
    link = str(tmp_path / "worker_cache")                       # the worker's own path
    os.symlink(shapes_data["cache"], link)
    worker = dataclasses.replace(chief, cache=link, train=dataclasses.replace(
        chief.train, memory_cache_gb=0.0))
    monkeypatch.setattr(distribute, "is_chief", lambda strategy: False)
    monkeypatch.setattr(distribute, "task_id", lambda strategy: 1)
    trainer = train.Trainer(worker, run, progress=False, log=lambda *a: 0)
    trainer._settings_recorded = False     # as after a resume, once it has trained
    trainer._record_settings()
    saved = RunConfig.load(os.path.join(run, "config.json"))
    assert saved.cache == shapes_data["cache"] and saved.train.memory_cache_gb == 4.0
    # a worker's own run folder (no shared filesystem) gets its config.json
    own = str(tmp_path / "own")
    os.makedirs(own)
    train.Trainer(worker, own, progress=False, log=lambda *a: 0)
    saved = RunConfig.load(os.path.join(own, "config.json"))
    assert saved.cache == link and saved.train.memory_cache_gb == 0.0
    assert not any(".tmp." in name for name in os.listdir(own)), os.listdir(own)


MULTI = {"cluster": {"worker": ["localhost:1", "localhost:2"]},
         "task": {"type": "worker", "index": 0}}


def test_a_multi_worker_run_and_another_train_of_its_folder_refuse_each_other(
        shapes_data, tmp_path, monkeypatch):
    """A multi-worker run took no lock on its run folder: a `train` of it in another shell
    trained beside it (both writing the same checkpoints), `train --fresh` deleted its
    checkpoints under it, and a multi-worker launch on a run being trained went ahead."""
    from caption_attn import train
    from caption_attn.errors import UserError
    from caption_attn.run import RunFolder
    run = RunFolder(str(tmp_path / "run"))
    alone, worker = _small(shapes_data), _small(shapes_data, strategy="multi-worker")
    train.open_run(run.path, alone)
    busy = r"another `caption-attn train`.* is training this run now"
    checked = []

    def train_in(run_, cfg, *args, **kwargs):   # the multi-worker run's training: meanwhile
        if cfg.train.strategy != "multi-worker":
            pytest.fail("a single-process train trained beside the multi-worker run")
        monkeypatch.delenv("TF_CONFIG")     # a shell without the cluster
        for fresh in (False, True):
            with pytest.raises(UserError, match=busy):
                train.train(dataclasses.replace(alone, train=dataclasses.replace(
                    alone.train, fresh=fresh)), run.path, log=lambda m: None)
        monkeypatch.setenv("TF_CONFIG", json.dumps(MULTI))
        checked.append(True)
        return {}
    monkeypatch.setattr(train, "_train_in", train_in)
    monkeypatch.setenv("TF_CONFIG", json.dumps(MULTI))
    assert train.train(worker, run.path, log=lambda m: None) == {} and checked
    assert os.path.exists(run.config)                          # --fresh deleted nothing
    assert not os.path.exists(os.path.join(run.path, ".train.lock"))
    # the other way round: a single-process train holds the run
    monkeypatch.setattr(train, "_train_in",
                        lambda *a, **k: pytest.fail("trained beside another train"))
    with run.training_lock():
        with pytest.raises(UserError, match=busy):
            train.train(worker, run.path, log=lambda m: None)


@pytest.mark.slow
def test_multi_worker_workers_with_other_data_are_refused(shapes_data, tmp_path):
    """A worker whose cache lacks one train image's features (same flags) trained with the
    chief, exit 0, on another image list (and maybe another vocabulary's token ids). Both are
    refused, naming what differs, before a step."""
    cache = _cache_without_a_train_feature(shapes_data, tmp_path)
    run = str(tmp_path / "run")
    for code, out in _multi_worker(shapes_data, run, epochs=1,
                                   flags=([], ["--cache", cache])):
        assert code == 2, out
        assert "the workers were started with other settings or data: they differ in their " \
               in out, out
        assert "train and val images with usable features (this worker's" in out, out
        assert "flags" not in out.split("they differ in their ")[1].split("(")[0], out
    assert not os.path.exists(run) or os.listdir(run) in ([], [".train.lock"]), os.listdir(run)
