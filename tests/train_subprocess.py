"""Helpers of the tests that train in subprocesses (test_kill_resume, test_distributed,
test_signals)."""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}


def train_cmd(shapes_data, run, epochs=3):
    return [sys.executable, "-m", "caption_attn", "train", "--captions",
            shapes_data["captions"], "--cache", shapes_data["cache"], "--run", run,
            "--epochs", str(epochs), "--batch-size", "16", "--embedding-dim", "32",
            "--units", "64", "--dropout", "0.2", "--learning-rate", "0.01", "--seed", "1",
            "--max-length", "20", "--sample-images", "1", "--patience", "10"]


# `python -m caption_attn` with every training step after the first epoch's 0.5 s longer: a
# test that stops a run once epoch 1 (or a checkpoint in epoch 2) is saved has seconds to do
# it, where epoch 2 and 3 of the shapes data took 0.3 s each and the run could end first
SLOWED = (
    "import sys, time\n"
    "from caption_attn import cli, train\n"
    "checked = train.check_finite\n"
    "def check_finite(out, epoch, *args, **kwargs):\n"
    "    if epoch >= 1:\n"
    "        time.sleep(0.5)\n"
    "    return checked(out, epoch, *args, **kwargs)\n"
    "train.check_finite = check_finite\n"
    "sys.argv[0] = 'caption-attn'\n"
    "sys.exit(cli.entry())\n")


def slowed(cmd):
    """`cmd` (a `train_cmd`) run with `SLOWED`'s steps."""
    assert cmd[1:3] == ["-m", "caption_attn"], cmd
    return [cmd[0], "-c", SLOWED, *cmd[3:]]


def run_here(args, capsys) -> subprocess.CompletedProcess:
    """`caption-attn ARGS` (`train_cmd(...)[3:]`) run in this test process: `cli.main`, the
    function the program's `entry` calls, with TensorFlow imported already (a subprocess
    paid ~5 s for the import before its first step). For the runs that are not themselves
    stopped (a reference run, the rerun after a stop): what they are checked by is on disk
    and in their output, the same as the program's. Its output as a subprocess's."""
    from caption_attn import cli
    capsys.readouterr()
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def checkpoint_steps(run):
    return [int(p.rsplit("ckpt-", 1)[1].split(".")[0])
            for p in glob.glob(os.path.join(run, "checkpoints", "ckpt-*.index"))]


def read_history(run):
    path = os.path.join(run, "history.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)
