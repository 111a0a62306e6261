"""`caption-attn` command line: parse flags, call one library function, print.

Flags of configurable values are generated from the config dataclasses (`config.py`), so a
default and its help text live in one place. Heavy imports (TensorFlow) happen inside the
commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import gc
import json
import os
import select
import signal
import sys
import threading
import traceback
import typing
from typing import Callable, Optional, Sequence

from caption_attn import config as C
from caption_attn.errors import DISK_FULL, UserError, WriteFailed, counted, free_space
from caption_attn.fileio import exit_past_hdf5, hdf5_write_failed, one_line, printable_json
from caption_attn.run import check_folder_writable

PROG = "caption-attn"


# --------------------------------------------------------------------------- flag generation
def _recorded(action_class):
    """`action_class` that also notes its field in `namespace.given_flags`: a flag typed out
    with its default value is still a flag given (`Config.given`)."""
    class Recorded(action_class):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            namespace.given_flags = getattr(namespace, "given_flags", frozenset()) | {self.dest}
    return Recorded


def add_config_args(parser: argparse.ArgumentParser, cls, exclude: Sequence[str] = (),
                    title: Optional[str] = None, defaults: Optional[dict] = None) -> None:
    """One `--field-name` flag per field of dataclass `cls` (help and choices from metadata).

    `defaults` overrides the dataclass default shown and used by this command only.
    """
    first = " ".join(cls.__doc__.strip().split("\n\n")[0].split())    # its first paragraph
    group = parser.add_argument_group(title or first.rstrip("."))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or "help" not in f.metadata:
            continue
        default = (defaults or {}).get(f.name, f.default)
        kind = hints[f.name]
        if kind is bool:  # on by default: --no-flag turns it off
            group.add_argument(C.flag_name(f), dest=f.name, default=default,
                               help=f.metadata["help"],
                               action=_recorded(argparse.BooleanOptionalAction if default
                                                else argparse._StoreTrueAction))
            continue
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
            if kind in (int, float):   # `--scst-after none`, as --help shows the default
                kind = _or_none(kind)
        shown = "none" if default is None else default
        group.add_argument(C.flag_name(f), dest=f.name, type=kind, default=default,
                           action=_recorded(argparse._StoreAction),
                           choices=f.metadata.get("choices"), metavar=None if
                           f.metadata.get("choices") else f.name.split("_")[-1].upper(),
                           help=f.metadata["help"] if "(default" in f.metadata["help"]
                           else f"{f.metadata['help']} (default: {shown})")


def _or_none(kind):
    """argparse type: `kind`, or None for "none" (what --help shows as the default of an
    optional number, and what messages such as `--scst-after none` tell users to type)."""
    def convert(text: str):
        return None if text.strip().lower() == "none" else kind(text)
    convert.__name__ = kind.__name__          # argparse's "invalid int value: 'x'"
    return convert


def config_from_args(cls, args: argparse.Namespace, **fixed):
    """Instance of `cls` from the parsed flags (fields without a flag keep their default)."""
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if hasattr(args, f.name) and "help" in f.metadata}
    kwargs.update(fixed)
    with C.flags_given(getattr(args, "given_flags", ())):
        return cls(**kwargs)


def config_of(args: argparse.Namespace, cls):
    """The command's config `cls` from the parsed flags, made once: `check_flags` makes each
    of the command's configs (`args.configs`) before TensorFlow is imported."""
    made = vars(args).setdefault("made_configs", {})
    if cls not in made:
        made[cls] = config_from_args(cls, args)
    return made[cls]


def check_flags(args: argparse.Namespace) -> None:
    """Every refusal of the flags that needs no TensorFlow and reads no data: made before
    TensorFlow is imported (seconds) and before the command reads anything. `train
    --batch-size 0` was refused only after that import; `extract-features --images TYPO`
    only once the caption file was read and the cache folder made (and removed again).
    Then those of the files and folders it reads (`check_input_paths`)."""
    check_path_flags(args)
    for cls in args.configs:
        config_of(args, cls)
    if args.command == "train":
        C.check_train_flags(config_of(args, C.TrainConfig))
    if args.command == "extract-features":
        if args.format is not None and not args.captions:
            raise UserError(f"--format {args.format} is the format of --captions, which is "
                            f"not given (every image file under --images is extracted): give "
                            f"--captions FILE, or leave --format out")
        from caption_attn import extract
        extract.check_flags(args.images, config_of(args, C.ExtractConfig))
    check_input_paths(args)


