import dataclasses
import glob
import json
import math
import os
import re
import shutil
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_attn import feature_cache, train
from caption_attn.config import DataConfig, ModelConfig, RunConfig, TrainConfig, VocabConfig
from caption_attn.errors import OutOfMemory, UserError
from caption_attn.run import RunFolder
from caption_attn.steps import EpochTotals
from caption_attn.vocab import tokenize

SMALL_MODEL = ModelConfig(embedding_dim=32, units=64, dropout=0.2)
# For runs whose heatmaps and BLEU are not what the test checks: no sample heatmaps, no
# validation decoding (each fit would trace the greedy decoder and draw the heatmaps).
NO_DECODING = dict(sample_images=0, bleu_images=0)


def small_config(shapes_data, cache=None, **train_overrides) -> RunConfig:
    options = dict(epochs=3, batch_size=16, learning_rate=1e-2, patience=10, sample_images=2,
                   bleu_images=8)
    options.update(train_overrides)
    return RunConfig(captions=shapes_data["captions"], cache=cache or shapes_data["cache"],
                     data=DataConfig(seed=1), vocab=VocabConfig(max_length=20),
                     model=SMALL_MODEL, train=TrainConfig(**options))


def run_trainer(cfg, run_dir, images=None):
    train.open_run(run_dir, cfg, fresh=cfg.train.fresh)
    trainer = train.Trainer(cfg, run_dir, images_dir=images, progress=False,
                            log=lambda *a: None)
    return trainer, trainer.fit()


@pytest.fixture(scope="module")
def trained(shapes_data, tmp_path_factory):
    """One run of 4 epochs monitoring val_bleu4 (so every metric and tag gets written)."""
    run = str(tmp_path_factory.mktemp("run") / "shapes")
    cfg = small_config(shapes_data, epochs=4, monitor="val_bleu4")
    trainer, summary = run_trainer(cfg, run, images=shapes_data["images"])
    with open(os.path.join(run, "history.json")) as f:
        history = json.load(f)
    return {"run": run, "cfg": cfg, "trainer": trainer, "summary": summary, "history": history}


def test_loss_goes_down_clearly(trained):
    history = trained["history"]
    print([(round(h["ce"], 3), round(h["loss"], 3), round(h["val_ce"], 3)) for h in history])
    assert len(history) == 4
    # cross-entropy per token from ~log(V) = 3.4 to well under half of that
    assert history[-1]["ce"] < 0.5 * history[0]["ce"]
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    assert history[-1]["val_ce"] < 0.6 * history[0]["val_ce"]


def test_training_scans_only_the_young_heap_before_its_epochs(shapes_data, tmp_path,
                                                             monkeypatch):
    """Before its epochs `fit` collects garbage and freezes what lives (full collections in
    the epochs skip it). A full collection there scanned every object of the process: 0.6 s
    per `fit` in a test process (27 s of test_train.py on 2 Zen 4 cores); the garbage is
    what building and tracing the steps just left, in the young generations."""
    import gc
    calls = []
    real = gc.collect
    monkeypatch.setattr(train, "gc", types.SimpleNamespace(
        collect=lambda *a: calls.append(a) or real(*a), freeze=gc.freeze,
        unfreeze=gc.unfreeze))
    run_trainer(small_config(shapes_data, epochs=1, max_steps=2, sample_images=0),
                str(tmp_path / "run"))
    assert calls == [(1,)]
    assert gc.get_freeze_count() == 0                      # unfrozen again after training


def test_run_folder_layout(trained):
    run = trained["run"]
    for name in ("config.json", "vocab.json", "split.json", "history.json", "best.keras",
                 "best.json", "checkpoints/checkpoint"):
        assert os.path.isfile(os.path.join(run, name)), name
    assert glob.glob(os.path.join(run, "logs", "train", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(run, "logs", "validation", "events.out.tfevents.*"))
    for epoch in range(1, 5):
        pngs = glob.glob(os.path.join(run, "attention", f"epoch_{epoch}", "*.png"))
        assert len(pngs) == 2
    entry = trained["history"][0]
    for key in ("epoch", "loss", "ce", "val_loss", "val_bleu4", "gradient_norm",
                "captions_per_second", "learning_rate", "seconds", "steps", "monitor"):
        assert key in entry, key
    assert entry["monitor"] == "val_bleu4"    # what early stopping compared (--monitor)
    assert not glob.glob(os.path.join(run, "*.tmp*"))


def test_best_model_is_the_best_epoch(trained):
    history = trained["history"]
    best_epoch = max(history, key=lambda h: h["val_bleu4"])["epoch"]
    with open(os.path.join(trained["run"], "best.json")) as f:
        best = json.load(f)
    assert best["epoch"] == best_epoch == trained["summary"]["best_epoch"]
    assert best["monitor"] == "val_bleu4"


def test_split_is_by_image_and_vocab_from_train_only(trained, shapes_data):
    from caption_attn.run import splits_digest
    with open(os.path.join(trained["run"], "split.json")) as f:
        split = json.load(f)
    splits = split["splits"]
    assert split["splits_sha256"] == splits_digest(splits)   # checked by every load_splits
    with open(shapes_data["captions"]) as f:
        images = json.load(f)["images"]
    assert {s: sorted(splits[s]) for s in splits} == {
        s: sorted(i["filename"] for i in images if i["split"] == s) for s in splits}
    train_words = {w for i in images if i["split"] == "train"
                   for s in i["sentences"] for w in s["raw"].split()}
    vocab = trained["trainer"].data.vocab
    assert set(vocab.tokens[4:]) <= train_words


def test_features_standardised_with_train_statistics_only(trained, shapes_data):
    data = trained["trainer"].data
    model = keras.saving.load_model(os.path.join(trained["run"], "best.keras"))

    def stats(split):
        x = np.concatenate([np.load(data.feature_paths[k]).astype(np.float64)
                            for k in data.splits[split]])
        return x.mean(0), x.var(0)

    mean, variance = stats("train")
    np.testing.assert_allclose(model.feature_norm.mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.feature_norm.variance.numpy(), variance, rtol=1e-3,
                               atol=1e-5)
    assert not np.allclose(model.feature_norm.mean.numpy(), stats("val")[0], rtol=1e-4,
                           atol=1e-5)


def test_no_feature_norm_keeps_raw_features(shapes_data, tmp_path):
    cfg = small_config(shapes_data, epochs=1, max_steps=1, **NO_DECODING)
    cfg.model = ModelConfig(embedding_dim=32, units=64, feature_norm=False)
    trainer, _ = run_trainer(cfg, str(tmp_path / "raw"))
    np.testing.assert_array_equal(trainer.model.feature_norm.mean.numpy(), 0.0)
    np.testing.assert_array_equal(trainer.model.feature_norm.variance.numpy(), 1.0)


def _tags(folder):
    import tensorflow as tf
    tags = set()
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add((value.tag, value.metadata.plugin_data.plugin_name))
    return tags


def test_tensorboard_has_every_tag(trained):
    logs = os.path.join(trained["run"], "logs")
    train_tags = {t for t, _ in _tags(os.path.join(logs, "train"))}
    assert {"epoch_loss", "epoch_learning_rate", "epoch_captions_per_second",
            "epoch_gradient_norm"} <= train_tags
    val = _tags(os.path.join(logs, "validation"))
    val_tags = {t for t, _ in val}
    # the loss has the same tag in both runs, so TensorBoard draws both curves in one chart
    assert {"epoch_loss", "epoch_bleu4"} <= val_tags
    assert ("captions", "text") in val
    assert sum(1 for t, plugin in val if t.startswith("attention/") and plugin == "images") == 2
    assert any(plugin == "hparams" for _, plugin in _tags(logs))


def test_train_step_traced_once_over_varied_lengths(trained):
    trainer = trained["trainer"]
    shapes = {int(b[2].shape[1]) for b in trainer.inputs.captions("train", epoch=0)}
    assert len(shapes) >= 3                          # several bucket lengths were trained on
    assert trainer.train_step.experimental_get_tracing_count() == 1
    assert trainer.eval_step.experimental_get_tracing_count() == 1


def test_validation_loss_is_that_of_the_length_buckets_it_merged(trained):
    """The validation batches merge adjacent length buckets (`pipeline.merged_boundaries`):
    fewer batches, and the loss of one batch per bucket to rounding (a sum over tokens)."""
    from caption_attn import pipeline
    trainer = trained["trainer"]
    inputs = trainer.inputs
    paths, tokens = inputs.items["val"]
    size = train.EVAL_BATCH_FACTOR * trainer.cfg.train.batch_size
    plain = list(pipeline.caption_dataset(paths, tokens, size, inputs.boundaries,
                                          inputs.data.reader, inputs.table))
    sums = dict.fromkeys(("ce_sum", "tokens", "reg_sum", "caption_count"), 0.0)
    for batch in plain:
        for k, v in trainer.eval_step(batch).items():
            sums[k] += float(v)
    loss = sums["ce_sum"] / sums["tokens"] + sums["reg_sum"] / sums["caption_count"]
    merged = list(inputs.captions("val", batch_size=size))
    assert 1 <= len(merged) < len(plain)
    assert sum(int(b[2].shape[0]) for b in merged) == len(tokens)     # every caption once
    assert trainer.evaluate_loss("val")["loss"] == pytest.approx(loss, rel=1e-5)


def test_rerun_of_a_finished_run_trains_nothing(trained):
    run = trained["run"] + "_copy"
    shutil.copytree(trained["run"], run)
    trainer, summary = run_trainer(trained["cfg"], run)
    with open(os.path.join(run, "history.json")) as f:
        assert json.load(f) == trained["history"]
    # nothing traced (seconds per rerun): no training step, no sample decoding
    assert trainer.steps.train_step is None and trainer.steps.scst_step is None
    assert trainer.validator._decoder.experimental_get_tracing_count() == 0
    assert summary["epochs"] == 4
    assert summary["steps_now"] == 0 and summary["epochs_now"] == 0
    steps = summary["steps"]
    assert train.format_summary(summary).splitlines()[0].startswith(
        f"nothing to train: the run already finished epoch 4 of 4, step {steps}")
    cfg = small_config_like(trained, train=dataclasses.replace(trained["cfg"].train, epochs=1))
    _, summary = run_trainer(cfg, run)  # --epochs 1 on a run that finished 4
    assert summary["steps_now"] == 0
    assert train.format_summary(summary).startswith(
        f"nothing to train: the run already finished epoch 4 (--epochs 1), step {steps}")


def test_a_rerun_that_trains_nothing_keeps_the_runs_training_settings(trained, tmp_path):
    """`--learning-rate 0.05 --lr-schedule cosine --clip-norm 0` on a finished run trains
    nothing, yet config.json said the run was trained so; the next resume's note on changed
    settings then compared with settings no step used. config.json keeps the run's training
    settings until a call trains with new ones."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    saved = RunFolder(run).load_config()
    other = dataclasses.replace(saved.train, learning_rate=0.05, lr_schedule="cosine",
                                clip_norm=0.0, epochs=2)
    _, summary = run_trainer(dataclasses.replace(saved, train=other), run)
    assert summary["steps_now"] == 0
    assert RunFolder(run).load_config().train == saved.train
    more = dataclasses.replace(other, epochs=5, max_steps=summary["steps"] + 1)
    logs = []
    train.train(dataclasses.replace(saved, train=more), run, progress=False, log=logs.append)
    assert RunFolder(run).load_config().train == more            # trained with them now
    assert any("train.epochs: 4 -> 5" in line and "train.learning_rate: 0.01 -> 0.05" in line
               for line in logs), logs


def test_config_json_never_records_fresh(shapes_data, tmp_path):
    """--fresh says what one call does to the folder, not how the run was made: recorded, a
    later rerun's note listed `train.fresh: True -> False` as a changed setting."""
    run = str(tmp_path / "run")
    train.open_run(run, small_config(shapes_data, fresh=True), fresh=True)
    assert RunFolder(run).load_config().train.fresh is False


def test_resume_with_another_monitor_measures_it_and_continues(shapes_data, tmp_path):
    """--monitor is a training setting that may change on resume: `--monitor val_bleu4` on a
    run trained with val_loss stopped with `early stopping monitors 'val_bleu4' but the epoch
    logs have no value for it ... (an empty validation split?)`, even on a finished run.
    Now the epoch the run resumes from gets the new metric measured (its model is the one
    restored), and the epochs after it must beat it."""
    run = str(tmp_path / "run")
    run_trainer(small_config(shapes_data, epochs=1, sample_images=0), run)
    trainer, summary = run_trainer(small_config(shapes_data, epochs=1, monitor="val_bleu4",
                                                sample_images=0), run)   # nothing to train
    assert summary["steps_now"] == 0
    trainer, summary = run_trainer(small_config(shapes_data, epochs=2, monitor="val_bleu4",
                                                sample_images=0), run)
    with open(os.path.join(run, "history.json")) as f:
        history = json.load(f)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(isinstance(h.get("val_bleu4"), float) for h in history)
    assert summary["monitor"] == "val_bleu4" and summary["epochs_now"] == 1
    best = max(history, key=lambda h: h["val_bleu4"])
    assert summary["best_value"] == pytest.approx(best["val_bleu4"])
    # TensorBoard has the value measured on resume too (history.json had it, the chart not)
    assert _val_steps(run, "epoch_bleu4") == [1, 2]


def test_resume_with_other_model_config_is_refused(trained):
    cfg = small_config_like(trained, model=ModelConfig(embedding_dim=32, units=48, dropout=0.2))
    with pytest.raises(UserError) as e:
        train.open_run(trained["run"], cfg)
    assert "model.units: 64 -> 48" in str(e.value) and "--fresh" in str(e.value)
    assert f"{trained['run']} was trained with a different configuration" in str(e.value)


def test_other_model_settings_for_a_run_never_trained_do_not_say_it_was(trained, tmp_path):
    """A train stopped before its first checkpoint left config.json: the next call with
    other model flags was told the run "was trained with a different configuration"."""
    run = str(tmp_path / "run")
    train.open_run(run, small_config_like(trained))
    cfg = small_config_like(trained, model=ModelConfig(embedding_dim=32, units=48, dropout=0.2))
    with pytest.raises(UserError) as e:
        train.open_run(run, cfg)
    assert str(e.value).startswith(f"{run} was set up, by a train stopped before its first "
                                   f"checkpoint (nothing trained yet), with a different "
                                   f"configuration")


def small_config_like(trained, **changes) -> RunConfig:
    d = trained["cfg"]
    return RunConfig(captions=d.captions, cache=d.cache, data=d.data, vocab=d.vocab,
                     model=changes.get("model", d.model), train=changes.get("train", d.train))


def test_a_second_train_of_a_run_being_trained_is_refused(trained, tmp_path, monkeypatch):
    """Two `train`s of one run (a second terminal) restored the same checkpoint and wrote
    checkpoints, history.json and the best model over each other: nothing stopped them. It
    is refused before the checkpoint is restored to be checked and the captions parsed."""
    import fcntl

    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    before = _files(run)
    cfg = small_config_like(trained)
    with monkeypatch.context() as late, \
            open(os.path.join(run, ".train.lock"), "a+") as held:   # the first train's lock
        for name in ("reopen_checks", "load_train_data", "rerun_without_data"):
            late.setattr(train, name, lambda *a, **k: pytest.fail("refused late"))
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match=rf"another `caption-attn train` \(pid "
                                            rf"{os.getpid()}: .*\) is training this run now"):
            train.train(cfg, run, progress=False, log=lambda *a: None)
        with pytest.raises(UserError, match=rf"pid {os.getpid()}"):   # --fresh deletes nothing
            train.train(dataclasses.replace(cfg, train=dataclasses.replace(
                cfg.train, fresh=True)), run, progress=False, log=lambda *a: None)
        assert _files(run) == before and os.path.exists(os.path.join(run, "best.keras"))
    summary = train.train(cfg, run, progress=False, log=lambda *a: None)  # lock released
    assert summary["steps_now"] == 0


def test_train_fresh_while_evaluate_reads_the_run_is_refused(trained, tmp_path, monkeypatch):
    """`train --fresh` deleted the run's files while `evaluate` read them, and evaluate then
    wrote the deleted model's metrics into the fresh run: --fresh is refused, deleting
    nothing, while an evaluate, export or caption holds the run."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    before = _files(run)
    cfg = small_config_like(trained)
    fresh = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fresh=True))
    with RunFolder(run).reading_lock("evaluate"), monkeypatch.context() as late:
        late.setattr(train, "load_train_data", lambda *a, **k: pytest.fail("refused late"))
        with pytest.raises(UserError, match=rf"^--fresh: a `caption-attn evaluate`, `export` "
                                            rf"or `caption` \(pid {os.getpid()}: .*\) is "
                                            rf"reading --run {re.escape(run)} now; "):
            train.train(fresh, run, progress=False, log=lambda *a: None)
        assert _files(run) == before


def test_train_from_a_cache_being_extracted_is_refused(trained, tmp_path):
    """A `train` started while `extract-features` wrote its cache trained on the images done
    so far (their captions' vocabulary), with only a note; it is refused, writing nothing."""
    from caption_attn.feature_cache import using_features

    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    before = _files(run)
    with using_features(trained["cfg"].cache, writing=True):
        with pytest.raises(UserError, match=rf"^--cache {re.escape(trained['cfg'].cache)}: "
                                            rf"`caption-attn extract-features` \(pid "
                                            rf"{os.getpid()}: .*\) is writing into it now"):
            train.train(small_config_like(trained), run, progress=False, log=lambda *a: None)
    assert _files(run) == before


def test_a_model_too_large_for_memory_is_refused_before_anything(shapes_data, tmp_path):
    """--units 51200 (a typo for 512): 10 billion weights, 168 GB in training's float32
    copies; the process built them and ended in an OOM traceback after loading the data."""
    cfg = small_config(shapes_data)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, units=51200))
    with pytest.raises(UserError, match=r"^--units 51200 --embedding-dim 32 \(a vocabulary of "
                                        r"up to 5004 tokens\): the model has 10\.5 billion "
                                        r"weights, 168 GB in the 4 float32 copies .* more than "
                                        r"the 24 GB of memory this process may use; lower "
                                        r"--units / --embedding-dim \(the TF tutorial's: 512 / "
                                        r"256\) or "
                                        r"--vocab-size$"):
        train.check_model_size(cfg, memory_bytes=24 * 10 ** 9)
    with pytest.raises(UserError, match=r"^--units 51200 --embedding-dim 32 \(a vocabulary of "
                                        r"\d+ tokens\)"):   # the run's own, once counted
        train.train(cfg, str(tmp_path / "run"), progress=False, log=lambda *a: None)
    assert not (tmp_path / "run").exists()
    # a huge --vocab-size meant as "every word" is judged by the words there are
    every_word = dataclasses.replace(cfg, model=SMALL_MODEL,
                                     vocab=VocabConfig(vocab_size=10 ** 9))
    with pytest.raises(UserError, match=r"up to 1000000004 tokens"):
        train.check_model_size(every_word, memory_bytes=24 * 10 ** 9)
    train.check_model_size(every_word, memory_bytes=24 * 10 ** 9, vocab_tokens=33)
    train.check_model_size(small_config(shapes_data), memory_bytes=24 * 10 ** 9)  # passes
    # the COCO default sizes need 88 MB: refused only on a machine with less
    coco = RunConfig()
    train.check_model_size(coco, memory_bytes=89 * 10 ** 6)
    with pytest.raises(UserError, match=r"5\.53 million weights, 88\.4 MB in the 4 float32 "
                                        r"copies .* the 88 MB of memory this process may use"):
        train.check_model_size(coco, memory_bytes=88 * 10 ** 6)


def test_a_vocabulary_too_large_for_cider_is_refused_before_anything(shapes_data, tmp_path,
                                                                      monkeypatch):
    """CIDEr-D codes a 4-gram of word ids as one int64, so it takes at most 55,108 tokens:
    --vocab-size 60000 on captions of 56,400 words trained its cross-entropy epochs, then
    val_cider (--scst-after, --monitor val_cider) ended in a ValueError traceback and lost the
    epoch. Refused before the first write, by the vocabulary's real size (the limit lowered
    here, as 55,108 words would take a large caption file); a run that never measures CIDEr
    keeps any size."""
    from caption_attn import ngrams
    monkeypatch.setattr(ngrams, "MAX_VOCAB_SIZE", 10)
    run = str(tmp_path / "run")
    for options in (dict(scst_after=1), dict(monitor="val_cider")):
        with pytest.raises(UserError, match=r"^the vocabulary has (\d+) tokens \(\d+ words and 4 "
                                            r"special tokens\), but self-critical training and "
                                            r"val_cider .* takes at most 10 tokens: train with "
                                            r"--vocab-size 6 or less, .* or leave out "
                                            r"--scst-after and --monitor val_cider$"):
            train.train(small_config(shapes_data, epochs=2, **options), run, progress=False,
                        log=lambda *a: None)
        assert not os.path.exists(run)
    train.check_cider_vocabulary(small_config(shapes_data).train, 10 ** 6)   # never measured
    train.check_cider_vocabulary(small_config(shapes_data, scst_after=1).train, 10)


def test_fresh_starts_over(shapes_data, run_copy):
    """(The old run: a copy of the session's trained 3-epoch run.)"""
    run = run_copy.path
    with open(os.path.join(run, "history.json")) as f:
        assert len(json.load(f)) == 3
    old_results = RunFolder(run).eval_outputs("test")  # `evaluate` of the old model
    os.makedirs(os.path.dirname(old_results[0]), exist_ok=True)
    for path in old_results:
        with open(path, "w") as f:
            f.write("{}")
    os.makedirs(os.path.join(run, "mine"))
    for name in ("notes.txt", os.path.join("mine", "keep.txt")):  # not the run's files
        with open(os.path.join(run, name), "w") as f:
            f.write("kept")
    cfg = small_config(shapes_data, epochs=1, fresh=True, **NO_DECODING)
    cfg.model = ModelConfig(embedding_dim=16, units=32, dropout=0.2)  # allowed with --fresh
    _, summary = run_trainer(cfg, run)
    with open(os.path.join(run, "history.json")) as f:
        assert len(json.load(f)) == 1
    assert summary["epochs"] == 1
    # no metrics of the deleted model beside the new one; the user's files stay
    assert not os.path.exists(os.path.join(run, "eval"))
    assert sorted(os.listdir(os.path.join(run, "mine"))) == ["keep.txt"]
    assert os.path.isfile(os.path.join(run, "notes.txt"))


