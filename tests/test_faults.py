"""Off the happy path: damaged checkpoints and best models, moved files, outputs that cannot
be written, failed commands that must leave a run folder as it was."""

import dataclasses
import glob
import json
import os
import shutil

import pytest
from conftest import give_other_images

from caption_attn import backbone, train
from caption_attn.cli import main
from caption_attn.config import RunConfig
from caption_attn.errors import UserError
from test_train import small_config


def _config(shapes_data, cache=None, **options) -> RunConfig:
    return small_config(shapes_data, cache, **{"epochs": 2, "sample_images": 1, **options})


@pytest.fixture
def run_copy(trained_run, tmp_path):
    target = str(tmp_path / "run")
    shutil.copytree(trained_run, target)
    return target


def _checkpoint_steps(folder):
    """The steps of the checkpoints in `folder` (each one's `ckpt-STEP.index`), in order."""
    return sorted(int(p.rsplit("-", 1)[1].split(".")[0]) for p in
                  glob.glob(os.path.join(folder, "ckpt-*.index")))


def _files(folder):
    return {os.path.relpath(p, folder): os.path.getmtime(p)
            for p in glob.glob(os.path.join(folder, "**"), recursive=True) if os.path.isfile(p)}


def test_damaged_newest_checkpoint_falls_back_to_an_intact_one(shapes_data, tmp_path, caplog):
    run = str(tmp_path / "run")
    quiet = dict(progress=False, log=lambda *a: None)
    train.train(_config(shapes_data, epochs=1, checkpoint_every=3), run, **quiet)
    steps = _checkpoint_steps(os.path.join(run, "checkpoints"))
    assert len(steps) >= 2
    newest = glob.glob(os.path.join(run, "checkpoints", f"ckpt-{steps[-1]}.data-*"))[0]
    with open(newest, "r+b") as f:                        # a copy that stopped half-way
        f.truncate(os.path.getsize(newest) // 3)
    notes = []
    summary = train.train(_config(shapes_data, epochs=2, checkpoint_every=3), run,
                          progress=False, log=notes.append)
    # TensorFlow's notice that update_checkpoint_state is deprecated: noise from our own call
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    skipped = [n for n in notes if "skipped the damaged checkpoint" in n]
    assert skipped and f"ckpt-{steps[-1]}" in skipped[0] and f"ckpt-{steps[-2]}" in skipped[0]
    assert summary["epochs"] == 2
    assert glob.glob(os.path.join(run, "checkpoints", f"damaged-ckpt-{steps[-1]}.*"))
    # epoch 1 was trained again from inside it: TensorBoard shows each epoch once
    forgot = [n for n in notes if "removed" in n]
    assert len(forgot) == 1 and f"goes on from epoch 0, step {steps[-2]}" in forgot[0]
    assert "the heatmaps of epoch(s) 1 " in forgot[0]
    for sub in ("train", "validation"):
        assert _steps(os.path.join(run, "logs", sub), "epoch_loss") == [1, 2]


def test_a_fallback_inside_the_best_epoch_keeps_its_best_model(shapes_data, tmp_path):
    """The newest checkpoint, the end of epoch 2 (whose model is best.keras), damaged: the
    resume goes on from a checkpoint inside epoch 2. It saved those weights, never
    validated, over best.keras as epoch 1's best model, without a word; and the retrained
    epoch 2 was compared with epoch 1 only, so a worse one replaced best.keras too. The
    best model stays, and is the one to beat, with a note."""
    from caption_attn.run import RunFolder
    run = str(tmp_path / "run")
    folder = RunFolder(run)
    train.train(_config(shapes_data, checkpoint_every=3), run, progress=False,
                log=lambda *a: None)
    before = folder.best_record()
    assert before["epoch"] == 2, before        # val_loss fell: epoch 2's model is the best
    length = json.load(open(folder.history))[0]["steps"]
    steps = _checkpoint_steps(os.path.join(run, "checkpoints"))
    assert steps[-1] == 2 * length and length < steps[-2] < 2 * length, (steps, length)
    newest = glob.glob(os.path.join(run, "checkpoints", f"ckpt-{steps[-1]}.data-*"))[0]
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 3)
    model = open(folder.best_model, "rb").read()
    notes = []
    train.train(_config(shapes_data, checkpoint_every=3, max_steps=steps[-2]), run,
                progress=False, log=notes.append)              # restores, trains nothing
    assert open(folder.best_model, "rb").read() == model and folder.best_record() == before
    said = [n for n in notes if "is the best model of epoch 2" in n]
    assert len(said) == 1 and said[0].endswith(
        f"run goes on from (epoch 1, step {steps[-2]}) by the process that stopped: epoch 2 "
        f"is trained again, and it stays the best model until an epoch beats it"), notes
    notes.clear()
    train.train(_config(shapes_data, checkpoint_every=3), run, progress=False,
                log=notes.append)
    after = folder.best_record()
    assert after == before or (after["epoch"] == 2 and after["value"] < before["value"])
    assert after["value"] <= min(h["val_loss"] for h in json.load(open(folder.history)))


def test_a_kept_best_model_stays_the_one_to_beat_at_a_later_resume(tmp_path):
    """After such a fallback the retrained epoch 2 (val_loss 0.9) took its own entry in
    history.json, while best.keras stayed the earlier epoch 2's model (0.8). A later resume
    replayed history.json alone: an epoch of 0.85 replaced the better model."""
    from caption_attn.config import TrainConfig
    from caption_attn.run import RunFolder
    run = RunFolder(str(tmp_path / "run"))
    os.makedirs(run.path)
    history = [{"epoch": e, "val_loss": v, "monitor": "val_loss", "min_delta": 0.0}
               for e, v in ((1, 1.0), (2, 0.9))]
    with open(run.best_info, "w") as f:
        json.dump({"epoch": 2, "monitor": "val_loss", "value": 0.8}, f)
    open(run.best_model, "wb").close()
    saved = []
    tc = TrainConfig(epochs=5)
    early = train.replayed_early_stopping(run, tc, history,
                                          save_best=lambda *a: saved.append(a))
    early.replay()
    assert train.keep_better_best_model(run, tc, early, 2, 40, history) == (
        f"{run.best_model} is the best model of epoch 2 (val_loss=0.8000), better than every "
        f"epoch in {run.history}, whose epoch 2 is of the model trained again after the run "
        f"went back to an older checkpoint: it stays the best model until an epoch beats it")
    assert early.wait == 0
    early.on_epoch_end(2, {"val_loss": 0.85})      # Keras' hooks, 0-based epochs
    early.on_epoch_end(3, {"val_loss": 0.7})
    assert saved == [(3, 0.7)]
    # epoch 2's entry the best model's own: no news (nor when a resume with another
    # --monitor came between: the entry holds the value best.json does)
    same = history[:1] + [{**history[1], "val_loss": 0.8}]
    early = train.replayed_early_stopping(run, tc, same)
    early.replay()
    assert train.keep_better_best_model(run, tc, early, 2, 40, same) is None
    # val_cider's values change with the document frequencies: no retraining to tell
    with open(run.best_info, "w") as f:
        json.dump({"epoch": 2, "monitor": "val_cider", "value": 2.0}, f)
    cider = [{**h, "monitor": "val_cider", "val_cider": c} for h, c in zip(history, (1, 1.5))]
    tc = TrainConfig(epochs=5, monitor="val_cider")
    early = train.replayed_early_stopping(run, tc, cider)
    early.replay()
    assert train.keep_better_best_model(run, tc, early, 2, 40, cider) is None
    assert (early.best, early.best_epoch) == (1.5, 1)


