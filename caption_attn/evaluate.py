"""The `evaluate` command: decode a split of a trained run, score it, write the files, print.

Scoring itself lives in `coco_metrics` (BLEU, METEOR, ROUGE-L, CIDEr; the COCO results JSON)
and `shapes_metrics` (scene accuracy, attention grounding); neither needs TensorFlow. This
module loads TensorFlow only inside `evaluate_run`, so printing a metrics table stays light.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Optional

import numpy as np

from caption_attn import data, interrupts
from caption_attn.coco_metrics import COCO_METRICS, coco_metrics, write_results
from caption_attn.config import DecodeConfig, RunConfig
from caption_attn.errors import FREE_SPACE, UserError, WriteFailed, counted
from caption_attn.feature_cache import (describe_problems, feature_path, read_manifest,
                                        repair_command, source_images,
                                        unchecked_images_note, unfound_images_note,
                                        usable_features_checked_in,
                                        using_features)
from caption_attn.fileio import (check_utf8_path, holding_lock, is_inside, printable_json,
                                 read_json, write_json_atomic)
from caption_attn.run import RunFolder, check_folder_writable
from caption_attn.shapes import COLORS, SHAPES
from caption_attn.shapes_metrics import (SHAPES_METRICS, scene_accuracy_by_objects,
                                         shapes_metrics)

DISPLAY_NAMES = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                 "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr",
                 "scene_accuracy": "scene accuracy", "grounding": "grounding",
                 "scene_images": "  over images", "grounding_images": "  over images",
                 "grounded_words": "grounded words",
                 "matched_words": "matched words"}

# what a score on a split other than test is (the note `evaluate` gives with it): only the
# test split played no part in training, so only its scores estimate quality on new images
SPLIT_NOTES = {
    "train": "scored on the train split, which the model trained on: not an estimate of its "
             "quality on new images (use --split test)",
    "val": "scored on the val split, which chose best.keras (and which early stopping "
           "watched): slightly optimistic; --split test is the unbiased one",
}


# --------------------------------------------------------------------------- printing
def _format_value(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    return f"{float(value):.4f}"


def format_metrics(metrics: dict) -> str:
    """Aligned table: the coco metrics (missing ones as n/a), then the shapes metrics present
    (merge `coco_metrics` and `shapes_metrics` results into one flat dict)."""
    rows = [(DISPLAY_NAMES[k], _format_value(metrics.get(k))) for k in COCO_METRICS]
    rows += [(DISPLAY_NAMES[k], _format_value(metrics[k])) for k in SHAPES_METRICS
             if k in metrics]
    by_objects = metrics.get("scene_accuracy_by_objects") or {}
    rows += [(f"  with {counted(n, 'object')}", _format_value(v))
             for n, v in by_objects.items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value:>8}" for name, value in rows)


# --------------------------------------------------------------------------- a run's split
@dataclasses.dataclass
class _SplitFeatures:
    """The images of a run's split that have a valid feature file, and what scoring needs."""

    split: str
    cache: str                          # the run's feature cache folder
    keys: list[str]                     # images with a valid feature file, in split order
    without: list[str]                  # images left out: feature file missing or wrong size
    records: dict                       # image key -> data.ImageRecord
    manifest: dict                      # the cache's manifest.json
    reader: object                      # pipeline.NpyReader of the cache
    problems: str = ""                  # why images were left out (describe_problems)
    references_note: str = ""           # how the references differ from the run's captions
    objects_note: str = ""              # how the ground-truth objects differ from the run's
    images_note: str = ""               # that the source images could not be checked
    places: Optional[list] = None       # each key's place in the split (its --sample stream)
    repeated_note: str = ""             # the split's CSV rows read once as repeats
    images_dir: Optional[str] = None    # where the source images were checked


