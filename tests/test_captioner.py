import errno
import json
import math
import os
import re
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_attn import captioner, cli, decode, feature_cache
from caption_attn.cli import main
from caption_attn.backbone import FEATURE_SHAPE, IMAGENET_FILE
from caption_attn.config import DecodeConfig
from caption_attn.errors import OutOfMemory, UserError

LINE = re.compile(r"^ (\d+)\) (.*) \(p=([0-9.e+-]+)\)$")


def _test_images(shapes_data, trained_run, n=3):
    with open(os.path.join(trained_run, "split.json")) as f:
        keys = json.load(f)["splits"]["test"][:n]
    return [os.path.join(shapes_data["images"], k) for k in keys]


@pytest.mark.parametrize("where", ["backbone", "decoder"])
def test_out_of_memory_while_captioning_is_one_line_after_the_captions_made(
        shapes_data, trained_run, capsys, monkeypatch, tmp_path, where):
    """`caption --batch-size 1024` on a GPU: TensorFlow's ResourceExhaustedError, from the
    backbone or the decoder, ended the command in a traceback. The files that failed before
    it are still listed (with stdout not a terminal they are listed after the bar)."""
    from caption_attn import captioner
    from caption_attn.backbone import Backbone
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    images = [str(bad), *_test_images(shapes_data, trained_run, 2)]
    target = (Backbone, "__call__") if where == "backbone" else (captioner.Captioner, "decode")
    real, calls = getattr(*target), []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise tf.errors.ResourceExhaustedError(
                None, None, "Graph execution error:\n\nOOM when allocating tensor with "
                            "shape[1,64,512]")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(*target, failing)
    assert main(["caption", "--run", trained_run, "--batch-size", "1", *images]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == (
        "caption-attn caption: error: out of memory captioning a batch of 1 image "
        "(--batch-size 1; OOM when allocating tensor with shape[1,64,512]); rerun with a "
        "lower --batch-size"), captured.err
    assert "Traceback" not in captured.err
    assert f"Captions for image {os.path.basename(images[1])}:" in captured.out   # kept
    assert any(str(bad) in line for line in captured.err.splitlines()[:-1]), captured.err


def test_out_of_memory_while_evaluate_decodes_is_one_line(trained_run, monkeypatch):
    """`evaluate` decodes the split's feature batches (`decode_batches`): the same error."""
    from caption_attn import captioner
    from caption_attn.config import DecodeConfig
    from caption_attn.errors import UserError
    decoder = captioner.Captioner.from_run(trained_run, DecodeConfig(beam=1, batch_size=2))

    def decode(self, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")
    monkeypatch.setattr(captioner.Captioner, "decode", decode)
    with pytest.raises(UserError) as e:
        decoder.decode_batches([np.zeros((2, 64, 2048), np.float32)])
    assert e.value.exit_code == 1 and str(e.value) == (
        "out of memory captioning a batch of 2 images (--batch-size 2; OOM when allocating "
        "tensor); rerun with a lower --batch-size")
    # the demo says it again in its own flags (`demo.out_of_memory_advice`)
    assert isinstance(e.value, OutOfMemory) and e.value.what == "OOM when allocating tensor"


def test_caption_output_format(shapes_data, trained_run, capsys):
    images = _test_images(shapes_data, trained_run, 2)
    assert main(["caption", "--run", trained_run, "--beam", "3", *images]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Captions for image {os.path.basename(images[0])}:"
    block = lines[1:lines.index(f"Captions for image {os.path.basename(images[1])}:")]
    assert 1 <= len(block) <= 3
    probs = []
    for i, line in enumerate(block):
        match = LINE.match(line)
        assert match, line
        assert int(match.group(1)) == i and match.group(2).endswith(".")
        probs.append(float(match.group(3)))
    assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)


def test_bad_image_gets_a_message_and_the_others_are_captioned(shapes_data, trained_run,
                                                               tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not an image")
    good = _test_images(shapes_data, trained_run, 1)[0]
    assert main(["caption", "--run", trained_run, str(bad), good, "--beam", "1"]) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "cannot read" in captured.err
    assert f"Captions for image {os.path.basename(good)}:" in captured.out
    assert "broken.jpg" not in captured.out
    assert main(["caption", "--run", trained_run, str(bad)]) == 1


def test_a_path_that_does_not_exist_is_refused_before_the_model_loads(trained_run, tmp_path,
                                                                     capsys, monkeypatch):
    from caption_attn import captioner
    monkeypatch.setattr(captioner.Captioner, "from_run", None)   # must not be reached
    typo = str(tmp_path / "cat.jgp")
    assert main(["caption", "--run", trained_run, typo]) == 2
    assert f"{typo}: no such image file or folder" in capsys.readouterr().err


def test_a_symlink_loop_or_broken_link_given_by_name_is_said_so(trained_run, tmp_path,
                                                                 capsys, monkeypatch):
    """They were "no such image file or folder", as a typo; inside a folder the same files are
    reported precisely ("unreadable (Too many levels of symbolic links)", "missing")."""
    monkeypatch.setattr(captioner.Captioner, "from_run", None)   # must not be reached
    monkeypatch.chdir(tmp_path)
    os.symlink("l2.jpg", "l1.jpg")
    os.symlink("l1.jpg", "l2.jpg")
    os.symlink("gone/cat.jpg", "dangling.jpg")
    assert main(["caption", "--run", trained_run, "l1.jpg"]) == 2
    err = capsys.readouterr().err
    assert "l1.jpg: a symlink loop (Too many levels of symbolic links)" in err, err
    assert "no such image" not in err
    assert main(["caption", "--run", trained_run, "dangling.jpg"]) == 2
    err = capsys.readouterr().err
    assert "dangling.jpg: a broken symlink to gone/cat.jpg, which does not exist" in err, err


def test_a_dash_for_standard_input_is_said_to_be_unsupported(trained_run, tmp_path, capsys,
                                                             monkeypatch):
    """`cat photo.jpg | caption-attn caption --run RUN -` was refused as a typo ("-: no such
    image file or folder"), which does not tell the user that standard input is not read.
    Now it says so and how to give the image; a file that is really named "-" is an image
    argument like any other."""
    monkeypatch.setattr(captioner.Captioner, "from_run", None)   # must not be reached
    monkeypatch.chdir(tmp_path)
    assert main(["caption", "--run", trained_run, "-"]) == 2
    err = capsys.readouterr().err
    assert "error: -: standard input is not read: give image files or folders (save a " \
           "piped image to a file first, e.g. `... > photo.jpg`)\n" in err, err
    assert "no such image" not in err
    # a parser error beside it (no --run) told to write ./- or put -- before it, as a file
    assert main(["caption", "-"]) == 2
    err = capsys.readouterr().err
    assert "required: --run" in err and "put --" not in err and "./-" not in err, err
    (tmp_path / "-").write_bytes(b"not an image")
    assert captioner.expand_image_args(["-"]) == ["-"]


def test_an_empty_image_argument_is_said_to_be_empty(trained_run, capsys, monkeypatch):
    monkeypatch.setattr(captioner.Captioner, "from_run", None)   # must not be reached
    assert main(["caption", "--run", trained_run, ""]) == 2
    err = capsys.readouterr().err
    assert "IMAGE_OR_DIR must name a file or folder, got an empty string" in err, err


@pytest.mark.parametrize("images", [["-dash.png"], ["a.png", "-dash.png"]])
def test_an_image_named_with_a_leading_dash_gets_a_hint_to_use_double_dash(trained_run,
                                                                           capsys, images):
    assert main(["caption", "--run", trained_run, *images]) == 2
    err = capsys.readouterr().err
    assert "a.png" in images or "required: IMAGE_OR_DIR" in err
    assert "taken for a flag: put -- before the images (caption --run DIR -- " in err, err
    assert "a.png" not in images or "-- -dash.png) or write ./-dash.png" in err, err


def test_caption_without_images_gets_no_hint_about_dashes(trained_run, capsys):
    """No image given at all: the hint about names starting with - would mislead."""
    assert main(["caption", "--run", trained_run, "--beam", "2"]) == 2
    err = capsys.readouterr().err
    assert "required: IMAGE_OR_DIR" in err and "taken for a flag" not in err, err


def test_caption_names_the_best_epoch_it_used(shapes_data, trained_run, capsys):
    """caption never said which epoch's best model made its captions (evaluate and export
    record it): a note on stderr, and "best" in --json."""
    images = _test_images(shapes_data, trained_run, 1)
    with open(os.path.join(trained_run, "best.json")) as f:
        best = json.load(f)
    note = (f"note: best model of epoch {best['epoch']} "
            f"({os.path.join(trained_run, 'best.keras')})")
    assert main(["caption", "--run", trained_run, "--beam", "1", *images]) == 0
    assert note in capsys.readouterr().err.splitlines()
    assert main(["caption", "--run", trained_run, "--beam", "1", "--json", *images]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["best"] == best and note in captured.err.splitlines()
    # the keys the README names: best.json's record with both files' digests
    assert sorted(best) == ["epoch", "model_sha256", "monitor", "value", "weights_sha256"]


def test_caption_json_has_attention_maps(shapes_data, trained_run, capsys):
    images = _test_images(shapes_data, trained_run, 4)
    assert main(["caption", "--run", trained_run, "--json", "--beam", "2", *images]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [e["image"] for e in out["images"]] == images and out["errors"] == []
    ended = 0
    for entry in out["images"]:
        best = entry["captions"][0]
        assert best["caption"] == " ".join(best["words"])
        # one map per word, then one for <end> if the caption ended (the small test model
        # sometimes runs to --max-length instead)
        words = [a["word"] for a in best["attention"]]
        assert words in (best["words"], best["words"] + ["<end>"])
        ended += words[-1] == "<end>"
        att = np.array(best["attention"][0]["map"])
        assert att.shape == (8, 8) and abs(att.sum() - 1.0) < 1e-3
        assert best["p"] == pytest.approx(np.exp(best["log_prob"]))
    assert ended >= 1


def _strings(obj):
    """Every string in a parsed JSON value, keys too."""
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in [k, *_strings(v)]]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return [obj] if isinstance(obj, str) else []


def test_caption_json_names_a_file_whose_name_is_not_utf8_in_valid_unicode_and_its_bytes(
        shapes_data, trained_run, tmp_path, capsys):
    # b"caf\xe9.png" (a Latin-1 name) came out as "caf\udce9.png", a lone surrogate that
    # strict JSON / UTF-8 readers (Rust's serde_json, Go's decoder) refuse or mangle
    image = _test_images(shapes_data, trained_run, 1)[0]
    latin = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"caf\xe9.png"))
    utf8 = str(tmp_path / "caf\u00e9.png")
    broken = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"\xff.jpg"))
    for path in (latin, utf8):
        shutil.copy(image, path)
    with open(broken, "wb") as f:
        f.write(b"not pixels")
    assert main(["caption", "--run", trained_run, "--beam", "1", "--json", latin, utf8,
                 broken]) == 0
    out = json.loads(capsys.readouterr().out)
    for text in _strings(out):
        text.encode("utf-8")                                # strict: no lone surrogates
    # as every other output of caption names it (\xNN), with its exact bytes beside
    assert out["images"][0]["image"] == f"{tmp_path}/caf\\xe9.png"
    assert out["images"][0]["image_hex"] == os.fsencode(latin).hex()
    assert out["images"][1]["image"] == utf8 and "image_hex" not in out["images"][1]
    [error] = out["errors"]
    assert error["image"] == f"{tmp_path}/\\xff.jpg"
    assert bytes.fromhex(error["image_hex"]) == os.fsencode(broken)