def test_the_resume_checks_read_the_checkpoint_that_restores(shapes_data, tmp_path):
    """The newest checkpoint (the end of epoch 1) with bytes flipped in a model value, its
    counters whole: the resume's checks read "epoch 1 finished" from it, while the restore
    fell back to a checkpoint inside epoch 1, so another --batch-size went on there, its
    epoch cut into other batches (some captions twice, others never), without a word."""
    from caption_attn import checkpoints
    run = str(tmp_path / "run")
    train.train(_config(shapes_data, epochs=1, checkpoint_every=3), run, progress=False,
                log=lambda *a: None)
    folder = os.path.join(run, "checkpoints")
    steps = _checkpoint_steps(folder)
    newest = glob.glob(os.path.join(folder, f"ckpt-{steps[-1]}.data-*"))[0]
    with open(newest, "r+b") as f:                   # a bad sector: same size, other bytes
        f.seek(os.path.getsize(newest) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert checkpoints.newest_whole(folder).endswith(f"ckpt-{steps[-2]}")
    assert checkpoints.position(folder) == (0, steps[-2])
    with pytest.raises(UserError, match=rf"stopped in epoch 1 at step {steps[-2]}, and "
                                        rf"resuming it with --batch-size 8 \(was 16\)"):
        train.train(_config(shapes_data, epochs=2, checkpoint_every=3, batch_size=8), run,
                    progress=False, log=lambda *a: None)


def test_a_checkpoint_cut_to_a_few_bytes_is_skipped_when_reading_the_position(tmp_path):
    """The position of a resume (finished epochs, steps into the next) is read from the
    newest checkpoint before anything is built: a data file cut short (a copy or a disk that
    stopped) raised `IndexError: Read less bytes than requested` there, a
    traceback from `train` instead of the note that skips the damaged checkpoint."""
    import tensorflow as tf

    from caption_attn import checkpoints
    folder = str(tmp_path / "checkpoints")
    epoch, step, step_in_epoch = (tf.Variable(0, dtype=tf.int64) for _ in range(3))
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(epoch=epoch, step=step, step_in_epoch=step_in_epoch), folder, 3)
    for e, s in ((1, 10), (2, 20)):
        epoch.assign(e), step.assign(s)
        manager.save(checkpoint_number=s)
    data = glob.glob(os.path.join(folder, "ckpt-20.data-*"))[0]
    with open(data, "r+b") as f:
        f.truncate(8)                                  # the counters' values cut off
    assert checkpoints.position(folder) == (1, 0)      # ckpt-10's, not a traceback
    assert checkpoints.steps_taken(folder) == 10


def test_checkpoints_of_other_model_sizes_name_the_cause_without_warnings(tmp_path, capfd):
    """Checkpoints whose shapes are not the model's (config.json's sizes edited, or copied
    from another run) were blamed on "an older caption_attn", followed by six TensorFlow
    warnings about unrestored values at exit."""
    import gc

    import tensorflow as tf

    from caption_attn import checkpoints
    folder = str(tmp_path / "checkpoints")
    tf.train.CheckpointManager(tf.train.Checkpoint(w=tf.Variable(tf.zeros([3, 2])),
                                                   n=tf.Variable(1)), folder, 3).save(5)
    other = tf.train.Checkpoint(w=tf.Variable(tf.zeros([4, 2])), n=tf.Variable(1))
    with pytest.raises(UserError) as e:
        checkpoints.restore_newest_intact(other, folder)
    text = str(e.value)
    assert "ckpt-5: ValueError: Received incompatible tensor with shape (3, 2)" in text
    assert "their shapes differ from the model config.json describes: its model sizes" \
        in text and "--fresh" in text
    assert "older caption_attn" not in text
    del other, e
    gc.collect()
    assert "unrestored values" not in capfd.readouterr().err


def test_a_newest_checkpoint_without_its_index_is_named_when_skipped(tmp_path):
    """A newest checkpoint whose `.index` was deleted is not listed: the run resumed from the
    one before with only a note that blamed "the process that stopped" for what was lost.
    The skipped checkpoint is named with why, set aside like a damaged one, and the state
    file no longer names it."""
    import tensorflow as tf

    from caption_attn import checkpoints
    folder = str(tmp_path / "checkpoints")
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(step=step), folder, 3)
    for s in (10, 20):
        step.assign(s)
        manager.save(checkpoint_number=s)
    os.remove(os.path.join(folder, "ckpt-20.index"))
    notes = []
    restored = checkpoints.restore_newest_intact(tf.train.Checkpoint(step=step), folder,
                                                 log=notes.append)
    assert restored.endswith("ckpt-10") and int(step.numpy()) == 10
    assert len(notes) == 1 and "skipped the checkpoint ckpt-20" in notes[0], notes
    assert "ckpt-20.index is missing" in notes[0] and "resuming from ckpt-10" in notes[0]
    assert glob.glob(os.path.join(folder, "damaged-ckpt-20.data-*"))
    assert not glob.glob(os.path.join(folder, "ckpt-20.*"))
    assert tf.train.get_checkpoint_state(folder).model_checkpoint_path.endswith("ckpt-10")


def _on_disk(folder):
    """The steps of the checkpoints in `folder`, by their files (an .index or data files)."""
    import re
    return sorted({int(m.group(1)) for name in os.listdir(folder)
                   for m in [re.match(r"ckpt-(\d+)\.(index|data-\d{5}-of-\d{5})$", name)] if m})


@pytest.mark.parametrize("cause", ["killed before the state file", "state file deleted",
                                   "damaged newest"])