def _load_split(run_dir: str, split: str, run_cfg: RunConfig, cache: str,
                captions: str) -> _SplitFeatures:
    """The run's `split` (split.json), its records (from `captions`) and which of them have a
    feature file in `cache`."""
    from caption_attn import pipeline

    run = RunFolder(run_dir)
    splits = run.load_splits()
    if split not in splits:
        raise UserError(f"--split must be one of {sorted(splits)}, got {split!r}")
    if not splits[split]:
        others = [s if s != "train" else "train, whose images it was trained on: scores "
                  "there flatter it" for s in ("test", "val", "train") if splits.get(s)]
        raise UserError(f"the run's {split} split is empty ({run.split}): nothing to "
                        f"evaluate; choose another with --split ({'; '.join(others)})")
    # split.json decides the split, never Flickr8k's lists beside the file now: read, a list
    # that since lost an image left it out of the references (scored on fewer, a note
    # blaming the caption file), and one moved away stopped evaluate
    loaded = data.load_dataset(captions, run_cfg.data, lists=False)
    records = {r.image: r for r in loaded.records}
    # an image of the split whose captions all lack a word ("." "!!") is no image to train
    # on, but pycocoevalcap scores it against them (about 0): so does evaluate, with a note
    in_split = set(splits[split])
    silent = [r for r in loaded.wordless_only if r.image in in_split]
    records.update((r.image, r) for r in silent)
    manifest = read_manifest(cache)
    run.check_cache(cache, manifest)
    reader = pipeline.NpyReader.from_manifest(manifest)
    recorded = run.caption_data()
    changes = recorded and data.caption_changes(recorded, splits, records.values(), only=split)
    note = (f"the references in {captions} differ from the captions the run was trained with "
            f"in its {split} split: {changes}; the scores are against {captions}"
            if changes else "")
    keys = [k for k in splits[split] if k in records]
    objects_note = _objects_note(recorded, splits, records, split, captions)
    absent = [k for k in splits[split] if k not in records]
    if absent and keys and not recorded:
        # a run made before runs recorded their caption data: `caption_changes` cannot say
        # that images are gone, and the split would be scored on fewer images without a word
        verb = "is" if len(absent) == 1 else "are"
        note = (f"{len(absent)} of the {len(splits[split])} images of the run's {split} split "
                f"{verb} not in {captions} (e.g. {absent[0]!r}): scored the other {len(keys)}")
    if silent:
        note = "; ".join(filter(None, [note, _wordless_note(silent, split, captions)]))
    if not keys:
        raise UserError(f"{captions} has none of the {len(splits[split])} images of the run's "
                        f"{split} split: is it the caption file the run was trained with?")
    digests = {}
    # checked where train checked them (not the cache's last folder, which may since have
    # replaced same-named images' features: they were scored as this run's images, exit 0)
    checked_in = run.images_dir()
    folder = checked_in or source_images(manifest)
    unfound: list = []
    usable, problems = usable_features_checked_in(cache, keys, manifest, checked_in,
                                                  run.image_digests(), digests, unfound)
    run.check_image_digests(cache, keys, digests, folder or manifest.get("images_dir"),
                            f"{split} ")
    without = [k for k in keys if k not in usable]
    keys = [k for k in keys if k in usable]
    why = describe_problems(problems, cache, manifest=manifest, captions=captions,
                            images_dir=folder) \
        if problems else ""
    if not keys:
        raise UserError(f"no images of the {split} split have usable features: {why}")
    place = {k: i for i, k in enumerate(splits[split])}
    unchecked = unchecked_images_note(cache, manifest, folder, run.images_dir(existing=False),
                                      fix=" (scored as they are)") or \
        unfound_images_note(unfound, len(keys), folder, cache) or ""
    return _SplitFeatures(split, cache, keys, without, records, manifest, reader, why, note,
                          objects_note, unchecked, [place[k] for k in keys],
                          loaded.repeated_note(in_split, f" for images of the {split} split")
                          or "", images_dir=folder)


