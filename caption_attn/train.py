"""The training loop: `@tf.function` steps over bucketed tf.data batches, exact resume.

Epochs 1..`--scst-after` (all of them without it) train with cross-entropy: teacher forcing,
masked cross-entropy plus the doubly stochastic attention regulariser. Later epochs are
self-critical (`scst.py`): sampled captions rewarded by their CIDEr-D. The files of a run are
`run.py`'s; what is read before the first step is `train_data.py`'s; validation metrics and
sample captions are `validation.py`'s; the optimizer and the learning rate of each stage
`optimizer.py`'s; strategies `distribute.py`'s. This module builds the model and the steps and
runs the epochs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import re
import shutil
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from caption_attn import (checkpoints, distribute, feature_cache, fused, interrupts, ngrams,
                          pipeline, progress, quiet)
from caption_attn import data as data_lib
from caption_attn.backbone import refuse_aborting_precision
from caption_attn.callbacks import (AttentionSnapshots, EarlyStopping, TensorBoardLogger,
                                    heatmap_names, log_hparams, log_missing_epochs,
                                    prune_event_files)
from caption_attn.cider import CiderD
from caption_attn.config import (DTYPE_POLICIES, MONITORS, RunConfig, TrainConfig,
                                 check_train_flags)
from caption_attn.errors import (OutOfMemory, TrainingError, UserError, free_space,
                                 out_of_memory)
from caption_attn.fileio import check_utf8_path, read_json, temp_name, write_json_atomic
from caption_attn.model import ShowAttendTell, parameter_count
from caption_attn.optimizer import (AveragedWeights, FusedAdam, StagedLearningRate, inner,
                                    make_optimizer)
from caption_attn.run import (RunFolder, changed_settings_note, metric_text,
                              splits_digest)
from caption_attn.scst import SelfCritical, recorded_digest
from caption_attn.steps import EpochTotals, Steps
from caption_attn.train_data import (SPLIT_FIELDS, EpochData, TrainData, checked_in_line,
                                     features_as_recorded, images_why,
                                     load_train_data as _load_train_data, machine_memory)
from caption_attn.validation import SampleFigures, Validator, table_or_files
from caption_attn.vocab import SPECIAL_TOKENS, UNK

EVAL_BATCH_FACTOR = 4  # validation batches are 4x the training batch: forward only, and fewer
#                       small flushed buckets (demo val set: 1230 -> 1470 captions/s)

__all__ = ["FusedAdam", "Trainer", "TrainingError", "format_summary", "load_train_data",
           "open_run", "train"]


def open_run(run_dir: str, cfg: RunConfig, fresh: bool = False) -> list[str]:
    """Check `cfg` against the run folder and save it there; returns notes for the user (used
    by tests and benchmarks that build a `Trainer` themselves; `train` saves only after every
    check of the data passed)."""
    run = RunFolder(run_dir)
    run.check_writable(cfg.cache)
    notes = reopen_checks(run, cfg, fresh)
    if fresh:
        notes += filter(None, [run.fresh_note(run.delete_previous())])
    os.makedirs(run_dir, exist_ok=True)
    with_trained_settings(run, cfg).save(run.config)
    return notes


def with_trained_settings(run: RunFolder, cfg: RunConfig) -> RunConfig:
    """`cfg` with the training settings config.json holds when the run has a checkpoint:
    what `Trainer` writes until this call has trained (`Trainer._record_settings`). A rerun
    that trained nothing (all epochs done) or failed at its first step rewrote them, and
    config.json then named a learning rate, schedule or clipping no step was trained with,
    against which the next resume's notes compared."""
    if not os.path.exists(run.config) or not checkpoints.list_checkpoints(run.checkpoints):
        return cfg
    return dataclasses.replace(cfg, train=run.load_config().train)


def reopen_checks(run: RunFolder, cfg: RunConfig, fresh: bool) -> list[str]:
    """The checks of a run folder about to be resumed with `cfg`, nothing written (none with
    --fresh): `RunFolder.reopen_notes`, `refuse_unrestorable_state`,
    `refuse_other_batches_mid_epoch`, `refuse_cross_entropy_after_self_critical`,
    `refuse_other_stages_of_trained_epochs`, `refuse_unrepairable_best_model` and
    `refuse_unrestorable_checkpoints` (and `RunFolder.best_record`'s); returns the notes to
    print (`schedule_notes` among them)."""
    if fresh:
        return []
    notes = run.reopen_notes(cfg)
    run.best_record()   # an edited best.json is refused here, not after config.json is written
    where = _resume_position(run)
    if where is None:                     # nothing trained yet: nothing to resume from
        refuse_unrestorable_checkpoints(run, cfg)      # (or no checkpoint reads)
        return notes
    old = run.load_config().train
    refuse_unrestorable_state(run, cfg, where, old)
    refuse_other_batches_mid_epoch(run, cfg, where, old)
    refuse_cross_entropy_after_self_critical(run, cfg, where, old)
    refuse_other_stages_of_trained_epochs(run, cfg, where)
    refuse_unrepairable_best_model(run, cfg, where)
    refuse_unrestorable_checkpoints(run, cfg)   # last: the refusals above name the cause
    notes = notes + min_delta_notes(run, cfg, where, old)
    history = [h for h in run.read_history() if h["epoch"] <= where[0]]
    if history and _nothing_left(run, cfg.train, where, history):
        return notes                  # no step to come: no word on their learning rate
    return notes + schedule_notes(cfg, where, old)


def refuse_unrestorable_checkpoints(run: RunFolder, cfg: RunConfig) -> None:
    """`checkpoints.restore_newest_intact`'s refusal when the run has checkpoints and none
    restores into the model `cfg` and the run's vocabulary (vocab.json, which a resume
    reuses) make, before the data is loaded and anything is written: it came from the
    Trainer, after both. A run without config.json or vocab.json is left to the Trainer,
    which knows its vocabulary once the data is loaded, and so is multi-worker training."""
    if not (os.path.exists(run.config) and os.path.exists(run.vocab)
            and checkpoints.list_checkpoints(run.checkpoints)):
        return
    if cfg.train.strategy == "multi-worker":   # its collective ops must be set up before any
        return                                # TF op runs: left to the Trainer, as before
    _, objects = training_state(cfg, len(run.load_vocab()), 1)
    checkpoints.refuse_unrestorable(tf.train.Checkpoint(**objects), run.checkpoints)


def _resume_position(run: RunFolder) -> Optional[tuple[int, int]]:
    """`checkpoints.position` of a run folder that has started (config.json), else None."""
    return checkpoints.position(run.checkpoints) if os.path.exists(run.config) else None


def _scheduled_rate(tc: TrainConfig, epoch: int) -> float:
    """The cross-entropy learning rate at the start of 0-based `epoch`: `StagedLearningRate`
    counting epochs instead of steps."""
    return float(StagedLearningRate(tc, tc.cross_entropy_epochs)(epoch))


def schedule_notes(cfg: RunConfig, where: tuple[int, int], old: TrainConfig) -> list[str]:
    """A note when the cross-entropy learning rate a resumed run continues with is not the
    one its previous schedule had there: the cosine decay spans --epochs (or --scst-after)
    of the call that resumes, so another --epochs, --scst-after or --lr-schedule moves the
    rate of the steps to come (e.g. from 0 at the end of a finished cosine run back up to
    half the initial rate when --epochs doubles). Its position is the fraction of training
    done, in epochs (`StagedLearningRate`), so another --batch-size leaves the rate an
    epoch starts at as it was: `Trainer._steps_changed_note` says so once the epochs' steps
    are known (with the moved rate, if any). `where`: the run's `checkpoints.position`,
    `old`: its training settings until now."""
    new = cfg.train
    if new.is_scst(where[0]) or "cosine" not in (old.lr_schedule, new.lr_schedule):
        return []
    if old.batch_size != new.batch_size and new.lr_schedule == "cosine":
        return []                                  # `Trainer._steps_changed_note`'s
    if where[1] or not _schedule_moved(old, new):
        # inside an epoch, the rate where training continues depends on the epoch's steps,
        # known once the data is: `Trainer._resume_rate_note` says it
        return []
    was, now = _scheduled_rate(old, where[0]), _scheduled_rate(new, where[0])
    note = _rate_note(old, new, was, now, f"epoch {where[0] + 1} starts")
    return [note] if note else []


def _schedule_moved(old: TrainConfig, new: TrainConfig) -> bool:
    """Whether the cross-entropy schedule's shape changed (another rate is the changed
    settings' note)."""
    return "cosine" in (old.lr_schedule, new.lr_schedule) and (
        old.lr_schedule, old.epochs, old.scst_after) != (new.lr_schedule, new.epochs,
                                                         new.scst_after)


def _rate_note(old: TrainConfig, new: TrainConfig, was: float, now: float,
               where: str) -> Optional[str]:
    """The note of a moved schedule: `where` ("epoch 3 starts") at `now` instead of `was`."""
    if math.isclose(was, now, rel_tol=1e-6, abs_tol=1e-12):
        return None
    to_come = ("which every step to come keeps" if new.lr_schedule == "constant" else
               "and the steps to come follow the new curve")
    return (f"the learning-rate schedule is now {_span(new)} (was {_span(old)}): {where} at a "
            f"learning rate of {now:.3g} instead of {was:.3g}, {to_come}")


def _span(tc: TrainConfig) -> str:
    """A learning-rate schedule in words."""
    return ("constant" if tc.lr_schedule == "constant" else
            f"cosine over {tc.cross_entropy_epochs} cross-entropy epochs")


def check_features_mid_epoch(run: RunFolder, cfg: RunConfig, data: TrainData) -> list[str]:
    """When the run stopped inside an epoch: UserError if train images it was training on
    (split.json's image digests: usable when it last started) have no usable features now,
    and a note if train images it went without then have usable features now (repaired). The
    rerun skips the batches already trained by their count, in an epoch cut from fewer (more)
    captions: some twice, others never. Lost features were only a "skipped N captions" line;
    the message names the files, what is wrong with them and the command that repairs them.
    Repaired ones, which the user was told to repair, are used, and the note says what that
    costs the rest of this epoch (from the next one on, every caption once again)."""
    where = _resume_position(run)
    if where is None or where[1] == 0:
        return []
    had, unusable = _usable_at_last_start(run), data.unusable or {}
    lost = {k: unusable[k] for k in data.splits["train"] if had(k) and k in unusable}
    epoch, in_epoch = where
    if not lost:
        gained = _gained(run, data, "train")
        if not gained:
            return []
        return [f"{len(gained)} train images have usable features now that {run.path} went "
                f"without when it last started (repaired since, e.g. {gained[0]!r}): epoch "
                f"{epoch + 1}, stopped at step {in_epoch}, goes on cut from more captions, so "
                f"in its remaining steps some captions come twice and others not at all; "
                f"from epoch {epoch + 2} on, every caption once again"]
    repair = feature_cache.repair_command(cfg.cache, data.manifest, cfg.captions,
                                          data.images_dir)
    raise UserError(
        f"{run.path} stopped in epoch {epoch + 1} at step {in_epoch}, and {len(lost)} of the "
        f"train images it was training on have no usable features now: "
        f"{data.describe(lost)}. Resumed without them, the rest "
        f"of epoch {epoch + 1} would be cut into other batches (some captions twice, others "
        f"never): repair them with `{repair}` (after fixing any image that failed to "
        f"extract), then rerun this command (or add --fresh to start this run over)")


def _usable_at_last_start(run: RunFolder) -> Callable[[str], bool]:
    """Whether an image of the run had usable features when it last started: a recorded
    digest, and not listed without features (a run made before that list: the digest)."""
    recorded, went_without = run.image_digests(), run.without_features()
    return lambda k: k in recorded and (went_without is None or k not in went_without)


def _had_at_last_start(run: RunFolder, data: TrainData, split: str) -> Optional[list[str]]:
    """The images of `split` with usable features when the run last started (in split
    order); None for a run too old to have recorded digests."""
    if not run.image_digests():
        return None
    had = _usable_at_last_start(run)
    return [k for k in data.splits[split] if had(k)]


def _gained(run: RunFolder, data: TrainData, split: str) -> list[str]:
    """The images of `split` with usable features now that the run went without when it last
    started (keys with a digest now and none then: an image without one is in neither; none
    for a run too old to have recorded digests)."""
    had, now = _usable_at_last_start(run), data.image_digests or {}
    if not run.image_digests():
        return []
    return [k for k in data.splits[split] if k in now and not had(k)]


def changed_images_notes(run: RunFolder, data: TrainData) -> list[str]:
    """A note when a resumed run has usable features for images it went without when it last
    started (their feature files repaired or extracted since), and when val images it had
    then have none now: the val ones change the images val_loss, val_bleu4 and val_cider are
    measured on (`Trainer._measured_again` says what early stopping does about it), and the
    train ones gained (at an epoch's boundary; `check_features_mid_epoch` says what they do
    inside one) are trained on with the run's vocabulary, fit at its first start, so their
    words outside it are <unk>. Without a note they joined, or left, without a word."""
    where = _resume_position(run)
    inside = where is not None and where[1] != 0
    gained = {s: [] if s == "train" and inside else _gained(run, data, s)
              for s in ("train", "val")}
    notes = []
    if any(gained.values()):
        count = " and ".join(f"{len(keys)} {s}" for s, keys in gained.items() if keys)
        example = next(k for keys in gained.values() for k in keys)
        effects = (["the train ones are trained on with the run's vocabulary (fit when it "
                    "started), so their words outside it are <unk>"] if gained["train"] else
                   []) + (["the validation values of the epochs to come are measured with the "
                           "val ones, on other images than the earlier epochs'"]
                          if gained["val"] else [])
        notes.append(f"{count} images have usable features now that {run.path} went without "
                     f"when it last started (e.g. {example!r}): {'; '.join(effects)}")
    lost = [k for k in _had_at_last_start(run, data, "val") or []
            if k not in data.caption_ids["val"]]
    if lost:
        notes.append(f"{len(lost)} val images {run.path} had usable features of when it last "
                     f"started have none now (e.g. {lost[0]!r}): the validation values of the "
                     f"epochs to come are measured without them, on other images than the "
                     f"earlier epochs'")
    return notes


def trains_more(tc: TrainConfig, epochs_done: int, steps_done: int,
                epoch_ended: bool = False) -> bool:
    """Whether training with `tc` from a run at this position takes a step, or ends an epoch:
    epochs are left and --max-steps is not reached, or (`epoch_ended`) the next epoch's steps
    are all trained and only its end (validation, history, best model) is left, which a
    process killed after its last checkpoint did not do (early stopping aside:
    `EarlyStopping.replay` says whether it had already stopped the run). `Trainer.fit`
    decides by it, and `check_metric_images` too, without `epoch_ended` (an epoch's steps
    are counted once the data is loaded): a rerun that only ends such an epoch keeps the
    run's --bleu-images, with which that epoch is then measured, as the run's others were."""
    return epochs_done < tc.epochs and (
        epoch_ended or not (tc.max_steps and steps_done >= tc.max_steps))


def _nothing_left(run: RunFolder, tc: TrainConfig, where: Optional[tuple[int, int]],
                  history: list) -> Optional[str]:
    """Why a rerun with `tc` of a run at checkpoint position `where` (its `history` cut
    there) trains nothing, as `Trainer.fit` decides it; None when it trains."""
    if where is None:       # no checkpoint: the run starts from its first epoch
        return None
    if where[0] >= tc.epochs:
        return f"its {where[0]} epochs reach --epochs {tc.epochs}"
    if not trains_more(tc, where[0], checkpoints.steps_taken(run.checkpoints) or 0):
        return f"it reached --max-steps {tc.max_steps}"
    # (a last epoch without the metric gets it measured first, `_metrics_before_resume`, on
    # the new images: that value may restart patience, so the rerun may train)
    if history[-1].get(tc.monitor_for(where[0])) is not None and \
            replayed_early_stopping(run, tc, history).replay():
        return (f"early stopping had stopped it ({tc.monitor_for(where[0])} did not improve "
                f"for --patience {tc.patience} epochs)")
    return None


