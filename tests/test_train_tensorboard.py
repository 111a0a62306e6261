"""What `train` leaves in a run's TensorBoard event files across stops and resumes: each
epoch's scalars exactly once (those history.json has), the hyperparameters once."""

import dataclasses
import errno
import glob
import os

import numpy as np
import pytest

from caption_attn import callbacks, train
from caption_attn.run import RunFolder

from test_train import small_config

TB_TAGS = {"train": {"loss": "epoch_loss", "learning_rate": "epoch_learning_rate",
                     "captions_per_second": "epoch_captions_per_second",
                     "gradient_norm": "epoch_gradient_norm"},
           "validation": {"val_loss": "epoch_loss"}}


def epoch_scalars(run: str) -> dict:
    """{(train or validation, tag): [(step, value), ...]} of the epoch scalars in `run`'s
    event files, in the order TensorBoard reads them (files by name, events in file order),
    each as often as it was logged."""
    import tensorflow as tf
    from tensorboard.util import tensor_util
    found: dict = {}
    for sub in ("train", "validation"):
        for path in sorted(glob.glob(os.path.join(run, "logs", sub, "*tfevents*"))):
            for event in tf.compat.v1.train.summary_iterator(path):
                for v in event.summary.value:
                    if v.tag.startswith("epoch_"):
                        value = float(tensor_util.make_ndarray(v.tensor))
                        found.setdefault((sub, v.tag), []).append((event.step, value))
    return found


def assert_once_as_history(run: str) -> None:
    """Every epoch of history.json has its scalars in the event files once, in step order,
    with history.json's values (as float32, what a summary holds)."""
    history = RunFolder(run).read_history()
    found = epoch_scalars(run)
    for sub, tags in TB_TAGS.items():
        for key, tag in tags.items():
            want = [(h["epoch"], float(np.float32(h[key]))) for h in history]
            assert found.get((sub, tag)) == want, (sub, tag, found.get((sub, tag)), want)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   KeyboardInterrupt()], ids=["full-disk", "second-ctrl-c"])
def test_scalars_of_an_epoch_whose_best_model_save_failed_are_written_on_resume(
        shapes_data, tmp_path, monkeypatch, error):
    """A full disk (or a second Ctrl-C, which `interrupts.held` delivers at once) while
    epoch 1's best model was saved: history.json and the checkpoint had the epoch, its
    TensorBoard scalars were never written, and the resumed run went on past it: a hole at
    epoch 1 for good. The resume writes them from history.json."""
    run = str(tmp_path / "run")
    cfg = small_config(shapes_data, epochs=2, sample_images=1)
    real = RunFolder.save_best

    def failing(self, model, epoch, monitor, value):
        raise error
    monkeypatch.setattr(RunFolder, "save_best", failing)
    with pytest.raises((train.TrainingError, KeyboardInterrupt)):
        train.train(cfg, run, progress=False, log=lambda *a: None)
    assert [h["epoch"] for h in RunFolder(run).read_history()] == [1]
    assert not epoch_scalars(run)                                   # the loss, as it was
    monkeypatch.setattr(RunFolder, "save_best", real)
    notes = []
    train.train(cfg, run, progress=False, log=notes.append)
    assert [h["epoch"] for h in RunFolder(run).read_history()] == [1, 2]
    assert_once_as_history(run)
    assert any(n.startswith("note: TensorBoard lacked the scalars of epoch(s) 1, which "
                            "history.json has") for n in notes), notes


def test_a_resume_writes_no_epoch_scalars_twice(run_copy):
    """A resume of a run whose event files are whole adds the new epoch's scalars only."""
    cfg = run_copy.load_config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                             epochs=cfg.train.epochs + 1))
    notes = []
    train.train(cfg, run_copy.path, progress=False, log=notes.append)
    assert len(run_copy.read_history()) == cfg.train.epochs
    assert_once_as_history(run_copy.path)
    assert not any("TensorBoard" in n for n in notes), notes