def test_max_steps_then_resume_mid_epoch(shapes_data, tmp_path, whole_cosine_run):
    run = str(tmp_path / "run")
    cfg = small_config(shapes_data, epochs=2, max_steps=3, lr_schedule="cosine",
                       **NO_DECODING)
    trainer, summary = run_trainer(cfg, run)
    assert summary["steps"] == 3 and summary["stopped_by"] == "max_steps"
    assert int(trainer.step_in_epoch.numpy()) == 3
    assert not os.path.exists(os.path.join(run, "history.json"))  # no epoch finished
    per_epoch = trainer.inputs.steps_per_epoch
    _, summary = run_trainer(small_config(shapes_data, epochs=2, max_steps=3,
                                          lr_schedule="cosine", **NO_DECODING), run)
    assert summary["steps_now"] == 0 and train.format_summary(summary).startswith(
        f"nothing to train: the run already reached --max-steps 3 (epoch 0 of 2, step 3, "
        f"in epoch 1 at step 3 of {per_epoch})")
    _, summary = run_trainer(small_config(shapes_data, epochs=2, max_steps=5,
                                          lr_schedule="cosine", **NO_DECODING), run)
    assert summary["steps"] == 5 and summary["steps_now"] == 2  # this invocation's steps
    assert train.format_summary(summary).startswith("trained 2 steps (0 epochs finished)")
    # best.keras does not exist yet: the summary named it as the best model
    assert train.format_summary(summary).splitlines()[1] == \
        "best model: none yet (no epoch finished: the first one saves it)"
    # through the end of epoch 1 into epoch 2, stopping in its middle
    run_trainer(small_config(shapes_data, epochs=2, max_steps=per_epoch + 2,
                             lr_schedule="cosine", **NO_DECODING), run)
    with open(os.path.join(run, "history.json")) as f:
        assert [h["epoch"] for h in json.load(f)] == [1]
    trainer, summary = run_trainer(small_config(shapes_data, epochs=2, lr_schedule="cosine",
                                                **NO_DECODING), run)
    assert summary["steps"] == 2 * trainer.inputs.steps_per_epoch
    assert summary["steps_now"] == per_epoch - 2 and summary["epochs_now"] == 1
    with open(os.path.join(run, "history.json")) as f:
        history = json.load(f)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["steps"] == trainer.inputs.steps_per_epoch for h in history)
    # The cosine decay spans --epochs, not --max-steps (it used to decay over the 3 steps):
    # the same learning rates, so the same weights and losses as an uninterrupted run (the
    # module's, of the same settings)
    with open(os.path.join(whole_cosine_run, "history.json")) as f:
        whole = json.load(f)
    # each epoch's rate is its first step's: the cosine's start, then its middle (the rate
    # after the epoch was logged: epoch 2, which trained at 5e-3 down to 6e-5, logged 0)
    assert [h["learning_rate"] for h in whole] == pytest.approx([1e-2, 5e-3])
    np.testing.assert_allclose([(h["learning_rate"], h["loss"], h["val_loss"]) for h in history],
                               [(h["learning_rate"], h["loss"], h["val_loss"]) for h in whole],
                               rtol=1e-5)


def test_a_resume_inside_an_epoch_records_and_says_the_rates_really_used(shapes_data,
                                                                         tmp_path):
    """history.json's learning_rate of an epoch is its first step's: resumed inside the epoch
    with another schedule it was the new schedule's rate there, which no step used. The note
    on a moved cosine schedule said where the epoch "starts" though it had started: it says
    the rate training continues at, at the step it continues at."""
    from caption_attn.optimizer import StagedLearningRate
    run = str(tmp_path / "run")
    run_trainer(small_config(shapes_data, epochs=2, max_steps=3, lr_schedule="cosine",
                             **NO_DECODING), run)
    cfg = small_config(shapes_data, epochs=4, lr_schedule="cosine", **NO_DECODING)
    assert not [n for n in train.reopen_checks(RunFolder(run), cfg, fresh=False)
                if "learning-rate schedule" in n]      # it knows no step: the Trainer says it
    train.open_run(run, cfg)
    logs = []
    trainer = train.Trainer(cfg, run, progress=False, log=logs.append)
    per_epoch = trainer.inputs.steps_per_epoch
    was, now = (float(StagedLearningRate(cfg.train, n * per_epoch)(3)) for n in (2, 4))
    assert ("note: the learning-rate schedule is now cosine over 4 cross-entropy epochs (was "
            "cosine over 2 cross-entropy epochs): training continues at step 4 of epoch 1 at a "
            f"learning rate of {now:.3g} instead of {was:.3g}, and the steps to come follow "
            "the new curve") in logs, logs
    run_trainer(small_config(shapes_data, epochs=1, learning_rate=5e-3, **NO_DECODING), run)
    assert RunFolder(run).read_history()[0]["learning_rate"] == pytest.approx(1e-2)


def test_a_checkpoint_made_before_epoch_facts_were_kept_still_resumes(shapes_data, tmp_path,
                                                                      monkeypatch):
    """Checkpoints of an older caption_attn hold no `epoch_start` (the first step's rate, the
    batches): they restore, and the epoch's rate comes from config.json's settings."""
    run = str(tmp_path / "run")
    with monkeypatch.context() as older:
        older.setattr(train.Trainer, "_checkpoint_to_save",
                      lambda self, objects: tf.train.Checkpoint(**objects))
        run_trainer(small_config(shapes_data, epochs=2, max_steps=3, **NO_DECODING), run)
    reader = tf.train.load_checkpoint(os.path.join(run, "checkpoints", "ckpt-3"))
    assert not [n for n in reader.get_variable_to_shape_map() if "epoch_start" in n]
    _, summary = run_trainer(small_config(shapes_data, epochs=1, learning_rate=5e-3,
                                          **NO_DECODING), run)
    assert summary["finished_epochs"] == 1
    assert RunFolder(run).read_history()[0]["learning_rate"] == pytest.approx(1e-2)


def test_resume_mid_epoch_with_other_batches_is_refused_before_writing(shapes_data,
                                                                         tmp_path):
    """A run stopped inside an epoch skips the batches already trained by their count: with
    another --batch-size (or a stage changed by --scst-after) the rerun trained some captions
    of that epoch twice and others never, with exit 0. Refused now; between epochs (and with
    the same batches) it resumes."""
    run = str(tmp_path / "run")
    run_trainer(small_config(shapes_data, epochs=2, max_steps=3, sample_images=0), run)
    before = {n: open(os.path.join(run, n), "rb").read() for n in ("config.json",
                                                                    "split.json")}
    for change, needle in (({"batch_size": 8}, "--batch-size 8 (was 16)"),
                           ({"scst_after": 0}, "--scst-after 0 (was none: the epoch would "
                                               "be self-critical)")):
        with pytest.raises(UserError) as e:
            train.train(small_config(shapes_data, epochs=2, sample_images=0, **change), run,
                        progress=False, log=lambda *a: None)
        assert f"{run} stopped in epoch 1 at step 3" in str(e.value)
        assert needle in str(e.value) and "--epochs 1" in str(e.value)
        assert {n: open(os.path.join(run, n), "rb").read() for n in before} == before
    # config.json edited to say 8: the checkpoint says what the epoch was cut with
    edited = json.loads(before["config.json"])
    edited["train"]["batch_size"] = 8
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(edited, f)
    with pytest.raises(UserError, match=r"stopped in epoch 1 at step 3, .*--batch-size 8 "
                                        r"\(was 16\)"):
        train.train(small_config(shapes_data, epochs=2, batch_size=8, sample_images=0), run,
                    progress=False, log=lambda *a: None)
    with open(os.path.join(run, "config.json"), "wb") as f:
        f.write(before["config.json"])
    summary = train.train(small_config(shapes_data, epochs=1, sample_images=0), run,
                          progress=False, log=lambda *a: None)  # finishes epoch 1 as it was
    assert summary["finished_epochs"] == 1 and summary["epoch_steps"] == 0
    summary = train.train(small_config(shapes_data, epochs=2, batch_size=8, max_steps=None,
                                       sample_images=0),
                          run, progress=False, log=lambda *a: None)
    assert summary["finished_epochs"] == 2


def test_an_epoch_whose_end_was_killed_at_max_steps_ends_on_the_rerun(shapes_data, tmp_path,
                                                                         monkeypatch):
    """--max-steps at an epoch's last step, checkpointed, then killed in its validation: the
    same command again said "nothing to train: the run already reached --max-steps" on every
    rerun, and the epoch, all of whose steps were trained, was never validated or recorded
    (no history.json, no best model), where an uninterrupted run has both."""
    run = str(tmp_path / "run")
    cfg = small_config(shapes_data, epochs=2, **NO_DECODING)
    train.open_run(run, cfg)
    per_epoch = train.Trainer(cfg, run, progress=False,
                              log=lambda *a: None).inputs.steps_per_epoch
    cfg = small_config(shapes_data, epochs=2, max_steps=per_epoch, checkpoint_every=per_epoch,
                       **NO_DECODING)

    def killed(self, epoch):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(train.Trainer, "_validate", killed)
        with pytest.raises(KeyboardInterrupt):
            run_trainer(cfg, run)
    assert not os.path.exists(os.path.join(run, "history.json"))
    trainer, summary = run_trainer(cfg, run)
    assert (summary["epochs"], summary["steps_now"], summary["stopped_by"]) == \
        (1, 0, "max_steps")
    with open(os.path.join(run, "history.json")) as f:
        assert [h["epoch"] for h in json.load(f)] == [1]
    assert os.path.exists(os.path.join(run, "best.keras"))
    assert int(trainer.step.numpy()) == per_epoch                   # no step more
    assert train.format_summary(summary).startswith(
        "ended epoch 1 (its steps were trained before the run stopped: validated and recorded "
        "now), stopped by max_steps; the run: epoch 1 of 2, step ")


def _history(run):
    with open(os.path.join(run, "history.json")) as f:
        return [(h["epoch"], h["steps"], h["learning_rate"], h["loss"], h["val_loss"])
                for h in json.load(f)]


@pytest.fixture(scope="module")
def whole_cosine_run(shapes_data, tmp_path_factory):
    """An uninterrupted run of 2 epochs on a cosine schedule (no decoding: its losses and
    rates are what the runs stopped and resumed are compared with)."""
    run = str(tmp_path_factory.mktemp("whole") / "run")
    run_trainer(small_config(shapes_data, epochs=2, lr_schedule="cosine", **NO_DECODING), run)
    return run


@pytest.mark.parametrize("where", ["steps", "validation", "after validation"])
def test_ctrl_c_keeps_the_epochs_steps_and_the_rerun_matches_an_uninterrupted_run(
        shapes_data, tmp_path, monkeypatch, where, whole_cosine_run, default_sigint):
    """Ctrl-C (or SIGTERM) inside an epoch lost every step since the last checkpoint, up to
    a whole epoch, also one stopped in its validation, all of whose steps were trained (or
    just after it, while its values were stamped and config.json written). Now
    the running step finishes and is checkpointed (a Ctrl-C landing between a step and its
    counters cannot be saved as another step), and the rerun ends as an uninterrupted run."""
    import signal
    from caption_attn import pipeline
    cfg = small_config(shapes_data, epochs=2, lr_schedule="cosine", **NO_DECODING)
    run = str(tmp_path / "run")
    train.open_run(run, cfg)
    lines = []
    trainer = train.Trainer(cfg, run, progress=False, log=lines.append)
    per_epoch = trainer.inputs.steps_per_epoch
    epochs, sent = [], []
    checked, steps = pipeline.checked, train.Trainer._run_train_epoch

    def epoch_steps(self, epoch, callbacks):
        epochs.append(epoch)
        return steps(self, epoch, callbacks)

    def ctrl_c_at_epoch_2_batch_3(dataset):          # (validation's batches pass here too)
        for i, batch in enumerate(checked(dataset)):
            if epochs == [0, 1] and i == 2 and where == "steps" and not sent:
                os.kill(os.getpid(), signal.SIGINT)  # before the step: held
                sent.append(i)
            yield batch

    def ctrl_c_in_validation(self, epoch):
        sent.append(epoch)
        raise KeyboardInterrupt

    def ctrl_c_after_validation(self, logs):   # (the val_cider table's digest: seconds)
        sent.append(logs)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(pipeline, "checked", ctrl_c_at_epoch_2_batch_3)
        m.setattr(train.Trainer, "_run_train_epoch", epoch_steps)
        if where == "validation":
            m.setattr(train.Trainer, "_validate", ctrl_c_in_validation)
        if where == "after validation":
            m.setattr(train.Trainer, "_stamped", ctrl_c_after_validation)
        with pytest.raises(KeyboardInterrupt):
            trainer.fit()
    assert sent and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    saved = (per_epoch + 3) if where == "steps" else per_epoch
    assert max(int(p.rsplit("ckpt-", 1)[1].split(".")[0]) for p in
               glob.glob(os.path.join(run, "checkpoints", "ckpt-*.index"))) == saved
    assert lines[-1] == ("epoch 2: stopped at step 3 of %d (checkpoint saved: the same command "
                         "continues from there)" % per_epoch if where == "steps" else
                         "epoch 1: stopped in its validation (checkpoint saved: the same "
                         "command validates and records the epoch)")
    _, summary = run_trainer(cfg, run)
    assert summary["steps_now"] == 2 * per_epoch - saved
    np.testing.assert_allclose(np.array(_history(run)), np.array(_history(whole_cosine_run)),
                               rtol=1e-5)
    with open(os.path.join(run, "history.json")) as f:   # no steps trained by the rerun in
        speeds = [h["captions_per_second"] for h in json.load(f)]   # epoch 1: no speed, not 0
    assert speeds[0] is None if where != "steps" else speeds[0] > 0
    assert speeds[1] > 0


def test_held_signals_wait_for_the_block_a_second_one_does_not(default_sigint):
    import signal
    from caption_attn import interrupts
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.held() as pending:
            signal.raise_signal(signal.SIGINT)
            done.append(bool(pending))                      # still running: held
    assert done == [True]
    with pytest.raises(KeyboardInterrupt):
        with interrupts.held() as pending:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)              # the user insists
            done.append("not reached")
    with pytest.raises(ZeroDivisionError):                  # the block's error ends it
        with interrupts.held() as pending:
            signal.raise_signal(signal.SIGINT)
            1 / 0
    with interrupts.held(enabled=False) as pending:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert done == [True] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_held_by_nested_blocks_ends_the_outer_one_as_it_would_have(default_sigint):
    """`held` inside `held` (a best-model save: its three files, each file's write): the
    inner block's end handed the signal to the outer block's handler, which notes it and
    returns, and then raised KeyboardInterrupt as after a host's handler that returns: a
    SIGTERM ended `train` as a Ctrl-C (status 130, not 143). It now ends the outer block as
    it would have, after the outer block's work."""
    import signal
    from caption_attn import interrupts

    class Term(Exception):
        pass

    def term(signum, frame):
        raise Term()
    old_term = signal.signal(signal.SIGTERM, term)
    done = []
    try:
        with pytest.raises(Term):
            with interrupts.held() as outer:
                with interrupts.held() as inner:
                    signal.raise_signal(signal.SIGTERM)
                    done.append(inner.signum)
                done.append(outer.signum)                    # the outer block goes on
        assert done == [signal.SIGTERM, signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is term
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, old_term)


def test_a_second_signal_in_nested_blocks_ends_the_program_at_once(default_sigint):
    """A second Ctrl-C is delivered at once (a hung write, or a user who insists). Nested
    (a best-model save held inside the training loop's block), the inner block handed its
    second signal to the outer block, which noted it as its first: a third was needed, and
    a fourth when the first came before the inner block began."""
    import signal
    from caption_attn import interrupts
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.held():
            with interrupts.held():
                signal.raise_signal(signal.SIGINT)
                done.append("held")
                signal.raise_signal(signal.SIGINT)           # the user insists
                done.append("not reached")
    with pytest.raises(KeyboardInterrupt):
        with interrupts.held() as outer:
            signal.raise_signal(signal.SIGINT)               # noted by the training loop
            with interrupts.held():                          # then a save that hangs
                done.append(outer.signum)
                signal.raise_signal(signal.SIGINT)
                done.append("not reached")
    assert done == ["held", signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_held_signals_cannot_slip_between_the_handler_swaps(monkeypatch, capfd,
                                                            default_sigint):
    """A SIGTERM landing after SIGINT's handler was swapped but before SIGTERM's escaped
    from the block's start, and SIGINT kept the block's handler for good: the next Ctrl-C
    was swallowed. A caller's handler that returns left the loop stopped as if by
    --max-steps. The first held signal now also says what happens."""
    import signal
    from caption_attn import interrupts

    class Term(Exception):
        pass

    def term(signum, frame):
        raise Term()
    old_term = signal.signal(signal.SIGTERM, term)
    real = signal.signal
    calls = []

    def swap_with_a_signal_between(signum, handler):
        calls.append(signum)
        previous = real(signum, handler)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)             # between the two swaps
        return previous
    try:
        monkeypatch.setattr(signal, "signal", swap_with_a_signal_between)
        with pytest.raises(Term):                            # as if it came before the block
            with interrupts.held():
                calls.append("the block ran")
        monkeypatch.setattr(signal, "signal", real)
        assert "the block ran" not in calls
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is term
        with pytest.raises(KeyboardInterrupt):
            with interrupts.held(saying="stopping soon\n") as pending:
                signal.raise_signal(signal.SIGINT)
                assert pending.signum == signal.SIGINT
        assert capfd.readouterr().err == "stopping soon\n"
        real(signal.SIGINT, lambda *a: None)                 # a host's handler that returns
        with pytest.raises(KeyboardInterrupt):
            with interrupts.held():
                signal.raise_signal(signal.SIGINT)
    finally:
        real(signal.SIGTERM, old_term)
        real(signal.SIGINT, signal.default_int_handler)


def test_max_steps_in_the_middle_of_an_epoch_finishes_no_epoch(shapes_data, tmp_path, capsys,
                                                                monkeypatch):
    """Stopping at --max-steps inside epoch 2 saves a checkpoint to continue from, but does
    none of an epoch's end: its validation, history entry, best model, heatmaps and TensorBoard
    epoch summary would pass a partial epoch for epoch 2. Its progress bar ends there (in a
    log file it printed nothing of epoch 2, on a terminal the next line ran on after it)."""
    import tensorflow as tf
    run = str(tmp_path / "run")
    cfg = small_config(shapes_data, epochs=2)
    train.open_run(run, cfg)
    per_epoch = train.Trainer(cfg, run, progress=False,
                              log=lambda *a: None).inputs.steps_per_epoch
    cfg = small_config(shapes_data, epochs=2, max_steps=per_epoch + 2)
    lines = []
    from caption_attn import progress
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 1e9)   # no periodic line of a slow epoch
    trainer = train.Trainer(cfg, run, images_dir=shapes_data["images"], log=lines.append)
    summary = trainer.fit()
    assert summary["steps"] == per_epoch + 2 and summary["stopped_by"] == "max_steps"
    assert summary["epochs"] == summary["finished_epochs"] == summary["best_epoch"] == 1
    assert trainer.manager.latest_checkpoint.endswith(f"ckpt-{per_epoch + 2}")
    assert int(trainer.step_in_epoch.numpy()) == 2
    with open(os.path.join(run, "history.json")) as f:
        assert [h["epoch"] for h in json.load(f)] == [1]
    with open(os.path.join(run, "best.json")) as f:
        assert json.load(f)["epoch"] == 1
    assert sorted(os.listdir(os.path.join(run, "attention"))) == ["epoch_1"]
    val_steps = [event.step for path in glob.glob(os.path.join(run, "logs", "validation",
                                                               "events.out.tfevents.*"))
                 for event in tf.compat.v1.train.summary_iterator(path)
                 if any(v.tag == "epoch_loss" for v in event.summary.value)]
    assert val_steps == [1]
    assert not any(line.startswith("epoch 2:") and "val_loss" in line for line in lines)
    assert f"epoch 2: stopped by --max-steps {per_epoch + 2} at step 2 of {per_epoch}" \
        in "\n".join(lines)
    head = train.format_summary(summary).splitlines()[0]
    assert f"; the run: epoch 1 of 2, step {per_epoch + 2}, in epoch 2 at step 2 of " \
           f"{per_epoch}, best val_loss=" in head and head.endswith("at epoch 1")
    bars = [line.strip() for line in capsys.readouterr().out.splitlines()
            if re.match(r" *\d+/\d+ - ", line)]
    assert [line.split(" - ")[0] for line in bars] == [f"{per_epoch}/{per_epoch}",
                                                       f"2/{per_epoch}"], bars
    assert "loss: " in bars[1] and "cap/s: " in bars[1]
    # the rest of epoch 2: its bar starts at step 2, and times only the steps it sees
    made, real = [], progress.bar
    monkeypatch.setattr(progress, "bar", lambda *a, **k: made.append(k) or real(*a, **k))
    train.Trainer(small_config(shapes_data, epochs=2), run, log=lines.append).fit()
    assert made[0]["initial"] == 2 and made[0]["periodic"]
    assert capsys.readouterr().out.splitlines()[0].strip().startswith(
        f"{per_epoch}/{per_epoch} - ")


def test_an_epoch_stopped_by_an_error_ends_its_progress_bar_first(shapes_data, tmp_path,
                                                                  capsys, monkeypatch):
    """A NaN loss (or a damaged feature file) in the third step: the error was printed onto
    the end of the bar's line on a terminal, and a log file got no line of that epoch."""
    from caption_attn import progress
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 1e9)   # no periodic line of a slow epoch
    real, seen = train.check_finite, []

    def check(out, epoch, step, *args, **kwargs):
        seen.append(step)
        if len(seen) == 3:
            raise train.TrainingError("the loss became NaN (this test's)")
        return real(out, epoch, step, *args, **kwargs)
    monkeypatch.setattr(train, "check_finite", check)
    with pytest.raises(train.TrainingError):
        train.train(small_config(shapes_data, epochs=1), str(tmp_path / "run"),
                    log=lambda *a: None)
    bars = [line.strip() for line in capsys.readouterr().out.splitlines()
            if re.match(r" *\d+/\d+ - ", line)]
    assert len(bars) == 1 and bars[0].startswith("2/") and "loss: " in bars[0], bars


def test_nan_loss_stops_and_keeps_last_good_checkpoint(run_copy):
    """(On a copy of the session's trained 3-epoch run: no run of its own to train first.)"""
    run = run_copy.path
    checkpoints = sorted(os.listdir(os.path.join(run, "checkpoints")))
    saved = run_copy.load_config()
    assert saved.train.epochs == 3
    cfg = dataclasses.replace(saved, train=dataclasses.replace(
        saved.train, epochs=4, clip_norm=0.0))
    # past what the flag allows (10, which did not diverge within an epoch): set after the
    # check, to make a real divergence
    cfg.train.learning_rate = 1e30
    with pytest.raises(train.TrainingError) as e:
        run_trainer(cfg, run)
    assert e.value.exit_code == 1
    assert "epoch 4" in str(e.value) and "checkpoint" in str(e.value)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == checkpoints
    # no step trained with them: config.json keeps the settings the checkpoints were made with
    assert run_copy.load_config().train == saved.train


def test_captions_without_features_are_skipped(shapes_data, copy_cache, tmp_path):
    with open(shapes_data["captions"]) as f:
        first_train = next(i for i in json.load(f)["images"] if i["split"] == "train")
    os.remove(os.path.join(copy_cache, first_train["filename"] + ".npy"))
    cfg = small_config(shapes_data, cache=copy_cache, epochs=1)
    train.open_run(str(tmp_path / "run"), cfg)
    data = train.load_train_data(cfg, str(tmp_path / "run"))
    assert data.skipped_images == 1 and data.skipped_captions == 5
    assert first_train["filename"] not in data.feature_paths


