"""Every config validates itself: bad values are refused naming the flag and the value, before
any command reads a file or writes one."""

import dataclasses
import math
import os
import re

import pytest

from caption_attn import config as C
from caption_attn.cli import main
from caption_attn.errors import UserError

BAD_VALUES = [
    (C.VocabConfig, "vocab_size", 0), (C.VocabConfig, "min_count", -1),
    (C.VocabConfig, "max_length", 0),
    (C.ModelConfig, "embedding_dim", -5), (C.ModelConfig, "units", 0),
    (C.ModelConfig, "dropout", 1.5), (C.ModelConfig, "dropout", math.nan),
    (C.ModelConfig, "attention_reg", -1.0), (C.ModelConfig, "attention_reg", math.inf),
    (C.TrainConfig, "epochs", -1), (C.TrainConfig, "epochs", 0),
    (C.TrainConfig, "batch_size", 0), (C.TrainConfig, "learning_rate", 0.0),
    (C.TrainConfig, "learning_rate", math.nan), (C.TrainConfig, "clip_norm", -1.0),
    (C.TrainConfig, "patience", -1), (C.TrainConfig, "min_delta", math.inf),
    (C.TrainConfig, "max_steps", 0), (C.TrainConfig, "memory_cache_gb", -2.0),
    (C.TrainConfig, "scst_samples", 0), (C.TrainConfig, "scst_learning_rate", 0.0),
    (C.TrainConfig, "scst_after", -1), (C.TrainConfig, "monitor", "bleu"),
    # a momentum of 1 never moves the average off the first step's weights
    (C.TrainConfig, "ema", 1.0), (C.TrainConfig, "ema", -0.5), (C.DemoConfig, "ema", 1.0),
    (C.DecodeConfig, "beam", 0), (C.DecodeConfig, "length_penalty", math.nan),
    (C.DecodeConfig, "beam", 100_000),  # (images x beam, 64, units) tensors: hundreds of GB
    (C.DecodeConfig, "temperature", 0.0), (C.DecodeConfig, "top_k", -1),
    (C.DecodeConfig, "max_length", 0), (C.DecodeConfig, "batch_size", 0),
    (C.DecodeConfig, "batch_size", 100_000),  # `caption` would hold 100,000 images
    (C.ExtractConfig, "batch_size", 0), (C.ExtractConfig, "num_shards", 0),
    (C.ExtractConfig, "batch_size", 1_000_000),  # a MemoryError traceback (250 GiB buffer)
    (C.ExtractConfig, "workers", -1), (C.ExtractConfig, "dtype", "int8"),
    (C.ExtractConfig, "cache", " "),
    (C.DataConfig, "val_fraction", 1.0), (C.DataConfig, "seed", -3),
    (C.DemoConfig, "num_images", 5), (C.DemoConfig, "num_images", 10**9),
    (C.DemoConfig, "beam", 0), (C.DemoConfig, "beam", 21),
    (C.ShapesConfig, "image_size", 32),
    # float32 overflows past these: NaN beam scores and captionless images, the sampled
    # word no longer the likeliest at a cold temperature; a TypeError/ValueError traceback
    # from the int32/int64 ops and Keras' seed
    (C.DecodeConfig, "length_penalty", 60.0), (C.DecodeConfig, "temperature", 1e-40),
    (C.DecodeConfig, "temperature", 1e300), (C.DecodeConfig, "top_k", 2**31),
    (C.DecodeConfig, "seed", 10**20), (C.DataConfig, "seed", 2**32),
    (C.DemoConfig, "seed", 2**32),
    # past float32's range a traceback after config.json, split.json and vocab.json were
    # written (1e39: "Can't convert Python sequence with a value out of range"); far below it
    # every step throws the weights about (1e38: "loss became nan")
    (C.TrainConfig, "learning_rate", 1e39), (C.TrainConfig, "learning_rate", 1e300),
    (C.TrainConfig, "learning_rate", 100.0), (C.TrainConfig, "scst_learning_rate", 1e39),
    (C.DemoConfig, "learning_rate", 1e39), (C.ModelConfig, "attention_reg", 1e39),
    (C.DemoConfig, "attention_reg", 1e300),
    # below it no float32 weight moves (1e-300 is float32's 0): exit 0, initial weights
    (C.TrainConfig, "learning_rate", 1e-300), (C.TrainConfig, "learning_rate", 1e-10),
    (C.TrainConfig, "scst_learning_rate", 1e-12), (C.DemoConfig, "learning_rate", 1e-300),
    # "can't start new thread" (a traceback) after the cache folder was made, or out of memory
    (C.ExtractConfig, "workers", 100_000),
]


