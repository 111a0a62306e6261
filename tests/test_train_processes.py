"""Multi-process training tests: kill -9 and resume, two replicas vs one device."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}


def _train_cmd(shapes_data, run, epochs=3):
    return [sys.executable, "-m", "caption_attn", "train", "--captions",
            shapes_data["captions"], "--cache", shapes_data["cache"], "--run", run,
            "--epochs", str(epochs), "--batch-size", "16", "--embedding-dim", "32",
            "--units", "64", "--dropout", "0.2", "--learning-rate", "0.01", "--seed", "1",
            "--max-length", "20", "--sample-images", "1", "--patience", "10"]


def _checkpoint_steps(run):
    import glob
    return [int(p.rsplit("ckpt-", 1)[1].split(".")[0])
            for p in glob.glob(os.path.join(run, "checkpoints", "ckpt-*.index"))]


def _history(run):
    path = os.path.join(run, "history.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_kill_after_an_epoch_then_resume_matches_uninterrupted(shapes_data, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(_train_cmd(shapes_data, full), check=True, env=ENV, capture_output=True)

    proc = subprocess.Popen(_train_cmd(shapes_data, killed), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill as soon as epoch 1 is checkpointed (history.json is written just before that)
    checkpoint = os.path.join(killed, "checkpoints", "checkpoint")
    deadline = time.time() + 300
    while not (_history(killed) and os.path.exists(checkpoint)) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert len(_history(killed)) < 3

    done = subprocess.run(_train_cmd(shapes_data, killed), env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch" in done.stdout
    a, b = _history(full), _history(killed)
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-3
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-3


SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from caption_attn import train
    from caption_attn.config import DataConfig, ModelConfig, RunConfig, TrainConfig, VocabConfig
    captions, cache, root = sys.argv[1:4]
    out = {}
    for name, strategy in (("one", tf.distribute.get_strategy()),
                           ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
        cfg = RunConfig(captions=captions, cache=cache, data=DataConfig(seed=3),
                        vocab=VocabConfig(max_length=20),
                        model=ModelConfig(embedding_dim=32, units=64, dropout=0.0),
                        train=TrainConfig(epochs=2, batch_size=15, learning_rate=0.01,
                                          sample_images=0))
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
    for a, b in zip(out["one"]["history"], out["two"]["history"]):
        assert abs(a["loss"] - b["loss"]) < 1e-4
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-4
        assert abs(a["gradient_norm"] - b["gradient_norm"]) < 1e-3


@pytest.mark.slow
def test_kill_mid_self_critical_epoch_then_resume_matches_uninterrupted(shapes_data,
                                                                         tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    cmd = lambda run: _train_cmd(shapes_data, run, epochs=2) + [  # noqa: E731
        "--scst-after", "1", "--scst-samples", "3", "--checkpoint-every", "2"]
    subprocess.run(cmd(full), check=True, env=ENV, capture_output=True)

    proc = subprocess.Popen(cmd(killed), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # kill once a checkpoint inside the self-critical epoch exists
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        history = _history(killed)
        if history and any(s > history[0]["steps"] for s in _checkpoint_steps(killed)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert len(_history(killed)) == 1

    done = subprocess.run(cmd(killed), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = _history(full), _history(killed)
    assert [h["stage"] for h in a] == [h["stage"] for h in b] == ["cross-entropy",
                                                                  "self-critical"]
    for key in ("loss", "reward", "baseline", "val_loss", "val_cider"):
        assert abs(a[1][key] - b[1][key]) < 1e-3, key


def _free_ports(n):
    import socket
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _multi_worker(shapes_data, run, epochs):
    """Two `train --strategy multi-worker` processes on localhost; their (code, output)."""
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        env = {**ENV, "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                               "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            _train_cmd(shapes_data, run, epochs) + ["--strategy", "multi-worker"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout=600), p.stdout.read()) for p in procs]


@pytest.mark.slow
def test_multi_worker_resume_restores_every_worker_from_the_chief(shapes_data, tmp_path):
    import shutil
    run = str(tmp_path / "run")
    for code, out in _multi_worker(shapes_data, run, epochs=1):
        assert code == 0, out
    # the second worker lost its scratch checkpoints (a new machine): it must restore the
    # chief's, not start from scratch and mix a fresh model into the chief's gradients
    shutil.rmtree(os.path.join(run, "checkpoints", "worker_1"))
    results = _multi_worker(shapes_data, run, epochs=2)
    for code, out in results:
        assert code == 0, out
        assert "resuming after epoch 1" in out
    lines = [[line for line in out.splitlines() if line.startswith("epoch 2:")]
             for _, out in results]
    assert lines[0] and lines[0][0].split("(")[0] == lines[1][0].split("(")[0]  # same loss
    history = _history(run)
    assert [h["epoch"] for h in history] == [1, 2] and history[1]["loss"] < history[0]["loss"]

    # workers that restore different steps are refused, each with the same message
    for name in os.listdir(os.path.join(run, "checkpoints")):
        if name.startswith("ckpt-") or name == "checkpoint":
            os.remove(os.path.join(run, "checkpoints", name))
    for code, out in _multi_worker(shapes_data, run, epochs=3):
        assert code == 2 and "the workers restored different checkpoints" in out, out