def test_images_missing_from_the_folder_checked_in_are_said_or_refused(shapes_data,
                                                                      copy_cache, tmp_path):
    """--images of a folder one level off (or empty) checked no source image, and train said
    "source images checked in DIR (given by --images)". Given, a folder that has none of
    them is refused; images missing from the folder checked in are said, by train and by
    evaluate. (The cache's own folder renamed: no other folder to check them in.)"""
    from caption_attn import evaluate
    empty = tmp_path / "empty"
    empty.mkdir()
    for cache in (shapes_data["cache"], copy_cache):     # its folder there, then gone
        cfg = small_config(shapes_data, cache=cache, epochs=1, max_steps=1, **NO_DECODING)
        with pytest.raises(UserError, match=rf"^--images {re.escape(str(empty))}: none of the "
                                            rf"\d+ images of .* with features in "
                                            rf"{re.escape(cache)} is in it \(e\.g\. no "
                                            rf"{re.escape(str(empty))}/.*: give the folder"):
            train.load_train_data(cfg, str(tmp_path / "run"), images_dir=str(empty))
        gone = str(tmp_path / "renamed")
        _edit_manifest(copy_cache, images_dir=gone, images_dirs=[gone])
    with open(shapes_data["captions"]) as f:
        test = sorted(i["filename"] for i in json.load(f)["images"] if i["split"] == "test")
    partial = tmp_path / "partial"
    shutil.copytree(shapes_data["images"], partial)
    os.remove(partial / test[0])
    run, lines = str(tmp_path / "run"), []
    train.train(cfg, run, images_dir=str(partial), progress=False, log=lines.append)
    said = [line for line in lines if "features were taken unchecked" in line]
    usable = len(json.load(open(os.path.join(run, "split.json")))["image_digests"])
    assert said == [f"note: 1 of the {usable} images with features in {copy_cache} is not "
                    f"in {partial} (e.g. no {partial / test[0]}): its features were taken "
                    f"unchecked, as a changed image's would be"], lines
    loaded = evaluate._load_split(run, "test", RunFolder(run).load_config(), copy_cache,
                                  shapes_data["captions"])
    assert loaded.images_note == (
        f"1 of the {len(loaded.keys)} images with features in {copy_cache} is not in "
        f"{partial} (e.g. no {partial / test[0]}): its features were taken unchecked, as a "
        f"changed image's would be")


def test_source_images_are_checked_in_the_images_given(shapes_data, copy_cache, tmp_path):
    """A cache into which another folder's same-named image was extracted holds that folder's
    features under the run's image name. train checked the source images only in the cache's
    last --images (the other folder), so it trained on them without a word, also when given
    the run's own folder with --images (used for the heatmaps only). They are checked in
    --images now: left out as a changed image, with the command that extracts them from it."""
    from caption_attn.extract import extract_features
    from caption_attn.config import ExtractConfig
    from caption_attn.feature_index import IMAGE_CHANGED

    with open(shapes_data["captions"]) as f:
        key = next(i for i in json.load(f)["images"] if i["split"] == "train")["filename"]
    other = tmp_path / "other"
    other.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)
    assert cv2_write(str(other / key), rgb)
    extract_features(str(other), ExtractConfig(
        cache=copy_cache, weights="random", dtype="float16", precision="float32",
        replace_other_images=True), progress=False)
    cfg = small_config(shapes_data, cache=copy_cache, epochs=1)
    data = train.load_train_data(cfg, str(tmp_path / "run"), images_dir=shapes_data["images"])
    assert data.unusable == {key: IMAGE_CHANGED}
    assert (f"`caption-attn extract-features --captions {shapes_data['captions']} --images "
            f"{shapes_data['images']} --cache {copy_cache} --weights random --seed 0 --dtype "
            f"float16 --precision float32`: it extracts exactly these again" in data.problems)
    # which that command refuses until told: the cache's features of that name are other's
    assert (f"(refused, naming the folder, if these names' features are now of another images "
            f"folder's images, e.g. {other}'s: add --replace-other-images to replace them "
            f"then)" in data.problems)


def test_evaluate_and_a_resume_check_source_images_where_train_did(shapes_data, copy_cache,
                                                                    tmp_path):
    """After another folder's same-named test image replaced its features in the cache
    (--replace-other-images), `train --images OWN` left that image out, but `evaluate` (and a
    resume without --images) checked the source images in the cache's last folder, the
    other one: the run was scored on the other image's features, exit 0. The folder train
    checked in is recorded in split.json and used by both."""
    from caption_attn import evaluate
    from caption_attn.config import ExtractConfig
    from caption_attn.extract import extract_features
    from caption_attn.feature_index import IMAGE_CHANGED

    with open(shapes_data["captions"]) as f:
        key = next(i for i in json.load(f)["images"] if i["split"] == "test")["filename"]
    other = tmp_path / "other"
    other.mkdir()
    assert cv2_write(str(other / key), np.random.default_rng(1).integers(0, 256, (64, 64, 3),
                                                                           np.uint8))
    extract_features(str(other), ExtractConfig(
        cache=copy_cache, weights="random", dtype="float16", precision="float32",
        replace_other_images=True), progress=False)
    run = str(tmp_path / "run")
    cfg = small_config(shapes_data, cache=copy_cache, epochs=1)
    train.train(cfg, run, images_dir=shapes_data["images"], progress=False,
                log=lambda *a: None)
    with open(os.path.join(run, "split.json")) as f:
        recorded = json.load(f)
    assert recorded["images_dir"] == os.path.abspath(shapes_data["images"])
    assert key in recorded["without_features"] and key not in recorded["image_digests"]
    loaded = evaluate._load_split(run, "test", RunFolder(run).load_config(), copy_cache,
                                  shapes_data["captions"])
    assert key in loaded.without and key not in loaded.keys
    assert "source image changed" in loaded.problems
    data = train.load_train_data(cfg, run)                  # a resume without --images
    assert data.unusable == {key: IMAGE_CHANGED}
    # the dataset copied elsewhere with new modification times and extracted from there (the
    # same bytes: indexed again): its images still count, checked by their recorded digests;
    # the image the run never had features of stays out
    copy = tmp_path / "copy"
    shutil.copytree(shapes_data["images"], copy)
    for name in os.listdir(copy):
        os.utime(copy / name, (1e9, 1e9))
    extract_features(str(copy), ExtractConfig(
        cache=copy_cache, weights="random", dtype="float16", precision="float32",
        replace_other_images=True), progress=False)
    loaded = evaluate._load_split(run, "test", RunFolder(run).load_config(), copy_cache,
                                  shapes_data["captions"])
    assert loaded.without == [key]
    assert train.load_train_data(cfg, run).unusable == {key: IMAGE_CHANGED}


def test_train_and_evaluate_say_when_no_source_image_could_be_checked(shapes_data, copy_cache,
                                                                       tmp_path):
    """With the folder the cache was extracted from renamed (or on another machine), train
    and evaluate checked no source image at all and said nothing: changed images trained and
    were scored on their old features. Still taken (the images may be elsewhere on purpose),
    but each says so, naming the folder, and train how to check them."""
    from caption_attn import evaluate

    gone = str(tmp_path / "renamed")                    # the folder, as if renamed since
    _edit_manifest(copy_cache, images_dir=gone, images_dirs=[gone])
    run, lines = str(tmp_path / "run"), []
    train.train(small_config(shapes_data, cache=copy_cache, epochs=1, max_steps=1,
                             **NO_DECODING), run, progress=False, log=lines.append)
    said = (f"note: the source images were not checked against their features in "
            f"{copy_cache}: {gone}, where they were, is not a folder on this machine")
    assert any(line.startswith(said) and "give --images FOLDER" in line for line in lines)
    loaded = evaluate._load_split(run, "test", RunFolder(run).load_config(), copy_cache,
                                  shapes_data["captions"])
    assert loaded.images_note.startswith(said[len("note: "):])
    # checked: nothing to say
    lines.clear()
    train.train(small_config(shapes_data, cache=copy_cache, epochs=1, max_steps=1,
                             **NO_DECODING), str(tmp_path / "r2"),
                images_dir=shapes_data["images"], progress=False, log=lines.append)
    assert not any("were not checked" in line for line in lines)


def other_shapes(folder, num_images=3, seed=1):
    """A tiny shapes dataset (by default --seed 1: the same file names as `shapes_data`'s
    first images, other pictures). Returns make_shapes' summary."""
    from caption_attn import shapes
    from caption_attn.config import ShapesConfig
    return shapes.make_shapes(str(folder), ShapesConfig(
        num_images=num_images, seed=seed, image_size=64, val_fraction=0.25, test_fraction=0))


def extract_into(images, cache, **options):
    from caption_attn.config import ExtractConfig
    from caption_attn.extract import extract_features
    extract_features(images, ExtractConfig(cache=str(cache), weights="random", dtype="float16",
                                           precision="float32", **options), progress=False)


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_a_precision_the_capped_onednn_would_abort_in_is_refused_before_writing(
        shapes_data, tmp_path, onednn_capped_below, precision):
    """`train --precision bfloat16` (or float16) under ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512
    CPU died at the first step (SIGABRT, stop 74), its run folder already written."""
    onednn_capped_below(precision)
    run = tmp_path / "run"
    with pytest.raises(UserError, match=rf"^--precision {precision}: oneDNN capped at AVX2 "
                                        rf".* train with --precision float32$"):
        train.train(small_config(shapes_data, precision=precision), str(run), progress=False,
                    log=lambda *a: None)
    assert not run.exists()


def test_train_says_where_it_checked_the_source_images_and_why(shapes_data, tmp_path):
    """train never named the images folder the features' source images were checked in: a
    cache of another dataset with the same file names (checked against its own images)
    trained the caption file's captions on other pictures without a word. Its opening lines
    say where and why there: the cache's last folder, --images, or the run's own folder."""
    run, lines = str(tmp_path / "run"), []
    cfg = small_config(shapes_data, epochs=1, max_steps=1, **NO_DECODING)
    train.train(cfg, run, progress=False, log=lines.append)
    said = (f"source images checked in {shapes_data['images']} (the folder "
            f"{shapes_data['cache']} was last extracted from; pass --images to name the "
            f"caption file's folder)")
    assert said in opening(lines)
    lines.clear()
    whole = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=None))
    train.train(whole, run, progress=False, log=lines.append)       # a resume
    said = (f"source images checked in {shapes_data['images']} (the run's images folder, "
            f"recorded in {os.path.join(run, 'split.json')})")
    assert said in opening(lines)
    lines.clear()
    train.train(whole, run, progress=False, log=lines.append)       # nothing left to train
    assert lines[0] == said and not any(line.startswith("resuming") for line in lines)
    lines.clear()
    train.train(cfg, str(tmp_path / "r2"), images_dir=shapes_data["images"], progress=False,
                log=lines.append)
    assert f"source images checked in {shapes_data['images']} (given by --images)" in \
        opening(lines)


def opening(lines: list) -> list:
    """What train says first: its data's description and the line after it."""
    i = next(i for i, line in enumerate(lines) if line.startswith(("training: ", "resuming")))
    return lines[:i + 2]


def test_a_new_run_is_refused_when_two_images_folders_of_the_cache_hold_its_images(
        shapes_data, copy_cache, tmp_path, capsys):
    """Another dataset with the same file names extracted into the cache
    (--replace-other-images): a new run without --images checked its features in the cache's
    last folder, the other dataset's, where they looked right, and trained the caption
    file's captions on the other pictures, exit 0. Which folder holds the caption file's
    images cannot be told: refused before anything is written, naming the folders."""
    from caption_attn.cli import main
    from caption_attn.feature_index import IMAGE_CHANGED

    other = other_shapes(tmp_path / "other")
    extract_into(other["images_dir"], copy_cache, replace_other_images=True)
    run = str(tmp_path / "run")
    code = main(["train", "--captions", shapes_data["captions"], "--cache", copy_cache,
                 "--run", run, "--epochs", "1", "--embedding-dim", "8", "--units", "16"])
    err = capsys.readouterr().err
    assert code == 2 and not os.path.exists(run)
    assert (f"--cache {copy_cache} was extracted from more than one images folder, and images "
            f"named as the caption file's are in more than one of them (e.g. 'shape_00000.png' "
            f"in {shapes_data['images']} and {other['images_dir']}; 3 of 40 names looked "
            f"up)") in err
    assert "pass --images DIR" in err
    # named, it is checked there: the replaced features are left out as changed
    data = train.load_train_data(small_config(shapes_data, cache=copy_cache), run,
                                 images_dir=shapes_data["images"])
    assert set(data.unusable) == {f"shape_0000{i}.png" for i in range(3)}
    assert set(data.unusable.values()) == {IMAGE_CHANGED}


def test_an_extraction_stopped_midway_has_recorded_its_images_folder(
        shapes_data, copy_cache, tmp_path, capsys, monkeypatch):
    """The other dataset's extraction stopped (Ctrl-C) before its end, where the cache
    recorded the folder: a new run on its captions without --images was checked in the
    cache's last folder, `shapes_data`'s, not refused for the names both share, and trained
    the other captions on the first dataset's features. The folder is recorded first."""
    from caption_attn import extract
    from caption_attn.cli import main
    from caption_attn.feature_cache import read_manifest

    other = other_shapes(tmp_path / "other")
    mine, theirs = (os.path.abspath(d) for d in (shapes_data["images"], other["images_dir"]))
    before = read_manifest(copy_cache)["images_dirs"]
    for written in (0, 1):          # stopped before its first feature file, then after it

        def stopped(backbone, images_dir, todo, *args):
            args[-1].extend(todo[:written])              # so_far: the keys written
            raise KeyboardInterrupt
        monkeypatch.setattr(extract, "_extract_with_progress", stopped)
        with pytest.raises(KeyboardInterrupt):
            extract_into(other["images_dir"], copy_cache, replace_other_images=True)
        monkeypatch.undo()
        manifest = read_manifest(copy_cache)
        assert manifest["images_dir"] == mine
        assert manifest["images_dirs"] == (before[:-1] + [theirs, mine] if written else before)
    capsys.readouterr()
    run = str(tmp_path / "run")
    assert main(["train", "--captions", other["captions"], "--cache", copy_cache, "--run", run,
                 "--epochs", "1", "--embedding-dim", "8", "--units", "16"]) == 2
    assert f"--cache {copy_cache} was extracted from more than one images folder" in \
        capsys.readouterr().err and not os.path.exists(run)
    extract_into(other["images_dir"], copy_cache, replace_other_images=True)   # once whole
    assert read_manifest(copy_cache)["images_dirs"][-2:] == [mine, theirs]


def test_a_cache_of_two_folders_of_other_names_is_not_refused(shapes_data, copy_cache,
                                                              tmp_path):
    """COCO's train2014 and val2014 extracted into one cache: no name is in both folders."""
    other = tmp_path / "val2014"
    other.mkdir()
    assert cv2_write(str(other / "COCO_val2014_000000000042.png"), np.zeros((8, 8, 3),
                                                                              np.uint8))
    _edit_manifest(copy_cache, images_dir=str(other),
                   images_dirs=[shapes_data["images"], str(other)])
    data = train.load_train_data(small_config(shapes_data, cache=copy_cache),
                                 str(tmp_path / "run"))
    assert data.unusable == {} and data.images_dir == str(other)


def test_a_cache_of_another_dataset_is_refused_beside_the_caption_files_images(shapes_data,
                                                                               tmp_path):
    """The cache of another dataset with the same file names (shapes of another --seed):
    checked against its own images, its features looked right, and a new run trained the
    caption file's captions on them, exit 0. The caption file's folder holds its images
    (`images/` beside captions.json), of other content than the features': refused, naming
    both folders and --images."""
    mine, other = other_shapes(tmp_path / "ds1", 8, seed=0), other_shapes(tmp_path / "ds2", 8)
    cache = tmp_path / "c2"
    extract_into(other["images_dir"], cache)
    run = str(tmp_path / "run")
    cfg = dataclasses.replace(small_config(shapes_data, cache=str(cache)),
                              captions=mine["captions"])
    with pytest.raises(UserError) as e:
        train.load_train_data(cfg, run)
    assert (f"{mine['images_dir']}, beside --captions {mine['captions']}, holds its images, "
            f"but the features in --cache {cache} were extracted from other images of those "
            f"names (e.g. 'shape_0000") in e.value.message
    assert (f"in {other['images_dir']}): the cache of another dataset? Pass --images "
            f"{mine['images_dir']}") in e.value.message
    assert not os.path.exists(run)
    # named: checked there, and every feature file is left out as changed
    with pytest.raises(UserError, match="source image changed"):
        train.load_train_data(cfg, run, images_dir=mine["images_dir"])
    # the other dataset's own captions: its folder is the one the cache was extracted from
    data = train.load_train_data(dataclasses.replace(cfg, captions=other["captions"]), run)
    assert data.unusable == {}


def test_repeated_csv_rows_are_said_by_train_s_data(shapes_data, tmp_path):
    """Kaggle's Flickr8k captions.txt holds no caption numbers: a row repeated exactly is read
    once (a file joined with an overlap), which two annotators' identical captions are too;
    train's data carries the note that says so (logged with the other caption notes)."""
    from caption_attn import data as data_lib
    from conftest import shapes_csv
    path = tmp_path / "captions.txt"
    rows = shapes_csv(shapes_data, path, lambda rows: rows[:1])
    cfg = dataclasses.replace(small_config(shapes_data), captions=str(path))
    loaded = train.load_train_data(cfg, str(tmp_path / "run"), images_dir=shapes_data["images"])
    assert loaded.repeated_note == data_lib.load_captions(str(path)).repeated_note()
    assert loaded.repeated_note.startswith(f"1 row of {path} repeats an earlier row of the "
                                           f"same image and caption (e.g. line {len(rows) + 2}")


def test_a_cache_of_a_sibling_folder_of_the_same_names_is_said(shapes_data, tmp_path,
                                                               monkeypatch):
    """Two datasets of the same file names in sibling folders, their caption files in the
    parent (data/capA.json, data/A/, data/capB.json, data/B/), the cache extracted from B:
    `train --captions data/capA.json` without --images checked the features in B, one of the
    caption file's subfolders, so it looked no further, and trained A's captions on B's
    features without a word. Which subfolder holds the caption file's images cannot be told
    from it (B's own caption file, or a resized copy of B as A, look the same): a note names
    both and the --images that settles it. Heatmaps drawn beside the images are no images."""
    from caption_attn.images import mark_heatmap
    a, b = other_shapes(tmp_path / "ds1", 8, seed=0), other_shapes(tmp_path / "ds2", 8)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    folders = {}
    for name, made in (("A", a), ("B", b)):
        folders[name] = str(shutil.move(made["images_dir"], data_dir / name))
        shutil.move(made["captions"], data_dir / f"cap{name}.json")
    cache = tmp_path / "c"
    extract_into(folders["B"], cache)
    run = str(tmp_path / "run")
    config = small_config(shapes_data, cache=str(cache))
    for name in ("A", "B"):   # capB.json is B's here, but the caption file cannot tell
        cfg = dataclasses.replace(config, captions=str(data_dir / f"cap{name}.json"))
        data = train.load_train_data(cfg, run)
        head, tail = data.beside_note.split("') than ")
        assert head.startswith(f"{folders['A']}, beside --captions {cfg.captions}, holds "
                               f"other images of its names (e.g. 'shape_")
        assert tail == (
            f"{folders['B']}, also beside it, whose images "
            f"the features in --cache {cache} were extracted from and are checked against: "
            f"if the caption file describes {folders['A']}'s images (not a resized copy of "
            f"the same pictures), stop and train with --fresh --images {folders['A']} "
            f"(features of other images are left out), or extract it into a cache of its "
            f"own; --images {folders['B']} says those are the caption file's images")
        assert not os.path.exists(run)
    # `train` says it before the run folder holds anything (a rerun with --images alone
    # would be a resume of the wrong images' run)
    said: list = []
    monkeypatch.setattr(train, "_train_in", lambda run_, cfg_, run_dir, *rest: said.append(
        sorted(os.listdir(run_dir))) or {})
    train.train(cfg, run, log=said.append)
    assert f"note: {data.beside_note}" in said and said[-1] == [".train.lock"]   # no file yet
    # a copy of B beside the caption file, the cache's own folder elsewhere: named as such
    elsewhere = tmp_path / "elsewhere"
    shutil.move(folders["B"], elsewhere)
    shutil.copytree(elsewhere, folders["B"])
    _edit_manifest(str(cache), images_dir=str(elsewhere), images_dirs=[str(elsewhere)])
    assert train.load_train_data(cfg, str(tmp_path / "run2")).beside_note.split(
        "') than ")[1].startswith(
        f"{folders['B']}, also beside it, which holds the very images the features in "
        f"--cache {cache} were extracted from (checked in {elsewhere}): if the caption")
    # ... and extracted from a folder no longer on this machine: said so, not "checked in"
    _edit_manifest(str(cache), images_dir=str(tmp_path / "gone"),
                   images_dirs=[str(tmp_path / "gone")])
    shutil.rmtree(elsewhere)
    assert train.load_train_data(cfg, str(tmp_path / "run2")).beside_note.split(
        "') than ")[1].startswith(
        f"{folders['B']}, also beside it, which holds the very images the features in "
        f"--cache {cache} were extracted from (not checked: {tmp_path / 'gone'} is not on "
        f"this machine): if the caption")
    # (B's copy, of the same modification times, is B from here on)
    _edit_manifest(str(cache), images_dir=folders["B"], images_dirs=[folders["B"]])
    # --images says which: A's checked in A are all left out as changed; B's train, unsaid
    capa = dataclasses.replace(config, captions=str(data_dir / "capA.json"))
    with pytest.raises(UserError, match="source image changed"):
        train.load_train_data(capa, run, images_dir=folders["A"])
    capb = dataclasses.replace(config, captions=str(data_dir / "capB.json"))
    data = train.load_train_data(capb, run, images_dir=folders["B"])
    assert data.unusable == {} and data.images_dir == folders["B"]
    assert data.beside_note is None
    # heatmaps of B's images drawn into a folder beside them bear their names: no images
    shutil.rmtree(folders["A"])
    heat = data_dir / "heat"
    heat.mkdir()
    for key in os.listdir(folders["B"]):   # other bytes than the images'
        (heat / key).write_bytes(mark_heatmap((data_dir / "B" / key).read_bytes()))
    assert train.load_train_data(capb, run).beside_note is None


def test_the_caption_files_images_are_not_refused_in_a_copy_or_by_another_path(
        shapes_data, copy_cache, tmp_path):
    """The cache extracted from a copy of the images (`cp -a` to a local disk), or from the
    images folder by another path (a symbolic link): the images beside the caption file are
    the ones the features were made from."""
    copy, link = tmp_path / "copy", tmp_path / "link"
    shutil.copytree(shapes_data["images"], copy)   # copy2: the same modification times
    os.symlink(shapes_data["images"], link)
    for folder in (copy, link):
        _edit_manifest(copy_cache, images_dir=str(folder), images_dirs=[str(folder)])
        data = train.load_train_data(small_config(shapes_data, cache=copy_cache),
                                     str(tmp_path / "run"))
        assert data.unusable == {} and data.images_dir == str(folder)


def test_a_resume_draws_its_heatmaps_from_the_folder_the_run_trained_on(shapes_data,
                                                                         copy_cache, tmp_path):
    """A resumed run drew its sample heatmaps from the cache's last images folder (another
    dataset extracted into the cache since), on a gray square for every image missing there,
    though its source images were checked in its own folder."""
    from caption_attn.config import ExtractConfig
    from caption_attn.extract import extract_features

    run = str(tmp_path / "run")
    cfg = small_config(shapes_data, cache=copy_cache, epochs=1, max_steps=1, **NO_DECODING)
    train.train(cfg, run, images_dir=shapes_data["images"], progress=False,
                log=lambda *a: None)
    other = tmp_path / "other"
    other.mkdir()
    assert cv2_write(str(other / "elsewhere.png"), np.zeros((64, 64, 3), np.uint8))
    extract_features(str(other), ExtractConfig(cache=copy_cache, weights="random",
                                               dtype="float16", precision="float32"),
                     progress=False)
    trainer = train.Trainer(small_config(shapes_data, cache=copy_cache, epochs=2), run,
                            progress=False, log=lambda *a: None)
    assert trainer.images_dir == os.path.abspath(shapes_data["images"])