@pytest.mark.parametrize("cls, name, value", BAD_VALUES,
                         ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in BAD_VALUES])
def test_bad_value_names_flag_and_value(cls, name, value):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(UserError) as e:
        cls(**{name: value})
    message = str(e.value)
    assert message.startswith(f"{flag} (`{name}`)") and repr(value) in message, message


def test_seeds_only_numpy_and_python_read_are_not_bounded():
    # a cache extracted with --seed 2**40 prints that seed in its own repair command
    C.ShapesConfig(seed=2**40)
    C.ExtractConfig(weights="random", seed=2**40)


@pytest.mark.parametrize("value", [True, "3", 2.5])
def test_wrong_types_are_refused(value):
    # a hand-edited config.json must not smuggle a string or a bool into a count
    with pytest.raises(UserError, match=r"--epochs \(`epochs`\) must be an integer"):
        C.TrainConfig(epochs=value)


def test_rules_between_fields_name_both_flags():
    with pytest.raises(UserError, match=r"--bleu-images must be >= 1, got 0"):
        C.TrainConfig(monitor="val_bleu4", bleu_images=0)
    with pytest.raises(UserError, match=r"--scst-after 5 .* below --epochs \(5\)"):
        C.TrainConfig(epochs=5, scst_after=5)
    with pytest.raises(UserError, match=r"--scst-samples must be >= 2, got 1"):
        C.TrainConfig(epochs=5, scst_after=2, scst_samples=1)
    C.TrainConfig(epochs=5, scst_after=2, scst_samples=1, scst_baseline="greedy")
    with pytest.raises(UserError, match=r"--shard-index must be in \[0, --num-shards\)"):
        C.ExtractConfig(num_shards=2, shard_index=2)
    # (the flags named, as every other refusal here does; it named only the fields)
    with pytest.raises(UserError, match=r"^--val-fraction \+ --test-fraction \(`val_fraction` "
                                        r"\+ `test_fraction`\) must be < 1"):
        C.DataConfig(val_fraction=0.5, test_fraction=0.5)


def test_learning_rate_bounds_are_taken():
    for rate in (C.MIN_LEARNING_RATE, C.MAX_LEARNING_RATE, 1e-3):
        C.TrainConfig(learning_rate=rate, scst_learning_rate=rate)
    C.ExtractConfig(workers=C.MAX_WORKERS)


def test_extract_seed_without_random_weights_is_refused():
    """`--weights imagenet --seed 7` ended with exit 0 and `seed: null` in the manifest."""
    for weights in ("imagenet", "/some/backbone.weights.h5"):
        with C.flags_given({"seed"}), \
                pytest.raises(UserError, match=rf"^--seed seeds --weights random only; with "
                                               rf"--weights {weights} it would change nothing"):
            C.ExtractConfig(weights=weights, seed=0)       # typed, even with its default
        C.ExtractConfig(weights=weights)                    # not typed: nothing to refuse
    with C.flags_given({"seed"}):
        assert C.ExtractConfig(weights="random", seed=7).seed == 7


def test_defaults_are_valid_and_monitor_follows_the_stage():
    for cls in (C.DataConfig, C.VocabConfig, C.ShapesConfig, C.ExtractConfig, C.ModelConfig,
                C.TrainConfig, C.DecodeConfig, C.DemoConfig, C.RunConfig):
        cls()
    tc = C.TrainConfig(epochs=10, scst_after=6)
    assert [tc.monitor_for(e) for e in (5, 6)] == ["val_loss", "val_cider"]
    assert C.TrainConfig(monitor="val_bleu4").monitor_for(9) == "val_bleu4"


def test_saved_config_with_a_bad_value_is_refused(tmp_path):
    path = str(tmp_path / "config.json")
    C.RunConfig().save(path)
    d = C.RunConfig.load(path).to_dict()
    d["model"]["units"] = 0
    with pytest.raises(UserError, match=r"--units \(`units`\) must be an integer >= 1"):
        C.RunConfig.from_dict(d)