def drop_epoch_scalars(run: RunFolder, epoch: int) -> None:
    """The event files of `run` without epoch `epoch`'s scalars (what a stop before they were
    written left, or a resume of that before this was fixed)."""
    import tensorflow as tf
    from tensorboard.compat.proto import event_pb2

    for path in glob.glob(os.path.join(run.logs, "*", "*tfevents*")):
        kept = []
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            if event.step == epoch and any(v.tag.startswith("epoch_")
                                           for v in event.summary.value):
                continue
            kept.append(event.SerializeToString())
        with tf.io.TFRecordWriter(path) as writer:
            for record in kept:
                writer.write(record)
    assert all(epoch not in dict(points) for points in epoch_scalars(run.path).values())


def test_a_rerun_that_trains_nothing_writes_the_scalars_a_stop_lost(run_copy):
    """The last epoch's scalars lost (a kill after its best model was saved, before they were
    written): a rerun with nothing left to train (`rerun_without_data`) writes them too."""
    drop_epoch_scalars(run_copy, len(run_copy.read_history()))
    summary = train.train(run_copy.load_config(), run_copy.path, progress=False,
                          log=lambda *a: None)
    assert summary["steps_now"] == 0
    assert_once_as_history(run_copy.path)


def test_a_hole_between_logged_epochs_is_filled_in_step_order(run_copy):
    """A run resumed past an epoch whose scalars were lost (by a version that did not write
    them) has a hole between logged epochs. It is filled where TensorBoard reads it in step
    order: TensorBoard's data server drops the points of a tag from a step on when it reads
    that step again after them, so epoch 2 appended after epoch 3 removed epoch 3's points."""
    drop_epoch_scalars(run_copy, 2)
    cfg = run_copy.load_config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                             epochs=cfg.train.epochs + 1))
    train.train(cfg, run_copy.path, progress=False, log=lambda *a: None)
    assert len(run_copy.read_history()) == cfg.train.epochs
    assert_once_as_history(run_copy.path)


def hparams_sessions(run: str) -> list:
    """The HParams sessions (hyperparameter values) in `run`'s logs/, in reading order."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import metadata
    found = []
    for path in sorted(glob.glob(os.path.join(run, "logs", "*tfevents*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                if v.tag == metadata.SESSION_START_INFO_TAG:
                    found.append(dict(metadata.parse_session_start_info_plugin_data(
                        v.metadata.plugin_data.content).hparams))
    return found


def session_start(run: str):
    """The HParams session TensorBoard shows for `run` (its own event loader's reading)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.plugins.hparams import metadata
    loader = plugin_event_accumulator.EventAccumulator(os.path.join(run, "logs"))
    loader.Reload()
    content = loader.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]
    return metadata.parse_session_start_info_plugin_data(content)


def hparams_shown(run: str) -> dict:
    """The hyperparameters TensorBoard shows for `run`."""
    values = session_start(run).hparams
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in values.items()}


def test_a_resume_writes_the_hyperparameters_no_more(run_copy):
    """Every `train` of a run wrote its hyperparameters again at step 0 (TensorBoard shows
    the first and ignores the others): written once per run."""
    assert len(hparams_sessions(run_copy.path)) == 1
    cfg = run_copy.load_config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                             epochs=cfg.train.epochs + 1))
    train.train(cfg, run_copy.path, progress=False, log=lambda *a: None)
    done = cfg.train.epochs
    assert len(run_copy.read_history()) == done
    assert len(hparams_sessions(run_copy.path)) == 1
    # the one change shown: the run was extended (with cosine, that moves the curve)
    assert hparams_shown(run_copy.path)["resume_changes"] == f"epoch {done}: epochs " \
        f"{done - 1} -> {done}"


