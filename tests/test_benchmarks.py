"""The benchmark scripts still run: each one, at toy sizes, against today's code.

A benchmark calls into the package (some into its internals, to time one stage alone), and
nothing else would notice when such a call stops matching: `bench_extract.py` did, after the
feature index changed `extract._run_pipeline`. These run each script's `main` in this process
with tiny sizes (seconds, not minutes) and check that it finished and printed its figures and
the CPU they belong to. The figures themselves are not checked: at toy sizes they mean nothing.
"""

import importlib
import json
import math
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")
pytestmark = pytest.mark.slow


def run_benchmark(name: str, argv: list[str], capsys) -> str:
    """`benchmarks/<name>.py`'s main(argv) -> what it printed (its exit code must be 0)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    assert importlib.import_module(name).main(argv) == 0
    out = capsys.readouterr().out
    assert "CPU: " in out, f"{name} does not say which CPU its figures are from:\n{out}"
    return out


def numbers(figures: dict, *names: str) -> list[float]:
    values = [figures[n] for n in names]
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values), values
    return values


def test_bench_extract(capsys):
    out = run_benchmark("bench_extract", ["--images", "2", "--batch-size", "2", "--repeats",
                                          "1", "--precisions", "float32", "--size", "64x48"],
                        capsys)
    assert "model-only" in out and "end-to-end" in out and "GFLOP/s" in out


def test_bench_decode(capsys, tmp_path):
    path = str(tmp_path / "decode.json")
    out = run_benchmark("bench_decode", ["--batch", "3", "--one-at-a-time", "1",
                                         "--max-length", "3", "--vocab", "40", "--repeats",
                                         "1", "--json", path], capsys)
    assert "issue #11 targets" in out
    with open(path) as f:
        figures = json.load(f)
    numbers(figures, "one_at_a_time_captions_per_s", "greedy_captions_per_s",
            "beam3_captions_per_s")


def test_bench_train(capsys, tmp_path):
    # without the tutorial's reference step: tracing its Python-unrolled loop alone takes
    # longer than everything else here (it is the benchmark's own code, not the package's)
    path = str(tmp_path / "train.json")
    out = run_benchmark("bench_train", ["--images", "8", "--captions-per-image", "2",
                                        "--vocab", "12", "--embedding-dim", "8", "--units",
                                        "8", "--batch-size", "4", "--reference-batches", "0",
                                        "--json", path], capsys)
    assert "reference  skipped" in out and "MFU" in out and "self-critical" in out
    with open(path) as f:
        figures = json.load(f)
    numbers(figures, "ours_captions_per_s", "ours_first_step_s", "mfu")
    numbers(figures["scst"], "captions_per_s")
    assert figures["speedup"] is None


def test_bench_reward_and_feature_index(capsys):
    out = run_benchmark("bench_reward", ["--images", "40", "--vocab-size", "30", "--batch",
                                         "4", "--repeats", "1"], capsys)
    assert "candidates/s" in out
    out = run_benchmark("bench_feature_index", ["--keys", "50", "--files", "4", "--repeats",
                                                "1"], capsys)
    assert "files/s" in out and "usable_features" in out