def replayed_early_stopping(run: RunFolder, tc: TrainConfig, history: list,
                            recorded: Optional[TrainConfig] = None, **hooks) -> EarlyStopping:
    """Early stopping with `tc`'s settings, `history` to replay: each epoch compared by the
    --min-delta it was trained with (its entry's; older entries: `recorded`'s, the run's
    training settings, by default config.json's). Replayed with this call's --min-delta, a
    rerun with another one took another epoch for the best: best.keras was replaced as if
    its save had been lost, with nothing to train and without a word."""
    if recorded is None and os.path.exists(run.config):
        recorded = run.load_config().train
    return _with_best_on_disk(
        EarlyStopping(tc.monitor_for, patience=tc.patience, min_delta=tc.min_delta,
                      initial_history=history, replay_min_delta=None if recorded is None
                      else recorded.min_delta, **hooks), run, tc, history)


def _with_best_on_disk(early: EarlyStopping, run: RunFolder, tc: TrainConfig,
                       history: list) -> EarlyStopping:
    """`early`, told best.keras's val_cider (recorded in `history`) when it is a start of the
    self-critical stage (`_stage_best_entry`, `EarlyStopping.best_on_disk`)."""
    entry = _stage_best_entry(run, tc, history)
    if entry is not None:
        early.best_on_disk(entry["epoch"] - 1, {"val_cider": entry.get("val_cider")})
    return early


def min_delta_notes(run: RunFolder, cfg: RunConfig, where: tuple[int, int],
                    old: TrainConfig) -> list[str]:
    """A note when this call's --min-delta, had it compared the run's epochs so far, would
    make another epoch the best than the one the run kept: the epochs so far stay compared
    as they were (`replayed_early_stopping`), only the epochs to come by the new value."""
    new = cfg.train
    if new.min_delta == old.min_delta:
        return []
    history = [h for h in run.read_history() if h["epoch"] <= where[0]]
    kept = replayed_early_stopping(run, new, history, old)
    kept.replay()
    other = _with_best_on_disk(EarlyStopping(
        new.monitor_for, patience=new.patience, min_delta=new.min_delta,
        initial_history=[{k: v for k, v in h.items() if k != "min_delta"} for h in history]),
        run, new, history)
    other.replay()
    if None in (kept.best_epoch, other.best_epoch) or kept.best_epoch == other.best_epoch \
            or kept.monitor != other.monitor:
        return []
    return [f"--min-delta {new.min_delta:g} (was {old.min_delta:g}): with it epoch "
            f"{other.best_epoch + 1} would be the best ({other.monitor}="
            f"{metric_text(other.best)}), but the run's epochs were compared with --min-delta "
            f"{old.min_delta:g}, which kept epoch {kept.best_epoch + 1} ({kept.monitor}="
            f"{metric_text(kept.best)}); the epochs to come are compared with --min-delta "
            f"{new.min_delta:g}"]


def _unmeasured(tc: TrainConfig, history: list, done: int) -> list[str]:
    """The metrics a run resumed from epoch `done`'s end (`history` up to it) measures on
    the restored model before it trains on (`Trainer._metrics_before_resume`): what the next
    epoch monitors, and val_cider before a self-critical one, that the last epoch did not
    log (loss-based metrics are logged by every epoch)."""
    wanted = {tc.monitor_for(done)} | ({"val_cider"} if tc.is_scst(done) else set())
    return sorted(n for n in wanted & {"val_bleu4", "val_cider"}
                  if history[-1].get(n) is None)


def _stage_best_entry(run: RunFolder, tc: TrainConfig, history: list) -> Optional[dict]:
    """The entry in `history` of best.json's epoch, when there is one and the monitor
    changes to val_cider with the self-critical stage (the default --monitor): where early
    stopping starts that stage, or starts over in it after epochs trained with another
    --monitor, it starts from the better of best.keras's val_cider and the epoch before's
    (`EarlyStopping.best_on_disk`). Else None. (With --monitor val_cider no monitor changes
    at the stage; given from a resume of default-monitor epochs on, the resumed epoch is the
    one to beat, as for any run resumed with another --monitor.)"""
    if tc.monitor is not None or not tc.scst_after:
        return None
    epoch = (run.best_record() or {}).get("epoch")
    if epoch is None or \
            not (os.path.exists(run.best_weights) or os.path.exists(run.best_model)):
        return None
    return next((h for h in history if h["epoch"] == epoch), None)


def _unmeasured_best(run: RunFolder, tc: TrainConfig, history: list,
                     done: int) -> Optional[int]:
    """best.json's epoch (`_stage_best_entry`) when the next epoch (0-based `done`) is
    self-critical and its entry in `history` has no val_cider (an epoch before the last
    cross-entropy one, which alone measures it: `Trainer._validate_model`, or one chosen by
    an earlier --monitor): the stage would start without its value
    (`Trainer._best_before_stage` measures it). Else None."""
    entry = _stage_best_entry(run, tc, history) if tc.is_scst(done) else None
    if entry is None or entry.get("val_cider") is not None:
        return None
    return entry["epoch"]


def metric_images_notes(run: RunFolder, cfg: RunConfig, notes: list,
                        val_images: int) -> tuple[list, RunConfig]:
    """`notes` with `check_metric_images`' notes added, and the config to train with: a
    rerun that trains nothing keeps the run's --bleu-images, which is then no changed
    setting (`changed_settings_note` among `notes` is said again without it)."""
    more, kept = check_metric_images(run, cfg, val_images)
    if kept is not cfg:
        saved = run.load_config().train
        before, after = (changed_settings_note(saved, c.train) for c in (cfg, kept))
        # its note on --bleu-images says more than `unused_flag_notes`' would
        unused = unused_flag_notes(cfg.train)
        notes = [n for n in notes if n != before and n not in unused] + \
            ([after] if after else [])
    return notes + more, kept


def check_metric_images(run: RunFolder, cfg: RunConfig,
                        val_images: int) -> tuple[list[str], RunConfig]:
    """A resume with another --bleu-images decodes val_bleu4 / val_cider on another set of
    validation images (the first --bleu-images of the `val_images` sorted ones): UserError
    when early stopping would compare the epochs to come with values of the run's set (their
    best in best.json included: a worse epoch could replace the best model, or a better one
    be missed); a note when those values are only logged (history.json, TensorBoard), or
    when the rerun trains nothing (all --epochs done, --max-steps reached, or early stopping
    had stopped the run): rerunning the command of such a run, say with another --bleu-images
    for its evaluation, was refused though no epoch would be measured.

    Returns the notes and the config to train with: `cfg`, except that a rerun which trains
    nothing keeps the run's --bleu-images. config.json must go on naming the images the
    run's values were measured on, or a later resume that trains on with the new
    --bleu-images would look unchanged and compare its epochs with the old values."""
    if not os.path.exists(run.config):
        return [], cfg
    old, new, history = run.load_config().train, cfg.train, run.read_history()
    # The checkpoint says which epoch comes next: history.json may hold one more, of an
    # epoch whose end was killed before its checkpoint, which is then trained again
    where = _resume_position(run)
    upcoming_epoch = len(history) if where is None else where[0]
    history = [h for h in history if h["epoch"] <= upcoming_epoch]
    was, now = min(old.bleu_images, val_images), min(new.bleu_images, val_images)
    if was == now or not history:
        return [], cfg
    why = _nothing_left(run, new, where, history)
    logged = [m for m in ("val_bleu4", "val_cider") if any(h.get(m) is not None
                                                           for h in history)]
    coming = set().union(*(decoded_metrics(new, e) for e in range(upcoming_epoch, new.epochs)))
    # no epoch to come measures on the new images (logged values said as measured on them)
    unmeasured = (f"{run.path} has nothing left to train ({why})" if why else
                  "the epochs to come measure neither val_bleu4 nor val_cider (only under "
                  "--monitor val_bleu4 or val_cider, or in self-critical epochs and the one "
                  "before them)" if logged and not coming else None)
    if unmeasured:
        kept = dataclasses.replace(cfg, train=dataclasses.replace(
            new, bleu_images=old.bleu_images))
        return [f"--bleu-images {new.bleu_images} (was {old.bleu_images}) measures nothing: "
                f"{unmeasured}; the run keeps --bleu-images {old.bleu_images}, which its "
                f"values were measured with"], kept
    logged = [m for m in logged if m in coming]
    # Early stopping compares the next epoch with the run's values of its metric: the best
    # of its stage so far, or the last epoch's at a stage change there. A stage change
    # later starts from the epoch before it, measured on the new images like every epoch to
    # come, and the metric stays that stage's to the end
    upcoming = new.monitor_for(upcoming_epoch) if new.epochs > upcoming_epoch else None
    monitored = [upcoming] if upcoming in logged else []
    if monitored:
        raise UserError(
            f"--bleu-images {new.bleu_images}: {run.path} measured {monitored[0]} on {was} "
            f"validation images (--bleu-images {old.bleu_images}), and early stopping compares "
            f"the epochs to come with those values (best.json's too); measured on {now} "
            f"images they would not be comparable (a worse epoch could replace the best "
            f"model, or a better one be missed): resume with --bleu-images "
            f"{old.bleu_images}, or add --fresh to start this run over")
    if not logged:
        return [], cfg
    measured = "not measured (no validation image)" if now == 0 else \
        f"measured on {now} validation images"
    return [f"--bleu-images {new.bleu_images} (was {old.bleu_images}): {' and '.join(logged)} "
            f"of the epochs to come are {measured}, those of the "
            f"run's {len(history)} epoch(s) so far on {was}: not comparable across the change "
            f"in history.json and TensorBoard (early stopping does not use them)"], cfg


def refuse_unrestorable_state(run: RunFolder, cfg: RunConfig, where: tuple[int, int],
                              old: TrainConfig) -> None:
    """UserError when the run has a checkpoint that `cfg` could not resume as it is: a
    --precision change to or from float16 (its optimizer is wrapped in loss scaling, so the
    checkpoints of one cannot be restored into the other; bfloat16 and float32 swap), or a
    history.json that is malformed or lacks epochs the checkpoint finished (early stopping
    replays it: its patience and best value would start over, and a worse epoch replace the
    best model), or --ema turned on or off (the moving averages are slots of the optimizer:
    the checkpoints of one hold other slots than the other's optimizer restores)."""
    was, now = old.ema, cfg.train.ema
    if (was > 0) != (now > 0):
        keep = f"--ema {was:g} (or another momentum)" if was > 0 else "--ema 0"
        raise UserError(
            f"--ema {now:g}: {run.path} was trained "
            + (f"with --ema {was:g}" if was > 0 else "without --ema (0)")
            + f", and its checkpoints hold the optimizer state of that setting, which a run "
            f"{'without' if was > 0 else 'with'} the moving average cannot restore: resume "
            f"with {keep}, use another --run, or add --fresh to start this run over")
    old, new = old.precision, cfg.train.precision
    if (old == "float16") != (new == "float16"):
        swap = {"float32": " (or bfloat16)", "bfloat16": " (or float32)"}.get(old, "")
        raise UserError(
            f"--precision {new}: {run.path} was trained with --precision {old}, and the "
            f"optimizer state in its checkpoints cannot be restored across float16 (whose "
            f"optimizer adds loss scaling) and the other precisions: resume with --precision "
            f"{old}{swap}, use another --run, or add --fresh to start this run over")
    done, recorded = where[0], len(run.read_history())
    if recorded < done:
        has = f"records {recorded} epoch(s)" if os.path.exists(run.history) else "missing"
        raise UserError(
            f"{run.history}: {has}, but the newest checkpoint of {run.path} finished {done} "
            f"epochs: resumed, early stopping would forget the best value and patience of the "
            f"lost epochs and could replace the best model with a worse one; restore the file, "
            f"or add --fresh to start this run over")


def refuse_cross_entropy_after_self_critical(run: RunFolder, cfg: RunConfig,
                                             where: tuple[int, int],
                                             old: TrainConfig) -> None:
    """UserError when the run's last finished epoch was self-critical and `cfg` would train
    the next one with cross-entropy (a rerun that forgot --scst-after, or moved it later):
    at --learning-rate and monitoring val_loss again, it would undo the self-critical stage,
    and a cross-entropy epoch with a lower val_loss would replace its best model."""
    done = where[0]
    if done == 0 or cfg.train.is_scst(done):
        return
    history = run.read_history()
    if len(history) < done or history[done - 1].get("stage") != "self-critical":
        return
    raise UserError(
        f"--scst-after {cfg.train.scst_after_flag}: epoch {done} of {run.path} was "
        f"self-critical, and this would train epoch {done + 1} with cross-entropy again (at "
        f"--learning-rate, monitoring val_loss: it would undo the self-critical stage, and "
        f"could replace its best model); resume with the run's --scst-after "
        f"{old.scst_after_flag}, or add --fresh to start this run over")


def refuse_other_stages_of_trained_epochs(run: RunFolder, cfg: RunConfig,
                                          where: tuple[int, int]) -> None:
    """UserError when `cfg`'s --scst-after gives a finished epoch another stage than the one
    it was trained with (history.json's "stage"): e.g. --scst-after 1 on a run that trained 3
    cross-entropy epochs. Training went on from the next epoch as if with --scst-after 3, but
    config.json recorded 1: a schedule the run never had (evaluate, TensorBoard's hparams and
    later resumes read it). A later epoch becoming self-critical is what --scst-after N (the
    run's cross-entropy epochs) says truthfully. (Going back to cross-entropy after a
    self-critical epoch is `refuse_cross_entropy_after_self_critical`'s.)"""
    tc, done = cfg.train, where[0]
    stages = [h.get("stage") for h in run.read_history()[:done]]
    wrong = [i for i, stage in enumerate(stages) if stage is not None
             and (stage == "self-critical") != tc.is_scst(i)]
    if not wrong:
        return
    epoch, trained = wrong[0], stages[wrong[0]]
    cross_entropy = next((i for i, stage in enumerate(stages) if stage == "self-critical"),
                         len(stages))
    # --scst-after must stay below --epochs: at the run's every epoch, more are needed
    more = f" and an --epochs above {cross_entropy}" if cross_entropy >= tc.epochs else ""
    raise UserError(
        f"--scst-after {tc.scst_after_flag}: epoch {epoch + 1} of {run.path} was trained "
        f"with {trained}, and --scst-after {tc.scst_after_flag} would record it as "
        f"{'cross-entropy' if trained == 'self-critical' else 'self-critical'} in config.json "
        f"(the run has trained {cross_entropy} cross-entropy epoch(s), history.json says): "
        f"resume with --scst-after {cross_entropy}{more} (the next epoch is then "
        f"self-critical), or add --fresh to start this run over")


