"""--ema: Keras' exponential moving average of the weights is what validation, the best model
and the sample heatmaps see; training goes on from the trained weights, checkpoints keep both
where they belong, and a run stopped in its validation resumes as if never stopped."""

import glob
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_attn import train
from caption_attn.errors import UserError
from caption_attn.feature_cache import feature_path
from caption_attn.optimizer import AveragedWeights, FusedAdam, inner
from caption_attn.run import RunFolder
from test_train import NO_DECODING, run_trainer, small_config

EMA = 0.9


def _optimizer(ema: float, values=((1.0, 2.0), (3.0,))):
    variables = [keras.Variable(np.array(v, np.float32)) for v in values]
    optimizer = FusedAdam(0.1, use_ema=ema > 0, ema_momentum=ema or 0.99)
    optimizer.build(variables)
    return optimizer, variables


def test_a_block_sees_the_averages_and_puts_the_trained_weights_back():
    optimizer, variables = _optimizer(EMA)
    for _ in range(3):
        optimizer.apply_gradients(zip([tf.ones([2]), tf.ones([1])], variables))
    trained = [v.numpy() for v in variables]
    averages = [a.numpy() for a in optimizer._model_variables_moving_average]
    assert not np.allclose(trained[0], averages[0])          # the average lags behind
    averaged = AveragedWeights(optimizer)
    with averaged():
        for v, a in zip(variables, averages):
            np.testing.assert_array_equal(v.numpy(), a)
        with averaged():                                      # nested: no second swap
            np.testing.assert_array_equal(variables[0].numpy(), averages[0])
        np.testing.assert_array_equal(variables[0].numpy(), averages[0])
    for v, t in zip(variables, trained):
        np.testing.assert_array_equal(v.numpy(), t)
    for a, was in zip(optimizer._model_variables_moving_average, averages):
        np.testing.assert_array_equal(a.numpy(), was)
    # a block stopped by an error puts them back too; put(False) is then a no-op
    with pytest.raises(KeyboardInterrupt), averaged():
        raise KeyboardInterrupt
    averaged.put(False)
    np.testing.assert_array_equal(variables[0].numpy(), trained[0])
    # put(True) without a block (a stop between two swaps): put(False) undoes it, once
    averaged.put(True)
    averaged.put(True)
    np.testing.assert_array_equal(variables[0].numpy(), averages[0])
    averaged.put(False)
    averaged.put(False)
    np.testing.assert_array_equal(variables[0].numpy(), trained[0])


def test_the_average_starts_at_the_first_steps_weights_and_widens_with_the_steps():
    """Momentum min(M, (1 + t) / (10 + t)) at step t, 0 at the first: Keras' fixed momentum
    kept most of the starting weights in the average of a short run (0.995 after 76 steps:
    68 %), whose best model then said nothing sensible."""
    optimizer, variables = _optimizer(0.995, values=((0.0,),))
    expected = 0.0
    for t in range(40):
        optimizer.apply_gradients([(tf.constant([-1.0]), variables[0])])
        m = 0.0 if t == 0 else min(0.995, (1 + t) / (10 + t))
        expected = m * expected + (1 - m) * float(variables[0].numpy()[0])
        assert float(optimizer._model_variables_moving_average[0].numpy()[0]) == \
            pytest.approx(expected, rel=1e-5)
    # 40 steps of +0.1 each (Adam's steps on a constant gradient): the average lags about 4
    # steps behind (Keras' fixed momentum of 0.995 left it about 35 steps behind, at 0.47)
    lag = (float(variables[0].numpy()[0]) - expected) / 0.1
    assert 3.0 < lag < 5.0


def test_without_ema_a_block_changes_nothing():
    optimizer, variables = _optimizer(0.0)
    optimizer.apply_gradients(zip([tf.ones([2]), tf.ones([1])], variables))
    before = [v.numpy() for v in variables]
    with AveragedWeights(optimizer)():
        np.testing.assert_array_equal(variables[0].numpy(), before[0])
    np.testing.assert_array_equal(variables[1].numpy(), before[1])


