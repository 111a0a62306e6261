import pytest

from caption_attn.errors import counted


@pytest.mark.parametrize("n, noun, plural, want", [
    (1, "image", "", "1 image"), (2, "image", "", "2 images"), (0, "image", "", "0 images"),
    ("1", "object", "", "1 object"), ("3", "object", "", "3 objects"),   # a JSON key
    (1, "test image", "", "1 test image"), (5, "test image", "", "5 test images"),
    (1, "child", "children", "1 child"), (2, "child", "children", "2 children"),
])
def test_counted_says_one_thing_or_many(n, noun, plural, want):
    """The one helper messages count things with (evaluate, export, images, data and
    captioner each spelt it out)."""
    assert counted(n, noun, plural) == want


@pytest.mark.parametrize("filename, where, code", [
    ("out/x.json", "out/x.json: ", 1), (None, "", 1)])
def test_the_cli_names_the_file_of_a_full_disk_and_says_to_free_space(
        monkeypatch, capsys, filename, where, code):
    """An OSError that reached the CLI's handler: a full disk with a file named was exit
    code 2 ("bad input, nothing was done"), and no message said what to do."""
    import errno

    from caption_attn import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    monkeypatch.setattr(cli, "cmd_inspect", full)
    assert cli.main(["inspect", "--captions", "c.json"]) == code
    assert capsys.readouterr().err == (
        f"caption-attn inspect: error: {where}No space left on device: free space "
        f"(or write elsewhere) and rerun this command\n")


def test_the_cli_names_the_file_of_other_os_errors(monkeypatch, capsys):
    import errno

    from caption_attn import cli

    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", "out/x.json")
    monkeypatch.setattr(cli, "cmd_inspect", denied)
    assert cli.main(["inspect", "--captions", "c.json"]) == 2
    assert capsys.readouterr().err == \
        "caption-attn inspect: error: out/x.json: Permission denied\n"


@pytest.mark.parametrize("code_name, exit_code", [
    ("EIO", 1), ("EROFS", 1), ("EFBIG", 1),            # a write that failed while it ran
    ("ENOENT", 2), ("EISDIR", 2), ("ENOTDIR", 2)])     # a path given that cannot be used
def test_the_cli_exit_code_of_a_named_file_says_bad_input_only_for_bad_paths(
        monkeypatch, capsys, code_name, exit_code):
    """Every atomic write names its file now: an I/O error or a file grown too large in the
    middle of a job became exit code 2 ("bad input, nothing was done") by that name alone."""
    import errno
    import os

    from caption_attn import cli
    code = getattr(errno, code_name)

    def failed(args):
        raise OSError(code, os.strerror(code), "out/x.json")
    monkeypatch.setattr(cli, "cmd_inspect", failed)
    assert cli.main(["inspect", "--captions", "c.json"]) == exit_code
    assert capsys.readouterr().err == \
        f"caption-attn inspect: error: out/x.json: {os.strerror(code)}\n"


def _advice_built_as_commands_run(monkeypatch, capsys, tmp_path):
    """(message, where, alternative) of every place that advises to free space and rerun with
    a message built as the command runs, each message built by the code that says it."""
    import errno
    import types

    import tensorflow as tf

    from caption_attn import cli, errors, export, train

    full = OSError(errno.ENOSPC, "No space left on device")
    said = [(str(export._write_failed(str(tmp_path / "out"), full)), "there",
             "make it writable")]
    for filename in ["out/x.json", None]:   # the CLI's handler, a file named or none
        def fails(args, filename=filename):
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        monkeypatch.setattr(cli, "cmd_inspect", fails)
        assert cli.main(["inspect", "--captions", "c.json"]) == 1
        said.append((capsys.readouterr().err, "", "write elsewhere"))

    def save(checkpoint_number):   # a checkpoint's save on a full disk
        raise tf.errors.ResourceExhaustedError(None, None, "ckpt; No space left on device")
    monkeypatch.setattr(train.checkpoints, "remove_failed_save", lambda *args: None)
    trainer = types.SimpleNamespace(
        _record_settings=lambda: None, step=tf.Variable(3),
        averaged=types.SimpleNamespace(put=lambda averaged: None),
        manager=types.SimpleNamespace(save=save, directory="ckpts", latest_checkpoint=None),
        cfg=types.SimpleNamespace(train=types.SimpleNamespace(strategy="one-device")),
        run=types.SimpleNamespace(checkpoints="ckpts"))
    with pytest.raises(errors.TrainingError) as e:
        train.Trainer._save(trainer)
    said.append((str(e.value), "there", "make it writable"))

    def trains(*args, **kwargs):   # a write of the run folder on a full disk
        raise OSError(errno.ENOSPC, "No space left on device", "run/history.json")
    with monkeypatch.context() as patch, pytest.raises(errors.TrainingError) as e:
        patch.setattr(train, "Trainer", trains)
        train._train_in(types.SimpleNamespace(path="run"), None, "run", None, None, None, None)
    said.append((str(e.value), "", "fix the folder"))
    return said


def test_every_message_advising_to_free_space_says_it_in_errors_words(monkeypatch, capsys,
                                                                       tmp_path):
    """"free space ... and rerun this command" was worded five ways (errors, feature_index,
    the CLI's stdout and OSError messages, export, train): each now says errors.py's
    `free_space`, only where and what else to do differing."""
    import errno

    from caption_attn import cli, errors, feature_index
    from caption_attn.errors import free_space
    assert free_space() == "free space there (or make its folder writable) and rerun this command"
    assert free_space("", "write elsewhere") == ("free space (or write elsewhere) and rerun "
                                                 "this command")
    full = OSError(errno.ENOSPC, "No space left on device")
    said = [(errors.FREE_SPACE, "there", "make its folder writable"),
            (str(errors.WriteFailed("x.json", full)), "there", "make its folder writable"),
            (feature_index.RERUN, "there", "make its folder writable"),
            (cli.STDOUT_ADVICE, "where it goes", "write it elsewhere"),
            *_advice_built_as_commands_run(monkeypatch, capsys, tmp_path)]
    assert len(said) == 9
    for message, where, alternative in said:
        assert free_space(where, alternative) in message
    # the messages built as a command runs take errors.py's words then, not their own
    monkeypatch.setattr(errors, "_FREE_SPACE", "<free{where}|{alternative}>")
    for message, where, alternative in _advice_built_as_commands_run(monkeypatch, capsys,
                                                                     tmp_path):
        assert f"<free{' ' + where if where else ''}|{alternative}>" in message