@pytest.mark.parametrize("flags, named", [
    (["--units", "0"], "--units"), (["--dropout", "1.5"], "--dropout"),
    (["--batch-size", "0"], "--batch-size"), (["--learning-rate", "nan"], "--learning-rate"),
    (["--max-length", "0"], "--max-length"), (["--epochs", "-1"], "--epochs"),
    (["--clip-norm", "-1"], "--clip-norm"), (["--vocab-size", "0"], "--vocab-size"),
    (["--learning-rate", "1e39"], "--learning-rate (`learning_rate`) must be"),
    (["--learning-rate", "1e300"], "--learning-rate (`learning_rate`) must be"),
    (["--scst-after", "0", "--epochs", "2", "--scst-learning-rate", "1e300"],
     "--scst-learning-rate (`scst_learning_rate`) must be"),
    (["--attention-reg", "1e39"], "--attention-reg (`attention_reg`) must be")])
def test_train_refuses_bad_flags_before_writing_anything(tmp_path, capsys, flags, named):
    run = tmp_path / "run"
    code = main(["train", "--captions", str(tmp_path / "missing.json"), "--cache",
                 str(tmp_path / "cache"), "--run", str(run), *flags])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err
    assert not os.path.exists(run)


def test_max_length_has_an_upper_bound_a_trained_run_can_decode_with():
    # a typo (100000 for 100) must be refused, not look like a hang in sample decoding
    top = C.MAX_CAPTION_WORDS
    assert 50 <= top <= 1000  # far above any real caption (COCO's longest are ~50 words)
    C.VocabConfig(max_length=top)
    C.DecodeConfig(max_length=top + 1)  # the default decode length of a run trained at the top
    for cls, value in ((C.VocabConfig, top + 1), (C.VocabConfig, 100000),
                       (C.DecodeConfig, top + 2), (C.DecodeConfig, 10000)):
        with pytest.raises(UserError, match=rf"--max-length \(`max_length`\) must be an "
                                            rf"integer >= 1 and <= {top + (cls is C.DecodeConfig)}"
                                            rf", got {value}"):
            cls(max_length=value)


