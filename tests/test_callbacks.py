import keras
import numpy as np
import pytest

from caption_attn.callbacks import EarlyStopping
from caption_attn.errors import UserError


def _model():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.stop_training = False
    return model


def _drive(callback, model, values, monitor="val_loss"):
    """Run a scripted metric sequence; epoch e sets the weights to e (to tell them apart)."""
    callback.set_model(model)
    callback.on_train_begin()
    epochs = 0
    for epoch, value in enumerate(values):
        model.set_weights([np.full((2, 1), float(epoch)), np.zeros(1)])
        callback.on_epoch_end(epoch, {monitor: value, "loss": 1.0})
        epochs += 1
        if model.stop_training:
            break
    callback.on_train_end()
    return epochs, float(model.get_weights()[0][0, 0])


def test_stops_after_patience_and_restores_best():
    model = _model()
    es = EarlyStopping("val_loss", patience=2)
    epochs, weight = _drive(es, model, [3.0, 2.0, 2.5, 2.6, 2.7, 1.0])
    assert epochs == 4                      # best at epoch 1, then 2 without improvement
    assert es.stopped_epoch == 3 and es.best_epoch == 1
    assert weight == 1.0                    # weights of the best epoch restored


def test_never_triggering_still_restores_best_at_the_end():
    model = _model()
    es = EarlyStopping("val_loss", patience=5)
    epochs, weight = _drive(es, model, [3.0, 1.0, 2.0])
    assert epochs == 3 and es.stopped_epoch is None
    assert weight == 1.0                    # last epoch (2) was worse than epoch 1


def test_max_mode_for_bleu_and_min_delta():
    model = _model()
    es = EarlyStopping("val_bleu4", patience=1, min_delta=0.05)
    epochs, weight = _drive(es, model, [0.1, 0.3, 0.32, 0.9], monitor="val_bleu4")
    assert es.mode == "max"
    assert epochs == 3                      # 0.32 is not > 0.3 + 0.05
    assert weight == 1.0


def test_save_and_restore_hooks_are_used():
    saved, restored = [], []
    es = EarlyStopping("val_loss", patience=1, save_best=lambda e, v: saved.append((e, v)),
                       restore_best=lambda: restored.append(True))
    _drive(es, _model(), [2.0, 1.0, 1.5])
    assert saved == [(0, 2.0), (1, 1.0)] and restored == [True]


def test_history_replay_carries_patience_over_a_resume():
    es = EarlyStopping("val_loss", patience=2, initial_history=[
        {"epoch": 1, "val_loss": 1.0}, {"epoch": 2, "val_loss": 1.5}])
    model = _model()
    es.set_model(model)
    es.on_train_begin()
    assert es.best == 1.0 and es.best_epoch == 0 and es.wait == 1
    es.on_epoch_end(2, {"val_loss": 1.2})
    assert model.stop_training                # second epoch without improvement


def test_missing_metric_names_the_ones_that_exist():
    es = EarlyStopping("val_bleu4", patience=1)
    es.set_model(_model())
    es.on_train_begin()
    with pytest.raises(UserError) as e:
        es.on_epoch_end(0, {"loss": 1.0, "val_loss": 2.0})
    assert "val_bleu4" in str(e.value) and "['loss', 'val_loss']" in str(e.value)


def test_ambiguous_mode_raises_with_the_fix():
    with pytest.raises(ValueError, match="mode='min' or mode='max'"):
        EarlyStopping("my_metric")
    with pytest.raises(ValueError, match="`mode`"):
        EarlyStopping("val_loss", mode="up")


def test_state_resets_on_train_begin():
    model = _model()
    es = EarlyStopping("val_loss", patience=1)
    _drive(es, model, [1.0, 2.0, 3.0])
    model.stop_training = False
    epochs, _ = _drive(es, model, [5.0, 4.0, 3.0])
    assert epochs == 3 and es.best == 3.0


def test_patience_zero_stops_at_the_first_epoch_without_improvement():
    es = EarlyStopping("val_loss", patience=0)
    epochs, weight = _drive(es, _model(), [3.0, 2.0, 1.0, 1.5, 0.5])
    assert epochs == 4 and es.stopped_epoch == 3 and weight == 2.0


def test_resuming_a_run_that_had_stopped_trains_no_more():
    history = [{"epoch": 1, "val_loss": 2.0}, {"epoch": 2, "val_loss": 2.5}]
    model = _model()
    es = EarlyStopping("val_loss", patience=1, initial_history=history,
                       restore_best=lambda: None)
    es.set_model(model)
    es.on_train_begin()
    assert model.stop_training and es.stopped_epoch == 1
    more = EarlyStopping("val_loss", patience=2, initial_history=history)  # more patience
    more.set_model(_model())
    more.on_train_begin()
    assert not more.model.stop_training


def test_metric_without_a_value_is_a_clear_error():
    es = EarlyStopping("val_bleu4", patience=1)
    es.set_model(_model())
    es.on_train_begin()
    with pytest.raises(UserError, match="val_bleu4"):
        es.on_epoch_end(0, {"val_bleu4": None, "loss": 1.0})


