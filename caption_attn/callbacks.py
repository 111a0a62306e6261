"""Training callbacks on Keras' callback API, driven by `train.py`'s loop.

- `EarlyStopping`: monitor / mode / patience / min_delta; keeps the best model on disk as soon
  as it improves (nothing lost if the process dies) and restores the best weights at the end,
  whether or not stopping triggered. Its state is rebuilt from `history.json` on resume.
- `TensorBoardLogger`: scalars, sample captions (text), attention heatmaps (images) and the
  run's hyperparameters (HParams dashboard) under `logs/train` and `logs/validation`.
- `AttentionSnapshots`: the same heatmaps as PNG files under `attention/epoch_K/`.
- `prune_event_files`: on resume, the TensorBoard values a stopped process logged after the
  checkpoint the run goes on from are removed (that training is done again);
  `log_missing_epochs` writes the epoch scalars of history.json's epochs a stop lost.
- `log_hparams`: the run's hyperparameters, written once per run (again when they change).

The sample heatmaps (`samples(epoch)`) may come as a list or as a `concurrent.futures.Future`
of one (drawn in a background thread while the next epoch trains); both callbacks then write
them from the training thread at a later epoch end once drawn, and wait for the rest at the end
of training.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import struct
import time
from typing import Callable, Optional, Sequence, Union

import keras
import numpy as np

from caption_attn.fileio import atomic_path, write_bytes_atomic
from caption_attn.config import MONITORS
from caption_attn.errors import UserError

_MODES = {"loss": "min", "val_ce": "min", **MONITORS}


def _mode_of(monitor: str, mode: str) -> str:
    if mode == "auto":
        if monitor not in _MODES:
            raise ValueError(f"cannot infer `mode` for monitor {monitor!r}; pass "
                             f"mode='min' or mode='max'")
        mode = _MODES[monitor]
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` must be 'auto', 'min' or 'max', got {mode!r}")
    return mode


class EarlyStopping(keras.callbacks.Callback):
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` epochs.

    `save_best(epoch, value)` is called whenever the metric improves (the trainer saves the
    model there); `restore_best()` is called at the end to put the best weights back. Both
    default to an in-memory copy of the weights. `initial_history` (entries of
    history.json) replays earlier epochs after a resume, so patience carries over; entries
    trained with another monitor (their `monitor`, or without the metric in older runs:
    a run resumed with another --monitor) are left out, and the epoch after them starts
    over from the one before it, as at a stage change. Each entry is compared as it was when
    trained: by its `min_delta` (else `replay_min_delta`, the run's recorded --min-delta;
    else `min_delta`), so a resume with another --min-delta keeps the best epoch the run
    kept (best.json's) and compares only the epochs to come by the new one.

    `monitor` may also be a function of the 0-based epoch (training stages: val_loss during
    cross-entropy, val_cider during self-critical epochs). When it changes, patience starts
    over and the first value to beat is the best of the new metric of the epoch before the
    change (the model the stage trains from), of the best epoch so far and of the best
    model on disk (`best_on_disk`: its epoch may be one the replay left out, chosen by an
    earlier --monitor), of those that logged it or were measured after it, so a new stage
    replaces the best model only when it does better than all; if it never does, the best
    model on disk stays the one of the earlier stage.
    """

    def __init__(self, monitor: Union[str, Callable[[int], str]] = "val_loss",
                 mode: str = "auto", patience: int = 3, min_delta: float = 0.0,
                 initial_history: Sequence[dict] = (),
                 save_best: Optional[Callable[[int, float], None]] = None,
                 restore_best: Optional[Callable[[], None]] = None,
                 replay_min_delta: Optional[float] = None):
        super().__init__()
        self._monitor_for = monitor if callable(monitor) else (lambda epoch: monitor)
        self._fixed_mode = mode
        self.monitor = self._monitor_for(0)
        self.mode = _mode_of(self.monitor, mode)
        if patience < 0:
            raise ValueError(f"`patience` must be >= 0, got {patience}")
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.replay_min_delta = self.min_delta if replay_min_delta is None \
            else abs(replay_min_delta)
        self.initial_history = list(initial_history)
        self._save_best, self._restore_best = save_best, restore_best
        self._disk_best: Optional[tuple[int, dict]] = None   # `best_on_disk`
        self._saved: Optional[int] = None   # the epoch saved last since the replay

    # state ------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        if self.replay():
            self.model.stop_training = True

    def replay(self) -> bool:
        """Replay `initial_history` (no model needed); whether the resumed run had already
        stopped, so that training stops before its first epoch. `train.check_metric_images`
        asks this too, to know whether a rerun trains anything."""
        self.monitor = self._monitor_for(0)
        self.mode = _mode_of(self.monitor, self._fixed_mode)
        self._reset()
        self.stopped_epoch = None
        self._best_weights = None
        self._previous_logs: dict = {}
        self._saved = None
        switched = False
        for entry in self.initial_history:  # history.json counts epochs from 1
            epoch = entry["epoch"] - 1
            if entry.get("monitor", self._monitor_for(epoch)) != self._monitor_for(epoch):
                # trained with another --monitor: its comparisons were of another metric
                self._previous_logs, switched = dict(entry), True
                continue
            if switched:
                self._start_from_previous(epoch)
                switched = False
            self._update(epoch, entry, replay=True)
        if switched:  # resumed with another --monitor: the resumed epoch is the one to beat
            self._start_from_previous(self.initial_history[-1]["epoch"])
        # the resumed run had already stopped, unless its next epoch starts a stage with
        # another monitor (a stopped cross-entropy run resumed with --scst-after): patience
        # starts over there
        last = self.initial_history[-1]["epoch"] if self.initial_history else None
        if last is not None and self._monitor_for(last) == self.monitor and self._exhausted():
            self.stopped_epoch = last - 1
            return True
        return False

    def _reset(self, start: Optional[float] = None) -> None:
        worst = np.inf if self.mode == "min" else -np.inf
        self.best = worst if start is None else start
        self.best_epoch = None
        self.wait = 0
        self._best_logs: dict = {}   # the logs of `best_epoch` (`_follow_stage`)

    def _follow_stage(self, epoch: int) -> None:
        """Switch to the monitor of `epoch` if it changed (see the class docstring)."""
        monitor = self._monitor_for(epoch)
        if monitor == self.monitor:
            return
        # the models the new stage may start from, each when its epoch logged the new metric
        # (a tie keeps the first): the best model on disk (`best_on_disk`), the best so far
        # and the epoch before the change's, which the stage trains from. That one alone was
        # the bar: a worse epoch than the best model on disk replaced it
        starts = self._disk_start(epoch) + [(self.best_epoch, self._best_logs),
                                            (epoch - 1, self._previous_logs)]
        self.monitor, self.mode = monitor, _mode_of(monitor, self._fixed_mode)
        self._reset()
        self._start_among(starts)

    def _disk_start(self, epoch: int) -> list:
        """[(0-based epoch, values)] of the best model on disk when it is of an epoch before
        0-based `epoch` (`best_on_disk`), else []."""
        disk = self._disk_best
        return [disk] if disk is not None and disk[0] < epoch else []

    def _start_among(self, starts: list) -> None:
        """Make the best so far the best of `starts` ([(0-based epoch or None, logs)]) that
        logged the monitor (a tie keeps the earlier in the list)."""
        for e, logs in starts:
            if e is None or logs.get(self.monitor) is None:
                continue
            value = float(logs[self.monitor])
            if self.best_epoch is None or self._improved(value, 0.0):
                self.best, self.best_epoch, self._best_logs = value, e, dict(logs)

    def _start_from_previous(self, epoch: int) -> None:
        """After epochs trained with another --monitor, patience starts over at `epoch`
        and the value to beat is the epoch before's (when it logged the metric), or the best
        model on disk's when better (`best_on_disk`), as at a stage change: the best of all
        earlier epochs (val_loss, logged by every epoch of a val_bleu4 run) would stop the
        resumed run before it trained, or ask it to beat a model best.keras does not hold."""
        self._follow_stage(epoch)
        self._reset()
        # the best model on disk too (`best_on_disk`): its epoch may be one the replay left
        # out, chosen by the earlier --monitor, and a worse self-critical epoch replaced it
        self._start_among(self._disk_start(epoch) + [(epoch - 1, self._previous_logs)])

    def best_on_disk(self, epoch: int, logs: dict) -> None:
        """The best model on disk is 0-based `epoch`'s, with `logs` (values measured after
        it): best.keras's val_cider before the self-critical stage
        (`train.Trainer._best_before_stage`), which then starts from the better of it, the
        best epoch so far and the epoch before the change (see the class docstring). Given
        before `replay` (a resume), it is a start where the replay changes stage; given
        before the epoch that changes it, there. Its epoch may be one the replay left out
        (best.keras chosen by an earlier --monitor, or a self-critical epoch chosen so).

        Ignored when another epoch's best model was saved since the replay (a worker of a
        cluster may have read best.json before the chief's save); forgotten when a resume
        saves the restored epoch instead (`forget_best_on_disk`)."""
        if self._saved in (None, epoch):
            self._disk_best = (epoch, dict(logs))

    @property
    def disk_best_epoch(self) -> Optional[int]:
        """The 0-based epoch of the best model on disk (`best_on_disk`), or None."""
        return None if self._disk_best is None else self._disk_best[0]

    def forget_best_on_disk(self) -> None:
        """The best model on disk given (`best_on_disk`) is being replaced by the best epoch
        so far (`train.Trainer._repair_best`: its save was lost): it starts nothing."""
        self._disk_best = None

    def start_from(self, epoch: int, value: float) -> None:
        """Make 0-based `epoch`'s `value` the best so far when it is at least the replay's
        best (or there is none), patience starting over: the value of the best model on disk
        measured again after a resume (`train.Trainer._measured_again`)."""
        if self.best_epoch == epoch:
            return
        if self.best_epoch is None or (value >= self.best if self.mode == "max"
                                       else value <= self.best):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            self._best_logs = {self.monitor: value}

    def keep_better(self, epoch: int, value: float, waited: int) -> bool:
        """Make 0-based `epoch`'s `value` the one to beat when it beats the replay's best:
        the best model on disk, of an epoch trained again since, whose history.json entry
        is now the retrained model's (`train.keep_better_best_model`); `waited`: the epochs
        since it that did not beat it, which patience counts. Returns whether it did."""
        if self.best_epoch is not None and not self._improved(value, 0.0):
            return False
        self.best, self.best_epoch, self.wait = value, epoch, waited
        self._best_logs = {self.monitor: value}
        return True

    def _improved(self, value: float, min_delta: float) -> bool:
        if self.mode == "min":
            return value < self.best - min_delta
        return value > self.best + min_delta

    def _update(self, epoch: int, logs: dict, replay: bool = False) -> None:
        self._follow_stage(epoch)
        self._previous_logs = dict(logs)
        if logs.get(self.monitor) is None and replay:
            return  # an earlier epoch of a run resumed with another --monitor: not compared
        if logs.get(self.monitor) is None:
            have = sorted(k for k, v in logs.items() if k != "epoch" and v is not None)
            raise UserError(f"early stopping monitors {self.monitor!r} but the epoch logs have "
                            f"no value for it, only for {have} (an empty validation split?)")
        value = float(logs[self.monitor])
        delta = self.min_delta if not replay else self.replay_min_delta \
            if logs.get("min_delta") is None else abs(float(logs["min_delta"]))
        if self._improved(value, delta):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            self._best_logs = self._previous_logs
            if not replay:
                self._keep_best(epoch, value)
        else:
            self.wait += 1

    def _exhausted(self) -> bool:
        """`patience` epochs without improvement since the best one (Keras' rule: an
        improving epoch never stops training, even with patience 0)."""
        return self.best_epoch is not None and 0 < self.wait and self.wait >= self.patience

    def _keep_best(self, epoch: int, value: float) -> None:
        self._saved, self._disk_best = epoch, None   # the best model on disk now
        if self._save_best is not None:
            self._save_best(epoch, value)
        else:
            self._best_weights = self.model.get_weights()

    # Keras hooks --------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        self._update(epoch, logs or {})
        # not when the next epoch starts a stage with another monitor (--scst-after), whose
        # patience starts over: the last cross-entropy epoch stopped the run there, and the
        # self-critical stage never trained (a rerun, replaying, went on into it)
        if self._exhausted() and self._monitor_for(epoch + 1) == self.monitor:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_epoch is None:
            return
        if self._restore_best is not None:
            self._restore_best()
        elif self._best_weights is not None:
            self.model.set_weights(self._best_weights)