def _wordless_note(silent: list, split: str, captions: str) -> str:
    """What `evaluate` says of the `silent` records of its `split`: images whose captions in
    `captions` all lack a word, scored against them as pycocoevalcap scores them."""
    first, one = silent[0], len(silent) == 1
    return (f"{counted(len(silent), 'image')} of the {split} split {'has' if one else 'have'} "
            f"only captions without a word in {captions} ({'' if one else 'e.g. '}"
            f"{first.image!r}: {', '.join(repr(c) for c in first.wordless[:3])}): scored "
            f"against them, as "
            f"pycocoevalcap scores such an image (they hold no word to match, so about 0 on "
            f"every metric), not left out")


def _objects_note(recorded: Optional[dict], splits: dict, records: dict, split: str,
                  captions: str) -> str:
    """What `evaluate` says when the ground-truth objects of the `split` images in `captions`
    (`records`) are not the ones the run recorded (scene accuracy and grounding score against
    them), could not be compared (a run made before it recorded them) or are gone (the run
    had them; then there is no scene accuracy or grounding); else ""."""
    if not any(records[k].objects is not None for k in splits[split] if k in records):
        digests = recorded["objects"].get(split) if data.objects_recorded(recorded) else None
        had = isinstance(digests, list) and any(d is not None for d in digests)
        return (f"{captions} has no ground-truth `objects` for the images of the {split} "
                f"split, which the run was trained with: scene accuracy and grounding are not "
                f"computed" if had else "")
    if not data.objects_recorded(recorded):
        return (f"the run did not record the ground-truth `objects` of its images (made "
                f"before runs recorded them): scene accuracy and grounding are against the "
                f"ones in {captions}, which could not be compared with the run's")
    changes = data.objects_changes(recorded, splits, records.values(), split)
    return (f"the ground-truth `objects` in {captions} differ from the ones the run was "
            f"trained with in its {split} split: {changes}; scene accuracy and grounding are "
            f"against {captions}" if changes else "")


def _check_outputs(metrics_path: str, results_path: str, given: bool = True) -> None:
    """Before any decoding: both outputs must be files that can be written, and replace only
    what an earlier `evaluate` wrote (an --out that names the caption file, the run's
    config.json or the cache's manifest would otherwise be overwritten), and not captions
    that another metrics file names (`_metrics_naming`). `given`: the user
    named `metrics_path` with --out; else it is the run's default, and the errors say so
    instead of naming a flag the user did not give."""
    name = f"--out {metrics_path}" if given else f"the default output {metrics_path}"
    other = "choose another --out" if given else "pass --out FILE"
    if os.path.isdir(metrics_path) or metrics_path.endswith(("/", os.sep)):
        raise UserError(f"{name}: is a folder; give the metrics JSON file to write, e.g. "
                        f"{os.path.join(metrics_path, 'test_metrics.json')}")
    if os.path.isdir(results_path):
        raise UserError(f"{name}: its captions go to {results_path}, which is a folder; move "
                        f"that folder or {other}")
    if os.path.exists(metrics_path) and not _is_metrics(metrics_path):
        raise UserError(f"{name}: {metrics_path}, which exists and was not written by "
                        f"`caption-attn evaluate`; {other} (or remove that file)")
    paired = _metrics_naming(results_path, metrics_path)
    if paired is not None:
        raise UserError(f"{name}: its captions go to {results_path}, which {paired}, the "
                        f"metrics file of another `caption-attn evaluate`, names: its scores "
                        f"would stand beside this one's captions; {other} (or remove both "
                        f"{paired} and {results_path})")
    # the run's own eval/ (no --out): a results file left by an evaluate that died between
    # its two files (a full disk, a kill) is that evaluate's, not another tool's
    if os.path.exists(results_path) and not _is_results(results_path, metrics_path) and not (
            not given and _is_results_list(results_path)):
        raise UserError(f"{name}: its captions go to {results_path}, which exists and no "
                        f"metrics file of `caption-attn evaluate` names it ({metrics_path}): "
                        f"not written by `caption-attn evaluate`, or left by one stopped "
                        f"between its two files; {other} (or remove that file)")
    folder = os.path.dirname(os.path.abspath(metrics_path))
    if given:
        check_folder_writable(folder, "--out", given=metrics_path)
        return
    try:
        check_folder_writable(folder, "the default output folder")
    except UserError as e:
        raise UserError(f"{e}; pass --out FILE") from None