def test_monitor_that_changes_with_the_stage_starts_over_from_the_previous_epoch():
    # cross-entropy epochs 0-2 watch val_loss; self-critical epochs 3- watch val_cider
    saved = []
    stage = lambda epoch: "val_cider" if epoch >= 3 else "val_loss"  # noqa: E731
    es = EarlyStopping(stage, patience=1, save_best=lambda e, v: saved.append((e, v)),
                       restore_best=lambda: None)
    model = _model()
    es.set_model(model)
    es.on_train_begin()
    for epoch, logs in enumerate([{"val_loss": 3.0}, {"val_loss": 2.0},
                                  {"val_loss": 1.9, "val_cider": 1.0},
                                  {"val_loss": 2.9, "val_cider": 0.9},     # worse than 1.0
                                  {"val_loss": 3.1, "val_cider": 1.2}]):
        es.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    # epoch 3 had to beat epoch 2's val_cider 1.0: it did not, and patience 1 stopped it
    assert es.monitor == "val_cider" and es.mode == "max" and es.stopped_epoch == 3
    assert saved == [(0, 3.0), (1, 2.0), (2, 1.9)] and es.best == 1.0 and es.best_epoch == 2


def test_stage_change_is_replayed_the_same_after_a_resume():
    stage = lambda epoch: "val_cider" if epoch >= 2 else "val_loss"  # noqa: E731
    history = [{"epoch": 1, "val_loss": 2.0}, {"epoch": 2, "val_loss": 1.0, "val_cider": 0.5},
               {"epoch": 3, "val_loss": 1.5, "val_cider": 0.7}]
    es = EarlyStopping(stage, patience=2, initial_history=history)
    es.set_model(_model())
    es.on_train_begin()
    assert es.monitor == "val_cider" and es.best == 0.7 and es.best_epoch == 2 and es.wait == 0



def test_best_on_disk_is_a_start_of_the_stage_the_replay_or_the_next_epoch_begins():
    """best.keras of an epoch the replay leaves out (chosen by an earlier --monitor) is a
    start of the self-critical stage: from the last cross-entropy epoch's val_cider alone
    (0.4), a worse self-critical epoch replaced it (0.9 here). A best saved after it is no
    longer the model on disk, so it then starts nothing."""
    stage = lambda epoch: "val_cider" if epoch >= 3 else "val_loss"  # noqa: E731
    old = [{"epoch": e, "monitor": "val_bleu4", "val_loss": 1.0, "val_cider": c}
           for e, c in ((1, 1.5), (2, 0.3), (3, 0.4))]
    # resumed at the switch: the replay changes stage, from the better of the two
    es = EarlyStopping(stage, patience=2, initial_history=old)
    es.best_on_disk(0, {"val_cider": 1.5})
    assert not es.replay() and (es.monitor, es.best, es.best_epoch, es.wait) == \
        ("val_cider", 1.5, 0, 0)
    # resumed after a self-critical epoch that beat neither: patience counts it
    es = EarlyStopping(stage, patience=2, initial_history=old + [
        {"epoch": 4, "monitor": "val_cider", "val_loss": 1.0, "val_cider": 0.9}])
    es.best_on_disk(0, {"val_cider": 1.5})
    assert not es.replay() and (es.best, es.best_epoch, es.wait) == (1.5, 0, 1)
    # given before the epoch that changes stage; a cross-entropy epoch saved before it
    # replaces the model on disk
    for saved_before, bar in ((False, (1.5, 0)), (True, (0.6, 3))):
        saved = []
        es = EarlyStopping(stage, patience=2, initial_history=old[:2],
                           save_best=lambda e, v: saved.append(e), restore_best=lambda: None)
        es.set_model(_model())
        es.on_train_begin()
        es.best_on_disk(0, {"val_cider": 1.5})
        es.on_epoch_end(2, {"val_loss": 0.5 if saved_before else 2.0, "val_cider": 0.4})
        es.on_epoch_end(3, {"val_loss": 1.0, "val_cider": 0.6})
        assert (es.best, es.best_epoch) == bar
        assert saved == ([2, 3] if saved_before else [])
        # told afterwards of another epoch (a worker that read best.json before the chief's
        # save): ignored; with nothing saved since the replay: kept
        es.best_on_disk(1, {"val_cider": 9.0})
        assert es.disk_best_epoch is None if saved_before else es.disk_best_epoch == 1
        if saved_before:   # of the epoch saved last: kept
            es.best_on_disk(3, {"val_cider": 0.6})
            assert es.disk_best_epoch == 3