def check_input_paths(args: argparse.Namespace) -> None:
    """The command's own refusals of a file or folder it reads that is none, made before
    TensorFlow is imported: `train --captions TYPO` was told after that import (3-6 s), and
    so were a --cache without a manifest and an --images that is no folder (train reads all
    three, resumed or not) and `extract-features --captions TYPO`. In the command's words
    and order (`train` names its cache and caption file absolute), before train's own checks
    of the run folder, which only a run that can start needs. Not evaluate's caption
    file: the run (no best model yet, say) is told first, and its records name that file."""
    from caption_attn import data
    if args.command == "train":
        from caption_attn import feature_cache
        if args.images is not None:
            data.check_images_folder(args.images)
        feature_cache.read_manifest(os.path.abspath(args.cache))
        data.check_caption_file(os.path.abspath(args.captions))
    elif args.command == "extract-features":
        if args.captions:
            data.check_caption_file(args.captions)
        from caption_attn import feature_cache
        feature_cache.check_settings(args.cache, config_of(args, C.ExtractConfig))


# --------------------------------------------------------------------------- commands
def cmd_inspect(args: argparse.Namespace) -> int:
    from caption_attn import data

    data_cfg = config_of(args, C.DataConfig)
    vocab_cfg = config_of(args, C.VocabConfig)
    stats = data.describe(args.captions, data_cfg, vocab_cfg, images_dir=args.images)
    # valid UTF-8 JSON whatever the bytes of the paths in it (printed as \xNN)
    say(json.dumps(printable_json(stats), indent=2, ensure_ascii=False) if args.json
        else data.format_description(stats))
    return 0