class _Pending:
    """Epochs' sample lists (or Futures of them) waiting to be written, oldest first."""

    def __init__(self):
        self._items: list = []

    def add(self, epoch: int, samples) -> None:
        self._items.append((epoch, samples))

    def ready(self, wait: bool = False):
        """(epoch, sample list) of the oldest entries that are drawn (all with `wait`). An
        entry leaves the queue once the caller's loop body for it is done: taken off before,
        a Ctrl-C or SIGTERM in its write lost that epoch's heatmaps for good (the clean-up's
        `write_pending` writes what is still queued; a rerun redraws only the last epoch's)."""
        while self._items:
            epoch, samples = self._items[0]
            if hasattr(samples, "result"):
                if not (wait or samples.done()):
                    return
                samples = samples.result()
            yield epoch, samples
            self._items.pop(0)


class TensorBoardLogger(keras.callbacks.Callback):
    """Writes TensorBoard summaries under `log_dir/train` and `log_dir/validation`.

    Tags follow Keras' own TensorBoard callback: per epoch, `epoch_<metric>` in the `train`
    run and the same tag in the `validation` run for the same quantity measured on the
    validation images, so TensorBoard draws the two curves in one chart: `epoch_loss` (the
    training loss of the epoch's stage; validation: the teacher-forced loss), and in the train
    run `epoch_learning_rate`, `epoch_captions_per_second`, `epoch_gradient_norm`, plus in
    self-critical epochs `epoch_reward` (mean CIDEr-D of the samples), `epoch_baseline`,
    `epoch_advantage_std` and `epoch_entropy` (of the policy at the sampled tokens); in the
    validation run `epoch_bleu4` and `epoch_cider` when measured, the sample captions (text)
    and their attention heatmaps (images). Every `update_freq` steps: `batch_loss` and
    `batch_gradient_norm`. The hyperparameters go to the HParams dashboard (`log_hparams`,
    `hparams_since`: where a change of them took effect, for its record there).
    `samples(epoch)` returns a list of dicts with keys image (name), caption, png (bytes).
    """

    TRAIN = {"loss": "epoch_loss", "learning_rate": "epoch_learning_rate",
             "captions_per_second": "epoch_captions_per_second",
             "gradient_norm": "epoch_gradient_norm", "reward": "epoch_reward",
             "baseline": "epoch_baseline", "advantage_std": "epoch_advantage_std",
             "entropy": "epoch_entropy"}
    VALIDATION = {"val_loss": "epoch_loss", "val_bleu4": "epoch_bleu4",
                  "val_cider": "epoch_cider"}

    def __init__(self, log_dir: str, hparams: dict, samples: Optional[Callable] = None,
                 update_freq: int = 50, hparams_since: str = "epoch 1"):
        super().__init__()
        self.log_dir, self.hparams, self.hparams_since = log_dir, hparams, hparams_since
        self.samples, self.update_freq = samples, max(1, update_freq)

    def on_train_begin(self, logs=None):
        import tensorflow as tf

        self._tf = tf
        self._pending = _Pending()
        self._open_writers()
        log_hparams(self.log_dir, self.hparams, self.hparams_since)

    def _open_writers(self) -> None:
        """New summary writers, each making an event file named by the second it is made in
        and a count of this process's writers that is not zero-padded (10 sorts before 9),
        while TensorBoard reads a folder's files by name: a file made in the same second as
        an earlier one may be read first, and its later steps before that file's (then
        dropped: `log_missing_epochs`), so they are made once that second has passed (a
        reopening after `log_earlier_validation`, within a second in a test's process)."""
        _past_newest_event_second(self.log_dir)
        tf = self._tf
        self.train_writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        self.val_writer = tf.summary.create_file_writer(
            os.path.join(self.log_dir, "validation"))

    def _reopen_deleted_writers(self) -> None:
        """Event files deleted while training (`rm -r logs` to clear TensorBoard) would take
        every later summary silently into the unlinked files: new writers make them again."""
        if all(os.path.isdir(os.path.join(self.log_dir, name)) for name in ("train",
                                                                           "validation")):
            return
        for writer in (self.train_writer, self.val_writer):
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - flushing into a deleted folder may fail
                pass
        self._open_writers()

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        step = int(logs.get("global_step", batch))
        if step % self.update_freq:
            return
        with self.train_writer.as_default(step=step):
            for key in ("loss", "gradient_norm"):
                if key in logs:
                    self._tf.summary.scalar(f"batch_{key}", logs[key])

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self._reopen_deleted_writers()
        self._scalars(self.train_writer, self.TRAIN, epoch, logs)
        self._scalars(self.val_writer, self.VALIDATION, epoch, logs)
        if self.samples:
            self._pending.add(epoch, self.samples(epoch))
        self._write_samples()
        self.train_writer.flush()
        self.val_writer.flush()

    def log_validation(self, epoch: int, logs: dict) -> None:
        """Scalars of the validation run measured for 0-based `epoch` after it ended (a resume
        measuring the metric the next epoch monitors: history.json had it, TensorBoard not)."""
        self._reopen_deleted_writers()
        self._scalars(self.val_writer, self.VALIDATION, epoch, logs)
        self.val_writer.flush()

    def log_earlier_validation(self, epoch: int, logs: dict) -> None:
        """Scalars of the validation run measured for 0-based `epoch` after later epochs'
        were logged (best.keras's val_cider at the change to the self-critical stage): put
        before them, where TensorBoard reads them in step order (`log_missing_epochs`;
        appended after them, TensorBoard dropped the tag's later points). The writers are
        closed around it: one left open would go on writing into the file it replaced."""
        for writer in (self.train_writer, self.val_writer):
            writer.close()
        log_missing_epochs(self.log_dir, [{**{k: logs[k] for k in self.VALIDATION
                                               if logs.get(k) is not None},
                                           "epoch": epoch + 1}])
        self._open_writers()

    def _scalars(self, writer, tags: dict, epoch: int, logs: dict) -> None:
        """The `logs` values named in `tags` (log key -> tag), at step `epoch` + 1."""
        with writer.as_default(step=epoch + 1):
            for key, tag in tags.items():
                if logs.get(key) is not None:
                    self._tf.summary.scalar(tag, logs[key])

    def add_samples(self, epoch: int, samples) -> None:
        """Queue the sample heatmaps of 0-based `epoch` (drawn again on resume when a stop
        lost them: see `Trainer.fit`)."""
        self._pending.add(epoch, samples)

    def write_pending(self) -> None:
        """Write the heatmaps still being drawn (waiting for them), when training stops on an
        error or Ctrl-C (without it the last epoch's were lost), and flush both runs' summaries."""
        self._write_samples(wait=True)
        self.train_writer.flush()
        self.val_writer.flush()

    def _write_samples(self, wait: bool = False) -> None:
        for epoch, samples in self._pending.ready(wait):
            if not samples:
                continue
            with self.val_writer.as_default(step=epoch + 1):
                table = "\n".join(f"| {markdown_cell(s['image'])} | "
                                  f"{markdown_cell(s['caption'])} |" for s in samples)
                self._tf.summary.text("captions", "| image | caption |\n|---|---|\n" + table)
                for s in samples:
                    self._png_summary(f"attention/{s['image']}", s["png"])

    def _png_summary(self, tag: str, png: bytes) -> None:
        """An image summary made of PNG bytes as they are: what `tf.summary.image` writes
        ([width, height, png] strings, image plugin metadata) without decoding the PNG and
        encoding it again (0.22 s per 13-word heatmap)."""
        from tensorboard.plugins.image import metadata

        width, height = png_size(png)
        self._tf.summary.write(
            tag, self._tf.constant([str(width), str(height), png]),
            metadata=metadata.create_summary_metadata(display_name=None, description=None))

    def on_train_end(self, logs=None):
        self._write_samples(wait=True)
        self.train_writer.close()
        self.val_writer.close()