def cv2_write(path: str, rgb) -> bool:
    import cv2
    return cv2.imwrite(path, rgb[..., ::-1])


def _edit_manifest(cache: str, **fields) -> None:
    """Set `fields` in the feature cache's manifest.json (a test's copy of the cache)."""
    path = os.path.join(cache, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest.update(fields)
    with open(path, "w") as f:
        json.dump(manifest, f)


def test_cache_manifest_is_checked(shapes_data, copy_cache, tmp_path):
    _edit_manifest(copy_cache, feature_shape=[49, 2048])
    cfg = small_config(shapes_data, cache=copy_cache)
    with pytest.raises(UserError, match=r"feature_shape \[49, 2048\], expected \[64, 2048\]"):
        train.load_train_data(cfg, str(tmp_path))


def test_cli_train_prints_summary(shapes_data, tmp_path, capsys):
    """... and names the image paths of the caption file it refused (an absolute one here),
    whose captions it leaves out: it dropped them without a word. So it did empty captions
    and the images they left without a usable caption."""
    from caption_attn.cli import main
    with open(shapes_data["captions"]) as f:
        captions = json.load(f)
    first, second = [i for i in captions["images"] if i["split"] == "train"][:2]
    first["filename"] = os.path.join(shapes_data["images"], first["filename"])
    second["sentences"] = [{"raw": "..."}, {"raw": " "}]
    path = str(tmp_path / "captions.json")
    with open(path, "w") as f:
        json.dump(captions, f)
    run = str(tmp_path / "cli_run")
    code = main(["train", "--captions", path, "--cache", shapes_data["cache"],
                 "--run", run, "--epochs", "1", "--batch-size", "32", "--embedding-dim", "16",
                 "--units", "32", "--sample-images", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "steps (1 epochs finished)" in out and "tensorboard --logdir" in out
    assert (f"note: 1 image path(s) in {path} are refused (absolute or outside the images "
            f"folder) (e.g. {first['filename']!r}): their captions are left out") in out
    assert (f"note: 2 caption(s) in {path} are skipped as empty (no word once punctuation is "
            f"removed); 1 image(s) have no usable caption and are left out (e.g. "
            f"{second['filename']!r})\n") in out
    saved = RunConfig.load(os.path.join(run, "config.json"))
    assert saved.model.units == 32 and saved.train.batch_size == 32


def test_cli_train_missing_cache_exits_2(shapes_data, tmp_path, capsys):
    from caption_attn.cli import main
    code = main(["train", "--captions", shapes_data["captions"], "--cache",
                 str(tmp_path / "nope"), "--run", str(tmp_path / "run")])
    assert code == 2
    assert "manifest" in capsys.readouterr().err


def test_losses_are_finite_numbers(trained):
    for h in trained["history"]:
        assert np.isfinite([h["loss"], h["val_loss"], h["gradient_norm"]]).all()
        assert 0.0 <= h["val_bleu4"] <= 1.0


@pytest.mark.parametrize("precision", [pytest.param(p, marks=pytest.mark.precision(p))
                                       for p in ("bfloat16", "float16")])
def test_mixed_precision_trains(shapes_data, tmp_path, precision):
    trainer, summary = run_trainer(small_config(shapes_data, epochs=1, precision=precision),
                                   str(tmp_path / "run"))
    assert trainer.model.encoder.compute_dtype == precision
    assert trainer.model.encoder.kernel.dtype == "float32"          # variables stay float32
    assert np.isfinite(summary["final_loss"]) and summary["epochs"] == 1
    if precision == "float16":
        assert hasattr(trainer.optimizer, "dynamic_scale")           # loss scaling


def test_xla_step_compiles_and_trains(shapes_data, tmp_path):
    # captions cut to 5 words: one bucket, so XLA compiles the step once, not per length
    # (alone on an AVX2-only Zen 3: 10 s with two compiles, 5.9 s with one)
    cfg = dataclasses.replace(small_config(shapes_data, epochs=1, max_steps=2, xla=True,
                                           **NO_DECODING),
                              vocab=VocabConfig(max_length=5))
    trainer, summary = run_trainer(cfg, str(tmp_path / "run"))
    totals = EpochTotals.from_vector(trainer.epoch_sums.numpy())  # of the unfinished epoch
    assert summary["steps"] == totals.sums["steps"] == 2
    assert np.isfinite(totals.logs(self_critical=False)["loss"])


def test_the_mean_gradient_norm_leaves_out_steps_float16_skipped():
    """A step whose gradients overflowed under float16 loss scaling (norm inf) is skipped:
    its norm was left out of the sum but counted, so one skip in ten logged a mean 10 % low
    (7.95 instead of 8.84 in an audit's run)."""
    totals = EpochTotals()
    for norm in (1.0, float("inf"), 3.0, float("nan")):
        totals.add({"loss": 1.0, "captions": 4.0, "gradient_norm": norm})
    assert totals.logs(self_critical=False)["gradient_norm"] == 2.0
    assert totals.sums["captions"] == 16.0                         # every step's captions


@pytest.mark.parametrize("schedule", [False, True])
def test_fused_adam_matches_keras_adam(schedule):
    # FusedAdam runs TensorFlow's one-pass ResourceApplyAdam kernel instead of Keras' eleven
    # elementwise ops per variable: the same update rule, so the same weights up to rounding.
    import tensorflow as tf
    shapes = [(7, 5), (5,), (3, 4, 2)]
    weights = {}
    for name, cls in (("keras", keras.optimizers.Adam), ("fused", train.FusedAdam)):
        lr = keras.optimizers.schedules.CosineDecay(0.05, 10) if schedule else 0.05
        optimizer = cls(lr)
        variables = [keras.Variable(np.ones(s, np.float32)) for s in shapes]
        optimizer.build(variables)
        step = tf.function(lambda grads: optimizer.apply_gradients(zip(grads, variables)))
        for k in range(6):
            grads = [tf.constant(np.random.default_rng(k).normal(size=s), tf.float32)
                     for s in shapes]
            step(grads)
        weights[name] = [v.numpy() for v in variables]
        assert int(optimizer.iterations.numpy()) == 6
    for a, b in zip(weights["keras"], weights["fused"]):
        assert np.abs(a - 1.0).max() > 0.1                            # the weights moved
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_speed_of_a_resumed_epoch_counts_only_its_own_captions(shapes_data, tmp_path,
                                                                monkeypatch):
    run = str(tmp_path / "run")
    cfg = small_config(shapes_data, epochs=1, max_steps=3, **NO_DECODING)
    run_trainer(cfg, run)
    cfg = small_config(shapes_data, epochs=1, **NO_DECODING)
    train.open_run(run, cfg)
    trainer = train.Trainer(cfg, run, progress=False, log=lambda *a: None)
    trainer.restore()
    trainer._compile(trainer.inputs.captions("train", epoch=0).element_spec)
    before = trainer.epoch_sums.numpy()[3]                            # captions already trained
    clock = iter(range(10**6))                       # train's clock: +1 s at every reading
    monkeypatch.setattr(train, "time", types.SimpleNamespace(
        perf_counter=lambda: float(next(clock))))
    logs = trainer._run_train_epoch(0, keras.callbacks.CallbackList([]))
    steps_now = logs["steps"] - 3
    assert steps_now >= 2
    captions_now = trainer.epoch_sums.numpy()[3] - before
    # at least one clock second per step of this run: at most its captions / its steps
    # (counting the 3 batches trained before the restart too gave more)
    assert 0 < logs["captions_per_second"] <= captions_now / steps_now


def test_memory_table_holds_train_and_val_features_only(trained):
    trainer = trained["trainer"]
    data = trainer.data
    assert trainer.inputs.table is not None                                 # the default: it fits
    held = set(trainer.inputs.table.index)
    used = {data.feature_paths[k] for s in ("train", "val") for k in data.splits[s]
            if k in data.feature_paths}
    assert held == used and trainer.inputs.table.table.shape[0] == len(used)
    assert not held & {data.feature_paths[k] for k in data.splits["test"]
                       if k in data.feature_paths}


def test_a_memory_table_larger_than_this_machine_can_build_is_read_from_disk(trained,
                                                                             monkeypatch):
    """--memory-cache-gb 64 on a 16 GB machine with 32 GB of COCO features: the table was
    built in memory (about twice its size while it is built) and the OOM killer ended the
    process without a word, after --fresh had deleted the run. Read from disk, with a note."""
    from caption_attn import train_data
    inputs = trained["trainer"].inputs
    kept, lines = inputs.table, []
    size = kept.table.shape[0] * inputs.data.reader.num_bytes
    monkeypatch.setattr(inputs, "log", lines.append)
    try:
        monkeypatch.setattr(train_data, "machine_memory", lambda: 2 * size - 1)
        inputs.table = None
        inputs.load_table()
        assert inputs.table is None
        assert lines == [f"note: --memory-cache-gb {inputs.cfg.train.memory_cache_gb:g}: the "
                         f"train and val features take {train_data.size_text(size)}, and "
                         f"building them into a table in memory takes about twice that, more "
                         f"than the {train_data.size_text(2 * size - 1)} this process may use: "
                         f"they are read from the cache on disk instead"]
        # in --memory-cache-gb's unit, GiB: "GB" beside a binary size was off by 7 %
        assert [train_data.size_text(n) for n in (150 * 2**30, 2**30 // 5, 12 * 2**20)] == \
            ["150.0 GiB", "0.2 GiB", "12 MiB"]
        monkeypatch.setattr(train_data, "machine_memory", lambda: 2 * size)   # it fits
        inputs.load_table()
        assert inputs.table is not None and len(lines) == 1
        monkeypatch.setattr(train_data, "machine_memory", lambda: None)      # unknown: as asked
        inputs.table = None
        inputs.load_table()
        assert inputs.table is not None and len(lines) == 1
    finally:
        inputs.table = kept


def test_the_memory_of_a_container_is_its_limit(tmp_path):
    """Under a cgroup limit (Docker, Kubernetes, Slurm) the host's memory is not this
    process's: the OOM killer ended it at the limit."""
    from caption_attn import train_data
    host = train_data.machine_memory(limits=())
    assert host > 0
    v2, v1 = tmp_path / "memory.max", tmp_path / "limit_in_bytes"
    v2.write_text("max\n")
    v1.write_text(f"{2**30}\n")
    assert train_data.machine_memory(limits=(str(v2),)) == host       # no limit
    assert train_data.machine_memory(limits=(str(v2), str(v1))) == min(host, 2**30)
    v1.write_text(f"{host * 4}\n")                                     # above the host's
    assert train_data.machine_memory(limits=(str(v1), str(tmp_path / "none"))) == host
    # a Slurm job's or systemd unit's cgroup is below the host's tree: its own and those above
    proc = tmp_path / "cgroup"
    proc.write_text("0::/system.slice/job_7/step_0\n")
    root = tmp_path / "fs"
    assert train_data.cgroup_limit_files(str(proc), str(root)) == [
        str(root / "system.slice/job_7/step_0/memory.max"),
        str(root / "system.slice/job_7/memory.max"), str(root / "system.slice/memory.max"),
        str(root / "memory.max"), str(root / "memory/memory.limit_in_bytes")]
    proc.write_text("0::/../../elsewhere\n")   # outside its namespace: the root's alone
    assert train_data.cgroup_limit_files(str(proc), str(root)) == [
        str(root / "memory.max"), str(root / "memory/memory.limit_in_bytes")]
    proc.write_text("12:cpu,cpuacct:/slurm/uid_0\n4:memory:/slurm/uid_0/job_7\n")
    assert train_data.cgroup_limit_files(str(proc), str(root))[:3] == [
        str(root / "memory/slurm/uid_0/job_7/memory.limit_in_bytes"),
        str(root / "memory/slurm/uid_0/memory.limit_in_bytes"),
        str(root / "memory/slurm/memory.limit_in_bytes")]
    (root / "system.slice" / "job_7").mkdir(parents=True)
    (root / "system.slice" / "job_7" / "memory.max").write_text(f"{2**31}\n")
    proc.write_text("0::/system.slice/job_7/step_0\n")
    assert train_data.machine_memory(
        train_data.cgroup_limit_files(str(proc), str(root))) == min(host, 2**31)


def test_empty_validation_split_is_refused_before_training(shapes_data, tmp_path):
    with open(shapes_data["captions"]) as f:
        captions = json.load(f)
    for image in captions["images"]:
        image["split"] = "test" if image["split"] == "test" else "train"
    path = str(tmp_path / "captions.json")
    with open(path, "w") as f:
        json.dump(captions, f)
    cfg = small_config(shapes_data)
    cfg.captions = path
    run = str(tmp_path / "run")
    train.open_run(run, cfg)
    with pytest.raises(UserError) as e:
        train.Trainer(cfg, run, progress=False, log=lambda *a: None)
    assert "val split" in str(e.value) and path in str(e.value)
    # nothing fixed yet: a rerun with a better caption file or --val-fraction is not stuck
    assert not any(os.path.exists(os.path.join(run, n)) for n in ("split.json", "vocab.json",
                                                                   "checkpoints"))


def test_a_vocabulary_without_words_is_refused_before_writing(shapes_data, tmp_path):
    """--min-count 100000 (a typo) kept no word: training ran with every word <unk>, reported
    a fine loss and saved a model that can only say "<unk>"."""
    cfg = small_config(shapes_data)
    cfg.vocab = VocabConfig(max_length=20, min_count=100000)
    run = str(tmp_path / "run")
    with pytest.raises(UserError) as e:
        train.train(cfg, run, progress=False, log=lambda *a: None)
    assert "--min-count 100000" in str(e.value) and "no word" in str(e.value)
    assert "seen most often" in str(e.value)
    assert not os.path.exists(run)


# --------------------------------------------------------------------------- resuming on other data
def _resume(trained, tmp_path, captions=None, logs=None):
    """Copy the finished run and `train` it again (4 epochs: nothing left to train) with
    `captions` instead of its caption file."""
    run = str(tmp_path / "run")
    if not os.path.exists(run):
        shutil.copytree(trained["run"], run)
    cfg = small_config_like(trained)
    cfg.captions = captions or cfg.captions
    train.train(cfg, run, progress=False, log=(logs.append if logs is not None else print))
    return run


def _captions_file(shapes_data, tmp_path, name, change=None, indent=None):
    with open(shapes_data["captions"]) as f:
        captions = json.load(f)
    for image in captions["images"]:
        for sentence in image["sentences"]:
            sentence["raw"] = change or sentence["raw"]
    path = str(tmp_path / name)
    with open(path, "w") as f:
        json.dump(captions, f, indent=indent)
    return path


def _files(run):
    return {n: open(os.path.join(run, n), "rb").read() for n in ("config.json", "split.json",
                                                                    "vocab.json")}


def test_resume_on_other_captions_is_refused_before_writing(trained, shapes_data, tmp_path):
    other = _captions_file(shapes_data, tmp_path, "other.json", change="a cat sits on a mat")
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    before = _files(run)
    with pytest.raises(UserError) as e:
        _resume(trained, tmp_path, captions=other)
    message = str(e.value)
    assert e.value.exit_code == 2
    assert f"--captions {other}: not the caption data" in message
    assert "40 of 40 images have other captions (e.g. 'shape_" in message
    assert shapes_data["captions"] in message and "--fresh" in message \
        and "another --run" in message
    assert _files(run) == before


def test_resume_on_the_same_captions_in_another_file_is_allowed(trained, shapes_data,
                                                                tmp_path):
    same = _captions_file(shapes_data, tmp_path, "moved.json", indent=2)  # reformatted copy
    logs = []
    run = _resume(trained, tmp_path, captions=same, logs=logs)
    assert any("--captions differs" in line for line in logs)
    with open(os.path.join(run, "split.json")) as f:
        assert json.load(f)["captions"] == same


def test_run_made_before_caption_fingerprints_still_resumes(trained, shapes_data, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    path = os.path.join(run, "split.json")
    with open(path) as f:
        old = json.load(f)
    del old["caption_data"]
    with open(path, "w") as f:
        json.dump(old, f)
    logs = []
    _resume(trained, tmp_path, logs=logs)
    assert any("no fingerprint of the run's caption data" in line for line in logs)
    with open(path) as f:
        assert json.load(f)["caption_data"]["sha256"]  # recorded now: checked from here on
    other = _captions_file(shapes_data, tmp_path, "other.json", change="a cat sits on a mat")
    with pytest.raises(UserError, match="not the caption data"):
        _resume(trained, tmp_path, captions=other)


# --------------------------------------------------------------------------- nothing left to train
def _run_files(run):
    return {n: open(os.path.join(run, n), "rb").read() for n in (
        "config.json", "split.json", "vocab.json", "history.json", "best.json")}


def _counting_loads(monkeypatch) -> list:
    """The caption files `load_train_data` parses from now on."""
    from caption_attn import data as data_lib
    loads, real = [], data_lib.load_dataset
    monkeypatch.setattr(data_lib, "load_dataset",
                        lambda path, *a, **k: loads.append(path) or real(path, *a, **k))
    return loads


def _early_stopped(run):
    """history.json of the copy as if val_bleu4 had been best in epoch 1."""
    path = os.path.join(run, "history.json")
    with open(path) as f:
        history = json.load(f)
    for h in history:
        h["val_bleu4"] = 0.5 if h["epoch"] == 1 else 0.1
    with open(path, "w") as f:
        json.dump(history, f)


@pytest.mark.parametrize("case", ["same", "fewer epochs, other bleu images", "stopped early"])
def test_a_rerun_with_nothing_left_to_train_parses_no_captions(trained, tmp_path, monkeypatch,
                                                               case):
    """A rerun of a finished run parsed the whole caption file (COCO's Karpathy file: 30 s
    of parsing, tokenizing and fingerprinting) before it said "nothing to train". When the
    file has the bytes the run last read (split.json's `caption_file`) it now says so
    without parsing it: the same summary and notes, nothing written. A run recorded before
    the stamp is loaded once (recording it: its files are then as they were)."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    cfg = small_config_like(trained)
    if case == "fewer epochs, other bleu images":   # notes of changed settings, --bleu-images
        cfg = small_config_like(trained, train=dataclasses.replace(cfg.train, epochs=2,
                                                                    bleu_images=4))
    if case == "stopped early":
        _early_stopped(run)
        cfg = small_config_like(trained, train=dataclasses.replace(cfg.train, epochs=8,
                                                                    patience=2))
    before = _run_files(run)
    path = os.path.join(run, "split.json")
    with open(path) as f:
        split = json.load(f)
    split.pop("caption_file", None)
    with open(path, "w") as f:
        json.dump(split, f)                            # as a run made before the stamp
    loads = _counting_loads(monkeypatch)
    logs = {"loaded": [], "quick": []}
    loaded = train.train(cfg, run, progress=False, log=logs["loaded"].append)
    assert loads == [cfg.captions] and _run_files(run) == before
    quick = train.train(cfg, run, progress=False, log=logs["quick"].append)
    assert loads == [cfg.captions] and _run_files(run) == before   # not parsed again
    assert train.format_summary(quick) == train.format_summary(loaded)
    assert train.format_summary(quick).startswith(
        "nothing to train: the run already finished epoch 4 ")
    # (the quick rerun counts no images: it is taken only when none is left out)
    assert {k for k in loaded if loaded[k] != quick[k]} <= {"epoch_length", "seconds",
                                                            "images"}
    notes = {k: [line for line in v if line.startswith("note:")] for k, v in logs.items()}
    assert notes["quick"] == notes["loaded"]
    assert len(notes["quick"]) == {"same": 0, "stopped early": 1}.get(case, 2), notes
    if case == "stopped early":
        assert quick["stopped_by"] == "early_stopping"
        assert "(stopped early before" in train.format_summary(quick)


def test_a_rerun_with_nothing_left_to_train_still_tells_what_changed(
        trained, shapes_data, copy_cache, tmp_path, monkeypatch):
    """The rerun of a finished run that parses no captions is taken only when the full load
    could say or do nothing more; else the data is loaded and everything told as before:
    captions edited in place are refused, so are features extracted from other images; a
    lost best model is rewritten, lost heatmaps drawn again, an unusable feature file
    skipped with a note; and more --epochs train."""
    from conftest import give_other_images
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    captions = _captions_file(shapes_data, tmp_path, "captions.json")  # the same captions
    cfg = small_config_like(trained)
    cfg.captions, cfg.cache = captions, copy_cache
    loads, logs = _counting_loads(monkeypatch), []

    def rerun(config=cfg):
        logs.clear()
        return train.train(config, run, progress=False, log=logs.append)
    rerun()                                            # moved: loaded, noted, recorded
    assert len(loads) == 1 and any("--captions differs" in line for line in logs)
    assert rerun()["steps_now"] == 0 and len(loads) == 1
    original = open(captions).read()
    with open(captions, "w") as f:                     # edited in place
        f.write(original.replace('"raw": "', '"raw": "a cat and ', 1))
    with pytest.raises(UserError, match="not the caption data"):
        rerun()
    with open(captions, "w") as f:
        f.write(original)
    index = os.path.join(copy_cache, "index.jsonl")
    entries = open(index).read()
    key = RunFolder(run).load_splits()["train"][0]
    give_other_images(copy_cache, [key])
    with pytest.raises(UserError, match="extracted from other images"):
        rerun()
    with open(index, "w") as f:
        f.write(entries)
    assert rerun()["steps_now"] == 0 and len(loads) == 2     # quick again: says only where
    assert logs == [f"source images checked in {shapes_data['images']} (the run's images "
                    f"folder, recorded in {os.path.join(run, 'split.json')})"]
    os.remove(os.path.join(run, "best.keras"))
    rerun()
    assert any("best.keras: missing; rewrote it from" in line for line in logs), logs
    shutil.rmtree(os.path.join(run, "attention", "epoch_4"))
    rerun()
    assert f"note: the attention heatmaps of epoch 4 lack {cfg.train.sample_images} of the " \
        f"{cfg.train.sample_images} sample images' (lost when the run was stopped, or drawn " \
        f"with fewer --sample-images): drawing them from its checkpoint" in logs, logs
    assert os.path.isdir(os.path.join(run, "attention", "epoch_4"))
    assert len(loads) == 4
    os.utime(os.path.join(copy_cache, key + ".npy"), (1, 1))   # changed after extraction
    rerun()
    assert any(re.match(r"skipped \d+ captions of 1 images", line) for line in logs), logs
    assert len(loads) == 5
    summary = rerun(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=5)))
    assert summary["epochs_now"] == 1 and len(loads) == 6
    assert summary["skipped_images"] == 1 and summary["images"] > 1     # said at the end too
    assert re.search(rf"^note: 1 of the {summary['images']} images \(\d+%\) were left out",
                     train.format_summary(summary), re.M)
    # a higher --sample-images: the last epoch's heatmaps of the new sample were never
    # drawn, not lost; told as either, and drawn from its checkpoint
    more = cfg.train.sample_images + 1
    rerun(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=5,
                                                             sample_images=more)))
    assert f"note: the attention heatmaps of epoch 5 lack 1 of the {more} sample images' " \
        f"(lost when the run was stopped, or drawn with fewer --sample-images): drawing them " \
        f"from its checkpoint" in logs, logs
    assert len(os.listdir(os.path.join(run, "attention", "epoch_5"))) == more


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_images_that_are_not_a_folder_are_refused_before_writing(shapes_data, tmp_path, kind):
    images = str(tmp_path / "images")
    if kind == "file":
        open(images, "w").close()
    run = str(tmp_path / "run")
    problem = "no such folder" if kind == "missing" else "not a folder"
    with pytest.raises(UserError, match=f"--images {images}: {problem}"):
        train.train(small_config(shapes_data, epochs=1), run, images_dir=images, progress=False,
                    log=lambda *a: None)
    assert not os.path.exists(run)


def test_cache_copied_without_its_times_says_so_and_how_to_fix(shapes_data, copy_cache,
                                                                tmp_path):
    for name in glob.glob(os.path.join(copy_cache, "**", "*.npy"), recursive=True):
        os.utime(name, ns=(1_600_000_000_000_000_000,) * 2)   # what `cp -r` does to mtimes
    cfg = small_config(shapes_data, cache=copy_cache)
    with pytest.raises(UserError) as e:
        train.load_train_data(cfg, str(tmp_path / "run"))
    message = str(e.value)
    assert f"no training captions have usable features in {copy_cache}" in message
    assert "changed after extraction" in message and "cp -a" in message \
        and "extract-features" in message


@pytest.mark.parametrize("place", ["cache", "inside the cache", "a folder of other files",
                                   "inside the cache through a symlink",
                                   "inside the images the cache was extracted from",
                                   "inside the images an earlier extraction read"])
def test_a_run_folder_that_is_the_cache_or_holds_other_files_is_refused(shapes_data,
                                                                       copy_cache, tmp_path,
                                                                       place):
    run = {"cache": copy_cache, "inside the cache": os.path.join(copy_cache, "run"),
           "a folder of other files": str(tmp_path / "photos"),
           "inside the cache through a symlink": str(tmp_path / "link" / "run"),
           "inside the images the cache was extracted from":
               os.path.join(shapes_data["images"], "run"),
           # not only the cache's last images folder (`--run` was let into an earlier one)
           "inside the images an earlier extraction read": str(tmp_path / "earlier" / "run")
           }[place]
    os.symlink(copy_cache, tmp_path / "link")  # `--run link/run` trained into the cache
    if place == "inside the images an earlier extraction read":
        os.makedirs(tmp_path / "earlier")          # (one no longer there holds no image)
        manifest = json.load(open(os.path.join(copy_cache, "manifest.json")))
        manifest["images_dirs"] = [str(tmp_path / "earlier"),
                                   *feature_cache.images_folders(manifest)]
        with open(os.path.join(copy_cache, "manifest.json"), "w") as f:
            json.dump(manifest, f)
    if place == "a folder of other files":
        os.makedirs(run)
        open(os.path.join(run, "holiday.jpg"), "w").close()
    before = sorted(os.listdir(copy_cache))
    problem = ("not a run folder and not empty" if place.startswith("a folder") else
               "inside the images folder" if place.startswith("inside the images") else
               "inside the feature cache")
    with pytest.raises(UserError, match=problem):
        train.train(small_config(shapes_data, cache=copy_cache, epochs=1), run,
                    progress=False, log=lambda *a: None)
    assert sorted(os.listdir(copy_cache)) == before and not os.path.exists(
        os.path.join(shapes_data["images"], "run"))
    if place == "a folder of other files":
        assert os.listdir(run) == ["holiday.jpg"]


def test_resume_that_moves_the_cosine_schedule_says_so(run_copy):
    """A finished cosine run (learning rate 0) resumed with more --epochs went back up to half
    its initial rate without a word (the decay spans the --epochs of the resuming call): a
    note gives the new rate, the one the trainer's schedule really takes."""
    from caption_attn.optimizer import StagedLearningRate
    saved = run_copy.load_config()
    assert saved.train.lr_schedule == "constant" and saved.train.epochs == 3
    cfg = dataclasses.replace(saved, train=dataclasses.replace(
        saved.train, lr_schedule="cosine", epochs=6))
    notes = [n for n in train.reopen_checks(run_copy, cfg, fresh=False)
             if "learning-rate schedule" in n]
    rate = float(StagedLearningRate(cfg.train, 6 * 10)(3 * 10))   # 10 steps per epoch
    assert rate == pytest.approx(0.5 * saved.train.learning_rate)
    assert notes == [f"the learning-rate schedule is now cosine over 6 cross-entropy epochs "
                     f"(was constant): epoch 4 starts at a learning rate of {rate:.3g} instead "
                     f"of {saved.train.learning_rate:.3g}, and the steps to come follow the "
                     f"new curve"]
    same = dataclasses.replace(saved, train=dataclasses.replace(saved.train, epochs=6,
                                                                learning_rate=1e-3))
    assert not [n for n in train.reopen_checks(run_copy, same, fresh=False)
                if "learning-rate schedule" in n]            # constant stays constant
    halved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=8))
    assert not [n for n in train.reopen_checks(run_copy, halved, fresh=False)
                if "learning rate" in n]   # the Trainer's, with the epochs' steps known


def test_summary_names_the_best_model_on_disk_after_a_stage_change(tmp_path):
    """A cross-entropy run whose best epoch was 3 of 4, continued into self-critical epochs
    that never beat epoch 4's val_cider, printed "best val_cider=0.0000 at epoch 4" beside
    "best model: best.keras", which holds epoch 3's model (val_loss 1.87)."""
    from caption_attn.fileio import write_json_atomic
    run = RunFolder(str(tmp_path / "run"))
    write_json_atomic(run.best_info, {"epoch": 3, "monitor": "val_loss", "value": 1.87})
    count = lambda n: types.SimpleNamespace(numpy=lambda: n)  # noqa: E731
    trainer = types.SimpleNamespace(
        step=count(78), epoch=count(5), step_in_epoch=count(0), chief=True, run=run,
        run_dir=run.path, cfg=RunConfig(train=TrainConfig(epochs=6, scst_after=4)),
        inputs=types.SimpleNamespace(steps_per_epoch=18, scst_steps_per_epoch=6),
        data=types.SimpleNamespace(skipped_captions=0, skipped_images=0, feature_paths={}))
    early = types.SimpleNamespace(monitor="val_cider", best_epoch=3, best=0.0)
    summary = train._summary(trainer, [{"epoch": 5, "loss": 1.0}], early, "early_stopping",
                             1.0, 4, 72)
    assert summary["monitor"] == "val_cider"                   # what early stopping watches
    assert (summary["best_monitor"], summary["best_epoch"]) == ("val_loss", 3)
    assert "best val_loss=1.8700 at epoch 3" in train.format_summary(summary)
    write_json_atomic(run.best_info, {"epoch": 3, "monitor": "val_loss", "value": None})
    summary = train._summary(trainer, [{"epoch": 5, "loss": 1.0}], early, "early_stopping",
                             1.0, 4, 72)                # a hand-edited best.json: no crash
    assert "best val_cider=0.0000 at epoch 4" in train.format_summary(summary)


def test_a_resume_with_another_monitor_keeps_the_best_model(tmp_path):
    """A val_loss run whose best epoch was 2 of 4, resumed with --monitor val_bleu4: epoch 4's
    val_bleu4, measured at the resume, is the only one, so early stopping's replay made epoch
    4 "best", and the repair of a save lost to a kill (the process died between epoch 4's
    checkpoint and its best-model save) replaced best.keras with epoch 4, the worst val_loss
    since epoch 1, before anything trained. The repair is for the monitor the epoch was
    trained with only: history.json records it, and for older entries without it, a value
    measured at the resume was never compared."""
    from caption_attn.fileio import write_json_atomic
    run = RunFolder(str(tmp_path / "run"))
    write_json_atomic(run.best_info, {"epoch": 2, "monitor": "val_loss", "value": 2.91})
    run.repair_best_model = lambda model: None       # best.keras is whole: nothing to mend
    early = types.SimpleNamespace(best_epoch=3, best=0.05,           # epoch 4, val_bleu4
                                  disk_best_epoch=None)
    for now, then, measured, repaired in (
            ("val_bleu4", "val_loss", {"val_bleu4": 0.05}, False),   # another --monitor
            ("val_bleu4", None, {"val_bleu4": 0.05}, False),         # an older run's entries
            ("val_bleu4", "val_bleu4", {}, True),                    # a kill before the save
            ("val_bleu4", None, {}, True),
            ("val_loss", "val_loss", {}, True)):
        saved = []
        trainer = types.SimpleNamespace(
            chief=True, run=run, model=None, log=print,
            cfg=RunConfig(train=TrainConfig(monitor=now)),
            _save_best=lambda epoch, value: saved.append((epoch, value)))
        history = [{"epoch": e, **({"monitor": then} if then else {})} for e in (1, 2, 3, 4)]
        train.Trainer._repair_best(trainer, early, 4, history, measured, at_end=True)
        assert saved == ([(3, 0.05)] if repaired else []), (now, then, measured)


@pytest.mark.parametrize("chief", [True, False])
@pytest.mark.parametrize("chief_saved_first", [False, True])
def test_every_worker_forgets_a_best_model_the_resume_replaces(tmp_path, chief,
                                                               chief_saved_first):
    """Epoch 3, the last cross-entropy one, beat best.json's epoch 1 but its save was lost:
    the resume saves it, on the chief only. Early stopping was told of epoch 1's model as a
    start of the self-critical stage's bar (`best_on_disk`); every worker forgets it, also
    one that reads best.json after the chief rewrote it, or its bar alone keeps a model no
    longer on disk and its decisions part from the chief's."""
    from caption_attn.callbacks import EarlyStopping
    from caption_attn.fileio import write_json_atomic
    run = RunFolder(str(tmp_path / "run"))
    os.makedirs(run.path)
    write_json_atomic(run.best_info, {"epoch": 3 if chief_saved_first else 1,
                                      "monitor": "val_loss", "value": 0.9})
    run.repair_best_model = lambda model: None
    history = [{"epoch": 1, "monitor": "val_loss", "val_loss": 1.0},
               {"epoch": 2, "monitor": "val_loss", "val_loss": 1.2},
               {"epoch": 3, "monitor": "val_loss", "val_loss": 0.9, "val_cider": 1.0}]
    cfg = RunConfig(train=TrainConfig(scst_after=3, scst_samples=2, epochs=5))
    early = EarlyStopping(cfg.train.monitor_for, patience=2, initial_history=history)
    early.best_on_disk(0, {"val_cider": 3.0})
    early.replay()
    saved = []
    trainer = types.SimpleNamespace(chief=chief, run=run, model=None, log=print, cfg=cfg,
                                    _save_best=lambda epoch, value: saved.append(epoch))
    train.Trainer._repair_best(trainer, early, 3, history, {}, at_end=True)
    assert early.disk_best_epoch is None
    assert saved == ([2] if chief and not chief_saved_first else [])
    # the stage's bar: epoch 3's val_cider (1.0), which a self-critical 2.0 beats
    early.set_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    early.on_epoch_end(3, {"val_loss": 1.1, "val_cider": 2.0})
    assert (early.monitor, early.best, early.best_epoch) == ("val_cider", 2.0, 3)


@pytest.mark.parametrize("text, what", [("[]", "a JSON list, not an object"),
                                        ("3", "a JSON int, not an object"),
                                        ('{"epoch": "3"}', "its epoch is '3'")])
def test_a_best_json_that_is_not_trains_object_is_refused_naming_it(tmp_path, text, what):
    # the resume's best-model repair crashed with `AttributeError: 'int' object has no
    # attribute 'get'` (and `[]` passed for "no best model")
    run = RunFolder(str(tmp_path / "run"))
    os.makedirs(run.path)
    with open(run.best_info, "w") as f:
        f.write(text)
    trainer = types.SimpleNamespace(chief=True, run=run, model=None, log=print, cfg=RunConfig())
    early = types.SimpleNamespace(best_epoch=1, best=1.0, disk_best_epoch=None)
    with pytest.raises(UserError) as e:
        train.Trainer._repair_best(trainer, early, 2, [], {}, at_end=True)
    assert str(e.value).startswith(f"{run.best_info}: {what}: not the {{epoch, monitor, "
                                   f"value}} of best.keras that train writes")
    assert "restore the file train wrote, or train the run again with --fresh" in str(e.value)


def test_a_checkpoint_that_cannot_be_written_stops_with_one_line(tmp_path):
    """A full disk while checkpointing ended `train` with TensorFlow's ResourceExhaustedError
    traceback (exit 1): now a TrainingError naming the folder, the reason and where a rerun
    resumes."""
    import tensorflow as tf

    def full_disk(checkpoint_number):
        raise tf.errors.ResourceExhaustedError(
            None, None, "{{function_node __wrapped__SaveV2}} /r/checkpoints/ckpt-36_temp/part-0;"
                        " No space left on device [Op:SaveV2]")
    run = RunFolder(str(tmp_path / "run"))
    fake = types.SimpleNamespace(step=types.SimpleNamespace(numpy=lambda: 36), run=run,
                                 _record_settings=lambda: None,   # config.json: not here
                                 averaged=types.SimpleNamespace(put=lambda averaged: None),
                                 cfg=types.SimpleNamespace(train=TrainConfig()),
                                 manager=types.SimpleNamespace(
                                     save=full_disk, latest_checkpoint="/r/checkpoints/ckpt-18",
                                     directory=run.checkpoints))
    with pytest.raises(train.TrainingError) as e:
        train.Trainer._save(fake)
    assert str(e.value) == (f"cannot write the checkpoint of step 36 into {run.checkpoints} (No "
                            f"space left on device): free space there (or make it writable) and "
                            f"rerun this command; it resumes from ckpt-18")


def test_a_checkpoint_save_that_fails_removes_its_shards(tmp_path):
    """A save that failed on a full disk left TensorFlow's `ckpt-N_temp/` folder of shards
    (as large as the checkpoint) on the full disk, and the rerun deleted it saying it was
    "left behind by a process killed while saving", though nothing was killed. The failed
    save removes its own; the folders of other steps are the resume's to judge."""
    import tensorflow as tf

    run = RunFolder(str(tmp_path / "run"))
    other = os.path.join(run.checkpoints, "ckpt-18_temp", "notes.txt")
    os.makedirs(os.path.dirname(other))
    open(other, "w").close()

    def full_disk(checkpoint_number):
        temp = os.path.join(run.checkpoints, f"ckpt-{checkpoint_number}_temp")
        os.makedirs(temp)
        for name in ("part-00000-of-00001.index",
                     "part-00000-of-00001.data-00000-of-00001.tempstate1308504961788190"):
            with open(os.path.join(temp, name), "wb") as f:
                f.write(b"x" * 1000)
        raise tf.errors.ResourceExhaustedError(
            None, None, f"{temp}/part-00000-of-00001.data-00000-of-00001.tempstate1308504961788"
                        f"190; No space left on device [Op:SaveV2]")
    fake = types.SimpleNamespace(step=types.SimpleNamespace(numpy=lambda: 36), run=run,
                                 _record_settings=lambda: None,
                                 averaged=types.SimpleNamespace(put=lambda averaged: None),
                                 cfg=types.SimpleNamespace(train=TrainConfig()),
                                 manager=types.SimpleNamespace(
                                     save=full_disk, latest_checkpoint=None,
                                     directory=run.checkpoints))
    with pytest.raises(train.TrainingError, match=r"^cannot write the checkpoint of step 36 "):
        train.Trainer._save(fake)
    assert sorted(os.listdir(run.checkpoints)) == ["ckpt-18_temp"]
    assert os.path.exists(other)

    # multi-worker: a save whose collective lost the other worker is not a full disk (the
    # advice to free space misled); the error goes on to `cli.main`, which names the worker
    def lost(checkpoint_number):
        raise tf.errors.UnavailableError(None, None, "Collective ops is aborted by: Socket "
                                                     "closed [Op:CollectiveReduceV2]")
    fake.manager.save = lost
    fake.cfg.train = TrainConfig(strategy="multi-worker")
    with pytest.raises(tf.errors.UnavailableError):
        train.Trainer._save(fake)
    fake.cfg.train = TrainConfig()
    with pytest.raises(train.TrainingError, match=r"^cannot write the checkpoint of step 36 "):
        train.Trainer._save(fake)


def test_split_fractions_for_a_file_with_its_own_split_are_refused(shapes_data, tmp_path):
    """--val-fraction 0.5 on a Karpathy file (the shapes dataset's) trained on the file's own
    split without a word: the user believed half the images were held out."""
    cfg = dataclasses.replace(small_config(shapes_data), data=DataConfig(seed=1,
                                                                         val_fraction=0.5))
    run = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"^--val-fraction 0.5 splits files without a split of "
                                        r"their own, but .* is a karpathy file"):
        train.train(cfg, run, progress=False, log=lambda *a: None)
    assert not os.path.exists(run)


def test_a_split_fraction_typed_with_its_default_value_is_refused_too(shapes_data, tmp_path,
                                                                     capsys):
    """`train --val-fraction 0.05` (the default, typed) on a Karpathy file trained on the
    file's own split: the check ran after the config was made, when a flag typed with its
    default value no longer counted as given."""
    from caption_attn.cli import main

    run = tmp_path / "run"
    code = main(["train", "--captions", shapes_data["captions"], "--cache",
                 shapes_data["cache"], "--run", str(run), "--val-fraction",
                 str(DataConfig.val_fraction)])
    assert code == 2 and not run.exists()
    assert (f"--val-fraction {DataConfig.val_fraction} splits files without a split of their "
            f"own") in capsys.readouterr().err


def test_fractions_that_leave_no_train_image_say_so(shapes_data, tmp_path):
    """--val-fraction 0.99 on a 40-image file without a split of its own rounds every image
    into val: the error blamed missing features ("run extract-features first")."""
    with open(shapes_data["captions"]) as f:
        images = json.load(f)["images"]
    path = tmp_path / "captions.token"          # Flickr8k token format: no split of its own
    path.write_text("".join(f"{im['filename']}#{i}\t{s['raw']}\n" for im in images
                            for i, s in enumerate(im["sentences"])))
    cfg = dataclasses.replace(small_config(shapes_data), captions=str(path),
                              data=DataConfig(seed=1, val_fraction=0.99, test_fraction=0.0))
    with pytest.raises(UserError, match=r"the train split of .*captions.token has no images "
                                        r"\(its images: 40 val\): lower --val-fraction"):
        train.train(cfg, str(tmp_path / "run"), progress=False, log=lambda *a: None)
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("empty", ["train", "val"])
def test_an_empty_split_of_official_lists_names_the_list_not_the_fractions(shapes_data,
                                                                           tmp_path, empty):
    """A Flickr8k file split by the lists beside it whose train (or dev) list names none of its
    images was told to lower (raise) --val-fraction / --test-fraction, which are refused
    for it."""
    with open(shapes_data["captions"]) as f:
        images = json.load(f)["images"]
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text("".join(f"{im['filename']}#{i}\t{s['raw']}\n" for im in images
                            for i, s in enumerate(im["sentences"])))
    names = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
             "test": "Flickr_8k.testImages.txt"}
    chunks = {"train": images[:30], "val": images[30:35], "test": images[35:]}
    for split, name in names.items():
        (tmp_path / name).write_text("".join(f"{im['filename']}\n" for im in chunks[split]
                                             if split != empty))
    cfg = dataclasses.replace(small_config(shapes_data), captions=str(path))
    with pytest.raises(UserError) as e:
        train.train(cfg, str(tmp_path / "run"), progress=False, log=lambda *a: None)
    assert f"{tmp_path / names[empty]} (Flickr8k's official {empty} list" in str(e.value)
    assert "-fraction" not in str(e.value)
    assert not os.path.exists(tmp_path / "run")


def test_self_critical_epochs_without_bleu_images_are_refused_up_front(shapes_data, tmp_path):
    """Self-critical epochs monitor val_cider, decoded over --bleu-images validation images:
    with 0 the first of them trained, then failed with "no value for val_cider (an empty
    validation split?)"."""
    run = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"^--scst-after 1: .* --bleu-images must be >= 1, got "
                                        r"0 \(or add --monitor val_loss\)$"):
        train.train(small_config(shapes_data, epochs=2, scst_after=1, bleu_images=0), run,
                    progress=False, log=lambda *a: None)
    assert not os.path.exists(run)
    RunConfig.from_dict(small_config(shapes_data, epochs=2, scst_after=1,
                                     bleu_images=0).to_dict())   # an older run still loads


def test_a_write_failing_while_training_is_exit_1_and_says_it_resumes(shapes_data, tmp_path,
                                                                      monkeypatch):
    """A full disk while history.json (or best.keras, a heatmap ...) was written printed the
    temporary file's name with exit code 2 ("bad input, nothing was done") though epochs had
    trained and a rerun resumes."""
    from caption_attn.fileio import temp_name
    run = str(tmp_path / "run")

    h5 = temp_name(os.path.join(run, "best.weights.h5"), ".weights.h5")
    for error, name in ((OSError(28, "No space left on device",
                                 temp_name(os.path.join(run, "history.json"))), "history.json"),
                        (OSError(f"Can't synchronously write data (file write failed: time = "
                                 f"Tue\n, filename = '{h5}', file descriptor = 5, errno = 28, "
                                 f"error message = 'No space left on device', buf = 0x5)"),
                         "best.weights.h5")):                 # h5py's
        class FullDisk:
            def __init__(self, *args, **kwargs):
                pass

            def fit(self, error=error):
                raise error
        monkeypatch.setattr(train, "Trainer", FullDisk)
        with pytest.raises(train.TrainingError) as e:
            train.train(small_config(shapes_data), run, progress=False, log=lambda *a: None)
        assert e.value.exit_code == 1
        assert str(e.value) == (f"{os.path.join(run, name)}: No space left on device while "
                                f"training; free space (or fix the folder) and rerun this "
                                f"command: it resumes from the last checkpoint")


def test_early_stopping_at_the_last_epoch_did_not_stop_the_run(shapes_data, tmp_path):
    """--epochs 2 --patience 1, epoch 2 no better: early stopping fired at the end of the
    last epoch, and the summary said "stopped by early_stopping"; its rerun advised "rerun
    with a larger --patience to train on", which then trained nothing (only --epochs does)."""
    run, quiet = str(tmp_path / "run"), (lambda *a: None)
    cfg = small_config(shapes_data, epochs=2, patience=1, min_delta=1e9)   # 2 never improves
    summary = train.train(cfg, run, progress=False, log=quiet)
    assert (summary["stopped_by"], summary["finished_epochs"]) == ("epochs", 2)
    again = train.format_summary(train.train(cfg, run, progress=False, log=quiet))
    assert again.startswith("nothing to train: the run already finished epoch 2 of 2, step ")
    assert "patience" not in again and "stopped early" not in again
    # an epoch more is what early stopping stopped: said so, with the way on
    more = train.train(small_config(shapes_data, epochs=3, patience=1, min_delta=1e9), run,
                       progress=False, log=quiet)
    assert (more["stopped_by"], more["epochs_now"]) == ("early_stopping", 0)
    assert "rerun with a larger --patience to train on" in train.format_summary(more)


def test_a_rerun_of_a_run_stopped_early_says_how_to_train_on():
    """More --epochs on a run early stopping had ended printed "nothing to train ... (stopped
    early before)": the way on (--patience) was left for the user to guess."""
    summary = {"run": "r", "epochs": 4, "steps": 72, "finished_epochs": 4, "target_epochs": 8,
               "epoch_steps": 0, "epoch_length": 18, "max_steps": None, "epochs_now": 0,
               "steps_now": 0, "stopped_by": "early_stopping", "monitor": "val_loss",
               "best_monitor": "val_loss", "best_epoch": 3, "best_value": 1.87,
               "final_loss": 2.1, "final_val_loss": 1.9, "seconds": 0.0,
               "skipped_captions": 0, "best_model": "r/best.keras"}
    assert train.format_summary(summary).splitlines()[0] == (
        "nothing to train: the run already finished epoch 4 of 8, step 72 (stopped early "
        "before: val_loss did not improve for --patience epochs; rerun with a larger "
        "--patience to train on), best val_loss=1.8700 at epoch 3")


def test_the_summary_repeats_the_images_left_out_for_want_of_features():
    """A cache missing a whole shard trained on half the images, exit 0, saying so only in
    one line near the start that scrolled away; the last lines, which users read, said
    nothing. The summary repeats how many images were left out, of how many."""
    summary = {"run": "r", "epochs": 2, "steps": 8, "finished_epochs": 2, "target_epochs": 2,
               "epoch_steps": 0, "epoch_length": 4, "max_steps": None, "epochs_now": 2,
               "steps_now": 8, "stopped_by": "epochs", "monitor": "val_loss",
               "best_monitor": "val_loss", "best_epoch": 2, "best_value": 1.5,
               "final_loss": 2.1, "final_val_loss": 1.9, "seconds": 3.0,
               "skipped_captions": 140, "skipped_images": 28, "images": 60,
               "best_model": "r/best.keras"}
    text = train.format_summary(summary)
    assert ("note: 28 of the 60 images (47%) were left out, with their 140 captions: they "
            "have no usable features in the cache (the \"skipped\" line above says why, and "
            "what to do)") in text.splitlines()
    assert "note: 1 of the 1000 images (<1%) were left out" in train.format_summary(
        {**summary, "skipped_images": 1, "skipped_captions": 5, "images": 1000})
    assert "left out" not in train.format_summary({**summary, "skipped_captions": 0,
                                                   "skipped_images": 0})


def test_more_scst_samples_than_batch_size_is_refused_up_front(shapes_data, tmp_path):
    """--batch-size is the captions of a self-critical step, which takes --batch-size //
    --scst-samples images but at least one: --batch-size 4 --scst-samples 5 trained steps of
    5 captions without a word. Refused naming both flags; without --scst-after no step
    samples, so --batch-size 4 with the default --scst-samples 5 stays fine."""
    run = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"^--scst-samples 5 is more than --batch-size 4: .* "
                                        r"raise --batch-size to at least 5 or lower "
                                        r"--scst-samples$"):
        train.train(small_config(shapes_data, epochs=2, scst_after=1, batch_size=4), run,
                    progress=False, log=lambda *a: None)
    assert not os.path.exists(run)
    train.check_train_flags(small_config(shapes_data, batch_size=4).train)
    train.check_train_flags(small_config(shapes_data, epochs=2, scst_after=1, batch_size=5)
                            .train)