def refuse_other_batches_mid_epoch(run: RunFolder, cfg: RunConfig, where: tuple[int, int],
                                   old: TrainConfig) -> None:
    """UserError when the run stopped inside an epoch (--max-steps, a kill after a
    --checkpoint-every save) and `cfg` would cut that epoch into other batches: another
    --batch-size, another --scst-samples in a self-critical epoch, or an --scst-after that
    changes the epoch's stage. The rerun skips the batches already trained by their count,
    so with other batches it would train some captions of the epoch twice and others never,
    and add up the losses of two stages as one epoch."""
    if where[1] == 0:
        return
    epoch, in_epoch = where
    new = cfg.train
    # what the epoch was cut with, by its checkpoint (config.json may be edited; checkpoints
    # made before they recorded it: config.json's)
    cut = checkpoints.newest_epoch_start(run.checkpoints) or {
        "batch_size": old.batch_size, "scst_samples": old.scst_samples}
    old = dataclasses.replace(old, batch_size=cut["batch_size"],
                              scst_samples=cut["scst_samples"])
    changed = []
    if old.is_scst(epoch) != new.is_scst(epoch):
        changed.append(f"--scst-after {new.scst_after_flag} (was {old.scst_after_flag}: the "
                       f"epoch would be "
                       f"{'self-critical' if new.is_scst(epoch) else 'cross-entropy'})")
    if old.batch_size != new.batch_size:
        changed.append(f"--batch-size {new.batch_size} (was {old.batch_size})")
    if old.is_scst(epoch) and new.is_scst(epoch) and old.scst_samples != new.scst_samples:
        changed.append(f"--scst-samples {new.scst_samples} (was {old.scst_samples})")
    if changed:
        raise UserError(
            f"{run.path} stopped in epoch {epoch + 1} at step {in_epoch}, and resuming it with "
            f"{'; '.join(changed)} would cut the rest of that epoch into other batches (some "
            f"captions twice, others never): finish epoch {epoch + 1} with the run's earlier "
            f"settings first (rerun with them; --epochs {epoch + 1} stops after it), then "
            f"resume with the new ones")


def saves_restored_as_best(run: RunFolder, tc: TrainConfig, early: EarlyStopping,
                           done: int, history: list, measured, *, at_end: bool,
                           recorded: Optional[int] = None) -> bool:
    """Whether a resume from the end of epoch `done` saves the restored model as the best
    (`Trainer._repair_best`): early stopping (replayed on `history`) has it as the best
    epoch, best.json names another (the process died between the checkpoint and saving the
    best model), and that process monitored what is monitored now (`measured`: the metrics
    measured at the resume, `Trainer._metrics_before_resume`). Never when the restored
    checkpoint is inside epoch `done` + 1 (not `at_end`): a newer one could not be restored,
    and its weights, never validated, were saved as epoch `done`'s best model. `recorded`:
    best.json's epoch as read before (else read now)."""
    if recorded is None:
        recorded = (run.best_record() or {}).get("epoch")
    return at_end and early.best_epoch is not None and early.best_epoch + 1 == done and \
        recorded != done and _monitored_then(tc, done, history, measured)


def keep_better_best_model(run: RunFolder, tc: TrainConfig, early: EarlyStopping, done: int,
                           steps: int, history: list) -> Optional[str]:
    """best.keras of an epoch after `done` (a resume from an older checkpoint than the one
    after its epoch: a newer one could not be restored, or older ones were put back), or of
    an epoch that `history` (history.json up to `done`) has with another value of the same
    metric (that epoch was trained again so, before). It stays the model to beat when it
    beats the replay's best (`EarlyStopping.keep_better`, by today's monitor): compared with
    the kept epochs only, a worse epoch replaced it, at that resume or at any later one.
    Not by val_cider at a later one: its values change with the document frequencies
    (`Trainer._measured_again`, which may rewrite best.json meanwhile), nor after
    best.keras was measured again (`Trainer.fit` does not call it then: the new value is the
    bar). Returns the note that says so, or None. (Every worker reads best.json, as it reads
    history.json: their early stopping must agree.)"""
    record = run.best_record()
    if record is None or not (os.path.exists(run.best_model) or
                              os.path.exists(run.best_weights)):   # lost: nothing to keep
        return None
    epoch, value, monitor = record["epoch"], record.get("value"), tc.monitor_for(done)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)
    same = number and record.get("monitor") == monitor
    if epoch <= done:
        entry = next((h for h in history if h["epoch"] == epoch), None)
        if not (same and monitor != "val_cider" and entry is not None and
                entry.get(monitor) is not None and entry.get(monitor) != value):
            return None
    kept = same and early.keep_better(epoch - 1, float(value), max(0, done - epoch))
    if epoch <= done and not kept:
        return None
    said = f"{run.best_model} is the best model of epoch {epoch} ({record.get('monitor')}=" \
        f"{metric_text(value) if number else value})"
    if epoch <= done:
        return (f"{said}, better than every epoch in {run.history}, whose epoch {epoch} is "
                f"of the model trained again after the run went back to an older checkpoint: "
                f"it stays the best model until an epoch beats it")
    again = f"epoch {epoch} is" if epoch == done + 1 else f"epochs {done + 1}-{epoch} are"
    then = ("it stays the best model until an epoch beats it" if kept else
            f"an epoch that beats the best {monitor} of epochs 1-{done} replaces it" if done
            else "the first epoch trained replaces it")
    return (f"{said}, trained after the checkpoint this run goes on from (epoch {done}, "
            f"step {steps}) by the process that stopped: {again} trained again, and {then}")


def _monitored_then(tc: TrainConfig, done: int, history: list, measured) -> bool:
    """Whether the process that trained epoch `done` monitored what it is monitored by now
    (see `Trainer._repair_best`)."""
    now = tc.monitor_for(done - 1)
    then = history[done - 1].get("monitor") if 0 < done <= len(history) else None
    return now == then if then is not None else now not in measured


def refuse_unrepairable_best_model(run: RunFolder, cfg: RunConfig,
                                   where: tuple[int, int]) -> None:
    """`RunFolder.best_model_beyond_repair`'s refusal (best.keras and best.weights.h5 gone
    while best.json records them, or best.keras gone beside weights HDF5 cannot open) before
    the data is loaded and anything is written: it came from `Trainer._repair_best`, after
    both. Not when the resume saves the restored epoch as the best
    (`saves_restored_as_best`, with what `Trainer.fit` would measure first), which writes all
    three files again."""
    beyond = run.best_model_beyond_repair()
    if beyond is None:
        return
    tc, (done, in_epoch) = cfg.train, where
    history = [h for h in run.read_history() if h["epoch"] <= done]
    measured = _unmeasured(tc, history, done) if history and not in_epoch and trains_more(
        tc, done, checkpoints.steps_taken(run.checkpoints) or 0) else []
    early = replayed_early_stopping(run, tc, history)
    early.replay()
    if not saves_restored_as_best(run, tc, early, done, history, measured,
                                  at_end=not in_epoch):
        raise beyond


def load_train_data(cfg: RunConfig, run_dir: str, reuse: bool = True,
                    images_dir: Optional[str] = None) -> TrainData:
    """`train_data.load_train_data` for a run folder path (`reuse`: its split and vocabulary
    when it has them; `images_dir`: --images, where the source images are checked)."""
    return _load_train_data(cfg, RunFolder(run_dir), reuse=reuse, images_dir=images_dir)


def forget_undone(run: RunFolder, done: int, steps: int, log) -> None:
    """What a stopped process logged of training after the checkpoint a run starts from
    (epoch `done`, step `steps`) was of a model that no longer exists: a kill after its
    newest checkpoint, or a damaged one skipped for an older one. Its TensorBoard points
    (`prune_event_files`) and the heatmaps of later epochs (attention/epoch_K) go:
    TensorBoard drew them beside the new ones, and a run stopping earlier this time kept
    them as if of its own epochs."""
    points = prune_event_files(run.logs, done, steps)
    folder = run.attention
    later = {}                                                # epoch -> folder name
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        number = RunFolder.ATTENTION_EPOCH.fullmatch(name)
        if number and int(number[1]) > done and os.path.isdir(os.path.join(folder, name)):
            later[int(number[1])] = name
    for name in later.values():
        shutil.rmtree(os.path.join(folder, name))
    if points or later:
        gone = [f"{points} TensorBoard value(s)"] if points else []
        if later:
            gone.append(f"the heatmaps of epoch(s) {', '.join(map(str, sorted(later)))}")
        log(f"note: this run goes on from epoch {done}, step {steps}: removed "
            f"{' and '.join(gone)} logged after that point by the process that stopped "
            f"(that training is done again)")


def log_lost_epochs(run: RunFolder, done: int, log) -> None:
    """The TensorBoard scalars of epochs up to `done` that history.json has and the event
    files lack, written from history.json (`log_missing_epochs`), with a note: a stop after
    an epoch's entry and checkpoint, before its scalars were written (a full disk or a
    second Ctrl-C while its best model was saved, a kill), lost them for good, as the run
    resumes after that epoch."""
    epochs = log_missing_epochs(run.logs, [h for h in run.read_history() if h["epoch"] <= done])
    if epochs:
        log(f"note: TensorBoard lacked the scalars of epoch(s) {', '.join(map(str, epochs))}, "
            f"which history.json has (the process that trained them stopped before it wrote "
            f"them): wrote them from history.json")


def missing_heatmaps(run: RunFolder, epoch: int, names: list[str]) -> list[str]:
    """Those of the heatmap files `names` that attention/epoch_`epoch` lacks: a folder there
    is not enough, a stop (a full disk, a kill) while they were written leaves it with some
    of them or none."""
    folder = run.attention_epoch(epoch)
    return [n for n in names if not os.path.isfile(os.path.join(folder, n))]


def log_unredrawable_heatmaps(run: RunFolder, last: int, names: list[str], log) -> None:
    """A note naming the epochs 1..`last` whose attention/epoch_K lacks heatmaps among
    `names` (the sample images' now): lost by a stop before they were written (the heatmaps
    of an epoch are written after its checkpoint, during the next epoch), and past drawing
    again, as the model is no longer those epochs'; `Trainer._redraw_lost_samples` draws
    those of the epoch a run resumes from at its end. Only the names some epoch's folder
    holds count (a rerun with a higher --sample-images does not make the earlier epochs'
    folders incomplete)."""
    drawn = set()
    for epoch in range(1, last + 1):
        folder = run.attention_epoch(epoch)
        drawn.update(os.listdir(folder) if os.path.isdir(folder) else ())
    expected = [n for n in names if n in drawn]
    lacking = {e: len(missing_heatmaps(run, e, expected)) for e in range(1, last + 1)}
    lacking = {e: count for e, count in lacking.items() if count}
    if not lacking:
        return
    low, high = min(lacking.values()), max(lacking.values())
    log(f"note: {run.attention}: the heatmaps of epoch(s) {_epoch_ranges(sorted(lacking))} "
        f"lack {low}{'' if low == high else f' to {high}'} of the {len(expected)} sample "
        f"images' (lost when a run stopped before writing them, or drawn with fewer "
        f"--sample-images); only those of the epoch a rerun resumes from can be drawn again")


def _epoch_ranges(epochs: list[int]) -> str:
    """"1-3, 5" of the ascending epochs [1, 2, 3, 5]."""
    runs: list[list[int]] = []
    for e in epochs:
        if runs and e == runs[-1][1] + 1:
            runs[-1][1] = e
        else:
            runs.append([e, e])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_finite(out: dict, epoch: int, step: int, kept: Optional[str],
                 loss_scaling: bool, tc: Optional[TrainConfig] = None,
                 self_critical: bool = False) -> None:
    """TrainingError when a step's loss (or, without loss scaling, which skips such steps
    itself, its gradient norm) or self-critical reward is not finite; `kept` is the newest
    checkpoint, which the message names; `tc` (the run's training settings) and
    `self_critical` (the epoch's kind) make its advice name only what would change
    something: it said "--clip-norm 5, or --precision float32" to a run using both."""
    if "reward" in out and not math.isfinite(out["reward"]):
        raise TrainingError(
            f"the self-critical reward became {out['reward']} at epoch {epoch + 1}, step "
            f"{step + 1}: CIDEr-D of the sampled captions is not a number, a bug rather "
            f"than bad settings; training stopped, the last checkpoint is kept "
            f"({kept or 'none yet'}). Please report it")
    if math.isfinite(out["loss"]) and (math.isfinite(out["gradient_norm"]) or loss_scaling):
        return
    what = (f"the loss became {out['loss']}" if not math.isfinite(out["loss"]) else
            f"the gradient norm became {out['gradient_norm']} (the loss was {out['loss']})")
    rate = "--scst-learning-rate" if self_critical else "--learning-rate"
    if tc is None:
        advice = f"a lower {rate}, --clip-norm 5 (if clipping is off), or --precision float32"
    else:
        now = tc.scst_learning_rate if self_critical else tc.learning_rate
        advice = [f"a lower {rate} (now {now:g})"]
        if tc.clip_norm == 0:
            advice.append("--clip-norm 5 (clipping is off)")
        elif tc.clip_norm > 5:
            advice.append(f"a lower --clip-norm (now {tc.clip_norm:g})")
        if tc.precision == "bfloat16":
            advice.append(f"--precision float32 (now {tc.precision})")
        elif tc.precision == "float16":   # its checkpoints do not restore into float32
            advice.append("--precision float32 with --fresh (now float16, whose checkpoints "
                          "do not restore into float32)")
        advice = ", ".join(advice[:-1]) + (" or " if len(advice) > 1 else "") + advice[-1]
    raise TrainingError(
        f"{what} at epoch {epoch + 1}, step {step + 1}; training "
        f"stopped. " + (f"The last good checkpoint is kept: {kept}. " if kept else
                        "No checkpoint was written yet. ")
        + f"The features were checked (finite, undamaged), so the optimisation diverged: "
          f"try {advice}.")


def training_state(cfg: RunConfig, vocab_tokens: int,
                   cross_entropy_steps: int) -> tuple[StagedLearningRate, dict]:
    """(the learning-rate schedule, what every checkpoint of a run holds, by the names it
    holds them under: the model, its optimizer, the counters and the dropout seed
    generators' states), new; under the caller's strategy scope. `Trainer` trains them,
    `rerun_without_data` checks that the run's newest checkpoint restores into them."""
    tc, mc = cfg.train, cfg.model
    model = ShowAttendTell(vocab_tokens, mc.embedding_dim, mc.units, mc.dropout,
                           dtype=DTYPE_POLICIES[tc.precision], name="show_attend_tell")
    lr_schedule = StagedLearningRate(tc, cross_entropy_steps)
    optimizer = make_optimizer(tc, lr_schedule)
    optimizer.build(model.trainable_variables)
    rng = [v.value for v in model.non_trainable_variables if "seed_generator" in v.path]
    return lr_schedule, dict(
        model=model, optimizer=optimizer,
        epoch=tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch"),
        step=tf.Variable(0, dtype=tf.int64, trainable=False, name="step"),
        step_in_epoch=tf.Variable(0, dtype=tf.int64, trainable=False),
        epoch_sums=tf.Variable(tf.zeros([len(EpochTotals.FIELDS)], tf.float64),
                               trainable=False),
        rng=rng)