def test_a_self_critical_best_chosen_by_another_monitor_stays_the_bar():
    """Self-critical epochs 4-5 trained with --monitor val_bleu4 kept epoch 4 (val_cider
    2.5); resumed with the default monitor, the replay leaves them out and started over
    from epoch 5's val_cider (2.0): a worse epoch (2.2) replaced best.keras."""
    stage = lambda epoch: "val_cider" if epoch >= 3 else "val_loss"  # noqa: E731
    history = [{"epoch": 1, "val_loss": 1.0}, {"epoch": 2, "val_loss": 0.9},
               {"epoch": 3, "val_loss": 0.8, "val_cider": 1.0},
               {"epoch": 4, "monitor": "val_bleu4", "val_cider": 2.5, "val_bleu4": 0.3},
               {"epoch": 5, "monitor": "val_bleu4", "val_cider": 2.0, "val_bleu4": 0.2}]
    es = EarlyStopping(stage, patience=2, initial_history=history)
    es.best_on_disk(3, {"val_cider": 2.5})
    assert not es.replay() and (es.best, es.best_epoch, es.wait) == (2.5, 3, 0)


def test_a_run_resumed_with_another_monitor_starts_over_from_the_resumed_epoch():
    # A val_bleu4 run logs val_loss too: resumed with --monitor val_loss, the replay compared
    # every epoch's val_loss, stopped the run at once ("stopped early") and, given more
    # patience, asked it to beat epoch 2, whose model best.keras does not hold.
    history = [{"epoch": e, "monitor": "val_bleu4", "val_loss": v, "val_bleu4": b}
               for e, v, b in ((1, 1.0, 0.1), (2, 0.5, 0.2), (3, 0.6, 0.3), (4, 0.7, 0.4),
                               (5, 0.8, 0.5))]
    es = EarlyStopping("val_loss", patience=3, initial_history=history)
    assert not es.replay()
    assert (es.best, es.best_epoch, es.wait) == (0.8, 4, 0)
    # the same monitor: patience carries over as before
    same = EarlyStopping("val_bleu4", patience=3, initial_history=history)
    assert not same.replay() and (same.best, same.best_epoch) == (0.5, 4)
    # switched back: epochs 6-7 were val_loss's, started from epoch 5's value
    back = history + [{"epoch": 6, "monitor": "val_loss", "val_loss": 0.9, "val_bleu4": 0.4},
                      {"epoch": 7, "monitor": "val_loss", "val_loss": 0.85, "val_bleu4": 0.3}]
    es = EarlyStopping("val_loss", patience=2, initial_history=back)
    assert es.replay() and (es.best, es.best_epoch, es.wait) == (0.8, 4, 2)
    # and resumed with val_bleu4 after them: from epoch 7's val_bleu4
    es = EarlyStopping("val_bleu4", patience=2, initial_history=back)
    assert not es.replay() and (es.best, es.best_epoch, es.wait) == (0.3, 6, 0)


def test_a_stopped_run_resumed_into_another_stage_trains_it():
    """A cross-entropy run stopped early, rerun with --scst-after to fine-tune it, printed
    "nothing to train ... (stopped early before)" with exit 0: the replayed val_loss patience
    stopped the self-critical stage, whose own monitor starts over."""
    history = [{"epoch": 1, "val_loss": 2.0}, {"epoch": 2, "val_loss": 2.5}]
    stage = lambda epoch: "val_cider" if epoch >= 2 else "val_loss"  # noqa: E731
    es = EarlyStopping(stage, patience=1, initial_history=history)
    es.set_model(_model())
    es.on_train_begin()
    assert not es.model.stop_training and es.stopped_epoch is None
    es.on_epoch_end(2, {"val_loss": 2.6, "val_cider": 0.3})
    assert not es.model.stop_training and es.monitor == "val_cider" and es.best_epoch == 2
    same = EarlyStopping(lambda epoch: "val_cider" if epoch >= 3 else "val_loss", patience=1,
                         initial_history=history)          # still cross-entropy: stopped
    same.set_model(_model())
    same.on_train_begin()
    assert same.model.stop_training and same.stopped_epoch == 1


def test_patience_running_out_at_the_last_cross_entropy_epoch_goes_on_into_the_next_stage():
    """`--epochs 4 --scst-after 2 --patience 1`: the last cross-entropy epoch without
    improvement stopped the run there, the self-critical stage never trained and nothing said
    so; rerun, the replay went on into that stage. Live and replay now agree: a stage with
    its own monitor starts over; within a stage patience still stops the run."""
    stage = lambda epoch: "val_cider" if epoch >= 2 else "val_loss"  # noqa: E731
    logs = [{"val_loss": 2.0}, {"val_loss": 2.5}]
    es = EarlyStopping(stage, patience=1)
    model = _model()
    es.set_model(model)
    es.on_train_begin()
    for epoch, entry in enumerate(logs):
        es.on_epoch_end(epoch, entry)
    assert not model.stop_training and es.stopped_epoch is None
    history = [{"epoch": e + 1, **entry} for e, entry in enumerate(logs)]
    assert not EarlyStopping(stage, patience=1, initial_history=history).replay()
    es.on_epoch_end(2, {"val_loss": 2.6, "val_cider": 0.3})            # the new stage trains
    assert not model.stop_training and es.monitor == "val_cider"
    later = lambda epoch: "val_cider" if epoch >= 3 else "val_loss"  # noqa: E731
    within = EarlyStopping(later, patience=1)                          # one stage more to go
    within.set_model(_model())
    within.on_train_begin()
    for epoch, entry in enumerate(logs):
        within.on_epoch_end(epoch, entry)
    assert within.model.stop_training and within.stopped_epoch == 1