@pytest.mark.parametrize("clip", [1e-300, 1e-5])
def test_a_clip_norm_too_small_to_move_a_weight_is_refused_by_train(shapes_data, tmp_path,
                                                                     clip):
    """Clipped to float32's 0 every gradient was 0 (1e-300), and far below 1e-3 Adam's epsilon
    outweighs the clipped gradients: a run that "trained" without moving, exit 0. Refused by
    train before anything is written; a run's config.json with such a value still loads (for
    `caption`, `evaluate` and `export` of a run trained so before)."""
    run = str(tmp_path / "run")
    with pytest.raises(UserError, match=rf"^--clip-norm {clip:g}: a clip norm below 0.001 "
                                        rf".* give 0 \(no clipping\) or at least 0.001"):
        train.train(small_config(shapes_data, clip_norm=clip), run, progress=False,
                    log=lambda *a: None)
    assert not os.path.exists(run)
    assert TrainConfig(clip_norm=clip).clip_norm == clip
    for fine in (0, 0.001, 5.0):
        train.check_train_flags(TrainConfig(clip_norm=fine))


def test_self_critical_flags_without_scst_after_are_refused():
    """--scst-samples, --scst-baseline and --scst-learning-rate without --scst-after changed
    nothing, and config.json recorded them as the run's settings, exit 0."""
    from caption_attn import cli
    args = cli.build_parser().parse_args(
        ["train", "--captions", "c.json", "--run", "r", "--scst-samples", "5",
         "--scst-learning-rate", "1e-4"])
    tc = cli.config_from_args(TrainConfig, args)
    with pytest.raises(UserError, match=r"^--scst-samples, --scst-learning-rate set the "
                                        r"self-critical epochs, which only --scst-after N turns "
                                        r"on \(this call trains none\): add --scst-after, or "
                                        r"leave them out$"):
        train.check_train_flags(tc)
    train.check_train_flags(TrainConfig())
    train.check_train_flags(TrainConfig(epochs=3, scst_after=1, scst_samples=5,
                                        scst_learning_rate=1e-4))