def prune_event_files(log_dir: str, epochs: int, steps: int) -> int:
    """Remove from the event files under `log_dir/train` and `log_dir/validation` what was
    logged after the point a run resumes from: summaries of epochs after `epochs` (their
    step is the epoch number) and batch summaries (`batch_*`, step = global step) after step
    `steps`. A stopped process logged them for training the resumed run does again (a kill
    after its newest checkpoint, or a damaged checkpoint skipped for an older one), and
    TensorBoard drew both: every curve went back and on again, and the discarded epochs'
    heatmaps stood beside the new ones. Returns how many values were removed.

    A file with nothing to remove is left as it is; another is rewritten (a temporary file
    renamed onto it; a TensorBoard already running keeps what it read until restarted). A
    record cut short by a kill ends the file, whose rewrite drops it; a file damaged
    inside is left as it is (TensorBoard reads it up to the damage too). A write that fails
    (a full disk) is an OSError naming the file; the file is then left as it was."""
    removed = 0
    for sub in ("train", "validation"):
        for path in _event_files(os.path.join(log_dir, sub)):
            events, whole = _read_events(path)
            if not whole:
                continue
            kept, dropped = [], 0
            for event in events:
                if event.HasField("summary"):
                    values = [v for v in event.summary.value
                              if event.step <= (steps if v.tag.startswith("batch_")
                                                else epochs)]
                    dropped += len(event.summary.value) - len(values)
                    if not values:
                        continue
                    del event.summary.value[:]
                    event.summary.value.extend(values)
                kept.append(event)
            if dropped:
                _rewrite_events(path, kept)
                removed += dropped
    return removed