def _checkpointed(cfg, run):
    """The model and optimizer of `run`'s newest checkpoint, restored into new objects."""
    folder = RunFolder(run)
    _, objects = train.training_state(cfg, len(folder.load_vocab()), 1)
    newest = tf.train.latest_checkpoint(folder.checkpoints)
    tf.train.Checkpoint(**objects).restore(newest).expect_partial()
    return objects["model"], objects["optimizer"]


def test_validation_and_the_best_model_use_the_average_and_training_the_weights(
        shapes_data, tmp_path):
    run = str(tmp_path / "run")
    cfg = small_config(shapes_data, epochs=2, ema=EMA, **NO_DECODING)
    trainer, summary = run_trainer(cfg, run)
    with open(os.path.join(run, "best.json")) as f:
        assert json.load(f)["epoch"] == 2   # so the newest checkpoint is the best epoch's
    model, optimizer = _checkpointed(cfg, run)
    best = keras.saving.load_model(os.path.join(run, "best.keras"), compile=False)
    trained = [v.numpy() for v in model.trainable_variables]
    averages = [a.numpy() for a in optimizer._model_variables_moving_average]
    saved = {v.path: v.numpy() for v in best.trainable_variables}
    assert len(saved) == len(averages)
    for v, a, t in zip(model.trainable_variables, averages, trained):
        np.testing.assert_array_equal(saved[v.path], a)       # best.keras: the average
    assert not all(np.allclose(a, t) for a, t in zip(averages, trained))
    # history's val_loss is the average's: the best model's loss on the val split
    trainer.model.set_weights(best.get_weights())
    with open(os.path.join(run, "history.json")) as f:
        history = json.load(f)
    assert history[-1]["val_loss"] == pytest.approx(trainer.evaluate_loss("val")["loss"],
                                                    rel=1e-5)
    for v, t in zip(trainer.model.trainable_variables, trained):   # the trained weights
        v.assign(t)
    assert history[-1]["val_loss"] != pytest.approx(trainer.evaluate_loss("val")["loss"],
                                                    rel=1e-5)


def test_a_run_stopped_in_its_validation_resumes_as_an_uninterrupted_one(
        shapes_data, tmp_path, monkeypatch, default_sigint):
    """A Ctrl-C while validation holds the averages in the model: the checkpoint saved then
    holds the trained weights and the averages each in its place, so the rerun ends where
    an uninterrupted run does (the same losses, weights and averages)."""
    cfg = small_config(shapes_data, epochs=2, lr_schedule="cosine", ema=EMA, **NO_DECODING)
    whole = str(tmp_path / "whole")
    run_trainer(cfg, whole)
    run = str(tmp_path / "run")
    validate = train.Trainer._validate_model
    seen = []

    def ctrl_c_in_the_second_validation(self, epoch):
        seen.append(bool(self.averaged.swapped.numpy()))
        if epoch == 1:
            raise KeyboardInterrupt
        return validate(self, epoch)
    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "_validate_model", ctrl_c_in_the_second_validation)
        with pytest.raises(KeyboardInterrupt):
            run_trainer(cfg, run)
    assert seen == [True, True]                      # validated with the averages in
    _, summary = run_trainer(cfg, run)
    assert summary["steps_now"] == 0                  # only the epoch's end was left

    def losses(path):
        with open(os.path.join(path, "history.json")) as f:
            return [(h["epoch"], h["loss"], h["val_loss"]) for h in json.load(f)]
    np.testing.assert_allclose(losses(run), losses(whole), rtol=1e-5)
    (m1, o1), (m2, o2) = _checkpointed(cfg, run), _checkpointed(cfg, whole)
    for a, b in zip(m1.trainable_variables + o1._model_variables_moving_average,
                    m2.trainable_variables + o2._model_variables_moving_average):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("was, now", [(0.0, EMA), (EMA, 0.0)])