def test_a_resume_keeps_only_the_newest_checkpoints(tmp_path, cause):
    """`tf.train.CheckpointManager` deletes only the checkpoints its state file (`checkpoint`)
    lists with their times: a process killed after writing ckpt-N but before the state file,
    a deleted state file, or the state file rewritten (without times) after a damaged
    checkpoint was set aside, left checkpoints on disk for good, silently (hundreds of MB
    each at COCO size). A resume keeps the newest `KEEP` and goes on from the newest intact
    one; files that are not checkpoints are left alone."""
    import tensorflow as tf

    from caption_attn import checkpoints
    folder = str(tmp_path / "checkpoints")
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(step=step), folder,
                                         checkpoints.KEEP)
    for s in (10, 20, 30):
        step.assign(s)
        manager.save(checkpoint_number=s)
    if cause == "killed before the state file":      # ckpt-40 written, `checkpoint` not
        state = open(os.path.join(folder, "checkpoint")).read()
        first = {p: open(p, "rb").read() for p in glob.glob(os.path.join(folder, "ckpt-10.*"))}
        step.assign(40)
        manager.save(checkpoint_number=40)               # (which deleted ckpt-10)
        for path, data in first.items():
            open(path, "wb").write(data)
        open(os.path.join(folder, "checkpoint"), "w").write(state)
    elif cause == "state file deleted":
        os.remove(os.path.join(folder, "checkpoint"))
    else:
        data = glob.glob(os.path.join(folder, "ckpt-30.data-*"))[0]
        with open(data, "r+b") as f:
            f.truncate(4)
    others = ["notes.txt", "ckpt-5.index.bak", "my-ckpt-1.index", "ckpt-5.data-x"]
    for name in others:
        open(os.path.join(folder, name), "w").close()
    newest = {"killed before the state file": 40, "state file deleted": 30}.get(cause, 20)
    notes = []
    restored = tf.train.Checkpoint(step=step)            # as `Trainer._build_state`
    # a rerun with nothing to train loads the data (and the Trainer deletes them) then
    assert checkpoints.restores_as_it_is(restored, folder) is None
    assert checkpoints.restore_newest_intact(restored, folder, log=notes.append).endswith(
        f"ckpt-{newest}") and int(step.numpy()) == newest
    kept = [s for s in (10, 20, 30, 40) if s <= newest][-checkpoints.KEEP:]
    assert _on_disk(folder) == kept, notes
    assert checkpoints.restores_as_it_is(restored, folder).endswith(f"ckpt-{newest}")
    manager = tf.train.CheckpointManager(restored, folder, max_to_keep=checkpoints.KEEP)
    for s in (50, 60):
        step.assign(s)
        manager.save(checkpoint_number=s)
    assert _on_disk(folder) == [kept[-1], 50, 60]
    for name in others:
        assert os.path.exists(os.path.join(folder, name))
    if cause == "damaged newest":                        # set aside as before
        assert glob.glob(os.path.join(folder, "damaged-ckpt-30.*"))


def _leave_save_leftovers(folder):
    """What a process killed inside `tf.train.CheckpointManager.save` leaves in `folder` (seen
    with kill -9 at several moments of saving a 240 MB variable with TF 2.21): the
    `ckpt-N_temp/` folder TensorFlow writes a checkpoint's shards into before it merges them
    into ckpt-N.*: a shard still being written (`.tempstate` and a random number), written
    shards (`part-...`), or nothing (killed after the merge, before the folder went)."""
    shards = {"ckpt-30_temp": ["part-00000-of-00001.data-00000-of-00001.tempstate"
                               "13085049617881902330"],
              "ckpt-40_temp": ["part-00000-of-00001.data-00000-of-00001",
                               "part-00000-of-00001.index",
                               "part-00000-of-00001.index.tempstate9611313132219485145"],
              "ckpt-50_temp": []}
    for name, files in shards.items():
        os.makedirs(os.path.join(folder, name))
        for file in files:
            with open(os.path.join(folder, name, file), "wb") as f:
                f.write(b"x" * 250_000)
    return sorted(shards)


def test_a_resume_deletes_the_shards_of_a_save_that_was_killed(tmp_path):
    """A kill -9 while TensorFlow saved a checkpoint left its `ckpt-N_temp/` folder of shards
    for good (hundreds of MB at COCO size). The resume of the process owning the folder
    deletes them and says what; anything that is not certainly TensorFlow's temporary output
    for the prefix `ckpt` is left alone: other files (those in a `ckpt-N_temp/` too, which
    then stays), other names, a file or a link of that name."""
    import tensorflow as tf

    from caption_attn import checkpoints
    folder = str(tmp_path / "checkpoints")
    step = tf.Variable(0, dtype=tf.int64)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(step=step), folder,
                                         checkpoints.KEEP)
    for s in (10, 20):
        step.assign(s)
        manager.save(checkpoint_number=s)
    leftovers = _leave_save_leftovers(folder)
    elsewhere = str(tmp_path / "elsewhere")
    os.makedirs(elsewhere)
    open(os.path.join(elsewhere, "part-00000-of-00001.index"), "w").close()
    os.symlink(elsewhere, os.path.join(folder, "ckpt-60_temp"))
    others = ["ckpt-70_temp/notes.txt", "ckpt-70_temp/part-00000-of-00001.index.bak",
              "ckpt-x_temp/part-00000-of-00001.index", "my-ckpt-3_temp/part-00000-of-00001.index",
              "ckpt-80_tmp/part-00000-of-00001.index", "ckpt-90_temp"]
    for name in others:
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        open(os.path.join(folder, name), "w").close()
    open(os.path.join(folder, "ckpt-70_temp", "part-00000-of-00001.index"), "w").close()
    notes = []
    restored = tf.train.Checkpoint(step=step)
    assert checkpoints.restore_newest_intact(restored, folder, log=notes.append,
                                             set_aside=False).endswith("ckpt-20")
    assert all(os.path.isdir(os.path.join(folder, name)) for name in leftovers), \
        "a process that does not own the folder deletes nothing"
    assert checkpoints.restore_newest_intact(restored, folder, log=notes.append).endswith(
        "ckpt-20") and int(step.numpy()) == 20
    assert not any(os.path.lexists(os.path.join(folder, name)) for name in leftovers)
    deleted = [n for n in notes if "ckpt-30_temp" in n]
    assert len(deleted) == 1 and all(name in deleted[0] for name in leftovers), notes
    assert "left behind by a save that was killed or failed" in deleted[0], deleted
    assert "1.0 MB" in deleted[0], deleted
    assert not os.path.exists(os.path.join(folder, "ckpt-70_temp", "part-00000-of-00001.index"))
    for name in others:
        assert os.path.exists(os.path.join(folder, name)), name
    assert os.path.exists(os.path.join(elsewhere, "part-00000-of-00001.index"))
    assert os.path.islink(os.path.join(folder, "ckpt-60_temp"))
    kept = [n for n in notes if "ckpt-70_temp" in n and "left" in n]
    assert len(kept) == 1 and "notes.txt" in kept[0], notes
    assert _on_disk(folder) == [10, 20]


def test_the_shards_of_a_first_save_that_was_killed_are_deleted(tmp_path):
    """Killed inside the first save, the run has no checkpoint to resume from, only the
    shards of ckpt-N_temp/: deleted too when training starts again."""
    import tensorflow as tf

    from caption_attn import checkpoints
    folder = str(tmp_path / "checkpoints")
    leftovers = _leave_save_leftovers(folder)
    notes = []
    assert checkpoints.restore_newest_intact(
        tf.train.Checkpoint(step=tf.Variable(0, dtype=tf.int64)), folder,
        log=notes.append) is None
    assert os.listdir(folder) == [] and len(notes) == 1 and leftovers[0] in notes[0], notes