def cmd_make_shapes(args: argparse.Namespace) -> int:
    from caption_attn import shapes

    cfg = config_of(args, C.ShapesConfig)
    summary = shapes.make_shapes(args.out, cfg)
    say(f"wrote {summary['images']} images to {summary['images_dir']} and captions to "
        f"{summary['captions']} ({summary['seconds']:.1f} s)")
    for note in summary["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def cmd_extract_features(args: argparse.Namespace) -> int:
    from caption_attn import extract

    cfg = config_of(args, C.ExtractConfig)   # its flags checked (`check_flags`)
    keys = None
    if args.captions:
        from caption_attn import data
        keys = data.load_captions(args.captions, args.format or "auto").keys_to_extract()
    summary = extract.extract_features(args.images, cfg, keys=keys)
    say(extract.format_summary(summary))
    if summary["exit_code"]:
        print(f"{PROG} extract-features: error: {summary['message']}", file=sys.stderr)
    return summary["exit_code"]


def cmd_train(args: argparse.Namespace) -> int:
    from caption_attn import train

    cfg = C.RunConfig(captions=args.captions, cache=args.cache,
                      data=config_of(args, C.DataConfig),
                      vocab=config_of(args, C.VocabConfig),
                      model=config_of(args, C.ModelConfig),
                      train=config_of(args, C.TrainConfig))
    summary = train.train(cfg, args.run, images_dir=args.images)
    say(train.format_summary(summary))
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    # the locks it takes, held to its end: the run's readers' lock (no `train --fresh`
    # deleting the model meanwhile) and the --plot-attention folder's
    with contextlib.ExitStack() as hold:
        return _caption(args, hold)


SAME_NOTES = 5   # files given under two names: a note each for this many, then a count


def _caption(args: argparse.Namespace, hold: contextlib.ExitStack) -> int:
    from caption_attn import captioner as C_
    from caption_attn import progress
    from caption_attn.images import printable_name
    from caption_attn.run import RunFolder

    cfg = config_of(args, C.DecodeConfig)
    folders: dict = {}   # below a folder given, unlistable: reported as unreadable images are
    drawn: list = []     # heatmaps caption-attn drew, found in a folder given: not photos
    left_out: list = []  # files in the folders given that are not taken for their extension
    same: dict = {}      # another name a file is given under -> the name it is captioned as
    paths = C_.expand_image_args(args.images, heatmaps=args.plot_attention, unreadable=folders,
                                 drawn=drawn, left_out=left_out, same=same)
    write_heatmaps, kept = None, []   # kept: notes on older heatmaps a failure left in place
    run = RunFolder(args.run)
    hold.enter_context(run.reading_lock("caption"))
    if args.plot_attention:
        C_.check_heatmap_folder(args.plot_attention, args.run, args.cache)
        check_folder_writable(args.plot_attention, "--plot-attention")
        write_heatmaps = C_.heatmap_writer(args.plot_attention, paths, hold=hold, notes=kept)
    # which best model captions, read with it (a run still training replaces it): the
    # captions never said which epoch's model made them
    model, best = run.read_best_unchanged(
        lambda: C_.Captioner.from_run(args.run, cfg, cache=args.cache, needs_backbone=True),
        "caption", "caption")
    if drawn:   # after the refusals: a refused command says one line
        from caption_attn.images import heatmaps_note
        print(f"note: {heatmaps_note(drawn, 'in the folders given')}", file=sys.stderr)
    if best is not None:
        print(f"note: best model of epoch {best['epoch']} ({one_line(run.best_model)})",
              file=sys.stderr)
    if left_out:
        from caption_attn.images import left_out_note
        print(f"note: {left_out_note(left_out, 'in the folders given')}", file=sys.stderr)
    names = C_.display_names(paths)
    # after the refusals, as the notes above: a file given under two names is said, not lost
    for other, first in list(same.items())[:SAME_NOTES]:
        print(f"note: {one_line(printable_name(other))} is the same file as "
              f"{one_line(printable_name(first))}: captioned once, as {names[first]}"
              + (" (in --json: an entry for each name, `same_as` the first)" if args.json
                 else ""), file=sys.stderr)
    if len(same) > SAME_NOTES:
        print(f"note: {len(same) - SAME_NOTES} more files given under a second name are "
              f"captioned once each, under the first", file=sys.stderr)
    # One batch of images at a time: its captions are printed (and its heatmaps drawn)
    # before the next is read. Where the printed captions do not show the progress (--json
    # prints once at the end; stdout may be a file), a bar on stderr does, and the unreadable
    # files are listed after it instead of breaking it.
    shown = len(paths) > cfg.batch_size and (args.json or not sys.stdout.isatty())
    bar = progress.bar(len(paths), enabled=shown, unit_name="image", stateful=["failed"],
                       periodic=True, stream=sys.stderr)
    captioned, failed, count = {}, dict(folders), 0          # captions kept for --json only
    drawn, undrawn = 0, {}      # heatmaps written; images whose heatmap could not be

    def report(errors, heatmaps=False):
        for line in unreadable_lines(errors, heatmaps):
            print(line, file=sys.stderr)
    if not shown:
        report(folders)
    done = 0
    try:
        for results, errors, done in model.caption_batches(paths):
            failed.update(errors)
            if not shown:
                report(errors)
            count += len(results)
            if args.json:
                captioned.update({path: (None, caps) for path, (_, caps) in results.items()})
            else:
                for path, (_, captions) in results.items():
                    say(C_.format_captions(path, captions, names[path]))
                say(flush=True)
            # after the captions: a heatmap that cannot be written is that image's report, and
            # the captions, and the other heatmaps, are out all the same
            if write_heatmaps:
                written, problems = write_heatmaps(results, errors)
                drawn += len(written)
                undrawn.update(problems)
                if not shown:
                    report(problems, heatmaps=True)
                    for note in kept:
                        print(f"note: {note}", file=sys.stderr)
                    kept.clear()
            bar.update(done, [("failed", len(failed))])
    except UserError:   # out of memory in a batch: the bar ends, and what failed is said
        if shown:
            bar.update(done, [("failed", len(failed))], finalize=True)
            report(failed)
            report(undrawn, heatmaps=True)
        raise
    if shown:
        report(failed)
        report(undrawn, heatmaps=True)
        for note in kept:
            print(f"note: {note}", file=sys.stderr)
    if args.json:
        say(json.dumps({**C_.captions_json(captioned, failed, same), "best": best}, indent=2))
    if drawn:
        print(f"attention heatmaps: {args.plot_attention}", file=sys.stderr)
    return 0 if count and not undrawn else 1


# what `caption ... > FILE` is told when FILE's disk filled up
STDOUT_ADVICE = free_space("where it goes", "write it elsewhere")


def say(text: Optional[str] = None, flush: bool = False) -> None:
    """print(text) to stdout (and/or flush it), a failed write said as the output's: stdout
    redirected to a full disk (`caption --json > full/out.json`) said `error: No space left
    on device`, naming nothing. A reader gone away stays a BrokenPipeError (`main`)."""
    try:
        if text is not None:
            print(text)
        if flush:
            sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise WriteFailed("the output to stdout", e, STDOUT_ADVICE) from None


def unreadable_lines(errors: dict, heatmaps: bool = False) -> list[str]:
    """`caption`'s line per image it could not read (path -> reason), or (`heatmaps`) whose
    heatmap it could not write, the path printable and on one line
    (`captioner.display_names`' escapes): a file named "x.png<newline>caption-attn caption:
    ..." printed a forged line of its own, and one with an ESC sequence in its name drove
    the terminal."""
    from caption_attn.captioner import NO_CAPTION, NO_IMAGES
    from caption_attn.images import printable_name
    # (no caption decoded, a folder without images: not a file it could not read)
    return [f"{PROG} caption: "
            f"{'' if heatmaps or reason.startswith((NO_CAPTION, NO_IMAGES)) else 'cannot read '}"
            f"{one_line(printable_name(path))}: {one_line(reason)}"
            for path, reason in errors.items()]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from caption_attn import evaluate

    cfg = config_of(args, C.DecodeConfig)
    metrics = evaluate.evaluate_run(args.run, args.split, cfg, out=args.out, cache=args.cache,
                                    captions=args.captions)
    for note in metrics["notes"]:
        print(f"note: {note}", file=sys.stderr)
    method = metrics["decode"]["method"]
    beam = f" (beam {metrics['decode']['beam']})" if method == "beam" else ""
    best = metrics.get("best") or {}
    model = f", best model of epoch {best['epoch']}" if best.get("epoch") else ""
    say(f"{metrics['split']} split, {counted(metrics['images'], 'image')}, {method} "
        f"decoding{beam}{model}")
    say(evaluate.format_metrics(metrics))
    # as the metrics file names them (valid UTF-8: a path's other bytes as \xNN)
    paths = printable_json([metrics["metrics_file"], metrics["results_file"]])
    say(f"metrics: {one_line(paths[0])}\nresults: {one_line(paths[1])}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from caption_attn import export

    decode_cfg = config_of(args, C.DecodeConfig)
    cfg = config_of(args, C.ExportConfig)
    info = export.export_run(args.run, args.out, decode_cfg, cfg, cache=args.cache,
                             log=lambda message: print(message, file=sys.stderr))
    say(export.format_summary(info, args.out))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from caption_attn import demo

    demo.run_demo(config_of(args, C.DemoConfig))
    return 0


# --------------------------------------------------------------------------- parser
def _formatter(prog):
    return argparse.HelpFormatter(prog, max_help_position=34)


class _CommandParser(argparse.ArgumentParser):
    """A command's parser. `caption -x.png` took the image for a flag and said only "the
    following arguments are required: IMAGE_OR_DIR" (or "unrecognized arguments: -x.png"
    after another image): its error says how to name such an image."""

    given: list = []   # the command's arguments as given

    def parse_known_args(self, args=None, namespace=None):
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        if self.prog.endswith(" caption"):
            # arguments that look like short flags and are none of caption's (nor a negative
            # number); `--bem 3` is a mistyped flag, not an image
            flags = self._option_string_actions
            # ("-" alone is an image argument to argparse: `expand_image_args` says it)
            dashed = [a for a in self.given if a.startswith("-") and not a.startswith("--")
                      and a != "-" and a.split("=", 1)[0] not in flags
                      and not a[1:].replace(".", "", 1).isdigit()]
            if dashed:
                name = dashed[0]
                message += (f"; an image whose name starts with - is taken for a flag: put "
                            f"-- before the images (caption --run DIR -- {name}) or write "
                            f"./{name}")
            elif message.startswith("unrecognized arguments: ") and \
                    not message.split(": ", 1)[1].startswith("-"):
                # `caption a.png --run R b.png`: argparse takes the images of one place only
                message += ("; give all the images together, after the flags (caption --run "
                            "DIR a.png b.png) or before them")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_formatter,
        description="Image captioning with visual attention (Show, Attend and Tell). "
                    "Run `caption-attn COMMAND --help` for the flags of a command.")
    from caption_attn import __version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    sub.required = True

    def command(name: str, func: Callable, help: str, description: str, configs: tuple):
        """The command's parser; `configs`: the config classes its flags make."""
        p = sub.add_parser(name, help=help, description=description, formatter_class=_formatter)
        p.set_defaults(func=func, command_parser=p, configs=configs)
        return p

    p = command("inspect", cmd_inspect, "statistics of a caption file",
                "Read a caption file (COCO, Karpathy, Flickr8k/30k token or Flickr8k CSV), "
                "split it by image and print its statistics.", (C.DataConfig, C.VocabConfig))
    p.add_argument("--captions", required=True, metavar="FILE", help="caption file to read")
    p.add_argument("--images", metavar="DIR",
                   help="images folder; when given, images missing on disk are counted")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    add_config_args(p, C.DataConfig)
    add_config_args(p, C.VocabConfig, exclude=("max_length",))

    p = command("make-shapes", cmd_make_shapes, "render the built-in synthetic shapes dataset",
                "Render images of 1-3 colored shapes with five captions each into "
                "OUT/images/*.png and OUT/captions.json (Karpathy layout with `split` and "
                "per-image `objects` ground truth).", (C.ShapesConfig,))
    p.add_argument("out", metavar="OUT", help="output folder")
    add_config_args(p, C.ShapesConfig)

    p = command("extract-features", cmd_extract_features,
                "cache InceptionV3 features of the images",
                "Run InceptionV3 (no top) over the images and cache each 8x8x2048 map as "
                "<cache>/<image path>.npy, shape (64, 2048), plus manifest.json and an index "
                "of which backbone made each file from which image. Resumable: a rerun "
                "extracts only what is missing or whose image changed; --verify also hashes "
                "every image and reads every file, and re-extracts damaged files; "
                "--num-shards/--shard-index split the work over machines. Images that cannot "
                "be read are listed in <cache>/failed.tsv and do not stop the run (exit 0 "
                "unless --strict, nothing could be extracted, or --images holds none of the "
                "--captions file's images).", (C.ExtractConfig,))
    p.add_argument("--images", required=True, metavar="DIR",
                   help="images folder; each feature file is named after the image's path "
                        "relative to it")
    p.add_argument("--captions", metavar="FILE",
                   help="caption file; when given, only its images are extracted (missing ones "
                        "are reported in failed.tsv); default: every image file under --images "
                        f"(by extension, any case: {' '.join(C.IMAGE_EXTENSIONS)}; a note "
                        "counts the other files)")
    p.add_argument("--format", choices=C.CAPTION_FORMATS,
                   help="format of --captions (default: auto, found from the file)")
    add_config_args(p, C.ExtractConfig)

    p = command("train", cmd_train, "train (or resume) a captioner on cached features",
                "Train the attention decoder on features from `extract-features`. Rerunning "
                "the same command resumes from the run's last checkpoint; --fresh starts over. "
                "Everything goes into the run folder (config, vocabulary, split, checkpoints, "
                "best model, history, TensorBoard logs, attention heatmaps).",
                (C.DataConfig, C.VocabConfig, C.ModelConfig, C.TrainConfig))
    p.add_argument("--captions", required=True, metavar="FILE",
                   help="caption file; on resume it must hold the run's caption data (the "
                        "same file, or a moved or reformatted copy)")
    p.add_argument("--cache", default="features_cache", metavar="DIR",
                   help="feature cache made by extract-features (default: features_cache)")
    p.add_argument("--run", required=True, metavar="DIR",
                   help="run folder, e.g. models/coco_baseline")
    p.add_argument("--images", metavar="DIR",
                   help="images folder of the caption file: the attention heatmaps are "
                        "drawn from it, and the features' source images are checked in it "
                        "(images of other content are left out as changed) (default: on "
                        "resume the run's, else the one the cache was last extracted from, "
                        "recorded in its manifest; a new run is refused without it when the "
                        "caption file's images may be other images of the same names, and "
                        "told when a folder beside it holds either); must exist")
    add_config_args(p, C.DataConfig)
    add_config_args(p, C.VocabConfig)
    add_config_args(p, C.ModelConfig)
    add_config_args(p, C.TrainConfig)

    p = command("caption", cmd_caption, "caption images with a trained run",
                "Caption image files (or every image in a folder) with the best model of a "
                "run. Images are decoded and resized exactly as extract-features did and go "
                "through the same backbone (rebuilt from the run's cache manifest). Prints "
                "the captions best first with their probability p.", (C.DecodeConfig,))
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files or folders (a folder: every image file under it, by "
                        f"extension, any case: {' '.join(C.IMAGE_EXTENSIONS)}; a note counts "
                        "the other files)")
    p.add_argument("--run", required=True, metavar="DIR", help="run folder made by `train`")
    p.add_argument("--json", action="store_true",
                   help="print JSON with each word's 8x8 attention map")
    p.add_argument("--plot-attention", metavar="DIR",
                   help="save a heatmap PNG per image (best caption) into DIR")
    p.add_argument("--cache", metavar="DIR",
                   help="feature cache whose backbone captions the images (default: the one "
                        "the run was trained on, as config.json records it); for a cache that "
                        "moved: it must hold features of the same backbone")
    add_config_args(p, C.DecodeConfig)

    p = command("evaluate", cmd_evaluate, "coco-caption metrics of a run on a split",
                "Decode a split of the run's dataset from the feature cache and score it "
                "with pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr; METEOR needs Java) "
                "and, for the shapes dataset, scene accuracy and attention grounding. Writes "
                "a COCO results JSON and a metrics JSON.", (C.DecodeConfig,))
    p.add_argument("--run", required=True, metavar="DIR", help="run folder made by `train`")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="split to evaluate (default: test)")
    p.add_argument("--out", metavar="FILE",
                   help="metrics JSON (default: RUN/eval/SPLIT_metrics.json); the results "
                        "JSON goes next to it as *_results.json")
    p.add_argument("--cache", metavar="DIR",
                   help="feature cache to decode from (default: the run's, as config.json "
                        "records it); for a cache that moved: it must hold features of the "
                        "same backbone")
    p.add_argument("--captions", metavar="FILE",
                   help="caption file with the references (default: the run's); for a file "
                        "that moved (a note says when its references differ from the run's)")
    add_config_args(p, C.DecodeConfig)

    p = command("export", cmd_export, "export a run as a SavedModel (and TFLite model)",
                "Write the whole captioner (image decoding and resizing, InceptionV3, the "
                "decoder, beam search, the vocabulary) into one SavedModel that needs only "
                "TensorFlow: signature serving_default, images (encoded files) -> captions, "
                "scores, words, attention, and every beam's beam_captions and beam_scores. "
                "--tflite adds a TFLite model for devices (one "
                "resized image, greedy). Written to a temporary folder and renamed, so --out "
                "never holds half an export.", (C.DecodeConfig, C.ExportConfig))
    p.add_argument("--run", required=True, metavar="DIR", help="run folder made by `train`")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="export folder (for TF Serving: MODELS/NAME/VERSION, e.g. "
                        "serving/captioner/1)")
    p.add_argument("--cache", metavar="DIR",
                   help="feature cache whose backbone goes into the export (default: the one "
                        "the run was trained on, as config.json records it); for a cache that "
                        "moved: it must hold features of the same backbone")
    add_config_args(p, C.DecodeConfig, exclude=("sample", "temperature", "top_k", "seed",
                                                 "batch_size", "xla", "xla_min_images"),
                    title="Decoding inside the SavedModel (as `caption`)")
    add_config_args(p, C.ExportConfig)

    p = command("demo", cmd_demo, "run everything offline on the built-in shapes dataset",
                "make-shapes -> extract-features (seeded random backbone, no network) -> "
                "train -> evaluate -> caption test images with attention heatmaps, all in "
                "one work folder; prints the metrics and where the TensorBoard logs, "
                "heatmaps and model are.", (C.DemoConfig,))
    add_config_args(p, C.DemoConfig)
    return parser