class Trainer:
    """Builds the model, optimizer, steps and input (`EpochData`) of one run folder,
    restores its newest intact checkpoint, then saves config.json, split.json and vocab.json
    (`cfg` and `data` of the run from here on), and trains it (`fit`)."""

    def __init__(self, cfg: RunConfig, run_dir: str, images_dir: Optional[str] = None,
                 strategy: Optional[tf.distribute.Strategy] = None, progress: bool = True,
                 log=print, data: Optional[TrainData] = None):
        self.cfg, self.run, self.run_dir = cfg, RunFolder(run_dir), run_dir
        self.progress, self.log = progress, log
        tc = cfg.train
        if tc.precision == "float16" and not tf.config.list_physical_devices("GPU"):
            log("note: --precision float16 is meant for GPUs; on a CPU it is slow, prefer "
                "bfloat16")
        if strategy is None:
            strategy = distribute.make_strategy(tc.strategy)
        for note in distribute.strategy_notes(tc.strategy, strategy, tc.xla):
            log("note: " + note)
        if tc.xla and tc.scst_after is not None:
            log("note: --xla compiles the cross-entropy step only: the self-critical step, "
                "whose CIDEr-D reward is computed in numpy, runs without XLA")
        self.strategy = strategy
        quiet.meet_dtypes()  # after the strategy, which may configure TF first (quiet.py)
        # after the strategy too: listing the logical devices starts TensorFlow's runtime,
        # which a multi-worker strategy must configure first
        kernel_note = fused.unavailable_note() if tc.precision == "float32" and \
            not tf.config.list_logical_devices("GPU") else None
        if kernel_note:
            log("note: " + kernel_note)
        self.chief = distribute.is_chief(self.strategy)
        self.data = data or load_train_data(cfg, run_dir, images_dir=images_dir)
        # the run's training settings until this call trains (`with_trained_settings`)
        self._previous = self.run.load_config().train if os.path.exists(self.run.config) \
            else None
        # the table the val_cider of history.json's entries without a digest was measured
        # with: cider_df.json as found, before anything counts it again (`_on_other_table`)
        self._df_found = recorded_digest(self.run.cider_df)
        self._digests: Optional[dict] = None   # `_images_digests`
        # the same for the validation images of entries without a digest (`_on_other_images`):
        # the run's val images with usable features when it last started, from split.json
        # as found, before this call records its own
        self._val_found = _val_images_at_last_start(self.run, self.data, self._previous)
        # where the source images were checked (a resume: where the run trained), for the
        # heatmaps: the cache's last folder may hold another dataset's images since
        self.images_dir = images_dir or self.data.images_dir or \
            self.data.manifest.get("images_dir")
        keras.utils.set_random_seed(cfg.data.seed)
        self.inputs = EpochData(cfg, self.data, self.strategy, self.run, self.chief,
                                log=self.log)
        # multi-worker: workers with other settings or data are refused before the model is
        # built (another vocabulary's size: weights of other shapes), those that restore other
        # steps after, all before any of them writes the run folder (a refused start left the
        # odd worker's config.json, and the matching rerun was then refused as a changed
        # configuration)
        distribute.check_workers_agree(self.strategy, agree=self._agreement())
        # the cosine decay spans the cross-entropy epochs, never --max-steps: a run stopped
        # by it and rerun takes the learning rates of an uninterrupted run
        self._build_state(tc.cross_entropy_epochs
                          * self.inputs.steps_per_epoch)
        distribute.check_workers_agree(self.strategy, int(self.step.numpy()), self._restored,
                                       self.run.checkpoints)
        self.inputs.load_table()
        if self._restored and self._trains_on():   # no step to come: no word on their rate
            for note in filter(None, (self._resume_rate_note(), self._steps_changed_note())):
                log("note: " + note)
        self._scst: Optional[SelfCritical] = None
        self._eval_sets: dict = {}
        self.validator = Validator(
            self.model, self.data.vocab, cfg.vocab.max_length + 1,
            table_or_files(self.data.reader, self.data.feature_paths, self.inputs.table),
            self.data.references["val"], tc.bleu_images,
            tc.sample_images, self.inputs.document_frequency)
        # Written last, once the checkpoint restored and the features loaded: a resume that
        # fails there leaves config.json describing the settings its checkpoints were made
        # with. Its training settings stay the run's until this call trains (`_save`)
        if self.chief:
            self._record_found_digests()
            self.data.fix_in(self.run, cfg.captions, cfg.settings_digest())
        self._settings_recorded = self._restored is None
        self._settings_from = "epoch 1"   # where this call's settings apply (`fit` says)
        self._save_config(cfg if self._settings_recorded else
                          with_trained_settings(self.run, cfg))

    def _agreement(self) -> dict:
        """What every worker of a multi-worker run must have alike, by name, as hex digests
        (`distribute.check_workers_agree`): the flags (`RunConfig.settings_digest`, paths
        and `PER_MACHINE` aside) and the data each worker read or made of its own
        --captions and --cache. Flags alone let a worker whose cache lacked a few train
        features (or whose caption file was another version) fit another vocabulary,
        split by hash into another val set, and feed other images: the mirrored weights
        were trained on mixed token ids, and the chief's val images in the other's train."""
        data = self.data
        return {"flags": self.cfg.settings_digest(with_train=True),
                "vocabulary": data.vocab.digest(),
                "split": splits_digest(data.splits),
                "caption data": (data.caption_data or {}).get("sha256", ""),
                "feature cache": feature_cache.cache_identity(data.manifest)["fingerprint"],
                "train and val images with usable features": _keys_digest(
                    f"{split}/{key}" for split in ("train", "val")
                    for key in data.caption_ids[split])}

    def _save_config(self, cfg: RunConfig) -> None:
        """Save `cfg` as the run's config.json: the chief replaces it, another worker of a
        multi-worker run writes it only where there is none (its own run folder, which a rerun
        without the chief's split.json then refuses). In a shared run folder every worker's
        replaced it, the last one winning: config.json then named another machine's --cache
        and --memory-cache-gb, and `evaluate` or a resume on the chief's machine used them."""
        if self.chief:
            cfg.save(self.run.config)
            return
        if os.path.exists(self.run.config):
            return
        tmp = temp_name(self.run.config, ".worker")
        try:
            cfg.save(tmp)       # its error (a full disk) is the one to tell, not the link's
            try:    # made only if missing: the chief's may be there now
                os.link(tmp, self.run.config)
            except FileExistsError:
                pass
            except OSError:   # a file system without hard links: nearly as well
                if not os.path.exists(self.run.config):
                    os.replace(tmp, self.run.config)
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)

    # -- model, optimizer, checkpoint -----------------------------------------------
    def _build_state(self, cross_entropy_steps: int) -> None:
        mc = self.cfg.model
        with self.strategy.scope():
            self.lr_schedule, objects = training_state(self.cfg, len(self.data.vocab),
                                                       cross_entropy_steps)
            self.epoch_start = tf.Variable(  # `checkpoints.EPOCH_START`, NaN: not known
                tf.fill([len(checkpoints.EPOCH_START)], tf.constant(np.nan, tf.float64)),
                trainable=False)
        self.model, self.optimizer = objects["model"], objects["optimizer"]
        self.epoch, self.step = objects["epoch"], objects["step"]
        self.step_in_epoch, self.epoch_sums = objects["step_in_epoch"], objects["epoch_sums"]
        self.checkpoint = tf.train.Checkpoint(**objects)   # what every checkpoint holds
        own = self.run.checkpoints if self.chief else \
            self.run.worker_checkpoints(distribute.task_id(self.strategy))
        # Every worker restores the chief's newest intact checkpoint (a shared filesystem),
        # else its own scratch copy; only the chief sets damaged ones aside.
        source = self.run.checkpoints if checkpoints.list_checkpoints(self.run.checkpoints) \
            else own
        self._restored = checkpoints.restore_newest_intact(
            self.checkpoint, source, log=self.log, set_aside=self.chief or source == own)
        started = self._restored and checkpoints.epoch_start(self._restored)
        if started:
            self.epoch_start.assign([started[k] for k in checkpoints.EPOCH_START])
        self.manager = tf.train.CheckpointManager(self._checkpoint_to_save(objects), own,
                                                  max_to_keep=checkpoints.KEEP)
        self.steps = Steps(self.model, self.optimizer, self.strategy, self.cfg,
                           lambda: self.scst)
        # --ema: what an epoch is measured, saved and drawn with (`AveragedWeights`)
        self.averaged = AveragedWeights(self.optimizer)
        if mc.feature_norm and self._restored is None:  # else: restored with the model
            train_paths = {self.data.feature_paths[k] for k in self.inputs.train_images}
            with self._stopped_at_damaged_features():
                self.model.feature_norm.set_statistics(*pipeline.feature_statistics(
                    self.data.reader, train_paths, seed=self.cfg.data.seed))

    def _checkpoint_to_save(self, objects: dict) -> tf.train.Checkpoint:
        """The checkpoint saved: `objects` and the facts of the epoch it stops in (restored by
        name, `checkpoints.epoch_start`: a checkpoint made before them lacks them, and a
        restore that asked for them would refuse it)."""
        return tf.train.Checkpoint(**objects, epoch_start=self.epoch_start)

    def _epoch_first_rate(self, epoch: int, first: int, in_epoch: int) -> float:
        """The learning rate of 0-based `epoch`'s first step, the optimizer's step `first`:
        resumed inside the epoch, the rate that step used (the checkpoint's; for a checkpoint
        made before it was kept, by the settings of config.json, the run's until this call
        trains), not the one this call's schedule has there, which no step used."""
        recorded = float(self.epoch_start.numpy()[0])
        if in_epoch and math.isfinite(recorded):
            return recorded
        if not in_epoch or self._previous is None:
            return float(self.lr_schedule(first))   # its stage set by the caller
        tc, per_epoch = self._previous, self.inputs.steps_per_epoch
        schedule = StagedLearningRate(tc, tc.cross_entropy_epochs * per_epoch)
        schedule.self_critical.assign(int(self.cfg.train.is_scst(epoch)))
        # the cosine's position at the epoch's start (`_resume_rate_note`): earlier epochs
        # of another batch size took another number of the optimizer's steps
        return float(schedule(epoch * per_epoch))

    def _resume_rate_note(self) -> Optional[str]:
        """`schedule_notes`' note for a run resumed inside a cross-entropy epoch, which only
        the trainer can give: the rate at the step training continues at, by the run's
        schedule (config.json's) and by this call's, over the optimizer's steps."""
        old, new = self._previous, self.cfg.train
        epoch, in_epoch = int(self.epoch.numpy()), int(self.step_in_epoch.numpy())
        if old is None or not 0 < in_epoch < self._epoch_length(epoch) or \
                new.is_scst(epoch) or old.batch_size != new.batch_size or \
                not _schedule_moved(old, new):
            return None
        per_epoch = self.inputs.steps_per_epoch
        at = epoch * per_epoch + in_epoch   # the cosine's position (`StagedLearningRate`)
        was, now = (float(StagedLearningRate(tc, tc.cross_entropy_epochs * per_epoch)(at))
                    for tc in (old, new))
        return _rate_note(old, new, was, now, f"training continues at step {in_epoch + 1} of "
                                              f"epoch {epoch + 1}")

    def _steps_changed_note(self) -> Optional[str]:
        """For a cosine run resumed at the start of a cross-entropy epoch whose epochs now have
        another number of steps than its last cross-entropy one (another --batch-size, other
        train data): where the decay goes on, with the rate the epoch starts at, by this
        call's schedule and by the run's. (The decay once counted the steps taken: a bigger
        --batch-size put them further along a shorter curve, and the epochs to come trained
        at ~0.)"""
        old, new = self._previous, self.cfg.train
        done, per_epoch = int(self.epoch.numpy()), self.inputs.steps_per_epoch
        if old is None or new.lr_schedule != "cosine" or new.is_scst(done) or \
                int(self.step_in_epoch.numpy()):
            return None
        trained = [h.get("steps") for h in self.run.read_history()[:done]
                   if h.get("stage", "cross-entropy") == "cross-entropy"]
        if not trained or not isinstance(trained[-1], int) or trained[-1] == per_epoch:
            return None
        cause = (f"--batch-size {new.batch_size}, was {old.batch_size}"
                 if old.batch_size != new.batch_size else "other train data")
        was, now = _scheduled_rate(old, done), _scheduled_rate(new, done)
        there = ("as the run's schedule had there"
                 if math.isclose(was, now, rel_tol=1e-6, abs_tol=1e-12) else
                 f"where the run's schedule ({_span(old)}) had {was:.3g}")
        return (f"an epoch is now {per_epoch} steps (was {trained[-1]}: {cause}): the cosine "
                f"decay goes on from the fraction of training done, {done} of "
                f"{new.cross_entropy_epochs} cross-entropy epochs; epoch {done + 1} starts at "
                f"a learning rate of {now:.3g}, {there}")

    def _trains_on(self) -> bool:
        """Whether `fit` takes a step or ends an epoch (see `trains_more`, `_nothing_left`)."""
        tc, done = self.cfg.train, int(self.epoch.numpy())
        in_epoch = int(self.step_in_epoch.numpy())
        ended = 0 < in_epoch >= self._epoch_length(done)
        if not trains_more(tc, done, int(self.step.numpy()), epoch_ended=ended):
            return False
        history = [h for h in self.run.read_history() if h["epoch"] <= done]
        return bool(in_epoch) or not history or \
            _nothing_left(self.run, tc, (done, 0), history) is None

    def restore(self) -> bool:
        """Whether training resumes from a checkpoint (restored when the trainer was built;
        under multi-worker, the workers were checked to agree then)."""
        return self._restored is not None

    @property
    def scst(self) -> SelfCritical:
        if self._scst is None:
            tc = self.cfg.train
            self._scst = SelfCritical(
                self.model, CiderD(self.inputs.train_references(),
                                   self.inputs.document_frequency()),
                tc.scst_samples, tc.scst_baseline, self.cfg.vocab.max_length + 1)
        return self._scst

    # -- steps ------------------------------------------------------------------------
    def _compile(self, element_spec) -> None:
        """Trace the cross-entropy train and eval steps (once for every bucket shape)."""
        self.steps.compile(element_spec)
        self.train_step, self.eval_step = self.steps.train_step, self.steps.eval_step

    # -- epochs -----------------------------------------------------------------------
    def _run_train_epoch(self, epoch: int, callbacks) -> dict:
        """The training steps of one epoch (from where a checkpoint left it); its logs."""
        # Counters live in Python during the epoch (no eager op per step) and are copied into
        # the checkpointed variables before every save (`_save_checkpoint`).
        self_critical = self.cfg.train.is_scst(epoch)
        self.lr_schedule.self_critical.assign(int(self_critical))
        step, in_epoch = int(self.step.numpy()), int(self.step_in_epoch.numpy())
        totals = EpochTotals.from_vector(self.epoch_sums.numpy()) if in_epoch else EpochTotals()
        # the rate of the epoch's first step (resumed mid-epoch too: the optimizer counts the
        # steps it applied, which `totals` counts too), what history.json logs for the epoch
        first = int(inner(self.optimizer).iterations.numpy()) - int(totals.sums["steps"])
        if not self_critical:   # the cosine goes on from the epochs done, whatever their steps
            self.lr_schedule.at_epoch(epoch, self.inputs.steps_per_epoch, first)
        rate = self._epoch_first_rate(epoch, first, in_epoch)
        tc = self.cfg.train
        self.epoch_start.assign([rate, tc.batch_size, tc.scst_samples])
        if self_critical:
            batches = self.inputs.images(epoch, skip=in_epoch)
            if self.steps.scst_step is None:
                self.steps.compile_scst(batches.element_spec)
            seed = self.cfg.data.seed * 1_000_003
            run = lambda batch, s: self.steps.scst_step(  # noqa: E731
                batch, tf.constant(seed + s, tf.int64))
        else:
            batches = self.inputs.captions("train", epoch=epoch, skip=in_epoch)
            run = lambda batch, s: self.train_step(batch)  # noqa: E731
        target = self._epoch_length(epoch)
        # in a log file a line a minute too (a COCO epoch on a CPU is half an hour); resumed
        # mid-epoch, its time per step and ETA count only this process's steps
        bar = progress.bar(target, self.progress, stateful=["loss", "reward", "cap/s"],
                           periodic=True, initial=in_epoch)
        shown = None
        earlier = totals.sums["captions"]  # trained before a restart of this epoch: not in speed
        start = time.perf_counter()
        # Ctrl-C or SIGTERM stops after the running step and its bookkeeping, checkpointed
        # there (else up to an epoch of steps was lost); multi-worker saves are collectives,
        # which one worker's signal cannot start alone: there it stops at once, as before
        with self._signals_held(saying="\nstopping after this step, which is then "
                                        "checkpointed (again: stop at once)\n") as stopping:
            try:
                for batch in pipeline.checked(batches):
                    out = {k: float(v) for k, v in run(batch, step).items()}
                    check_finite(out, epoch, step, self.manager.latest_checkpoint,
                                 loss_scaling=hasattr(self.optimizer, "dynamic_scale"),
                                 tc=self.cfg.train, self_critical=self_critical)
                    step, in_epoch = step + 1, in_epoch + 1
                    totals.add(out)
                    speed = (totals.sums["captions"] - earlier) / max(
                        time.perf_counter() - start, 1e-9)
                    shown = [("loss", totals.sums["loss"] / totals.sums["captions"]),
                             ("cap/s", speed)]
                    if self_critical:
                        shown.append(("reward",
                                      totals.sums["reward"] / totals.sums["captions"]))
                    bar.update(in_epoch, shown)
                    callbacks.on_train_batch_end(step, {"loss": out["loss"], "global_step": step,
                                                        "gradient_norm": out["gradient_norm"]})
                    every = self.cfg.train.checkpoint_every
                    if every and step % every == 0 and not stopping:
                        self._save_checkpoint(step, in_epoch, totals)
                    if stopping or self.cfg.train.max_steps and step >= self.cfg.train.max_steps:
                        break
            except pipeline.DamagedFeatures as e:
                self._save_checkpoint(step, in_epoch, totals)
                raise e.stop(self.inputs.repair_command(), step) from None
            finally:   # stopped (--max-steps, Ctrl-C, an error): the bar's line ends here (in
                if in_epoch < target:   # a log: its only line), before what is said next
                    with contextlib.suppress(OSError):   # (a closed stdout: not the news)
                        bar.update(in_epoch, shown, finalize=True)
            if stopping:
                self._save_checkpoint(step, in_epoch, totals)
                self.log(f"epoch {epoch + 1}: stopped at step {in_epoch} of {target} "
                         f"(checkpoint saved: {self.same_command} continues from there)")
            self._set_counters(step, in_epoch, totals)   # before a held signal is raised
        seconds = max(time.perf_counter() - start, 1e-9)
        trained = totals.sums["captions"] - earlier
        # none trained now (an epoch whose steps were all trained before a stop in its
        # validation): no speed, not 0 captions/s in history.json and TensorBoard
        return {**totals.logs(self_critical), "steps": in_epoch, "target_steps": target,
                "captions_per_second": trained / seconds if trained else None,
                "learning_rate": rate}

    @property
    def same_command(self) -> str:
        """The command that continues this run, as its messages name it: with --fresh in it,
        a rerun of the same command deleted what was just saved and started over."""
        return f"the same command{WITHOUT_FRESH if self.cfg.train.fresh else ''}"

    def _signals_held(self, saying: str = ""):
        """`interrupts.held` where this process may stop after what it holds them over: not
        under multi-worker training, whose saves are collectives one worker's signal cannot
        start alone (there a signal stops at once)."""
        return interrupts.held(enabled=distribute.single_process(self.strategy), saying=saying)

    def _set_counters(self, step: int, in_epoch: int, totals: EpochTotals) -> None:
        self.step.assign(step)
        self.step_in_epoch.assign(in_epoch)
        self.epoch_sums.assign(totals.vector())

    def _save_checkpoint(self, step: int, in_epoch: int, totals: EpochTotals) -> None:
        # Every worker saves (a collective under multi-worker); non-chiefs into scratch folders.
        self._set_counters(step, in_epoch, totals)
        self._save()

    def _record_settings(self) -> None:
        """config.json gets this call's training settings once it has trained with them:
        before the first checkpoint or history entry they made (a rerun that trained nothing,
        or failed at its first step, keeps the run's; `with_trained_settings`); so does
        TensorBoard's HParams dashboard (`log_hparams`)."""
        if not self._settings_recorded:
            self._save_config(self.cfg)
            if self.chief:   # and TensorBoard's HParams, with what changed (a kill between
                # the two: the next start writes it there, as changed "before epoch N")
                log_hparams(self.run.logs, _hparams(self.cfg, len(self.data.vocab)),
                            self._settings_from)
            self._settings_recorded = True

    def _save(self) -> None:
        """Checkpoint the counters' step; a checkpoint that cannot be written (a full disk, a
        read-only folder) stops training with a TrainingError naming the folder and where a
        rerun resumes, instead of TensorFlow's traceback, once the shards the failed save
        wrote (`ckpt-N_temp/`) are deleted."""
        self._record_settings()
        self.averaged.put(False)   # the trained weights where they belong, whatever stopped
        step = int(self.step.numpy())
        try:
            self.manager.save(checkpoint_number=step)
        except tf.errors.OpError as e:
            checkpoints.remove_failed_save(self.manager.directory, step)  # its shards
            if self.cfg.train.strategy == "multi-worker" and \
                    distribute.other_worker_stopped(e) is not None:
                raise   # not the disk: `cli.main` says which worker stopped
            reason = re.sub(r"\s*\[Op:\w+\]$", "", (e.message or str(e)).strip()).split("; ")[-1]
            kept = self.manager.latest_checkpoint
            raise TrainingError(
                f"cannot write the checkpoint of step {step} into {self.run.checkpoints} "
                f"({reason.splitlines()[0][:200]}): "
                f"{free_space(alternative='make it writable')}; it resumes from "
                f"{os.path.basename(kept) if kept else 'the start (no checkpoint yet)'}") \
                from None

    def evaluate_loss(self, split: str = "val") -> Optional[dict]:
        """Teacher-forced loss of a split: cross-entropy per real token of the whole split plus
        the attention regulariser per caption (sums over batches, so any batching gives the
        same value)."""
        if not self.inputs.items[split][0]:
            return None
        if split not in self._eval_sets:  # unshuffled: the same batches every epoch
            self._eval_sets[split] = self.inputs.captions(
                split, batch_size=EVAL_BATCH_FACTOR * self.cfg.train.batch_size)
        sums = dict.fromkeys(("ce_sum", "tokens", "reg_sum", "caption_count"), 0.0)
        # a damaged file: `pipeline.DamagedFeatures`, which `_validate`'s caller turns into
        # the message after saving the epoch's steps
        for batch in pipeline.checked(self._eval_sets[split]):
            for k, v in self.eval_step(batch).items():
                sums[k] += float(v)
        ce = sums["ce_sum"] / max(sums["tokens"], 1.0)
        return {"loss": ce + sums["reg_sum"] / max(sums["caption_count"], 1.0), "ce": ce}

    def _validate(self, epoch: int) -> dict:
        with self.averaged():
            return self._validate_model(epoch)

    def _validate_model(self, epoch: int) -> dict:
        tc, logs = self.cfg.train, {}
        val = self.evaluate_loss("val")
        if val is not None:
            logs["val_loss"], logs["val_ce"] = val["loss"], val["ce"]
        logs.update(self.validator.metrics(sorted(decoded_metrics(tc, epoch))))
        return logs

    # -- best model -------------------------------------------------------------------
    def _save_best(self, epoch: int, value: float) -> None:
        if self.chief:
            with self.averaged():
                self.run.save_best(self.model, epoch + 1, self.cfg.train.monitor_for(epoch),
                                   value)

    def _restore_best(self) -> None:
        if not self.run.restore_best_weights(self.model) and os.path.exists(self.run.best_model):
            self.model.set_weights(self.run.load_best_model().get_weights())

    def _repair_best(self, early: EarlyStopping, done: int, history: list,
                     measured: dict, *, at_end: bool) -> None:
        """If the process died between the checkpoint and saving the best model, the best
        epoch is the restored one: save it now; else make a missing or damaged best.keras
        whole again from the weights kept beside it.

        Only if that process monitored what early stopping monitors now: resumed with
        another --monitor, the restored epoch's value was never compared (or was measured
        just now, `_metrics_before_resume`: `measured`), so it is what the next epochs must
        beat, not a best model lost. history.json records each epoch's monitor (older runs'
        entries do not: then only `measured` tells). `at_end`: the restored checkpoint is
        the end of epoch `done` (`saves_restored_as_best`).

        Every worker forgets the best model on disk its early stopping was told of when the
        restored epoch replaces it (read with best.json before the chief's save here: read
        now, another worker would keep it in the self-critical stage's bar alone)."""
        given = early.disk_best_epoch
        if given is not None and saves_restored_as_best(
                self.run, self.cfg.train, early, done, history, measured, at_end=at_end,
                recorded=given + 1):
            early.forget_best_on_disk()
        if not self.chief:
            return
        if saves_restored_as_best(self.run, self.cfg.train, early, done, history, measured,
                                  at_end=at_end):
            self._save_best(early.best_epoch, early.best)
        else:
            note = self.run.repair_best_model(self.model)
            if note:
                self.log("note: " + note)

    # -- main -------------------------------------------------------------------------
    def fit(self) -> dict:
        tc = self.cfg.train
        resumed = self.restore()
        done, steps_before = int(self.epoch.numpy()), int(self.step.numpy())
        history = self.run.read_history() if resumed else []
        history = [h for h in history if h["epoch"] <= done]
        # a stop inside `RunFolder.save_best` left best.keras or best.weights.h5 of another
        # model than best.json's: made whole before its value or weights are read as the bar
        if self.chief:
            note = self.run.match_best_files(self.model)
            if note:
                self.log("note: " + note)
        # A finished run (or one at --max-steps) traces no step and decodes nothing (seconds)
        ended = 0 < int(self.step_in_epoch.numpy()) >= self._epoch_length(done)
        todo = trains_more(tc, done, steps_before, epoch_ended=ended)
        measured, bar, replayed, stage_best = {}, None, history, None
        if todo:
            self._compile(self.inputs.captions("train", epoch=0).element_spec)
            with self._stopped_at_damaged_features():
                bar = self._measured_again(history, done)
                measured = self._metrics_before_resume(history, done)
                stage_best = self._best_before_stage(
                    history, done, resume=(measured, bar, steps_before,
                                           not int(self.step_in_epoch.numpy())))
            replayed = self._comparable(history)
        early = replayed_early_stopping(self.run, tc, replayed, self._previous,
                                        save_best=self._save_best,
                                        restore_best=self._restore_best)
        samples = SampleFigures(self.validator, self.images_dir, background=True,
                                 log=self.log)
        cbs = [early]
        in_epoch = int(self.step_in_epoch.numpy())
        self._settings_from = f"epoch {done + 1}" if not in_epoch else \
            f"step {steps_before} (epoch {done + 1})"
        if self.chief:
            forget_undone(self.run, done, steps_before, self.log)
            log_lost_epochs(self.run, done, self.log)
            hparams = _hparams(with_trained_settings(self.run, self.cfg), len(self.data.vocab))
            cbs += [TensorBoardLogger(self.run.logs, hparams, samples,
                                      hparams_since="before " + self._settings_from),
                    AttentionSnapshots(self.run.attention, samples)]
        callbacks = keras.callbacks.CallbackList(cbs, model=self.model)
        _describe(self, resumed, done)
        self.model.stop_training = False
        callbacks.on_train_begin()
        kept = _settle_resumed(self.run, tc, early, done, steps_before, history, bar)
        if kept and self.chief:
            self.log("note: " + kept)
        if todo and in_epoch and history and early.best_epoch is None:
            with self._stopped_at_damaged_features():
                self._best_model_is_the_bar(early, done)
        if bar is not None:
            if self.chief and saves_restored_as_best(self.run, tc, early, done, history,
                                                     measured, at_end=not in_epoch):
                self.log(f"note: measured again, the resumed epoch {done} has the best "
                         f"{tc.monitor_for(done)} ({metric_text(early.best)}): it becomes "
                         f"{self.run.best_model}")
        self._repair_best(early, done, history, measured, at_end=not in_epoch)
        if todo and self.chief and tc.sample_images:  # trace the greedy decoder now, not in epoch 1
            with self._stopped_at_damaged_features():
                self.validator.greedy(self.validator.sample_keys[:1])
        # What lives now lives through training: frozen, full collections in the epochs skip
        # it. The garbage is what building and tracing the steps just left, in the young
        # generations: a full collection scanned every object of the process (0.6 s per
        # `fit` in a test process), and unfreezing at the end lets any older garbage go.
        gc.collect(1)
        gc.freeze()
        writers = cbs[1:]
        if measured:
            self._record_measured(history, done, measured, writers)
        if stage_best:
            self._record_best_measured(history, *stage_best, writers)
        if resumed:
            with self._stopped_at_damaged_features():
                self._redraw_lost_samples(done, samples, writers)
            if writers and tc.sample_images:   # the chief's
                log_unredrawable_heatmaps(self.run, done - 1 if not in_epoch else done,
                                          heatmap_names(self.validator.sample_keys), self.log)
        reason, start, epoch = "epochs", time.perf_counter(), done
        try:
            while epoch < tc.epochs and not self.model.stop_training:
                if tc.max_steps and int(self.step.numpy()) >= tc.max_steps and not (
                        ended and epoch == done):   # only its end left: done now
                    reason = "max_steps"
                    break
                if epoch == tc.scst_after and epoch > done:  # the stage changes in this call
                    with self._stopped_at_damaged_features(checkpoint="saved"):
                        stage_best = self._best_before_stage(history, epoch)
                    if stage_best:
                        early.best_on_disk(stage_best[0] - 1, stage_best[1])
                        self._record_best_measured(history, *stage_best, writers)
                if not self._epoch(epoch, callbacks, history):
                    reason = "max_steps"
                    break
                epoch += 1
        except BaseException:  # Ctrl-C, a NaN loss, a full disk: keep the finished epochs'
            for writer in writers:  # heatmaps still being drawn (else lost for good)
                try:
                    writer.write_pending()
                except BaseException:  # noqa: BLE001 - a failure, or a second Ctrl-C, ends
                    break              # the writing: the error that stopped training is news
            raise
        finally:
            gc.unfreeze()
        if self.model.stop_training and epoch < tc.epochs:   # at the last epoch's end it
            reason = "early_stopping"                        # stopped nothing: "epochs"
        callbacks.on_train_end()
        return _summary(self, history, early, reason, time.perf_counter() - start,
                        done, steps_before)

    @contextlib.contextmanager
    def _stopped_at_damaged_features(self, checkpoint: str = "none"):
        """A damaged or unreadable feature file met before the steps (the feature statistics,
        the decoder's trace), by validation or by the sample heatmaps ends training with
        `DamagedFeatures.stop`'s message, not TensorFlow's traceback. `checkpoint`: "save"
        the steps trained (a rerun continues after them), or they are "saved"."""
        try:
            yield
        except pipeline.DamagedFeatures as e:
            if checkpoint == "save":
                self._save()
            step = None if checkpoint == "none" else int(self.step.numpy())
            raise e.stop(self.inputs.repair_command(), step) from None

    def _epoch_length(self, epoch: int) -> int:
        """The steps of 0-based `epoch` (its stage's)."""
        return self.inputs.scst_steps_per_epoch if self.cfg.train.is_scst(epoch) \
            else self.inputs.steps_per_epoch

    def _redraw_lost_samples(self, done: int, samples: SampleFigures, writers) -> None:
        """A run killed after an epoch's checkpoint but before its heatmaps were written
        (they are drawn in the background and written at the next epoch's end) lost them, in
        attention/ and in TensorBoard. Resumed at that epoch's end, the restored model is the
        one that epoch finished with: decode and draw its samples again. (Resumed inside an
        epoch, the model is no longer that epoch's: nothing is drawn.) So is a folder that
        lacks any sample's heatmap: a stop (a full disk) while they were written, or a rerun
        with a higher --sample-images."""
        if not (writers and done and self.cfg.train.sample_images
                and self.validator.sample_keys and not int(self.step_in_epoch.numpy())):
            return
        names = heatmap_names(self.validator.sample_keys)
        missing = missing_heatmaps(self.run, done, names)
        if not missing:
            return
        # the folder cannot tell a heatmap lost from one never drawn (a rerun with a higher
        # --sample-images): say both, as log_unredrawable_heatmaps does
        self.log(f"note: the attention heatmaps of epoch {done} lack {len(missing)} of the "
                 f"{len(names)} sample images' (lost when the run was stopped, or drawn with "
                 f"fewer --sample-images): drawing them from its checkpoint")
        with self.averaged():
            figures = samples(done - 1)
        for writer in writers:
            writer.add_samples(done - 1, figures)

    def _epoch(self, epoch: int, callbacks, history: list) -> bool:
        """Train, validate and record one epoch; False when --max-steps stopped it before its
        end. Then only a checkpoint is saved (a rerun continues the epoch from it): the
        epoch's end (validation, history entry, best model, epoch-end callbacks) waits for the
        epoch's last step, else a partial epoch would be recorded as the whole one."""
        stage = "self-critical" if self.cfg.train.is_scst(epoch) else "cross-entropy"
        if self.progress:
            self.log(f"Epoch {epoch + 1}/{self.cfg.train.epochs} ({stage})")
        callbacks.on_epoch_begin(epoch)
        t0 = time.perf_counter()
        logs = self._run_train_epoch(epoch, callbacks)
        try:   # Ctrl-C or SIGTERM from here on: keep the steps (not multi-worker: a save
            target = logs.pop("target_steps")            # there is collective)
            if logs["steps"] < target:
                self._save()
                if self.progress:
                    self.log(f"epoch {epoch + 1}: stopped by --max-steps "
                             f"{self.cfg.train.max_steps} at step {logs['steps']} of {target} "
                             f"(checkpoint saved; the epoch is validated and recorded once "
                             f"{self.same_command} finishes it)")
                return False
            with self._stopped_at_damaged_features(checkpoint="save"):  # the steps are done
                logs.update(self._validate(epoch))
            logs.update(stage=stage, monitor=self.cfg.train.monitor_for(epoch),
                        min_delta=self.cfg.train.min_delta, seconds=time.perf_counter() - t0)
            # the images and the table its values were measured on (the table's digest:
            # seconds at COCO's size), then config.json: a stop there lost the epoch's steps
            logs = self._stamped(logs)
            self._record_settings()
        except KeyboardInterrupt:
            if distribute.single_process(self.strategy):
                self._save()
                self.log(f"epoch {epoch + 1}: stopped in its validation (checkpoint saved: "
                         f"{self.same_command} validates and records the epoch)")
            raise
        # Ctrl-C or SIGTERM waits for all of the epoch's records: one after its checkpoint
        # lost its TensorBoard scalars (and best model, heatmaps) for good, since a rerun
        # resumes after the epoch (multi-worker: as in the steps, it stops at once); one
        # after the counters moved on lost the epoch's steps
        with self._signals_held():
            self.epoch.assign(epoch + 1)
            self.step_in_epoch.assign(0)
            entry = {"epoch": epoch + 1, **{k: _plain(v) for k, v in logs.items()}}
            history[:] = [h for h in history if h["epoch"] != epoch + 1] + [entry]
            if self.chief:  # history first: a kill before the checkpoint redoes the epoch
                write_json_atomic(self.run.history, history)
            self._save()
            with self._stopped_at_damaged_features(checkpoint="saved"), self.averaged():
                callbacks.on_epoch_end(epoch, entry)   # the best model, sample heatmaps
        if self.progress:
            self.log(_epoch_line(entry))
        return True

    def _metrics_before_resume(self, history: list, done: int) -> dict:
        """A run resumed from an epoch that did not log the metric its next epoch monitors (a
        cross-entropy run entering its self-critical stage, whose val_cider was not measured;
        a run resumed with another --monitor) measures it now on the restored model, that
        epoch's, so the epochs to come have the model they start from to beat. (Resumed
        inside an epoch, the restored model is not that epoch's: nothing is measured.)
        Returns what was measured, added to `history`, which `fit` writes together with
        TensorBoard's record of it (`_record_measured`)."""
        if not history or int(self.step_in_epoch.numpy()):
            return {}
        missing = _unmeasured(self.cfg.train, history, done)
        if not missing:
            return {}
        with self.averaged():
            measured = self.validator.metrics(missing)
        history[-1].update(self._stamped(measured))
        return measured

    # -- values measured otherwise than the next epochs' -------------------------------
    def _images_digests(self) -> dict:
        """{metric: digest of the validation images it is measured on now}: val_loss on every
        val image with usable features, val_bleu4 and val_cider on the first --bleu-images of
        them. history.json records it beside each value (`_stamped`)."""
        if self._digests is None:
            metric = _keys_digest(self.validator.metric_keys)
            self._digests = {"val_loss": _keys_digest(self.data.caption_ids["val"]),
                             "val_bleu4": metric, "val_cider": metric}
        return self._digests

    def _stamped(self, values: dict) -> dict:
        """`values` (of an epoch's entry) with what its validation values were measured on:
        `<metric>`_images_sha256 for each monitor, and the document frequencies of
        val_cider."""
        digests = self._images_digests()
        stamps = {f"{m}_images_sha256": digests[m] for m in MONITORS
                  if values.get(m) is not None}
        if values.get("val_cider") is not None:
            stamps["cider_df_sha256"] = self.inputs.df_digest()
        return {**values, **stamps}

    def _record_found_digests(self) -> None:
        """history.json's entries written before the digests were (`_stamped`) get the ones
        they count with (`_val_found`, `_df_found`), before split.json and cider_df.json are
        written again: read from them at the next start, those would be this start's, and
        the entries that were measured on the images before and not measured again (or all
        of them, after a stop before `_measured_again` wrote) would be taken for comparable.
        Only where they differ from today's: else the next start finds the same."""
        history = self.run.read_history()
        now = self._images_digests()
        found = {f"{m}_images_sha256": d for m, d in (self._val_found or {}).items()
                 if d != now[m]}
        # (the references' digest only when an entry needs it: seconds at COCO's size)
        if self._df_found is not None and any(h.get("val_cider") is not None and
                                              "cider_df_sha256" not in h for h in history) \
                and self._df_found != self.inputs.df_digest():
            found["cider_df_sha256"] = self._df_found
        missing = [(h, field) for h in history for field, metric in (
            *((f"{m}_images_sha256", m) for m in MONITORS), ("cider_df_sha256", "val_cider"))
            if h.get(metric) is not None and field not in h and field in found]
        if missing:
            for h, field in missing:
                h[field] = found[field]
            write_json_atomic(self.run.history, history)

    def _on_other_table(self, entry: dict) -> bool:
        """Whether `entry`'s val_cider was measured with other CIDEr-D document frequencies
        than this call's: those of other train references (the digest recorded beside it,
        else, for an entry written before it was, the one of cider_df.json as found)."""
        if entry.get("val_cider") is None:
            return False
        table = entry.get("cider_df_sha256", self._df_found)
        return table is not None and table != self.inputs.df_digest()

    def _on_other_images(self, entry: dict, metric: str) -> bool:
        """Whether `entry`'s `metric` was measured on other validation images than the next
        epochs' will be (val images gained or lost usable features since; an entry written
        before the digest was recorded: on those the run had when it last started)."""
        images = entry.get(f"{metric}_images_sha256", (self._val_found or {}).get(metric))
        return entry.get(metric) is not None and images is not None and \
            images != self._images_digests()[metric]

    def _stale(self, entry: dict, metric: str) -> bool:
        """Whether `entry`'s `metric` is not comparable with the next epochs' values."""
        return self._on_other_images(entry, metric) or \
            (metric == "val_cider" and self._on_other_table(entry))

    def _comparable(self, history: list) -> list:
        """`history` for early stopping's replay: values measured otherwise than the next
        epochs' will be (`_stale`: val_cider of another table of document frequencies, on
        another scale; any value on other validation images) left out: neither the bar nor
        an epoch without improvement (`EarlyStopping` skips an entry without its monitor)."""
        return [{k: v for k, v in h.items() if not (k in MONITORS and self._stale(h, k))}
                for h in history]

    def _measured_again(self, history: list, done: int) -> Optional[tuple[int, float]]:
        """A resume whose earlier values were measured otherwise than the next epochs' will
        be: val_cider when the train references changed (train images gained or lost
        features: cider_df.json is counted again, and the old values are on another scale),
        any value when the val images did (the same). Early stopping would compare the next
        epochs with them (the best model never replaced, or replaced by a worse one). Say
        so, and measure the metric early stopping monitors again for the models there are:
        the restored one (at the end of epoch `done`) and best.keras; `history` (and
        history.json, best.json) get the new values. Returns (0-based epoch, value) of
        best.keras measured again, the bar that `EarlyStopping.start_from` keeps when the
        replay (`_comparable`) found none as good, or None."""
        tc = self.cfg.train
        monitor = tc.monitor_for(done)
        table = [h["epoch"] for h in history if self._on_other_table(h)]
        images = [h["epoch"] for h in history if self._on_other_images(h, monitor)]
        if not table and not images:
            return None
        stale = [h["epoch"] for h in history if self._stale(h, monitor)]
        at_end = not int(self.step_in_epoch.numpy()) and history[-1]["epoch"] == done
        record = self.run.best_record() or {}
        best = record.get("epoch")
        again = {}   # 1-based epoch -> the entry's new values
        if stale:
            if at_end and done in stale:
                with self.averaged():
                    again[done] = self._measure(monitor)
            entry = next((h for h in history if h["epoch"] == best), None)
            # (a best epoch without val_cider, of the cross-entropy stage, measured for the
            # self-critical one; not one of another --monitor, whose best.json says which)
            if entry is not None and tc.monitor_for(done - 1) == monitor and \
                    not (at_end and best == done) and (best in stale or (
                        monitor == "val_cider" and entry.get(monitor) is None)):
                again[best] = self._best_model_measure(monitor)
        again = {e: v for e, v in again.items() if v is not None}
        was = {}
        for h in history:
            if h["epoch"] in again:
                was[h["epoch"]] = h.get(monitor)
                h.update(again[h["epoch"]])
        if self.chief and again:
            # best.json first: a kill before history.json leaves its values stale, measured
            # again at the next resume; the other way round best.json kept its old value
            # for good beside the new entry (a bar no epoch could beat, or none at all)
            with self._signals_held():
                if record.get("monitor") == monitor and best in again:
                    write_json_atomic(self.run.best_info,
                                      {**record, "value": again[best][monitor]})
                write_json_atomic(self.run.history, history)
        values = {e: v[monitor] for e, v in again.items()}
        if table:
            cider = values if monitor == "val_cider" else {}
            self.log("note: " + _measured_again_note(
                f"{self.run.cider_df}: the train split's references changed since "
                f"{_epochs_text(table)} measured val_cider (train images gained or lost "
                f"features), so the CIDEr-D document frequencies were counted again and those "
                f"val_cider values are on another scale", "val_cider", "with the new ones",
                table, was, {e: v for e, v in cider.items() if e in table}, best))
        if images:
            self.log("note: " + _measured_again_note(
                f"{_epochs_text(images)} measured {monitor} on other validation images than "
                f"the epochs to come (val images gained or lost usable features since), so "
                f"those values are not comparable with theirs", monitor, "on the current ones",
                images, was, {e: v for e, v in values.items() if e in images}, best))
        return (best - 1, values[best]) if best in values else None

    def _measure(self, metric: str) -> Optional[dict]:
        """`metric` of the model as it is now, with what it was measured on (the fields of
        an epoch's entry: val_loss comes with val_ce); None when nothing measures it."""
        if metric == "val_loss":
            val = self.evaluate_loss("val")
            values = None if val is None else {"val_loss": val["loss"], "val_ce": val["ce"]}
        else:
            value = self.validator.metrics([metric]).get(metric)
            values = None if value is None else {metric: value}
        return values and self._stamped({k: _plain(v) for k, v in values.items()})

    def _best_model_measure(self, metric: str,
                            instead: str = "the next epochs are compared with the resumed "
                                           "one's") -> Optional[dict]:
        """`_measure` of best.keras's model (its weights put in the model for the measure,
        then the restored ones back); None, with a note saying what happens `instead`, when
        they cannot be loaded."""
        weights = self.model.get_weights()
        try:
            try:   # (only the loading: measuring val_loss is a collective of every worker)
                if not self.run.restore_best_weights(self.model):
                    if not os.path.exists(self.run.best_model):
                        return None
                    self.model.set_weights(self.run.load_best_model().get_weights())
            except (UserError, OSError, ValueError) as e:
                self.log(f"note: cannot measure the {metric} of {self.run.best_model} again "
                         f"({e}); {instead}")
                return None
            return self._measure(metric)
        finally:
            self.model.set_weights(weights)

    def _best_model_is_the_bar(self, early: EarlyStopping, done: int) -> None:
        """A resume inside epoch `done` + 1 whose replay left early stopping nothing to beat
        (another --monitor than the epochs before logged: the restored model is not epoch
        `done`'s, so nothing was measured on it): best.keras's value measured now is the bar,
        else the first epoch finished replaced best.keras, however worse."""
        record = self.run.best_record()
        monitor = self.cfg.train.monitor_for(done)
        values = self._best_model_measure(
            monitor, "the first epoch finished replaces it") if record else None
        if not values or values.get(monitor) is None:
            return
        early.start_from(record["epoch"] - 1, float(values[monitor]))
        if self.chief:
            self.log(f"note: resumed inside epoch {done + 1}, whose model was never measured, "
                     f"and the epochs before did not log {monitor}: {self.run.best_model} "
                     f"(epoch {record['epoch']}) measured now, {monitor}="
                     f"{metric_text(values[monitor])}, is the value the next epochs must beat "
                     f"to replace it")

    def _record_measured(self, history: list, done: int, measured: dict, writers) -> None:
        """history.json with the metrics `_metrics_before_resume` measured, and TensorBoard,
        together: written when measured, history.json had them for good and TensorBoard not
        yet (its writers open later); a stop between lost them there, as the rerun measures
        nothing history.json has. A stop before this measures them again."""
        with self._signals_held():
            if self.chief:
                write_json_atomic(self.run.history, history)
            if writers:
                writers[0].log_validation(done - 1, measured)

    def _best_before_stage(self, history: list, done: int,
                           resume: Optional[tuple] = None) -> Optional[tuple[int, dict]]:
        """Before the self-critical stage (the next epoch, 0-based `done`, and those after):
        best.keras's val_cider when its epoch, a cross-entropy one, did not measure it
        (`_unmeasured_best`). The stage starts from the best of it, the best epoch so far
        and the last cross-entropy epoch's (`EarlyStopping._follow_stage`, or
        `_start_from_previous` after epochs of another --monitor): from that one alone, a
        self-critical epoch worse than best.keras on val_cider replaced it. Added to the
        epoch's entry in `history` (as an epoch's value: the early stopping of a resume is
        told it, `_with_best_on_disk`) and said; returns (1-based epoch, values) or None.

        At a resume (`resume`: what `fit` measured, the bar measured again, the steps taken,
        whether the checkpoint ends epoch `done`), not when the resume saves the restored
        epoch in its place (`_repair_best`: its save was lost), as `fit`'s early stopping
        will find."""
        comparable = self._comparable(history)   # a value on other images, or another table:
        epoch = _unmeasured_best(self.run, self.cfg.train, comparable, done)   # measured again
        if epoch is None:
            return None
        if resume is not None:
            measured, bar, steps, at_end = resume
            early = replayed_early_stopping(self.run, self.cfg.train, comparable,
                                            self._previous)
            early.replay()
            _settle_resumed(self.run, self.cfg.train, early, done, steps, history, bar)
            if saves_restored_as_best(self.run, self.cfg.train, early, done, history,
                                      measured, at_end=at_end, recorded=epoch):
                return None
        values = self._best_model_measure("val_cider")
        if values is None:
            return None
        entry = next(h for h in history if h["epoch"] == epoch)
        entry.update(values)
        if self.chief:
            self.log("note: " + _stage_start_note(self.run, self.cfg.train, comparable, entry))
        return epoch, values

    def _record_best_measured(self, history: list, epoch: int, values: dict,
                              writers) -> None:
        """history.json with best.keras's val_cider (`_best_before_stage`) in its epoch's
        entry, and TensorBoard (at that epoch, before the later ones'), together."""
        with self._signals_held():
            if self.chief:
                write_json_atomic(self.run.history, history)
            if writers:
                writers[0].log_earlier_validation(epoch - 1, values)


