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