def test_captions_cut_at_max_length_keep_json_and_text_consistent(shapes_data, trained_run,
                                                                   capsys):
    image = _test_images(shapes_data, trained_run, 1)[0]
    args = ["caption", "--run", trained_run, "--beam", "2", "--max-length", "2", image]
    assert main(args + ["--json"]) == 0
    for c in json.loads(capsys.readouterr().out)["images"][0]["captions"]:
        ended = len(c["attention"]) == len(c["words"]) + 1
        assert [a["word"] for a in c["attention"]] == c["words"] + ["<end>"] * ended
        assert len(c["words"]) <= 2
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines and all(re.search(r" (\.|\.\.\.) \(p=", line) for line in lines)
    assert any("... (p=" in line for line in lines)     # 2 steps: no shapes caption ends


def test_caption_json_says_whether_a_caption_was_cut_and_rounds_the_maps():
    # The text marks a caption cut at --max-length with "...", the JSON said nothing (only
    # the missing <end> attention row told); its maps printed float32 noise (7.0000002e-05).
    attention = np.full((2, 64), 7e-05, np.float32)
    cut = captioner.Caption(["a", "red"], np.log(0.5), attention, ended=False)
    done = captioner.Caption(["a"], np.log(0.5), attention, ended=True)
    out = captioner.captions_json({"x.png": (None, [cut, done])}, {})["images"][0]["captions"]
    assert [c["ended"] for c in out] == [False, True]
    assert out[0]["attention"][0]["map"][0][0] == 7e-05
    assert json.dumps(out[0]["attention"][0]["map"][0][:1]) == "[7e-05]"


def test_format_captions_marks_a_cut_caption():
    cut = captioner.Caption(["a", "red"], np.log(0.5), np.zeros((2, 64)), ended=False)
    assert captioner.format_captions("x.png", [cut]).splitlines()[1] == " 0) a red ... (p=0.500000)"
    assert cut.steps == ["a", "red"]


def test_plot_attention_writes_pngs(shapes_data, trained_run, tmp_path, capsys):
    images = _test_images(shapes_data, trained_run, 2)
    out = tmp_path / "heat"
    assert main(["caption", "--run", trained_run, "--plot-attention", str(out), *images]) == 0
    written = sorted(os.listdir(out))
    assert written == sorted(os.path.splitext(os.path.basename(p))[0] + ".png" for p in images)
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in written)