def test_bleu_images_typed_where_no_image_is_decoded_is_said(shapes_data, tmp_path):
    """--bleu-images 100 without --monitor val_bleu4 / val_cider or --scst-after decoded no
    validation image: early stopping followed val_loss, TensorBoard got no val_bleu4, and
    nothing said the flag went unused, exit 0. Now a note says so, once; there is none where
    the flag is used (a BLEU or CIDEr monitor, self-critical epochs) or not typed (a config
    made in Python, the demo's: no flag of the user's)."""
    from caption_attn import cli

    def notes(*flags):
        args = cli.build_parser().parse_args(["train", "--captions", "c.json", "--run", "r",
                                              *flags])
        return train.unused_flag_notes(cli.config_from_args(TrainConfig, args))

    said = ("--bleu-images 100 decodes no image in this call: it sets how many validation "
            "images val_bleu4 and val_cider are measured on, and neither is measured here "
            "(only under --monitor val_bleu4 or val_cider, or in self-critical epochs and the "
            "one before them, --scst-after); early stopping follows val_loss")
    assert notes("--bleu-images", "100") == [said]
    assert notes("--bleu-images", "100", "--monitor", "val_loss") == [said]
    assert notes("--bleu-images", "500") == [said.replace("100", "500")]  # the default, typed
    for used in (["--monitor", "val_bleu4"], ["--monitor", "val_cider"],
                 ["--epochs", "3", "--scst-after", "1"],
                 ["--epochs", "3", "--scst-after", "1", "--monitor", "val_loss"]):
        assert notes("--bleu-images", "100", *used) == [], used
    assert notes() == [] and notes("--monitor", "val_loss") == []
    assert notes("--bleu-images", "0") == []            # no image asked for: nothing to say
    assert train.unused_flag_notes(TrainConfig(bleu_images=100)) == []   # made in Python
    # told by `train` itself, once, beside its other notes (the run then trains as before)
    from caption_attn.config import flags_given
    with flags_given({"bleu_images"}):
        cfg = small_config(shapes_data, epochs=1, max_steps=1, sample_images=0,
                           bleu_images=3)
    logs = []
    summary = train.train(cfg, str(tmp_path / "run"), progress=False, log=logs.append)
    assert summary["steps"] == 1
    assert [line for line in logs if "--bleu-images" in line] == [
        "note: " + said.replace("100", "3")], logs


def test_a_cosine_schedule_without_cross_entropy_epochs_is_refused_up_front(shapes_data,
                                                                          tmp_path):
    """--lr-schedule cosine --scst-after 0 was accepted: a cosine over zero cross-entropy
    epochs, never applied (self-critical epochs take --scst-learning-rate)."""
    run = str(tmp_path / "run")
    with pytest.raises(UserError, match=r"^--lr-schedule cosine decays .* --scst-after 0 "
                                        r"trains none"):
        train.train(small_config(shapes_data, epochs=2, scst_after=0, lr_schedule="cosine"),
                    run, progress=False, log=lambda *a: None)
    assert not os.path.exists(run)
    train.check_train_flags(small_config(shapes_data, epochs=2, scst_after=1,
                                         lr_schedule="cosine").train)


def test_resume_with_other_bleu_images_is_refused_when_early_stopping_compares_them(
        trained, tmp_path):
    """--bleu-images changed on resume: early stopping compared val_bleu4 of the new image set
    with best.json's, measured on the run's, exit 0. Refused before writing when the epochs
    to come monitor it; a note when the values are only logged; nothing when both counts
    cover the whole val split (the same images)."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    before = _files(run)
    cfg = trained["cfg"]
    assert (cfg.train.monitor, cfg.train.bleu_images) == ("val_bleu4", 8)   # 8 val images
    other = lambda **c: dataclasses.replace(  # noqa: E731
        cfg, train=dataclasses.replace(cfg.train, **{"epochs": 5, **c}))
    with pytest.raises(UserError, match=r"^--bleu-images 4: .* measured val_bleu4 on 8 "
                                        r"validation images \(--bleu-images 8\), .* resume "
                                        r"with --bleu-images 8, or add --fresh"):
        train.train(other(bleu_images=4), run, progress=False, log=lambda *a: None)
    assert _files(run) == before
    same = other(bleu_images=100)
    assert train.check_metric_images(RunFolder(run), same, 8) == ([], same)
    # epochs to come that measure neither metric (--monitor val_loss, no self-critical
    # epoch) decode no image: said so, and the run keeps the images its values were
    # measured on (they were said to be "measured on 4 validation images")
    for count in (4, 0):
        notes, kept = train.check_metric_images(RunFolder(run),
                                                other(bleu_images=count, monitor="val_loss"), 8)
        assert notes == [f"--bleu-images {count} (was 8) measures nothing: the epochs to come "
                         f"measure neither val_bleu4 nor val_cider (only under --monitor "
                         f"val_bleu4 or val_cider, or in self-critical epochs and the one "
                         f"before them); the run keeps --bleu-images 8, which its values were "
                         f"measured with"]
        assert kept.train.bleu_images == 8 and kept.train.monitor == "val_loss"
    # Killed after epoch 5's history entry, before its checkpoint: the rerun trains epoch 5
    # again, compared with the run's val_bleu4. Counted from history.json (5 epochs done),
    # --epochs 5 had nothing to come, and the other image set passed without a word.
    history = json.load(open(os.path.join(run, "history.json")))
    with open(os.path.join(run, "history.json"), "w") as f:
        json.dump(history + [{**history[-1], "epoch": 5}], f)
    with pytest.raises(UserError, match=r"^--bleu-images 4: .* measured val_bleu4 on 8 "):
        train.check_metric_images(RunFolder(run), other(bleu_images=4), 8)


def test_resume_mid_epoch_refuses_lost_train_features_and_notes_repaired_ones(
        shapes_data, copy_cache, tmp_path):
    """A run stopped inside an epoch, resumed after one of its train images' feature files
    changed, trained the rest of the epoch cut from fewer captions (the batches skipped by
    their count), exit 0, saying only "skipped 5 captions ...". Refused before writing, naming
    the file, what is wrong with it and the extract-features command that repairs it."""
    run = str(tmp_path / "run")
    run_trainer(small_config(shapes_data, cache=copy_cache, epochs=2, max_steps=3,
                             **NO_DECODING), run)
    key = RunFolder(run).load_splits()["train"][0]
    path = os.path.join(copy_cache, key + ".npy")
    mtime = os.stat(path).st_mtime_ns
    os.utime(path, (1, 1))                                  # changed after extraction
    before = _files(run)
    with pytest.raises(UserError) as e:
        train.train(small_config(shapes_data, cache=copy_cache, epochs=2, **NO_DECODING), run,
                    progress=False, log=lambda *a: None)
    message = str(e.value)
    assert message.startswith(f"{run} stopped in epoch 1 at step 3, and 1 of the train images "
                              f"it was training on have no usable features now: 1 feature "
                              f"file(s) in {copy_cache} cannot be used: 1 changed after "
                              f"extraction"), message
    assert path in message and "caption-attn extract-features --verify" in message
    assert _files(run) == before

    # The other way round: an image the run went without when it last started (no digest
    # recorded), repaired since. It is used (the user was told to repair it), with a note on
    # what that costs the rest of the epoch: without one, the epoch grew without a word.
    os.utime(path, ns=(mtime, mtime))                       # usable again
    split = json.load(open(RunFolder(run).split))
    digest = split["image_digests"].pop(key)            # a run made before without_features
    with open(RunFolder(run).split, "w") as f:
        json.dump(split, f)
    cfg = small_config(shapes_data, cache=copy_cache, epochs=2, **NO_DECODING)
    data = train.load_train_data(cfg, RunFolder(run))
    gained = [
        f"1 train images have usable features now that {run} went without when it last "
        f"started (repaired since, e.g. {key!r}): epoch 1, stopped at step 3, goes on cut "
        f"from more captions, so in its remaining steps some captions come twice and others "
        f"not at all; from epoch 2 on, every caption once again"]
    assert train.check_features_mid_epoch(RunFolder(run), cfg, data) == gained
    # Today's runs keep the digest of an image skipped at their last start and list it as
    # without features: usable again, the same note; still unusable, not "lost" (the epoch
    # was being trained without it), nothing to say.
    split["image_digests"][key], split["without_features"] = digest, [key]
    with open(RunFolder(run).split, "w") as f:
        json.dump(split, f)
    assert train.check_features_mid_epoch(RunFolder(run), cfg, data) == gained
    os.utime(path, (1, 1))
    data = train.load_train_data(cfg, RunFolder(run))
    assert train.check_features_mid_epoch(RunFolder(run), cfg, data) == []


def test_a_resume_names_the_images_it_now_has_features_for(trained, tmp_path):
    """Train and val images the run went without when it last started (their features
    repaired since) joined at the next resume without a word: the train ones with words the
    vocabulary never saw (<unk>), the val ones changing what the validation values measure.
    So did val images that lost their features since (deleted, damaged), the other way."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    cfg = small_config_like(trained)
    data = train.load_train_data(cfg, run)
    assert train.changed_images_notes(RunFolder(run), data) == []
    splits = RunFolder(run).load_splits()
    with open(RunFolder(run).split) as f:
        split = json.load(f)
    split["without_features"] = [splits["train"][0], splits["val"][1]]
    with open(RunFolder(run).split, "w") as f:
        json.dump(split, f)
    assert train.changed_images_notes(RunFolder(run), data) == [
        f"1 train and 1 val images have usable features now that {run} went without when it "
        f"last started (e.g. {splits['train'][0]!r}): the train ones are trained on with the "
        f"run's vocabulary (fit when it started), so their words outside it are <unk>; "
        f"the validation values of the epochs to come are measured with the val ones, on "
        f"other images than the earlier epochs'"]
    split["without_features"] = []
    with open(RunFolder(run).split, "w") as f:
        json.dump(split, f)
    lost = splits["val"][2]
    del data.caption_ids["val"][lost]                      # no usable features now
    assert train.changed_images_notes(RunFolder(run), data) == [
        f"1 val images {run} had usable features of when it last started have none now "
        f"(e.g. {lost!r}): the validation values of the epochs to come are measured without "
        f"them, on other images than the earlier epochs'"]


def _measured_on_other_images(run: str, metric: str, value: float) -> list:
    """history.json and best.json of `run` as if every `metric` had been measured on other
    validation images (another digest), each worth `value`: a bar no epoch can beat."""
    with open(os.path.join(run, "history.json")) as f:
        history = json.load(f)
    assert all(h[f"{metric}_images_sha256"] for h in history)
    for h in history:
        h[metric], h[f"{metric}_images_sha256"] = value, "0" * 64
    with open(os.path.join(run, "history.json"), "w") as f:
        json.dump(history, f)
    with open(os.path.join(run, "best.json")) as f:
        best = json.load(f)
    with open(os.path.join(run, "best.json"), "w") as f:
        json.dump({**best, "value": value}, f)
    return history


def test_val_bleu4_measured_on_other_val_images_is_measured_again(trained, tmp_path):
    """A resume whose val images changed since the epochs measured val_bleu4 (a val image
    gained or lost its features): early stopping compared the next epochs with values of
    other images, and a worse epoch could replace the best model or a better one be missed
    (here the old values, 1000, beat any epoch: the next one could never become the best).
    The monitored metric of the restored epoch and of best.keras is measured again."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    old = _measured_on_other_images(run, "val_bleu4", 1000.0)
    with open(os.path.join(run, "best.json")) as f:
        best = json.load(f)["epoch"]
    cfg = small_config_like(trained, train=dataclasses.replace(trained["cfg"].train,
                                                               epochs=5))
    notes = []
    train.train(cfg, run, progress=False, log=notes.append)
    said = [n for n in notes if "on other validation images" in n]
    assert len(said) == 1 and "epochs 1, 2, 3, 4 measured val_bleu4" in said[0], notes
    history = json.load(open(os.path.join(run, "history.json")))
    assert len(history) == 5
    again = {h["epoch"] for h in history if h["val_bleu4"] != 1000.0}
    assert again == {4, best, 5} and all(0 <= h["val_bleu4"] <= 1 for h in history
                                         if h["epoch"] in again)
    digests = {h["val_bleu4_images_sha256"] for h in history if h["epoch"] in again}
    assert len(digests) == 1 and digests != {old[0]["val_bleu4_images_sha256"]}
    record = json.load(open(os.path.join(run, "best.json")))
    now = {h["epoch"]: h["val_bleu4"] for h in history if h["epoch"] in again}
    winner = max(now, key=lambda e: (now[e], -e))   # a tie keeps the earlier model
    assert record["epoch"] == winner and record["value"] == now[winner]


def test_a_kill_between_the_records_of_values_measured_again_loses_neither(
        trained, tmp_path, monkeypatch):
    """Values measured again at a resume go into history.json and best.json, one file after
    the other. A kill between them (simulated: the process dies right after the first
    write) left history.json with the new values and best.json with the old 1000: at the
    rerun nothing was stale any more, and best.keras stayed the best at a value no epoch
    can beat (its note said the epoch had been trained again). Now best.json is written
    first, and the rerun measures again until both are written."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    _measured_on_other_images(run, "val_bleu4", 1000.0)
    cfg = small_config_like(trained, train=dataclasses.replace(trained["cfg"].train,
                                                               epochs=5))

    class Killed(BaseException):
        pass

    real = train.write_json_atomic

    def write_then_die(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if os.path.basename(path) in ("history.json", "best.json"):
            raise Killed(path)

    monkeypatch.setattr(train, "write_json_atomic", write_then_die)
    with pytest.raises(Killed, match=r"best\.json$"):
        train.train(cfg, run, progress=False, log=lambda *a: None)
    monkeypatch.setattr(train, "write_json_atomic", real)
    assert {h["val_bleu4"] for h in json.load(open(os.path.join(run, "history.json")))} \
        == {1000.0}                                            # still stale: measured again
    assert json.load(open(os.path.join(run, "best.json")))["value"] <= 1
    train.train(cfg, run, progress=False, log=lambda *a: None)
    history = json.load(open(os.path.join(run, "history.json")))
    record = json.load(open(os.path.join(run, "best.json")))
    values = {h["epoch"]: h["val_bleu4"] for h in history}
    assert len(history) == 5 and record["value"] == values[record["epoch"]] <= 1, \
        (record, values)


def test_entries_without_image_digests_count_as_measured_on_the_last_starts_images(
        trained, tmp_path):
    """history.json of a run trained before the digests were recorded: its values count as
    measured on the val images the run had usable features of when it last started
    (split.json), so a val image gained since still has them measured again; with the
    same images, nothing is."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    with open(os.path.join(run, "history.json")) as f:
        history = [{k: v for k, v in h.items() if not k.endswith("_images_sha256")}
                   for h in json.load(f)]
    with open(os.path.join(run, "history.json"), "w") as f:
        json.dump(history, f)
    cfg = small_config_like(trained, train=dataclasses.replace(trained["cfg"].train,
                                                               epochs=5))
    split_path = RunFolder(run).split
    split = json.load(open(split_path))
    gained = sorted(split["splits"]["val"])[0]        # a metric image (the first ones)
    split["without_features"] = [gained]              # none usable at the last start
    with open(split_path, "w") as f:
        json.dump(split, f)
    notes = []
    train.train(cfg, run, progress=False, log=notes.append)
    said = [n for n in notes if "measured val_bleu4 on other validation images" in n]
    assert len(said) == 1 and "epochs 1, 2, 3, 4 measured" in said[0], notes
    assert "measured again on the current ones: " in said[0]
    # recorded for good: the next start's split.json is this one's, whose images the
    # epochs not measured again (1-3 but the best) were not measured on
    again = json.load(open(os.path.join(run, "history.json")))
    stale = {h["epoch"] for h in again if h["val_bleu4_images_sha256"] != again[-1][
        "val_bleu4_images_sha256"]}
    assert stale and stale <= {1, 2, 3}, again
    notes = []
    train.train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=6)),
                run, progress=False, log=notes.append)
    said = [n for n in notes if "measured val_bleu4 on other validation images" in n]
    assert len(said) == 1 and said[0].startswith(
        f"note: epoch{'s' * (len(stale) > 1)} {', '.join(map(str, sorted(stale)))} measured"), \
        notes
    # the same images as at the last start: nothing measured again
    run2 = str(tmp_path / "run2")
    shutil.copytree(trained["run"], run2)
    with open(os.path.join(run2, "history.json"), "w") as f:
        json.dump(history, f)
    notes = []
    train.train(cfg, run2, progress=False, log=notes.append)
    assert not [n for n in notes if "on other validation images" in n], notes


def test_val_loss_measured_on_other_val_images_is_left_out_or_measured_again(
        shapes_data, tmp_path):
    """The same for val_loss (monitored by default): the restored epoch and best.keras are
    measured again, an epoch that is neither is left out; the next epoch is compared with
    the new values, not with the old ones' unbeatable -1000."""
    run = str(tmp_path / "run")
    run_trainer(small_config(shapes_data, epochs=2, **NO_DECODING), run)
    _measured_on_other_images(run, "val_loss", -1000.0)
    best = json.load(open(os.path.join(run, "best.json")))["epoch"]
    notes = []
    train.train(small_config(shapes_data, epochs=3, **NO_DECODING), run, progress=False,
                log=notes.append)
    said = [n for n in notes if "on other validation images" in n]
    assert len(said) == 1 and "epochs 1, 2 measured val_loss" in said[0], notes
    assert ("not with epoch 1 (nor count it against --patience)" in said[0]) == (best == 2)
    history = json.load(open(os.path.join(run, "history.json")))
    again = {2, best, 3}
    assert [h["val_loss"] > 0 for h in history] == [e in again for e in (1, 2, 3)]
    assert all(h["val_ce"] <= h["val_loss"] for h in history if h["epoch"] in again)
    record = json.load(open(os.path.join(run, "best.json")))
    winner = min(again, key=lambda e: (history[e - 1]["val_loss"], e))
    assert record["epoch"] == winner and record["value"] == history[winner - 1]["val_loss"]


def test_other_bleu_images_are_accepted_when_a_later_stage_change_starts_on_new_values():
    """A run stopped after 3 cross-entropy epochs (the last one measured val_cider, the
    self-critical stage was to start) resumed with --scst-after 5 and other --bleu-images:
    epochs 4-5 monitor val_loss, and the stage change at epoch 6 starts from epoch 5's
    val_cider, measured on the new images. It was refused because some later epoch monitors
    val_cider; a note now. At --scst-after 3 (the change now) it is still refused."""
    old = TrainConfig(epochs=5, scst_after=3, bleu_images=8)
    history = [{"epoch": 1, "stage": "cross-entropy", "val_loss": 2.0},
               {"epoch": 2, "stage": "cross-entropy", "val_loss": 1.9},
               {"epoch": 3, "stage": "cross-entropy", "val_loss": 1.8, "val_cider": 0.5}]
    run = types.SimpleNamespace(config=__file__, path="RUN", read_history=lambda: history,
                                load_config=lambda: types.SimpleNamespace(train=old),
                                checkpoints=os.path.join(os.path.dirname(__file__), "none"))
    later = types.SimpleNamespace(train=TrainConfig(epochs=8, scst_after=5, bleu_images=4))
    notes, _ = train.check_metric_images(run, later, 8)
    assert len(notes) == 1 and notes[0].startswith("--bleu-images 4 (was 8): val_cider of")
    now = types.SimpleNamespace(train=TrainConfig(epochs=8, scst_after=3, bleu_images=4))
    with pytest.raises(UserError, match=r"^--bleu-images 4: RUN measured val_cider on 8 "):
        train.check_metric_images(run, now, 8)


def _fake_run(tmp_path, old, history, epoch, step, in_epoch=0):
    """A run folder's stand-in for `check_metric_images`: config `old`, `history` and a real
    checkpoint holding only the counters (epoch, step, step_in_epoch) it reads."""
    import tensorflow as tf
    counters = {name: tf.Variable(value, dtype=tf.int64) for name, value in
                (("epoch", epoch), ("step", step), ("step_in_epoch", in_epoch))}
    directory = str(tmp_path / "checkpoints")
    tf.train.CheckpointManager(tf.train.Checkpoint(**counters), directory,
                               max_to_keep=1).save(checkpoint_number=step)
    return types.SimpleNamespace(config=__file__, path="RUN", read_history=lambda: history,
                                 load_config=lambda: types.SimpleNamespace(train=old),
                                 checkpoints=directory)


def test_a_typed_bleu_images_on_resume_gets_one_note_that_says_what_happens(trained,
                                                                              tmp_path):
    """`train --bleu-images 4` on a run measured on 8 (val_bleu4) got two notes: the typed
    flag's "decodes no image in this call" and, resumed with --monitor val_loss, "val_bleu4
    of the epochs to come are measured on 4 validation images", which contradict each
    other (no epoch to come measured any); a rerun that trains nothing blamed the monitor
    beside "has nothing left to train". Each now gets one note, the run's, and config.json
    keeps --bleu-images 8, which its values were measured with."""
    from caption_attn.config import flags_given
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)

    def bleu_notes(**changes):
        with flags_given({"bleu_images", *changes}):      # as typed on the command line
            tc = dataclasses.replace(trained["cfg"].train, bleu_images=4, **changes)
        logs = []
        train.train(small_config_like(trained, train=tc), run, progress=False,
                    log=logs.append)
        return [line for line in logs if "--bleu-images" in line]

    # (with --monitor val_loss the typed flag's own note would fire: the run's replaces it)
    assert bleu_notes(monitor="val_loss") == [
        f"note: --bleu-images 4 (was 8) measures nothing: {run} has nothing left to train (its "
        f"4 epochs reach --epochs 4); the run keeps --bleu-images 8, which its values were "
        f"measured with"]
    assert bleu_notes(epochs=5, monitor="val_loss") == [
        "note: --bleu-images 4 (was 8) measures nothing: the epochs to come measure neither "
        "val_bleu4 nor val_cider (only under --monitor val_bleu4 or val_cider, or in "
        "self-critical epochs and the one before them); the run keeps --bleu-images 8, "
        "which its values were measured with"]
    assert len(RunFolder(run).read_history()) == 5             # epoch 5 trained
    assert RunFolder(run).load_config().train.bleu_images == 8