def _check_not_the_runs(run: RunFolder, metrics_path: str, results_path: str) -> None:
    """Neither output may be a path the run itself uses, existing or not yet: `--out
    RUN/eval` made a file where the eval/ folder goes (every later evaluate without --out
    failed), `--out RUN/cider_df.json` one that a later self-critical `train` would read."""
    own = {os.path.realpath(run.file(n)): n for n in RunFolder.FILES + RunFolder.DIRS}
    for path in (metrics_path, results_path):
        name = own.get(os.path.realpath(path))
        what = "" if path == metrics_path else f"its captions go to {path}, "
        if name is not None:
            raise UserError(f"--out {metrics_path}: {what}the run's own {name} (`train` and "
                            f"`evaluate` use that path); choose another --out, e.g. "
                            f"{run.file(os.path.join('eval', 'my_metrics.json'))}")
        # inside the folders train manages (not eval/, evaluate's own): a resume deletes the
        # heatmaps of epochs it trains again, --fresh all of them
        for folder in RunFolder.DIRS:
            if folder != "eval" and is_inside(path, run.file(folder)):
                raise UserError(f"--out {metrics_path}: {what}inside the run's {folder}/, "
                                f"which `train` manages (a resume or --fresh deletes files "
                                f"there); choose another --out, e.g. "
                                f"{run.file(os.path.join('eval', 'my_metrics.json'))}")


def _check_not_in_cache(run: RunFolder, metrics_path: str, results_path: str,
                        cache: str) -> None:
    """Neither output may go into the feature cache (as `export` refuses an --out there):
    `--out CACHE/m.json` wrote the metrics among the features `extract-features` owns."""
    for path in (metrics_path, results_path):
        if is_inside(path, cache):
            raise UserError(f"--out {metrics_path}: inside the feature cache {cache}; choose "
                            f"another --out, e.g. "
                            f"{run.file(os.path.join('eval', 'my_metrics.json'))}")


def _read_json_or_none(path: str):
    try:
        return read_json(path)
    except UserError:          # unreadable or not JSON: not an output of ours
        return None


def _is_metrics(path: str) -> bool:
    """Whether `path` is a metrics JSON of `evaluate_run` (it names itself in it)."""
    found = _read_json_or_none(path)
    return isinstance(found, dict) and "metrics_file" in found and "split" in found


def _is_results(path: str, metrics_path: str) -> bool:
    """Whether `path` is the results JSON of an earlier `evaluate`: a COCO results list of
    {"image_id", "caption"} that its metrics file `metrics_path`, beside it, names. The list
    alone is any captioning tool's results format, and `[]` passed too: another model's
    results were replaced without a word."""
    return _is_results_list(path) and _names_results(_read_json_or_none(metrics_path), path)


def _names_results(metrics, results_path: str) -> bool:
    """Whether `metrics` (a JSON value read) is a metrics JSON of `evaluate_run` that names
    the results file `results_path` (by file name: a run folder copied or moved keeps them a
    pair)."""
    return isinstance(metrics, dict) and "metrics_file" in metrics and "split" in metrics \
        and isinstance(metrics.get("results_file"), str) and \
        os.path.basename(metrics["results_file"]) == \
        printable_json(os.path.basename(results_path))


# a metrics JSON is a few KB: bigger files beside the outputs (a COCO caption file of
# hundreds of MB) are not parsed in search of one (`_metrics_naming`)
_METRICS_MAX_BYTES = 2 ** 20


