"""Self-critical epochs in `train`: continuing a cross-entropy run, logs, the best model."""

import glob
import json
import os
import shutil

import numpy as np
import pytest

from caption_attn import train
from caption_attn.cider import DocumentFrequency
from caption_attn.config import DataConfig, ModelConfig, RunConfig, TrainConfig, VocabConfig


def _config(shapes_data, **options) -> RunConfig:
    # no sample heatmaps: no test here looks at them (each epoch would draw them); val_cider
    # decodes --bleu-images
    base = dict(epochs=1, batch_size=16, learning_rate=1e-2, patience=10, sample_images=0,
                bleu_images=8)
    if options.get("scst_after") is not None:   # else refused: they would change nothing
        base.update(scst_samples=3, scst_learning_rate=1e-3)
    base.update(options)
    return RunConfig(captions=shapes_data["captions"], cache=shapes_data["cache"],
                     data=DataConfig(seed=1), vocab=VocabConfig(max_length=20),
                     model=ModelConfig(embedding_dim=32, units=64, dropout=0.2),
                     train=TrainConfig(**base))


def _history(run):
    with open(os.path.join(run, "history.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def continued(shapes_data, tmp_path_factory):
    """A finished 1-epoch cross-entropy run, rerun with --epochs 3 --scst-after 1."""
    run = str(tmp_path_factory.mktemp("scst") / "run")
    quiet = dict(progress=False, log=lambda *a: None)
    train.train(_config(shapes_data), run, **quiet)
    notes = []
    summary = train.train(_config(shapes_data, epochs=3, scst_after=1), run, progress=False,
                          log=notes.append)
    return {"run": run, "summary": summary, "notes": notes, "history": _history(run)}


def test_a_finished_run_continues_into_self_critical_epochs(continued):
    history = continued["history"]
    assert [h["stage"] for h in history] == ["cross-entropy", "self-critical",
                                             "self-critical"]
    assert any("resuming with changed training settings" in n for n in continued["notes"])
    # the epoch before the stage measured val_cider (after the fact) for the stage to beat
    assert history[0]["val_cider"] > 0 and "reward" not in history[0]
    for h in history[1:]:
        for key in ("reward", "baseline", "advantage_std", "entropy", "val_cider", "val_loss"):
            assert np.isfinite(h[key]), key
        assert h["learning_rate"] == pytest.approx(1e-3)              # --scst-learning-rate
        assert h["advantage_std"] > 0 and h["entropy"] > 0
    assert continued["summary"]["monitor"] == "val_cider"


def test_best_model_follows_val_cider_in_self_critical_epochs(continued):
    history = continued["history"]
    with open(os.path.join(continued["run"], "best.json")) as f:
        best = json.load(f)
    scst_best = max(history[1:], key=lambda h: h["val_cider"])
    if scst_best["val_cider"] > history[0]["val_cider"]:
        assert best == {"epoch": scst_best["epoch"], "monitor": "val_cider",
                        "value": scst_best["val_cider"]}
    else:  # never beat the model it started from: the cross-entropy best stays
        assert best["epoch"] == 1 and best["monitor"] == "val_loss"


def test_document_frequencies_are_counted_once_from_the_train_split(continued, shapes_data):
    df = DocumentFrequency.load(os.path.join(continued["run"], "cider_df.json"))
    with open(os.path.join(continued["run"], "split.json")) as f:
        splits = json.load(f)["splits"]
    assert df.num_images == len(splits["train"])


def test_tensorboard_has_the_self_critical_curves(continued):
    import tensorflow as tf
    tags = {}
    for name in ("train", "validation"):
        tags[name] = {v.tag for path in glob.glob(os.path.join(continued["run"], "logs", name,
                                                               "events.out.tfevents.*"))
                      for e in tf.compat.v1.train.summary_iterator(path)
                      for v in e.summary.value}
    assert {"epoch_reward", "epoch_baseline", "epoch_advantage_std", "epoch_entropy",
            "epoch_loss"} <= tags["train"]
    assert {"epoch_cider", "epoch_loss"} <= tags["validation"]


def test_cross_entropy_then_self_critical_in_one_call_with_the_greedy_baseline(shapes_data,
                                                                                 tmp_path):
    run = str(tmp_path / "run")
    summary = train.train(_config(shapes_data, epochs=2, scst_after=1, scst_samples=1,
                                  scst_baseline="greedy"), run, progress=False,
                          log=lambda *a: None)
    history = _history(run)
    assert summary["epochs"] == 2 and history[1]["stage"] == "self-critical"
    assert "val_cider" in history[0]                       # measured before the new stage
    assert np.isfinite(history[1]["reward"]) and np.isfinite(history[1]["baseline"])


def test_cross_entropy_stopped_early_says_no_self_critical_epoch_trained(shapes_data,
                                                                        tmp_path):
    """Early stopping before --scst-after ended the run with "stopped by early_stopping"
    only: that the self-critical stage never trained went unsaid, and the advice was a larger
    --patience (more cross-entropy). The advice given, --scst-after N, trains it."""
    run = str(tmp_path / "run")
    never_better = dict(epochs=4, patience=1, min_delta=100.0, scst_samples=1,
                        scst_baseline="greedy")
    summary = train.train(_config(shapes_data, scst_after=3, **never_better), run,
                          progress=False, log=lambda *a: None)
    assert summary["stopped_by"] == "early_stopping" and summary["finished_epochs"] == 2
    assert ("\nno self-critical epoch trained: the cross-entropy stage stopped early, before "
            "--scst-after 3; rerun with --scst-after 2 to train it from here\n"
            ) in train.format_summary(summary)
    # an explicit --monitor watches both stages, its patience going on: --scst-after would
    # not help (the rerun's replay finds the run stopped), nor at the boundary itself
    for finished in (2, 3):
        text = train.format_summary({**summary, "monitor_flag": "val_loss",
                                     "finished_epochs": finished})
        assert ("\nno self-critical epoch trained: the cross-entropy stage stopped early "
                "(--monitor val_loss watches both stages); rerun with a larger --patience, or "
                "without --monitor") in text
    summary = train.train(_config(shapes_data, scst_after=2, **never_better), run,
                          progress=False, log=lambda *a: None)
    assert [h["stage"] for h in _history(run)] == ["cross-entropy"] * 2 + ["self-critical"]
    assert "no self-critical epoch" not in train.format_summary(summary)


def test_a_nan_reward_stops_with_a_message_about_the_reward(shapes_data, tmp_path,
                                                            monkeypatch):
    from caption_attn import cider
    monkeypatch.setattr(cider.CiderD, "__call__",
                        lambda self, index, candidates: np.full(len(index), np.nan))
    with pytest.raises(train.TrainingError, match="reward became nan"):
        train.train(_config(shapes_data, epochs=2, scst_after=1), str(tmp_path / "run"),
                    progress=False, log=lambda *a: None)


def test_a_reward_of_zero_for_every_sample_is_not_an_error(shapes_data, tmp_path,
                                                           monkeypatch):
    from caption_attn import cider
    monkeypatch.setattr(cider.CiderD, "__call__",
                        lambda self, index, candidates: np.zeros(len(index)))
    summary = train.train(_config(shapes_data, epochs=2, scst_after=1), str(tmp_path / "run"),
                          progress=False, log=lambda *a: None)
    last = _history(str(tmp_path / "run"))[-1]
    assert summary["epochs"] == 2 and last["reward"] == 0.0 and last["loss"] == 0.0


def test_a_self_critical_epoch_resumed_at_another_rate_records_its_first_steps(shapes_data,
                                                                              tmp_path):
    """history.json's learning_rate of a self-critical epoch resumed inside it with another
    --scst-learning-rate was the new one, which its first step did not use."""
    run = str(tmp_path / "run")
    quiet = dict(progress=False, log=lambda *a: None)
    train.train(_config(shapes_data, scst_after=0, max_steps=1), run, **quiet)
    train.train(_config(shapes_data, scst_after=0, scst_learning_rate=5e-4), run, **quiet)
    assert [h["learning_rate"] for h in _history(run)] == pytest.approx([1e-3])


@pytest.fixture(scope="module")
def three_epochs(continued, shapes_data, tmp_path_factory):
    """1 cross-entropy and 2 self-critical epochs (a copy of `continued`'s run: trained
    once for the module) and a private copy of the feature cache."""
    root = tmp_path_factory.mktemp("scst_df")
    shutil.copytree(shapes_data["cache"], root / "cache")
    shutil.copytree(continued["run"], root / "run")
    return root


@pytest.fixture(params=["digests", "no digests"])
def on_old_table(three_epochs, tmp_path, request):
    """A copy of `three_epochs` whose history.json's val_cider values stand for a table of
    other document frequencies (x1000: another scale), and a copy of its cache; with "no
    digests", history.json is a run's written before it recorded the table of each val_cider
    (cider_df.json's own digest then tells)."""
    shutil.copytree(three_epochs / "cache", tmp_path / "cache")
    shutil.copytree(three_epochs / "run", tmp_path / "run")
    history = _history(str(tmp_path / "run"))
    for h in history:
        h["val_cider"] *= 1000
        if request.param == "no digests":
            h.pop("cider_df_sha256", None)
    with open(tmp_path / "run" / "history.json", "w") as f:
        json.dump(history, f)
    with open(tmp_path / "run" / "split.json") as f:
        train_keys = json.load(f)["splits"]["train"]
    return {"run": str(tmp_path / "run"), "cache": str(tmp_path / "cache"),
            "train_keys": train_keys, "old": history}


def _resume(shapes_data, old, notes, **options):
    cfg = _config(shapes_data, scst_after=1, **options)
    cfg.cache = old["cache"]
    return train.train(cfg, old["run"], progress=False, log=notes.append)


def test_val_cider_of_another_document_frequency_table_is_not_the_bar(shapes_data,
                                                                      on_old_table):
    """A resume whose train references changed (a train image lost its features) counts
    cider_df.json again, and val_cider moves to another scale: the earlier epochs' values
    stayed the bar of best.keras and early stopping (here x1000: the run counted its epochs
    as no improvement and had stopped; a new epoch could never replace the best model)."""
    os.remove(os.path.join(on_old_table["cache"], on_old_table["train_keys"][0] + ".npy"))
    notes = []
    _resume(shapes_data, on_old_table, notes, epochs=4, patience=2)
    said = [n for n in notes if "cider_df.json" in n and "val_cider" in n]
    assert len(said) == 1, notes
    history = _history(on_old_table["run"])
    df = DocumentFrequency.load(os.path.join(on_old_table["run"], "cider_df.json"))
    with open(os.path.join(on_old_table["run"], "cider_df.json")) as f:
        digest = json.load(f)["references_sha256"]
    assert df.num_images == len(on_old_table["train_keys"]) - 1
    # epoch 2, measured on the old table, neither set the bar nor counted against patience:
    # epoch 4 trained; the best model (epoch 1's) and the resumed epoch 3 were measured again
    assert len(history) == 4
    assert history[1]["val_cider"] == on_old_table["old"][1]["val_cider"]
    assert history[1].get("cider_df_sha256") != digest
    now = {h["epoch"]: h["val_cider"] for h in history if h.get("cider_df_sha256") == digest}
    assert sorted(now) == [1, 3, 4] and max(now.values()) < 1
    with open(os.path.join(on_old_table["run"], "best.json")) as f:
        best = json.load(f)
    winner = max(now, key=lambda e: (now[e], -e))   # a tie keeps the earlier model
    assert best["epoch"] == winner
    if winner != 1:
        assert best["monitor"] == "val_cider" and best["value"] == now[winner]


def test_val_cider_measured_with_a_val_image_lost_since_is_measured_again(
        shapes_data, three_epochs, tmp_path):
    """A val image lost its features between two trainings of a run (its feature file
    deleted): the earlier epochs' val_cider, measured with it, stayed the bar of best.keras
    and early stopping for epochs measured without it, with nothing said. Now a note names
    the image, and the restored epoch (and best.keras) are measured again on the images the
    next epochs are measured on."""
    shutil.copytree(three_epochs / "cache", tmp_path / "cache")
    shutil.copytree(three_epochs / "run", tmp_path / "run")
    run = str(tmp_path / "run")
    with open(os.path.join(run, "split.json")) as f:
        first = sorted(json.load(f)["splits"]["val"])[0]   # a metric image: the first ones
    os.remove(os.path.join(tmp_path / "cache", first + ".npy"))
    old = _history(run)
    notes = []
    _resume(shapes_data, {"run": run, "cache": str(tmp_path / "cache")}, notes, epochs=4,
            patience=2)
    assert any(n.startswith(f"note: 1 val images {run} had usable features of when it last "
                            f"started have none now (e.g. {first!r})") for n in notes), notes
    said = [n for n in notes if "measured val_cider on other validation images" in n]
    assert len(said) == 1, notes
    remeasured = said[0].split("measured again on the current ones: ")[1]
    assert remeasured.startswith(("epoch 1 (best.keras) ", "epoch 3 ")) and \
        "epoch 3 " in remeasured.split(". Early stopping")[0], said   # the restored one
    history = _history(run)
    assert len(history) == 4
    new = history[3]["val_cider_images_sha256"]
    assert new != old[2]["val_cider_images_sha256"]
    assert history[2]["val_cider_images_sha256"] == new          # the restored epoch
    with open(os.path.join(run, "best.json")) as f:
        best = json.load(f)
    assert history[best["epoch"] - 1]["val_cider_images_sha256"] == new   # best.keras's
    if best["monitor"] == "val_cider":     # (else the cross-entropy epoch's, by val_loss)
        assert best["value"] == history[best["epoch"] - 1]["val_cider"]


def test_a_resume_with_the_same_train_references_keeps_the_val_cider_bar(shapes_data,
                                                                         on_old_table):
    """Nothing changed: no note, and the recorded values stay the bar (x1000 here: the run
    had stopped by patience, and stays stopped)."""
    notes = []
    summary = _resume(shapes_data, on_old_table, notes, epochs=4, patience=2)
    assert not [n for n in notes if "cider_df.json" in n]
    assert summary["stopped_by"] == "early_stopping" and summary["epochs_now"] == 0
    assert _history(on_old_table["run"]) == on_old_table["old"]


def _weights_digest(model) -> str:
    import hashlib
    return hashlib.sha256(b"".join(v.numpy().tobytes()
                                   for v in model.trainable_variables)).hexdigest()


@pytest.fixture
def scripted_metrics(monkeypatch):
    """val_loss and val_cider scripted per epoch: each model is known by its weights (the
    model an epoch validated, restored from a checkpoint or loaded from best.keras), so a
    measure of best.keras gives its epoch's value. Epoch 1 is the best by val_loss, epoch 2
    (the last cross-entropy one) is worse on val_cider than epoch 1's model, epoch 3 beats
    epoch 2's val_cider but not epoch 1's, epoch 4 beats both (val_bleu4: epoch 1 the best
    of the cross-entropy epochs). Returns the best models saved ((epoch, monitor, value)),
    the val_cider measures (epochs) and the val_loss table (for a test to change)."""
    from caption_attn import validation
    from caption_attn.run import RunFolder
    val_loss, val_cider = {1: 1.0, 2: 2.0, 3: 3.0, 4: 3.0}, {1: 3.0, 2: 1.0, 3: 2.0, 4: 3.5}
    val_bleu4 = {1: 0.5, 2: 0.2, 3: 0.3, 4: 0.4}
    epochs, saved, measured = {}, [], []
    validate, save_best = train.Trainer._validate_model, RunFolder.save_best
    init = validation.Validator.__init__

    def validator_init(self, model, *args, **kwargs):
        init(self, model, *args, **kwargs)
        self.scripted_model = model

    def validate_model(self, epoch):
        epochs[_weights_digest(self.model)] = epoch + 1
        return validate(self, epoch)

    def evaluate_loss(self, split="val"):
        loss = val_loss[epochs[_weights_digest(self.model)]]
        return {"loss": loss, "ce": loss}

    def metrics(self, names):
        assert set(names) <= {"val_cider", "val_bleu4"}, names
        if not names:
            return {}
        epoch = epochs[_weights_digest(self.scripted_model)]
        measured.extend([epoch] * names.count("val_cider"))
        return {name: (val_cider if name == "val_cider" else val_bleu4)[epoch]
                for name in names}

    def record_save(self, model, epoch, monitor, value):
        saved.append((epoch, monitor, value))
        return save_best(self, model, epoch, monitor, value)

    monkeypatch.setattr(train.Trainer, "_validate_model", validate_model)
    monkeypatch.setattr(train.Trainer, "evaluate_loss", evaluate_loss)
    monkeypatch.setattr(validation.Validator, "__init__", validator_init)
    monkeypatch.setattr(validation.Validator, "metrics", metrics)
    monkeypatch.setattr(RunFolder, "save_best", record_save)
    return {"saved": saved, "measured": measured, "val_loss": val_loss}


def _tensorboard_steps(run, tag):
    import tensorflow as tf
    return [e.step for path in sorted(glob.glob(os.path.join(run, "logs", "validation",
                                                             "events.out.tfevents.*")))
            for e in tf.compat.v1.train.summary_iterator(path)
            for v in e.summary.value if v.tag == tag]


@pytest.mark.parametrize("how", ["one call", "resumed after a cross-entropy run",
                                 "resumed at the switch"])
def test_the_self_critical_stage_starts_from_the_better_of_best_keras_and_its_last_epoch(
        shapes_data, tmp_path, scripted_metrics, how):
    """With the default monitor (val_loss, then val_cider), the self-critical stage had to
    beat the val_cider of the last cross-entropy epoch only, while best.keras held an
    earlier epoch (the best by val_loss) whose val_cider was never measured: a self-critical
    epoch worse than best.keras on val_cider replaced it (epoch 3 here: 2.0, against
    best.keras's 3.0). Now best.keras's val_cider is measured at the switch and the stage
    starts from the better of the two; so is a run resumed there."""
    run, notes = str(tmp_path / "run"), []
    options = dict(patience=10, scst_samples=1, scst_baseline="greedy")
    if how == "resumed after a cross-entropy run":
        train.train(_config(shapes_data, epochs=2), run, progress=False, log=notes.append)
        assert scripted_metrics["measured"] == []   # none without self-critical epochs
    if how == "resumed at the switch":   # stopped by --max-steps at the end of epoch 2
        train.train(_config(shapes_data, epochs=1), run, progress=False, log=notes.append)
        steps = 2 * _history(run)[0]["steps"]
        train.train(_config(shapes_data, epochs=4, scst_after=2, max_steps=steps, **options),
                    run, progress=False, log=notes.append)
        assert len(_history(run)) == 2 and scripted_metrics["measured"] == [2]
    if how != "one call":
        assert scripted_metrics["saved"] == [(1, "val_loss", 1.0)]
    train.train(_config(shapes_data, epochs=4, scst_after=2, **options), run,
                progress=False, log=notes.append)
    history = _history(run)
    assert [h["stage"] for h in history] == ["cross-entropy"] * 2 + ["self-critical"] * 2
    assert [h.get("val_cider") for h in history] == [3.0, 1.0, 2.0, 3.5]
    assert history[0]["val_cider_images_sha256"] == history[1]["val_cider_images_sha256"]
    # best.keras is replaced only by the self-critical epoch that beats it
    assert scripted_metrics["saved"] == [(1, "val_loss", 1.0), (4, "val_cider", 3.5)]
    with open(os.path.join(run, "best.json")) as f:
        assert json.load(f)["epoch"] == 4
    said = [n for n in notes if "the self-critical stage starts from" in n]
    assert said == [f"note: the self-critical stage starts from {run}/best.keras (epoch 1, "
                    f"the best by val_loss) at val_cider=3.0000, better than epoch 2's "
                    f"1.0000 (the model it trains from): a self-critical epoch replaces it "
                    f"only when it beats 3.0000"], notes
    # TensorBoard has best.keras's value at its epoch, in step order (no later step before)
    assert _tensorboard_steps(run, "epoch_cider") == [1, 2, 3, 4]


@pytest.mark.parametrize("earlier, epochs", [("val_cider", (2, 3)), ("val_bleu4", (2, 3)),
                                            ("val_bleu4", (1, 4))],
                         ids=["val_cider, switch at a resume", "val_bleu4, switch at a resume",
                              "val_bleu4, switch in"])   # (val_cider, switch in: as before)
def test_best_keras_chosen_by_an_earlier_monitor_is_the_self_critical_stage_bar_too(
        shapes_data, tmp_path, scripted_metrics, earlier, epochs):
    """Cross-entropy epochs trained with --monitor val_cider (or val_bleu4) kept epoch 1,
    then the run resumed with the default monitor and --scst-after: early stopping's replay
    leaves those epochs out (another metric's comparisons), so the stage started from epoch
    2's val_cider (1.0) alone, and self-critical epoch 3 (2.0) replaced best.keras (3.0).
    Now best.keras is a start of the stage (measured first when its epoch has no val_cider),
    whether the stage starts at a resume or within one call, and when the run is resumed
    again after the switch."""
    run, notes = str(tmp_path / "run"), []
    options = dict(scst_after=2, patience=10, scst_samples=1, scst_baseline="greedy")
    train.train(_config(shapes_data, epochs=epochs[0], monitor=earlier), run,
                progress=False, log=notes.append)
    assert scripted_metrics["saved"] == [(1, earlier, {"val_cider": 3.0,
                                                       "val_bleu4": 0.5}[earlier])]
    for last in range(epochs[1], 5):
        train.train(_config(shapes_data, epochs=last, **options), run, progress=False,
                    log=notes.append)
    assert [h.get("val_cider") for h in _history(run)] == [3.0, 1.0, 2.0, 3.5]
    assert scripted_metrics["saved"][1:] == [(4, "val_cider", 3.5)]
    said = [n for n in notes if "the self-critical stage starts from" in n]
    assert said == ([] if earlier == "val_cider" else [
        f"note: the self-critical stage starts from {run}/best.keras (epoch 1, the best by "
        f"val_bleu4) at val_cider=3.0000, better than epoch 2's 1.0000 (the model it trains "
        f"from): a self-critical epoch replaces it only when it beats 3.0000"]), notes
    # epoch 1's val_cider measured once (as its epoch's monitor, or before the stage): it
    # is recorded in history.json
    assert scripted_metrics["measured"].count(1) == 1


@pytest.mark.parametrize("first", [None, "val_cider"])
def test_a_best_model_whose_save_was_lost_is_no_start_of_the_stage(shapes_data, tmp_path,
                                                                    scripted_metrics,
                                                                    monkeypatch, first):
    """Epoch 2, the last cross-entropy one, was the best by val_loss, but the process died
    before its best-model save: best.json still names epoch 1, and the resume saves epoch 2
    (`Trainer._repair_best`). Epoch 1's model, no longer best.keras by then, is neither
    measured (the note named it falsely) nor part of the stage's bar: trained with
    --monitor val_cider, its 3.0 was the bar, and self-critical epoch 3 (2.0), better than
    best.keras by then, was not saved."""
    from caption_attn.run import RunFolder
    scripted_metrics["val_loss"][2] = 0.5
    run, notes = str(tmp_path / "run"), []
    recorded = RunFolder.save_best

    def dies_at_epoch_2(self, model, epoch, *args):
        if epoch == 2:
            raise RuntimeError("killed")
        return recorded(self, model, epoch, *args)
    train.train(_config(shapes_data, epochs=1, monitor=first), run, progress=False,
                log=notes.append)
    with monkeypatch.context() as m:
        m.setattr(RunFolder, "save_best", dies_at_epoch_2)
        with pytest.raises(RuntimeError, match="killed"):
            train.train(_config(shapes_data, epochs=2), run, progress=False, log=notes.append)
    train.train(_config(shapes_data, epochs=4, scst_after=2, scst_samples=1,
                        scst_baseline="greedy"), run, progress=False, log=notes.append)
    assert scripted_metrics["saved"] == [(1, first or "val_loss", 3.0 if first else 1.0),
                                         (2, "val_loss", 0.5), (3, "val_cider", 2.0),
                                         (4, "val_cider", 3.5)]
    assert scripted_metrics["measured"].count(1) == (first is not None)   # its own epoch's
    assert not [n for n in notes if "the self-critical stage starts from" in n], notes


def test_an_explicit_monitor_val_cider_from_a_resume_on_starts_from_the_resumed_epoch(
        shapes_data, tmp_path, scripted_metrics):
    """--monitor val_cider given at a resume of default-monitor epochs follows the rule of
    any run resumed with another --monitor: the resumed epoch is the one to beat (epoch 2's
    1.0); best.keras (epoch 1, by val_loss) is not measured, nor named in a note."""
    run, notes = str(tmp_path / "run"), []
    train.train(_config(shapes_data, epochs=2), run, progress=False, log=notes.append)
    train.train(_config(shapes_data, epochs=4, scst_after=2, monitor="val_cider",
                        scst_samples=1, scst_baseline="greedy"), run, progress=False,
                log=notes.append)
    assert scripted_metrics["saved"] == [(1, "val_loss", 1.0), (3, "val_cider", 2.0),
                                         (4, "val_cider", 3.5)]
    assert scripted_metrics["measured"] == [2, 3, 4]
    assert not [n for n in notes if "the self-critical stage starts from" in n], notes


def test_a_resume_after_the_switch_keeps_best_keras_measured_there(shapes_data, tmp_path,
                                                                   scripted_metrics):
    """Stopped after the first self-critical epoch (which did not beat best.keras) and
    resumed: the replay starts the stage from best.keras's value recorded in history.json
    (measured once), not from the last cross-entropy epoch's."""
    run = str(tmp_path / "run")
    quiet = dict(progress=False, log=lambda *a: None)
    options = dict(scst_after=2, scst_samples=1, scst_baseline="greedy")
    train.train(_config(shapes_data, epochs=3, **options), run, **quiet)
    assert scripted_metrics["measured"] == [2, 1, 3]
    train.train(_config(shapes_data, epochs=4, **options), run, **quiet)
    assert scripted_metrics["measured"] == [2, 1, 3, 4]
    assert scripted_metrics["saved"] == [(1, "val_loss", 1.0), (4, "val_cider", 3.5)]
    assert _tensorboard_steps(run, "epoch_cider") == [1, 2, 3, 4]


@pytest.mark.parametrize("best_cider, bar", [(3.0, (3.0, 0, 1)), (0.5, (1.0, 1, 1))])
def test_the_replay_starts_a_stage_from_the_better_of_the_best_epoch_and_the_last_one(
        best_cider, bar):
    """(best, 0-based best epoch, wait) after a self-critical epoch (val_cider 0.8) that
    beats neither: the best epoch's val_cider when better (a resume finds it in
    history.json), else the last cross-entropy epoch's."""
    from caption_attn.callbacks import EarlyStopping
    history = [{"epoch": 1, "val_loss": 1.0, "val_cider": best_cider},
               {"epoch": 2, "val_loss": 2.0, "val_cider": 1.0},
               {"epoch": 3, "val_loss": 3.0, "val_cider": 0.8}]
    early = EarlyStopping(lambda e: "val_cider" if e >= 2 else "val_loss", patience=5,
                          initial_history=history)
    assert not early.replay()
    assert (early.best, early.best_epoch, early.wait) == bar


def test_a_finished_run_recorded_before_unordered_digests_is_loaded_to_record_them(
        continued, shapes_data, tmp_path, monkeypatch):
    """A rerun with nothing to train skips loading the data (`rerun_without_data`), and
    so never rewrote split.json: a run recorded before `caption_data.unordered_digests`
    never gained them (and `evaluate` compared its references in order). Now it is loaded
    once, which records them; the next rerun is quick again."""
    from caption_attn import data as data_lib
    run = str(tmp_path / "run")
    shutil.copytree(continued["run"], run)
    path = os.path.join(run, "split.json")
    with open(path) as f:
        split = json.load(f)
    recorded = split["caption_data"].pop("unordered_digests")
    with open(path, "w") as f:
        json.dump(split, f)
    loads, real = [], data_lib.load_dataset
    monkeypatch.setattr(data_lib, "load_dataset",
                        lambda p, *a, **k: loads.append(p) or real(p, *a, **k))
    cfg = _config(shapes_data, epochs=3, scst_after=1)
    for _ in range(2):
        summary = train.train(cfg, run, progress=False, log=lambda *a: None)
        assert summary["steps_now"] == 0 and len(loads) == 1
    with open(path) as f:
        assert json.load(f)["caption_data"]["unordered_digests"] == recorded
