"""Tests of `caption-attn inspect` through `cli.main` (output and exit codes)."""

import json
import os
import subprocess
import sys

import pytest

from caption_attn import cli
from caption_attn import config as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CAPTIONS = (
    "image,caption\n"
    "a.jpg,A red circle .\n"
    "b.jpg,\"a blue square, small\"\n"
    "a.jpg,a circle\n"
    "sub/c.jpg,green\n"
    "../escape.jpg,nope\n"
)


def make(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(CAPTIONS, encoding="utf-8")
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"x")
    (images / "sub" / "c.jpg").write_bytes(b"x")
    return str(path), str(images)


def test_inspect_text_report(tmp_path, capsys):
    path, images = make(tmp_path)
    code = cli.main(["inspect", "--captions", path, "--images", images])
    out = capsys.readouterr().out
    assert code == 0
    assert "flickr-csv" in out
    assert "images          3\n" in out and "captions        4\n" in out
    assert "missing images  1 (e.g. 'b.jpg')" in out
    assert "refused paths   1 (e.g. '../escape.jpg')" in out
    assert "incl. 4 special tokens" in out


def test_inspect_json_and_config_flags(tmp_path, capsys):
    path, images = make(tmp_path)
    code = cli.main(["inspect", "--captions", path, "--images", images, "--json",
                     "--val-fraction", "0", "--test-fraction", "0", "--min-count", "2"])
    stats = json.loads(capsys.readouterr().out)
    assert code == 0
    assert stats["splits"] == {"train": 3, "val": 0, "test": 0}
    assert stats["vocab_size"] == 4 + 2  # a (3x), circle (2x)
    assert stats["missing_images"] == {"count": 1, "examples": ["b.jpg"]}
    assert stats["caption_length"] == {"mean": 2.5, "p50": 2, "p95": 4, "max": 4}  # 3, 4, 2, 1