# --- TensorBoardLogger ----------------------------------------------------------------------


def _events(folder):
    import glob
    import os

    import tensorflow as tf
    out = []
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            out += [(event.step, value) for value in event.summary.value]
    return out


def test_heatmaps_reach_tensorboard_as_the_same_png(tmp_path):
    import cv2
    import tensorflow as tf

    from caption_attn.callbacks import TensorBoardLogger, png_size

    pixels = np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    png = cv2.imencode(".png", pixels)[1].tobytes()
    assert png_size(png) == (50, 30)
    tb = TensorBoardLogger(str(tmp_path), {"units": 8},
                           samples=lambda epoch: [{"image": "a/b.jpg", "caption": "x", "png": png}])
    tb.set_model(_model())
    tb.on_train_begin()
    tb.on_epoch_end(0, {"loss": 1.0, "val_loss": 2.0})
    tb.on_train_end()
    images = [(step, v) for step, v in _events(str(tmp_path / "validation"))
              if v.metadata.plugin_data.plugin_name == "images"]
    assert [(step, v.tag) for step, v in images] == [(1, "attention/a/b.jpg")]
    width, height, data = tf.make_ndarray(images[0][1].tensor)
    assert (width, height) == (b"50", b"30") and data == png  # not decoded and re-encoded
    # The same summary tf.summary.image would write (what TensorBoard's image plugin reads).
    with tf.summary.create_file_writer(str(tmp_path / "reference")).as_default(step=1):
        tf.summary.image("attention/a/b.jpg", cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)[None])
    (_, ref), = _events(str(tmp_path / "reference"))
    assert ref.tag == images[0][1].tag and ref.metadata == images[0][1].metadata
    assert tf.make_ndarray(ref.tensor)[:2].tolist() == [b"50", b"30"]


def test_logs_deleted_while_training_are_written_again(tmp_path):
    """`rm -r RUN/logs` during a run (to clear TensorBoard) lost every later epoch's
    summaries without a word: they went into the deleted event files."""
    import shutil

    from caption_attn.callbacks import TensorBoardLogger

    tb = TensorBoardLogger(str(tmp_path / "logs"), {"units": 8})
    tb.set_model(_model())
    tb.on_train_begin()
    tb.on_epoch_end(0, {"loss": 1.0, "val_loss": 2.0})
    shutil.rmtree(tmp_path / "logs")
    tb.on_epoch_end(1, {"loss": 0.5, "val_loss": 1.5})
    tb.on_train_end()
    assert [(step, v.tag) for step, v in _events(str(tmp_path / "logs" / "validation"))] == \
        [(2, "epoch_loss")]


def test_new_writers_files_are_read_after_the_files_there(tmp_path):
    """TensorFlow names an event file by its second and a count of the process's writers,
    not zero-padded: writers reopened within the second of an earlier file (after
    `log_earlier_validation`) could make a file TensorBoard reads before it (writer 11's
    before writer 9's), epochs 3-4 before epoch 2; the suite failed so once in a while."""
    import os
    import socket
    import time

    from caption_attn.callbacks import TensorBoardLogger

    tb = TensorBoardLogger(str(tmp_path), {"units": 8})
    tb.set_model(_model())
    later = int(time.time()) + 1         # an earlier file as late as a file can be now
    planted = []
    for sub in ("train", "validation"):
        os.makedirs(tmp_path / sub)
        name = (f"events.out.tfevents.{later:010d}.{socket.gethostname()}.{os.getpid()}."
                f"99999.v2")         # (read after any writer of that second, unless waited)
        (tmp_path / sub / name).write_bytes(b"")
        planted.append(name)
    tb.on_train_begin()
    tb.on_epoch_end(0, {"loss": 1.0, "val_loss": 2.0})
    tb.on_train_end()
    for sub, name in zip(("train", "validation"), planted):
        names = sorted(os.listdir(tmp_path / sub))
        assert len(names) == 2 and names[0] == name, names


def _log_epochs(log_dir, epochs, steps_per_epoch=10):
    from caption_attn.callbacks import TensorBoardLogger

    tb = TensorBoardLogger(log_dir, {"units": 8}, update_freq=5,
                           samples=lambda epoch: [{"image": "a.jpg", "caption": f"e{epoch}",
                                                   "png": _PNG}])
    tb.set_model(_model())
    tb.on_train_begin()
    for epoch in epochs:
        for step in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1):
            tb.on_train_batch_end(step, {"loss": 1.0, "global_step": step})
        tb.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1), "val_loss": 2.0})
    tb.on_train_end()