def test_a_rerun_with_nothing_to_train_deletes_the_shards_of_a_killed_save(run_copy,
                                                                           monkeypatch):
    """`train` that has nothing to train decides so from the run folder without loading the
    data (`rerun_without_data`): the shards of a killed save are deleted there too."""
    folder = os.path.join(run_copy, "checkpoints")
    leftovers = _leave_save_leftovers(folder)

    def no_load(*args, **kwargs):
        raise AssertionError("the caption data was loaded")

    monkeypatch.setattr(train, "load_train_data", no_load)
    notes = []
    summary = train.train(RunConfig.load(os.path.join(run_copy, "config.json")), run_copy,
                          progress=False, log=notes.append)
    assert summary["epochs_now"] == 0 and summary["epoch_length"] is None
    assert not any(os.path.lexists(os.path.join(folder, name)) for name in leftovers)
    assert any("ckpt-30_temp" in n for n in notes), notes


@pytest.mark.parametrize("cause", ["killed before the state file", "state file deleted"])
def test_train_resumed_keeps_only_the_newest_checkpoints(shapes_data, run_copy, cause):
    """`train`'s resume of a run whose state file lists fewer checkpoints than it has, or
    was deleted: each such event left checkpoints on disk for good."""
    import tensorflow as tf

    from caption_attn import checkpoints
    folder = os.path.join(run_copy, "checkpoints")
    steps = _on_disk(folder)
    assert len(steps) == checkpoints.KEEP
    if cause == "killed before the state file":     # the newest written, not yet listed
        state = tf.train.get_checkpoint_state(folder)
        tf.compat.v1.train.update_checkpoint_state(
            folder, state.all_model_checkpoint_paths[-2],
            all_model_checkpoint_paths=list(state.all_model_checkpoint_paths[:-1]),
            all_model_checkpoint_timestamps=list(state.all_model_checkpoint_timestamps[:-1]),
            last_preserved_timestamp=state.last_preserved_timestamp)
    else:
        os.remove(os.path.join(folder, "checkpoint"))
    with open(os.path.join(run_copy, "config.json")) as f:
        cfg = RunConfig.from_dict(json.load(f))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                             epochs=cfg.train.epochs + 1))
    summary = train.train(cfg, run_copy, progress=False, log=lambda *a: None)
    assert summary["epochs"] == cfg.train.epochs
    on_disk = _on_disk(folder)
    assert on_disk[:-1] == steps[1:] and len(on_disk) == checkpoints.KEEP   # resumed at the
    assert tf.train.get_checkpoint_state(folder).model_checkpoint_path.endswith(   # newest
        f"ckpt-{on_disk[-1]}")


def _steps(folder, tag):
    import tensorflow as tf
    return sorted(event.step for path in glob.glob(os.path.join(folder, "events.out.tfevents.*"))
                  for event in tf.compat.v1.train.summary_iterator(path)
                  for v in event.summary.value if v.tag == tag)


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_rerunning_train_rewrites_a_missing_or_damaged_best_model(shapes_data, run_copy,
                                                                  damage):
    best = os.path.join(run_copy, "best.keras")
    if damage == "delete":
        os.remove(best)
    else:
        with open(best, "r+b") as f:
            f.truncate(os.path.getsize(best) // 2)
    assert main(["caption", "--run", run_copy, os.path.join(shapes_data["images"],
                                                              "shape_00000.png")]) == 2
    with open(os.path.join(run_copy, "config.json")) as f:
        cfg = RunConfig.from_dict(json.load(f))
    history = open(os.path.join(run_copy, "history.json")).read()
    notes = []
    train.train(cfg, run_copy, progress=False, log=notes.append)
    assert any("rewrote it from" in n for n in notes), notes
    assert open(os.path.join(run_copy, "history.json")).read() == history   # no training
    assert main(["caption", "--run", run_copy, os.path.join(shapes_data["images"],
                                                              "shape_00000.png")]) == 0


def test_a_damaged_best_weights_file_beside_a_whole_best_model_is_rewritten(shapes_data,
                                                                          run_copy):
    """best.weights.h5 damaged, best.keras whole: train trained its epochs, then failed where
    training ends by restoring the best weights ("free space ... and rerun"), on every
    rerun. It is rewritten from best.keras before training now."""
    weights = os.path.join(run_copy, "best.weights.h5")
    with open(weights, "r+b") as f:
        f.truncate(1000)
    with open(os.path.join(run_copy, "config.json")) as f:
        cfg = RunConfig.from_dict(json.load(f))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                             epochs=cfg.train.epochs + 1))
    notes = []
    train.train(cfg, run_copy, progress=False, log=notes.append)
    assert any(n.startswith(f"note: {weights}: cannot be loaded (") and
               f"rewrote it from {os.path.join(run_copy, 'best.keras')} (epoch " in n
               for n in notes), notes
    assert len(json.load(open(os.path.join(run_copy, "history.json")))) == cfg.train.epochs


def _listing(folder):
    """Every file and folder under `folder` (hidden ones too) with its size and mtime (not
    `folder`'s own mtime: the check that it is writable creates and removes a probe file)."""
    stats = {os.path.join(d, n): os.stat(os.path.join(d, n))
             for d, dirs, files in os.walk(folder) for n in dirs + files}
    return {os.path.relpath(p, folder): (st.st_size, st.st_mtime_ns) for p, st in stats.items()}


@pytest.mark.parametrize("damage, refusal", [
    ("both deleted", r"best\.keras and .*best\.weights\.h5: missing, though .*best\.json "
                     r"records the best model of epoch \d+: put them back"),
    ("weights cut short", r"best\.weights\.h5: cannot be loaded \(OSError: Unable to "
                          r".*truncated file.*\); best\.keras, missing or damaged, cannot be "
                          r"rewritten from it: put either file back")])
def test_a_best_model_beyond_repair_is_refused_before_training(shapes_data, run_copy,
                                                               monkeypatch, damage, refusal):
    """best.keras and best.weights.h5 deleted, best.json kept: train trained on and ended
    with exit 0 naming best.keras as the best model, which was not there; caption then said
    the run had not finished an epoch. Refused now, naming both, before any step; and, as
    best.keras deleted beside a best.weights.h5 cut short, before the caption data and
    features are loaded and anything is written into the run folder (both were refused only
    after those, having rewritten config.json, split.json and vocab.json and written
    TensorBoard event files into logs/)."""
    os.remove(os.path.join(run_copy, "best.keras"))
    weights = os.path.join(run_copy, "best.weights.h5")
    if damage == "both deleted":
        os.remove(weights)
    else:
        with open(weights, "r+b") as f:
            f.truncate(1000)
    with open(os.path.join(run_copy, "config.json")) as f:
        cfg = RunConfig.from_dict(json.load(f))
    before = _listing(run_copy)

    def no_load(*args, **kwargs):
        raise AssertionError("the caption data was loaded before the refusal")

    monkeypatch.setattr(train, "load_train_data", no_load)
    for epochs in (cfg.train.epochs, cfg.train.epochs + 1):   # a rerun, and one that trains
        more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))
        with pytest.raises(UserError, match=refusal):
            train.train(more, run_copy, progress=False, log=lambda *a: None)
        assert _listing(run_copy) == before
    monkeypatch.undo()
    with pytest.raises(UserError, match=refusal):
        train.open_run(run_copy, cfg)                         # tests' and benchmarks' way in
    assert _listing(run_copy) == before