def log_missing_epochs(log_dir: str, history: Sequence[dict]) -> list[int]:
    """Write the epoch scalars of `history` (history.json's entries) that the event files
    under `log_dir/train` and `log_dir/validation` lack, each value of them once, with the
    tag, step (the epoch number) and run `TensorBoardLogger` gives it. A stop after an
    epoch's history.json entry and checkpoint but before its scalars were written (a full
    disk or a second Ctrl-C while its best model was saved, a kill) lost them for good: the
    resumed run goes on after that epoch. Returns the epochs that got any.

    Each value goes where TensorBoard reads it in step order: into the event file of the
    first later epoch's summaries, before them (TensorBoard's data server, reading a step of
    a tag again after later ones, drops the tag's points from that step on: epoch 2
    appended after epoch 3 took epoch 3 off the chart), else at the end of the last file,
    or in a new one when there is none (or the file is damaged inside, left as it is).
    Files are rewritten as `prune_event_files` does (the same errors)."""
    from tensorboard.plugins.scalar import summary_v2 as scalar_summary

    written = set()
    for sub, tags in (("train", TensorBoardLogger.TRAIN),
                      ("validation", TensorBoardLogger.VALIDATION)):
        folder = os.path.join(log_dir, sub)
        files = [(path, *_read_events(path)) for path in _event_files(folder)]
        logged = {(v.tag, event.step) for _, events, _ in files for event in events
                  for v in event.summary.value}
        missing = [_event(step=entry["epoch"], summary=scalar_summary.scalar_pb(tag, entry[key]))
                   for entry in history for key, tag in tags.items()
                   if entry.get(key) is not None and (tag, entry["epoch"]) not in logged]
        if missing:
            _insert_events(folder, files, missing)
            written.update(event.step for event in missing)
    return sorted(written)