def test_inspect_says_when_the_vocabulary_holds_no_word(tmp_path, capsys):
    """--min-count above every word's count: "vocabulary 4 tokens", exit 0, a preview of what
    `train` fits, which refuses such a vocabulary (every word <unk>)."""
    path, _ = make(tmp_path)
    assert cli.main(["inspect", "--captions", path, "--min-count", "100"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("vocabulary"))
    assert row.endswith("4 tokens (train split, incl. 4 special tokens): no word (every one "
                        "seen fewer than --min-count 100 times), which `train` refuses"), row


def test_inspect_format_override(tmp_path, capsys):
    path, _ = make(tmp_path)
    code = cli.main(["inspect", "--captions", path, "--format", "flickr-token"])
    err = capsys.readouterr().err
    assert code == 2
    assert "captions.txt: line 1: expected `IMAGE#N<TAB>CAPTION`" in err


def test_inspect_refuses_split_fractions_for_a_file_with_its_own_split(tmp_path, capsys):
    """inspect printed the Karpathy file's own split for --val-fraction 0.5 (train refuses the
    flag): the user read counts of a split that training would not use."""
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a dog"}]},
        {"filename": "b.jpg", "split": "val", "sentences": [{"raw": "a cat"}]}]}))
    code = cli.main(["inspect", "--captions", str(path), "--val-fraction", "0.5"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.strip().endswith(
        f"--val-fraction 0.5 splits files without a split of their own, but {path} is a "
        f"karpathy file whose images carry their split, which train uses: leave "
        f"--val-fraction out (or edit the file's splits)")
    assert cli.main(["inspect", "--captions", str(path), "--test-fraction", "0.1"]) == 2
    assert "--test-fraction 0.1 splits files without" in capsys.readouterr().err
    # inspect's --seed seeds nothing but the split (train's seeds its model too): it was
    # ignored here, exit 0
    assert cli.main(["inspect", "--captions", str(path), "--seed", "3"]) == 2
    assert "--seed 3 seeds (in inspect, only) the split of files without a split of their " \
        "own" in capsys.readouterr().err
    # typed with its default value it was taken for a flag not given (and ignored)
    for flag, value in (("--val-fraction", C.DataConfig.val_fraction),
                        ("--test-fraction", C.DataConfig.test_fraction)):
        assert cli.main(["inspect", "--captions", str(path), flag, str(value)]) == 2
        assert f"{flag} {value} splits files without" in capsys.readouterr().err


def test_inspect_missing_captions_file(tmp_path, capsys):
    missing = str(tmp_path / "missing.json")
    code = cli.main(["inspect", "--captions", missing])
    captured = capsys.readouterr()
    assert code == 2
    assert missing in captured.err and "not found" in captured.err
    assert captured.out == ""


def test_inspect_missing_images_folder(tmp_path, capsys):
    path, _ = make(tmp_path)
    code = cli.main(["inspect", "--captions", path, "--images", str(tmp_path / "pics")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"--images {tmp_path / 'pics'}: images folder not found" in err
    (tmp_path / "pics").write_text("not a folder")
    assert cli.main(["inspect", "--captions", path, "--images", str(tmp_path / "pics")]) == 2
    assert f"--images {tmp_path / 'pics'}: a file, not a folder" in capsys.readouterr().err


def test_inspect_malformed_file(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [', encoding="utf-8")
    code = cli.main(["inspect", "--captions", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "broken.json: malformed JSON at line 1, column 13" in err


def test_a_closed_stdout_ends_quietly_with_the_status_of_sigpipe(tmp_path):
    # `caption-attn ... | head -n 2`: the reader is gone before the output is written. It
    # printed `error: Broken pipe` (exit 1) like a failure of the command itself.
    path, _ = make(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "caption_attn", "inspect", "--captions",
                               path], cwd=REPO, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == cli.EXIT_STDOUT_CLOSED == 141


def test_a_closed_stdout_ends_quietly_when_stdout_is_buffered(tmp_path):
    # Without PYTHONUNBUFFERED (a user's shell), stdout to a pipe is block-buffered: the
    # output went out in the interpreter's flush at exit, after main had returned, and the
    # broken pipe was 'Exception ignored ... BrokenPipeError' on stderr with exit 120.
    path, _ = make(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "caption_attn", "inspect", "--captions",
                               path], cwd=REPO, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60, env=env)
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == cli.EXIT_STDOUT_CLOSED


def test_an_error_after_output_to_a_closed_stdout_keeps_its_status(tmp_path):
    # A command that printed (block-buffered: no PYTHONUNBUFFERED) and then failed: the
    # buffer went out in the interpreter's flush at exit, to a reader gone away, which
    # printed 'Exception ignored ... BrokenPipeError' and exited 120 instead of the error's 2.
    path, _ = make(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    script = ("import sys\n"
              "from caption_attn import cli, data\n"
              "from caption_attn.errors import UserError\n"
              "def describe(*args, **kwargs):\n"
              "    print('some output')\n"
              "    raise UserError('it went wrong')\n"
              "data.describe = describe\n"
              f"sys.exit(cli.main(['inspect', '--captions', {path!r}]))\n")
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, env=env)
    finally:
        os.close(write_end)
    assert done.stderr == "caption-attn inspect: error: it went wrong\n"
    assert done.returncode == 2


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(cli, "stdout_is_closed", lambda: False)
    monkeypatch.setattr("caption_attn.data.describe", broken)
    path, _ = make(tmp_path)
    assert cli.main(["inspect", "--captions", path]) == 1
    assert "caption-attn inspect: error: Broken pipe" in capsys.readouterr().err


def test_a_broken_pipe_is_an_error_when_stdout_has_no_descriptor(tmp_path, capsys,
                                                                 monkeypatch):
    # stdout replaced by an object without a file descriptor (a notebook's, io.StringIO)
    # cannot be what broke: the error was swallowed as a quiet exit 141
    import io

    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr("caption_attn.data.describe", broken)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    path, _ = make(tmp_path)
    assert cli.main(["inspect", "--captions", path]) == 1
    assert "caption-attn inspect: error: Broken pipe" in capsys.readouterr().err


def test_file_names_in_error_messages_forge_no_lines_and_send_no_escapes(tmp_path, capsys,
                                                                         monkeypatch):
    """A file name holding a newline and an ESC sequence printed as it was: the newline
    started a line of its own (`caption-attn inspect: fake`) and the ESC drove the terminal.
    Written as \\n, \\x1b instead, so every error stays one line on stderr."""
    folder = tmp_path / "x\n\x1b[31mcaption-attn inspect: fake"
    folder.mkdir()
    assert cli.main(["inspect", "--captions", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err, err
    assert "x\\n\\x1b[31mcaption-attn inspect: fake: is a folder" in err
    # any other message naming a file: no terminal escape gets through main
    path, _ = make(tmp_path)
    assert cli.main(["inspect", "--captions", path, "--images",
                     str(tmp_path / "p\x1b]0;title\x07")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "p\\x1b]0;title\\x07" in err, err

    def fails(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "a\nb\x1b[2J.json")
    monkeypatch.setattr("caption_attn.data.describe", fails)
    assert cli.main(["inspect", "--captions", path]) == 2
    assert capsys.readouterr().err == ("caption-attn inspect: error: a\\nb\\x1b[2J.json: "
                                       "Permission denied\n")


def test_unreadable_images_are_reported_one_line_each():
    """`caption`'s `cannot read PATH: REASON` printed the path raw: "x.png<newline>
    caption-attn caption: ..." forged a line, an ESC sequence drove the terminal."""
    lines = cli.unreadable_lines({"/i/a\nb\x1b[2J.png": "missing", "/i/caf\udce9.png":
                                  "cannot decode (bad\rdata)"})
    assert lines == ["caption-attn caption: cannot read /i/a\\nb\\x1b[2J.png: missing",
                     "caption-attn caption: cannot read /i/caf\\xe9.png: cannot decode "
                     "(bad\\rdata)"]


def test_every_refusal_escapes_newlines_in_names_and_listings_keep_their_lines(tmp_path,
                                                                              capsys):
    """The CLI kept newlines in refusals (some list things a line each), so a message that
    named a file without escaping it itself printed a newline in the name raw: `caption --run
    "x<newline>caption-attn caption: fake"` forged a line. Listings are now `UserError.lines`,
    and everything else is one line."""
    from caption_attn.errors import UserError
    run = tmp_path / "x\ncaption-attn caption: fake"
    run.mkdir()
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    assert cli.main(["caption", "--run", str(run), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x\\ncaption-attn caption: fake" in err, err

    def refuse(*args, **kwargs):
        raise UserError("a\nb.json differs:", lines=["  one: 1 -> 2", "  two\x1b[2J: 3 -> 4",
                                                     "rerun with the same flags"])
    import caption_attn.data
    original, caption_attn.data.describe = caption_attn.data.describe, refuse
    try:
        path, _ = make(tmp_path)
        assert cli.main(["inspect", "--captions", path]) == 2
    finally:
        caption_attn.data.describe = original
    assert capsys.readouterr().err == ("caption-attn inspect: error: a\\nb.json differs:\n"
                                       "  one: 1 -> 2\n  two\\x1b[2J: 3 -> 4\n"
                                       "rerun with the same flags\n")
    assert str(UserError("m", lines=["  x", "y"])) == "m\n  x\ny"


def test_optional_numbers_take_none_as_help_shows_their_default():
    """--help shows "(default: none)" and refusals say "--scst-after none", but typing it
    was "invalid int value: 'none'"."""
    args = cli.build_parser().parse_args(["train", "--captions", "c", "--run", "r",
                                          "--scst-after", "none", "--max-steps", "None"])
    assert (args.scst_after, args.max_steps) == (None, None)
    assert {"scst_after", "max_steps"} <= args.given_flags
    assert cli.build_parser().parse_args(["train", "--captions", "c", "--run", "r",
                                          "--scst-after", "3"]).scst_after == 3
    assert cli.main(["train", "--captions", "c", "--run", "r", "--scst-after", "x"]) == 2


def test_extract_features_refuses_format_without_captions(tmp_path, capsys):
    """--format without --captions was silently ignored (every image was extracted)."""
    images = tmp_path / "images"
    images.mkdir()
    cache = tmp_path / "cache"
    assert cli.main(["extract-features", "--images", str(images), "--cache", str(cache),
                     "--weights", "random", "--format", "coco"]) == 2
    assert capsys.readouterr().err == (
        "caption-attn extract-features: error: --format coco is the format of --captions, "
        "which is not given (every image file under --images is extracted): give --captions "
        "FILE, or leave --format out\n")
    assert not cache.exists()


def test_extract_features_checks_images_and_cache_before_reading_captions(tmp_path, capsys,
                                                                          monkeypatch):
    """`--images TYPO` was said only after the caption file was read (a COCO file's
    seconds), TensorFlow imported and the cache folder made (and removed again)."""
    from caption_attn import data
    path, _ = make(tmp_path)
    monkeypatch.setattr(data, "load_captions", None)          # must not be reached
    cache = tmp_path / "cache"
    typo = tmp_path / "imgaes"
    assert cli.main(["extract-features", "--images", str(typo), "--captions", path,
                     "--cache", str(cache), "--weights", "random"]) == 2
    assert capsys.readouterr().err == \
        f"caption-attn extract-features: error: --images {typo}: not a folder\n"
    assert not cache.exists()


def _no_tensorflow(monkeypatch):
    """`quiet.import_tensorflow` failing the test: what is refused must be before it."""
    from caption_attn import quiet

    def imported(**_):
        raise AssertionError("TensorFlow imported before the flags and paths were checked")
    monkeypatch.setattr(quiet, "import_tensorflow", imported)


# a bad flag of each command that imports TensorFlow (c.json: never there)
REFUSED_BEFORE_TENSORFLOW = [
    ["train", "--captions", "c.json", "--run", "r", "--batch-size", "0"],
    ["train", "--captions", "c.json", "--run", "r", "--learning-rate", "1e-300"],
    ["train", "--captions", "c.json", "--run", "r", "--images", "imgs"],
    ["train", "--captions", "c.json", "--run", "r", "--cache", "c"],
    ["extract-features", "--images", ".", "--captions", "c.json"],
    ["caption", "--run", "r", "a.png", "--beam", "0"],
    ["evaluate", "--run", "r", "--max-length", "0"],
    ["export", "--run", "r", "--out", "o", "--beam", "0"],
    ["extract-features", "--images", "i", "--workers", "100000"],
    ["extract-features", "--images", "i", "--weights", "imagenet", "--seed", "7"],
    ["demo", "--num-images", "5"],
]


@pytest.mark.parametrize("argv", REFUSED_BEFORE_TENSORFLOW,
                         ids=[" ".join(a[:1] + a[-2:]) for a in REFUSED_BEFORE_TENSORFLOW])
def test_a_bad_flag_is_refused_before_tensorflow_is_imported(tmp_path, capsys, monkeypatch,
                                                             argv):
    """`train --batch-size 0` was refused only after `import tensorflow` (3-6 s) and its
    runtime's start: every flag a config checks is checked before, and so are the files and
    folders a command reads (`train --captions TYPO`)."""
    _no_tensorflow(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    # the flag, or a path given (train names its files absolute)
    said = err.partition(f"caption-attn {argv[0]}: error: ")[2]
    assert said.startswith(("--", f"{tmp_path}{os.sep}", "c.json: ")), err
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags,said", [
    (["--clip-norm", "1e-5"], "--clip-norm 1e-05: a clip norm below 0.001"),
    (["--scst-samples", "3"], "--scst-samples sets the self-critical epochs, which only"),
    (["--scst-after", "0", "--lr-schedule", "cosine"], "--lr-schedule cosine decays the"),
    (["--scst-after", "1", "--scst-samples", "10", "--batch-size", "8"],
     "--scst-samples 10 is more than --batch-size 8"),
    (["--scst-after", "1", "--bleu-images", "0"], "--scst-after 1: early stopping and"),
], ids=["clip-norm", "scst-samples-alone", "cosine-scst-after-0", "samples-over-batch",
        "no-bleu-images"])
def test_train_refuses_flag_combinations_before_tensorflow_and_its_files(
        tmp_path, capsys, monkeypatch, flags, said):
    """`train --clip-norm 1e-5` (and the other combinations `check_train_flags` refuses) was
    refused after `import tensorflow` (3-6 s) and the checks of the caption file and cache:
    a missing cache was reported first, and only the rerun met the flag's refusal."""
    _no_tensorflow(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--captions", "c.json", "--run", "r", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"caption-attn train: error: {said}"), err
    assert os.listdir(tmp_path) == []


def test_extract_features_refuses_a_weights_file_that_is_none_first(tmp_path, capsys,
                                                                     monkeypatch):
    """`extract-features --weights TYPO.h5` was refused after `import tensorflow` (3-6 s),
    the caption file read (seconds for COCO's) and the cache folder made and removed."""
    from caption_attn import data
    from caption_attn.backbone import IMAGENET_FILE
    _no_tensorflow(monkeypatch)
    monkeypatch.setattr(data, "load_captions", None)      # read: a TypeError, not exit 2
    captions, images = make(tmp_path)
    cache = tmp_path / "cache"
    for weights, why in ((str(tmp_path / "nope.h5"), "no such file"), (images, "is a folder")):
        assert cli.main(["extract-features", "--images", images, "--captions", captions,
                         "--cache", str(cache), "--weights", weights]) == 2
        assert capsys.readouterr().err == (
            f"caption-attn extract-features: error: --weights {weights}: {why} (expected "
            f"`imagenet`, `random` or the path of an InceptionV3 weights file such as "
            f"{IMAGENET_FILE})\n")
    assert not cache.exists()


def test_train_refuses_its_caption_file_cache_and_images_before_tensorflow(tmp_path, capsys,
                                                                           monkeypatch):
    """`train --captions TYPO` (and a --cache without a manifest, an --images that is no
    folder) was refused after `import tensorflow` (3-6 s), in the words said here."""
    from caption_attn import feature_cache
    _no_tensorflow(monkeypatch)
    captions, images = make(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()

    def refusal(*flags):
        assert cli.main(["train", "--run", str(tmp_path / "run"), *flags]) == 2
        return capsys.readouterr().err.removeprefix("caption-attn train: error: ")
    assert refusal("--captions", captions, "--cache", str(cache)) == (
        f"{cache}/manifest.json: no feature cache manifest (run `extract-features --cache "
        f"{cache}` first)\n")
    for missing in ("no such folder", "not a folder"):
        folder = tmp_path / "pics"
        assert refusal("--captions", captions, "--cache", str(cache), "--images",
                       str(folder)) == (
            f"--images {folder}: {missing} (the images folder of the caption file: leave "
            f"it out to use the one recorded in the cache)\n")
        folder.write_text("")
    read = []
    monkeypatch.setattr(feature_cache, "read_manifest", lambda cache: read.append(cache))
    monkeypatch.chdir(tmp_path)
    assert refusal("--captions", "typo.json", "--cache", "cache") == \
        f"{tmp_path}/typo.json: caption file not found\n"
    assert read == [str(cache)]
    assert refusal("--captions", images, "--cache", "cache") == \
        f"{images}: is a folder, expected a caption file\n"
    # all there: nothing refused (resumed or not, train reads all three)
    args = cli.build_parser().parse_args(["train", "--captions", captions, "--cache", "cache",
                                          "--run", "run", "--images", images])
    cli.check_flags(args)
    assert not (tmp_path / "run").exists()


def test_extract_features_refuses_a_missing_caption_file_before_tensorflow(tmp_path, capsys,
                                                                           monkeypatch):
    _no_tensorflow(monkeypatch)
    _, images = make(tmp_path)
    cache, typo = tmp_path / "cache", tmp_path / "typo.json"
    assert cli.main(["extract-features", "--images", images, "--captions", str(typo),
                     "--cache", str(cache), "--weights", "random"]) == 2
    assert capsys.readouterr().err == \
        f"caption-attn extract-features: error: {typo}: caption file not found\n"
    assert not cache.exists()


def test_caption_images_on_both_sides_of_a_flag_get_a_hint(tmp_path, capsys):
    """`caption a.png --run R b.png` said only "unrecognized arguments: b.png"."""
    assert cli.main(["caption", "a.png", "--run", str(tmp_path), "b.png"]) == 2
    err = capsys.readouterr().err
    assert err.rstrip().endswith("error: unrecognized arguments: b.png; give all the images "
                                 "together, after the flags (caption --run DIR a.png b.png) "
                                 "or before them"), err


def _closing(redirections: str, *command) -> list:
    """`command` run by sh with `redirections` (`>&-`: stdout closed before Python starts;
    no `preexec_fn`, unsafe in a process with threads)."""
    return ["sh", "-c", f'exec "$0" "$@" {redirections}', *command]


def test_a_command_started_with_stdout_closed_ends_well(tmp_path):
    """`make-shapes ... >&-` wrote the dataset, then ended in an AttributeError traceback
    (exit 1): Python starts with sys.stdout None when descriptor 1 is closed."""
    done = subprocess.run(_closing(">&-", sys.executable, "-m", "caption_attn", "make-shapes",
                                   str(tmp_path / "d"), "--num-images", "4", "--image-size",
                                   "64"),
                          cwd=REPO, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert len(os.listdir(tmp_path / "d" / "images")) == 4


def test_closed_standard_streams_are_opened_on_dev_null(tmp_path):
    """With stderr closed (`2>&-`) every TensorFlow command exited 1 without a word: its
    first flush of sys.stderr, None then, raised where nothing could show it; and the files
    the program opened took descriptor 2, where TensorFlow's C++ logging writes."""
    out = tmp_path / "out.txt"
    code = ("import os, sys\n"
            "before = [sys.stdin is None, sys.stdout is None, sys.stderr is None]\n"
            "from caption_attn import cli\n"
            "cli._open_closed_standard_streams()\n"
            "sys.stderr.write('x'); sys.stderr.flush(); print('y', flush=True)\n"
            "after = [os.path.realpath(f'/proc/self/fd/{fd}') for fd in (0, 1, 2)]\n"
            f"open({str(out)!r}, 'w').write(repr((before, after)))\n")
    done = subprocess.run(_closing("<&- >&- 2>&-", sys.executable, "-c", code), cwd=REPO,
                          timeout=60)
    assert done.returncode == 0
    assert out.read_text() == repr(([True, True, True], [os.devnull] * 3))


def test_an_unknown_flag_is_refused_by_the_command_that_got_it(tmp_path, capsys):
    """`evaluate --run R --json` printed the top-level usage and "caption-attn: error:
    unrecognized arguments", naming no command: the user had to guess whose flags to read."""
    path, _ = make(tmp_path)
    assert cli.main(["inspect", "--captions", path, "--bogus", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: caption-attn inspect ")
    assert err.endswith("caption-attn inspect: error: unrecognized arguments: --bogus 1\n")


def test_inspect_json_names_a_file_whose_name_is_not_utf8_in_valid_utf8(tmp_path, capsys):
    # --captions b"capt\xe9.txt": the JSON held "capt\udce9.txt", which cannot be encoded
    # (an error on a strict stdout, a byte that is no UTF-8 on a lenient one)
    path, images = make(tmp_path)
    latin = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"capt\xe9.txt"))
    os.rename(path, latin)
    assert cli.main(["inspect", "--captions", latin, "--images", images, "--json"]) == 0
    out = capsys.readouterr().out
    out.encode("utf-8")                                     # strict
    assert json.loads(out)["file"] == f"{tmp_path}/capt\\xe9.txt"


def test_a_path_not_utf8_printed_to_stdout_ends_no_command_in_a_traceback(tmp_path):
    """A summary naming a path whose bytes are not UTF-8 (export's agreement note naming the
    run's images folder b'caf\\xe9') raised UnicodeEncodeError on a UTF-8 stdout after the
    command's work (stdout was strict). It writes the path's own bytes, as `ls` does."""
    code = ("import sys\n"
            "from caption_attn import cli\n"
            "sys.argv = ['caption-attn', '--version']\n"
            "cli.main = lambda: print('images caf\\udce9') or 0\n"
            "sys.exit(cli.entry())\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"},
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"images caf\xe9\n"