def test_a_best_model_lost_to_a_kill_before_its_save_is_saved_not_refused(shapes_data,
                                                                          run_copy):
    """The early refusal of a best model gone with its weights leaves out what the resume
    repairs: killed between the last epoch's checkpoint and its best-model save (best.json
    still names an earlier epoch), the restored model is the best, and the resume saves all
    three files (here with the earlier best's files gone too)."""
    history = json.load(open(os.path.join(run_copy, "history.json")))
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    assert best == len(history) > 1                  # the trained_run fixture's val_loss falls
    with open(os.path.join(run_copy, "best.json"), "w") as f:
        json.dump({"epoch": best - 1, "monitor": "val_loss",
                   "value": history[best - 2]["val_loss"]}, f)
    for name in ("best.keras", "best.weights.h5"):
        os.remove(os.path.join(run_copy, name))
    with open(os.path.join(run_copy, "config.json")) as f:
        cfg = RunConfig.from_dict(json.load(f))
    train.train(cfg, run_copy, progress=False, log=lambda *a: None)
    assert json.load(open(os.path.join(run_copy, "best.json")))["epoch"] == best
    assert main(["caption", "--run", run_copy, os.path.join(shapes_data["images"],
                                                              "shape_00000.png")]) == 0


def test_a_failed_train_leaves_the_run_folder_as_it_was(shapes_data, run_copy, tmp_path,
                                                        capsys):
    before = _files(run_copy)
    same_model = ["--seed", "1", "--max-length", "20", "--embedding-dim", "32", "--units",
                  "64", "--dropout", "0.1"]                     # as the `trained_run` fixture
    code = main(["train", "--captions", str(tmp_path / "moved.json"), "--cache",
                 shapes_data["cache"], "--run", run_copy, "--epochs", "5", *same_model])
    assert code == 2 and "moved.json" in capsys.readouterr().err
    assert _files(run_copy) == before
    fresh = str(tmp_path / "new_run")
    assert main(["train", "--captions", str(tmp_path / "moved.json"), "--cache",
                 shapes_data["cache"], "--run", fresh]) == 2
    assert not os.path.exists(fresh)


def test_a_run_with_relative_paths_works_from_another_directory(shapes_data, tmp_path,
                                                                monkeypatch):
    monkeypatch.chdir(os.path.dirname(shapes_data["cache"]))
    run = str(tmp_path / "run")
    train.train(_config(shapes_data, cache=os.path.basename(shapes_data["cache"]), epochs=1),
                run, progress=False, log=lambda *a: None)  # a whole epoch: a best model
    with open(os.path.join(run, "config.json")) as f:
        assert os.path.isabs(json.load(f)["cache"])
    monkeypatch.chdir(tmp_path)
    image = os.path.join(shapes_data["images"], "shape_00001.png")
    assert main(["caption", "--run", run, "--beam", "1", image]) == 0


def test_caption_and_evaluate_accept_a_moved_cache(shapes_data, run_copy, tmp_path, capsys,
                                                   no_java):
    moved = str(tmp_path / "moved_cache")
    shutil.copytree(shapes_data["cache"], moved)
    config = os.path.join(run_copy, "config.json")
    with open(config) as f:
        cfg = json.load(f)
    cfg["cache"] = str(tmp_path / "gone")
    with open(config, "w") as f:
        json.dump(cfg, f)
    image = os.path.join(shapes_data["images"], "shape_00002.png")
    assert main(["caption", "--run", run_copy, "--beam", "1", image]) == 2
    assert "--cache" in capsys.readouterr().err                      # the advice
    assert main(["caption", "--run", run_copy, "--beam", "1", "--cache", moved, image]) == 0
    out = str(tmp_path / "m_metrics.json")
    assert main(["evaluate", "--run", run_copy, "--beam", "1", "--cache", moved,
                 "--split", "val", "--out", out]) == 0
    assert json.load(open(out))["images"] > 0


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_evaluate_checks_its_outputs_before_decoding(run_copy, tmp_path, capsys, monkeypatch,
                                                     where):
    from caption_attn import captioner
    monkeypatch.setattr(captioner.Captioner, "from_run", classmethod(
        lambda *a, **k: pytest.fail("the run was opened before the outputs were checked")))
    (tmp_path / "file").write_text("x")
    out = str(tmp_path) if where == "folder" else str(tmp_path / "file" / "m.json")
    assert main(["evaluate", "--run", run_copy, "--out", out]) == 2
    err = capsys.readouterr().err
    assert ("is a folder" if where == "folder" else "is a file, not a folder") in err
    assert "Traceback" not in err