_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(8) + bytes(8)


def test_a_resume_removes_what_was_logged_after_its_checkpoint(tmp_path):
    """A run killed after its newest checkpoint (or resumed from an older one past a damaged
    one) does epochs and steps again: TensorBoard drew both the stopped process's points and
    the new ones, each curve going back and on again."""
    import glob
    import os

    import tensorflow as tf

    from caption_attn.callbacks import prune_event_files

    logs = str(tmp_path / "logs")
    _log_epochs(logs, range(4))                              # 4 epochs of 10 steps
    files = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(logs, "*", "*"))}
    assert prune_event_files(logs, 4, 40) == 0               # nothing after it: left as is
    assert {p: os.stat(p).st_mtime_ns for p in files} == files
    # resumed at epoch 2, step 23 (a checkpoint inside epoch 3)
    removed = prune_event_files(logs, 2, 23)
    train, val = (_events(os.path.join(logs, sub)) for sub in ("train", "validation"))
    assert sorted(step for step, v in train if v.tag == "batch_loss") == [5, 10, 15, 20]
    assert sorted(step for step, v in train if v.tag == "epoch_loss") == [1, 2]
    assert sorted(step for step, v in val if v.tag == "epoch_loss") == [1, 2]
    assert sorted((step, v.tag) for step, v in val if v.tag != "epoch_loss") == [
        (1, "attention/a.jpg"), (1, "captions"), (2, "attention/a.jpg"), (2, "captions")]
    assert removed == 4 + 2 + 2 * 3      # batch 25..40; epochs 3, 4: loss; val_loss, text, image
    for path in glob.glob(os.path.join(logs, "*", "events.out.tfevents.*")):
        first = next(iter(tf.compat.v1.train.summary_iterator(path)))
        assert first.file_version == "brain.Event:2"        # what TensorBoard checks first
    assert sorted(os.listdir(os.path.join(logs, "train"))) == sorted(
        os.path.basename(p) for p in files if "/train/" in p)  # no temporary file left
    # the resumed run's own points follow the kept ones
    _log_epochs(logs, [2])
    assert sorted(step for step, v in _events(os.path.join(logs, "train"))
                  if v.tag == "epoch_loss") == [1, 2, 3]


