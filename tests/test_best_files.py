"""best.json tied to best.keras and best.weights.h5 across a stop inside
`RunFolder.save_best` (SIGKILL, a power loss, a full disk). best.keras was renamed into place
before best.json was written: stopped between them, evaluate, export and caption reported the
previous best epoch (and its value) for the new model, and a resume whose own repair did not
run kept the files of two models."""

import dataclasses
import json
import os

import numpy as np
import pytest

from caption_attn import train
from caption_attn.cli import main
from caption_attn.config import RunConfig
from caption_attn.errors import UserError
from caption_attn.fileio import file_digest, write_json_atomic


class Killed(BaseException):
    """The process ending there: nothing after it runs, what was renamed stays."""


def _stopped_save(run, model, epoch: int, value: float, renames: int) -> None:
    """`run.save_best(model, epoch, "val_loss", value)` stopped after `renames` of its
    renames onto the run's best files (best.keras, best.json, best.weights.h5), in whatever
    order it makes them."""
    real, done = os.replace, []
    best = {os.path.abspath(p) for p in (run.best_model, run.best_weights, run.best_info)}

    def replace(src, dst, *args, **kwargs):
        if os.path.abspath(dst) in best:
            if len(done) == renames:
                raise Killed(dst)
            done.append(dst)
        return real(src, dst, *args, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            run.save_best(model, epoch, "val_loss", value)
    assert len(done) == renames


def _epoch_3_save_stopped(run, renames: int) -> dict:
    """`run` (a copy of `trained_run`: 3 epochs, epoch 3 the best) as a process killed while
    it saved epoch 3's best model leaves it: epoch 3's history entry and checkpoint written,
    the earlier best's files (another model, saved as epoch 2's) partly replaced by epoch 3's
    (`renames` of the save's renames done). Returns {epoch: its model's weights}."""
    history = run.read_history()
    assert run.best_record()["epoch"] == len(history) == 3   # its val_loss falls
    newest, earlier = run.load_best_model(), run.load_best_model()
    earlier.set_weights([w + 0.01 if w.dtype.kind == "f" else w
                         for w in earlier.get_weights()])
    run.save_best(earlier, 2, "val_loss", history[1]["val_loss"])
    _stopped_save(run, newest, 3, history[2]["val_loss"], renames)
    return {2: earlier.get_weights(), 3: newest.get_weights()}


def _epoch_of(weights: dict, model):
    """The epoch of `weights` whose model `model` holds (None for neither)."""
    now = model.get_weights()
    return next((e for e, w in weights.items()
                 if all(np.array_equal(a, b) for a, b in zip(w, now))), None)


def _config(run, **train_fields) -> RunConfig:
    with open(run.config) as f:
        cfg = RunConfig.from_dict(json.load(f))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_fields))


@pytest.mark.parametrize("renames", [1, 2])
def test_a_reader_never_reports_another_epochs_record_for_the_model(run_copy, renames):
    weights = _epoch_3_save_stopped(run_copy, renames)
    try:
        model, record = run_copy.read_best_unchanged(run_copy.load_best_model, "evaluate",
                                                     "evaluate")
    except UserError as e:
        assert str(e).startswith(f"{run_copy.best_model}: not the model {run_copy.best_info} "
                                 f"records (the best model of epoch 3; its sha256 differs)")
        assert f"Rerun `caption-attn train --run {run_copy.path} ...`" in str(e)
        assert str(e).endswith(f"rewrites best.keras from {run_copy.best_weights}, which is "
                               f"that model; then evaluate again")
    else:
        assert record["epoch"] == _epoch_of(weights, model) is not None


@pytest.mark.parametrize("monitor", ["val_loss", "val_bleu4"])
@pytest.mark.parametrize("renames", [1, 2])
def test_a_resume_leaves_the_best_files_of_one_model_and_its_record(run_copy, renames,
                                                                    monitor):
    """Resumed with the run's --monitor, the restored epoch 3 is saved as the best again
    (`Trainer._repair_best`); with another, the files a stop left are made to agree with
    best.json (`RunFolder.match_best_files`), whose record stays the bar."""
    weights = _epoch_3_save_stopped(run_copy, renames)
    history = run_copy.read_history()
    notes = []
    train.train(_config(run_copy, monitor=monitor), run_copy.path, progress=False,
                log=notes.append)
    assert run_copy.read_history() == history                  # nothing trained
    record, model = run_copy.best_record(), run_copy.load_best_model()
    epoch = _epoch_of(weights, model)
    assert epoch is not None and record["epoch"] == epoch
    assert record["value"] == history[epoch - 1]["val_loss"]
    model.load_weights(run_copy.best_weights)
    assert _epoch_of(weights, model) == epoch, "best.weights.h5 holds another model"
    assert run_copy.best_mismatch() == []
    assert record["model_sha256"] == file_digest(run_copy.best_model)


def test_caption_refuses_the_model_best_json_does_not_record_until_train_rewrites_it(
        shapes_data, run_copy, capsys):
    _epoch_3_save_stopped(run_copy, renames=2)
    image = os.path.join(shapes_data["images"], "shape_00000.png")
    assert main(["caption", "--run", run_copy.path, image]) == 2
    err = capsys.readouterr().err
    assert f"{run_copy.best_model}: not the model {run_copy.best_info} records (the best " \
           f"model of epoch 3" in err and "Traceback" not in err
    notes = []
    train.train(_config(run_copy), run_copy.path, progress=False, log=notes.append)
    assert f"note: {run_copy.best_model}: not the model {run_copy.best_info} records (a " \
           f"train stopped while it saved the best model?); rewrote it from " \
           f"{run_copy.best_weights} (epoch 3)" in notes, notes
    assert main(["caption", "--run", run_copy.path, image]) == 0
    assert "note: best model of epoch 3 (" in capsys.readouterr().err


def test_best_model_files_neither_of_which_best_json_records_are_refused(run_copy):
    record = run_copy.best_record()
    other = run_copy.load_best_model()
    other.set_weights([w * 0.5 if w.dtype.kind == "f" else w for w in other.get_weights()])
    run_copy.save_best(other, record["epoch"], "val_loss", record["value"])
    write_json_atomic(run_copy.best_info, record)     # both files replaced, by hand
    neither = (f"{run_copy.best_model} and {run_copy.best_weights}: neither is the file "
               f"{run_copy.best_info} records")
    assert str(run_copy.best_model_beyond_repair()).startswith(neither)
    with pytest.raises(UserError, match="neither is the file"):
        run_copy.read_best_unchanged(run_copy.load_best_model, "evaluate", "evaluate")


def test_a_best_json_from_before_the_digests_is_read_as_before(run_copy):
    record = run_copy.best_record()
    assert record["model_sha256"] == file_digest(run_copy.best_model)
    assert record["weights_sha256"] == file_digest(run_copy.best_weights)
    old = {k: record[k] for k in ("epoch", "monitor", "value")}
    write_json_atomic(run_copy.best_info, old)
    assert run_copy.best_mismatch() == [] and run_copy.best_model_beyond_repair() is None
    assert run_copy.read_best_unchanged(run_copy.load_best_model, "evaluate",
                                        "evaluate")[1] == old