def _metrics_naming(results_path: str, metrics_path: str) -> Optional[str]:
    """Another metrics file of `evaluate` beside `results_path` that names it, or None.
    `--out D/x.json` and `--out D/x_metrics.json` (and the default eval/test_metrics.json
    and `--out eval/test.json`) share D/x_results.json: the second replaced the captions
    the first's scores are of, exit 0 both times. Read are the .json files there and those
    whose names give that results file (`--out D/x`); one counts when it was written in
    this folder (`_written_in`): a copy of another run's metrics names that run's captions,
    but one renamed here (eval/test_epoch5.json) names these."""
    folder, own = os.path.split(results_path)
    try:
        names = sorted(os.listdir(folder or "."))
    except OSError:   # not made yet (or not listable: then nothing to tell)
        return None
    stem = own.removesuffix("_results.json")
    for name in names:
        path = os.path.join(folder, name)
        if name in (own, os.path.basename(metrics_path)) or not (
                name.endswith(".json") or
                os.path.splitext(name)[0].removesuffix("_metrics") == stem):
            continue
        with contextlib.suppress(OSError):   # gone meanwhile
            found = _read_json_or_none(path) if os.path.isfile(path) and \
                os.path.getsize(path) <= _METRICS_MAX_BYTES else None
            if _names_results(found, results_path) and _written_in(found, folder, name):
                return path
    return None


def _written_in(metrics: dict, folder: str, name: str) -> bool:
    """Whether the metrics JSON read from `folder`/`name` was written in `folder` (under
    this name, or renamed since): the path it records is there. A relative one is taken
    from here; by name it is, wherever the folder moved."""
    recorded = metrics["metrics_file"]
    if not isinstance(recorded, str):
        return False
    here = {printable_json(os.path.abspath(folder or ".")),
            printable_json(os.path.realpath(folder or "."))}
    return os.path.basename(recorded) == printable_json(name) or \
        os.path.abspath(os.path.dirname(recorded) or ".") in here


def _is_results_list(path: str) -> bool:
    """Whether `path` holds a COCO results list, [{"image_id", "caption"}, ...]."""
    found = _read_json_or_none(path)
    return isinstance(found, list) and all(
        isinstance(r, dict) and set(r) == {"image_id", "caption"} for r in found)


# damaged feature files `evaluate` leaves out, each found by decoding the split again: more
# mean a damaged cache, said as one error (the split decoded once per file left out)
MAX_DAMAGED = 3


def _decode(captioner, found: _SplitFeatures, progress: bool) -> dict:
    """Image key -> the best `Caption` of `captioner`, decoded from the cached features."""
    from caption_attn import pipeline
    from caption_attn import progress as progress_lib
    from caption_attn.captioner import NO_CAPTION

    damaged = []
    while True:
        bar = progress_lib.bar(len(found.keys), progress, unit_name="image", periodic=True)
        batches = pipeline.image_dataset([feature_path(found.cache, k) for k in found.keys],
                                         captioner.cfg.batch_size, found.reader)
        try:
            decoded = captioner.decode_batches((b.numpy() for b in pipeline.checked(batches)),
                                               bar, found.places)
            break
        except pipeline.DamagedFeatures as e:   # damaged, or gone since the check
            # one image of many: left out with the repair (as a missing file is), the rest
            # decoded again without it; it ended the whole evaluate before
            where = [i for i, k in enumerate(found.keys)
                     if feature_path(found.cache, k) == e.path]
            repair = repair_command(found.cache, found.manifest, images_dir=found.images_dir)
            if not where or len(found.keys) == 1 or len(damaged) == MAX_DAMAGED:
                more = (f" ({len(damaged)} other damaged file(s) found before it: "
                        f"{', '.join(d.path for d in damaged)})" if damaged else "")
                raise UserError(e.advice(repair, "evaluate again") + more) from None
            if progress:
                print(file=sys.stdout, flush=True)   # past the bar the error cut short
            found.without.append(found.keys.pop(where[0]))
            found.places.pop(where[0])
            damaged.append(e)
        except UserError:   # out of memory in a batch (`Captioner.decode_batches`)
            if progress:
                print(file=sys.stdout, flush=True)   # past the bar the error cut short
            raise
    if damaged:
        found.problems = ". ".join(filter(None, [found.problems, (
            f"{len(damaged)} damaged feature file(s) found while decoding: "
            f"{'; '.join(str(e) for e in damaged[:3])}: repair the cache with `{repair}`, "
            f"then evaluate again")]))
    dead = [k for k, c in zip(found.keys, decoded) if not c]
    if dead:
        raise UserError(f"{len(dead)} of the {len(found.keys)} {found.split} images (e.g. "
                        f"{dead[0]!r}): {NO_CAPTION}; nothing was scored: check the run's "
                        f"history.json for a loss that went wrong, and caption an image "
                        f"with `caption-attn caption` to see the model's output",
                        exit_code=1)
    return {k: c[0] for k, c in zip(found.keys, decoded)}


