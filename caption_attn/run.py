"""The run folder (`models/<run>/`): every path in it, opening it to train, loading it to use.

    config.json        RunConfig (absolute paths of the caption file and the feature cache)
    vocab.json         vocabulary (train split only)       split.json    image keys per split,
                                                                         cache identity,
                                                                         caption fingerprint
    history.json       one entry per epoch                 cider_df.json train-split CIDEr-D
                                                                         document frequencies
    checkpoints/       tf.train.CheckpointManager (model, optimizer, counters, RNG states)
    best.keras         the best model (Keras format) + best.json (its epoch and metric, and
                       the sha256 of best.keras and best.weights.h5) + best.weights.h5 (the
                       same weights, from which `train` rewrites a missing or damaged
                       best.keras)
    logs/train, logs/validation   TensorBoard           attention/epoch_K/*.png  heatmaps
    eval/SPLIT_metrics.json, eval/SPLIT_results.json    written by `evaluate`

Nothing else in the package joins these names by hand.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import os
import re
import tempfile
import zipfile
from typing import Callable, Optional

from caption_attn import interrupts
from caption_attn.config import MONITORS, RunConfig, config_diff
from caption_attn.data import SPLITS
from caption_attn.errors import UserError
from caption_attn.fileio import (file_digest, file_identity, holding_lock, is_inside,
                                 keras_file_atomic, one_line, parse_json, read_json,
                                 write_json_atomic)


_TEMP_NAME = re.compile(r"\.(.+)\.tmp\.\d+\..*", re.S)   # `fileio.temp_name`'s, of NAME
_STATE_TEMP = re.compile(r"checkpoint\.tmp[0-9a-f]{32}")   # TF's atomic write of the state
_WORKER = re.compile(r"worker_\d+")                         # `RunFolder.worker_checkpoints`


@functools.lru_cache(maxsize=1)
def _parsed_split(path: str, identity: tuple):
    """The split.json read last, while it is the same file (`RunFolder._split_field`)."""
    return read_json(path, file_names=True)


def splits_digest(splits: dict) -> str:
    """sha256 of the image keys of every split, in order (split.json's `splits_sha256`)."""
    return hashlib.sha256(json.dumps([splits[s] for s in SPLITS], ensure_ascii=False)
                          .encode()).hexdigest()


def changed_settings_note(saved, new) -> Optional[str]:
    """The note on a resume's changed training settings (TrainConfig `saved` -> `new`), or
    None when none changed (--fresh aside)."""
    changed = [c for c in config_diff(saved, new, "train.") if not c.startswith("train.fresh")]
    return "resuming with changed training settings: " + "; ".join(changed) if changed else None


def _splits_problem(splits: dict) -> Optional[str]:
    """What makes split.json's `splits` other than three disjoint lists of distinct image
    keys named train, val and test (None when nothing does)."""
    if sorted(splits) != sorted(SPLITS):
        names = ", ".join(sorted(map(str, splits))) or "none"
        return f"its splits are {names}, not train, val and test"
    for name in SPLITS:
        keys = splits[name]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            return f"splits.{name} must be a list of image keys (strings)"
        if len(set(keys)) != len(keys):
            twice = next(k for k, n in collections.Counter(keys).items() if n > 1)
            return f"splits.{name} lists {twice!r} twice"
    for a, b in itertools.combinations(SPLITS, 2):
        both = sorted(set(splits[a]) & set(splits[b]))
        if both:
            return (f"{len(both)} image(s) are in both splits.{a} and splits.{b} (e.g. "
                    f"{both[0]!r}): an image must be in one split (one trained on and scored "
                    f"would flatter the metrics)")
    return None


class RunFolder:
    """Paths of one run folder, plus the checks that open it."""

    FILES = ("config.json", "vocab.json", "split.json", "history.json", "best.keras",
             "best.json", "best.weights.h5", "cider_df.json")
    DIRS = ("checkpoints", "logs", "attention", "eval")  # eval/: `evaluate`'s default output
    READING_LOCK = ".reading.lock"   # `reading_lock`, `fresh_lock`

    def __init__(self, path: str):
        if not path or not str(path).strip():
            raise UserError("--run must name a folder, got an empty string")
        self.path = str(path)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    config = property(lambda self: self.file("config.json"))
    vocab = property(lambda self: self.file("vocab.json"))
    split = property(lambda self: self.file("split.json"))
    history = property(lambda self: self.file("history.json"))
    best_model = property(lambda self: self.file("best.keras"))
    best_info = property(lambda self: self.file("best.json"))
    best_weights = property(lambda self: self.file("best.weights.h5"))
    cider_df = property(lambda self: self.file("cider_df.json"))
    checkpoints = property(lambda self: self.file("checkpoints"))
    logs = property(lambda self: self.file("logs"))
    attention = property(lambda self: self.file("attention"))

    def worker_checkpoints(self, task_id: int) -> str:
        """Scratch checkpoints of a non-chief multi-worker task (TensorFlow's convention)."""
        return os.path.join(self.checkpoints, f"worker_{task_id}")

    ATTENTION_EPOCH = re.compile(r"epoch_([0-9]+)")   # the folder names `attention_epoch` makes

    def attention_epoch(self, epoch: int) -> str:
        """Heatmaps of 1-based `epoch`."""
        return os.path.join(self.attention, f"epoch_{epoch}")

    def eval_outputs(self, split: str, out: Optional[str] = None) -> tuple[str, str]:
        """(metrics JSON, COCO results JSON) of `evaluate`: `out` or eval/SPLIT_metrics.json,
        the results next to it as *_results.json."""
        metrics = out or os.path.join(self.path, "eval", f"{split}_metrics.json")
        results = os.path.splitext(metrics)[0].removesuffix("_metrics") + "_results.json"
        return metrics, results

    # ------------------------------------------------------------------ training
    def check_writable(self, cache: str, images_dirs=()) -> None:
        """`UserError` unless the run folder is (or can become) a writable folder of its own:
        not the feature cache or inside it, not inside an images folder of `images_dirs`
        (None entries skipped) nor inside another run's own folders, not an existing folder
        that is not a run and holds other files (training would mix its files with them,
        and `--fresh` could not tell them apart)."""
        check_folder_writable(self.path, "--run")
        # realpath: a symlink on the way (`--run link/run`, link -> the cache) must not hide it
        run, cache = os.path.realpath(self.path), os.path.realpath(cache)
        if is_inside(run, cache):
            raise UserError(f"--run {self.path}: inside the feature cache {cache}; give the "
                            f"run a folder of its own, e.g. models/NAME")
        for images in filter(None, images_dirs):
            if is_inside(run, images):
                raise UserError(f"--run {self.path}: inside the images folder {images} (of "
                                f"the dataset, or one the feature cache was extracted from): "
                                f"its attention heatmaps (PNG files) would be taken for images "
                                f"of the dataset by extract-features and caption; give the run "
                                f"a folder of its own outside it")
        self._refuse_inside_another_run(run)
        self._refuse_files_in_place_of_folders()
        if os.path.isdir(run) and not os.path.exists(self.config):
            # anything but what a train stopped before config.json left (dotfiles, files
            # inside folders named like the run's: --fresh deleted those of others)
            others = self.foreign_files()
            if others:
                shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
                raise UserError(f"--run {self.path}: not a run folder and not empty (it holds "
                                f"{shown}); train into a new or empty folder, e.g. "
                                f"models/NAME")

    def _refuse_files_in_place_of_folders(self) -> None:
        """UserError when a file stands where train writes one of its folders: logs/ (or its
        train/ and validation/) ended train in a TensorFlow traceback once the data was
        loaded, attention/ (or attention/epoch_N/) only after an epoch had trained."""
        places = ["checkpoints", "logs", os.path.join("logs", "train"),
                  os.path.join("logs", "validation"), "attention"]
        attention = self.file("attention")
        if os.path.isdir(attention):
            places += [os.path.join("attention", n) for n in sorted(os.listdir(attention))
                       if self.ATTENTION_EPOCH.fullmatch(n)]
        for place in places:
            path = self.file(place)
            if os.path.lexists(path) and not os.path.isdir(path):
                raise UserError(f"--run {self.path}: {path} is a file, where train keeps its "
                                f"{place}/ folder; move that file away (or remove it), then "
                                f"rerun")

    def _refuse_inside_another_run(self, run: str) -> None:
        """UserError when `run` (a realpath) lies in one of the folders another run above it
        manages (checkpoints/, logs/, attention/, eval/): that run's --fresh deletes them. A
        run above is a folder with train's config.json and its split.json or vocab.json (a
        project's own config.json beside its logs/ is none)."""
        below, parent = run, os.path.dirname(run)
        while parent != below:
            own = os.path.relpath(run, parent).split(os.sep)[0]
            if own in self.DIRS and os.path.isfile(os.path.join(parent, "config.json")) and any(
                    os.path.isfile(os.path.join(parent, n)) for n in ("split.json",
                                                                      "vocab.json")):
                raise UserError(f"--run {self.path}: inside {own}/ of the run {parent}, which "
                                f"that run manages (its --fresh deletes it); give the run a "
                                f"folder of its own, e.g. models/NAME")
            below, parent = parent, os.path.dirname(parent)

    def reopen_notes(self, cfg: RunConfig) -> list[str]:
        """Compare `cfg` with the saved config.json (nothing is written): a run made with
        another data, vocabulary or model configuration is refused (resuming it would mix two
        models); changed training settings and moved files are returned as notes."""
        if not os.path.exists(self.config):
            self._refuse_lost_config()
            return []
        self._refuse_lost_records()
        saved = self.load_config()
        cfg = self.with_recorded_format(cfg)
        # flags that match an edited file would pass, and train on with the checkpoint's
        self._refuse_unrecorded("settings_sha256", saved.settings_digest(),
                                f"{self.config}: its data, vocabulary or model settings are "
                                f"not the ones {self.split} recorded when the run started "
                                f"(edited by hand?), and its checkpoints were made with "
                                f"those; restore the file train wrote, or add --fresh to "
                                f"start this run over")
        fixed = []
        for part in ("data", "vocab", "model"):
            fixed += config_diff(getattr(saved, part), getattr(cfg, part), part + ".")
        if fixed:
            trained = os.path.exists(self.history) or (
                os.path.isdir(self.checkpoints) and bool(os.listdir(self.checkpoints)))
            # (it said "trained" of a run stopped before its first checkpoint)
            how = "trained" if trained else ("set up, by a train stopped before its first "
                                             "checkpoint (nothing trained yet),")
            raise UserError(
                f"{self.path} was {how} with a different configuration:",
                lines=[*(f"  {line}" for line in fixed),
                       "rerun with the same flags to resume, use another --run, or add --fresh "
                       "to start this run over"])
        changed = changed_settings_note(saved.train, cfg.train)
        notes = [changed] if changed else []
        for name in ("captions", "cache"):
            if os.path.abspath(getattr(saved, name)) != os.path.abspath(getattr(cfg, name)):
                notes.append(f"--{name} differs from the run's previous invocation "
                             f"({getattr(saved, name)}); config.json now names the new one")
        return notes

    def with_recorded_format(self, cfg: RunConfig) -> RunConfig:
        """`cfg` with config.json's --format when both read the caption file as the format
        split.json recorded (`auto` resolves to it): `--format karpathy` on a run made with
        `--format auto` was refused as another data configuration. config.json keeps its
        value, which its digest (`RunConfig.settings_digest`) covers."""
        if not os.path.exists(self.config) or not os.path.exists(self.split):
            return cfg
        saved, recorded = self.load_config().data.format, self._split_field("format")
        resolved = lambda f: recorded if f == "auto" else f  # noqa: E731
        if cfg.data.format == saved or not isinstance(recorded, str) or \
                resolved(cfg.data.format) != resolved(saved):
            return cfg
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, format=saved))

    def _refuse_lost_config(self) -> None:
        """A run that has trained (checkpoints, history, a best model) but lost config.json
        is refused: the resume would take today's flags for the settings its checkpoints were
        made with (another --dropout or --max-length trained on, and config.json then said
        so for every epoch), where with the file they are refused."""
        trained = [p for p in (self.checkpoints, self.history, self.best_model,
                               self.best_weights)
                   if (glob.glob(os.path.join(glob.escape(p), "ckpt-*.index"))
                       if p == self.checkpoints else os.path.exists(p))]
        if trained:
            raise UserError(f"{self.config}: missing, but {self.path} has trained "
                            f"({os.path.basename(trained[0])}); it records the data, "
                            f"vocabulary and model settings the run was trained with, and "
                            f"without it today's flags would be taken for them without a word: "
                            f"restore it, use another --run, or add --fresh to start this run "
                            f"over")

    def _refuse_lost_records(self) -> None:
        """A run that has trained but lost its checkpoints (a best model, or history.json
        past epoch 1: the checkpoint is saved before the best model and after the epoch's
        history entry, so a kill in between leaves one entry and nothing else) is refused: it
        would train again from new weights as if it were new, rewrite history.json and replace
        the best model. A run that has trained (checkpoints, history, a best model) but lost
        split.json or vocab.json is refused too: made again from today's files, they could
        pair its weights with other images (validation ones among them), other features or
        other words, and nothing would tell (split.json holds the identity of the feature
        cache and the fingerprint of the caption data the resume checks compare against)."""
        trained = [p for p in (self.history, self.best_model, self.best_weights)
                   if os.path.exists(p)]
        if not glob.glob(os.path.join(glob.escape(self.checkpoints), "ckpt-*.index")):
            kept = [p for p in (self.best_model, self.best_weights, self.best_info)
                    if os.path.exists(p)]
            if len(self.read_history()) > 1:
                kept.insert(0, self.history)
            if kept:
                raise UserError(
                    f"{self.checkpoints}: no checkpoint, but {self.path} has trained "
                    f"({os.path.basename(kept[0])}): training would start over from new "
                    f"weights, rewrite history.json and replace the best model; restore the "
                    f"checkpoints, use another --run, or add --fresh to start this run over")
        if os.path.isdir(self.checkpoints) and os.listdir(self.checkpoints):
            trained.append(self.checkpoints)
        missing = [p for p in (self.split, self.vocab) if not os.path.exists(p)]
        if trained and missing:
            what = ("the run's split, the identity of the feature cache and the fingerprint "
                    "of the caption data it was trained on" if missing[0] == self.split else
                    "the vocabulary its weights were trained with")
            raise UserError(f"{missing[0]}: missing, but {self.path} has trained "
                            f"({os.path.basename(trained[0])}); the file records {what}, and "
                            f"made again from today's files it could pair the trained model "
                            f"with other data without a word: restore it, use another --run, "
                            f"or add --fresh to start this run over")

    def read_history(self) -> list[dict]:
        """history.json's entries ([] without the file), refused with a `UserError` naming
        the file unless it is what `train` writes: a list of objects, the one at index i for
        epoch i + 1, their metrics numbers or null (an edited file would crash the resume, or
        replay other epochs into early stopping)."""
        if not os.path.exists(self.history):
            return []
        entries = read_json(self.history)
        problem = None if isinstance(entries, list) else \
            f"a JSON {type(entries).__name__}, not a list of epoch entries"
        for i, entry in enumerate(entries if problem is None else []):
            if not isinstance(entry, dict) or entry.get("epoch") != i + 1 or \
                    isinstance(entry["epoch"], bool):
                problem = f"entry {i} is not the object of epoch {i + 1}: {str(entry)[:80]}"
            else:
                bad = [k for k in ("loss", "min_delta", *MONITORS) if entry.get(k) is not None
                       and (isinstance(entry[k], bool) or not isinstance(entry[k], (int, float)))]
                if bad:
                    problem = f"epoch {i + 1}'s {bad[0]} is {entry[bad[0]]!r}, not a number"
            if problem:
                break
        if problem:
            raise UserError(f"{self.history}: {problem} (edited by hand?); restore the file "
                            f"train wrote, or add --fresh to start this run over")
        return entries

    @contextlib.contextmanager
    def training_lock(self, shared: bool = False):
        """Held while `train` works on this run: an exclusive flock on RUN/.train.lock
        (`fileio.holding_lock`). Two `train`s of one run (a second terminal, a command rerun
        while the first still ran) restored the same checkpoint and wrote checkpoints,
        history.json and the best model over each other: nothing stopped them. `shared`: the
        workers of a multi-worker run, which train it together (each one's lock shared with
        the others on the same file system), but never beside another `train` (nor a `train
        --fresh`, which deleted their checkpoints under them); the last of them to end
        removes the lock file, as an exclusive holder does. The lock goes with the process,
        also when it is killed; the folder must exist."""
        path = os.path.join(self.path, ".train.lock")
        try:
            with holding_lock(path, lambda who: (
                    f"--run {self.path}: another `caption-attn train`{who} is training this "
                    f"run now; two would write checkpoints, history.json and the best model "
                    f"over each other: wait for it to end (or stop it), or train into another "
                    f"--run"), shared=shared):
                yield
        finally:
            if shared:   # removed unless another holds it (`holding_lock`, exclusive)
                with contextlib.suppress(UserError), holding_lock(path, lambda who: ""):
                    pass

    @contextlib.contextmanager
    def reading_lock(self, command: str):
        """Held while `evaluate`, `export` or `caption` (`command`) use this run: a shared
        flock on RUN/.reading.lock, which `train --fresh` takes exclusive before it deletes
        the run's files (`fresh_lock`). A `train --fresh` run meanwhile deleted the model
        being evaluated, and evaluate then wrote the deleted model's metrics (its best epoch)
        into the fresh run. A folder with no config.json (its own checks refuse it) is not
        locked: nothing is written into a folder that is no run."""
        if not os.path.exists(self.config):
            yield
            return
        with holding_lock(os.path.join(self.path, self.READING_LOCK), lambda who: (
                f"--run {self.path}: `caption-attn train --fresh`{who} is deleting this "
                f"run's files now; wait for it to end (or stop it), then {command} again"),
                shared=True):
            yield

    @contextlib.contextmanager
    def fresh_lock(self):
        """`train --fresh`'s exclusive hold of RUN/.reading.lock around `delete_previous`:
        refused while an `evaluate`, `export` or `caption` reads the run (`reading_lock`)."""
        with holding_lock(os.path.join(self.path, self.READING_LOCK), lambda who: (
                f"--fresh: a `caption-attn evaluate`, `export` or `caption`{who} is reading "
                f"--run {self.path} now; --fresh would delete the model under it: wait for "
                f"it to end (or stop it), or train into another --run")):
            yield

    LOCKS = (".train.lock", READING_LOCK)

    def is_own(self, relpath: str) -> bool:
        """Whether the file `relpath` (relative to the run folder) is one that `train` or
        `evaluate` writes there, by its name (and for an `evaluate --out RUN/eval/NAME`, its
        content): what `--fresh` deletes; anything else is the user's."""
        from caption_attn import checkpoints

        *folders, name = relpath.split(os.sep)
        temp = _TEMP_NAME.fullmatch(name)            # `fileio.temp_name`'s, of an atomic write
        base = temp[1] if temp else name
        if not folders:
            return base in self.FILES or name in self.LOCKS
        top, below = folders[0], folders[1:]
        if top == "checkpoints":
            if below and _WORKER.fullmatch(below[0]):   # `worker_checkpoints`: named alike
                below = below[1:]
            if below:   # a save's shards (`checkpoints.remove_save_leftovers`)
                return len(below) == 1 and bool(checkpoints.TEMP_DIR.match(below[0])) and \
                    bool(checkpoints.TEMP_FILE.match(name))
            return name == "checkpoint" or bool(_STATE_TEMP.fullmatch(name)) or bool(
                checkpoints.CHECKPOINT_FILE.match(name.removeprefix("damaged-")))
        if top == "logs":   # TensorBoard's event files, and their rewrites' temporary files
            return below in ([], ["train"], ["validation"]) and (
                ("tfevents" in name and not name.startswith(".")) or
                name.startswith(".pruned-events.tmp."))
        if top == "attention":   # `AttentionSnapshots`: attention/epoch_K/*.png
            return len(below) == 1 and bool(self.ATTENTION_EPOCH.fullmatch(below[0])) and \
                base.endswith(".png")
        if top == "eval":   # `evaluate`'s outputs, their lock and temporary files
            if base.endswith(("_metrics.json", "_results.json")) or \
                    (name.startswith(".") and name.endswith(".lock")):
                return True
            return base.endswith(".json") and base in self._named_eval_outputs(
                os.path.join(self.path, *folders))
        return False

    @staticmethod
    def _named_eval_outputs(folder: str) -> set:
        """The names of the metrics files of `evaluate` in `folder` (`--out` names them as
        told) and of the results files they name."""
        from caption_attn.evaluate import _is_metrics

        names = set()
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            path = os.path.join(folder, name)
            if name.endswith(".json") and os.path.isfile(path) and _is_metrics(path):
                names.add(name)
                results = read_json(path).get("results_file")
                if isinstance(results, str):
                    names.add(os.path.basename(results))
        return names

    def foreign_files(self) -> list[str]:
        """The paths (relative to the run folder, sorted) of what is in it that `train` and
        `evaluate` do not write (`is_own`): files, links, and folders other than the run's
        own (a folder of the user's is named once, e.g. `.git`)."""
        found = []
        for name in sorted(os.listdir(self.path)) if os.path.isdir(self.path) else ():
            path = self.file(name)
            if name in self.DIRS and os.path.isdir(path) and not os.path.islink(path):
                for folder, dirs, files in os.walk(path):
                    dirs.sort()
                    for entry in sorted(files) + [d for d in dirs
                                                  if os.path.islink(os.path.join(folder, d))]:
                        rel = os.path.relpath(os.path.join(folder, entry), self.path)
                        if not self.is_own(rel):
                            found.append(rel)
            elif os.path.isdir(path) or not self.is_own(name):
                found.append(name)
        return found

    def delete_previous(self) -> list[str]:
        """`--fresh`: remove every file a run writes (`is_own`: config.json, checkpoints,
        event files, heatmaps, eval/ too: its metrics are of the model being deleted, and
        kept they would pass for the new one's), then the folders of the run left empty.
        Nothing else: it deleted all of checkpoints/, logs/, attention/ and eval/, the
        user's files there among them. Returns the files kept inside those folders (the
        caller says so; other files beside them are the folder's own business)."""
        for name in os.listdir(self.path) if os.path.isdir(self.path) else ():
            # its files and their writes' leftovers; not the locks, held while it deletes
            if name not in self.LOCKS and self.is_own(name) and (
                    os.path.islink(self.file(name)) or not os.path.isdir(self.file(name))):
                os.remove(self.file(name))
        kept = []
        for top in self.DIRS:
            path = self.file(top)
            if not os.path.isdir(path) or os.path.islink(path):
                continue
            for folder, dirs, files in os.walk(path, topdown=False):
                for name in files:
                    rel = os.path.relpath(os.path.join(folder, name), self.path)
                    if self.is_own(rel):
                        os.remove(os.path.join(folder, name))
                    else:
                        kept.append(rel)
                for name in dirs:
                    inner = os.path.join(folder, name)
                    if os.path.islink(inner):
                        kept.append(os.path.relpath(inner, self.path))
                    elif not os.listdir(inner):
                        os.rmdir(inner)
            if not os.listdir(path):
                os.rmdir(path)
        return sorted(kept)

    def fresh_note(self, kept: list[str]) -> Optional[str]:
        """The note on the files `delete_previous` kept (None when it kept none)."""
        if not kept:
            return None
        shown = ", ".join(self.file(p) for p in kept[:5]) + (" ..." if len(kept) > 5 else "")
        return (f"--fresh kept {len(kept)} file(s) in the run's folders that train and "
                f"evaluate do not write: {shown}; they stay beside the new run's files "
                f"(remove them if they were of the old run)")

    # ------------------------------------------------------------------ using a run
    def check_is_run(self) -> None:
        """A `UserError` naming --run unless it is a run folder (one with config.json)."""
        if not os.path.exists(self.config):
            why = "no config.json" if os.path.isdir(self.path) else (
                "a file, not a folder" if os.path.exists(self.path) else "no such folder")
            raise UserError(f"--run {self.path}: not a training run ({why}); train one with "
                            f"`caption-attn train --run {self.path} ...`")

    def load_config(self) -> RunConfig:
        self.check_is_run()
        try:
            return RunConfig.from_dict(read_json(self.config, file_names=True))
        except UserError as e:
            msg = str(e)
            raise UserError(msg if msg.startswith(self.config) else f"{self.config}: {msg}") \
                from None

    def load_splits(self) -> dict:
        """split name -> image keys, as fixed when the run started: exactly train, val and
        test, lists of distinct keys, no image in two splits, and (for runs that recorded it)
        the digest split.json recorded of them. Only the types were checked: an image added
        to a second split (or moved from train to test) resumed silently, the model then
        scored on images it trained on; a missing `val` crashed with a KeyError."""
        splits = self._split_field("splits")
        if not isinstance(splits, dict):
            raise UserError(f"{self.split}: malformed (expected {{\"splits\": {{name: [image "
                            f"keys]}}}})")
        problem = _splits_problem(splits)
        recorded = self._split_field("splits_sha256")
        if problem is None and isinstance(recorded, str) and recorded != splits_digest(splits):
            problem = ("its splits are not the ones recorded when the run started "
                       "(splits_sha256 differs: edited by hand?)")
        if problem:
            raise UserError(f"{self.split}: {problem}; restore the split.json train wrote, or "
                            f"train the run again with --fresh")
        return splits

    def load_vocab(self):
        """vocab.json, refused when its words are not in the order split.json recorded when
        the run's vocabulary was made (the model's ids index that order; a vocabulary sorted
        or edited by hand captioned with the wrong words, silently). Runs made before the
        order was recorded are not checked."""
        from caption_attn.vocab import Vocabulary

        vocab = Vocabulary.load(self.vocab)
        self._refuse_unrecorded("vocab_sha256", vocab.digest(),
                                f"{self.vocab}: not the vocabulary this run was trained with "
                                f"(its words or their order differ from what {self.split} "
                                f"recorded): the model would say other words than it "
                                f"learned; restore the file, or retrain with --fresh")
        return vocab

    def _refuse_unrecorded(self, field: str, digest: str, message: str) -> None:
        """UserError(`message`) when split.json's `field` holds another digest than
        `digest` (runs made before it was recorded are not checked)."""
        recorded = self._split_field(field)
        if isinstance(recorded, str) and recorded != digest:
            raise UserError(message)

    def cache_identity(self) -> Optional[dict]:
        """The identity of the feature cache the run was trained on (recorded in split.json
        when the run started; None for a run made before caches had identities)."""
        return self._split_field("cache_identity")

    def caption_data(self) -> Optional[dict]:
        """The fingerprint of the caption data the run was trained on
        (`data.caption_fingerprint`, recorded in split.json when the run started; None for a
        run made before runs recorded it)."""
        recorded = self._split_field("caption_data")
        return recorded if isinstance(recorded, dict) and recorded.get("sha256") else None

    def split_by_lists(self) -> bool:
        """Whether the run was split by Flickr8k's official lists beside its caption file
        (split.json's `split_source`): a run split by image hash (or made before the lists
        were read, when every Flickr8k run was) keeps that split, lists or not."""
        return self._split_field("split_source") == "lists"

    def images_dir(self, existing: bool = True) -> Optional[str]:
        """The folder the run's feature files had their source images checked in when it last
        trained (split.json's `images_dir`: `train --images`, or the cache's last images
        folder then), when it is still a folder (or with `existing` False, whether or not);
        None otherwise (and for runs made before it was recorded). A cache can hold another
        folder's same-named images since (`extract-features --replace-other-images`):
        checked in the cache's last folder, their features looked like this run's images'."""
        folder = self._split_field("images_dir")
        return folder if isinstance(folder, str) and (not existing or os.path.isdir(folder)) \
            else None

    def caption_file(self) -> Optional[dict]:
        """The caption file the run last read, as split.json recorded it: its `path`, the
        `format` it was read as, and the `size` and `sha256` of its bytes
        (`data.file_stamp`); None for a run made before the bytes were recorded."""
        stamp = self._split_field("caption_file")
        if not isinstance(stamp, dict):
            return None
        return {"path": self._split_field("captions"), "format": self._split_field("format"),
                **stamp}

    def split_fields(self) -> set:
        """The fields split.json holds (none without the file)."""
        identity = file_identity(self.split)
        data = None if identity is None else _parsed_split(os.path.abspath(self.split),
                                                           identity)
        return set(data) if isinstance(data, dict) else set()

    def settings_recorded(self) -> Optional[str]:
        """split.json's `settings_sha256` (`RunConfig.settings_digest`; None for a run made
        before it was recorded)."""
        return self._split_field("settings_sha256")

    def image_digests(self) -> dict:
        """image key -> digest of the image its training-time features were extracted from
        (`feature_cache.usable_features`' image_digests, recorded in split.json at every start
        and kept: an image skipped at one start keeps the digest of an earlier one; empty for a
        run made before runs recorded them)."""
        recorded = self._split_field("image_digests")
        return recorded if isinstance(recorded, dict) else {}

    def without_features(self) -> Optional[set]:
        """The run's images that had no usable features when it last started (recorded in
        split.json); None for a run made before they were recorded, whose `image_digests`
        held only the images usable at its last start."""
        recorded = self._split_field("without_features")
        return set(recorded) if isinstance(recorded, list) else None

    def _split_field(self, name: str):
        """split.json's `name` (None when the file or the field is missing; `load_splits`
        needs the file). The parsed file is kept while it is the same file (inode, mtime,
        size): a COCO run's split.json (15 MB with its image digests) was parsed 4-6 times
        by one `train` resume or `evaluate`, 0.13 s each. Callers do not modify what they
        get."""
        identity = file_identity(self.split)
        if identity is None:
            if name == "splits":
                # its error names the file and what is wrong
                read_json(self.split, file_names=True)
            return None
        data = _parsed_split(os.path.abspath(self.split), identity)
        return data.get(name) if isinstance(data, dict) else None

    def check_image_digests(self, cache: str, keys, digests: dict, images_dir=None,
                            what: str = "") -> None:
        """UserError when feature files of `cache` (their images' `digests`, as
        `feature_cache.usable_features` gives them) were extracted from other images than the
        run's of the same names (`image_digests`): the cache of another dataset with the same
        backbone and file names (e.g. shapes made with another --seed), whose features would
        be trained on or scored against the run's captions."""
        recorded = self.image_digests()
        other = [k for k in keys if k in recorded and k in digests and recorded[k] != digests[k]]
        if other:
            raise UserError(f"feature cache {cache}: the features of {len(other)} of the "
                            f"{len(keys)} {what}images were extracted from other images than "
                            f"the run's of the same name (e.g. {other[0]!r}, from "
                            f"{images_dir}): the cache of another dataset? Point --cache at the "
                            f"run's cache, or extract the run's images into it (if you changed "
                            f"those images on purpose, train a new run or add --fresh)")

    def check_captions(self, captions: str, records, splits: dict, fingerprint: dict,
                       by_lists=None) -> None:
        """Refuse caption data (`records` parsed from the file `captions`, whose
        `data.caption_fingerprint` is `fingerprint`) other than the data the run was trained
        on, saying what differs; the same data in another file passes. `by_lists`: the
        `data.CaptionSet` of `records` when Flickr8k's official lists beside the file split
        it; when only they differ, they are named with what moved (the caption file, which
        had not changed, was)."""
        from caption_attn.data import caption_changes, list_changes

        recorded = self.caption_data()
        if not recorded or recorded["sha256"] == fingerprint["sha256"]:
            return
        moved = by_lists and list_changes(recorded, splits, by_lists)
        if moved:
            raise UserError(f"--captions {captions}: Flickr8k's official lists beside it split "
                            f"its images otherwise than when {self.path} was trained on them "
                            f"({moved}); restore the lists, use another --run, or add --fresh "
                            f"to start this run over with the lists as they are")
        changes = caption_changes(recorded, splits, records)
        original = self.load_config().captions
        way_back = ("restore the file's earlier captions" if os.path.abspath(original)
                    == os.path.abspath(captions) else
                    f"resume with the run's caption file ({original})")
        raise UserError(f"--captions {captions}: not the caption data {self.path} was trained "
                        f"on ({changes}); {way_back}, use another --run, or add --fresh to "
                        f"start this run over")

    def check_cache(self, cache: str, manifest: dict) -> None:
        """Refuse a feature cache whose identity differs from the one the run was trained on
        (naming both)."""
        from caption_attn.feature_cache import refuse_other_identity

        recorded = self.cache_identity()
        if recorded is not None:
            refuse_other_identity(recorded, manifest, f"run {self.path}", cache)

    def load_best_model(self):
        """The best model; a missing, truncated or old-format best.keras is a `UserError`
        naming it and saying how to recover."""
        import keras

        from caption_attn import model as model_lib

        path = self.best_model
        recover = (f"rerun `caption-attn train --run {self.path} ...` with the run's flags: "
                   f"it rewrites best.keras from {os.path.basename(self.best_weights)} (kept "
                   f"next to it) without training")
        if not os.path.exists(path):
            if os.path.exists(self.best_weights):
                raise UserError(f"{path}: missing; {recover}")
            raise UserError(f"{path}: no best model yet; the run has not finished an epoch "
                            f"(rerun `caption-attn train` with the same --run to resume)")
        config = _keras_archive_config(path, recover)
        try:
            model_lib.check_model_format(config.get("config", {}).get("model_format", 1))
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
        try:
            return keras.saving.load_model(path, compile=False)
        except Exception as e:  # noqa: BLE001 - Keras raises many kinds for a damaged file
            raise UserError(f"{path}: cannot be loaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); {recover}") from None


    # ------------------------------------------------------------------ the best model
    def save_best(self, model, epoch: int, monitor: str, value: float) -> None:
        """Keep `model` as the best so far (1-based `epoch`): its weights first (from which
        `rewrite_best_model` can make best.keras again), then best.keras under its temporary
        name, then best.json (epoch, monitor, value and the sha256 of both files), then
        best.keras renamed into place; each written atomically, and a Ctrl-C or SIGTERM held
        until all are. (best.keras was renamed before best.json was written: a kill or a full
        disk between them left the new model beside the previous best's record, which
        `evaluate`, `export` and `caption` then reported as its epoch and value.) A stop
        anywhere now leaves at most one of the two files other than best.json records
        (`best_mismatch`): readers refuse it (`read_best_unchanged`), `train` rewrites it
        from the other (`match_best_files`)."""
        record = {"epoch": epoch, "monitor": monitor, "value": value}
        with interrupts.held():
            with keras_file_atomic(self.best_weights, ".weights.h5", model) as tmp:
                model.save_weights(tmp)
            record["weights_sha256"] = file_digest(self.best_weights)
            # (the .keras zip: its weights file is written first, then copied into the zip)
            with keras_file_atomic(self.best_model, ".keras", model, copies=2) as tmp:
                model.save(tmp)
                write_json_atomic(self.best_info, {**record, "model_sha256": file_digest(tmp)})

    DIGESTS = (("best_model", "model_sha256"), ("best_weights", "weights_sha256"))

    def best_mismatch(self, record: Optional[dict] = None, weights: bool = True) -> list[str]:
        """The paths of those of best.keras and best.weights.h5 (with `weights` False, of
        best.keras only) that are not the file best.json (`record`, else read) records the
        sha256 of: missing, or other bytes. None of a best.json without the digests (a run
        from before they were recorded: its files cannot be checked)."""
        record = self.best_record() if record is None else record
        found = []
        for name, field in self.DIGESTS[:2 if weights else 1]:
            path, recorded = getattr(self, name), (record or {}).get(field)
            if recorded is None:
                continue
            try:
                same = file_digest(path) == recorded
            except OSError:
                same = False
            if not same:
                found.append(path)
        return found

    def _record_digest(self, field: str, path: str) -> None:
        """best.json's `field` (a DIGESTS one) the sha256 of `path`, a file about to replace
        the one it records (a best.json without it is left as it is)."""
        record = self.best_record()
        if record and field in record:
            write_json_atomic(self.best_info, {**record, field: file_digest(path)})

    def _neither_recorded(self, record: dict) -> UserError:
        return UserError(f"{self.best_model} and {self.best_weights}: neither is the file "
                         f"{self.best_info} records (the best model of epoch "
                         f"{record.get('epoch')}; replaced by hand?), so neither can be "
                         f"rewritten from the other: put back the files train wrote (from a "
                         f"copy of the run), or train the run again with --fresh")

    def best_record(self) -> Optional[dict]:
        """best.json ({epoch, monitor, value}, and since `save_best` records them the sha256
        of best.keras and best.weights.h5: `best_mismatch`) or None; a `UserError` naming the
        file unless it is an object with the epoch (>= 1) of best.keras: resuming with an
        edited one (`[]`, `3`) crashed with an AttributeError."""
        if not os.path.exists(self.best_info):
            return None
        record = read_json(self.best_info)
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            what = (f"its epoch is {epoch!r}" if isinstance(record, dict) else
                    f"a JSON {type(record).__name__}, not an object")
            raise UserError(f"{self.best_info}: {what}: not the {{epoch, monitor, value}} of "
                            f"best.keras that train writes (edited by hand?); restore the file "
                            f"train wrote, or train the run again with --fresh")
        return record

    def best_snapshot(self) -> tuple:
        """(identity of best.keras, best.json's record): changes when `train` saves a new
        best."""
        return file_identity(self.best_model), self.best_record()

    def read_best_unchanged(self, load: Callable, reader: str, command: str):
        """(`load()`, which reads best.keras; best.json's record read with it), refused when
        `train` saved a new best model meanwhile: a run still training can replace
        best.keras and best.json at any time, and what `evaluate` or `export` record as the
        model's epoch would then be another's; refused too when best.keras is not the model
        best.json records the sha256 of (`best_mismatch`: a `train` stopped inside
        `save_best`, whose record would be reported for another epoch's model). `reader`
        names the reader in the message, `command` the command to run again."""
        before = self.best_snapshot()
        loaded = load()
        record = before[1]
        stale = self.best_mismatch(record, weights=False) if record else []
        if self.best_snapshot() != before:
            raise UserError(f"{self.best_model}: replaced while {reader} read it (is "
                            f"`caption-attn train` running on this run?); {command} again")
        if stale:   # what a `train` stopped inside `save_best` leaves: another epoch's model
            if self.best_weights in self.best_mismatch(record):
                raise self._neither_recorded(record)
            raise UserError(f"{self.best_model}: not the model {self.best_info} records (the "
                            f"best model of epoch {record.get('epoch')}; its sha256 differs): "
                            f"a `caption-attn train` stopped (killed, or a full disk) while it "
                            f"saved that model, or is saving it now. Rerun `caption-attn train "
                            f"--run {self.path} ...` with the run's flags: before it trains on "
                            f"(if epochs are left) it rewrites best.keras from "
                            f"{self.best_weights}, which is that model; then {command} again")
        return loaded, record

    def restore_best_weights(self, model) -> bool:
        """Load the best weights into `model` (False when there are none yet)."""
        if not os.path.exists(self.best_weights):
            return False
        model.load_weights(self.best_weights)
        return True

    def match_best_files(self, model) -> Optional[str]:
        """When one of best.keras and best.weights.h5 is not the file best.json records
        (`best_mismatch`: what a `train` stopped inside `save_best` leaves) while the other
        is, rewrite it from the other (through `model`, a model of this run whose weights are
        left as they were), best.json recording the new file; returns the note that says so,
        or None. `train` calls it once the checkpoint is restored, before anything reads the
        best weights or best.json's value. Neither as recorded: `best_model_beyond_repair`'s
        refusal; one missing: `repair_best_model`'s repair."""
        record = self.best_record()
        if not record or not (os.path.exists(self.best_model) and
                              os.path.exists(self.best_weights)):
            return None
        stale = self.best_mismatch(record)
        if len(stale) != 1:
            return None
        epoch, unlike = record.get("epoch"), "(a train stopped while it saved the best model?)"
        if stale == [self.best_model]:
            try:
                self.load_best_model()
                problem = (f"{self.best_model}: not the model {self.best_info} records "
                           f"{unlike}")
            except UserError as e:
                problem = str(e).split(";")[0]
            self.rewrite_best_model(model)
            return f"{problem}; rewrote it from {self.best_weights} (epoch {epoch})"
        problem = self._weights_problem(model) or \
            f"not the weights {self.best_info} records {unlike}"
        self._rewrite_best_weights(self.load_best_model())
        return f"{self.best_weights}: {problem}; rewrote it from {self.best_model} (epoch {epoch})"

    def repair_best_model(self, model) -> Optional[str]:
        """If best.keras is missing, damaged or of an old format while best.json and the best
        weights are kept, rewrite it from them (through `model`, a model of this run whose
        weights are left as they were); if the weights cannot be loaded beside a whole
        best.keras, rewrite them from it (the end of training restores them: it failed there,
        after the epochs, on every rerun). Returns a note saying so, or None. Neither can be
        made whole from the other (`best_model_beyond_repair`, or weights that do not load):
        a `UserError` naming them."""
        record = self.best_record()
        if not record:
            return None
        beyond = self.best_model_beyond_repair()
        if beyond is not None:
            raise beyond
        if not os.path.exists(self.best_weights):   # (a run from before the weights were kept)
            return None
        try:
            best = self.load_best_model()
        except UserError as e:
            problem = str(e).split(";")[0]
            self.rewrite_best_model(model)
            return (f"{problem}; rewrote it from {self.best_weights} (epoch "
                    f"{record.get('epoch')})")
        problem = self._weights_problem(model)
        if problem is None:
            return None
        self._rewrite_best_weights(best)
        return (f"{self.best_weights}: {problem}; rewrote it from {self.best_model} (epoch "
                f"{record.get('epoch')})")

    def _weights_problem(self, model) -> Optional[str]:
        """Why best.weights.h5 cannot be loaded into `model` ("cannot be loaded (...)"), or
        None; `model`'s weights are left as they were."""
        current = model.get_weights()
        try:
            model.load_weights(self.best_weights)
            return None
        except Exception as e:  # noqa: BLE001 - h5py/Keras raise many kinds for a bad file
            return f"cannot be loaded ({type(e).__name__}: " \
                f"{(str(e).splitlines() or [''])[0][:200]})"
        finally:
            model.set_weights(current)

    def _rewrite_best_weights(self, best) -> None:
        """best.weights.h5 again from `best` (best.keras's model); best.json records it
        before it is renamed into place, as `save_best` does best.keras."""
        with keras_file_atomic(self.best_weights, ".weights.h5", best) as tmp:
            best.save_weights(tmp)
            self._record_digest("weights_sha256", tmp)

    def best_model_beyond_repair(self) -> Optional[UserError]:
        """The refusal of a resume whose best model `repair_best_model` cannot make whole,
        as far as it shows without loading a model (None when nothing shows): best.keras and
        best.weights.h5 both gone while best.json records them (training went on, then named
        a best.keras that was not there, exit 0), best.keras gone or not a zip archive
        beside a best.weights.h5 that HDF5 cannot open (cut short, overwritten), or neither
        the file best.json records the sha256 of (`best_mismatch`: one of them would be
        rewritten from a file of another model).
        `train.refuse_unrepairable_best_model` raises it before the data is loaded and
        anything is written (it came after both); `repair_best_model` raises what else
        fails."""
        record = self.best_record()
        if not record:
            return None
        if not os.path.exists(self.best_weights):
            if os.path.exists(self.best_model):   # (a run from before the weights were kept)
                return None
            return UserError(f"{self.best_model} and {self.best_weights}: missing, though "
                             f"{self.best_info} records the best model of epoch "
                             f"{record.get('epoch')}: put them back (from a copy of the run), "
                             f"or train the run again with --fresh")
        try:   # its central directory, at the end of the file: a copy cut short has none
            zipfile.ZipFile(self.best_model).close()
        except (OSError, zipfile.BadZipFile):
            import h5py
            try:
                h5py.File(self.best_weights, "r").close()
            except Exception as e:  # noqa: BLE001 - h5py raises many kinds for a bad file
                return self._weights_unloadable(e)
        return self._neither_recorded(record) if len(self.best_mismatch(record)) == 2 \
            else None

    def _weights_unloadable(self, error: Exception) -> UserError:
        """best.weights.h5 cannot be loaded while best.keras is missing or damaged: every
        resume is refused (it said "caption or evaluate the run after its next finished
        epoch", which no resume reached)."""
        return UserError(f"{self.best_weights}: cannot be loaded ({type(error).__name__}: "
                         f"{(str(error).splitlines() or [''])[0][:200]}); best.keras, "
                         f"missing or damaged, cannot be rewritten from it: put either file "
                         f"back (from a copy of the run), or train the run again with --fresh")

    def rewrite_best_model(self, model) -> None:
        """best.keras again from best.weights.h5, through `model` (a model of this run
        whose own weights are left as they were); best.json records it before it is renamed
        into place, as `save_best` does."""
        current = model.get_weights()
        try:
            model.load_weights(self.best_weights)
        except Exception as e:  # noqa: BLE001 - h5py/Keras raise many kinds for a bad file
            raise self._weights_unloadable(e) from None
        try:
            with keras_file_atomic(self.best_model, ".keras", model, copies=2) as tmp:
                model.save(tmp)
                self._record_digest("model_sha256", tmp)
        finally:
            model.set_weights(current)