def test_a_rerun_that_trains_nothing_keeps_the_runs_bleu_images(trained, tmp_path):
    """`train` again on the finished run with --bleu-images 4 (it measured val_bleu4 on 8):
    nothing is trained, and config.json keeps 8, else a later resume with --bleu-images 4 and
    more --epochs would pass as unchanged and compare its val_bleu4 with values on 8 images.
    No note may call 4 a changed setting either."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    cfg = small_config_like(trained, train=dataclasses.replace(trained["cfg"].train,
                                                               bleu_images=4))
    logs = []
    train.train(cfg, run, progress=False, log=logs.append)
    notes = [line for line in logs if line.startswith("note: ")]
    assert any("(was 8) measures nothing" in n and "keeps --bleu-images 8" in n
               for n in notes), notes
    assert not any("train.bleu_images" in n for n in notes), notes
    assert RunFolder(run).load_config().train.bleu_images == 8
    with pytest.raises(UserError, match=r"^--bleu-images 4: .* measured val_bleu4 on 8 "):
        train.train(small_config_like(trained, train=dataclasses.replace(
            trained["cfg"].train, bleu_images=4, epochs=5)), run, progress=False,
            log=lambda *a: None)


def test_other_bleu_images_are_a_note_when_the_rerun_trains_nothing(tmp_path):
    """Rerunning the command of a run that early stopping had stopped (or that finished its
    --epochs, or reached --max-steps) with another --bleu-images was refused as if epochs to
    come would compare val_bleu4 on other images, though the rerun trains nothing: a note.
    A rerun that does train on (more --patience, more --epochs) is still refused."""
    old = TrainConfig(epochs=10, monitor="val_bleu4", patience=2, bleu_images=8)
    history = [{"epoch": e, "stage": "cross-entropy", "val_loss": 1.0, "val_bleu4": b}
               for e, b in ((1, 0.20), (2, 0.30), (3, 0.29), (4, 0.28))]   # stopped after 4
    run = _fake_run(tmp_path, old, history, epoch=4, step=40)
    rerun = lambda **c: RunConfig(  # noqa: E731
        train=dataclasses.replace(old, **{"bleu_images": 4, **c}))
    notes, kept = train.check_metric_images(run, rerun(), 8)
    assert notes == ["--bleu-images 4 (was 8) measures nothing: RUN has nothing left to train "
                     "(early stopping had stopped it (val_bleu4 did not improve for "
                     "--patience 2 epochs)); the run keeps --bleu-images 8, which its values "
                     "were measured with"]
    # config.json goes on saying 8: had it said 4, a later resume with --bleu-images 4 and
    # more --patience would look unchanged and compare its val_bleu4 with values on 8 images
    assert kept.train == old
    assert "its 4 epochs reach --epochs 4" in train.check_metric_images(
        run, rerun(epochs=4), 8)[0][0]
    assert "it reached --max-steps 40" in train.check_metric_images(
        run, rerun(patience=5, max_steps=40), 8)[0][0]
    for trains_on in (dict(patience=3), dict(patience=5, max_steps=41)):
        with pytest.raises(UserError, match=r"^--bleu-images 4: RUN measured val_bleu4 on 8 "):
            train.check_metric_images(run, rerun(**trains_on), 8)
    # a last epoch without val_bleu4 (trained with --monitor val_loss) has it measured on the
    # new images before early stopping replays: that may restart patience, so it is refused
    unmeasured = history + [{"epoch": 5, "stage": "cross-entropy", "val_loss": 0.9}]
    (tmp_path / "later").mkdir()
    later = _fake_run(tmp_path / "later", old, unmeasured, epoch=5, step=50)
    with pytest.raises(UserError, match=r"^--bleu-images 4: RUN measured val_bleu4 on 8 "):
        train.check_metric_images(later, rerun(), 8)


def test_out_of_memory_while_training_is_one_line_with_what_to_lower(shapes_data, tmp_path,
                                                                    monkeypatch):
    """TensorFlow's ResourceExhaustedError (activations too large for --batch-size) came out
    as a traceback; it is a TrainingError (exit 1) saying what to lower, and that a rerun
    resumes."""
    class RunsOutOfMemory:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            raise tf.errors.ResourceExhaustedError(   # as a tf.function's error reads
                None, None, "Graph execution error:\n\nDetected at node while/add defined at "
                "(most recent call last):\n  File \"train.py\", line 1\n\nOOM when allocating "
                "tensor with shape[64,64,51200] and type float\n\t [[{{node while/add}}]]")
    monkeypatch.setattr(train, "Trainer", RunsOutOfMemory)
    run = str(tmp_path / "run")
    with pytest.raises(train.TrainingError) as e:
        train.train(small_config(shapes_data), run, progress=False, log=lambda *a: None)
    assert str(e.value) == (
        f"{run}: out of memory while training (OOM when allocating tensor with "
        f"shape[64,64,51200] and type float); rerun with a lower --batch-size (taken at an "
        f"epoch's start: it resumes from the last checkpoint), a lower --memory-cache-gb (the "
        f"features kept in memory), or smaller --units / --embedding-dim with --fresh (a new "
        f"model)")
    assert e.value.exit_code == 1
    assert isinstance(e.value, OutOfMemory)   # the demo says it in its own flags


def test_a_broken_pipe_while_training_is_left_to_the_cli(shapes_data, tmp_path, monkeypatch):
    """`train ... | head -n 3`: printing an epoch line after the reader left raised
    BrokenPipeError, which train turned into "RUN: Broken pipe while training; free space (or
    fix the folder)" (exit 1) as if the run folder's disk were full. It goes on to the CLI,
    which ends quietly with 141 when stdout is what broke."""
    class PrintsIntoAClosedPipe:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(train, "Trainer", PrintsIntoAClosedPipe)
    with pytest.raises(BrokenPipeError):
        train.train(small_config(shapes_data), str(tmp_path / "run"), progress=False,
                    log=lambda *a: None)


def _described(data, cfg, resumed: bool = False, done: int = 0) -> list:
    """The lines `train._describe` logs for `data` (no Trainer built)."""
    logged = []
    train._describe(types.SimpleNamespace(
        data=data, cfg=cfg, log=logged.append,
        strategy=types.SimpleNamespace(num_replicas_in_sync=1),
        inputs=types.SimpleNamespace(items={s: data.items(s) for s in ("train", "val")},
                                     train_images=[], steps_per_epoch=1, table=None)),
        resumed, done)
    return logged


def test_captions_longer_than_max_length_are_counted_and_told(shapes_data, tmp_path):
    """Captions cut at --max-length were cut silently: now train says how many."""
    cfg = dataclasses.replace(small_config(shapes_data, epochs=1),
                              vocab=VocabConfig(max_length=4))
    train.open_run(str(tmp_path / "run"), cfg)
    data = train.load_train_data(cfg, str(tmp_path / "run"))
    lengths = [len(ids) - 2 for ids in data.items("train")[1]]
    words = {k: [len(tokenize(c)) for c in refs] for k, refs in data.references["train"].items()}
    long = sum(n > 4 for counts in words.values() for n in counts)
    assert 0 < long == data.truncated and max(lengths) == 4
    logged = _described(data, cfg)
    val_long = sum(len(tokenize(c)) > 4 for refs in data.references["val"].values()
                   for c in refs)
    assert 0 < val_long == data.truncated_val       # val_loss's captions: cut, and said so
    assert any(f"{long} of {len(lengths)} train captions are longer than --max-length 4"
               in line for line in logged)
    assert any(f"{val_long} of {len(data.items('val')[1])} val captions are longer than "
               f"--max-length 4 words: val_loss is measured on their first 4 words" in line
               for line in logged)
    # the vocabulary holds the words trained on: a word seen only past the cut took a place
    # (and --min-count counted it) though the model never trains on it
    kept = {w for refs in data.references["train"].values() for c in refs for w in tokenize(c)[:4]}
    past = {w for refs in data.references["train"].values() for c in refs
            for w in tokenize(c)[4:]} - kept
    assert past and set(data.vocab.tokens[len(train.SPECIAL_TOKENS):]) == kept
    assert not [line for line in logged if "<unk>" in line]
    cfg = small_config(shapes_data, epochs=1)       # max_length 20: shapes captions fit
    train.open_run(str(tmp_path / "run2"), cfg)
    assert train.load_train_data(cfg, str(tmp_path / "run2")).truncated == 0


def test_a_vocabulary_leaving_most_words_unknown_is_told(shapes_data, tmp_path):
    cfg = dataclasses.replace(small_config(shapes_data, epochs=1),
                              vocab=VocabConfig(max_length=20, vocab_size=2))
    train.open_run(str(tmp_path / "run"), cfg)
    data = train.load_train_data(cfg, str(tmp_path / "run"))
    logged = _described(data, cfg)
    ids = [i for ids in data.items("train")[1] for i in ids[1:-1]]
    share = sum(i == train.UNK for i in ids) / len(ids)
    assert share > 0.5 and (f"note: {share:.0%} of the train captions' words are <unk>, "
                            f"outside the vocabulary of 2 words (--vocab-size 2, --min-count 1)"
                            in "\n".join(logged))


def test_a_reordered_vocabulary_is_refused_not_used_with_the_wrong_words(shapes_data,
                                                                          tmp_path):
    """vocab.json sorted or edited by hand (same size) loaded, and the model's ids then named
    other words: `caption` and a resume went on silently with the wrong words."""
    cfg = small_config(shapes_data, epochs=1)
    run = RunFolder(str(tmp_path / "run"))
    train.open_run(run.path, cfg)
    data = train.load_train_data(cfg, run.path)
    data.fix_in(run, cfg.captions)
    assert run.load_vocab() == data.vocab
    with open(run.vocab, encoding="utf-8") as f:
        saved = json.load(f)
    saved["words"] = sorted(saved["words"], reverse=True)
    with open(run.vocab, "w", encoding="utf-8") as f:
        json.dump(saved, f)
    with pytest.raises(UserError, match="not the vocabulary this run was trained with") as e:
        train.load_train_data(cfg, run.path)
    assert run.vocab in str(e.value) and "--fresh" in str(e.value)


def _val_steps(run, tag):
    """Steps of `tag` (or tags under `tag/`) in the run's validation event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    steps = []
    for path in glob.glob(os.path.join(run, "logs", "validation", "events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            steps += [event.step for v in event.summary.value
                      if v.tag == tag or v.tag.startswith(tag + "/")]
    return sorted(steps)


def test_heatmaps_being_drawn_are_kept_when_training_is_interrupted(trained, tmp_path,
                                                                    monkeypatch):
    """Ctrl-C (or an error) in epoch 6: epoch 5's heatmaps, drawn in the background and
    written only at the next epoch's end, were lost from attention/ and TensorBoard."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    real = train.Trainer._run_train_epoch

    def interrupted(self, epoch, callbacks):
        if epoch == 5:
            raise KeyboardInterrupt
        return real(self, epoch, callbacks)

    monkeypatch.setattr(train.Trainer, "_run_train_epoch", interrupted)
    cfg = small_config_like(trained, train=dataclasses.replace(trained["cfg"].train, epochs=6))
    with pytest.raises(KeyboardInterrupt):
        run_trainer(cfg, run)
    assert len(glob.glob(os.path.join(run, "attention", "epoch_5", "*.png"))) == 2
    assert _val_steps(run, "captions") == [1, 2, 3, 4, 5]
    assert _val_steps(run, "attention").count(5) == 2


def test_heatmaps_lost_by_a_kill_are_drawn_again_on_resume(trained, tmp_path):
    """A kill after the last epoch's checkpoint, while its heatmaps were being drawn: the
    rerun draws them from the restored model (the one that epoch finished with)."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    shutil.rmtree(os.path.join(run, "attention", "epoch_4"))
    for path in glob.glob(os.path.join(run, "logs", "validation", "events.out.tfevents.*")):
        os.remove(path)       # as if killed before epoch 4's samples reached TensorBoard
    logged = []
    train.open_run(run, trained["cfg"])
    train.Trainer(trained["cfg"], run, progress=False, log=logged.append).fit()
    expected = sorted(os.listdir(os.path.join(trained["run"], "attention", "epoch_4")))
    assert sorted(os.listdir(os.path.join(run, "attention", "epoch_4"))) == expected
    assert _val_steps(run, "captions") == [4]
    assert any("heatmaps of epoch 4" in line for line in logged), logged
    # an epoch whose heatmaps are there is not drawn again
    logged.clear()
    train.Trainer(trained["cfg"], run, progress=False, log=logged.append).fit()
    assert not any("heatmaps of epoch" in line for line in logged), "\n".join(logged)



@pytest.mark.parametrize("lost", ["empty folder", "one of two"])
def test_heatmaps_a_stop_cut_short_are_drawn_again_and_older_ones_named(trained, tmp_path,
                                                                       lost):
    """A full disk while the last epoch's heatmaps were written left attention/epoch_4
    empty, or with one of its two heatmaps: the rerun took the folder for heatmaps written
    (it only checked that the folder was there), drew nothing and said nothing, also when it
    trained nothing (`rerun_without_data`). It draws them again when any sample's heatmap is
    missing; those of an earlier epoch cannot be (the model is no longer that epoch's): a
    note names that epoch."""
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    last, earlier = (os.path.join(run, "attention", f"epoch_{k}") for k in (4, 2))
    names = sorted(os.listdir(last))
    assert len(names) == 2
    for name in names if lost == "empty folder" else names[1:]:
        os.remove(os.path.join(last, name))
    os.remove(os.path.join(earlier, names[0]))
    for path in glob.glob(os.path.join(run, "logs", "validation", "events.out.tfevents.*")):
        os.remove(path)       # as if stopped before epoch 4's samples reached TensorBoard
    logged = []
    summary = train.train(trained["cfg"], run, progress=False, log=logged.append)
    assert summary["epochs_now"] == 0
    assert sorted(os.listdir(last)) == names
    assert _val_steps(run, "captions") == [4]
    notes = [line for line in logged if "heatmaps of epoch" in line]
    assert len(notes) == 2 and "heatmaps of epoch 4 lack " in notes[0], logged
    assert notes[1] == (f"note: {os.path.join(run, 'attention')}: the heatmaps of epoch(s) 2 "
                        f"lack 1 of the {len(names)} sample images' (lost when a run stopped "
                        f"before writing them, or drawn with fewer --sample-images); only those "
                        f"of the epoch a rerun resumes from can be drawn again"), notes
    logged.clear()      # the last epoch's are whole: not drawn again; the lost ones still said
    train.train(trained["cfg"], run, progress=False, log=logged.append)
    assert [line for line in logged if "heatmaps of epoch" in line] == notes[1:], logged


@pytest.mark.parametrize("failing", [0, 1])
def test_a_heatmap_that_fills_the_disk_is_named_and_drawn_again_by_the_rerun(
        trained, tmp_path, monkeypatch, failing):
    """The heatmap write that filled the disk ended `train` with "RUN: No space left on
    device while training" (the error named no file) and left attention/epoch_5 empty or
    with one of its two heatmaps, which the rerun never drew again. The message names the
    heatmap; no empty folder is left; the rerun draws the epoch's heatmaps."""
    import errno

    from caption_attn import fileio
    run = str(tmp_path / "run")
    shutil.copytree(trained["run"], run)
    names = sorted(os.listdir(os.path.join(run, "attention", "epoch_4")))
    folder = os.path.join(run, "attention", "epoch_5")
    real = open

    class FullDisk:
        def __init__(self, path, *args):
            self._f = real(path, *args)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_open(path, mode="r", *args):
        full = mode == "wb" and os.path.basename(path).startswith(f".{names[failing]}.tmp.")
        return (FullDisk if full else real)(path, mode, *args)
    monkeypatch.setattr(fileio, "open", fake_open, raising=False)
    cfg = small_config_like(trained, train=dataclasses.replace(trained["cfg"].train, epochs=5))
    with pytest.raises(train.TrainingError) as e:
        train.train(cfg, run, progress=False, log=lambda *a: None)
    assert str(e.value) == (f"{os.path.join(folder, names[failing])}: No space left on device "
                            f"while training; free space (or fix the folder) and rerun this "
                            f"command: it resumes from the last checkpoint")
    assert sorted(os.listdir(folder) if os.path.exists(folder) else []) == names[:failing]
    monkeypatch.undo()
    logged = []
    assert train.train(cfg, run, progress=False, log=logged.append)["epochs_now"] == 0
    assert any("heatmaps of epoch 5 lack " in line for line in logged), logged
    assert sorted(os.listdir(folder)) == names

def test_references_that_give_cider_no_weight_are_told(tmp_path):
    """One train image, or captions alike in every train image: every n-gram is in all of
    them, CIDEr-D's idf is 0, and val_cider and the reward were 0 whatever the caption, shown
    as 0.0000 without a word (three self-critical epochs trained nothing)."""
    from caption_attn import train_data
    for refs, told in (({0: [[4, 5, 2]], 1: [[4, 5, 2]]}, True),      # the same captions
                       ({0: [[4, 5, 2]]}, True),                        # one image
                       ({0: [[4, 5, 2]], 1: [[4, 6, 2]]}, False)):
        logged = []
        fake = types.SimpleNamespace(
            _df=None, run=types.SimpleNamespace(cider_df=str(tmp_path / "df.json")),
            train_references=lambda: refs, data=types.SimpleNamespace(vocab=[0] * 7),
            chief=False, log=logged.append)
        df = train_data.EpochData.document_frequency(fake)
        assert df.num_images == len(refs)
        assert any("CIDEr-D weighs each by log(images / images holding it) = 0" in line
                   for line in logged) == told


def test_xla_and_a_step_larger_than_the_train_images_are_told_as_they_are(shapes_data,
                                                                          tmp_path):
    """--xla was silently not applied to the self-critical step (its reward is numpy), and
    the start line said a self-critical step takes --batch-size // --scst-samples images where
    the train split has fewer."""
    run = str(tmp_path / "run")
    cfg = small_config(shapes_data, epochs=2, scst_after=1, xla=True)
    train.open_run(run, cfg)
    logs = []
    trainer = train.Trainer(cfg, run, progress=False, log=logs.append)
    assert ("note: --xla compiles the cross-entropy step only: the self-critical step, whose "
            "CIDEr-D reward is computed in numpy, runs without XLA") in logs
    logs.clear()
    trainer.inputs.train_images = trainer.inputs.train_images[:2]
    trainer.inputs.images_per_step = 3
    train._describe(trainer, False, 0)
    assert "self-critical after epoch 1 (" in logs[0] and "of 2 images x 5 samples)" in logs[0]


def flickr8k_like(shapes_data, folder, lists=True) -> str:
    """The shapes dataset as a Flickr8k token file in `folder`, with (`lists`) Flickr8k's
    official lists beside it: captions.json's split, one train image in none of them."""
    with open(shapes_data["captions"]) as f:
        images = json.load(f)["images"]
    path = os.path.join(folder, "Flickr8k.token.txt")
    with open(path, "w") as f:
        f.writelines(f"{i['filename']}#{k}\t{s['raw']}\n" for i in images
                     for k, s in enumerate(i["sentences"]))
    for split, name in (("train", "Flickr_8k.trainImages.txt"),
                        ("val", "Flickr_8k.devImages.txt"), ("test", "Flickr_8k.testImages.txt")):
        if lists:
            names = [i["filename"] for i in images if i["split"] == split]
            with open(os.path.join(folder, name), "w") as f:
                f.writelines(f"{n}\n" for n in names[1 if split == "train" else 0:])
    return path


def flickr8k_run(shapes_data, folder, lists=True):
    """A run set up, not trained (split.json, vocab.json), on `flickr8k_like`'s token file in
    `folder`: (RunFolder in folder/run, its config, its data, the token file)."""
    captions = flickr8k_like(shapes_data, str(folder), lists=lists)
    cfg = dataclasses.replace(small_config(shapes_data, epochs=1), captions=captions)
    run = RunFolder(os.path.join(str(folder), "run"))
    train.open_run(run.path, cfg)
    data = train.load_train_data(cfg, run.path)
    data.fix_in(run, captions)
    return run, cfg, data, captions


def test_a_resume_after_only_a_split_list_changed_names_the_lists_and_what_moved(
        shapes_data, tmp_path):
    """It was refused as "--captions ...token.txt: not the caption data ... (1 image is in
    another split, ...); restore the file's earlier captions", the file being unchanged."""
    run, cfg, data, captions = flickr8k_run(shapes_data, tmp_path)
    lists = {s: tmp_path / n for s, n in (("train", "Flickr_8k.trainImages.txt"),
                                          ("val", "Flickr_8k.devImages.txt"),
                                          ("test", "Flickr_8k.testImages.txt"))}
    names = {s: p.read_text().split() for s, p in lists.items()}
    moved, gone = names["train"][0], names["test"][0]
    lists["train"].write_text("\n".join(names["train"][1:]) + "\n")
    lists["val"].write_text("\n".join(names["val"] + [moved]) + "\n")
    lists["test"].write_text("\n".join(names["test"][1:]) + "\n")
    with pytest.raises(UserError) as e:
        train.load_train_data(cfg, run.path)
    assert str(e.value) == (
        f"--captions {captions}: Flickr8k's official lists beside it split its images "
        f"otherwise than when {run.path} was trained on them (1 image is in another list "
        f"({moved!r}: train then, Flickr_8k.devImages.txt now), 1 image is in none of them "
        f"now ({gone!r}: test then)); restore the lists, use another --run, or add --fresh to "
        f"start this run over with the lists as they are")
    # a caption changed as well: the caption file is named, as before
    with open(captions, "a") as f:
        f.write(f"{names['train'][1]}#9\ta new caption\n")
    with pytest.raises(UserError, match=r"not the caption data .* restore the file's earlier "
                                        r"captions"):
        train.load_train_data(cfg, run.path)


def test_a_run_split_by_image_hash_keeps_its_split_when_flickr8k_lists_appear(
        shapes_data, tmp_path):
    """Flickr8k's official lists now split a Flickr8k file. A run made before (split by image
    hash, as every Flickr8k run was) resumed with the lists beside its file must not change
    split under its weights (its captions now looked other: "N images are in another split",
    refused with "restore the file's earlier captions"): it keeps its split, with a note; with
    --fresh it is split by the lists. A run split by the lists whose lists are gone is refused,
    saying so."""
    captions = flickr8k_like(shapes_data, str(tmp_path), lists=False)
    cfg = dataclasses.replace(small_config(shapes_data, epochs=1), captions=captions)
    run = RunFolder(str(tmp_path / "run"))
    train.open_run(run.path, cfg)
    data = train.load_train_data(cfg, run.path)
    assert data.split_source == "hash" and data.split_note.startswith("split by image hash")
    data.fix_in(run, captions)
    with open(run.split) as f:
        split = json.load(f)
    del split["split_source"]                  # a run made before split.json recorded it
    with open(run.split, "w") as f:
        json.dump(split, f)
    flickr8k_like(shapes_data, str(tmp_path))                  # the lists appear
    resumed = train.load_train_data(cfg, run.path)
    assert resumed.splits == data.splits and resumed.split_source == "hash"
    assert resumed.split_note == (
        f"{run.path} keeps the split by image hash it was made with ({run.split}); "
        f"Flickr8k's official lists Flickr_8k.*Images.txt beside {captions} split a new run: "
        f"add --fresh to train on them (most of their test and dev images are in this run's "
        f"train split)")
    logged = _described(resumed, cfg, True, 1)
    assert "note: " + resumed.split_note in logged
    fresh = train.load_train_data(cfg, run.path, reuse=False)   # --fresh
    assert fresh.split_source == "lists" and fresh.splits != data.splits
    with open(tmp_path / "Flickr_8k.testImages.txt") as f:
        assert fresh.splits["test"] == sorted(f.read().split())
    # the train image in none of the lists is left out
    assert sum(map(len, fresh.splits.values())) == sum(map(len, data.splits.values())) - 1
    fresh.fix_in(run, captions)
    assert RunFolder(run.path).split_by_lists()
    assert train.load_train_data(cfg, run.path).splits == fresh.splits
    os.remove(tmp_path / "Flickr_8k.trainImages.txt")
    os.remove(tmp_path / "Flickr_8k.devImages.txt")
    os.remove(tmp_path / "Flickr_8k.testImages.txt")
    with pytest.raises(UserError) as e:
        train.load_train_data(cfg, run.path)
    assert str(e.value) == (
        f"{run.path} was split by Flickr8k's official lists Flickr_8k.*Images.txt beside its "
        f"caption file, but they are not beside {captions} now: put them back beside it, or "
        f"add --fresh to start this run over split by image hash")


def _not_utf8(tmp_path, name: str = "caf\xe9") -> str:
    """tmp_path/NAME with NAME's characters as single bytes (Latin-1): a folder name that is
    not UTF-8, held by Python with surrogate escapes."""
    return os.fsdecode(os.fsencode(str(tmp_path)) + b"/" + name.encode("latin-1"))


def test_captions_and_images_in_folders_not_utf8_train_and_resume_as_the_same(shapes_data,
                                                                              tmp_path,
                                                                              monkeypatch):
    """--captions / --images in a folder named with bytes that are not UTF-8: writing
    split.json ended in a UnicodeEncodeError once the data was loaded. Now config.json and
    split.json hold the exact paths, so a rerun sees the same caption file and images folder
    (a path read back changed would say --captions differs, or check the images elsewhere)."""
    folder = _not_utf8(tmp_path)
    os.makedirs(folder)
    captions = os.path.join(folder, "captions.json")
    shutil.copy(shapes_data["captions"], captions)
    images = os.path.join(folder, "images")
    os.symlink(shapes_data["images"], images)
    run = str(tmp_path / "run")
    cfg = dataclasses.replace(small_config(shapes_data, epochs=1, bleu_images=0),
                              captions=captions)
    train.train(cfg, run, images_dir=images, progress=False, log=lambda *a: None)
    folder_run = RunFolder(run)
    assert folder_run.load_config().captions == captions
    assert folder_run.images_dir() == images and folder_run.caption_file()["path"] == captions
    # the rerun finds all done from config.json and split.json, as written (no data loaded)
    monkeypatch.setattr(train, "_load_and_train",
                        lambda *a, **k: pytest.fail("the rerun loaded the data again"))
    logs = []
    summary = train.train(cfg, run, images_dir=images, progress=False, log=logs.append)
    assert summary["epochs"] == 1
    assert not any("differs" in str(line) for line in logs), logs


@pytest.mark.parametrize("flag", ["--run", "--cache"])
def test_a_run_or_cache_folder_not_utf8_is_refused_before_anything(shapes_data, tmp_path,
                                                                   flag):
    """TensorFlow opens the run folder (checkpoints, TensorBoard logs) and the cache's feature
    files by paths it holds as UTF-8: such a --run crashed (UnicodeEncodeError) after the
    data was loaded, leaving an empty run folder; such a --cache (ValueError) too. Refused
    first, naming the flag, the path as printed and a way out."""
    odd = _not_utf8(tmp_path)
    cache = odd if flag == "--cache" else shapes_data["cache"]
    if flag == "--cache":
        shutil.copytree(shapes_data["cache"], cache)
    run = os.path.join(odd, "run") if flag == "--run" else str(tmp_path / "run")
    shown = (run if flag == "--run" else cache).replace("\udce9", "\\xe9")
    with pytest.raises(UserError) as e:
        train.train(small_config(shapes_data, cache=cache, epochs=1), run, progress=False,
                    log=lambda *a: None)
    assert str(e.value).startswith(f"{flag} {shown}: not a UTF-8 path"), str(e.value)
    assert "symlink" in str(e.value)
    assert not os.path.exists(run)


def test_a_resume_with_another_batch_size_goes_on_along_the_cosine_by_epochs(shapes_data,
                                                                            tmp_path):
    """The cosine decay counted the optimizer's steps: resumed with a bigger --batch-size (an
    epoch of fewer steps) the steps already taken stood further along the new, shorter
    curve, and the epochs to come trained at a learning rate of ~0 without a number said.
    The decay goes on from the fraction of training done (epochs finished), and a note gives
    the rate the next epoch starts at."""
    import math
    run = str(tmp_path / "run")
    per_epoch = 10                                  # 40 shapes images at --batch-size 16
    run_trainer(small_config(shapes_data, epochs=3, lr_schedule="cosine",
                             max_steps=per_epoch, **NO_DECODING), run)
    logs = []
    train.train(small_config(shapes_data, epochs=3, lr_schedule="cosine",
                             batch_size=64, **NO_DECODING), run, progress=False, log=logs.append)
    rates = [h["learning_rate"] for h in RunFolder(run).read_history()]
    cosine = [1e-2 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]
    assert rates == pytest.approx(cosine, rel=1e-5)
    per_epoch_seen, fewer = [h["steps"] for h in RunFolder(run).read_history()][:2]
    assert per_epoch_seen == per_epoch and fewer < per_epoch
    assert (f"note: an epoch is now {fewer} steps (was {per_epoch}: --batch-size 64, was 16): "
            f"the cosine decay goes on from the fraction of training done, 1 of 3 "
            f"cross-entropy epochs; epoch 2 starts at a learning rate of {cosine[1]:.3g}, as "
            f"the run's schedule had there") in logs, logs
    assert not [line for line in logs if "--lr-schedule cosine decays over steps" in line]


def test_a_finished_run_resumed_with_more_epochs_and_batches_trains_on_a_live_rate(run_copy):
    """A finished 3-epoch run resumed with --epochs 5 --batch-size 32 --lr-schedule cosine
    trained both new epochs at exactly 0: its 30 steps were past the new 5 x 5 of the decay."""
    import math
    saved = run_copy.load_config()
    cfg = dataclasses.replace(saved, train=dataclasses.replace(
        saved.train, lr_schedule="cosine", epochs=5, batch_size=32))
    train.train(cfg, run_copy.path, progress=False, log=lambda *a: None)
    rates = [h["learning_rate"] for h in run_copy.read_history()][3:]
    assert rates == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * e / 5))
                                   for e in (3, 4)], rel=1e-5)