def _decode_settings(captioner) -> dict:
    """How the captions were decoded, as the metrics JSON records it: every setting that
    changes them (`--max-length`, and the sampling flags of `--sample`), not just the beam,
    and none that the method does not use (greedy decoding has no length penalty)."""
    cfg = captioner.cfg
    settings = {"method": cfg.method}
    if cfg.method == "sample":  # the beam width and length penalty are not used
        settings.update(max_length=captioner.max_length, temperature=cfg.temperature,
                        top_k=cfg.top_k, seed=cfg.seed)
    elif cfg.method == "greedy":  # --beam 1: one hypothesis, nothing to rank by length
        settings.update(beam=cfg.beam, max_length=captioner.max_length)
    else:
        settings.update(beam=cfg.beam, length_penalty=cfg.length_penalty,
                        max_length=captioner.max_length)
    return settings


def _score(found: _SplitFeatures, hypotheses: dict, best: dict,
           use_java: Optional[bool]) -> dict:
    """The coco metrics of `hypotheses` and their notes, then the shapes metrics of `best`
    (captions with words and attention) when the records have ground-truth objects."""
    records = found.records
    # with the captions without a word ("."): pycocoevalcap scores against them too
    references = {k: records[k].captions + records[k].wordless for k in found.keys}
    metrics, notes = coco_metrics(references, hypotheses, use_java=use_java)
    notes[:0] = [n for n in (SPLIT_NOTES.get(found.split), found.references_note,
                             found.repeated_note, found.objects_note) if n]
    if found.images_note:
        notes.append(found.images_note)
    if found.without:
        notes.append(f"{counted(len(found.without), 'image')} of the {found.split} split "
                     f"{'was' if len(found.without) == 1 else 'were'} left out: "
                     f"{found.problems}")
    result = {**metrics, "notes": notes}
    objects = {k: records[k].objects for k in found.keys if records[k].objects is not None}
    # objects the shapes metrics cannot read ("Red", "cube": another dataset's ground truth,
    # which no caption file check refuses) scored their image wrong whatever the caption
    # said, and grounding found none of their words: left out, with a note
    unknown = {k: o for k, objs in objects.items() for o in objs
               if o["color"] not in COLORS or o["shape"] not in SHAPES}
    if unknown:
        key, example = next(iter(unknown.items()))
        notes.append(f"scene accuracy and grounding leave out {len(unknown)} images whose "
                     f"`objects` name a colour or shape the shapes metrics do not know (e.g. "
                     f"{example['color']!r} {example['shape']!r} in {key!r}; they know "
                     f"{', '.join(COLORS)} and {', '.join(SHAPES)}, lower-case)")
        objects = {k: v for k, v in objects.items() if k not in unknown}
    if objects:
        # boxes are pixels of the original image: without its size they cannot be put on
        # the attention grid (taking the cache's 299 misplaced every box of other sizes)
        # (and images whose objects have no box are not grounding's: they would count in
        # grounding_images without a word that could be grounded)
        boxed = [k for k in objects if any(o.get("bbox") is not None for o in objects[k])]
        sized = [k for k in boxed if records[k].size is not None]
        unsized = [k for k in boxed if records[k].size is None]
        captions = {k: hypotheses[k] for k in objects}
        result.update(shapes_metrics(captions, {k: best[k].words for k in sized},
                                     {k: best[k].attention for k in sized}, objects,
                                     {k: records[k].size for k in sized}))
        result["scene_accuracy_by_objects"] = scene_accuracy_by_objects(captions, objects)
        if len(objects) < len(found.keys):
            notes.append(f"scene accuracy and grounding are over the {len(objects)} of the "
                         f"{len(found.keys)} images that have ground-truth `objects` in the "
                         f"caption file")
        if unsized:
            notes.append(f"grounding leaves out {len(unsized)} images whose objects have "
                         f"boxes but whose entries in the caption file have no valid `height` "
                         f"and `width` (e.g. {unsized[0]!r}): boxes are in pixels of the "
                         f"original image, which cannot be placed on the attention grid "
                         f"without its size; add them to score grounding on these images")
        unboxed = [k for k in objects if k not in boxed]
        if unboxed:
            notes.append(f"grounding leaves out {len(unboxed)} images whose objects have no "
                         f"`bbox` in the caption file (e.g. {unboxed[0]!r}): there is no box "
                         f"for their words' attention to land in")
    return result