def _keras_archive_config(path: str, recover: str) -> dict:
    """The model config inside a .keras zip, after checking the archive is whole."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"member {bad} is damaged")
            text = archive.read("config.json").decode("utf-8")
    except (zipfile.BadZipFile, KeyError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged or truncated Keras file ({e}); {recover}") from None
    except OSError as e:
        raise UserError(f"{one_line(path)}: cannot read ({e.strerror})") from None
    config = parse_json(f"{path}:config.json", text)
    if not isinstance(config, dict):
        raise UserError(f"{path}: damaged Keras file (its config is not an object); {recover}")
    return config


def metric_text(value: float) -> str:
    """A loss or metric as printed: four decimals, or three digits for a value that they
    would round to zero (`best val_cider=0.0000` of a run whose best.json held 1.08e-05)."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 5e-5 else f"{value:.2e}"


def check_folder_writable(path: str, what: str, given: Optional[str] = None) -> None:
    """`UserError` (one line) unless `path` is a writable folder or can be created as one:
    checked before any expensive work that would write there. The message begins with
    `what` and the flag's value: `given` when `path` is the folder of what the flag names
    (`--out FILE`: "--out a/m.json: ...", not "--out a"), else `path`; it names the folder
    that cannot be written, and the one that would be made in it."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    label = f"{what} {path if given is None else given}"
    if not os.path.isdir(probe):
        raise UserError(f"{label}: {probe} is a file, not a folder")
    problem = folder_write_problem(probe)
    if problem:
        made = "" if probe == os.path.abspath(path) else \
            f", where {'its folder ' if given is not None else ''}{path} would be made"
        raise UserError(f"{label}: {problem}{made}")


def folder_write_problem(folder: str) -> Optional[str]:
    """Why files cannot be created (or removed) in the existing `folder`, or None."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    # os.access says yes to root everywhere, and to read-only file systems such as /proc:
    # only writing a file there tells (it is removed at once)
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".caption-attn-probe-")
        os.close(fd)
        os.remove(name)
    except OSError as e:
        return f"cannot create files in {folder} ({e.strerror})"
    return None