def _insert_events(folder: str, files: list, new: list) -> None:
    """`new` events (ascending steps) into `folder`'s event files `files` ((path, events,
    whole) in reading order): each before the first event of a later epoch (`batch_*`
    summaries, at global steps, aside), else at the end (`log_missing_epochs`)."""
    later = [(i, j, event.step) for i, (_, events, _) in enumerate(files)
             for j, event in enumerate(events)
             if any(not v.tag.startswith("batch_") for v in event.summary.value)]
    into: dict = {}                  # file index -> {event index: [events before it]}
    for event in new:
        i, j = next(((i, j) for i, j, step in later if step > event.step),
                    (len(files) - 1, len(files[-1][1])) if files else (-1, 0))
        if i < 0 or not files[i][2]:  # no file, or one damaged inside: a file of its own
            i, j = -1, 0
        into.setdefault(i, {}).setdefault(j, []).append(event)
    for i, places in into.items():
        if i < 0:
            _rewrite_events(_new_event_file(folder), [_event(file_version="brain.Event:2")]
                            + places[0])
            continue
        events = files[i][1]
        merged = [e for j in range(len(events) + 1) for e in places.get(j, []) +
                  events[j:j + 1]]
        _rewrite_events(files[i][0], merged)


def _event(**fields):
    """An `Event` proto of now with `fields`."""
    from tensorboard.compat.proto import event_pb2
    return event_pb2.Event(**{"wall_time": time.time(), **fields})