def _settle_resumed(run: RunFolder, tc: TrainConfig, early: EarlyStopping, done: int,
                    steps: int, history: list, bar: Optional[tuple]) -> Optional[str]:
    """`early`, replayed at a resume from epoch `done` (`steps` taken), given what history.json
    does not say: best.keras measured again (`bar`, `Trainer._measured_again`: the bar as
    measured now, nothing to keep), else best.keras kept when better
    (`keep_better_best_model`, whose note it returns)."""
    if bar is not None:
        early.start_from(*bar)
        return None
    return keep_better_best_model(run, tc, early, done, steps, history)


def _stage_start_note(run: RunFolder, tc: TrainConfig, history: list, best: dict) -> str:
    """What the self-critical stage starts from: best.keras (its epoch's entry `best`, with
    its val_cider measured) or the last cross-entropy epoch, whichever has the better
    val_cider (a tie: best.keras)."""
    last = tc.scst_after
    start = next((h.get("val_cider") for h in history if h["epoch"] == last), None)
    value = best["val_cider"]
    monitor = (run.best_record() or {}).get("monitor") or tc.monitor_for(best["epoch"] - 1)
    kept = f"{run.best_model} (epoch {best['epoch']}, the best by {monitor})"
    if start is None or value >= start:
        than = "" if start is None else \
            f", {'as good as' if value == start else 'better than'} epoch {last}'s " \
            f"{metric_text(start)} (the model it trains from)"
        return (f"the self-critical stage starts from {kept} at val_cider="
                f"{metric_text(value)}{than}: a self-critical epoch replaces it only when it "
                f"beats {metric_text(value)}")
    return (f"the self-critical stage starts from epoch {last}'s val_cider="
            f"{metric_text(start)} (the model it trains from), better than {kept} at "
            f"{metric_text(value)}: a self-critical epoch replaces {run.best_model} when it "
            f"beats {metric_text(start)}")