@pytest.mark.parametrize("command", ["train", "caption", "evaluate", "export"])
def test_max_length_help_gives_the_bound(capsys, command):
    assert main([command, "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    bound = C.MAX_CAPTION_WORDS + (command != "train")
    assert f"at most {bound}" in help_text, help_text


@pytest.mark.parametrize("argv", [
    ["train", "--max-length", "100000"],
    ["caption", "--max-length", "10000", "--plot-attention", "{tmp}/plots", "{tmp}/x.png"],
    ["evaluate", "--max-length", "10000", "--out", "{tmp}/plots/m.json"]])
def test_absurd_max_length_is_refused_before_anything_is_written(tmp_path, capsys, argv):
    tmp = str(tmp_path)
    common = {"train": ["--captions", f"{tmp}/c.json", "--cache", f"{tmp}/cache"]}
    argv = [a.format(tmp=tmp) for a in argv] + ["--run", f"{tmp}/run"] + \
        common.get(argv[0], [])
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "--max-length (`max_length`) must be an integer >= 1 and <= " in err
    assert os.listdir(tmp_path) == []


def test_every_field_with_a_check_is_reachable_as_a_flag():
    # flags map 1:1 onto fields: a check on a field no flag sets would never help a user
    from caption_attn.cli import build_parser
    text = " ".join(a.format_help() for a in build_parser()._subparsers._group_actions[0]
                    .choices.values())
    for cls in (C.VocabConfig, C.ModelConfig, C.TrainConfig, C.DecodeConfig, C.ExtractConfig):
        for f in dataclasses.fields(cls):
            if "check" in f.metadata:
                assert C.flag_name(f) in text, f.name


def test_every_help_section_title_is_a_whole_sentence():
    """`demo --help` titled its settings "... sized for a 2-core CPU (5-9 minutes: the": the
    first line of a docstring whose first sentence ran on to the next line."""
    from caption_attn.cli import build_parser
    titles = [g.title for sub in build_parser()._subparsers._group_actions[0].choices.values()
              for g in sub._action_groups]
    assert "The end-to-end offline demo (`demo`)" in " ".join(titles)
    for title in titles:
        assert title.count("(") == title.count(")") and not title.endswith(("the", ":")), title


@pytest.mark.parametrize("flags, refused", [
    (dict(sample=True, beam=5), "--beam 5 applies to beam search, not to --sample"),
    (dict(sample=True, length_penalty=0.6), "--length-penalty 0.6 applies to beam search"),
    (dict(top_k=3), "--top-k 3 applies to sampling: add --sample"),
    (dict(temperature=0.7, beam=1), "--temperature 0.7 applies to sampling"),
    (dict(seed=4), "--seed 4 applies to sampling"),
    (dict(beam=1, length_penalty=0.6), "does nothing with --beam 1"),
    # --xla compiled every batch and dropped --xla-min-images 0 ("never") without a word
    (dict(xla=True, xla_min_images=0), "--xla-min-images 0 chooses the batches XLA compiles, "
                                       "but --xla compiles every batch: leave one of them out"),
])
def test_flags_of_another_decoding_method_are_refused_not_ignored(flags, refused):
    with pytest.raises(UserError, match=re.escape(refused)):
        C.DecodeConfig(**flags)


def test_flags_of_one_decoding_method_together_are_fine():
    C.DecodeConfig(sample=True, temperature=0.7, top_k=3, seed=4)
    C.DecodeConfig(beam=5, length_penalty=0.6)


@pytest.mark.parametrize("argv, refused", [
    (["--sample", "--beam", "3"], "--beam 3 applies to beam search, not to --sample"),
    (["--temperature", "1.0"], "--temperature 1.0 applies to sampling"),
    (["--sample", "--length-penalty", "0"], "--length-penalty 0.0 applies to beam search"),
    (["--beam", "1", "--length-penalty", "0"], "does nothing with --beam 1"),
    (["--xla", "--xla-min-images", "32"], "--xla-min-images 32 chooses the batches XLA"),
])
def test_a_flag_typed_with_its_default_value_is_still_refused(tmp_path, capsys, argv, refused):
    """The CLI knows which flags were given: `--sample --beam 3` (3 is the default) was
    accepted and the --beam silently ignored, where `--sample --beam 5` was refused."""
    from caption_attn.cli import main
    assert main(["caption", "--run", str(tmp_path / "run"), *argv, "x.png"]) == 2
    assert refused in capsys.readouterr().err


@pytest.mark.parametrize("command, argv, cls", [
    ("caption", ["--run", "r", "x.png"], C.DecodeConfig),
    ("evaluate", ["--run", "r"], C.DecodeConfig),
    ("export", ["--run", "r", "--out", "e"], C.DecodeConfig),   # the SavedModel's beam search
    ("demo", [], C.DemoConfig),
])
def test_every_beam_flag_has_an_upper_bound(command, argv, cls):
    """--beam 100000 was taken: (images x beam, 64, units) tensors, hundreds of GB, died of
    memory (or crawled) without saying why. Each command's --beam is refused above MAX_BEAM
    when its flags are read, before any file or model is touched, saying why."""
    from caption_attn.cli import build_parser, config_from_args
    parser = build_parser()
    for beam in (1, C.MAX_BEAM):
        config_from_args(cls, parser.parse_args([command, *argv, "--beam", str(beam)]))
    with pytest.raises(UserError, match=rf"^--beam \(`beam`\) must be an integer >= 1 and <= "
                                        rf"{C.MAX_BEAM} \(each beam costs .*, got 100000$"):
        config_from_args(cls, parser.parse_args([command, *argv, "--beam", "100000"]))


def test_export_check_images_typed_with_its_default_is_refused_without_quantization(
        tmp_path, capsys):
    from caption_attn.cli import main
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "e"),
                 "--check-images", "100"]) == 2
    assert "--check-images 100 compares a quantized TFLite" in capsys.readouterr().err


def test_check_images_without_a_quantized_tflite_model_is_refused():
    with pytest.raises(UserError, match="--check-images 5 compares a quantized TFLite"):
        C.ExportConfig(tflite=True, check_images=5)
    C.ExportConfig(tflite=True, tflite_quantize="dynamic", check_images=5)