# Flags that name a file or folder. Given as an empty string (`--out "$OUT"` with OUT unset)
# several meant "the default" (`--plot-attention ""` drew no heatmaps, `evaluate --out ""`
# wrote the run's own metrics file, `--cache ""` used the run's cache): refused instead.
PATH_FLAGS = ("run", "out", "cache", "captions", "images", "plot_attention")


def check_path_flags(args: argparse.Namespace) -> None:
    for name in PATH_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            flag = "OUT" if args.command == "make-shapes" else f"--{name.replace('_', '-')}"
            raise UserError(f"{flag} must name a file or folder, got an empty string")


# The exit status of a Unix tool killed by SIGPIPE (128 + 13), as a shell shows it.
EXIT_STDOUT_CLOSED = 141


def stdout_is_closed() -> bool:
    """Whether nobody reads stdout any more (a pipe whose reader exited), so that a broken
    pipe from anything else is still reported as an error."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):   # a stdout object without a descriptor
        return False        # (io.StringIO, a notebook's) never raises a broken pipe itself
    if not hasattr(select, "poll"):   # Windows: cannot tell, so it stays an error
        return False
    poll = select.poll()
    poll.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))


def stdout_closed() -> int:
    """The reader of stdout went away (`caption ... | head -n 2`): end quietly, as Unix tools
    do, with their status. What was printed stays printed; stdout now points at /dev/null so
    that the interpreter's flush of the unwritten rest at exit raises nothing either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):   # no file descriptor (tests, notebooks)
        pass
    return EXIT_STDOUT_CLOSED


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a batch scheduler's time limit, `docker stop`): raised in the main
    thread like Ctrl-C's KeyboardInterrupt, so that the same clean-up runs (a training run
    keeps its finished epochs and the heatmaps being drawn, export removes its temporary
    folder), then exit 143 (128 + 15, what the shell shows for a process SIGTERM ended)."""


def _terminated(signum, frame) -> None:
    # a second SIGTERM ends the process at once (clean-up hung, or the sender insists)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def _stop_after_finalizer(unraisable) -> None:
    """`sys.unraisablehook` of the program: a Ctrl-C or SIGTERM whose handler ran inside a
    finalizer (a `__del__`, a weakref callback: TensorFlow's objects have many) raised there,
    where Python prints the exception ("Exception ignored in ...", a traceback) and goes on:
    the command went on to exit 0, and a later SIGTERM killed it without clean-up. The
    signal is raised again at the main thread's next call of a C function, out of the
    finalizer (in another finalizer, this comes again); other exceptions as before."""
    if not (isinstance(unraisable.exc_type, type)
            and issubclass(unraisable.exc_type, KeyboardInterrupt)
            and threading.current_thread() is threading.main_thread()):
        sys.__unraisablehook__(unraisable)
        return
    signum = signal.SIGINT
    if issubclass(unraisable.exc_type, Terminated):
        signum = signal.SIGTERM
        signal.signal(signal.SIGTERM, _terminated)   # it set the default, for a second one

    def again(frame, event, arg) -> None:
        if event == "c_call":   # (an exception of a "call" event can be lost: Python 3.11)
            sys.setprofile(None)
            signal.raise_signal(signum)   # its handler raises here, into the caller
    sys.setprofile(again)


def _open_closed_standard_streams() -> None:
    """stdin, stdout or stderr closed when the program starts (`2>&-`, `>&-`, some daemons')
    opened on /dev/null instead: Python had made sys.stderr None, so every TensorFlow
    command ended in an AttributeError with nowhere to show it (exit 1, not a word), a closed
    stdout ended commands in a traceback after their work was done, and the files the
    program opened took those descriptors, where TensorFlow's C++ logging could write."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)  # the lowest: fd
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False))