def _epochs_text(epochs: list) -> str:
    return f"epoch{'s' * (len(epochs) > 1)} {', '.join(str(e) for e in epochs)}"


def _measured_again_note(why: str, metric: str, how: str, stale: list, was: dict,
                         again: dict, best: Optional[int]) -> str:
    """`Trainer._measured_again`'s note: `why` the values of epochs `stale` are not
    comparable, `was` / `again` {epoch: value} of `metric` before and after measuring again
    (`how`), `best` best.json's epoch."""
    if not again:
        return (f"{why}; early stopping and the best model leave them out (nor count them "
                f"against --patience): the next {metric} measured is the first compared")
    remeasured = "; ".join(
        f"epoch {e}{' (best.keras)' if e == best else ''} "
        f"{'-' if was.get(e) is None else metric_text(was[e])} -> {metric_text(v)}"
        for e, v in sorted(again.items()))
    kept = [e for e in stale if e not in again]
    text = (f"{why}; measured again {how}: {remeasured}. Early stopping and the best model "
            f"compare the next epochs with these")
    if kept:
        text += (f", not with {_epochs_text(kept)} (nor count "
                 f"{'them' if len(kept) > 1 else 'it'} against --patience)")
    return text


def _val_images_at_last_start(run: RunFolder, data: TrainData,
                              previous: Optional[TrainConfig]) -> Optional[dict]:
    """{metric: digest of the val images it was measured on} at the run's last start (its
    val images with usable features then, the first --bleu-images of them for val_bleu4 and
    val_cider), as `Trainer._images_digests` gives them now; None for a new run, or one too
    old to have recorded its images' digests."""
    had = _had_at_last_start(run, data, "val")
    if previous is None or had is None:
        return None
    found = sorted(had)
    metric = _keys_digest(found[:previous.bleu_images])
    return {"val_loss": _keys_digest(found), "val_bleu4": metric, "val_cider": metric}