def test_pruning_reads_an_event_file_cut_short_by_a_kill(tmp_path):
    import glob
    import os

    from caption_attn.callbacks import prune_event_files

    logs = str(tmp_path / "logs")
    _log_epochs(logs, range(3))
    path, = glob.glob(os.path.join(logs, "train", "events.out.tfevents.*"))
    with open(path, "ab") as f:
        f.write(b"\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # 11 of 12 header bytes
    with open(os.path.join(logs, "train", ".pruned-events.tmp.99.host"), "wb") as f:
        f.write(b"left by a pruning killed half-way")
    assert prune_event_files(logs, 1, 10) > 0
    assert sorted(step for step, v in _events(os.path.join(logs, "train"))
                  if v.tag == "epoch_loss") == [1]
    assert os.listdir(os.path.join(logs, "train")) == [os.path.basename(path)]


def test_pruning_leaves_an_event_file_damaged_inside_as_it_is(tmp_path):
    # what follows the damage cannot be read (by TensorBoard either): a rewrite would lose it
    import glob
    import os

    from caption_attn.callbacks import prune_event_files

    logs = str(tmp_path / "logs")
    _log_epochs(logs, range(3))
    path, = glob.glob(os.path.join(logs, "validation", "events.out.tfevents.*"))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    damaged = open(path, "rb").read()
    assert prune_event_files(logs, 1, 10) > 0          # the train run's file is pruned
    assert open(path, "rb").read() == damaged


def test_a_pruning_that_cannot_write_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    # a full disk: TensorFlow's ResourceExhaustedError read as "out of memory" by train
    import errno
    import glob
    import os

    import tensorflow as tf

    from caption_attn.callbacks import prune_event_files

    logs = str(tmp_path / "logs")
    _log_epochs(logs, range(3))
    before = {p: open(p, "rb").read() for p in glob.glob(os.path.join(logs, "*", "*"))}

    class FullDisk:
        def __init__(self, path):
            open(path, "wb").close()

        def __enter__(self):
            raise tf.errors.ResourceExhaustedError(None, None, "... No space left on device")

        def __exit__(self, *exc):
            return False
    monkeypatch.setattr(tf.io, "TFRecordWriter", FullDisk)
    with pytest.raises(OSError) as e:
        prune_event_files(logs, 1, 10)
    assert e.value.errno == errno.ENOSPC and "tfevents" in e.value.filename
    assert {p: open(p, "rb").read() for p in glob.glob(os.path.join(logs, "*", "*"))} == before
    assert not [n for n in os.listdir(os.path.join(logs, "train")) if n.startswith(".")]


def test_png_size_rejects_other_bytes():
    from caption_attn.callbacks import png_size

    with pytest.raises(ValueError, match="`png`"):
        png_size(b"GIF89a" + bytes(30))


def test_heatmaps_drawn_in_the_background_are_written_in_order_once_ready(tmp_path):
    import concurrent.futures
    import os
    import threading

    import cv2
    import tensorflow as tf

    from caption_attn.callbacks import AttentionSnapshots, TensorBoardLogger

    png = cv2.imencode(".png", np.zeros((4, 6, 3), np.uint8))[1].tobytes()
    gates = {0: threading.Event(), 1: threading.Event()}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    futures = {e: pool.submit(lambda e=e: gates[e].wait() and [
        {"image": f"img{e}.png", "caption": "x", "png": png}]) for e in gates}
    samples = futures.__getitem__
    tb = TensorBoardLogger(str(tmp_path / "logs"), {"units": 8}, samples=samples)
    files = AttentionSnapshots(str(tmp_path / "attention"), samples)
    for cb in (tb, files):
        cb.set_model(_model())
        cb.on_train_begin()
        cb.on_epoch_end(0, {"loss": 1.0})        # epoch 0 still drawing: nothing written yet
    assert not os.path.exists(tmp_path / "attention")
    gates[0].set()
    futures[0].result()
    for cb in (tb, files):
        cb.on_epoch_end(1, {"loss": 1.0})        # epoch 0 is drawn now, epoch 1 is not
    assert os.listdir(tmp_path / "attention") == ["epoch_1"]
    gates[1].set()
    for cb in (tb, files):
        cb.on_train_end()                         # waits for epoch 1
    assert sorted(os.listdir(tmp_path / "attention")) == ["epoch_1", "epoch_2"]
    images = [(step, v.tag) for step, v in _events(str(tmp_path / "logs" / "validation"))
              if v.metadata.plugin_data.plugin_name == "images"]
    assert images == [(1, "attention/img0.png"), (2, "attention/img1.png")]
    assert tf.io.gfile.exists(str(tmp_path / "attention" / "epoch_2" / "img1.png"))
    pool.shutdown()


def test_sample_table_shows_names_and_captions_as_they_are(tmp_path):
    """TensorBoard renders the sample table as markdown: an image name with `|` cut its row
    (the caption went to a column not shown), `*a*` / `[a](b)` / `<b>` became formatting."""
    import html as html_module

    import tensorflow as tf
    from tensorboard.plugin_util import markdown_to_safe_html

    from caption_attn.callbacks import TensorBoardLogger

    png = b"\x89PNG\r\n\x1a\n" + bytes(4) + b"IHDR" + bytes(8)
    names = ["a|b.jpg", "*x* [1](2) <b>&amp;_c_ #~!-+.`{}\\.png"]
    samples = lambda epoch: [{"image": n, "caption": "a <unk> dog", "png": png}  # noqa: E731
                             for n in names]
    tb = TensorBoardLogger(str(tmp_path), {"units": 8}, samples=samples)
    tb.set_model(_model())
    tb.on_train_begin()
    tb._png_summary = lambda tag, png: None
    tb.on_epoch_end(0, {"loss": 1.0})
    tb.on_train_end()
    text, = [tf.make_ndarray(v.tensor).item().decode() for _, v in
             _events(str(tmp_path / "validation")) if v.tag == "captions"]
    html = markdown_to_safe_html(text)
    rows = html.split("<tr>")[2:]
    cells = [[html_module.unescape(c.split("</td>")[0]) for c in r.split("<td>")[1:]]
             for r in rows]
    assert cells == [[n, "a <unk> dog"] for n in names]


def test_heatmaps_of_images_with_the_same_stem_are_both_kept(tmp_path):
    """cat.jpg and cat.png sampled together: both were saved as cat.png, one overwriting
    the other."""
    import os

    from caption_attn.callbacks import AttentionSnapshots

    samples = lambda epoch: [{"image": k, "caption": "x", "png": k.encode()}  # noqa: E731
                             for k in ("cat.jpg", "cat.png", "sub/dog.jpg")]
    files = AttentionSnapshots(str(tmp_path), samples)
    files.on_train_begin()
    files.on_epoch_end(0, {})
    files.on_train_end()
    folder = tmp_path / "epoch_1"
    assert sorted(os.listdir(folder)) == ["cat.jpg.png", "cat.png.png", "sub__dog.png"]
    assert (folder / "cat.jpg.png").read_bytes() == b"cat.jpg"
    # names that still meet after / becomes __ (or after the extension is kept)
    from caption_attn.callbacks import heatmap_names
    assert heatmap_names(["a/b.jpg", "a__b.jpg"]) == ["a__b.jpg.png", "a__b.jpg-2.png"]
    assert heatmap_names(["cat.jpg", "cat.png", "cat.jpg.png"]) == [
        "cat.jpg.png", "cat.png.png", "cat.jpg-2.png"]


def test_a_sample_image_that_cannot_be_read_is_reported_once(tmp_path):
    """A sample image deleted while training: its heatmaps were drawn on a gray square
    without a word."""
    import cv2

    from caption_attn.validation import SampleFigures

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    notes = []
    figures = SampleFigures(None, str(tmp_path), log=notes.append)
    assert figures._image("a.png").shape[:2] == (8, 8) and not notes   # as it is
    (tmp_path / "a.png").unlink()
    gray = figures._image("a.png")
    assert (gray == 128).all()
    figures._image("a.png")                       # the next epoch: not said again
    assert len(notes) == 1 and "a.png" in notes[0] and "missing" in notes[0], notes
    (tmp_path / "a.png").write_bytes(b"")         # now another reason: said
    figures._image("a.png")
    assert len(notes) == 2 and "empty file" in notes[1]


def test_sample_heatmaps_show_each_image_in_its_own_proportions(tmp_path):
    """The epoch heatmaps (TensorBoard and attention/epoch_K) drew each sample image squeezed
    to 299x299; now in its own proportions, a big photo shrunk to that size's longest side."""
    import cv2

    from caption_attn import captioner
    from caption_attn.validation import SampleFigures, _draw, Sample

    cv2.imwrite(str(tmp_path / "wide.png"), np.zeros((360, 640, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "tall.png"), np.zeros((1200, 400, 3), np.uint8))
    figures = SampleFigures(None, str(tmp_path))
    assert figures._image("wide.png").shape == (168, 299, 3)
    assert figures._image("tall.png").shape == (299, 100, 3)
    caption = captioner.Caption(["a", "b"], -1.0, np.full((3, 64), 1 / 64, np.float32))
    (drawn,) = _draw([(Sample("wide.png", caption), figures._image("wide.png"))])
    png = cv2.imdecode(np.frombuffer(drawn["png"], np.uint8), cv2.IMREAD_COLOR)
    assert png.shape[0] < png.shape[1] / 2     # one row of two 16:9 panels, not of squares


def test_an_epoch_written_again_keeps_no_heatmaps_of_the_earlier_one(tmp_path):
    """An epoch trained again (resumed from an older checkpoint) with fewer --sample-images:
    the heatmaps of the images no longer sampled stayed, of the model trained before."""
    import os

    from caption_attn.callbacks import AttentionSnapshots

    for keys in (["a.jpg", "b.jpg"], ["a.jpg"]):
        samples = lambda epoch, keys=keys: [  # noqa: E731
            {"image": k, "caption": "x", "png": k.encode()} for k in keys]
        files = AttentionSnapshots(str(tmp_path), samples)
        files.on_train_begin()
        files.on_epoch_end(0, {})
        files.on_train_end()
    assert os.listdir(tmp_path / "epoch_1") == ["a.png"]


def test_hparams_a_run_wrote_at_each_start_are_rewritten_once_changed(tmp_path):
    """A run's logs/ as earlier versions left them, the hyperparameters written again by each
    `train` (TensorBoard shows the first it reads and ignores the rest: the second
    learning rate was never shown). A change rewrites the first, keeping the run's start
    time and saying what changed; the same values again write nothing."""
    import glob
    import os
    import time

    import tensorflow as tf
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.plugins.hparams import api as hp
    from tensorboard.plugins.hparams import metadata

    from caption_attn.callbacks import log_hparams

    logs = str(tmp_path / "run" / "logs")
    for rate in (0.01, 0.005):
        writer = tf.summary.create_file_writer(logs)
        with writer.as_default():
            hp.hparams_config(hparams=[hp.HParam("learning_rate"), hp.HParam("units")],
                              metrics=[hp.Metric("epoch_loss")])
            hp.hparams({"learning_rate": rate, "units": 8}, trial_id="run",
                       start_time_secs=1000.0 + rate)
        writer.close()
        time.sleep(1.01)   # event files are named by the second

    def shown():
        loader = plugin_event_accumulator.EventAccumulator(logs)
        loader.Reload()
        info = metadata.parse_session_start_info_plugin_data(
            loader.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG])
        return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}, \
            info.start_time_secs

    assert shown() == ({"learning_rate": 0.01, "units": 8}, 1000.01)
    files = sorted(glob.glob(os.path.join(logs, "*tfevents*")))
    assert log_hparams(logs, {"learning_rate": 0.0025, "units": 8}, "before epoch 4") == \
        "before epoch 4: learning_rate 0.01 -> 0.0025"
    assert sorted(glob.glob(os.path.join(logs, "*tfevents*"))) == files   # rewritten in place
    assert shown() == ({"learning_rate": 0.0025, "units": 8, "resume_changes":
                        "before epoch 4: learning_rate 0.01 -> 0.0025"}, 1000.01)
    assert log_hparams(logs, {"learning_rate": 0.0025, "units": 8}, "epoch 6") is None
    assert log_hparams(logs, {"learning_rate": 0.0025, "units": 16}, "epoch 6") == \
        "epoch 6: units 8 -> 16"
    assert shown()[0]["resume_changes"] == ("before epoch 4: learning_rate 0.01 -> 0.0025; "
                                            "epoch 6: units 8 -> 16")


