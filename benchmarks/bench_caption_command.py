"""Wall time of a one-image `caption-attn caption` command, as a user waits for it: start-up,
the run's model and the cache's backbone loaded, one image decoded (issue #11 point 5: the
batched decoders may not make a one-image `caption` slower than it was).

This checkout's command (`python -m caption_attn` with this interpreter, which runs what the
`caption-attn` script runs, with this checkout's package first on PYTHONPATH) and, with
--against, another installation's `caption-attn` (without PYTHONPATH, so that it runs its
own package), such as the code issue #11's work started from (01f8548):

    git worktree add /tmp/base 01f8548 && make -C /tmp/base .venv/.installed
    .venv/bin/python benchmarks/bench_caption_command.py \\
        --against /tmp/base/.venv/bin/caption-attn

Each side makes its own run with its own commands in a temporary folder, so that each reads
a run folder it wrote (stop 34's set-up: a one-image `caption` is mostly start-up, which a
bigger run barely changes):

    make-shapes --num-images 60 shapes
    extract-features --images shapes/images --captions shapes/captions.json --cache cache
                     --weights random
    train --captions shapes/captions.json --cache cache --run run --epochs 2
          --embedding-dim 128 --units 256

Without --against, --run and --image time an existing run instead. Then, per --beam, rounds
alternate the sides (this side first in even rounds, the other first in odd ones:
`machine.interleaved`): one `caption --run run --beam B IMAGE` each, a new process timed
from its start to its exit, with this process's environment (so ONEDNN_MAX_CPU_ISA and
XLA_FLAGS apply to both; PYTHONPATH as above). Each side's best round counts, as in the
other benchmarks (other load only ever slows a round down); medians are printed beside
them. The two sides' models differ (each trained with its own code), so their captions do:
the first caption of each is printed, and its length in words. With --beam 1 that length is
the number of decoding steps the command ran (one more for an ended caption's <end>); a beam
search runs until every beam has ended, so at least that many.

    .venv/bin/python benchmarks/bench_caption_command.py            # this side, ~1 min
    .venv/bin/python benchmarks/bench_caption_command.py --against EXE --rounds 10 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import describe, interleaved, run_in_temp_folder  # noqa: E402

THIS = [sys.executable, "-m", "caption_attn"]


def prepare_commands(images: int) -> list[list[str]]:
    """The commands (after the executable) that make a side's run, run in its folder."""
    return [["make-shapes", "--num-images", str(images), "shapes"],
            ["extract-features", "--images", "shapes/images", "--captions",
             "shapes/captions.json", "--cache", "cache", "--weights", "random"],
            ["train", "--captions", "shapes/captions.json", "--cache", "cache", "--run", "run",
             "--epochs", "2", "--embedding-dim", "128", "--units", "256"]]


def run_command(command: list[str], folder: str, this_side: bool) -> tuple[float, str]:
    """`command` in `folder` -> (wall seconds, its stdout); a failure ends the benchmark with
    the command and the end of its stderr. This side's commands import this checkout's
    package (PYTHONPATH), whichever one the interpreter has installed; the other side's get
    no PYTHONPATH, which could make them import a package other than their own."""
    env = dict(os.environ)
    if this_side:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPOSITORY, env.get("PYTHONPATH")]))
    else:
        env.pop("PYTHONPATH", None)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench_caption_command: `{' '.join(command)}` in {folder} exited "
                         f"with {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def first_caption(stdout: str) -> str:
    """The first caption `caption` printed ("  0) a red circle . (p=...)" -> the words)."""
    for line in stdout.splitlines():
        text = line.strip()
        if text.startswith("0)"):
            return text[2:].split(" (p=")[0].strip()
    return ""


def caption_words(caption: str) -> int:
    """Words of a printed caption; its end mark is none: "." (<end>) or "..." (cut at the
    maximum length)."""
    return len([w for w in caption.split() if w not in (".", "...")])


