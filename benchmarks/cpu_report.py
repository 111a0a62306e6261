"""Issue #11's figures for this machine in one command: every speed target of each CPU kind.

Runs, each in its own process and one after the other (nothing else should load the
machine meanwhile):

  bench_extract.py   the backbone in the precision the demo picks here (bfloat16 only where
                     the CPU runs it natively), end to end: the demo's extraction time
                     follows from it (3,000 images)
  bench_train.py     the training step vs the tutorial's (target >= 7x)
  bench_epoch.py     whole epochs vs the tutorial's step (>= 5.5x; <= 2 s per epoch besides
                     steps and validation, the sample heatmaps' drawing included)
  bench_decode.py    batched greedy and beam-3 vs one image at a time (>= 100x, >= 40x)

`--repeats N` runs the training and decoding benchmarks N times: their figures move by
10-20 % between runs on a shared machine, so one run says little about a target near the
line. Prints every run, the median and the verdict per target, with the CPU they belong to
(lscpu's name and the flags that tell the kinds apart); `--json` keeps them. The demo's own
time is printed by `make demo` (`demo finished in ...`), stage by stage.

    .venv/bin/python benchmarks/cpu_report.py --repeats 3 --json report.json   # ~8 min (Zen 4)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from machine import describe  # noqa: E402

DEMO_IMAGES = 3000
# (label, benchmark, JSON field, target, at least?) of issue #11's points 2-5
TARGETS = (
    ("training step vs the tutorial's (point 4)", "bench_train", "speedup", 7.0, True),
    ("epochs end to end vs the tutorial's step (point 3)", "bench_epoch",
     "speedup_end_to_end", 5.5, True),
    ("seconds per epoch besides steps and validation, heatmap drawing included (point 3)",
     "bench_epoch", "epoch_fixed_cost_s", 2.0, False),
    ("batched greedy vs one at a time (point 5)", "bench_decode", "greedy_speedup", 100.0,
     True),
    ("batched beam-3 vs one at a time (point 5)", "bench_decode", "beam3_speedup", 40.0, True),
)


def run(script: str, args: list[str], folder: str, tag: str) -> dict:
    """`benchmarks/<script>.py args --json FILE` in a fresh process (its output shown as it
    comes) -> the figures it wrote. Exits with its code if it failed."""
    path = os.path.join(folder, f"{script}-{tag}.json")
    print(f"\n$ {script}.py {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, os.path.join(HERE, script + ".py"), *args,
                           "--json", path])
    if done.returncode != 0:
        sys.exit(f"{script}.py failed (exit code {done.returncode}); no report")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def summarize(extract: dict, runs: dict, precision: str) -> tuple[list[str], dict]:
    """The report's lines and, per target, every run's value, the median and how many runs
    met it. `runs` maps each benchmark to the figures of its runs; `extract` is
    bench_extract's figures in `precision`."""
    rate = extract[f"{precision}_end_to_end_images_per_s"]
    lines = [describe(),
             f"extraction ({precision}, as the demo picks here): {rate:.1f} images/s end to "
             f"end -> about {DEMO_IMAGES / rate:.0f} s for the demo's {DEMO_IMAGES} images"]
    verdicts = {}
    for label, script, field, target, at_least in TARGETS:
        values = [r[field] for r in runs[script]]
        median = statistics.median(values)
        met = sum(v >= target if at_least else v <= target for v in values)
        verdicts[field] = {"values": values, "median": median, "target": target,
                           "runs_meeting_target": met}
        unit = " s" if field.endswith("_s") else "x"
        lines.append(f"{label}: " + ", ".join(f"{v:.2f}{unit}" for v in values)
                     + f" (median {median:.2f}{unit}; target {'>=' if at_least else '<='} "
                     f"{target:g}{unit}: met in {met} of {len(values)} runs)")
    return lines, verdicts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of the training and decoding benchmarks (default 1)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    from caption_attn.backbone import native_bfloat16
    from caption_attn.quiet import import_tensorflow
    import_tensorflow()  # native_bfloat16 imports it: without its start-up notices
    precision = "bfloat16" if native_bfloat16() else "float32"
    print(describe(), flush=True)
    runs: dict = {"bench_train": [], "bench_epoch": [], "bench_decode": []}
    with tempfile.TemporaryDirectory(prefix="cpu_report_") as folder:
        extract = run("bench_extract", ["--precisions", precision, "--batch-size", "32"],
                      folder, "0")
        for i in range(args.repeats):
            for script in runs:
                runs[script].append(run(script, [], folder, str(i)))

    lines, verdicts = summarize(extract, runs, precision)
    print("\n" + "\n".join(lines))
    if args.json:
        from caption_attn.fileio import write_json_atomic
        write_json_atomic(args.json, {"cpu": describe(), "extract": extract, "runs": runs,
                                      "targets": verdicts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