def _session_starts(logs):
    """The HParams session start infos in the event files of `logs`."""
    from tensorboard.plugins.hparams import metadata
    return [metadata.parse_session_start_info_plugin_data(v.metadata.plugin_data.content)
            for _, v in _events(logs) if v.tag == metadata.SESSION_START_INFO_TAG]


def test_runs_in_folders_of_one_name_are_not_one_hparams_group(tmp_path):
    """Every demo's run folder is `models/shapes`: with the folder's name as trial id, two
    demos under one `tensorboard --logdir` were one session group, which TensorBoard shows
    as one row (the first's hyperparameters, both runs' metrics averaged). Each run has a
    group of its own, which stays when a resume rewrites its hyperparameters; a run copied
    or moved to another folder gets the group of that folder (a copy, e.g. to try another
    learning rate, was its original's row)."""
    import os

    from caption_attn.callbacks import log_hparams

    a, b = (str(tmp_path / work / "models" / "shapes" / "logs") for work in ("a", "b"))
    assert log_hparams(a, {"learning_rate": 0.002, "units": 8}, "epoch 1") == ""
    assert log_hparams(b, {"learning_rate": 0.001, "units": 8}, "epoch 1") == ""
    (start_a,), (start_b,) = _session_starts(a), _session_starts(b)
    assert start_a.group_name != start_b.group_name
    assert start_a.group_name.startswith("shapes-") and start_b.group_name.startswith("shapes-")
    assert log_hparams(b, {"learning_rate": 0.0005, "units": 8}, "epoch 3") == \
        "epoch 3: learning_rate 0.001 -> 0.0005"
    (again,) = _session_starts(b)
    assert (again.group_name, again.hparams["learning_rate"].number_value) == \
        (start_b.group_name, 0.0005)
    os.rename(tmp_path / "a", tmp_path / "moved")
    moved = str(tmp_path / "moved" / "models" / "shapes" / "logs")
    assert log_hparams(moved, {"learning_rate": 0.004, "units": 8}, "epoch 2") == \
        "epoch 2: learning_rate 0.002 -> 0.004"
    (again,) = _session_starts(moved)
    assert again.group_name.startswith("shapes-") and again.group_name != start_a.group_name
    assert again.start_time_secs == start_a.start_time_secs