def _past_newest_event_second(log_dir: str) -> None:
    """Wait, if need be, until the second of the newest event file under `log_dir`'s train
    and validation folders has passed (`TensorBoardLogger._open_writers`): 2 s at most (a
    file named by a clock far ahead, another machine's, is not waited for). (`_event_files`
    also removes what a rewrite killed half-way left.)"""
    seconds = [int(m.group(1)) for sub in ("train", "validation")
               for path in _event_files(os.path.join(log_dir, sub))
               if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", os.path.basename(path)))]
    wait = max(seconds) + 1 - time.time() if seconds else 0.0
    if 0.0 < wait <= 2.0:
        time.sleep(wait)


def _new_event_file(folder: str) -> str:
    """The path of a new event file in `folder`, named as TensorFlow names them but read
    before a file a summary writer of this process opens in the same second (`0-` sorts
    before any writer's `N.`), whose later steps must come after it."""
    return os.path.join(folder, f"events.out.tfevents.{int(time.time()):010d}."
                                f"{socket.gethostname()}.{os.getpid()}.0-history.v2")


def _event_files(folder: str) -> list[str]:
    """The event files in `folder` (none if it is missing) in the order TensorBoard reads
    them (by name); temporary files of a rewrite killed half-way are removed."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    files = []
    for name in names:
        if name.startswith(f".{_PRUNED}.tmp."):   # `temp_name`'s, left by a rewrite
            os.remove(os.path.join(folder, name))   # that was killed half-way
        elif "tfevents" in name and not name.startswith("."):
            files.append(os.path.join(folder, name))
    return files


def _read_events(path: str) -> tuple[list, bool]:
    """The events of the event file `path` in order, and whether it may be rewritten: a
    record cut short by a kill ends the file (a rewrite drops it); a file damaged inside
    gives the events before the damage (what TensorBoard reads of it) and False."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    events = []
    try:
        for record in tf.data.TFRecordDataset(path):
            events.append(event_pb2.Event.FromString(record.numpy()))
    except tf.errors.DataLossError as e:
        if "truncated" not in (e.message or ""):
            return events, False
    return events, True


HPARAM_CHANGES = "resume_changes"   # the hyperparameter that records a resume's changes
_HPARAMS_TAGS = ("_hparams_/experiment", "_hparams_/session_start_info")
_HPARAMS_METRICS = (("epoch_loss", "validation", "val_loss"),
                    ("epoch_bleu4", "validation", "val_bleu4"),
                    ("epoch_cider", "validation", "val_cider"), ("epoch_loss", "train", "loss"),
                    ("epoch_reward", "train", "reward"))


def log_hparams(log_dir: str, hparams: dict, since: str) -> Optional[str]:
    """The run's hyperparameters in TensorBoard's HParams dashboard, in an event file of
    `log_dir` itself (the run beside train/ and validation/): written once per run, and
    again only when missing (the logs deleted) or other than `hparams`. TensorBoard shows
    the first it reads of a run and ignores the others: every `train` of a run wrote them
    again, and a resume with another learning rate left the old one shown, without a word.

    So a change rewrites that first one: with `hparams` (the values the run trains with from
    now on, config.json's), and `resume_changes` (HPARAM_CHANGES) adds what changed and
    where (`since`, e.g. "epoch 4: learning_rate 0.01 -> 0.005") to the changes recorded
    before; the run's start time stays, and the group is the run's where it is now
    (`_trial_id`: a copied or moved run gets its own once, an earlier version's shared one
    too). Returns the change ("" when they were written for the first time, or only their
    names or the group changed), None when nothing was written."""
    from tensorboard.plugins.hparams import metadata

    trial = _trial_id(log_dir)
    for path in _event_files(log_dir):
        events, _ = _read_events(path)
        shown = next((v for event in events for v in event.summary.value
                      if v.tag == metadata.SESSION_START_INFO_TAG), None)
        if shown is not None:
            break
    else:
        os.makedirs(log_dir, exist_ok=True)
        _rewrite_events(_new_event_file(log_dir), [_event(file_version="brain.Event:2"),
                                                   *_hparams_events(hparams, trial, None)])
        return ""
    info = metadata.parse_session_start_info_plugin_data(shown.metadata.plugin_data.content)
    before, now = (_plain_hparams(info.hparams), _plain_hparams(_hparams_info(hparams)))
    changes = before.pop(HPARAM_CHANGES, "")
    if before == now and trial == info.group_name:
        return None
    change = ", ".join(f"{k} {_hparam_text(before[k])} -> {_hparam_text(now[k])}"
                       for k in sorted(now) if k in before and before[k] != now[k])
    if change:   # (else only names came or went: a run of another version)
        change = f"{since}: {change}"
        changes = f"{changes}; {change}" if changes else change
    ours = [any(v.tag in _HPARAMS_TAGS for v in event.summary.value) for event in events]
    at, kept = ours.index(True), [event for event, mine in zip(events, ours) if not mine]
    new = _hparams_events({**hparams, **({HPARAM_CHANGES: changes} if changes else {})},
                          trial, info.start_time_secs or None)
    _rewrite_events(path, kept[:at] + new + kept[at:])
    return change


def _trial_id(log_dir: str) -> str:
    """The HParams trial id of the run whose logs are `log_dir`: its folder's name and a
    digest of its real path (`shapes-1a2b3c4d`). TensorBoard makes the id the session's
    group and shows a group as one row, the first session's hyperparameters beside the mean
    of all its sessions' metrics: by the name alone, the runs of two demos (both
    `models/shapes`) under one `--logdir` were one row, without a word; kept from a copy's
    original, a run copied to try other settings was its original's row."""
    run = os.path.realpath(os.path.dirname(os.path.abspath(log_dir)))   # one id by any path
    digest = hashlib.sha256(os.fsencode(run)).hexdigest()[:8]
    return f"{os.path.basename(run)}-{digest}"


def _hparams_events(hparams: dict, trial: str, start: Optional[float]) -> list:
    """The HParams plugin's events of a run: its experiment (the hyperparameters' names, the
    metrics the dashboard shows) and its session (the values), at step 0."""
    from tensorboard.plugins.hparams import api as hp
    from tensorboard.plugins.hparams import summary_v2

    names = [hp.HParam(k) for k in sorted(hparams) if k != HPARAM_CHANGES]
    names.append(hp.HParam(HPARAM_CHANGES, display_name="changed on resume", description=(
        "training settings a resume changed, and from where; the other columns show the "
        "values the run trains with since")))
    config = summary_v2.hparams_config_pb(names, [
        hp.Metric(tag, group=group, display_name=name) for tag, group, name in
        _HPARAMS_METRICS])
    session = summary_v2.hparams_pb(hparams, trial_id=trial, start_time_secs=start)
    return [_event(step=0, summary=config), _event(step=0, summary=session)]


def _hparams_info(hparams: dict) -> dict:
    """`hparams` as the session's proto values (numbers as floats)."""
    from tensorboard.plugins.hparams import metadata, summary_v2
    summary = summary_v2.hparams_pb(hparams, trial_id="-")
    return metadata.parse_session_start_info_plugin_data(
        summary.value[0].metadata.plugin_data.content).hparams


def _plain_hparams(values) -> dict:
    """A session's hyperparameters (`google.protobuf.Value`s) as Python values."""
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in values.items()}