def test_same_named_images_get_distinct_heatmaps_and_names(shapes_data, trained_run,
                                                           tmp_path, capsys):
    for folder in ("a", "b"):
        os.makedirs(tmp_path / folder)
        shutil.copy(os.path.join(shapes_data["images"], f"shape_0000{ord(folder) - 97}.png"),
                    tmp_path / folder / "cat.png")
    heat = str(tmp_path / "heat")
    assert main(["caption", "--run", trained_run, "--beam", "1", "--plot-attention", heat,
                 str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "Captions for image a/cat.png:" in out and "Captions for image b/cat.png:" in out
    assert sorted(os.listdir(heat)) == ["a__cat.png", "b__cat.png"]


def test_heatmaps_never_overwrite_the_images_being_captioned(shapes_data, trained_run,
                                                             tmp_path, capsys):
    """`caption --plot-attention DIR DIR/x.png` wrote x.png's heatmap over x.png itself
    (exit 0): refused before the model is loaded, and nothing is written."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in ("shape_00000.png", "shape_00001.png"):
        shutil.copy(os.path.join(shapes_data["images"], k), folder / k)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for args, said in (([str(folder / "shape_00000.png")], "is the folder of"),
                       ([str(folder)], "is the folder")):  # (heatmaps of JPEGs there too)
        code = main(["caption", "--run", trained_run, "--beam", "1", "--plot-attention",
                     str(folder), *args])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "--plot-attention" in err and said in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    heat = str(tmp_path / "heat")  # a folder of its own is fine
    assert main(["caption", "--run", trained_run, "--beam", "1", "--plot-attention", heat,
                 str(folder)]) == 0
    # the images' folder with no name in common: c.jpg's heatmap c.png overwrote nothing, but
    # the next `caption imgs` captioned it as a photo
    shutil.copy(os.path.join(shapes_data["images"], "shape_00002.png"), folder / "c.jpg")
    assert main(["caption", "--run", trained_run, "--beam", "1", "--plot-attention",
                 str(folder), str(folder / "c.jpg")]) == 2
    assert "is the folder of" in capsys.readouterr().err and not (folder / "c.png").exists()


def test_a_file_where_a_folder_is_expected_is_one_line(trained_run, shapes_data, tmp_path,
                                                       capsys):
    (tmp_path / "file").write_text("x")
    code = main(["caption", "--run", trained_run, "--plot-attention",
                 str(tmp_path / "file" / "heat"),
                 os.path.join(shapes_data["images"], "shape_00000.png")])
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a folder" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_features_of_another_backbone_are_refused_naming_both(shapes_data, run_copy, tmp_path,
                                                              capsys):
    from caption_attn.config import ExtractConfig
    from caption_attn.extract import extract_features
    other = str(tmp_path / "other_cache")
    extract_features(shapes_data["images"], ExtractConfig(
        cache=other, weights="random", seed=7, dtype="float16"),
        keys=["shape_00000.png", "shape_00001.png"], progress=False)
    image = os.path.join(shapes_data["images"], "shape_00000.png")
    same_model = ["--seed", "1", "--max-length", "20", "--embedding-dim", "32", "--units",
                  "64", "--dropout", "0.1", "--epochs", "4"]   # as the `trained_run` fixture
    before = _files(run_copy)
    for args in (["train", "--captions", shapes_data["captions"], "--cache", other,
                  "--run", run_copy, *same_model],
                 ["caption", "--run", run_copy, "--cache", other, image],
                 ["evaluate", "--run", run_copy, "--cache", other]):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert "seed 0" in err and "seed 7" in err and "Traceback" not in err, err
    assert _files(run_copy) == before                       # nothing trained, nothing written
    with open(os.path.join(run_copy, "split.json")) as f:
        assert json.load(f)["cache_identity"]["fingerprint"]


@pytest.mark.parametrize("memory_gb,split", [(0.0, "train"), (4.0, "train"), (0.0, "val")],
                         ids=["streamed", "in-memory", "streamed-val"])
def test_a_feature_file_gone_bad_stops_train_naming_it_before_any_step(shapes_data,
                                                                       copy_cache, tmp_path,
                                                                       memory_gb, split):
    """Bit rot: a train image's features hold a NaN under the same size and mtime (the
    provenance index still vouches for it). Found before the first step, streamed or in
    memory, named with the fix, never blamed on the learning rate. (A validation image's,
    streamed, met by the sample heatmaps' decoder traced before the first step, was
    TensorFlow's traceback.)"""
    import numpy as np

    from caption_attn.errors import UserError
    from caption_attn.feature_cache import feature_path
    with open(shapes_data["captions"]) as f:
        key = sorted(im["filename"] for im in json.load(f)["images"] if im["split"] == split)[0]
    path = feature_path(copy_cache, key)
    before = os.stat(path)
    values = np.load(path)
    values[3, 7] = np.nan
    np.save(path, values)
    assert os.path.getsize(path) == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    run = str(tmp_path / "run")
    with pytest.raises(UserError) as e:
        train.train(_config(shapes_data, copy_cache, memory_cache_gb=memory_gb), run,
                    progress=False, log=lambda message: None)
    message = str(e.value)
    assert path in message and "non-finite values" in message
    # the repair command has every flag the cache needs, so it is not refused for one
    m = json.load(open(os.path.join(copy_cache, "manifest.json")))
    assert (f"extract-features --verify --images {m['images_dir']} --captions "
            f"{shapes_data['captions']} --cache {copy_cache} --weights {m['weights']} --seed "
            f"{m['seed']} --dtype {m['dtype']} --precision {m['precision']}`") in message
    assert "learning-rate" not in message
    assert not glob.glob(os.path.join(run, "checkpoints", "ckpt-*"))   # no step was taken
    if memory_gb == 0.0:  # the printed command, as printed, repairs the file
        import shlex

        from caption_attn import cli
        command = message.split("`")[1]
        assert cli.main(shlex.split(command)[1:]) == 0
        assert np.isfinite(np.load(path)).all()


def test_the_repair_of_a_damaged_file_names_the_images_folder_the_run_checks(
        shapes_data, copy_cache, tmp_path):
    """A run checking its images in another folder than the cache's last --images (the
    folder moved: `train --images NEW`): the repair command named the old folder, which,
    pasted, was refused as no folder (or, in a cache of two datasets, re-extracted from the
    other one's). It names the folder train checks, and as printed repairs the file."""
    import shlex

    import numpy as np

    from caption_attn import cli
    from caption_attn.errors import UserError
    from caption_attn.feature_cache import feature_path
    moved = str(tmp_path / "moved")
    shutil.copytree(shapes_data["images"], moved, copy_function=shutil.copy2)
    with open(shapes_data["captions"]) as f:
        key = sorted(im["filename"] for im in json.load(f)["images"]
                     if im["split"] == "train")[0]
    path = feature_path(copy_cache, key)
    before = os.stat(path)
    values = np.load(path)
    values[0, 0] = np.nan
    np.save(path, values)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(UserError) as e:
        train.train(_config(shapes_data, copy_cache, memory_cache_gb=0.0),
                    str(tmp_path / "run"), images_dir=moved, progress=False,
                    log=lambda message: None)
    command = str(e.value).split("`")[1]
    assert f"extract-features --verify --images {moved} --captions " in command
    assert shapes_data["images"] not in command
    assert cli.main(shlex.split(command)[1:]) == 0
    assert np.isfinite(np.load(path)).all()


def test_a_feature_file_deleted_while_training_stops_it_naming_it(shapes_data, copy_cache,
                                                                  tmp_path, monkeypatch):
    """Streamed features, and a train image's file deleted after epoch 1: TensorFlow's
    NotFoundError traceback, and no checkpoint of the steps done. Now named, with the
    repair, after a checkpoint. No sample images (`--sample-images 0`) with streamed
    features crashed every epoch's end (a dataset of no paths was a float32 tensor)."""
    from caption_attn.feature_cache import feature_path
    with open(shapes_data["captions"]) as f:
        key = sorted(im["filename"] for im in json.load(f)["images"]
                     if im["split"] == "train")[0]
    path = feature_path(copy_cache, key)
    validate = train.Trainer._validate

    def validate_then_delete(self, epoch):
        logs = validate(self, epoch)
        if os.path.exists(path):
            os.remove(path)
        return logs
    monkeypatch.setattr(train.Trainer, "_validate", validate_then_delete)
    run = str(tmp_path / "run")
    with pytest.raises(train.TrainingError) as e:
        train.train(_config(shapes_data, copy_cache, memory_cache_gb=0.0, sample_images=0),
                    run, progress=False, log=lambda message: None)
    message = str(e.value)
    assert message.startswith(f"damaged feature file: {path} (missing): repair the cache with "
                              f"`caption-attn extract-features --verify ")
    with open(os.path.join(run, "history.json")) as f:
        history = json.load(f)
    assert [h["epoch"] for h in history] == [1]                   # epoch 1 ended normally
    step = int(message.rsplit("continues from step ", 1)[1].split(" ")[0])
    assert step > history[0]["steps"]                              # epoch 2's steps kept
    assert glob.glob(os.path.join(run, "checkpoints", f"ckpt-{step}.index"))


def _saved_config(run: str, **train_changes) -> RunConfig:
    import dataclasses
    with open(os.path.join(run, "config.json")) as f:
        cfg = RunConfig.from_dict(json.load(f))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=5,
                                                              **train_changes))


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_resume_across_float16_is_refused_before_writing(run_copy, precision, monkeypatch):
    """float32 -> float16 (or back) on resume failed while restoring, after config.json was
    rewritten, with 40 TensorFlow warnings and "if the run was made by an older caption_attn,
    start it over": the loss-scaled optimizer's checkpoints do not fit the plain one's."""
    from caption_attn.errors import UserError
    before = _files(run_copy)
    cfg = _saved_config(run_copy, precision=precision)
    if precision == "bfloat16":                   # same optimizer: only a note
        assert any("precision" in n for n in train.reopen_checks(
            train.RunFolder(run_copy), cfg, fresh=False))
        return
    # (refused before any float16 op; under the AVX2 caps the cap's refusal would come first)
    monkeypatch.setattr(backbone, "onednn_aborts_on", lambda *a, **k: "")
    with pytest.raises(UserError, match=r"--precision float16: .* was trained with "
                                        r"--precision float32, .* resume with --precision "
                                        r"float32 \(or bfloat16\)"):
        train.train(cfg, run_copy, progress=False, log=lambda *a: None)
    assert _files(run_copy) == before


