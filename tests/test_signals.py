"""Ctrl-C and SIGTERM sent at chosen points of real commands (`signal_inject`): the command
ends with 130 / 143 and its one line, and the same command run again ends as an
uninterrupted one would have. The commands stopped are subprocesses; the reruns and the
runs that set a test up are the same command run in the test's process (`run_here`)."""

import os
import signal

import pytest

from signal_inject import inject, leftovers, stopped_cleanly
from train_subprocess import read_history, run_here, train_cmd


def _tensorboard_epochs(run: str) -> dict:
    """{(train or validation, tag): sorted steps} of the epoch scalars and sample heatmaps in
    `run`'s TensorBoard event files (all of them: each process of a resumed run has its own)."""
    import tensorflow as tf
    found: dict = {}
    for folder in ("train", "validation"):
        for name in os.listdir(os.path.join(run, "logs", folder)):
            for event in tf.compat.v1.train.summary_iterator(
                    os.path.join(run, "logs", folder, name)):
                for value in event.summary.value:
                    if value.tag.startswith(("epoch_", "attention/")):
                        found.setdefault((folder, value.tag), set()).add(event.step)
    return {k: sorted(v) for k, v in found.items()}


# (the function signalled, its call, the signal): the sample heatmaps of an epoch (drawn in
# the background, written at a later epoch's end) were taken off the queue before they were
# written: a Ctrl-C in the write lost them for good, in attention/ and TensorBoard (the
# clean-up wrote only those still queued; a rerun redraws only the last epoch's, and only
# when its folder is missing). A SIGTERM after epoch 1's checkpoint, before its TensorBoard
# scalars were written, lost those for good: the rerun resumes after epoch 1.
@pytest.mark.slow
@pytest.mark.parametrize("target, signum", [
    ("caption_attn.callbacks:write_bytes_atomic", signal.SIGINT),
    ("caption_attn.callbacks:TensorBoardLogger.on_epoch_end", signal.SIGTERM)],
    ids=["heatmap-write", "tensorboard-epoch-end"])
def test_a_stop_at_an_epochs_end_loses_none_of_its_records(shapes_data, tmp_path, target,
                                                             signum, capsys):
    run = str(tmp_path / "run")
    cmd = train_cmd(shapes_data, run, epochs=2)[3:]
    stopped_cleanly(inject(target, cmd, signum=signum), "train", signum)
    done = run_here(cmd, capsys)
    assert done.returncode == 0, done.stderr
    epochs = [h["epoch"] for h in read_history(run)]
    assert epochs == [1, 2]
    drawn = {e: os.listdir(os.path.join(run, "attention", f"epoch_{e}"))
             for e in epochs if os.path.isdir(os.path.join(run, "attention", f"epoch_{e}"))}
    assert sorted(drawn) == epochs and all(len(names) == 1 for names in drawn.values()), drawn
    logged = _tensorboard_epochs(run)
    assert logged and all(steps == epochs for steps in logged.values()), logged
    assert ("train", "epoch_loss") in logged and ("validation", "epoch_loss") in logged
    assert leftovers(run) == []