def _hparam_text(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else str(value)


_PRUNED = "pruned-events"   # the temporary file's name (`atomic_path`), without "tfevents"


def _rewrite_events(path: str, events: list) -> None:
    """The event file `path` made of `events` (Event protos), atomically."""
    import tensorflow as tf

    try:
        with atomic_path(path, temp_of=_PRUNED) as tmp, tf.io.TFRecordWriter(tmp) as writer:
            for event in events:
                writer.write(event.SerializeToString())
    except tf.errors.OpError as e:
        code = errno.ENOSPC if "No space left" in (e.message or "") else errno.EIO
        raise OSError(code, os.strerror(code), path) from None


_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|])")


def markdown_cell(text: str) -> str:
    """`text` as it is in a cell of TensorBoard's markdown table: an image name with `|`
    cut the row short (the caption went to a column that is not shown), `*a*` or `[a](b)`
    became emphasis or a link. Markdown characters are backslash-escaped, `&`, `<` and `>`
    written as entities (`\\<` is shown with its backslash), newlines as spaces."""
    text = " ".join(text.splitlines())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MARKDOWN.sub(r"\\\1", text)


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError(f"`png` must be PNG bytes; got {png[:16]!r}...")
    return struct.unpack(">II", png[16:24])


class AttentionSnapshots(keras.callbacks.Callback):
    """Saves the sample images' attention heatmaps as `out_dir/epoch_K/<image>.png`."""

    def __init__(self, out_dir: str, samples: Callable):
        super().__init__()
        self.out_dir, self.samples = out_dir, samples

    def on_train_begin(self, logs=None):
        self._pending = _Pending()

    def on_epoch_end(self, epoch, logs=None):
        self._pending.add(epoch, self.samples(epoch))
        self._write()

    def on_train_end(self, logs=None):
        self._write(wait=True)

    def add_samples(self, epoch: int, samples) -> None:
        """As `TensorBoardLogger.add_samples`."""
        self._pending.add(epoch, samples)

    def write_pending(self) -> None:
        """As `TensorBoardLogger.write_pending`."""
        self._write(wait=True)

    def _write(self, wait: bool = False) -> None:
        for epoch, samples in self._pending.ready(wait):
            folder = os.path.join(self.out_dir, f"epoch_{epoch + 1}")
            names = heatmap_names([s["image"] for s in samples])
            for name, s in zip(names, samples):
                write_bytes_atomic(os.path.join(folder, name), s["png"])
            # a folder of this epoch written before (the Trainer removes those of epochs a
            # resume trains again, but not every user of this callback is a Trainer): the
            # heatmaps of images no longer sampled were of another model
            for old in set(os.listdir(folder) if os.path.isdir(folder) else ()) - set(names):
                if old.endswith(".png"):
                    os.remove(os.path.join(folder, old))


def heatmap_names(keys: Sequence[str]) -> list[str]:
    """The file names of the heatmaps of the sample images `keys` (distinct) in one epoch's
    folder: `caption`'s rule (`captioner.heatmap_files`), so `cat.jpg` and `cat.png` do not
    share one file, and a long key is cut to what the file system takes."""
    from caption_attn.captioner import heatmap_files
    files = heatmap_files({k: k for k in keys})
    return [files[k] for k in keys]