def test_turning_ema_on_or_off_on_resume_is_refused_before_writing(shapes_data, tmp_path,
                                                                   was, now):
    run = str(tmp_path / "run")
    run_trainer(small_config(shapes_data, epochs=1, max_steps=2, ema=was, **NO_DECODING), run)
    def files():
        return {p: open(p, "rb").read() for p in glob.glob(os.path.join(run, "**"),
                                                            recursive=True) if os.path.isfile(p)}
    before = files()
    with pytest.raises(UserError) as e:
        train.train(small_config(shapes_data, epochs=1, ema=now, **NO_DECODING), run,
                    progress=False, log=lambda *a: None)
    assert f"--ema {now:g}: {run} was trained " in str(e.value)
    assert f"resume with --ema {was:g}" in str(e.value) and "--fresh" in str(e.value)
    assert ("(or another momentum)" in str(e.value)) == (was > 0)
    assert files() == before


def test_another_momentum_on_resume_is_noted_and_trains_on(shapes_data, tmp_path):
    run = str(tmp_path / "run")
    run_trainer(small_config(shapes_data, epochs=2, max_steps=2, ema=EMA, **NO_DECODING), run)
    notes = train.open_run(run, small_config(shapes_data, epochs=2, max_steps=4, ema=0.99,
                                             **NO_DECODING))
    assert any("train.ema: 0.9 -> 0.99" in n for n in notes), notes
    trainer, summary = run_trainer(small_config(shapes_data, epochs=2, max_steps=4, ema=0.99,
                                                **NO_DECODING), run)
    assert summary["steps_now"] == 2
    assert inner(trainer.optimizer).ema_momentum == 0.99
    assert RunFolder(run).load_config().train.ema == 0.99


@pytest.fixture
def seen(monkeypatch):
    """[(what, whether the average was in the model)] for every validation loss ("loss"),
    decoded metric ("metrics") and sample heatmaps ("samples") of the runs trained after.
    Not for a run that measures best.keras again (`Trainer._best_model_measure`): that
    model is already the average, put in the model's weights without the swap."""
    from caption_attn import validation
    made, seen = [], []
    init = train.AveragedWeights.__init__

    def keep(self, optimizer):
        init(self, optimizer)
        made.append(self)

    def noting(name, real):
        def wrapped(self, *args, **kwargs):
            seen.append((name, bool(made[-1].swapped.numpy())))
            return real(self, *args, **kwargs)
        return wrapped
    monkeypatch.setattr(train.AveragedWeights, "__init__", keep)
    monkeypatch.setattr(train.Trainer, "evaluate_loss",
                        noting("loss", train.Trainer.evaluate_loss))
    monkeypatch.setattr(validation.Validator, "metrics",
                        noting("metrics", validation.Validator.metrics))
    monkeypatch.setattr(validation.SampleFigures, "__call__",
                        noting("samples", validation.SampleFigures.__call__))
    return seen


def test_every_measurement_decoding_and_redrawing_uses_the_average(shapes_data, tmp_path,
                                                                   seen):
    """Each place that measures or draws a trained epoch's model does so with the average in
    the model: the epoch's validation (loss, val_bleu4) and sample heatmaps, the metric a
    resume with another --monitor measures on the restored model, and the heatmaps a resume
    draws again for an epoch that lost them."""
    run = str(tmp_path / "run")
    base = dict(ema=EMA, sample_images=1, bleu_images=4)
    run_trainer(small_config(shapes_data, epochs=1, **base), run,
                images=shapes_data["images"])
    assert {name for name, _ in seen} == {"loss", "metrics", "samples"} and \
        all(averaged for _, averaged in seen), seen
    # resumed with another monitor: val_bleu4 of the restored epoch 1, measured first
    seen.clear()
    run_trainer(small_config(shapes_data, epochs=2, monitor="val_bleu4", **base), run,
                images=shapes_data["images"])
    assert seen[0] == ("metrics", True) and all(averaged for _, averaged in seen), seen
    # epoch 2's heatmaps lost: a resume draws them again first, from the average
    lost = glob.glob(os.path.join(run, "attention", "epoch_2", "*.png"))
    assert lost
    for png in lost:
        os.remove(png)
    seen.clear()
    run_trainer(small_config(shapes_data, epochs=3, monitor="val_bleu4", **base), run,
                images=shapes_data["images"])
    assert seen[0] == ("samples", True) and all(averaged for _, averaged in seen), seen
    assert sorted(glob.glob(os.path.join(run, "attention", "epoch_2", "*.png"))) == sorted(lost)