def test_hparams_grouped_by_the_folder_name_alone_get_a_group_of_their_own(tmp_path):
    """A run logged by an earlier version (trial id: its folder's name) shared its row with
    every run of that name: its next `train` gives it its own group, values, changes and
    start time kept, and then writes nothing more."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    from caption_attn.callbacks import log_hparams

    logs = str(tmp_path / "shapes" / "logs")
    values = {"learning_rate": 0.01, "resume_changes": "epoch 2: learning_rate 0.02 -> 0.01"}
    writer = tf.summary.create_file_writer(logs)
    with writer.as_default():
        hp.hparams(values, trial_id="shapes", start_time_secs=1000.0)
    writer.close()
    assert log_hparams(logs, {"learning_rate": 0.01}, "epoch 4") == ""
    (start,) = _session_starts(logs)
    assert start.group_name.startswith("shapes-") and start.start_time_secs == 1000.0
    assert {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()} == values
    assert log_hparams(logs, {"learning_rate": 0.01}, "epoch 4") is None


def test_replay_compares_each_epoch_by_the_min_delta_it_was_trained_with():
    """Replayed with the resuming call's --min-delta, a run whose --min-delta 10 kept epoch 1
    took epoch 2 (better by less than 10) for its best: best.keras was replaced as a lost
    save. Each entry is replayed by its own min_delta (else the run's recorded one); the
    new --min-delta compares the epochs to come."""
    history = [{"epoch": 1, "val_loss": 2.0, "min_delta": 10.0},
               {"epoch": 2, "val_loss": 1.5, "min_delta": 10.0}]
    early = EarlyStopping("val_loss", patience=5, min_delta=0.0, initial_history=history)
    early.replay()
    assert (early.best_epoch, early.best, early.wait) == (0, 2.0, 1)
    older = [{k: v for k, v in h.items() if k != "min_delta"} for h in history]
    early = EarlyStopping("val_loss", patience=5, min_delta=0.0, initial_history=older,
                          replay_min_delta=10.0)
    early.replay()
    assert early.best_epoch == 0
    early = EarlyStopping("val_loss", patience=5, min_delta=0.0, initial_history=older)
    early.replay()
    assert early.best_epoch == 1                     # no record of another: this call's
    saved = []
    early = EarlyStopping("val_loss", patience=5, min_delta=0.0, initial_history=history,
                          save_best=lambda epoch, value: saved.append((epoch, value)))
    early.set_model(_model())
    early.on_train_begin()
    early.on_epoch_end(2, {"val_loss": 1.9})         # the epochs to come: by --min-delta 0
    assert saved == [(2, 1.9)]