def test_a_resume_with_another_learning_rate_shows_it_and_the_change_in_hparams(run_copy):
    """A resume with another --learning-rate left TensorBoard showing the run's first one,
    without a word (the new session it wrote is ignored). Shown now: the rate the run trains
    with (config.json's), and `resume_changes` says from where and what it was."""
    cfg = run_copy.load_config()
    done = len(run_copy.read_history())
    was = cfg.train.learning_rate
    assert hparams_shown(run_copy.path)["learning_rate"] == pytest.approx(was)
    group = session_start(run_copy.path).group_name   # the trained run's, copied with it
    assert group.startswith("run-")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, epochs=done + 1, learning_rate=was / 2))
    train.train(cfg, run_copy.path, progress=False, log=lambda *a: None)
    shown = hparams_shown(run_copy.path)
    assert shown["learning_rate"] == pytest.approx(was / 2)
    assert shown["resume_changes"] == (f"epoch {done + 1}: epochs {done} -> {done + 1}, "
                                       f"learning_rate {was:g} -> {was / 2:g}")
    assert len(hparams_sessions(run_copy.path)) == 1
    own = session_start(run_copy.path).group_name     # the copy's own row now
    assert own.startswith("run-") and own != group
    assert own == callbacks._trial_id(os.path.join(run_copy.path, "logs"))
    # a rerun with nothing to train keeps the run's rate, as config.json does
    again = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, learning_rate=was))
    assert train.train(again, run_copy.path, progress=False,
                       log=lambda *a: None)["steps_now"] == 0
    assert run_copy.load_config().train.learning_rate == pytest.approx(was / 2)
    assert hparams_shown(run_copy.path) == shown


def test_hyperparameters_deleted_with_the_logs_are_written_again(run_copy):
    """`rm logs/events*` (or the whole logs/): the next `train`, even one with nothing left
    to train, writes them again, once."""
    for path in glob.glob(os.path.join(run_copy.logs, "*tfevents*")):
        os.remove(path)
    summary = train.train(run_copy.load_config(), run_copy.path, progress=False,
                          log=lambda *a: None)
    assert summary["steps_now"] == 0
    assert len(hparams_sessions(run_copy.path)) == 1
    assert hparams_shown(run_copy.path)["units"] == run_copy.load_config().model.units


def test_hparams_show_the_self_critical_rate_and_reward():
    """Runs that differ only by --scst-learning-rate looked the same in the HParams
    dashboard (its learning_rate is cross-entropy's), whose metrics had no reward."""
    from caption_attn.callbacks import _HPARAMS_METRICS
    from caption_attn.config import RunConfig
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                             scst_learning_rate=7e-6))
    assert train._hparams(cfg, 40)["scst_learning_rate"] == 7e-6
    assert ("epoch_reward", "train", "reward") in _HPARAMS_METRICS


def test_hparams_show_what_shapes_the_schedule_and_the_stop():
    """--epochs (the length of the cosine curve), --monitor, --patience and --min-delta were
    not among the HParams: runs that differ by them looked the same, and a resume that
    changed --epochs moved the learning rate curve with nothing in `resume_changes`."""
    from caption_attn.config import RunConfig
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, epochs=7, monitor="val_bleu4", patience=4, min_delta=0.01))
    shown = train._hparams(cfg, 40)
    assert (shown["epochs"], shown["monitor"], shown["patience"], shown["min_delta"]) == \
        (7, "val_bleu4", 4, 0.01)


def test_small_metric_values_are_not_printed_as_zero():
    """`best val_cider=0.0000 at epoch 2` while best.json held 1.08e-05 (a self-critical run
    from an untrained model): four decimals round a small value to zero."""
    entry = {"epoch": 2, "loss": 1.5, "val_cider": 1.08e-05, "captions_per_second": 10.0,
             "seconds": 1.0}
    assert "val_cider=1.08e-05" in train._epoch_line(entry)
    assert "loss=1.5000" in train._epoch_line(entry)
    assert train.metric_text(0.0) == "0.0000" and train.metric_text(2.33184) == "2.3318"
    assert train.metric_text(-3e-7) == "-3.00e-07"