def _keys_digest(keys) -> str:
    """sha256 of image keys, sorted (what history.json records a value was measured on)."""
    return hashlib.sha256(json.dumps(sorted(keys), ensure_ascii=False).encode()).hexdigest()


def _hparams(cfg: RunConfig, vocab_size: int) -> dict:
    """The hyperparameters TensorBoard's HParams dashboard shows of a run with `cfg`."""
    tc, mc = cfg.train, cfg.model
    return {"embedding_dim": mc.embedding_dim, "units": mc.units, "dropout": mc.dropout,
            "attention_reg": mc.attention_reg, "vocab_size": vocab_size,
            "batch_size": tc.batch_size, "learning_rate": tc.learning_rate,
            "lr_schedule": tc.lr_schedule, "clip_norm": tc.clip_norm, "ema": tc.ema,
            "precision": tc.precision, "seed": cfg.data.seed,
            "scst_after": -1 if tc.scst_after is None else tc.scst_after,
            "scst_samples": tc.scst_samples, "scst_baseline": tc.scst_baseline,
            "scst_learning_rate": tc.scst_learning_rate,
            # the length of the cosine curve, and what stops the run and picks its best model
            "epochs": tc.epochs, "monitor": tc.monitor or "auto (by stage)",
            "patience": tc.patience, "min_delta": tc.min_delta}


def _describe(trainer: Trainer, resumed: bool, done: int) -> None:
    d, tc, i = trainer.data, trainer.cfg.train, trainer.inputs
    stages = "" if tc.scst_after is None else (
        f", self-critical after epoch {tc.scst_after} ({i.scst_steps_per_epoch} steps of "
        f"{min(i.images_per_step, len(i.train_images))} images x {tc.scst_samples} "
        f"samples)")
    trainer.log(f"{'resuming after epoch ' + str(done) if resumed else 'training'}: "
                f"{len(i.items['train'][0])} train captions ({len(i.train_images)} "
                f"images), {len(i.items['val'][0])} val captions, vocabulary "
                f"{len(d.vocab)}, {i.steps_per_epoch} steps/epoch{stages}, "
                f"{trainer.strategy.num_replicas_in_sync} replica(s), features "
                f"{'in memory' if i.table is not None else 'streamed from disk'}")
    if tc.ema:
        trainer.log(f"validating, saving the best model and drawing the heatmaps with the "
                    f"weights' moving average (--ema {tc.ema:g})")
    # where the features' source images were checked, and why there (or why nowhere)
    trainer.log(d.images_line() or "note: " + (d.images_note or "no source image was "
                                               "checked: no images folder is recorded"))
    if d.unfound_note:
        trainer.log("note: " + d.unfound_note)
    n = trainer.cfg.vocab.max_length
    if d.truncated:
        trainer.log(f"note: {d.truncated} of {len(i.items['train'][0])} train captions are "
                    f"longer than --max-length {n} words: trained on their first {n} words, "
                    f"then <end> (see `caption-attn inspect` for the caption lengths)")
    words = [ids[1:-1] for lists in d.caption_ids["train"].values() for ids in lists]
    unknown = sum(i == UNK for ids in words for i in ids) / max(1, sum(map(len, words)))
    if unknown >= 0.1:
        v = trainer.cfg.vocab
        trainer.log(f"note: {unknown:.0%} of the train captions' words are <unk>, outside the "
                    f"vocabulary of {len(d.vocab) - len(SPECIAL_TOKENS)} words (--vocab-size "
                    f"{v.vocab_size}, --min-count {v.min_count}): the model learns to say "
                    f"<unk> where they are")
    if d.truncated_val:
        trainer.log(f"note: {d.truncated_val} of {len(i.items['val'][0])} val captions are "
                    f"longer than --max-length {n} words: val_loss is measured on their "
                    f"first {n} words, then <end> (val_bleu4 and val_cider take whole "
                    f"references)")
    if d.skipped_captions:
        trainer.log(f"skipped {d.skipped_captions} captions of {d.skipped_images} images "
                    f"without usable features: {d.problems}")
    if d.split_note:
        trainer.log("note: " + d.split_note)
    if d.refused_note:
        trainer.log("note: " + d.refused_note)
    if d.empty_note:
        trainer.log("note: " + d.empty_note)
    if d.repeated_note:
        trainer.log("note: " + d.repeated_note)


def _summary(trainer: Trainer, history, early, reason, seconds, epochs_before: int,
             steps_before: int) -> dict:
    """The run's totals ("epochs": history entries, "steps"), where it stands in the epoch
    it has not finished ("epoch_steps" of "epoch_length"; 0 of it between epochs) and what
    this invocation did ("epochs_now": epochs finished now, "steps_now"); "monitor": what
    early stopping watches now, "best_*": the best model on disk (best.json)."""
    steps, finished = int(trainer.step.numpy()), int(trainer.epoch.numpy())
    inputs, tc = trainer.inputs, trainer.cfg.train
    d = trainer.data
    return _summary_of(trainer.run_dir, tc, history, early, reason, seconds, finished,
                       steps, int(trainer.step_in_epoch.numpy()),
                       inputs.scst_steps_per_epoch if tc.is_scst(finished)
                       else inputs.steps_per_epoch,
                       epochs_before, steps_before, d.skipped_captions,
                       best=trainer.run.best_record() if trainer.chief else None,
                       skipped_images=d.skipped_images,
                       images=len(d.feature_paths) + d.skipped_images)


def _summary_of(run_dir: str, tc: TrainConfig, history: list, early: EarlyStopping,
                reason: str, seconds: float, finished: int, steps: int, epoch_steps: int,
                epoch_length: Optional[int], epochs_before: int, steps_before: int,
                skipped_captions: int, best: Optional[dict], skipped_images: int = 0,
                images: Optional[int] = None) -> dict:
    """`_summary`'s dict (`best`: best.json's record, None for none or a worker's); also of
    `rerun_without_data`, whose `epoch_length` and `images` are None (the data was not
    loaded; taken only when no image is left out). "skipped_images" of "images" were left
    out for want of usable features."""
    last = history[-1] if history else {}
    # the best model on disk: after a stage change, early stopping's best epoch is the one
    # the new stage has to beat, while best.keras stays the earlier stage's best until it does
    if not (isinstance(best, dict) and isinstance(best.get("epoch"), int)
            and isinstance(best.get("value"), (int, float)) and best.get("monitor")):
        best = None  # none yet, or edited by hand: early stopping's own record
    if best is None and early.best_epoch is not None:
        best = {"monitor": early.monitor, "epoch": early.best_epoch + 1,
                "value": float(early.best)}
    return {"run": run_dir, "epochs": len(history), "steps": steps,
            "finished_epochs": finished, "target_epochs": tc.epochs,
            "epoch_steps": epoch_steps, "epoch_length": epoch_length,
            "max_steps": tc.max_steps, "scst_after": tc.scst_after,
            "monitor_flag": tc.monitor,
            "epochs_now": finished - epochs_before, "steps_now": steps - steps_before,
            "stopped_by": reason, "monitor": early.monitor,
            "best_monitor": (best or {}).get("monitor"), "best_epoch": (best or {}).get("epoch"),
            "best_value": (best or {}).get("value"),
            "final_loss": last.get("loss"), "final_val_loss": last.get("val_loss"),
            "seconds": seconds, "skipped_captions": skipped_captions,
            "skipped_images": skipped_images, "images": images,
            "best_model": RunFolder(run_dir).best_model}


def _plain(value):
    return float(value) if isinstance(value, (np.floating, float)) else value


def _epoch_line(entry: dict) -> str:
    parts = [f"{k}={metric_text(entry[k])}" for k in ("loss", "reward", "val_loss", "val_bleu4",
                                             "val_cider") if entry.get(k) is not None]
    speed = entry.get("captions_per_second")
    return (f"epoch {entry['epoch']}: " + " ".join(parts)
            + (f" ({speed:.0f} captions/s, " if speed is not None else
               " (its steps trained before the run stopped, ") + f"{entry['seconds']:.1f} s)")


def decoded_metrics(tc: TrainConfig, epoch: int) -> set:
    """The metrics of 0-based `epoch`'s validation that decode --bleu-images validation
    images: early stopping's when it is val_bleu4 or val_cider, and val_cider in
    self-critical epochs and the one before them (a self-critical stage must beat the
    val_cider of the model it starts from, and of best.keras when it is an earlier
    epoch's: `Trainer._best_before_stage`)."""
    names = {tc.monitor_for(epoch)} & {"val_bleu4", "val_cider"}
    if tc.is_scst(epoch) or tc.is_scst(epoch + 1):
        names.add("val_cider")
    return names


def unused_flag_notes(tc: TrainConfig) -> list[str]:
    """Notes on flags typed on the command line that this call uses for nothing (said, not
    refused: scripts pass the same flags to every run). --bleu-images sets how many
    validation images val_bleu4 and val_cider are measured on, and no epoch of this call may
    measure either (`decoded_metrics`); a typed 0 asks for none. A config copied with
    `dataclasses.replace` has no typed flags (`Config.typed`)."""
    if tc.bleu_images > 0 and tc.typed(("bleu_images",)) \
            and not any(decoded_metrics(tc, epoch) for epoch in range(tc.epochs)):
        return [f"--bleu-images {tc.bleu_images} decodes no image in this call: it sets how "
                f"many validation images val_bleu4 and val_cider are measured on, and neither "
                f"is measured here (only under --monitor val_bleu4 or val_cider, or in "
                f"self-critical epochs and the one before them, --scst-after); early stopping "
                f"follows val_loss"]
    return []


def check_cider_vocabulary(tc: TrainConfig, vocab_tokens: int) -> None:
    """UserError when the run measures CIDEr-D (self-critical epochs, --monitor val_cider)
    with a vocabulary of more tokens than its n-gram codes hold (`ngrams.MAX_VOCAB_SIZE`):
    said before the first write, not as a traceback after the cross-entropy epochs."""
    limit = ngrams.MAX_VOCAB_SIZE
    if vocab_tokens <= limit or (tc.scst_after is None and tc.monitor != "val_cider"):
        return
    words = len(SPECIAL_TOKENS)
    raise UserError(
        f"the vocabulary has {vocab_tokens} tokens ({vocab_tokens - words} words and {words} "
        f"special tokens), but self-critical training and val_cider score captions by "
        f"CIDEr-D, which codes each 4-gram of word ids as one 64-bit integer and so takes at "
        f"most {limit} tokens: train with --vocab-size {limit - words} or less, or a higher "
        f"--min-count (a new run, or --fresh: a run keeps its vocabulary), or leave out "
        f"--scst-after and --monitor val_cider")


# float32 copies of each weight while training: the weight, Adam's two slots, its gradient
TRAINING_COPIES = 4


def check_model_size(cfg: RunConfig, memory_bytes: Optional[int] = None,
                     vocab_tokens: Optional[int] = None) -> None:
    """UserError when the model's weights alone, in the float32 copies training holds
    (`TRAINING_COPIES`), exceed the memory this process may use (`memory_bytes`, by default
    `machine_memory`: the machine's, or its cgroup's limit; no check where the OS does not
    say). `vocab_tokens`: the vocabulary's size (by
    default --vocab-size + the special tokens, an upper bound: a huge --vocab-size meant as
    "every word" is not a huge model). A typo like --units 51200 for 512 made the
    process build 10 billion weights and end in an OOM traceback (or the OOM killer) after
    the data was loaded. Activations come on top, so a model that passes can still be too
    large."""
    memory_bytes = machine_memory() if memory_bytes is None else memory_bytes
    if memory_bytes is None:
        return
    mc, words = cfg.model, vocab_tokens or cfg.vocab.vocab_size + len(SPECIAL_TOKENS)
    weights = parameter_count(words, mc.embedding_dim, mc.units)
    needed = weights * 4 * TRAINING_COPIES
    if needed > memory_bytes:
        def gb(n):
            return f"{n / 1e9:.3g} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"
        count = (f"{weights / 1e9:.3g} billion" if weights >= 1e9 else
                 f"{weights / 1e6:.3g} million")
        size = "" if vocab_tokens else "up to "
        raise UserError(
            f"--units {mc.units} --embedding-dim {mc.embedding_dim} (a vocabulary of {size}"
            f"{words} tokens): the model has {count} weights, {gb(needed)} in the "
            f"{TRAINING_COPIES} float32 copies training holds (weights, Adam's two slots, "
            f"gradients), more than the {gb(memory_bytes)} of memory this process may use; lower "
            f"--units / --embedding-dim (the TF tutorial's: 512 / 256) or --vocab-size")