def _held(path):
    """The lock file `path` flock'ed (exclusive) by this test as another process would."""
    import fcntl
    f = open(path, "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def test_a_second_caption_into_one_heatmap_folder_is_refused(shapes_data, trained_run,
                                                             tmp_path, capsys, monkeypatch):
    """Two `caption --plot-attention DIR` at once each removed and drew heatmaps there,
    leaving a mix of both runs': the second is refused before the model loads."""
    images = _test_images(shapes_data, trained_run, 2)
    out = tmp_path / "heat"
    out.mkdir()
    monkeypatch.setattr(captioner.Captioner, "from_run", None)   # must not be reached
    with _held(out / ".caption-attn.lock"):
        assert main(["caption", "--run", trained_run, "--plot-attention", str(out),
                     *images]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert re.match(rf"caption-attn caption: error: --plot-attention {re.escape(str(out))}: "
                    rf"another `caption-attn caption` \(pid {os.getpid()}: .*\) is drawing "
                    rf"its heatmaps there now; the two would leave a mix of both runs' "
                    rf"heatmaps: wait for it to end, or give another --plot-attention "
                    rf"folder$", captured.err), captured.err
    assert os.listdir(out) == [".caption-attn.lock"]


def test_a_caption_refused_after_the_heatmap_lock_leaves_no_folder(shapes_data, trained_run,
                                                                   tmp_path, capsys):
    """The heatmap folder is made to hold its lock; a caption refused later (a folder that
    is no run) leaves none behind."""
    images = _test_images(shapes_data, trained_run, 1)
    (tmp_path / "norun").mkdir()
    heat = tmp_path / "new" / "heat"
    assert main(["caption", "--run", str(tmp_path / "norun"), "--plot-attention", str(heat),
                 *images]) == 2
    assert "not a training run" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_caption_while_train_fresh_deletes_the_run_is_refused(shapes_data, run_copy, capsys):
    images = _test_images(shapes_data, run_copy.path, 1)
    with _held(os.path.join(run_copy.path, ".reading.lock")):
        assert main(["caption", "--run", run_copy.path, *images]) == 2
    err = capsys.readouterr().err
    assert re.match(rf"caption-attn caption: error: --run {re.escape(run_copy.path)}: "
                    rf"`caption-attn train --fresh` \(pid {os.getpid()}: .*\) is deleting "
                    rf"this run's files now; wait for it to end \(or stop it\), then caption "
                    rf"again$", err), err


def test_folder_argument_captions_every_image(shapes_data, trained_run, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in _test_images(shapes_data, trained_run, 2):
        (folder / os.path.basename(path)).write_bytes(open(path, "rb").read())
    assert main(["caption", "--run", trained_run, "--beam", "1", str(folder)]) == 0
    assert capsys.readouterr().out.count("Captions for image") == 2


def test_batch_equals_one_by_one(shapes_data, trained_run):
    model = captioner.Captioner.from_run(trained_run, DecodeConfig(beam=3))
    with open(os.path.join(trained_run, "split.json")) as f:
        keys = json.load(f)["splits"]["val"][:5]
    feats = np.stack([np.load(feature_cache.feature_path(shapes_data["cache"], k)) for k in keys])
    together = model.decode(feats.astype(np.float32))
    for i in range(len(keys)):
        alone = model.decode(feats[i:i + 1].astype(np.float32))[0]
        assert [c.words for c in alone] == [c.words for c in together[i]]
        np.testing.assert_allclose([c.log_prob for c in alone],
                                   [c.log_prob for c in together[i]], atol=1e-4)


def test_sampled_captions_do_not_depend_on_the_batch_size(shapes_data, trained_run):
    # An image's sample came from its row in the batch: `caption --sample --seed S` gave
    # another caption with --batch-size 1, and `evaluate --sample` other metrics.
    with open(os.path.join(trained_run, "split.json")) as f:
        keys = json.load(f)["splits"]["val"][:4]
    feats = np.stack([np.load(feature_cache.feature_path(shapes_data["cache"], k))
                      for k in keys]).astype(np.float32)
    words = lambda caps: [c[0].words for c in caps]
    for batch_size in (1, 3):
        model = captioner.Captioner.from_run(
            trained_run, DecodeConfig(sample=True, seed=4, batch_size=batch_size))
        batched = model.decode_batches(feats[i:i + batch_size] for i in range(0, 4, batch_size))
        if batch_size == 1:
            first = batched
        assert words(batched) == words(first)
        assert words(model.decode(feats[2:3], [2])) == words(first[2:3])
    # one path given twice (the library does not deduplicate) is one image with one stream
    model._backbone = lambda pixels: np.zeros((len(pixels), *FEATURE_SHAPE), np.float32)
    path = _test_images(shapes_data, trained_run, 1)[0]
    assert list(model.caption_images([path, path])[0]) == [path]


def test_beam_one_equals_greedy(shapes_data, trained_run):
    with open(os.path.join(trained_run, "split.json")) as f:
        keys = json.load(f)["splits"]["val"][:4]
    feats = np.stack([np.load(feature_cache.feature_path(shapes_data["cache"], k))
                      for k in keys]).astype(np.float32)
    greedy = captioner.Captioner.from_run(trained_run, DecodeConfig(beam=1)).decode(feats)
    beam = captioner.Captioner.from_run(trained_run, DecodeConfig(beam=3)).decode(feats)
    assert all(len(g) == 1 for g in greedy)
    # greedy's caption is one of the beam's and never more likely than the beam's best
    for g, b in zip(greedy, beam):
        assert g[0].log_prob <= b[0].log_prob + 1e-5


@pytest.mark.parametrize("beam", [1, 3])
def test_xla_decoding_gives_the_same_captions(shapes_data, trained_run, beam, monkeypatch):
    """... and beam search asks for its candidates by chunks of ids on a CPU, compiled or
    not, and not on a GPU (`decode._best_continuations`; this run's vocabulary is too small
    for them to be used: tests/test_decode.py checks them on 5001 words)."""
    with open(os.path.join(trained_run, "split.json")) as f:
        keys = json.load(f)["splits"]["val"][:6]
    feats = np.stack([np.load(feature_cache.feature_path(shapes_data["cache"], k))
                      for k in keys]).astype(np.float32)
    asked = []
    best_continuations = decode._best_continuations
    monkeypatch.setattr(decode, "_best_continuations", lambda *args: asked.append(args[-1])
                        or best_continuations(*args))
    plain = captioner.Captioner.from_run(trained_run, DecodeConfig(beam=beam)).decode(feats)
    xla = captioner.Captioner.from_run(trained_run,
                                       DecodeConfig(beam=beam, xla=True)).decode(feats)
    auto = captioner.Captioner.from_run(trained_run, DecodeConfig(beam=beam, xla_min_images=4))
    automatic = auto.decode(feats) + auto.decode(feats[:2])
    # traced for the plain loop, --xla, a compiled batch and a plain one; greedy has no top_k
    on_cpu = not tf.config.list_logical_devices("GPU")
    assert asked == [] if beam == 1 else (set(asked) == {on_cpu} and len(asked) >= 4)
    # the default path: batches of >= xla_min_images images compiled, smaller ones plain
    assert auto._decoder.compiled.experimental_get_tracing_count() == 1
    assert auto._decoder.plain.experimental_get_tracing_count() == 1
    for other in (xla, automatic[:6], automatic[6:]):
        for p, x in zip(plain, other):
            assert [c.words for c in p] == [c.words for c in x]
            np.testing.assert_allclose([c.log_prob for c in p], [c.log_prob for c in x],
                                       atol=1e-4)
            np.testing.assert_allclose(p[0].attention, x[0].attention, atol=1e-4)


@pytest.mark.parametrize("beam", [1, 3])
def test_xla_decoding_of_one_token(beam):
    """--max-length 1 on a batch that is compiled: TensorFlow 2.21 aborted the whole process
    (a failed shape check) when the XLA loop could not run a single step."""
    from caption_attn.model import ShowAttendTell
    keras.utils.set_random_seed(0)
    model = ShowAttendTell(12, 8, 16)
    feats = tf.random.uniform([2, *FEATURE_SHAPE])
    decoder = captioner.make_decoder(model, DecodeConfig(beam=beam, xla_min_images=2), 1)
    compiled, plain = decoder(feats), decoder.plain(feats)
    assert decoder.compiled.experimental_get_tracing_count() == 1
    assert compiled.tokens.shape == (2, beam, 1)
    np.testing.assert_array_equal(compiled.tokens, plain.tokens)
    np.testing.assert_allclose(compiled.log_probs, plain.log_probs, atol=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
def test_a_large_compiled_batch_is_decoded_in_slices_side_by_side(monkeypatch, beam):
    """XLA's compiled CPU loop keeps about one core busy: a batch of at least 16 images per
    core is decoded as that many slices, whose loops run side by side, with the captions of
    the whole batch in one loop (an odd batch too: one compiled shape for its slices).
    Smaller batches stay whole."""
    from caption_attn.model import ShowAttendTell
    keras.utils.set_random_seed(0)
    model = ShowAttendTell(12, 8, 16)
    monkeypatch.setattr(captioner, "decoding_slices", lambda: 2)   # any machine: 2 cores
    feats = tf.random.uniform([35, *FEATURE_SHAPE], seed=2)
    decoder = captioner.make_decoder(model, DecodeConfig(beam=beam, xla_min_images=2), 6,
                                     fixed_weights=True)
    got, small = decoder(feats), decoder(feats[:31])
    assert sorted(decoder.slices) == [2]                 # 35 images: 2 slices; 31: whole
    assert decoder.slices[2].experimental_get_tracing_count() == 1
    assert decoder.compiled.experimental_get_tracing_count() == 1
    whole = decoder.compiled(feats, model.gate_table())  # the batch in one loop
    np.testing.assert_array_equal(got.tokens, whole.tokens)
    np.testing.assert_array_equal(got.lengths, whole.lengths)
    np.testing.assert_allclose(got.log_probs, whole.log_probs, atol=1e-5)
    np.testing.assert_allclose(got.token_log_probs, whole.token_log_probs, atol=1e-5)
    np.testing.assert_allclose(got.attention, whole.attention, atol=1e-5)
    np.testing.assert_array_equal(small.tokens, whole.tokens[:31, :, :small.tokens.shape[2]])


def test_a_cache_whose_backbone_the_capped_onednn_would_abort_in_is_refused(
        trained_run, copy_cache, onednn_capped_below):
    """`caption` of image files builds the cache's backbone: one extracted in bfloat16 (the
    demo's cache on a CPU with native bfloat16), under ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512
    CPU, died in its first convolution with TensorFlow's traceback (stop 74). Refused, naming
    the cache's manifest, before the backbone is built."""
    from caption_attn.run import RunFolder
    path = feature_cache.manifest_path(copy_cache)
    with open(path) as f:
        manifest = json.load(f)
    with open(path, "w") as f:
        json.dump({**manifest, "precision": "bfloat16"}, f)
    run = RunFolder(trained_run)
    onednn_capped_below("bfloat16")
    model = captioner.Captioner(run.load_best_model(), run.load_vocab(), run.load_config(),
                                DecodeConfig(), cache=copy_cache)
    with pytest.raises(UserError, match=rf"^{re.escape(path)}: the cache's backbone computes "
                                        rf"in bfloat16: oneDNN capped at AVX2 .* use a cache "
                                        rf"extracted with --precision float32$"):
        model.backbone


def test_decoding_compiles_nothing_for_one_image_or_inside_a_graph():
    """A one-image `caption`, sampling, a bfloat16 model and a caller's tf.function (export)
    take the plain loop: compiling would cost seconds there, and change the samples or, in
    bfloat16, the rounding."""
    from caption_attn.model import ShowAttendTell
    model = ShowAttendTell(12, 8, 16)
    decoder = captioner.make_decoder(model, DecodeConfig(beam=1), 5)
    decoder(tf.zeros([1, *FEATURE_SHAPE]))
    assert decoder.plain.experimental_get_tracing_count() == 1
    assert decoder.compiled.experimental_get_tracing_count() == 0
    inside = tf.function(lambda f: decoder(f).tokens)
    inside.get_concrete_function(tf.TensorSpec([None, *FEATURE_SHAPE], tf.float32))
    assert decoder.compiled.experimental_get_tracing_count() == 0
    sampler = captioner.make_decoder(model, DecodeConfig(sample=True), 5)
    assert not hasattr(sampler, "compiled")
    mixed = ShowAttendTell(12, 8, 16, dtype="mixed_bfloat16")    # XLA would round otherwise
    assert not hasattr(captioner.make_decoder(mixed, DecodeConfig(beam=3), 5), "compiled")


def test_a_vocabulary_large_enough_for_chunks_decodes_as_without_them(monkeypatch):
    """A model of 800 words (12 chunks of 64 ids, enough for beam 3): the `Captioner`'s
    decoder (a compiled batch with the gate table and the masked special tokens, and the
    plain loop of one image) gives the same beams to the bit with its candidates chosen
    through chunks as with a top_k over whole rows."""
    from caption_attn.model import ShowAttendTell
    keras.utils.set_random_seed(0)
    model = ShowAttendTell(800, 8, 16)
    feats = tf.random.uniform([3, *FEATURE_SHAPE], seed=3)
    best_continuations, asked = decode._best_continuations, []

    def decoded(chunks):   # records (chunks asked for, V as traced, k)
        monkeypatch.setattr(decode, "_best_continuations", lambda *args: asked.append(
            (args[-1], args[0].shape[1], args[3])) or best_continuations(
                *args[:-1], chunks and args[-1]))
        run = captioner.make_decoder(model, DecodeConfig(beam=3, xla_min_images=2), 6,
                                     fixed_weights=True)
        return [tf.nest.map_structure(np.asarray, run(x)) for x in (feats, feats[:1])]
    with_chunks, without = decoded(True), decoded(False)
    # a static V of enough chunks for k 3: the chunks were really used on a CPU
    assert set(asked) == {(not tf.config.list_logical_devices("GPU"), 800, 3)}
    assert 800 // decode.TOP_K_CHUNK >= 4 * 3
    for got, want in zip(with_chunks, without):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert len({tuple(t) for t in with_chunks[0].tokens[:, 0]}) > 1   # the images differ


@pytest.mark.parametrize("beam", [1, 3])
def test_fixed_weights_look_the_gates_up_in_a_table_built_once(beam):
    """The `Captioner`'s decoder (`fixed_weights`) builds the model's gate table at its first
    compiled batch, once, reads it, and gives the captions of the decoder without it; a
    one-image batch (plain loop) does not build it, a decoder of weights that change
    (training's validator: no `fixed_weights`) never does, and should the weights it comes
    from change after all, it is built again rather than read stale.
    Every compiled batch has 3 images: the table does not depend on the batch size, and each
    other size would be one more XLA compile of each decoder (~2.5 s of CPU each)."""
    from caption_attn.model import ShowAttendTell
    keras.utils.set_random_seed(0)
    model = ShowAttendTell(12, 8, 16)
    built, shift = [], [0.0]
    model.gate_table = lambda: built.append(1) or ShowAttendTell.gate_table(model) + shift[0]
    feats = tf.random.uniform([3, *FEATURE_SHAPE], seed=1)
    others = tf.random.uniform([3, *FEATURE_SHAPE], seed=2)   # a second batch
    cfg = DecodeConfig(beam=beam, xla_min_images=2)
    fixed = captioner.make_decoder(model, cfg, 6, fixed_weights=True)
    fixed(feats[:1])
    assert built == []                                   # one image: plain, no table
    got = [fixed(feats), fixed(others)]
    assert built == [1]                                  # built once, for both batches
    assert fixed.compiled.experimental_get_tracing_count() == 1
    changing = captioner.make_decoder(model, cfg, 6)
    want = [changing(feats), changing(others)]
    assert built == [1]

    def assert_same(g, w):
        np.testing.assert_array_equal(g.tokens, w.tokens)
        np.testing.assert_allclose(g.log_probs, w.log_probs, atol=1e-5)
        np.testing.assert_allclose(g.attention, w.attention, atol=1e-5)
    for g, w in zip(got, want):
        assert_same(g, w)
    # weights changed after all: built again; the compiled loop reads the table: another
    # table, other log-probabilities
    shift[0] = 0.5
    model.gru_embed.bias.assign(model.gru_embed.bias + 0.5)
    shifted = fixed(feats)
    assert built == [1, 1]
    assert not np.allclose(shifted.log_probs, changing(feats).log_probs, atol=1e-3)
    shift[0] = 0.0
    # and changed once more: built again, the new weights' captions
    model.gru_embed.bias.assign(model.gru_embed.bias + 0.5)
    assert_same(fixed(feats), changing(feats))
    assert built == [1, 1, 1]


def test_banned_tokens_are_masked_and_the_per_image_context_mark_is_kept():
    """`masked_step` of the model's `decode_step_per_image` keeps it taking the context once
    per image (beam search would otherwise tile it), and bans <pad> and <start>."""
    from caption_attn import decode
    from caption_attn.model import ShowAttendTell
    from caption_attn.vocab import PAD, START
    model = ShowAttendTell(12, 8, 16)
    step = captioner.masked_step(model.decode_step_per_image)
    assert decode.takes_per_image_context(step)
    assert not decode.takes_per_image_context(captioner.masked_step(model.decode_step))
    state, context = model.init_decoder(tf.random.uniform([2, *FEATURE_SHAPE]))
    state = tf.nest.map_structure(lambda x: tf.repeat(x, 3, axis=0), state)  # K = 3
    logits, _, attention = step(tf.fill([6], START), state, context)
    assert logits.shape == (6, 12) and attention.shape == (6, FEATURE_SHAPE[0])
    assert np.all(np.isneginf(logits.numpy()[:, [PAD, START]]))
    assert np.all(np.isfinite(np.delete(logits.numpy(), [PAD, START], axis=1)))


def test_images_give_the_cached_features_captions(shapes_data, trained_run):
    """caption rebuilds the cache's backbone: images and cached features decode the same."""
    model = captioner.Captioner.from_run(trained_run, DecodeConfig(beam=1))
    images = _test_images(shapes_data, trained_run, 2)
    results, errors = model.caption_images(images)
    assert not errors
    keys = [os.path.basename(p) for p in images]
    feats = np.stack([np.load(feature_cache.feature_path(shapes_data["cache"], k))
                      for k in keys]).astype(np.float32)
    for path, cached in zip(images, model.decode(feats)):
        assert results[path][1][0].words == cached[0].words


def test_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a training run"):
        captioner.Captioner.from_run(str(tmp_path))
    assert main(["caption", "--run", str(tmp_path), "x.png"]) == 2


def test_format_captions_layout():
    caps = [captioner.Caption(["a", "red", "circle"], np.log(0.000306), np.zeros((4, 64))),
            captioner.Caption([], np.log(1e-9), np.zeros((1, 64)))]
    text = captioner.format_captions("/x/trading_floor.jpg", caps)
    assert text.splitlines() == ["Captions for image trading_floor.jpg:",
                                 " 0) a red circle . (p=0.000306)",
                                 " 1) . (p=1.00e-09)"]


@pytest.mark.parametrize("kind", ["missing", "file", "empty folder"])
def test_a_bad_cache_flag_is_named_as_the_flag(shapes_data, trained_run, tmp_path, capsys,
                                               kind):
    """`caption --cache X` names --cache and what X is, not "the run's feature cache is
    gone" (the run's own cache is fine; X was the user's)."""
    cache = tmp_path / "cache"
    if kind == "file":
        cache.write_text("not a cache")
    elif kind == "empty folder":
        cache.mkdir()
    image = _test_images(shapes_data, trained_run, 1)[0]
    assert main(["caption", "--run", trained_run, "--cache", str(cache), image]) == 2
    err = capsys.readouterr().err
    why = {"missing": "does not exist", "file": "is a file, not a folder",
           "empty folder": "has no manifest.json"}[kind]
    assert f"--cache {cache}: {why}" in err and "is gone" not in err


@pytest.mark.parametrize("kind", ["missing", "other backbone"])
@pytest.mark.parametrize("command", ["caption", "caption of unreadable images", "evaluate",
                                     "export"])
def test_a_bad_cache_flag_is_refused_before_the_model_loads(shapes_data, trained_run,
                                                            tmp_path, capsys, monkeypatch,
                                                            command, kind):
    """A bad --cache was reported only after best.keras was loaded (`caption`: after the
    first batch of images was decoded too; with no readable image, never: exit 1, "cannot
    read"), the identity check of `export` only when its backbone was built."""
    from caption_attn.run import RunFolder
    cache = tmp_path / "cache"
    if kind == "other backbone":      # float32 files where the run's cache has float16
        cache.mkdir()
        with open(os.path.join(shapes_data["cache"], feature_cache.MANIFEST)) as f:
            manifest = json.load(f)
        (cache / feature_cache.MANIFEST).write_text(json.dumps({**manifest,
                                                                "dtype": "float32"}))
    monkeypatch.setattr(RunFolder, "load_best_model", lambda self: pytest.fail(
        "the model was loaded before --cache was checked"))
    image = _test_images(shapes_data, trained_run, 1)[0]
    if command == "caption of unreadable images":
        image = str(tmp_path / "notes.png")
        open(image, "w").write("not an image")
    argv = {"evaluate": ["evaluate", "--out", str(tmp_path / "m.json")],
            "export": ["export", "--out", str(tmp_path / "export")]}.get(
        command, ["caption", image])
    assert main([*argv, "--run", trained_run, "--cache", str(cache)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"caption-attn {argv[0]}: error: "), err
    if kind == "missing":
        assert err[0].endswith(f"--cache {cache}: does not exist; give the feature cache the "
                               f"run was trained on (or a copy of it)")
    else:
        assert f"run {trained_run} was trained on features of " in err[0]
        assert f", but --cache {cache} holds InceptionV3" in err[0]
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "export").exists()


def _without_backbone_weights(cache, kind, tmp_path, monkeypatch):
    """Make `cache` (a copy of the shapes cache) record backbone weights that are not there:
    `random`, its random backbone's file deleted (a cache copied without it); `file`, the
    weights file extraction was given (`--weights /tmp/w.h5`, deleted since, or a cache
    copied to another machine); `imagenet`, ImageNet weights Keras neither has nor can
    download (offline). Returns what the refusal says."""
    path = feature_cache.manifest_path(cache)
    with open(path) as f:
        manifest = json.load(f)
    saved = os.path.join(cache, manifest.pop("weights_file"))
    os.remove(saved)
    if kind == "random":
        return (f"{path}: the features were extracted with the random backbone saved in "
                f"{saved}: no such file; the backbone that made the features cannot be "
                f"rebuilt without it: put the file back (copy it with the cache), or extract "
                f"the images into a new cache")
    weights = str(tmp_path / "w.h5") if kind == "file" else "imagenet"
    with open(path, "w") as f:
        json.dump({**manifest, "weights": weights, "seed": None}, f)
    if kind == "file":
        return (f"{path}: the features were extracted with the weights file {weights}: no "
                f"such file; the backbone that made the features cannot be rebuilt without "
                f"it: put the file back at that path (the same weights: they are checked "
                f"against the manifest's sha256)")

    def offline(*args, **kwargs):
        raise Exception("no network")
    monkeypatch.setattr(keras.utils, "get_file", offline)
    return (f"{path}: the features were extracted with the ImageNet weights, which Keras has "
            f"not cached here and cannot download (no network); the backbone that made the "
            f"features cannot be rebuilt without them: copy {IMAGENET_FILE} from a machine "
            f"that has it into ~/.keras/models/ here (where Keras keeps it; "
            f"$KERAS_HOME/models/ if KERAS_HOME is set)")


@pytest.mark.parametrize("kind", ["random", "file", "imagenet"])
def test_backbone_weights_that_are_gone_are_refused_before_the_model_loads(
        trained_run, copy_cache, tmp_path, monkeypatch, kind):
    """`extract-features --weights /tmp/w.h5`, `rm /tmp/w.h5`, then `caption --run R photos/`:
    best.keras loaded and up to 64 photos were read before `--weights /tmp/w.h5: no such
    file`, a flag `caption` does not have, naming no manifest. Checked from the manifest
    before the model loads now (`needs_backbone`), in its name; `evaluate`, which reads
    features only, is not refused, and a backbone built later says the same."""
    from caption_attn.run import RunFolder
    said = _without_backbone_weights(copy_cache, kind, tmp_path, monkeypatch)
    with monkeypatch.context() as patch:
        patch.setattr(RunFolder, "load_best_model", lambda self: pytest.fail(
            "the model was loaded before the backbone's weights were checked"))
        with pytest.raises(UserError) as e:
            captioner.Captioner.from_run(trained_run, cache=copy_cache, needs_backbone=True)
    assert str(e.value) == said and "--weights" not in said
    model = captioner.Captioner.from_run(trained_run, cache=copy_cache)   # as evaluate's
    with pytest.raises(UserError) as e:
        model.backbone                                      # `Backbone.from_manifest`'s own
    assert str(e.value) == said


@pytest.mark.parametrize("kind", ["random", "file", "imagenet"])
@pytest.mark.parametrize("command", ["caption", "export"])
def test_caption_and_export_name_the_manifest_when_the_backbone_weights_are_gone(
        shapes_data, trained_run, copy_cache, tmp_path, capsys, monkeypatch, command, kind):
    """The commands' one line: the manifest and the file it records, no flag they lack."""
    from caption_attn.run import RunFolder
    said = _without_backbone_weights(copy_cache, kind, tmp_path, monkeypatch)
    monkeypatch.setattr(RunFolder, "load_best_model", lambda self: pytest.fail(
        "the model was loaded before the backbone's weights were checked"))
    argv = {"caption": ["caption", _test_images(shapes_data, trained_run, 1)[0]],
            "export": ["export", "--out", str(tmp_path / "export")]}[command]
    assert main([*argv, "--run", trained_run, "--cache", copy_cache]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"caption-attn {command}: error: {said}"]
    assert not (tmp_path / "export").exists()


def test_the_backbone_check_builds_nothing_and_reads_no_imagenet_file_whole(
        shapes_data, copy_cache, monkeypatch):
    """The check before the model loads is cheap: no InceptionV3 built, and Keras' copy of
    the ImageNet weights taken as it is (its md5, reading all of it, is for the build)."""
    from caption_attn import backbone as backbone_lib
    monkeypatch.setattr(backbone_lib, "_inception_v3", lambda *a, **k: pytest.fail(
        "a backbone was built"))
    m, path = backbone_lib.Backbone.check_manifest(shapes_data["cache"])
    assert path == os.path.join(shapes_data["cache"], m["weights_file"])
    with open(feature_cache.manifest_path(copy_cache), "w") as f:
        json.dump({**m, "weights": "imagenet", "seed": None}, f)
    asked = []
    monkeypatch.setattr(keras.utils, "get_file",
                        lambda *a, **k: asked.append(k) or "/keras/models/imagenet.h5")
    assert backbone_lib.Backbone.check_manifest(copy_cache)[1] == "/keras/models/imagenet.h5"
    assert [k["file_hash"] for k in asked] == [None]


@pytest.mark.parametrize("folder", ["an earlier images folder of the cache",
                                    "the images folder the run recorded"])
def test_plot_attention_in_any_images_folder_of_the_cache_or_the_run_is_refused(
        shapes_data, run_copy, copy_cache, tmp_path, capsys, monkeypatch, folder):
    """`extract-features` from /data/a, then from /data/b into the same cache: `caption
    --plot-attention /data/a/heat` was accepted (only the cache's last images folder was
    refused), as was one in the images folder the run recorded in split.json; `export
    --out` refuses them all (`captioner.run_images_folders`)."""
    from caption_attn.run import RunFolder
    monkeypatch.setattr(RunFolder, "load_best_model", lambda self: pytest.fail(
        "the model was loaded before --plot-attention was checked"))
    other = tmp_path / "a"
    other.mkdir()
    if folder == "an earlier images folder of the cache":
        path = feature_cache.manifest_path(copy_cache)
        what = f"an images folder the feature cache {copy_cache} was extracted from"
    else:
        path = run_copy.split
        what = "the images folder the run was trained on (split.json's images_dir)"
    with open(path) as f:
        data = json.load(f)
    if path == run_copy.split:
        data["images_dir"] = str(other)
    else:
        data["images_dirs"] = [str(other), *feature_cache.images_folders(data)]
    with open(path, "w") as f:
        json.dump(data, f)
    photos = tmp_path / "photos"
    photos.mkdir()
    image = str(photos / "shape_00003.png")
    shutil.copy(os.path.join(shapes_data["images"], "shape_00003.png"), image)
    heat = str(other / "heat")
    assert main(["caption", "--run", run_copy.path, "--cache", copy_cache,
                 "--plot-attention", heat, image]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"caption-attn caption: error: --plot-attention {heat}: inside {other}, {what}: a "
        f"heatmap would overwrite the dataset image of its name, and an extraction would "
        f"take the heatmaps for images; give the heatmaps a folder of their own, e.g. "
        f"heatmaps"]
    assert not os.path.exists(heat)


@pytest.mark.parametrize("command", ["caption", "evaluate", "export"])
def test_a_trained_run_that_lost_split_json_is_refused(shapes_data, run_copy, tmp_path,
                                                       capsys, command):
    """split.json holds the identity of the run's feature cache and its vocabulary's order;
    without it `caption --cache OTHER` skipped both checks and captioned another backbone's
    features, exit 0 (`train` refuses such a run)."""
    os.remove(run_copy.split)
    argv = {"caption": ["caption", os.path.join(shapes_data["images"], "shape_00001.png")],
            "evaluate": ["evaluate", "--out", str(tmp_path / "m.json")],
            "export": ["export", "--out", str(tmp_path / "export")]}[command]
    assert main([*argv, "--run", run_copy.path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"caption-attn {command}: error: {run_copy.split}: missing, but "
                   f"{run_copy.path} has trained (best.keras); the file records the identity "
                   f"of the feature cache and the order of the vocabulary the model was "
                   f"trained with, and without it other features or words would go "
                   f"unnoticed: restore it, or train the run again with --fresh"]
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "export").exists()


def test_a_split_json_from_before_cache_identities_is_still_captioned(shapes_data, run_copy,
                                                                      capsys):
    """A run made before split.json recorded the cache identity and vocabulary order keeps
    being captioned without those checks."""
    with open(run_copy.split) as f:
        split = json.load(f)
    for field in ("cache_identity", "vocab_sha256"):
        split.pop(field)
    with open(run_copy.split, "w") as f:
        json.dump(split, f)
    image = os.path.join(shapes_data["images"], split["splits"]["test"][0])
    assert main(["caption", "--run", run_copy.path, "--beam", "1", image]) == 0
    assert capsys.readouterr().out.startswith(f"Captions for image {os.path.basename(image)}")


@pytest.mark.parametrize("inside", [os.path.join("attention", "epoch_1"), "heat", "."])
def test_plot_attention_inside_the_run_folder_is_refused(shapes_data, run_copy, capsys,
                                                         monkeypatch, inside):
    """`caption --plot-attention RUN/attention/epoch_1` wrote over the heatmaps `train` drew
    there (and any folder in the run mixes the user's files with the run's)."""
    from caption_attn.run import RunFolder
    monkeypatch.setattr(RunFolder, "load_best_model", lambda self: pytest.fail(
        "the model was loaded before --plot-attention was checked"))
    before = sorted(os.listdir(run_copy.attention_epoch(1)))
    heat = os.path.normpath(os.path.join(run_copy.path, inside))
    image = _test_images(shapes_data, run_copy.path, 1)[0]
    assert main(["caption", "--run", run_copy.path, "--plot-attention", heat, image]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"caption-attn caption: error: --plot-attention {heat}: inside the run folder "
        f"{run_copy.path}, whose files and folders `train` and `evaluate` write (its own "
        f"heatmaps in {run_copy.attention}); give the heatmaps a folder of their own, e.g. "
        f"heatmaps"]
    assert sorted(os.listdir(run_copy.attention_epoch(1))) == before
    assert not os.path.exists(os.path.join(run_copy.path, "heat"))


@pytest.mark.parametrize("inside", ["images", "images/heat", "cache", "cache/heat"])
def test_plot_attention_in_the_dataset_images_or_the_cache_is_refused(
        shapes_data, trained_run, tmp_path, capsys, monkeypatch, inside):
    """`--plot-attention shapes/images` wrote a heatmap over the dataset image of the same
    name (train's --run is refused there for the same reason); one in the cache mixed its
    PNGs with the feature files."""
    from caption_attn.run import RunFolder
    monkeypatch.setattr(RunFolder, "load_best_model", lambda self: pytest.fail(
        "the model was loaded before --plot-attention was checked"))
    image = str(tmp_path / "shape_00003.png")
    shutil.copy(os.path.join(shapes_data["images"], "shape_00003.png"), image)
    top, _, below = inside.partition("/")
    heat = os.path.join(shapes_data[top], below)
    assert main(["caption", "--run", trained_run, "--plot-attention", heat, image]) == 2
    err = capsys.readouterr().err
    what = (f"{os.path.abspath(shapes_data[top])}, the images folder the run was trained on"
            if top == "images" else f"the feature cache {os.path.abspath(shapes_data[top])}")
    assert err.startswith(f"caption-attn caption: error: --plot-attention {heat}: inside "
                          f"{what}") and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(os.path.join(shapes_data[top], "heat"))


def test_a_run_whose_cache_moved_says_how_to_point_at_it(shapes_data, trained_run, run_copy,
                                                          tmp_path, capsys):
    run = run_copy.path
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    config["cache"] = str(tmp_path / "moved")
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    image = _test_images(shapes_data, trained_run, 1)[0]
    assert main(["caption", "--run", run, image]) == 2
    err = capsys.readouterr().err
    assert f"the run's feature cache {tmp_path / 'moved'} does not exist" in err
    assert "pass --cache NEW_FOLDER" in err and "`caption` rebuilds the backbone" in err
    # export's message named `caption`'s need
    assert main(["export", "--run", run, "--out", str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert "does not exist: `export` builds the backbone into the SavedModel" in err


def test_one_image_spelled_twice_is_captioned_once(tmp_path, monkeypatch):
    """`x.png ./x.png`, `dir dir/x.png`: the same file was captioned twice, both shown by their
    whole absolute path (and heatmaps named after it)."""
    (tmp_path / "d").mkdir()
    for name in ("x.png", "d/y.png"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert captioner.expand_image_args(["x.png", "./x.png", "d", "d/y.png", "d/../x.png",
                                        str(tmp_path / "d" / "y.png")]) == ["x.png", "d/y.png"]


def test_display_names_follow_the_order_of_the_paths():
    """They came in the order of a set: which of two clashing heatmaps got the "-2" name, and
    which image a refusal named, changed from one process to the next."""
    paths = [f"/i/{c}/{n}" for c, n in zip("qwertyuiop", ["x.png", "y.png"] * 5)]
    assert list(captioner.display_names(paths)) == paths
    assert list(captioner.display_names(paths[::-1])) == paths[::-1]


def test_heatmap_files_never_share_a_name():
    """x.jpg and x.png keep their extension (x.jpg.png, x.png.png), which x.jpg.png itself got
    too: two heatmaps went into one file, one of them lost."""
    names = {"/i/x.jpg": "x.jpg", "/i/x.png": "x.png", "/i/x.jpg.png": "x.jpg.png",
             "/i/A.png": "A.png", "/i/a.png": "a.png", "/i/b.png": "b.png"}
    files = captioner.heatmap_files(names)
    assert len({f.lower() for f in files.values()}) == len(names)  # case-insensitive disks too
    assert files["/i/b.png"] == "b.png" and files["/i/x.png"] == "x.png.png"


def test_save_attention_plots_never_overwrites_an_image_being_captioned(tmp_path):
    """The library guard behind `caption --plot-attention` (test_faults covers the command):
    x.png's heatmap is DIR/x.png, so saving into the images' own folder is refused."""
    image = tmp_path / "shape_00000.png"
    image.write_bytes(b"pixels")
    with pytest.raises(UserError, match="an image being captioned"):
        captioner.save_attention_plots(str(tmp_path), {str(image): None})
    assert image.read_bytes() == b"pixels"


def test_a_file_name_that_is_not_utf8_is_shown_and_plotted(shapes_data, trained_run, tmp_path,
                                                           capsys):
    """caf\xe9.png (a Latin-1 name) reached matplotlib as 'caf\udce9.png' in the heatmap's title:
    a traceback after captioning, no heatmap written."""
    image = os.path.join(bytes(tmp_path), b"caf\xe9.png")
    with open(os.path.join(shapes_data["images"], "shape_00000.png"), "rb") as f:
        open(image, "wb").write(f.read())
    heat = tmp_path / "heat"
    assert main(["caption", "--run", trained_run, "--beam", "1", "--plot-attention", str(heat),
                 os.fsdecode(image)]) == 0
    assert "Captions for image caf\\xe9.png:" in capsys.readouterr().out
    assert os.listdir(heat) == ["caf\\xe9.png"]


def test_an_attention_plot_cut_to_its_first_words_says_so():
    # Epoch heatmaps draw the first 15 words: the title showed those words as the caption,
    # beside the probability of the whole 41-word one.
    words = [f"w{i}" for i in range(20)]
    caption = captioner.Caption(words, -2.0, np.full((21, 64), 1 / 64, np.float32))
    image = np.zeros((299, 299, 3), np.uint8)
    cut = captioner.attention_plot(image, caption, "x.png", max_words=15)
    assert cut.get_suptitle() == (f"x.png: {' '.join(words[:15])} ... (the first 15 of 20 "
                                  f"words; p={captioner.format_probability(math.exp(-2))} "
                                  f"of all)")
    assert len(cut.images) == 15
    whole = captioner.attention_plot(image, caption, "x.png", max_words=20)
    assert whole.get_suptitle() == (f"x.png: {' '.join(words)} "
                                    f"(p={captioner.format_probability(math.exp(-2))})")
    assert len(whole.images) == 20


def test_an_attention_plot_of_a_caption_cut_at_max_length_says_so():
    """A caption cut at --max-length was titled like a finished one, while the printed text
    ends it with "..."."""
    cut = captioner.Caption(["a", "red"], np.log(0.5), np.full((2, 64), 1 / 64), ended=False)
    fig = captioner.attention_plot(np.zeros((299, 299, 3), np.uint8), cut, "x.png")
    assert fig.get_suptitle() == "x.png: a red ... (p=0.500000)"


def test_an_image_without_a_live_caption_is_reported_not_printed_empty(
        shapes_data, trained_run, tmp_path, capsys, monkeypatch):
    # every beam dead (an overflowing length penalty did it): `Captions for image X:` with
    # nothing under it, exit 0; with --plot-attention an IndexError traceback
    images = _test_images(shapes_data, trained_run, 3)
    real = captioner.Captioner.decode
    monkeypatch.setattr(captioner.Captioner, "decode", lambda self, feats, ids=None: [
        [] if i == 1 else c for i, c in enumerate(real(self, feats, ids))])
    heat = tmp_path / "heat"
    code = main(["caption", "--run", trained_run, "--beam", "2", "--plot-attention", str(heat),
                 *images])
    out, err = capsys.readouterr()
    name = os.path.basename(images[1])
    assert code == 0 and f"Captions for image {name}:" not in out     # the others were
    assert f"caption-attn caption: {images[1]}: {captioner.NO_CAPTION}\n" in err
    assert sorted(os.listdir(heat)) == sorted(os.path.basename(p) for p in (images[0],
                                                                              images[2]))


def test_an_image_failing_now_loses_the_heatmap_an_earlier_caption_drew(
        shapes_data, trained_run, tmp_path, capsys):
    """`caption --plot-attention DIR` left an image's heatmap of an earlier run in DIR when
    the image could not be read now (the failure reported): DIR showed attention the model
    no longer gives for that file."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    images = []
    for path in _test_images(shapes_data, trained_run, 2):
        images.append(str(folder / os.path.basename(path)))
        shutil.copy(path, images[-1])
    heat = tmp_path / "heat"
    assert main(["caption", "--run", trained_run, "--beam", "1", "--plot-attention", str(heat),
                 *images]) == 0
    assert len(os.listdir(heat)) == 2
    with open(images[1], "wb") as f:
        f.write(b"not pixels any more")
    assert main(["caption", "--run", trained_run, "--beam", "1", "--plot-attention", str(heat),
                 *images]) == 0
    assert "(unrecognised format)" in capsys.readouterr().err           # reported
    assert os.listdir(heat) == [os.path.basename(images[0])]


class _FullDisk:
    """A stdout redirected to a full disk (`caption --json > full/out.json`): every write and
    flush fails with ENOSPC while `full`, as the file's do."""

    def __init__(self):
        self.full, self.text = True, []

    def write(self, text):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.text.append(text)
        return len(text)

    def flush(self):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")

    def isatty(self):
        return False


@pytest.mark.parametrize("flags", [["--json"], []])
def test_a_stdout_on_a_full_disk_is_said_as_the_output_that_could_not_be_written(
        shapes_data, trained_run, capsys, monkeypatch, flags):
    """`caption --json > full/out.json` said `error: No space left on device`: no file, no
    word that it was the output that failed."""
    import sys
    images = _test_images(shapes_data, trained_run, 1)
    stdout = _FullDisk()
    monkeypatch.setattr(sys, "stdout", stdout)
    code = main(["caption", "--run", trained_run, "--beam", "1", *flags, *images])
    stdout.full = False
    err = capsys.readouterr().err
    assert code == 1
    assert err.splitlines()[-1] == (
        "caption-attn caption: error: cannot write the output to stdout (No space left on "
        "device): free space where it goes (or write it elsewhere) and rerun this command")


def test_a_heatmap_that_cannot_be_written_is_reported_and_the_rest_go_on(
        shapes_data, trained_run, tmp_path, capsys, monkeypatch):
    """A heatmap that could not be written ended `caption` with `error: DIR/.x.png.tmp.PID.vm:
    ...` (its temporary file), exit 2, and none of the batch's captions printed, though the
    heatmaps before it were written."""
    import errno

    from caption_attn import plot
    images = _test_images(shapes_data, trained_run, 3)
    heat = tmp_path / "heat"
    bad = str(heat / os.path.basename(images[1]))
    real = plot.write_bytes_atomic

    def write(path, payload, fsync=False):
        if path == bad:
            raise OSError(errno.ENOSPC, "No space left on device", path + ".tmp.1.vm")
        real(path, payload, fsync)
    monkeypatch.setattr(plot, "write_bytes_atomic", write)
    code = main(["caption", "--run", trained_run, "--beam", "1", "--plot-attention", str(heat),
                 *images])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.count("Captions for image") == 3
    assert err.splitlines()[1:] == [f"caption-attn caption: {images[1]}: cannot write its "
                                    f"heatmap {bad} (No space left on device)",
                                    f"attention heatmaps: {heat}"]
    assert err.startswith("note: best model of epoch ")
    assert sorted(os.listdir(heat)) == sorted(os.path.basename(p) for p in (images[0],
                                                                              images[2]))


def test_caption_batches_hold_batch_size_readable_images_in_order(shapes_data, trained_run,
                                                                  tmp_path):
    """A bad file does not shrink a batch (one size, one XLA compilation) and is reported
    with the batch it was met in; `done` counts the paths gone through."""
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not pixels")
    good = _test_images(shapes_data, trained_run, 5)
    paths = [good[0], str(bad), *good[1:]]
    model = captioner.Captioner.from_run(trained_run, DecodeConfig(beam=1, batch_size=2))
    batches = list(model.caption_batches(paths))
    assert [list(r) for r, _, _ in batches] == [good[0:2], good[2:4], good[4:5]]
    assert [list(e) for _, e, _ in batches] == [[str(bad)], [], []]
    assert [done for _, _, done in batches] == [3, 5, 6]
    image, captions = batches[0][0][good[0]]
    assert image.shape[2] == 3 and max(image.shape) <= 299 and captions[0].words  # the view
    whole, errors = model.caption_images(paths)
    assert list(whole) == good and list(errors) == [str(bad)]
    assert [whole[p][1][0].words for p in good] == \
        [r[p][1][0].words for r, _, _ in batches for p in r]


def test_many_images_show_a_bar_on_stderr_and_json_stays_json(shapes_data, trained_run,
                                                             tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not pixels")
    images = [str(bad), *_test_images(shapes_data, trained_run, 3)]
    assert main(["caption", "--run", trained_run, "--beam", "1", "--batch-size", "2",
                 "--json", *images]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)                     # nothing but the JSON on stdout
    assert [i["image"] for i in out["images"]] == images[1:]
    assert out["errors"][0]["image"] == str(bad)
    err = captured.err.splitlines()
    bar = [i for i, line in enumerate(err) if line.startswith("4/4 - ")]
    assert bar and "failed: 1" in err[bar[0]]
    assert any(line.startswith(f"caption-attn caption: cannot read {bad}")  # after the bar
               for line in err[bar[0] + 1:])
    # text, stdout not a terminal (a file): the same bar, captions on stdout only
    assert main(["caption", "--run", trained_run, "--beam", "1", "--batch-size", "2",
                 *images]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("Captions for image") == 3 and "4/4" not in captured.out
    assert any(line.startswith("4/4 - ") for line in captured.err.splitlines())
    # one batch: no bar
    assert main(["caption", "--run", trained_run, "--beam", "1", *images]) == 0
    assert "4/4" not in capsys.readouterr().err


def test_captions_of_finished_batches_are_out_when_a_later_batch_is_interrupted(
        shapes_data, trained_run, tmp_path, capsys, monkeypatch):
    images = _test_images(shapes_data, trained_run, 4)
    decode, calls = captioner.Captioner.decode, []

    def interrupted_second_time(self, features, ids=None):
        calls.append(len(features))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return decode(self, features, ids)
    monkeypatch.setattr(captioner.Captioner, "decode", interrupted_second_time)
    heat = tmp_path / "heat"
    code = main(["caption", "--run", trained_run, "--beam", "1", "--batch-size", "2",
                 "--plot-attention", str(heat), *images])
    assert code != 0 and calls == [2, 2]
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("Captions")] == \
        [f"Captions for image {os.path.basename(p)}:" for p in images[:2]]
    assert sorted(os.listdir(heat)) == sorted(
        os.path.splitext(os.path.basename(p))[0] + ".png" for p in images[:2])


@pytest.mark.parametrize("argv, flag", [
    (["caption", "--run", "RUN", "--plot-attention", "", "x.png"], "--plot-attention"),
    (["caption", "--run", "RUN", "--cache", " ", "x.png"], "--cache"),
    (["evaluate", "--run", "RUN", "--out", ""], "--out"),
    (["evaluate", "--run", "RUN", "--captions", ""], "--captions"),
    (["export", "--run", "RUN", "--out", "OUT", "--cache", ""], "--cache"),
    (["inspect", "--captions", ""], "--captions"),
])
def test_an_empty_path_flag_is_refused_not_taken_for_the_default(argv, flag, capsys):
    # `--plot-attention "$DIR"` with DIR unset drew no heatmaps (exit 0); `evaluate --out ""`
    # overwrote the run's own metrics file; `--cache ""` used the run's cache.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} must name a file or folder, got an empty string" in err


def test_caption_into_a_closed_pipe_ends_quietly_after_the_written_batches(
        tmp_path, capsys, monkeypatch):
    # `caption ... | head -n 2`: the first batch went out, the next write hit the closed pipe
    # and printed `error: Broken pipe` with exit 1. Now: nothing on stderr, SIGPIPE's status.
    import sys

    from caption_attn import cli
    images = []
    for name in "abcd":
        images.append(str(tmp_path / f"{name}.png"))
        open(images[-1], "wb").close()
    caption = captioner.Caption(["a", "circle"], -1.0, np.zeros((3, 64), np.float32))

    class TwoBatches:       # the run's model is not what this tests (loading it takes 5 s)
        def caption_batches(self, paths):
            yield {p: (None, [caption]) for p in paths[:2]}, {}, 2
            yield {p: (None, [caption]) for p in paths[2:]}, {}, 4
    monkeypatch.setattr(captioner.Captioner, "from_run", lambda *a, **k: TwoBatches())
    real, flushed = sys.stdout, []

    class HeadClosesAfterOneBatch:
        def isatty(self):   # a terminal's `head`: no progress bar on stderr
            return True

        def write(self, text):
            if flushed:
                raise BrokenPipeError(32, "Broken pipe")
            return real.write(text)

        def flush(self):
            flushed.append(1)

        def fileno(self):   # a pipe whose reader is gone, as `head`'s after its lines
            return write_end
    read_end, write_end = os.pipe()
    os.close(read_end)
    monkeypatch.setattr(sys, "stdout", HeadClosesAfterOneBatch())
    try:
        code = main(["caption", "--run", str(tmp_path), "--batch-size", "2", *images])
    finally:
        os.close(write_end)
    captured = capsys.readouterr()
    assert code == cli.EXIT_STDOUT_CLOSED
    assert captured.err == ""
    assert [line for line in captured.out.splitlines() if line.startswith("Captions")] == \
        ["Captions for image a.png:", "Captions for image b.png:"]


def test_save_attention_plots_never_overwrites_another_file_in_the_images_folder(tmp_path):
    """`caption photos/cat.jpg --plot-attention photos`: cat.jpg's heatmap is photos/cat.png,
    which overwrote the user's photo cat.png (not being captioned), exit 0 and no word."""
    photo, other = tmp_path / "cat.jpg", tmp_path / "cat.png"
    photo.write_bytes(b"jpeg")
    other.write_bytes(b"png")
    with pytest.raises(UserError, match=r"overwrite .*cat\.png, which is not a heatmap "):
        captioner.save_attention_plots(str(tmp_path), {str(photo): None})
    assert other.read_bytes() == b"png"


def test_a_best_model_of_another_architecture_is_refused(shapes_data, trained_run, run_copy,
                                                         capsys):
    """A best.keras from another run (same vocabulary size, other --units) captioned with this
    run's vocabulary, exit 0: its sizes are checked against config.json."""
    with open(run_copy.config) as f:
        config = json.load(f)
    config["model"]["units"] += 1
    with open(run_copy.config, "w") as f:
        json.dump(config, f)
    image = _test_images(shapes_data, trained_run, 1)[0]
    assert main(["caption", "--run", run_copy.path, image]) == 2
    err = capsys.readouterr().err
    assert "best.keras: a model with embedding_dim 32, units 64, but" in err
    assert "units 65: not this run's best model" in err and "Traceback" not in err


def test_a_folder_given_hands_back_the_files_it_leaves_out(tmp_path):
    """`caption photos/` captioned A.JPG and d.JPEG and said nothing of c.jfif (a JPEG, as
    Windows names downloads) or b.heic: .jfif is an image now, and the files left out for
    their extension come back for the CLI's one note (a folder of none of them says so)."""
    for name in ("A.JPG", "c.jfif", "b.heic", ".hidden.heic"):
        (tmp_path / name).write_bytes(b"x")
    left: list = []
    assert captioner.expand_image_args([str(tmp_path)], left_out=left) == [
        str(tmp_path / "A.JPG"), str(tmp_path / "c.jfif")]
    assert left == [str(tmp_path / "b.heic")]
    (tmp_path / "A.JPG").unlink()
    (tmp_path / "c.jfif").unlink()
    with pytest.raises(UserError, match=r"no image files in this folder; left out 1 file\(s\) "
                                        r"there whose extension is not an image's \(b\.heic\)"):
        captioner.expand_image_args([str(tmp_path)])


def test_a_folder_without_images_among_other_images_is_reported_not_fatal(tmp_path):
    """`caption photos/*`, whose glob also matched an empty folder (or one of .heic files, or
    an earlier run's heatmaps): the whole job was refused, exit 2, nothing captioned. Now that
    folder is one item's report, as an unreadable file is; alone, it is still refused."""
    photos = tmp_path / "photos"
    (photos / "empty").mkdir(parents=True)
    (photos / "raw").mkdir()
    (photos / "raw" / "b.heic").write_bytes(b"x")
    (photos / "a.jpg").write_bytes(b"x")
    args = [str(photos / "a.jpg"), str(photos / "empty"), str(photos / "raw")]
    unreadable: dict = {}
    assert captioner.expand_image_args(args, unreadable=unreadable) == [args[0]]
    # (b.heic goes to the note on files left out for their extension, said once)
    assert unreadable == {str(photos / "empty") + "/": "no image files in this folder",
                          str(photos / "raw") + "/": "no image files in this folder"}
    assert cli.unreadable_lines(unreadable) == [
        f"caption-attn caption: {photos / 'empty'}/: no image files in this folder",
        f"caption-attn caption: {photos / 'raw'}/: no image files in this folder"]
    with pytest.raises(UserError, match=r"empty: no image files in this folder$"):
        captioner.expand_image_args(args[1:], unreadable={})   # nothing to caption at all
    with pytest.raises(UserError, match=r"empty: no image files in this folder$"):
        captioner.expand_image_args(args)   # a caller that takes no reports
    with pytest.raises(UserError, match=r"raw: no image files in this folder; left out 1 "
                                        r"file\(s\) there whose extension is not an image's"):
        captioner.expand_image_args(args[2:], unreadable={})


def test_a_heatmap_folder_inside_an_image_folder_is_not_captioned(tmp_path):
    """`caption photos --plot-attention photos/heat`, run a second time, captioned the first
    run's heatmaps as photos (and drew heatmaps of them)."""
    (tmp_path / "heat").mkdir()
    for name in ("x.jpg", "heat/x.png"):
        (tmp_path / name).write_bytes(b"x")
    assert captioner.expand_image_args([str(tmp_path)], heatmaps=str(tmp_path / "heat")) \
        == [str(tmp_path / "x.jpg")]
    with pytest.raises(UserError, match=r"is the folder of .*x\.png, an image being "):
        captioner.expand_image_args([str(tmp_path / "heat" / "x.png")],   # named: its folder
                                    heatmaps=str(tmp_path / "heat"))
    # the images' folder itself: the first run's heatmaps of JPEGs overwrite nothing, and the
    # second captioned them as photos (and drew heatmaps of heatmaps), exit 0
    with pytest.raises(UserError, match=r"^--plot-attention .* is the folder .* of the images "
                                        r"being captioned: .* give them a folder of their own"):
        captioner.expand_image_args([str(tmp_path)], heatmaps=str(tmp_path) + "/")
    # a folder above the images (`caption photos/sub --plot-attention photos`,
    # `--plot-attention photos photos/sub/c.png`): accepted, and `caption photos` then
    # captioned the heatmaps
    with pytest.raises(UserError, match=r"^--plot-attention .* is a folder above .*heat, a "
                                        r"folder being captioned: the heatmaps would lie "):
        captioner.expand_image_args([str(tmp_path / "heat")], heatmaps=str(tmp_path))
    with pytest.raises(UserError, match=r"^--plot-attention .* is a folder above .*x\.png, "
                                        r"an image being captioned: the heatmaps would lie "):
        captioner.expand_image_args([str(tmp_path / "heat" / "x.png")],
                                    heatmaps=str(tmp_path))
    (tmp_path / "x.jpg").unlink()
    with pytest.raises(UserError, match="no image files in this folder .outside "
                                        "--plot-attention"):
        captioner.expand_image_args([str(tmp_path)], heatmaps=str(tmp_path / "heat"))


def test_heatmaps_caption_attn_drew_are_never_captioned_as_photos(tmp_path):
    """`caption photos --plot-attention photos/heat`, then `caption photos` without the flag:
    the heatmaps were captioned as photos (the README said they were left out)."""
    from caption_attn import plot
    (tmp_path / "heat").mkdir()
    (tmp_path / "x.png").write_bytes(b"x")
    fig = plot.Figure(figsize=(1, 1))
    plot.save_figure(fig, tmp_path / "heat" / "x.png")
    (tmp_path / "heat" / "y.png").write_bytes(b"y")              # a photo put there
    drawn = []
    assert captioner.expand_image_args([str(tmp_path)], drawn=drawn) == \
        [str(tmp_path / "heat" / "y.png"), str(tmp_path / "x.png")]
    assert drawn == [str(tmp_path / "heat" / "x.png")]
    # in the --plot-attention folder of this run they are where they belong: no note
    drawn = []
    assert captioner.expand_image_args([str(tmp_path)], heatmaps=str(tmp_path / "heat"),
                                       drawn=drawn) == [str(tmp_path / "x.png")]
    assert drawn == []
    # named on its own, a file is captioned whatever it is
    assert captioner.expand_image_args([str(tmp_path / "heat" / "x.png")]) == \
        [str(tmp_path / "heat" / "x.png")]
    for name in ("x.png", "heat/y.png"):
        (tmp_path / name).unlink()
    with pytest.raises(UserError, match=r"no image files in this folder besides 1 heatmap\(s\) "
                                        r"caption-attn drew$"):
        captioner.expand_image_args([str(tmp_path)])


def test_a_heatmap_folder_holding_other_images_is_refused_untouched(shapes_data, trained_run,
                                                                   tmp_path, capsys):
    """`caption photos --plot-attention photos/sub` with photos of its own in photos/sub:
    they were left out without a word, one overwritten by a heatmap, exit 0; and the heatmap
    of an image failing now (photos2/a.png) deleted the photo photos2/sub/a.png. Only files
    `caption` drew are redrawn or removed: a folder holding anything else is refused."""
    shape = os.path.join(shapes_data["images"], "shape_0000{}.png").format
    for top, first in (("photos", shape(1)), ("photos2", None)):
        os.makedirs(tmp_path / top / "sub")
        if first:
            shutil.copy(first, tmp_path / top / "a.png")
        else:
            (tmp_path / top / "a.png").write_bytes(b"not an image")
        shutil.copy(shape(4), tmp_path / top / "b.png")
        shutil.copy(shape(2), tmp_path / top / "sub" / "a.png")
        shutil.copy(shape(5), tmp_path / top / "sub" / "c.png")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.png")}
    for top in ("photos", "photos2"):
        sub = str(tmp_path / top / "sub")
        code = main(["caption", "--run", trained_run, "--beam", "1", "--max-length", "2",
                     "--plot-attention", sub, str(tmp_path / top)])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err == (
            f"caption-attn caption: error: --plot-attention {sub}: the heatmap of "
            f"{tmp_path / top / 'a.png'} would overwrite {sub}/a.png, which is not a heatmap "
            f"caption-attn drew; give the heatmaps a folder of their own\n")
    (tmp_path / "photos" / "sub" / "a.png").unlink()     # no clash left, still photos there
    del before[tmp_path / "photos" / "sub" / "a.png"]
    assert main(["caption", "--run", trained_run, "--beam", "1", "--plot-attention",
                 str(tmp_path / "photos" / "sub"), str(tmp_path / "photos" / "b.png")]) == 2
    assert capsys.readouterr().err == (
        f"caption-attn caption: error: --plot-attention {tmp_path / 'photos' / 'sub'}: holds "
        f"1 image that caption-attn did not draw (c.png); give the heatmaps a new or empty "
        f"folder of their own\n")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.png")} == before
    # a folder of its own heatmaps inside the images: redrawn, and left out of the images
    heat = str(tmp_path / "photos" / "heat")
    for _ in range(2):
        assert main(["caption", "--run", trained_run, "--beam", "1", "--max-length", "2",
                     "--plot-attention", heat, str(tmp_path / "photos")]) == 0
        assert capsys.readouterr().out.count("Captions for image") == 3
        assert sorted(os.listdir(heat)) == ["a.png", "b.png", "c.png"]


def test_a_file_name_with_a_newline_stays_on_its_header_line():
    """`Captions for image a<newline>b.png:` split the header over two lines (and a heatmap
    name): control characters are shown escaped."""
    names = captioner.display_names(["/i/a\nb.png", "/i/c\td\x1b.png"])
    assert list(names.values()) == ["a\\nb.png", "c\\td\\x1b.png"]
    text = captioner.format_captions("/i/a\nb.png", [], names["/i/a\nb.png"])
    assert text == "Captions for image a\\nb.png:"
    assert captioner.heatmap_files(names)["/i/a\nb.png"] == "a\\nb.png"


def test_a_heatmap_of_an_image_with_a_long_name_is_written(tmp_path):
    """82 CJK characters + .png (250 bytes, a legal name): its heatmap's temporary name was
    too long, and `caption --plot-attention` stopped with 'File name too long', exit 2."""
    from caption_attn import plot
    long_a, long_b = "/i/" + "图" * 82 + ".png", "/i/" + "图" * 82 + "x.png"
    files = captioner.heatmap_files(captioner.display_names([long_a, long_b]))
    assert len(set(files.values())) == 2
    for name in files.values():
        assert name.endswith(".png") and name.startswith("图" * 20)
        plot.write_bytes_atomic(str(tmp_path / name), b"png")   # the way heatmaps are saved
    assert len(os.listdir(tmp_path)) == 2


@pytest.fixture(scope="module")
def unreadable_folders(tmp_path_factory):
    """The image arguments of the two tests below, expanded in one process as a user to whom
    file permissions apply (each such process imports TensorFlow: ~5 s of CPU)."""
    from image_samples import run_as_user, scene, write_rgb
    root = tmp_path_factory.mktemp("unreadable")
    photos = root / "photos"
    os.makedirs(photos / "locked")
    write_rgb(str(photos / "a.png"), scene(0))
    write_rgb(str(photos / "locked" / "b.png"), scene(1))
    only = root / "only"                         # its one image in a folder it cannot list
    write_rgb(str(only / "locked" / "c.png"), scene(2))
    locked = root / "locked"                     # a folder given that cannot be listed
    locked.mkdir()
    for folder in (photos / "locked", only / "locked", locked):
        os.chmod(folder, 0)
    try:
        done = run_as_user("import json, sys\n"
                           "from caption_attn.captioner import expand_image_args\n"
                           "from caption_attn.errors import UserError\n"
                           "def refused(path):\n"
                           "    try:\n"
                           "        expand_image_args([path])\n"
                           "    except UserError as e:\n"
                           "        return str(e)\n"
                           "folders = {}\n"
                           "paths = expand_image_args([sys.argv[1]], unreadable=folders)\n"
                           "print(json.dumps({'paths': paths, 'folders': folders,\n"
                           "                  'only_refused': refused(sys.argv[2]),\n"
                           "                  'locked_refused': refused(sys.argv[3])}))",
                           str(photos), str(only), str(locked), cwd=str(root))
    finally:
        for folder in (photos / "locked", only / "locked", locked):
            os.chmod(folder, 0o755)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"photos": photos, "only": only, "locked": locked, **json.loads(done.stdout)}


def test_a_folder_that_cannot_be_read_is_reported_not_skipped(unreadable_folders):
    """`caption photos` skipped an unlistable folder below it without a word (its images
    neither captioned nor reported): it is now reported among the unreadable images."""
    photos, only = unreadable_folders["photos"], unreadable_folders["only"]
    assert unreadable_folders["only_refused"].startswith(
        f"{only}: no image files in this folder it could list (1 folder(s) below it cannot "
        f"be read, e.g. {only}/locked/: folder cannot be read (Permission denied)")
    paths, folders = unreadable_folders["paths"], unreadable_folders["folders"]
    assert paths == [str(photos / "a.png")]
    assert list(folders) == [str(photos / "locked") + "/"]
    assert folders[str(photos / "locked") + "/"].startswith(
        "folder cannot be read (Permission denied)")


def test_an_image_folder_that_cannot_be_read_is_named_without_a_flag(unreadable_folders):
    """`caption photos` with photos unlistable said `--images photos: cannot be read`, a flag
    `caption` has not got (`list_images` named it for every caller)."""
    locked = unreadable_folders["locked"]
    assert unreadable_folders["locked_refused"] == f"{locked}: cannot be read (Permission denied)"


def test_a_folder_reached_through_a_symlink_beside_it_is_captioned_once(tmp_path):
    """`list_images` lists a symlinked folder under every path to it (extraction must: a
    caption file may name either), and `caption photos` with photos/latest -> v2 captioned
    every image of v2 twice."""
    from image_samples import scene, write_rgb
    photos = tmp_path / "photos"
    write_rgb(str(photos / "v2" / "x.png"), scene(0))
    os.symlink("v2", photos / "latest")
    paths = captioner.expand_image_args([str(photos)])
    assert [os.path.relpath(p, photos) for p in paths] == ["latest/x.png"]


def test_a_failing_image_removes_only_a_heatmap_drawn_of_that_very_image(
        shapes_data, trained_run, tmp_path, capsys):
    """`caption --plot-attention H d2/cat.png`, then `caption --plot-attention H d1/cat.png`
    with d1/cat.png truncated: the heatmap of d2/cat.png (H/cat.png, the same name) was
    removed without a word. The heatmap now records the image it shows; an older heatmap
    without that record is kept (it may be another image's), with a note."""
    from caption_attn.images import heatmap_source
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    good = _test_images(shapes_data, trained_run, 1)[0]
    shutil.copy(good, tmp_path / "d2" / "cat.png")
    with open(good, "rb") as f:
        (tmp_path / "d1" / "cat.png").write_bytes(f.read()[:200])    # truncated
    heat = tmp_path / "heat"
    caption = ["caption", "--run", trained_run, "--beam", "1", "--plot-attention", str(heat)]
    assert main([*caption, str(tmp_path / "d2" / "cat.png")]) == 0
    assert heatmap_source(str(heat / "cat.png")) == os.path.realpath(tmp_path / "d2" / "cat.png")
    capsys.readouterr()
    assert main([*caption, str(tmp_path / "d1" / "cat.png")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert os.listdir(heat) == ["cat.png"]                   # d2's heatmap kept
    # a heatmap of d1/cat.png itself goes when d1/cat.png fails
    shutil.copy(good, tmp_path / "d1" / "cat.png")
    assert main([*caption, str(tmp_path / "d1" / "cat.png")]) == 0
    assert heatmap_source(str(heat / "cat.png")) == os.path.realpath(tmp_path / "d1" / "cat.png")
    (tmp_path / "d1" / "cat.png").write_bytes(b"not pixels any more")
    assert main([*caption, str(tmp_path / "d1" / "cat.png")]) == 1
    assert os.listdir(heat) == []
    # an older heatmap, which does not say which image it shows, is kept, with a note
    from caption_attn.images import mark_heatmap
    with open(good, "rb") as f:
        (heat / "cat.png").write_bytes(mark_heatmap(f.read()))
    capsys.readouterr()
    assert main([*caption, str(tmp_path / "d1" / "cat.png")]) == 1
    err = capsys.readouterr().err
    assert os.listdir(heat) == ["cat.png"]
    assert f"kept {heat / 'cat.png'}" in err and "does not record which image" in err



def test_two_files_never_get_the_same_printed_name():
    """`x<newline>y.png` and `x\\ny.png` (a backslash and n) both printed as x\\ny.png, as did
    caf<byte e9>.png and a file literally named caf\\xe9.png: uniqueness was checked on the raw
    names, before escaping; their heatmaps got -2 with identical titles."""
    for a, b in [("/i/x\ny.png", "/i/x\\ny.png"), ("/i/caf\udce9.png", "/i/caf\\xe9.png"),
                 ("/p/d/x\ny.png", "/q/d/x\\ny.png")]:
        names = captioner.display_names([a, b, "/i/other.png"])
        assert names[a] != names[b], names
        assert names["/i/other.png"] == "other.png"
        for n in names.values():
            assert captioner.one_line(captioner.printable_name(n)) == n   # printable as it is
    names = captioner.display_names(["/i/x\ny.png", "/i/x\\ny.png"])
    assert names["/i/x\ny.png"] == "x\\ny.png (bytes 780a792e706e67)"
    assert captioner.display_names(["/p/d/x\ny.png", "/q/d/x\\ny.png"]) == {
        "/p/d/x\ny.png": "p/d/x\\ny.png", "/q/d/x\\ny.png": "q/d/x\\ny.png"}
    # names that do not clash once printed keep their short form
    names = captioner.display_names(["/i/x\ny.png", "/i/z.png"])
    assert names["/i/x\ny.png"] == "x\\ny.png"


def test_a_file_given_under_two_names_is_captioned_once_and_said(
        shapes_data, trained_run, tmp_path, monkeypatch, capsys):
    """`caption --json link.png a.png` (link.png -> a.png), or `a.png ./a.png`: one entry,
    no word: a script matching its inputs to the outputs found one missing."""
    shutil.copy(_test_images(shapes_data, trained_run, 1)[0], tmp_path / "a.png")
    os.symlink("a.png", tmp_path / "link.png")
    monkeypatch.chdir(tmp_path)
    assert main(["caption", "--run", trained_run, "--beam", "1", "--json",
                 "link.png", "a.png", "./a.png"]) == 0
    out, err = capsys.readouterr()
    images = json.loads(out)["images"]
    assert [e["image"] for e in images] == ["link.png", "a.png", "./a.png"]
    assert "same_as" not in images[0]
    assert images[1]["same_as"] == images[2]["same_as"] == "link.png"
    assert images[1]["captions"] == images[0]["captions"]
    assert "note: a.png is the same file as link.png: captioned once, as link.png" in err
    assert "note: ./a.png is the same file as link.png" in err
    assert main(["caption", "--run", trained_run, "--beam", "1", "a.png", "./a.png"]) == 0
    out, err = capsys.readouterr()
    assert out.count("Captions for image") == 1
    assert "note: ./a.png is the same file as a.png: captioned once, as a.png" in err


def test_a_file_given_twice_with_a_heatmap_folder_and_a_failing_image(
        shapes_data, trained_run, tmp_path, monkeypatch, capsys):
    """The notes on a file given twice come with the heatmap writer's own (an image failing),
    and an error of a file given twice is listed under each name in --json."""
    (tmp_path / "bad.png").write_bytes(b"not pixels")
    monkeypatch.chdir(tmp_path)
    assert main(["caption", "--run", trained_run, "--beam", "1", "--json", "--plot-attention",
                 "heat", "bad.png", "./bad.png"]) == 1
    out, err = capsys.readouterr()
    errors = json.loads(out)["errors"]
    assert [(e["image"], e.get("same_as")) for e in errors] == [("bad.png", None),
                                                                 ("./bad.png", "bad.png")]
    assert "note: ./bad.png is the same file as bad.png" in err


@pytest.mark.parametrize("h, w", [(360, 640), (640, 360)])
def test_heatmaps_show_a_photo_in_its_own_proportions(shapes_data, trained_run, tmp_path,
                                                      monkeypatch, h, w):
    """`caption --plot-attention` drew every photo squeezed to the 299x299 the model sees:
    a 640x360 photo's panels were square. Now a panel has the photo's proportions (within a
    pixel or two), the 8x8 map stretched over all of it, and no side longer than before."""
    import cv2

    from caption_attn import plot
    shape = cv2.imread(_test_images(shapes_data, trained_run, 1)[0])
    photo = str(tmp_path / "photo.png")
    cv2.imwrite(photo, cv2.resize(shape, (w, h)))
    drawn, save = [], plot.save_figure
    monkeypatch.setattr(plot, "save_figure", lambda fig, *a: (drawn.append(fig), save(fig, *a)))
    assert main(["caption", "--run", trained_run, "--beam", "1", "--plot-attention",
                 str(tmp_path / "heat"), photo]) == 0
    (fig,) = drawn
    for panel in fig.images:
        ph, pw = panel.get_size()
        assert abs(ph - pw * h / w) <= 2 if w >= h else abs(pw - ph * w / h) <= 2
        assert max(ph, pw) == 210


def test_caption_gives_the_model_features_rounded_as_the_cache_stores_them(shapes_data,
                                                                            trained_run):
    """The run trained on the cache's float16 files; `caption` gave the model the backbone's
    float32 features unrounded (~5e-4 relative apart), so a caption or its p= could differ
    from `evaluate`'s for the very image. They are rounded through the cache's dtype, as
    extraction stores them (the export's graph does the same, `Backbone.features`)."""
    from caption_attn.config import DecodeConfig
    from caption_attn.feature_cache import feature_path
    from caption_attn.images import load_image_and_view
    model = captioner.Captioner.from_run(trained_run, DecodeConfig(beam=1))
    paths = _test_images(shapes_data, trained_run, 2)
    got = model.backbone(np.stack([load_image_and_view(p)[0] for p in paths]))
    assert got.dtype == np.float32 and model.backbone.stored_dtype == "float16"
    np.testing.assert_array_equal(got, got.astype(np.float16).astype(np.float32))
    cached = np.stack([np.load(feature_path(shapes_data["cache"], os.path.basename(p)))
                       for p in paths]).astype(np.float32)
    np.testing.assert_allclose(got, cached, rtol=2e-2, atol=2e-2 * np.abs(cached).max())
    graph = model.backbone.features(np.stack([load_image_and_view(p)[0] for p in paths]))
    graph = graph.numpy()                       # (eager: the convolutions may round apart)
    np.testing.assert_array_equal(graph, graph.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(graph, got, rtol=1e-2, atol=1e-2 * np.abs(got).max())


def test_a_glob_matching_the_heatmaps_folder_of_an_earlier_run_is_no_refusal(tmp_path):
    """`caption photos/* --plot-attention photos/heat` run again: the glob now matched
    photos/heat, and the command was refused as drawing heatmaps into a folder being
    captioned (its advice, photos/heat/heat, met the same on the next run); a plain
    `caption photos/*` reported photos/heat/ as a folder without images. A folder of only
    heatmaps caption-attn drew, given among images, is left out with the heatmaps' note."""
    import cv2

    from caption_attn.images import mark_heatmap
    photos = tmp_path / "photos"
    (photos / "heat").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"x")
    png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes()
    (photos / "heat" / "a.png").write_bytes(mark_heatmap(png))
    args = [str(photos / "a.jpg"), str(photos / "heat")]
    for heatmaps in (str(photos / "heat"), None):
        drawn, unreadable = [], {}
        assert captioner.expand_image_args(args, heatmaps=heatmaps, unreadable=unreadable,
                                           drawn=drawn) == [args[0]]
        assert drawn == [str(photos / "heat" / "a.png")] and unreadable == {}
    with pytest.raises(UserError, match=r"heat: no image files in this folder besides 1 "
                                        r"heatmap\(s\) caption-attn drew$"):
        captioner.expand_image_args([str(photos / "heat")], unreadable={})