def evaluate_run(run_dir: str, split: str = "test", cfg=None, out: Optional[str] = None,
                 progress: bool = True, use_java: Optional[bool] = None,
                 cache: Optional[str] = None, captions: Optional[str] = None) -> dict:
    """Decode a split of a trained run from its feature cache, score it, write the files.

    Writes the COCO results JSON (`[{"image_id", "caption"}]`) and the metrics JSON (`out`,
    default `<run>/eval/<split>_metrics.json`; results next to it as `*_results.json`), both
    checked to be writable before anything is decoded. `cache` and `captions` replace the
    run's feature cache and caption file (moved, or copies). Returns the metrics dict (also
    holding the paths written).
    """
    from caption_attn.captioner import Captioner, check_run

    run = RunFolder(run_dir)
    # a --run that is no run first: its best.keras given as the run was told of a default
    # output folder inside that file and to pass --out FILE, which then met this refusal
    run.check_is_run()
    metrics_path, results_path = run.eval_outputs(split, out)
    # the run's own paths first: `--out RUN/logs`, a folder, was told to write
    # RUN/logs/test_metrics.json, inside the folder train manages (refused in turn)
    _check_not_the_runs(run, metrics_path, results_path)
    _check_outputs(metrics_path, results_path, given=out is not None)
    # no `train --fresh` deleting the run meanwhile, and one evaluate per --out at a time
    with run.reading_lock("evaluate"), contextlib.ExitStack() as hold:
        # every flag and file before the model is loaded: the run, the cache, the caption
        # file, then the split's records and features (a bad --cache or --captions was
        # reported after)
        run_cfg = run.load_config()
        if out is not None:
            _check_not_in_cache(run, out, results_path, cache or run_cfg.cache)
        check_utf8_path("--cache" if cache else f"{run.config}: cache", cache or run_cfg.cache,
                        "reads the feature files")
        check_run(run, cache or run_cfg.cache, cache is not None,
                  needed_for="evaluate reads the split's features from it")
        # once the run is known to be one (the lock's folder is made for it: RUN/eval/),
        # and the outputs checked again under it
        hold.enter_context(_writing_outputs(metrics_path, results_path, given=out is not None))
        _check_outputs(metrics_path, results_path, given=out is not None)
        # no extract-features may write the cache while it is read (nor be writing it now)
        with using_features(cache or run_cfg.cache, writing=False):
            found = _load_split(run_dir, split, run_cfg, cache or run_cfg.cache,
                                _captions_file(captions, run_cfg.captions))
            # which best model is scored, read with it: after a resumed `train` saves a new
            # best, an earlier metrics file could not be told from a current one (nor one
            # made while `train` replaced best.keras under the load)
            captioner, best_record = run.read_best_unchanged(
                lambda: Captioner.from_run(run_dir, cfg or DecodeConfig(), cache=cache),
                "evaluate", "evaluate")
            best = _decode(captioner, found, progress)
        hypotheses = {k: c.text for k, c in best.items()}
        result = {"run": run_dir, "split": split, "best": best_record,
                  "images": len(found.keys), "images_without_features": len(found.without),
                  "decode": _decode_settings(captioner),
                  **_score(found, hypotheses, best, use_java)}
        result.update(metrics_file=metrics_path, results_file=results_path)
        write_outputs(result, hypotheses,
                      {k: found.records[k].image_id for k in found.keys})
    return result