def _escape_undecodable_output() -> None:
    """stdout writes a path whose bytes are not UTF-8 as those bytes, as `ls` prints it (and
    as Python's stdout does in the C locale): a summary naming such a path (export's agreement
    note, of the run's images folder) ended in a UnicodeEncodeError traceback on a UTF-8
    stdout, after the command's work. (Messages escape such bytes as \\xNN themselves.)"""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and sys.stdout.errors == "strict":
        reconfigure(errors="surrogateescape")


# Commands that run TensorFlow (the others never import it, so they start at once).
USES_TENSORFLOW = ("extract-features", "train", "caption", "evaluate", "export", "demo")


def entry() -> int:
    """The `caption-attn` program (console script, `python -m caption_attn`): `main`, then
    `exit_past_hdf5` (only here: `main` is also called in-process, by tests and scripts,
    where ending the interpreter is not its to do), with SIGTERM handled as `Terminated`
    and a stop handled inside a finalizer raised again out of it (`_stop_after_finalizer`;
    also only here: signal handling belongs to the program, not to a library call)."""
    _open_closed_standard_streams()
    _escape_undecodable_output()
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:   # one the parent ignored stays so
        signal.signal(signal.SIGTERM, _terminated)
    sys.unraisablehook = _stop_after_finalizer
    # Loading a COCO-sized caption file keeps ~1 M Python objects alive, and the collector's
    # default thresholds ran 14 full passes over them (0.4 s each) while it loaded: 35-50 %
    # of `train`, `inspect`, `evaluate` and `extract-features` start-up at 123k images
    # (linear again with these thresholds, at the same peak memory)
    gc.set_threshold(100_000, 50, 100)
    try:
        code = main()
    except KeyboardInterrupt as e:   # before `main` could say it (while parsing the flags):
        terminated = isinstance(e, Terminated)      # Ctrl-C there showed a traceback
        print(f"{PROG}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        code = 143 if terminated else 130
    except BaseException:
        if not hdf5_write_failed():
            raise
        traceback.print_exc()
        code = 1
    return exit_past_hdf5(code)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:   # said by the command's parser: the top one gave its usage, no command
            args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # --help, --version, usage errors (exit 2)
        return int(e.code or 0)
    try:
        check_flags(args)
        if args.command in USES_TENSORFLOW:
            from caption_attn.quiet import import_tensorflow
            # a multi-worker strategy must configure TF's runtime before any tensor exists;
            # what the import makes lives as long as the program: frozen, never scanned
            import_tensorflow(meet_dtypes=getattr(args, "strategy", None) != "multi-worker",
                              freeze=True)
        code = int(args.func(args) or 0)
        # what is still buffered (stdout to a pipe is block-buffered) goes out here, where a
        # reader gone away is caught below, not in the interpreter's flush at exit (exit 120)
        say(flush=True)
        return code
    except UserError as e:
        # the messages name files: a control character in a file name (a terminal escape,
        # a carriage return, a newline) is printed escaped, never sent to the terminal; a
        # refusal that lists things has them as lines of their own
        print(f"{PROG} {args.command}: error: "
              + "\n".join(one_line(line) for line in (e.message, *e.lines)), file=sys.stderr)
        return flushed(e.exit_code)
    except OSError as e:  # a file where a folder is expected, a read-only folder, a full disk
        if isinstance(e, BrokenPipeError) and stdout_is_closed():
            return stdout_closed()
        where = f"{one_line(str(e.filename))}: " if e.filename else ""
        # exit 2 ("bad input, nothing was done") only for a path given that cannot be used;
        # a write that failed while the job ran (a full disk, an I/O error) is exit 1
        full = e.errno in DISK_FULL
        advice = f": {free_space('', 'write elsewhere')}" if full else ""
        print(f"{PROG} {args.command}: error: {where}{e.strerror or e}{advice}",
              file=sys.stderr)
        return flushed(2 if e.filename and e.errno in BAD_PATH else 1)
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM under `entry`
        terminated = isinstance(e, Terminated)
        print(f"{PROG} {args.command}: {'terminated' if terminated else 'interrupted'}",
              file=sys.stderr)
        return flushed(143 if terminated else 130)
    except Exception as e:
        said = _other_worker_stopped(args, e)
        if said is None:
            raise
        print(f"{PROG} {args.command}: error: {said}", file=sys.stderr)
        return flushed(1)


def _other_worker_stopped(args: argparse.Namespace, error: Exception) -> Optional[str]:
    """`distribute.other_worker_stopped` of `train --strategy multi-worker`, else None."""
    if args.command != "train" or getattr(args, "strategy", None) != "multi-worker":
        return None
    from caption_attn import distribute
    return distribute.other_worker_stopped(error)


# the errors of a path given that cannot be used (exit 2), not of a write that failed
BAD_PATH = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EEXIST,
            errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL)


def flushed(code: int) -> int:
    """`code`, once what the failed command left in stdout's buffer has gone out: flushed
    at exit instead, to a reader gone away, it turned the error's status into 120 with an
    'Exception ignored ... BrokenPipeError' below the error message."""
    try:
        sys.stdout.flush()
    except OSError:          # a reader gone away, a full disk (`> full/out.json`): the rest
        stdout_closed()      # goes to /dev/null; the command's own error is the news
    return code


if __name__ == "__main__":
    sys.exit(entry())