def test_val_cider_measured_again_on_a_new_table_is_the_averages(shapes_data, copy_cache,
                                                                 tmp_path, seen):
    """A resume whose train references changed measures the restored epoch's val_cider
    again with the new document frequencies: from the average, as the epoch was measured
    (with the trained weights, the bar for the next epochs was another model's)."""
    run = str(tmp_path / "run")
    base = dict(ema=EMA, monitor="val_cider", sample_images=0, bleu_images=4)
    run_trainer(small_config(shapes_data, cache=copy_cache, epochs=1, **base), run)
    os.remove(feature_path(copy_cache, RunFolder(run).load_splits()["train"][0]))
    with open(os.path.join(run, "history.json")) as f:
        before = json.load(f)[0]["val_cider"]
    seen.clear()
    notes = []
    cfg = small_config(shapes_data, cache=copy_cache, epochs=2, **base)
    train.open_run(run, cfg)
    train.Trainer(cfg, run, progress=False, log=notes.append).fit()
    assert [n for n in notes if "measured again with the new ones: epoch 1 (best.keras)" in n]
    assert seen[0] == ("metrics", True) and all(averaged for _, averaged in seen), seen
    with open(os.path.join(run, "history.json")) as f:
        assert json.load(f)[0]["val_cider"] != before


def test_a_best_model_lost_to_a_crash_is_saved_again_from_the_average(shapes_data, tmp_path,
                                                                      monkeypatch):
    """A process that died between epoch 2's checkpoint and its best model: the resume saves
    the restored epoch as the best model, and with --ema that is the restored average."""
    from caption_attn.run import RunFolder as Folder
    run = str(tmp_path / "run")
    cfg = small_config(shapes_data, epochs=2, ema=EMA, **NO_DECODING)
    save_best = Folder.save_best

    def dies_at_epoch_2(self, model, epoch, *args, **kwargs):
        if epoch == 2:
            raise RuntimeError("killed")
        return save_best(self, model, epoch, *args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(Folder, "save_best", dies_at_epoch_2)
        with pytest.raises(RuntimeError, match="killed"):
            run_trainer(cfg, run)
    with open(os.path.join(run, "best.json")) as f:
        assert json.load(f)["epoch"] == 1
    model, optimizer = _checkpointed(cfg, run)                    # the end of epoch 2
    averages = [a.numpy() for a in optimizer._model_variables_moving_average]
    # one step into epoch 3, which does not end: best.keras stays what the resume saved
    run_trainer(small_config(shapes_data, epochs=3, ema=EMA, **NO_DECODING,
                             max_steps=int(optimizer.iterations.numpy()) + 1), run)
    with open(os.path.join(run, "best.json")) as f:
        assert json.load(f)["epoch"] == 2
    best = keras.saving.load_model(os.path.join(run, "best.keras"), compile=False)
    saved = {v.path: v.numpy() for v in best.trainable_variables}
    for v, a in zip(model.trainable_variables, averages):
        np.testing.assert_array_equal(saved[v.path], a)
    assert not all(np.allclose(a, v.numpy()) for a, v in zip(averages,
                                                              model.trainable_variables))
