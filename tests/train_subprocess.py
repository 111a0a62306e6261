"""Helpers of the tests that train in subprocesses (test_kill_resume, test_distributed)."""

import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}


def train_cmd(shapes_data, run, epochs=3):
    return [sys.executable, "-m", "caption_attn", "train", "--captions",
            shapes_data["captions"], "--cache", shapes_data["cache"], "--run", run,
            "--epochs", str(epochs), "--batch-size", "16", "--embedding-dim", "32",
            "--units", "64", "--dropout", "0.2", "--learning-rate", "0.01", "--seed", "1",
            "--max-length", "20", "--sample-images", "1", "--patience", "10"]


def checkpoint_steps(run):
    return [int(p.rsplit("ckpt-", 1)[1].split(".")[0])
            for p in glob.glob(os.path.join(run, "checkpoints", "ckpt-*.index"))]


def read_history(run):
    path = os.path.join(run, "history.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)
