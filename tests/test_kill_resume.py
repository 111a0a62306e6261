"""kill -9 during training, then the same command again: the run ends exactly as an
uninterrupted one (cross-entropy and self-critical epochs). SIGTERM: the same clean-up as
Ctrl-C, exit 143. The runs stopped are subprocesses; the reruns and the self-critical
reference run are the same command run in the test's process (`run_here`)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from caption_attn.quiet import NOISE
from train_subprocess import (ENV, checkpoint_steps, read_history, run_here, slowed,
                              train_cmd)


def _wait_for_epoch_1(proc, run: str) -> None:
    """Until epoch 1 of the training `proc` is checkpointed (history.json is written just
    before that), it ended, or 300 s passed."""
    checkpoint = os.path.join(run, "checkpoints", "checkpoint")
    deadline = time.time() + 300
    while not (read_history(run) and os.path.exists(checkpoint)) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(shapes_data, tmp_path_factory):
    """The history of `train_cmd`'s training run uninterrupted, which the interrupted ones
    must end with. Run with TensorFlow's own log level: none of its known notices may come
    through (on Intel CPUs with AMX, oneDNN's DT_INT32 notice came at ERROR level in the
    first step)."""
    full = str(tmp_path_factory.mktemp("full") / "run")
    loud = {k: v for k, v in ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(train_cmd(shapes_data, full), check=True, env=loud,
                          capture_output=True, text=True)
    notices = [line for line in done.stderr.splitlines()
               if NOISE.search(line) or "] oneDNN supports DT_" in line]
    assert not notices, done.stderr
    return read_history(full)


def _same_epochs(a: list, b: list) -> None:
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-3
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-3


@pytest.mark.slow
def test_kill_after_an_epoch_then_resume_matches_uninterrupted(shapes_data, tmp_path,
                                                               uninterrupted, capsys):
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(slowed(train_cmd(shapes_data, killed)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_epoch_1(proc, killed)   # kill as soon as epoch 1 is checkpointed
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert len(read_history(killed)) < 3

    done = run_here(train_cmd(shapes_data, killed)[3:], capsys)
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch" in done.stdout
    _same_epochs(uninterrupted, read_history(killed))


@pytest.mark.slow
def test_kill_mid_self_critical_epoch_then_resume_matches_uninterrupted(shapes_data,
                                                                         tmp_path, capsys):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    cmd = lambda run: train_cmd(shapes_data, run, epochs=2) + [  # noqa: E731
        "--scst-after", "1", "--scst-samples", "3", "--checkpoint-every", "2"]
    assert run_here(cmd(full)[3:], capsys).returncode == 0

    proc = subprocess.Popen(slowed(cmd(killed)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # kill once a checkpoint inside the self-critical epoch exists
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        history = read_history(killed)
        if history and any(s > history[0]["steps"] for s in checkpoint_steps(killed)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert len(read_history(killed)) == 1

    done = run_here(cmd(killed)[3:], capsys)
    assert done.returncode == 0, done.stderr
    a, b = read_history(full), read_history(killed)
    assert [h["stage"] for h in a] == [h["stage"] for h in b] == ["cross-entropy",
                                                                  "self-critical"]
    for key in ("loss", "reward", "baseline", "val_loss", "val_cider"):
        assert abs(a[1][key] - b[1][key]) < 1e-3, key


def test_sigterm_runs_the_interrupt_clean_up_and_exits_143(tmp_path):
    """`kill` (SIGTERM: a batch scheduler's time limit, `docker stop`) ended every command
    with exit 143 and no word, none of Ctrl-C's clean-up run (an export's temporary folder
    stayed behind). It now raises in the command like Ctrl-C does: its `finally` blocks run,
    one line says so, exit 143."""
    script = (
        "import os, signal, sys, time\n"
        "from caption_attn import cli, shapes\n"
        "def make_shapes(out, cfg):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(60)\n"
        "    finally:\n"
        "        print('cleaned up', flush=True)\n"
        "shapes.make_shapes = make_shapes\n"
        "sys.argv = ['caption-attn', 'make-shapes', sys.argv[1]]\n"
        "sys.exit(cli.entry())\n")
    start = time.time()
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "shapes")], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert time.time() - start < 50                        # not the sleep's 60 s
    assert (done.returncode, done.stdout, done.stderr) == (
        143, "cleaned up\n", "caption-attn make-shapes: terminated\n")


@pytest.mark.slow
def test_sigterm_during_training_keeps_the_finished_epochs_and_the_rerun_resumes(
        shapes_data, tmp_path, uninterrupted, capsys):
    run = str(tmp_path / "run")
    proc = subprocess.Popen(slowed(train_cmd(shapes_data, run)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch_1(proc, run)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr
    assert stderr.splitlines()[-1] == "caption-attn train: terminated"
    assert 1 <= len(read_history(run)) < 3

    done = run_here(train_cmd(shapes_data, run)[3:], capsys)
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch" in done.stdout
    _same_epochs(uninterrupted, read_history(run))


def test_the_program_collects_garbage_rarely_enough_for_coco_sized_files():
    """The collector's default thresholds made loading 123k images' captions superlinear
    (14 full collections of ~1 M live objects): the program raises them."""
    script = ("import gc, sys\n"
              "from caption_attn import cli\n"
              "cli.main = lambda: print(gc.get_threshold()) or 0\n"
              "sys.exit(cli.entry())\n")
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "(100000, 50, 100)\n"), done.stderr