@pytest.mark.parametrize("damage", ["deleted", "one_epoch", "object", "not_an_entry",
                                    "string_epoch", "string_metric"])
def test_resume_with_an_edited_history_is_refused_before_writing(run_copy, damage):
    """A history.json deleted or cut to fewer epochs than the checkpoint finished resumed with
    exit 0: early stopping forgot the best value (a worse epoch replaced best.keras) and the
    lost entries were gone for good; other edits crashed with a TypeError traceback."""
    from caption_attn.errors import UserError
    path = os.path.join(run_copy, "history.json")
    history = json.load(open(path))
    edited = {"deleted": None, "one_epoch": history[:1], "object": {"1": history[0]},
              "not_an_entry": [1, *history[1:]],
              "string_epoch": [{**history[0], "epoch": "1"}, *history[1:]],
              "string_metric": [{**history[0], "val_loss": "low"}, *history[1:]]}[damage]
    if edited is None:
        os.remove(path)
    else:
        with open(path, "w") as f:
            json.dump(edited, f)
    before = _files(run_copy)
    with pytest.raises(UserError) as e:
        train.train(_saved_config(run_copy), run_copy, progress=False, log=lambda *a: None)
    message = str(e.value)
    assert message.startswith(path) and "--fresh" in message, message
    assert ("finished 3 epochs" in message) == (damage in ("deleted", "one_epoch")), message
    assert _files(run_copy) == before


def test_resume_of_a_trained_run_without_checkpoints_is_refused(run_copy):
    """checkpoints/ deleted (to save space: best.keras seemed enough) and the run rerun with
    more --epochs: it trained from new weights as a new run, rewrote history.json and replaced
    best.keras epoch by epoch, exit 0, its first line "training:" instead of "resuming"."""
    from caption_attn.errors import UserError
    shutil.rmtree(os.path.join(run_copy, "checkpoints"))
    before = _files(run_copy)
    with pytest.raises(UserError, match=r"checkpoints: no checkpoint, but .* has trained "
                                        r"\(history.json\): training would start over"):
        train.train(_saved_config(run_copy), run_copy, progress=False, log=lambda *a: None)
    assert _files(run_copy) == before
    # killed between epoch 1's history entry and its checkpoint: that epoch is redone
    for name in ("best.keras", "best.weights.h5", "best.json"):
        os.remove(os.path.join(run_copy, name))
    history = json.load(open(os.path.join(run_copy, "history.json")))
    with open(os.path.join(run_copy, "history.json"), "w") as f:
        json.dump(history[:1], f)
    assert train.reopen_checks(train.RunFolder(run_copy), _saved_config(run_copy), False)


def test_resume_that_forgets_scst_after_is_refused(run_copy):
    """A run whose last epoch was self-critical, rerun with more --epochs but without its
    --scst-after, went back to cross-entropy at --learning-rate with exit 0, and its first
    epoch with a lower val_loss replaced the self-critical best model."""
    from caption_attn.errors import UserError
    config, history_path = (os.path.join(run_copy, n) for n in ("config.json", "history.json"))
    with open(config) as f:
        saved = json.load(f)
    saved["train"]["scst_after"] = 2                     # epoch 3 of 3 was self-critical
    with open(config, "w") as f:
        json.dump(saved, f)
    history = json.load(open(history_path))
    history[2]["stage"] = "self-critical"
    with open(history_path, "w") as f:
        json.dump(history, f)
    run = train.RunFolder(run_copy)
    with pytest.raises(UserError, match=r"^--scst-after none: epoch 3 of .* was self-critical, "
                                        r".* resume with the run's --scst-after 2"):
        train.reopen_checks(run, _saved_config(run_copy, scst_after=None), fresh=False)
    with pytest.raises(UserError, match=r"^--scst-after 4: epoch 3"):
        train.reopen_checks(run, _saved_config(run_copy, scst_after=4), fresh=False)
    train.reopen_checks(run, _saved_config(run_copy), fresh=False)   # its own: fine


def test_resume_with_a_cache_of_other_images_of_the_same_names_is_refused(run_copy, copy_cache):
    """`train --cache` of another shapes dataset (another --seed: the same random backbone and
    file names) on resume trained the run on other images' features, exit 0, and recorded
    their digests in split.json as the run's own (so `evaluate` could not tell either)."""
    run = run_copy
    with open(os.path.join(run, "split.json")) as f:
        train_keys = set(json.load(f)["splits"]["train"])
    give_other_images(copy_cache, train_keys)   # the same feature files, other images
    before = {name: open(os.path.join(run, name), "rb").read()
              for name in ("config.json", "split.json", "vocab.json")}
    cfg = RunConfig.load(os.path.join(run, "config.json"))
    cfg = dataclasses.replace(cfg, cache=copy_cache,
                              train=dataclasses.replace(cfg.train, epochs=cfg.train.epochs + 1))
    with pytest.raises(UserError, match=rf"feature cache {copy_cache}: the features of "
                                        rf"\d+ of the \d+ images were extracted from other "
                                        rf"images than the run's"):
        train.train(cfg, run, progress=False, log=lambda *a: None)
    assert before == {name: open(os.path.join(run, name), "rb").read() for name in before}