# How the messages of a run trained with --fresh name the command that continues it: the same
# command, --fresh and all, deleted what the run had saved and started over.
WITHOUT_FRESH = " without --fresh"
FRESH_RERUN = ("rerun the command without --fresh to continue this run: with --fresh it "
               "deletes what the run saved and starts over")


def train(cfg: RunConfig, run_dir: str, images_dir: Optional[str] = None,
          progress: bool = True, log=print) -> dict:
    """Train (or resume) the run in `run_dir`; returns a summary dict.

    Every check comes before the first write: the flags (the config validated itself, and
    `images_dir` must be a folder), the run folder (writable; the same data, vocabulary and
    model settings as before unless --fresh), the caption file (on resume, the same caption
    data) and the feature cache; with --fresh, the previous run's files are deleted then.
    config.json, split.json and vocab.json are written once the Trainer has restored the
    run's checkpoint and loaded its features (a resume that fails there changes none);
    config.json's training settings stay the run's until this call trains with its own.
    """
    cfg = dataclasses.replace(cfg, captions=os.path.abspath(cfg.captions),
                              cache=os.path.abspath(cfg.cache))
    check_utf8_path("--run", run_dir, "writes the run's checkpoints and logs")
    check_utf8_path("--cache", cfg.cache, "reads the feature files")
    check_train_flags(cfg.train)
    distribute.check_strategy(cfg.train.strategy)  # TF_CONFIG too, before --fresh deletes
    refuse_aborting_precision(cfg.train.precision, f"--precision {cfg.train.precision}",
                              "train with --precision float32")
    run = RunFolder(run_dir)
    run.check_writable(cfg.cache, [images_dir, *feature_cache.cache_images_folders(cfg.cache)])
    if images_dir is not None:
        data_lib.check_images_folder(images_dir)
    fresh = cfg.train.fresh
    if os.path.isdir(run_dir):
        # another train of the run now (or, for --fresh, an evaluate, export or caption
        # reading it): refused here, not after its checkpoint was restored to be checked and
        # the caption file parsed (seconds to a minute); held for good further on
        with run.training_lock(shared=cfg.train.strategy == "multi-worker"):
            if fresh:
                with run.fresh_lock():
                    pass
    if not fresh:   # the run's --format, when the one given reads the file the same way
        cfg = run.with_recorded_format(cfg)
    notes = unused_flag_notes(cfg.train) + reopen_checks(run, cfg, fresh)
    if not fresh and os.path.exists(run.split) and run.caption_data() is None:
        notes.append(f"{run.split} has no fingerprint of the run's caption data (a run made "
                     f"before they were recorded): recording the one of {cfg.captions}, "
                     f"against which later resumes are checked")
    # no extract-features may write the cache while it is read (nor be writing it now)
    with feature_cache.using_features(cfg.cache, writing=False):
        settled = None if fresh else rerun_without_data(run, cfg, run_dir, images_dir, notes,
                                                        log)
        return settled or _load_and_train(run, cfg, run_dir, images_dir, progress, log,
                                           notes)


def rerun_without_data(run: RunFolder, cfg: RunConfig, run_dir: str, images_dir,
                       notes: list, log) -> Optional[dict]:
    """The summary of a rerun that trains nothing (all --epochs done, --max-steps reached,
    or stopped early), decided from the run folder before the caption file is parsed (COCO's
    Karpathy file: 25 s of parsing, tokenizing and fingerprinting for "nothing to train"),
    `notes` and `check_metric_images`' logged; None when the rerun is to load the data
    (`_load_and_train`), having written nothing.

    Decided so only when the full load could say or write nothing more (besides the data's
    description, `_describe`, and the strategy's notes, which speak of training; no feature
    file is read, which the full load did to build the in-memory table): the run
    stands at an epoch's boundary, with every metric its resume would measure logged; the
    caption file has the bytes it had when the run last read it (split.json's
    `caption_file`: the same caption data, which the load checks; a Flickr8k file, whose
    split also depends on the lists beside it, is loaded), and split.json's `caption_data`
    has every field the load records (a run recorded before `unordered_digests`, or without
    `caption_data`, is loaded once, which records them); `features_as_recorded` (the
    features of every image, with its refusals); config.json and split.json would be
    rewritten as they are; the newest checkpoint restores (none skipped, set aside or
    deleted: `checkpoints.restores_as_it_is`); the best model loads and is the best epoch's
    (none to save or rewrite), and the last epoch's heatmaps are there (none to draw
    again). A multi-worker run is loaded, whose workers agree on their checkpoints in the
    Trainer. What a stopped process logged past the checkpoint is removed as by the Trainer
    (`forget_undone`), so are the shards of a save it was stopped in
    (`checkpoints.remove_save_leftovers`), and TensorBoard gets the epochs' scalars a stop lost
    (`log_lost_epochs`) and the hyperparameters (`log_hparams`: when missing, or of another
    group: a run copied or moved)."""
    tc = cfg.train
    where, recorded = _resume_position(run), run.caption_file()
    if tc.strategy == "multi-worker" or where is None or where[1] or recorded is None \
            or not os.path.exists(run.vocab):
        return None
    done, steps = where[0], checkpoints.steps_taken(run.checkpoints) or 0
    history = [h for h in run.read_history() if h["epoch"] <= done]
    if _nothing_left(run, tc, where, history) is None or (
            trains_more(tc, done, steps) and (_unmeasured(tc, history, done) or
                                              _unmeasured_best(run, tc, history, done))):
        return None
    kept = with_trained_settings(run, cfg)   # what config.json is rewritten with
    if read_json(run.config, file_names=True) != dataclasses.replace(
            kept, train=dataclasses.replace(kept.train, fresh=False)).to_dict() or \
            not run.split_fields() >= set(SPLIT_FIELDS) or \
            run.settings_recorded() != cfg.settings_digest():
        return None
    if not isinstance((run.caption_data() or {}).get("unordered_digests"), dict):
        return None     # recorded before it was (`data.caption_fingerprint`): the load adds it
    if recorded["path"] != cfg.captions or recorded["format"] in data_lib.LIST_FORMATS or \
            {k: recorded.get(k) for k in ("size", "sha256")} != \
            data_lib.caption_file_stamp(cfg.captions):
        return None
    if not features_as_recorded(cfg, run, images_dir):
        return None
    vocab = run.load_vocab()
    vocab.refuse_words_never_tokenized(run.vocab)
    check_model_size(cfg, vocab_tokens=len(vocab))
    check_cider_vocabulary(tc, len(vocab))
    notes, cfg = metric_images_notes(run, cfg, notes, len(run.load_splits()["val"]))
    with run.training_lock():
        _, objects = training_state(cfg, len(vocab), 1)
        if checkpoints.restores_as_it_is(tf.train.Checkpoint(**objects), run.checkpoints) \
                is None or (int(objects["epoch"].numpy()), int(objects["step"].numpy()),
                            int(objects["step_in_epoch"].numpy())) != (done, steps, 0):
            return None
        early = replayed_early_stopping(run, tc, history)
        stopped, best = early.replay(), run.best_record()
        if early.best_epoch is not None and early.best_epoch + 1 == done and \
                (best or {}).get("epoch") != done:   # `Trainer._repair_best` saves it
            return None
        if best and not (os.path.exists(run.best_weights) and
                         os.path.exists(run.best_model)):
            return None                              # `RunFolder.repair_best_model`'s
        if best and run.best_mismatch(best):
            return None                              # `RunFolder.match_best_files`'
        if best and os.path.exists(run.best_weights):
            try:
                run.load_best_model()
            except UserError:                        # `RunFolder.repair_best_model`'s
                return None
        # the sample images of the full load when every val image has features (else one
        # lacking here makes the full load decide: `Trainer._redraw_lost_samples`)
        samples = heatmap_names(sorted(run.load_splits()["val"])[:tc.sample_images])
        if done and tc.sample_images and missing_heatmaps(run, done, samples):
            return None                              # `Trainer._redraw_lost_samples`'
        folder = os.path.abspath(images_dir) if images_dir else run.images_dir()
        line = checked_in_line(folder, images_why(cfg, run, images_dir, folder))
        if line:    # as the full load says it (`_describe`)
            log(line)
        for note in notes:
            log("note: " + note)
        forget_undone(run, done, steps, log)
        checkpoints.remove_save_leftovers(run.checkpoints, log)
        log_lost_epochs(run, done, log)
        if tc.sample_images:   # as the full load says it (`Trainer.fit`)
            log_unredrawable_heatmaps(run, done - 1, samples, log)
        log_hparams(run.logs, _hparams(kept, len(vocab)), f"before epoch {done + 1}")
    reason = "early_stopping" if stopped and done < tc.epochs else \
        "max_steps" if done < tc.epochs else "epochs"
    return _summary_of(run_dir, tc, history, early, reason, 0.0, done, steps, 0, None, done,
                       steps, 0, best)


def _load_and_train(run: RunFolder, cfg: RunConfig, run_dir: str, images_dir, progress, log,
                    notes: list) -> dict:
    """`train` after its checks of the flags and the run folder."""
    fresh = cfg.train.fresh
    data = load_train_data(cfg, run_dir, reuse=not fresh,   # reads, writes nothing
                           images_dir=images_dir)
    check_model_size(cfg, vocab_tokens=len(data.vocab))
    check_cider_vocabulary(cfg.train, len(data.vocab))
    if data.beside_note:   # before anything is written: it may be the wrong images
        notes.append(data.beside_note)
    if not fresh:
        notes += check_features_mid_epoch(run, cfg, data) + changed_images_notes(run, data)
        notes, cfg = metric_images_notes(run, cfg, notes, len(data.references["val"]))
    for note in notes:
        log("note: " + note)
    os.makedirs(run_dir, exist_ok=True)
    # one `train` per run folder at a time (the workers of a multi-worker run share it)
    with run.training_lock(shared=cfg.train.strategy == "multi-worker"):
        if fresh:
            with run.fresh_lock():   # no evaluate, export or caption reading the run
                kept = run.fresh_note(run.delete_previous())
            if kept:
                log("note: " + kept)
            try:
                return {**_train_in(run, cfg, run_dir, images_dir, progress, log, data),
                        "fresh": True}
            except UserError as e:   # "rerun this command": with --fresh, that deleted it
                if "--fresh" in e.message:   # its fix is a new model (a NaN in float16, ...)
                    raise
                raise e.reworded(f"{e.message} ({FRESH_RERUN})") from None
        return _train_in(run, cfg, run_dir, images_dir, progress, log, data)


def _train_in(run: RunFolder, cfg: RunConfig, run_dir: str, images_dir, progress, log,
              data) -> dict:
    """`train`'s training, once every check passed (its errors said in the run's terms)."""
    try:  # the Trainer writes config.json, split.json and vocab.json once it has restored
        return Trainer(cfg, run_dir, images_dir=images_dir, progress=progress, log=log,
                       data=data).fit()
    except BrokenPipeError:   # stdout's reader gone (`train ... | head`): the CLI's to say,
        raise                 # not a write of the run folder (no "free space" to advise)
    except tf.errors.ResourceExhaustedError as e:  # out of memory (this machine's or a GPU's)
        what = out_of_memory(e)
        raise OutOfMemory(f"{run.path}: out of memory while training ({what}); rerun with a "
                          f"lower --batch-size (taken at an epoch's start: it resumes from "
                          f"the last checkpoint), a lower --memory-cache-gb (the features "
                          f"kept in memory), or smaller --units / --embedding-dim with "
                          f"--fresh (a new model)", what) from None
    except OSError as e:  # a write that failed while training: a full disk, a lost folder
        # h5py (best.weights.h5) names the file and the reason only inside its message
        h5 = dict(re.findall(r"(filename|error message) = '([^']*)'", str(e)))
        path = e.filename or h5.get("filename")
        name = path and re.sub(r"^\.(.+)\.tmp\.\d+\.[^/]*$", r"\1",
                               os.path.basename(path))  # fileio.temp_name's final name
        where = os.path.join(os.path.dirname(path), name) if name else run.path
        reason = h5.get("error message") or (e.strerror or str(e) or
                                             type(e).__name__).splitlines()[0][:200]
        raise TrainingError(f"{where}: {reason} while training; "
                            f"{free_space('', 'fix the folder')}: it resumes from the last "
                            f"checkpoint") from None


def format_summary(summary: dict) -> str:
    """What this invocation trained (or that nothing was left), the run's totals (finished
    epochs, steps, and how far into the next epoch when --max-steps stopped it there), the
    best model and how to open TensorBoard."""
    s = summary
    best = ("" if s["best_epoch"] is None else
            f", best {s['best_monitor']}={metric_text(s['best_value'])} at epoch {s['best_epoch']}")
    run = (f"epoch {s['finished_epochs']} of {s['target_epochs']}"
           if s["finished_epochs"] <= s["target_epochs"] else
           f"epoch {s['finished_epochs']} (--epochs {s['target_epochs']})") + f", step {s['steps']}"
    if s["epoch_steps"]:
        run += (f", in epoch {s['finished_epochs'] + 1} at step {s['epoch_steps']} of "
                f"{s['epoch_length']}")
    if s["steps_now"] == 0 and s["epochs_now"]:   # only an epoch's end was left to do
        head = (f"ended epoch {s['finished_epochs']} (its steps were trained before the run "
                f"stopped: validated and recorded now), stopped by {s['stopped_by']}; the "
                f"run: {run}{best}")
    elif s["steps_now"] == 0:
        why = (f"the run already reached --max-steps {s['max_steps']} ({run})"
               if s["stopped_by"] == "max_steps" else
               f"the run already finished {run}" + (
                   f" (stopped early before: {s['monitor']} did not improve for --patience "
                   f"epochs; rerun with a larger --patience to train on)"
                   if s["stopped_by"] == "early_stopping" else ""))
        head = f"nothing to train: {why}{best}"
    else:
        head = (f"trained {s['steps_now']} steps ({s['epochs_now']} epochs finished) in "
                f"{s['seconds']:.0f} s, stopped by {s['stopped_by']}; the run: {run}{best}")
    if s["stopped_by"] == "early_stopping" and s.get("scst_after") is not None \
            and s["finished_epochs"] <= s["scst_after"]:
        head += "\nno self-critical epoch trained: the cross-entropy stage stopped early"
        if s.get("monitor_flag") is None:   # val_loss, then val_cider: patience starts over
            head += (f", before --scst-after {s['scst_after']}; rerun with --scst-after "
                     f"{s['finished_epochs']} to train it from here")
        else:   # one metric over both stages: its patience goes on into the second
            head += (f" (--monitor {s['monitor_flag']} watches both stages); rerun with a "
                     f"larger --patience, or without --monitor (val_cider in self-critical "
                     f"epochs, its patience starting over)")
    if s.get("skipped_images"):   # said at the start too, in a line that scrolled away
        share = s["skipped_images"] / s["images"]
        head += (f"\nnote: {s['skipped_images']} of the {s['images']} images "
                 f"({'<1%' if share < 0.01 else format(share, '.0%')}) were left out, with "
                 f"their {s['skipped_captions']} captions: they have no usable features in "
                 f"the cache (the \"skipped\" line above says why, and what to do)")
    if s.get("fresh"):
        head += f"\nnote: trained with --fresh: {FRESH_RERUN}"
    kept = (summary["best_model"] if s["best_epoch"] is not None else
            "none yet (no epoch finished: the first one saves it)")
    return (f"{head}\n"
            f"best model: {kept}\n"
            f"TensorBoard: tensorboard --logdir {os.path.join(summary['run'], 'logs')}")