def test_schedule_notes_only_when_something_trains_and_worded_for_constant(shapes_data,
                                                                           tmp_path, run_copy):
    """A moved schedule was noted ("training continues at step 4 of epoch 1 at a learning
    rate of ...") then "nothing to train"; switched to constant, the note said the steps to
    come "follow the new curve"."""
    run = str(tmp_path / "mid")
    run_trainer(small_config(shapes_data, epochs=2, max_steps=3, lr_schedule="cosine",
                             sample_images=0), run)
    logs = []
    summary = train.train(small_config(shapes_data, epochs=2, max_steps=3, sample_images=0),
                          run, progress=False, log=logs.append)
    assert summary["steps_now"] == 0
    assert not [line for line in logs if "learning-rate schedule" in line], logs
    logs = []
    train.train(small_config(shapes_data, epochs=2, max_steps=4, sample_images=0), run,
                progress=False, log=logs.append)
    notes = [line for line in logs if "learning-rate schedule" in line]
    assert len(notes) == 1 and re.fullmatch(
        r"note: the learning-rate schedule is now constant \(was cosine over 2 cross-entropy "
        r"epochs\): training continues at step 4 of epoch 1 at a learning rate of 0\.01 "
        r"instead of [0-9.e-]+, which every step to come keeps", notes[0]), notes
    saved = run_copy.load_config()                     # finished: 3 epochs of 3
    logs = []
    summary = train.train(dataclasses.replace(saved, train=dataclasses.replace(
        saved.train, lr_schedule="cosine")), run_copy.path, progress=False, log=logs.append)
    assert summary["steps_now"] == 0
    assert not [line for line in logs if "learning-rate schedule" in line], logs


def test_a_rerun_with_another_min_delta_keeps_the_best_model_and_says_so(shapes_data,
                                                                         tmp_path):
    """`--min-delta 10` made epoch 1 the best of 2; rerun with `--min-delta 0` it trained
    nothing, yet best.keras was replaced by epoch 2's model and best.json said epoch 2,
    without a word: early stopping's replay with the new --min-delta picked epoch 2, which
    the repair of a lost save took for one. The epochs so far are replayed as they were
    compared; the note says what the new --min-delta would have picked."""
    run = str(tmp_path / "run")
    run_trainer(small_config(shapes_data, epochs=2, min_delta=10.0, **NO_DECODING), run)
    folder = RunFolder(run)
    assert folder.best_record()["epoch"] == 1
    with open(folder.best_model, "rb") as f:
        before = f.read()
    logs = []
    summary = train.train(small_config(shapes_data, epochs=2, **NO_DECODING), run,
                          progress=False, log=logs.append)
    assert summary["steps_now"] == 0 and summary["best_epoch"] == 1
    assert folder.best_record()["epoch"] == 1
    with open(folder.best_model, "rb") as f:
        assert f.read() == before
    history = folder.read_history()
    assert history[1]["val_loss"] < history[0]["val_loss"]     # better, by less than 10
    assert (f"note: --min-delta 0 (was 10): with it epoch 2 would be the best (val_loss="
            f"{train.metric_text(history[1]['val_loss'])}), but the run's epochs were compared "
            f"with --min-delta 10, which kept epoch 1 (val_loss="
            f"{train.metric_text(history[0]['val_loss'])}); the epochs to come are compared "
            f"with --min-delta 0") in logs, logs
    # entries written before they recorded their --min-delta: config.json's, the run's
    from caption_attn.fileio import write_json_atomic
    write_json_atomic(folder.history, [{k: v for k, v in h.items() if k != "min_delta"}
                                       for h in history])
    summary = train.train(small_config(shapes_data, epochs=2, **NO_DECODING), run,
                          progress=False, log=lambda *a: None)
    assert summary["best_epoch"] == 1 and folder.best_record()["epoch"] == 1
    with open(folder.best_model, "rb") as f:
        assert f.read() == before
    # trained on, the next epoch has to beat the kept epoch 1 (by more than 0), not epoch 2
    summary = train.train(small_config(shapes_data, epochs=3, **NO_DECODING), run,
                          progress=False, log=lambda *a: None)
    third = folder.read_history()[2]
    assert third["min_delta"] == 0 and "min_delta" not in folder.read_history()[1]
    best = 3 if third["val_loss"] < history[0]["val_loss"] else 1
    assert folder.best_record()["epoch"] == best == summary["best_epoch"]


@pytest.mark.parametrize("tc, self_critical, advice, not_advised", [
    (TrainConfig(learning_rate=1e-2), False,
     "lower --learning-rate (now 0.01)", "--clip-norm"),
    (TrainConfig(learning_rate=1e-2, clip_norm=0.0), False,
     "--clip-norm 5 (clipping is off)", "--precision"),
    (TrainConfig(epochs=4, scst_after=2, precision="bfloat16"), True,
     "lower --scst-learning-rate (now 5e-05)", "--clip-norm 5"),
    # a float16 run's checkpoints do not restore into float32: a resume would be refused
    (TrainConfig(precision="float16"), False, "--precision float32 with --fresh", "--clip-norm"),
])
def test_a_diverged_loss_advises_what_would_change_something(tc, self_critical, advice,
                                                              not_advised):
    """`--learning-rate 1e38` ended with "try a lower --learning-rate, --clip-norm 5, or
    --precision float32", though --clip-norm 5 and float32 were the settings already used."""
    out = {"loss": math.nan, "gradient_norm": math.nan}
    with pytest.raises(train.TrainingError) as e:
        train.check_finite(out, 0, 1, None, loss_scaling=False, tc=tc,
                           self_critical=self_critical)
    message = str(e.value)
    assert advice in message and not_advised not in message, message
    assert ("--precision float32" in message) == (tc.precision != "float32"), message


def test_a_non_finite_gradient_of_a_finite_loss_is_named_as_such():
    # "the loss became -0.0 ... diverged": the gradient norm was what was not finite
    with pytest.raises(train.TrainingError, match=r"the gradient norm became inf \(the loss "
                                                  r"was -0\.0\) at epoch 1, step 3"):
        train.check_finite({"loss": -0.0, "gradient_norm": math.inf}, 0, 2, None,
                           loss_scaling=False)


def test_fresh_on_a_folder_of_other_files_deletes_nothing(shapes_data, tmp_path):
    """`train --run Q --fresh` deleted logs/server.log, checkpoints/other_model.pt and
    eval/results.csv of a folder that was no run (exit 0)."""
    run = tmp_path / "Q"
    for name in ("logs/server.log", "checkpoints/other_model.pt", "eval/results.csv"):
        os.makedirs(os.path.dirname(run / name), exist_ok=True)
        (run / name).write_text("theirs")
    with pytest.raises(UserError, match=r"not a run folder and not empty"):
        train.train(small_config(shapes_data, epochs=1, max_steps=2, fresh=True), str(run),
                    progress=False, log=lambda *a: None)
    assert sorted(os.listdir(run)) == ["checkpoints", "eval", "logs"]
    assert (run / "eval" / "results.csv").read_text() == "theirs"


def test_fresh_keeps_and_names_the_users_files_in_the_runs_folders(shapes_data, run_copy):
    run = run_copy.path
    mine = [os.path.join("eval", "mine.txt"), os.path.join("checkpoints", "README")]
    for name in mine:
        os.makedirs(os.path.dirname(os.path.join(run, name)), exist_ok=True)
        with open(os.path.join(run, name), "w") as f:
            f.write("mine")
    logs = []
    train.train(small_config(shapes_data, epochs=1, max_steps=2, fresh=True, **NO_DECODING),
                run, progress=False, log=logs.append)
    for name in mine:
        assert open(os.path.join(run, name)).read() == "mine"
    kept = [line for line in logs if "--fresh kept" in line]
    assert len(kept) == 1 and all(os.path.join(run, n) in kept[0] for n in mine), logs


def test_a_run_trained_with_fresh_is_told_to_continue_without_it(shapes_data, tmp_path,
                                                                  monkeypatch):
    """`train ... --fresh` stopped by an error, Ctrl-C or --max-steps said to rerun "this
    command" / "the same command", which, --fresh and all, deleted the checkpoint it had just
    saved and started over. The error, the stop lines and the summary say "without --fresh"."""
    import types
    run = str(tmp_path / "run")

    class Fails:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            raise train.TrainingError(f"{run}/x.npy: damaged; rerun this command: it "
                                      f"continues from step 7 (a checkpoint was saved)")
    monkeypatch.setattr(train, "Trainer", Fails)
    cfg = small_config(shapes_data, fresh=True)
    with pytest.raises(train.TrainingError) as e:
        train.train(cfg, run, progress=False, log=lambda *a: None)
    assert str(e.value) == (
        f"{run}/x.npy: damaged; rerun this command: it continues from step 7 (a checkpoint "
        f"was saved) (rerun the command without --fresh to continue this run: with --fresh "
        f"it deletes what the run saved and starts over)")
    assert e.value.exit_code == 1
    monkeypatch.setattr(train, "Trainer", NaNInFloat16Trainer)
    with pytest.raises(train.TrainingError) as e:  # its fix is a new model: said as it was
        train.train(cfg, run, progress=False, log=lambda *a: None)
    assert str(e.value) == NaNInFloat16Trainer.said

    def the_same_command(fresh):
        return train.Trainer.same_command.fget(types.SimpleNamespace(
            cfg=small_config(shapes_data, fresh=fresh)))
    monkeypatch.undo()
    assert the_same_command(True) == "the same command without --fresh"
    assert the_same_command(False) == "the same command"
    summary = {"best_epoch": None, "finished_epochs": 0, "target_epochs": 3, "steps": 4,
               "epoch_steps": 4, "epoch_length": 9, "steps_now": 4, "epochs_now": 0,
               "seconds": 2.0, "stopped_by": "max_steps", "run": run, "best_model": "b"}
    assert "without --fresh" not in train.format_summary(summary)
    assert train.format_summary({**summary, "fresh": True}).splitlines()[1] == (
        "note: trained with --fresh: rerun the command without --fresh to continue this run: "
        "with --fresh it deletes what the run saved and starts over")


class NaNInFloat16Trainer:
    said = "the loss became NaN in float16: train with --precision float32 with --fresh"

    def __init__(self, *args, **kwargs):
        pass

    def fit(self):
        raise train.TrainingError(self.said)


def test_a_resume_inside_an_epoch_with_another_monitor_must_beat_the_best_model(
        shapes_data, tmp_path, monkeypatch):
    """Resumed inside an epoch with --monitor val_bleu4 on a val_loss run, nothing was
    measured (the restored model is not the last epoch's) and early stopping had no value to
    beat: the first epoch finished replaced best.keras, however worse. best.keras's value,
    measured at the resume, is the bar (here one no epoch beats: best.keras stays)."""
    run = str(tmp_path / "run")
    cfg = small_config(shapes_data, epochs=2, **NO_DECODING)
    trainer, _ = run_trainer(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, max_steps=2)), run)
    per_epoch = trainer.inputs.steps_per_epoch
    trainer, summary = run_trainer(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, max_steps=per_epoch + 2)), run)          # epoch 1 done, stopped in 2
    assert (summary["finished_epochs"], summary["epoch_steps"]) == (1, 2)
    assert RunFolder(run).best_record()["epoch"] == 1
    measured = []

    def best_model_measure(self, metric, instead):
        measured.append(metric)
        return {metric: 1.0}                                # a BLEU-4 no epoch beats
    monkeypatch.setattr(train.Trainer, "_best_model_measure", best_model_measure)
    lines = []
    bleu = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, monitor="val_bleu4",
                                                              bleu_images=8))
    train.open_run(run, bleu)
    summary = train.Trainer(bleu, run, progress=False, log=lines.append).fit()
    assert measured == ["val_bleu4"] and summary["epochs_now"] == 1
    assert RunFolder(run).best_record()["epoch"] == 1       # not replaced by epoch 2
    assert f"note: resumed inside epoch 2, whose model was never measured, and the epochs " \
           f"before did not log val_bleu4: {os.path.join(run, 'best.keras')} (epoch 1) " \
           f"measured now, val_bleu4=1.0000, is the value the next epochs must beat to " \
           f"replace it" in lines


def test_an_epoch_line_without_a_speed_says_its_steps_were_trained_before():
    entry = {"epoch": 3, "loss": 1.25, "val_loss": 1.5, "seconds": 2.25}
    assert train._epoch_line({**entry, "captions_per_second": 812.4}) == \
        "epoch 3: loss=1.2500 val_loss=1.5000 (812 captions/s, 2.2 s)"
    assert train._epoch_line({**entry, "captions_per_second": None}) == \
        "epoch 3: loss=1.2500 val_loss=1.5000 (its steps trained before the run stopped, 2.2 s)"