def measure(args, root: str) -> dict:
    sides = {"this": THIS}
    if args.against:
        sides["against"] = [args.against]
    targets = {}
    for name, exe in sides.items():
        if name == "this" and args.run:
            targets[name] = (os.path.abspath(args.run), os.path.abspath(args.image))
            continue
        folder = os.path.join(root, name)
        os.makedirs(folder)
        print(f"{name}: making its run ({' '.join(exe)}) ...", flush=True)
        for command in prepare_commands(args.images):
            run_command(exe + command, folder, name == "this")
        images = os.path.join(folder, "shapes", "images")
        targets[name] = (os.path.join(folder, "run"),
                         os.path.join(images, sorted(os.listdir(images))[-1]))
    def time_caption(name, beam):
        run, image = targets[name]
        return run_command(sides[name] + ["caption", "--run", run, "--beam", str(beam), image],
                           os.path.dirname(run), name == "this")

    figures = {"rounds": args.rounds, "beams": {}}
    for beam in args.beam:
        rounds = interleaved(args.rounds, *[functools.partial(time_caption, name, beam)
                                            for name in sides], swap=True)
        entry = {}
        for name, results in zip(sides, rounds):
            seconds = [wall for wall, _ in results]
            caption = first_caption(results[-1][1])
            entry[name] = {"seconds": seconds, "best_s": min(seconds),
                           "median_s": statistics.median(seconds), "first_caption": caption,
                           "caption_words": caption_words(caption)}
        if args.against:
            entry["this_over_against_best"] = entry["this"]["best_s"] / entry["against"]["best_s"]
            entry["this_over_against_median"] = (entry["this"]["median_s"]
                                                 / entry["against"]["median_s"])
        figures["beams"][str(beam)] = entry
    figures["against"] = args.against
    figures["cpu"] = describe()
    return figures


def report(figures: dict) -> None:
    print(f"one-image `caption`, wall seconds per command, {figures['rounds']} round(s) "
          f"alternating; {figures['cpu']}")
    for beam, entry in figures["beams"].items():
        for name in ("this", "against"):
            if name in entry:
                side = entry[name]
                label = "this checkout" if name == "this" else f"--against {figures['against']}"
                print(f"  beam {beam}, {label}: best {side['best_s']:.2f} s, median "
                      f"{side['median_s']:.2f} s ({' '.join(f'{s:.2f}' for s in side['seconds'])}"
                      f"); its caption ({side['caption_words']} words): {side['first_caption']}")
        if "this_over_against_best" in entry:
            print(f"  beam {beam}: this / against {entry['this_over_against_best']:.3f} (best), "
                  f"{entry['this_over_against_median']:.3f} (median); below 1 is faster")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", metavar="EXE", help="another installation's `caption-attn`")
    p.add_argument("--run", metavar="DIR", help="time this run (without --against)")
    p.add_argument("--image", metavar="FILE", help="the image to caption with --run")
    p.add_argument("--beam", type=int, nargs="+", default=[3, 1], metavar="B",
                   help="beam widths, each timed in its own rounds (default: 3 1)")
    p.add_argument("--rounds", type=int, default=5, help="commands per side and beam")
    p.add_argument("--images", type=int, default=60, help="shapes images of a side's run")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.images < 6 or min(args.beam) < 1:
        p.error("--rounds and --beam must be at least 1, --images at least 6 (fewer leave "
                "make-shapes' val or test split without an image)")
    if bool(args.run) != bool(args.image):
        p.error("--run and --image go together")
    if args.run and args.against:
        p.error("--run cannot be used with --against: both sides make their runs alike")
    if args.run and not os.path.isdir(args.run):
        p.error(f"--run {args.run}: no such folder")
    if args.image and not os.path.isfile(args.image):
        p.error(f"--image {args.image}: no such file")
    if args.against and not (os.path.isfile(args.against) and os.access(args.against, os.X_OK)):
        p.error(f"--against {args.against}: not an executable file (give another "
                "installation's .venv/bin/caption-attn)")
    return run_in_temp_folder("bench_caption_command_", measure, args, report)


if __name__ == "__main__":
    sys.exit(main())