def test_an_image_skipped_at_one_resume_is_still_checked_at_the_next(run_copy, copy_cache):
    """A train image whose features could not be used at one resume (skipped, "rerun
    extract-features") lost its recorded digest: once extract-features had run on the image now
    of that name (another picture), the next resume trained the run's captions of it on that
    picture's features, exit 0. Every digest the run trained with stays recorded."""
    run = run_copy
    with open(os.path.join(run, "split.json")) as f:
        split = json.load(f)
    key = split["splits"]["train"][0]
    digest = split["image_digests"][key]
    path = os.path.join(copy_cache, key + ".npy")
    stat = os.stat(path)
    os.utime(path, (1, 1))                              # changed after extraction: skipped
    cfg = RunConfig.load(os.path.join(run, "config.json"))

    def resume(epochs):
        return train.train(dataclasses.replace(cfg, cache=copy_cache, train=dataclasses.replace(
            cfg.train, epochs=epochs)), run, progress=False, log=lambda *a: None)
    resume(cfg.train.epochs + 1)
    with open(os.path.join(run, "split.json")) as f:
        split = json.load(f)
    assert split["image_digests"][key] == digest and split["without_features"] == [key]
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    give_other_images(copy_cache, [key])                # extracted again: from another image
    with pytest.raises(UserError, match=rf"feature cache {copy_cache}: the features of 1 of "
                                        rf"the \d+ images were extracted from other images "
                                        rf"than the run's of the same name \(e\.g\. '{key}'"):
        resume(cfg.train.epochs + 2)


def test_resume_with_scst_after_below_the_trained_cross_entropy_epochs_is_refused(run_copy):
    """--scst-after 1 on a run that trained 3 cross-entropy epochs went on self-critically
    from epoch 4 (as --scst-after 3 would), exit 0, and config.json recorded --scst-after 1:
    epochs 2-3 passed for self-critical ones. Refused, naming the value that says what the
    run did; a raised --scst-after inside the self-critical stage likewise."""
    from caption_attn.errors import UserError
    run = train.RunFolder(run_copy)
    with pytest.raises(UserError, match=r"^--scst-after 1: epoch 2 of .* was trained with "
                                        r"cross-entropy, .* resume with --scst-after 3 "):
        train.reopen_checks(run, _saved_config(run_copy, scst_after=1), fresh=False)
    train.reopen_checks(run, _saved_config(run_copy, scst_after=3), fresh=False)  # truthful
    history = json.load(open(run.history))
    history[2]["stage"] = "self-critical"                 # epoch 3 of 3 was self-critical
    with open(run.history, "w") as f:
        json.dump(history, f)
    with pytest.raises(UserError, match=r"^--scst-after 1: epoch 2 .* --scst-after 2 "):
        train.reopen_checks(run, _saved_config(run_copy, scst_after=1), fresh=False)
    with pytest.raises(UserError, match=r"^--scst-after 0: epoch 1 .* --scst-after 2 "):
        train.reopen_checks(run, _saved_config(run_copy, scst_after=0), fresh=False)
    train.reopen_checks(run, _saved_config(run_copy, scst_after=2), fresh=False)


def test_a_resume_whose_checkpoints_cannot_be_restored_leaves_config_json_as_it_was(run_copy):
    """config.json was rewritten with the resuming call's settings before the checkpoint was
    restored: when no checkpoint could be, it described settings (here --epochs 5) the run's
    checkpoints never had. Now it is written once the restore succeeded."""
    from caption_attn.errors import UserError
    for path in glob.glob(os.path.join(run_copy, "checkpoints", "ckpt-*.data-*")):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    before = _files(run_copy)
    with pytest.raises(UserError, match="no checkpoint of this run can be restored"):
        train.train(_saved_config(run_copy), run_copy, progress=False, log=lambda *a: None)
    assert _files(run_copy) == before


@pytest.mark.parametrize("damage", ["data files cut in half", "index files cut short"])
def test_checkpoints_that_cannot_be_restored_are_refused_before_the_data_is_read(
        run_copy, monkeypatch, damage):
    """"no checkpoint of this run can be restored" came from the Trainer, after the caption
    data and the features were loaded (minutes at COCO size) and the cache's reading lock
    taken. It comes now with the checks of the run folder: before the cache or the caption
    file is used and before anything is written, with the same message."""
    for path in glob.glob(os.path.join(run_copy, "checkpoints", "ckpt-*." + (
            "data-*" if damage == "data files cut in half" else "index"))):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2 if damage == "data files cut in half" else 8)
    before = _listing(run_copy)

    def no_use(what):
        def refuse(*args, **kwargs):
            raise AssertionError(f"{what} before the refusal")
        return refuse

    monkeypatch.setattr(train, "load_train_data", no_use("the caption data was loaded"))
    monkeypatch.setattr(train.feature_cache, "using_features", no_use("the cache was used"))
    cfg = _saved_config(run_copy)
    refusal = r"^no checkpoint of this run can be restored:\n  .*ckpt-\d+: "
    with pytest.raises(UserError, match=refusal):
        train.train(cfg, run_copy, progress=False, log=lambda *a: None)
    assert _listing(run_copy) == before
    with pytest.raises(UserError, match=refusal):
        train.open_run(run_copy, cfg)                         # tests' and benchmarks' way in
    assert _listing(run_copy) == before


def test_a_resume_with_an_edited_best_json_is_refused_before_writing(run_copy):
    """best.json that is not train's object is refused (`RunFolder.best_record`), but only
    once the resume had rewritten config.json and split.json, traced the steps and measured
    the metrics before it (history.json): now with the other checks, nothing written."""
    from caption_attn.errors import UserError
    with open(os.path.join(run_copy, "best.json"), "w") as f:
        f.write("3")
    before = _files(run_copy)
    with pytest.raises(UserError, match=r"best\.json: a JSON int, not an object"):
        train.train(_saved_config(run_copy), run_copy, progress=False, log=lambda *a: None)
    assert _files(run_copy) == before


def test_a_refused_scst_after_asks_for_more_epochs_when_all_were_trained(run_copy):
    """--epochs 3 --scst-after 1 on a run that trained its 3 epochs with cross-entropy was
    told to resume with --scst-after 3, which --epochs 3 refuses (no self-critical epoch
    left): the message asks for more epochs too."""
    import dataclasses
    from caption_attn.errors import UserError
    cfg = _saved_config(run_copy)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3,
                                                             scst_after=1))
    with pytest.raises(UserError, match=r"resume with --scst-after 3 and an --epochs above 3 "
                                        r"\(the next epoch is then self-critical\)"):
        train.reopen_checks(train.RunFolder(run_copy), cfg, fresh=False)