@pytest.mark.slow
def test_a_kill_while_the_best_model_is_saved_loses_no_tensorboard_scalars(shapes_data,
                                                                          tmp_path, capsys):
    """Killed (SIGKILL: no clean-up runs) as epoch 1's best model was saved, after its
    history.json entry and checkpoint: its TensorBoard scalars were never written, and the
    rerun went on after epoch 1, a hole there for good. The rerun writes them, once."""
    import tensorflow as tf
    run = str(tmp_path / "run")
    cmd = train_cmd(shapes_data, run, epochs=2)[3:]
    killed = inject("caption_attn.run:RunFolder.save_best", cmd, signum=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [h["epoch"] for h in read_history(run)] == [1]
    done = run_here(cmd, capsys)
    assert done.returncode == 0, done.stderr
    assert [h["epoch"] for h in read_history(run)] == [1, 2]
    steps: dict = {}
    for folder in ("train", "validation"):
        for name in sorted(os.listdir(os.path.join(run, "logs", folder))):
            for event in tf.compat.v1.train.summary_iterator(
                    os.path.join(run, "logs", folder, name)):
                for value in event.summary.value:
                    if value.tag.startswith("epoch_"):
                        steps.setdefault((folder, value.tag), []).append(event.step)
    assert ("train", "epoch_loss") in steps and ("validation", "epoch_loss") in steps
    assert all(found == [1, 2] for found in steps.values()), steps


def test_ctrl_c_right_after_an_export_is_published_leaves_no_copy_of_the_earlier(
        tmp_path, monkeypatch, default_sigint):
    """A Ctrl-C or SIGTERM between `_publish`'s rename of the new export into place and the
    removal of the earlier one (moved aside as `.NAME.tmp.PID.HOST.old`) left that full copy
    next to --out until an export into it ran again (which then said an export "did not
    finish"). The renames and the removal are done whole, then the signal ends the command."""
    from caption_attn import export
    out, tmp = tmp_path / "serving" / "1", tmp_path / "serving" / ".1.tmp"
    for folder, text in ((out, "earlier"), (tmp, "new")):
        folder.mkdir(parents=True)
        (folder / "saved_model.pb").write_text(text)
    real, calls = os.replace, []

    def replace(src, dst):
        real(src, dst)
        calls.append(src)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(export.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        export._publish(str(tmp), str(out))
    assert (out / "saved_model.pb").read_text() == "new"
    assert sorted(os.listdir(out.parent)) == ["1"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_the_flags_are_read_says_one_line(signum, tmp_path):
    """Ctrl-C while the flags were parsed (before the command's own handling) ended with a
    KeyboardInterrupt traceback (SIGTERM there already said one line)."""
    done = inject("argparse:ArgumentParser.parse_known_args",
                  ["inspect", "--captions", tmp_path / "captions.json"], signum=signum)
    word, code = ("interrupted", 130) if signum == signal.SIGINT else ("terminated", 143)
    assert (done.returncode, done.stderr.splitlines()[-1]) == (code, f"caption-attn: {word}")
    assert "Traceback" not in done.stderr, done.stderr


def _files(folder) -> dict:
    return {os.path.relpath(os.path.join(r, f), folder): open(os.path.join(r, f), "rb").read()
            for r, _, files in os.walk(folder) for f in files}


def test_ctrl_c_in_make_shapes_leaves_a_folder_the_rerun_takes(tmp_path, capsys):
    """Stopped before captions.json was written, make-shapes left the images drawn so far,
    and the same command then refused the folder ("not empty (images) ... add --replace").
    The images go with the stop; the rerun makes the dataset an uninterrupted run makes."""
    args = ["make-shapes", tmp_path / "shapes", "--num-images", "6"]
    stopped_cleanly(inject("caption_attn.shapes:write_json_atomic", args,
                           signum=signal.SIGINT), "make-shapes", signal.SIGINT)
    done = run_here(args, capsys)
    assert done.returncode == 0, done.stderr
    assert run_here(["make-shapes", tmp_path / "whole", "--num-images", "6"],
                    capsys).returncode == 0
    assert _files(tmp_path / "shapes") == _files(tmp_path / "whole")


@pytest.mark.slow
def test_a_stop_before_the_metric_measured_for_a_resume_is_logged_loses_it_nowhere(
        shapes_data, tmp_path, capsys):
    """A cross-entropy run resumed into its self-critical stage first measures the val_cider
    its last epoch did not log. history.json got it at once, TensorBoard only after the
    writers opened and the decoder was traced: a SIGTERM between left it out of TensorBoard
    for good (the rerun finds it in history.json and measures nothing)."""
    run = str(tmp_path / "run")
    cmd = train_cmd(shapes_data, run, epochs=1)
    assert run_here(cmd[3:], capsys).returncode == 0
    resume = train_cmd(shapes_data, run, epochs=2)[3:] + ["--scst-after", "1"]
    stopped_cleanly(inject("caption_attn.callbacks:TensorBoardLogger.log_validation",
                           resume), "train")
    in_history = [h["epoch"] for h in read_history(run) if "val_cider" in h]
    assert in_history == _tensorboard_epochs(run).get(("validation", "epoch_cider"), [])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_whose_handler_runs_in_a_finalizer_still_ends_the_command(signum, tmp_path):
    """A Ctrl-C or SIGTERM handled while a __del__ ran (TensorFlow's AtomicFunction.__del__
    during `train`) was printed as "Exception ignored in ... Terminated" with a traceback,
    and the command went on to exit 0 (a later SIGTERM then killed it without clean-up)."""
    done = inject("caption_attn.shapes:write_json_atomic",
                  ["make-shapes", tmp_path / "shapes", "--num-images", "6"], when="finalizer",
                  signum=signum)
    assert "Exception ignored" not in done.stderr, done.stderr
    stopped_cleanly(done, "make-shapes", signum)
    assert not os.path.exists(tmp_path / "shapes" / "captions.json")


@pytest.mark.slow
def test_ctrl_c_while_extract_features_writes_its_last_index_entries_keeps_them(tmp_path,
                                                                                capsys):
    """A Ctrl-C landing in the index segment extract-features writes as it ends (the entries
    of the files written since the last one) dropped the segment: the features were on disk,
    but the rerun found no entry vouching for them and extracted those images again."""
    shapes = tmp_path / "shapes"
    assert run_here(["make-shapes", shapes, "--num-images", "6"], capsys).returncode == 0
    args = ["extract-features", "--images", shapes / "images", "--cache", tmp_path / "cache",
            "--weights", "random", "--dtype", "float16", "--precision", "float32"]
    # the 3rd C call inside the main thread's first segment write: the last one, at the end
    # (the extraction's writer thread writes one only after 10 s)
    stopped_cleanly(inject("caption_attn.feature_index:write_bytes_atomic", args,
                           when="inside", at=3, signum=signal.SIGINT, main_thread=True),
                    "extract-features", signal.SIGINT)
    done = run_here(args, capsys)
    assert done.returncode == 0, done.stderr
    assert "extracted 0, skipped 6 already done" in done.stdout + done.stderr, done.stdout
    assert not [f for f in leftovers(str(tmp_path / "cache")) if ".tmp." in f]