@contextlib.contextmanager
def _writing_outputs(metrics_path: str, results_path: str, given: bool):
    """Held from `_check_outputs` until the metrics are written: an exclusive flock on
    `.NAME.lock` beside the metrics file (its folder made for it), and one on the results
    file's (beside it). Two evaluates with one --out paired one's metrics with the other's
    captions, or the second crashed after decoding on the file the first had just replaced;
    two whose --out differ but share a results file (`--out D/x.json`, `--out
    D/x_metrics.json`) both wrote it."""
    folder, name = os.path.split(os.path.abspath(metrics_path))
    flag = f"--out {metrics_path}" if given else f"the default output {metrics_path}"
    other = "choose another --out" if given else "pass --out FILE"
    with holding_lock(os.path.join(folder, f".{name}.lock"), lambda who: (
            f"{flag}: another `caption-attn evaluate`{who} is writing it now; two would "
            f"write their metrics and captions over each other: wait for it to end, or "
            f"{other}"), make_folder=True), holding_lock(
            os.path.join(folder, f".{os.path.basename(results_path)}.lock"), lambda who: (
            f"{flag}: another `caption-attn evaluate`{who} is writing {results_path} now, "
            f"where this one's captions go; two would write their captions over each other: "
            f"wait for it to end, or {other}")):
        yield


def _captions_file(captions: Optional[str], recorded: str) -> str:
    """The caption file with the references (`captions`, the --captions flag, or the run's
    `recorded` one), refused when it does not exist or is a folder."""
    path = recorded if captions is None else captions
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        if captions is not None:
            raise UserError(f"--captions {captions}: {what}; give the caption file with the "
                            f"references (the run was trained on {recorded})")
        raise UserError(f"the run's caption file {recorded} {what}: evaluate reads the "
                        f"references from it; if it moved, pass --captions NEW_FILE")
    return path


def write_outputs(result: dict, hypotheses: dict, image_ids: dict) -> None:
    """The results file (`result["results_file"]`), then the metrics file that names it. An
    earlier evaluate's metrics file goes first: killed between the two writes, this left new
    captions beside the old metrics, a pair that looked whole; now the metrics are missing.
    A Ctrl-C or SIGTERM lands once both are written: results that no metrics file names are
    refused as another tool's by the next evaluate with this --out (`_is_results`)."""
    metrics, results = result["metrics_file"], result["results_file"]
    with interrupts.held():
        if os.path.exists(metrics):
            os.remove(metrics)
        path = results
        try:
            write_results(results, hypotheses, image_ids)
            path = metrics
            # valid UTF-8 whatever the paths' bytes (`_is_results` compares names so written)
            write_json_atomic(metrics, printable_json(result))
        except OSError as e:
            # a full disk (or a folder made read-only): the results file, written now or
            # the earlier evaluate's whose metrics were just removed, would be named by no
            # metrics file, and the rerun of this very command refused it as another tool's
            with contextlib.suppress(OSError):
                os.remove(results)
            left = (f"neither {metrics} nor {results} was left" if not os.path.exists(results)
                    else f"remove {results}, which could not be removed, before the rerun")
            raise WriteFailed(path, e, f"{FREE_SPACE}; {left}") from None
