"""Tests of the atomic writer (caption_attn/fileio.py)."""

import os

import pytest


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path):
    from caption_attn.fileio import atomic_path, write_bytes_atomic
    path = str(tmp_path / "x.npy")

    def payload():
        yield b"partial"
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(path, payload())
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError):
        with atomic_path(path, ".weights.h5") as tmp:     # a writer that fails half-way
            assert tmp.endswith(".weights.h5") and os.path.basename(tmp).startswith(".x.npy")
            open(tmp, "wb").close()
            raise ValueError("cannot save")
    assert os.listdir(tmp_path) == []
    written = write_bytes_atomic(str(tmp_path / "new" / "x.npy"), [b"do", b"ne"])  # makes it
    assert os.listdir(tmp_path / "new") == ["x.npy"]
    # the stat of the file written, taken before the rename (an index entry records it)
    now = os.stat(tmp_path / "new" / "x.npy")
    assert (written.st_ino, written.st_size, written.st_mtime_ns) == \
        (now.st_ino, 4, now.st_mtime_ns)


def test_json_nested_too_deeply_is_a_one_line_error(tmp_path):
    """JSON nested thousands of levels deep (a broken generator, a hostile file) raised a
    RecursionError traceback from the JSON decoder."""
    from caption_attn.errors import UserError
    from caption_attn.fileio import read_json
    path = tmp_path / "deep.json"
    path.write_text('{"annotations": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(UserError, match=r"deep\.json: .*nested too deeply"):
        read_json(str(path))


def test_a_key_twice_in_one_object_is_an_error_naming_it(tmp_path, capsys):
    """Two "annotations" lists in a hand-merged COCO file: JSON readers keep the last one, so
    half the captions were dropped without a word."""
    from caption_attn import cli
    from caption_attn.errors import UserError
    from caption_attn.fileio import read_json
    path = tmp_path / "captions.json"
    path.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}],\n'
                    ' "annotations": [{"image_id": 1, "id": 1, "caption": "a dog"}],\n'
                    ' "annotations": [{"image_id": 1, "id": 2, "caption": "a cat"}]}')
    with pytest.raises(UserError, match=r"captions\.json: the key 'annotations' appears twice "
                                        r"in one object; .* silently lost"):
        read_json(str(path))
    assert cli.main(["inspect", "--captions", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the key 'annotations' appears twice" in err
    # inside a record: the record's plain values say which one
    path.write_text('[{"id": 7, "file_name": "b.jpg", "caption": "x", "caption": "y"}]')
    with pytest.raises(UserError, match=r"the key 'caption' appears twice in one object \(\{"
                                        r"'id': 7, 'file_name': 'b\.jpg', 'caption': 'y', "
                                        r"\.\.\.\}\)"):
        read_json(str(path))
    path.write_text('{"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}]}')      # not duplicates
    assert read_json(str(path)) == {"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}]}


def test_a_file_name_in_a_read_error_stays_on_one_line(tmp_path):
    from caption_attn import fileio
    from caption_attn.errors import UserError
    # `cannot read PATH`: a newline in the name started a forged line of its own
    folder = tmp_path / "a\nb\x1b[31m.json"
    folder.mkdir()
    with pytest.raises(UserError) as e:
        fileio.read_json(str(folder))
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    assert str(e.value).startswith(f"{tmp_path}/a\\nb\\x1b[31m.json: cannot read (")


_FILL_THE_DISK = """
import sys
import keras
from caption_attn import fileio
fileio._nbytes = lambda variable: 0      # the room check passes: the disk fills while writing
model = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(1000)])        # 4 MB
try:
    with fileio.keras_file_atomic(sys.argv[1], ".weights.h5", model) as tmp:
        model.save_weights(tmp)
except OSError as e:
    print("error", e.errno, file=sys.stderr)
    sys.exit(fileio.exit_past_hdf5(1))
"""


def test_a_keras_write_that_fills_the_disk_ends_with_its_own_status(tmp_path):
    """HDF5 crashed the interpreter at exit (segmentation fault, status 139) after a write
    that filled the disk, below the command's error message of status 1."""
    import errno
    import subprocess
    import sys

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
                      capture_output=True).returncode:
        pytest.skip("needs a small file system: mounting a 2 MB tmpfs is not permitted here")
    try:
        target = str(small / "best.weights.h5")
        done = subprocess.run([sys.executable, "-c", _FILL_THE_DISK, target],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        assert f"error {errno.ENOSPC}" in done.stderr
        assert done.returncode == 1, done.stderr[-2000:]
        assert os.listdir(small) == []                       # no temporary file left either
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


_ENTRY = """
import atexit, sys
from caption_attn import cli, fileio
fileio._hdf5_write_failed = sys.argv[1] == "failed"
atexit.register(print, "exit handlers ran", flush=True)   # as HDF5's crashing one would
sys.argv = ["caption-attn", "inspect", "--captions", sys.argv[2]]
sys.exit(cli.entry())
"""


@pytest.mark.parametrize("h5", ["failed", "fine"])
def test_the_program_ends_past_exit_handlers_only_after_a_failed_hdf5_write(tmp_path, h5):
    import subprocess
    import sys

    missing = str(tmp_path / "missing.json")
    done = subprocess.run([sys.executable, "-c", _ENTRY, h5, missing], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2                          # inspect's status for a missing file
    assert missing in done.stderr and "not found" in done.stderr   # flushed before os._exit
    assert ("exit handlers ran" in done.stdout) == (h5 == "fine")


def test_a_signal_during_a_keras_write_lands_once_the_file_is_complete(tmp_path):
    """A SIGTERM whose handler raised inside h5py's writer (CI: `train` stopped while it
    saved the best model) came out as h5py's "TypeError: Operation not defined for data type
    class", exit 1 and a traceback instead of the stop. The write now finishes and is renamed
    into place first; the signal is then delivered, to the handler that was in place."""
    import signal

    import keras
    import numpy as np

    from caption_attn.fileio import keras_file_atomic

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop(signum)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = str(tmp_path / "best.weights.h5")
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stop):
            with keras_file_atomic(path, ".weights.h5", model) as tmp:
                os.kill(os.getpid(), signal.SIGTERM)        # arrives as the write begins
                model.save_weights(tmp)
        assert signal.getsignal(signal.SIGTERM) is stop      # the handler put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert os.listdir(tmp_path) == ["best.weights.h5"]       # complete, nothing else left
    loaded = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    loaded.load_weights(path)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_signal_as_an_exclusive_lock_is_given_up_still_removes_its_file(tmp_path,
                                                                            monkeypatch,
                                                                            default_sigint):
    """A Ctrl-C landing as an exclusive holder removed its lock file (`holding_lock` removes
    it as it ends, so that no lock file is left beside the user's files: `caption --out`,
    `export`) raised before the removal and left the file behind."""
    import signal

    from caption_attn import fileio

    path = str(tmp_path / ".out.lock")
    remove = os.remove

    def signalled_remove(name, *args, **kwargs):
        if name == path:
            signal.raise_signal(signal.SIGINT)                # arrives as it is removed
        return remove(name, *args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        with fileio.holding_lock(path, lambda who: f"in use{who}"):
            assert os.path.exists(path)
            monkeypatch.setattr(os, "remove", signalled_remove)
    assert os.listdir(tmp_path) == []


# file names whose bytes are not UTF-8 (Python holds them with surrogate escapes): Latin-1,
# a lone byte, a sequence cut short (at the end too), an encoded surrogate, a control byte
NOT_UTF8_NAMES = [b"/data/caf\xe9", b"\xff", b"/a/\xe9\x82x", b"/a/x\xc3", b"\xed\xa0\x80",
                  b"/a\nb\xe9/c"]


def test_json_of_file_names_gives_back_their_exact_bytes(tmp_path):
    """A file the tool reads back (a manifest, a run's config.json) holding a path whose bytes
    are not UTF-8 gives back the very path: the file holds the name's own bytes, as `ls`
    shows them (strict UTF-8 could not write it: UnicodeEncodeError)."""
    from caption_attn.fileio import read_json, write_json_atomic
    names = [os.fsdecode(n) for n in NOT_UTF8_NAMES]
    obj = {"images_dir": names[0], "images_dirs": names, "count": 3, "name": "café"}
    path = str(tmp_path / "manifest.json")
    write_json_atomic(path, obj, file_names=True)
    with open(path, "rb") as f:
        raw = f.read()
    assert b'"images_dir": "/data/caf\xe9"' in raw and "café".encode() in raw
    assert read_json(path, file_names=True) == obj


def test_json_of_file_names_still_names_a_file_in_another_encoding(tmp_path):
    """Read as a file of names, a file saved as UTF-16 is still refused as such (its bytes
    are not a name's), and by default a byte that is not UTF-8 is still refused."""
    from caption_attn.errors import UserError
    from caption_attn.fileio import read_json
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes('{"a": 1}'.encode("utf-16"))
    with pytest.raises(UserError, match=r"utf16\.json: UTF-16LE text \(it starts with the "
                                        r"byte order mark ff fe\), not UTF-8"):
        read_json(str(utf16), file_names=True)
    utf16.write_bytes('{"a": 1}'.encode("utf-16-le"))
    with pytest.raises(UserError, match=r"utf16\.json: holds NUL bytes"):
        read_json(str(utf16), file_names=True)
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"a": "caf\xe9"}')
    with pytest.raises(UserError, match=r"latin1\.json: not valid UTF-8 at byte 10"):
        read_json(str(latin1))
    assert read_json(str(latin1), file_names=True) == {"a": "caf\udce9"}


class _FullDisk:
    """A file whose writes (or flush) fail as on a full disk: OSError(ENOSPC) naming no file,
    as the OS' write(2) and fsync(2) raise it."""

    def __init__(self, path, mode="r", *args, **kwargs):
        self._f = open(path, mode, *args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def fileno(self):
        return self._f.fileno()

    def write(self, data):
        import errno
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = write


@pytest.mark.parametrize("writer", ["bytes", "json", "fsync"])
def test_a_write_that_fills_the_disk_names_the_file_and_leaves_no_folder(tmp_path, monkeypatch,
                                                                         writer):
    """A heatmap whose write filled the disk ended `train` with "RUN: No space left on
    device" (the OSError named no file: write(2)'s never does), and left the epoch's folder
    that `atomic_path` had made empty, which the rerun took for heatmaps written. The error
    names the file the writer could not write; the folders made for it are removed again."""
    import errno

    from caption_attn import fileio
    path = str(tmp_path / "attention" / "epoch_2" / "cat.png")
    if writer == "fsync":
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(fileio.os, "fsync", fsync)
    else:
        monkeypatch.setattr(fileio, "open", _FullDisk, raising=False)
    with pytest.raises(OSError) as e:
        if writer == "json":
            fileio.write_json_atomic(path, {"a": 1})
        else:
            fileio.write_bytes_atomic(path, b"png", fsync=writer == "fsync")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, path)
    assert str(e.value) == f"[Errno 28] No space left on device: '{path}'"
    assert os.listdir(tmp_path) == []              # neither the temporary file nor its folders


def test_a_failed_write_keeps_a_folder_that_was_there_or_holds_files(tmp_path, monkeypatch):
    import errno

    from caption_attn import fileio
    folder = tmp_path / "epoch_2"
    fileio.write_bytes_atomic(str(folder / "cat.png"), b"png")
    monkeypatch.setattr(fileio, "open", _FullDisk, raising=False)
    with pytest.raises(OSError) as e:
        fileio.write_bytes_atomic(str(folder / "dog.png"), b"png")
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(folder) == ["cat.png"]
    with pytest.raises(OSError):
        fileio.write_bytes_atomic(str(tmp_path / "empty" / "x.png"), b"png")
    assert sorted(os.listdir(tmp_path)) == ["epoch_2"]
    (tmp_path / "mine").mkdir()                    # a folder that was there stays, empty
    with pytest.raises(OSError):
        fileio.write_bytes_atomic(str(tmp_path / "mine" / "x.png"), b"png")
    assert sorted(os.listdir(tmp_path)) == ["epoch_2", "mine"]


def test_an_error_that_is_not_of_the_file_keeps_its_own_text(tmp_path):
    """h5py's OSError (no errno: its message names the file and the reason, which `train`
    reads) passes through `atomic_path` as it was."""
    from caption_attn import fileio
    error = OSError("Can't synchronously write data (filename = 'x', errno = 28)")
    with pytest.raises(OSError) as e:
        with fileio.atomic_path(str(tmp_path / "best.weights.h5"), ".weights.h5"):
            raise error
    assert e.value is error and e.value.filename is None and str(e.value) == error.args[0]


@pytest.mark.parametrize("maker", ["atomic_path", "holding_lock"])
def test_a_failure_keeps_a_folder_another_process_made_at_the_same_moment(tmp_path, monkeypatch,
                                                                          maker):
    """The folders a path goes into were listed as missing before they were made, so one that
    another process (another extract-features shard) made at the same moment was counted as
    made here, and a failed write (or a lock's end) removed it under the other process. Only
    the folders this process's own mkdir made are removed again."""
    from caption_attn import fileio
    ours, theirs = tmp_path / "a" / "b", tmp_path / "a"
    mkdir = os.mkdir

    def racing_mkdir(name, *args, **kwargs):
        if os.fspath(name) == str(theirs) and not theirs.exists():
            mkdir(name, *args, **kwargs)            # the other process is first
        return mkdir(name, *args, **kwargs)        # FileExistsError for ours then

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    with pytest.raises(ValueError):
        if maker == "atomic_path":
            with fileio.atomic_path(str(ours / "x.npy")):
                assert ours.is_dir()
                raise ValueError("the write failed")
        else:
            with fileio.holding_lock(str(ours / ".x.lock"), lambda who: "in use",
                                     make_folder=True):
                assert ours.is_dir()
                raise ValueError("the command failed")
    monkeypatch.undo()
    assert theirs.is_dir() and os.listdir(theirs) == []   # theirs stays; ours is gone


def test_folders_made_after_another_process_removed_one_above_still_count_as_made(tmp_path,
                                                                                monkeypatch):
    """A folder seen as there (`a`) was removed by another process (its failed write removing
    the folders it made) before the folder below it was made: mkdir said FileNotFoundError,
    and the folders `os.makedirs` then made were not counted, so a failed write left them
    behind, empty. They are listed again and made one at a time, and count as made."""
    from caption_attn import fileio
    (tmp_path / "a").mkdir()
    target = tmp_path / "a" / "b" / "c"
    mkdir = os.mkdir
    removed = []

    def racing_mkdir(name, *args, **kwargs):
        if not removed:
            os.rmdir(tmp_path / "a")               # the other process removes its own `a`
            removed.append(1)
        return mkdir(name, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    made = fileio.make_folders(str(target))
    monkeypatch.undo()
    assert target.is_dir()
    assert made == [str(target), str(target.parent), str(tmp_path / "a")]
    fileio.remove_folders(made)
    assert os.listdir(tmp_path) == []


def test_a_file_where_a_folder_is_expected_is_still_refused(tmp_path):
    from caption_attn import fileio
    (tmp_path / "f").write_text("")
    for path, error in [(tmp_path / "f" / "x.npy", FileExistsError),
                        (tmp_path / "f" / "d" / "x.npy", NotADirectoryError)]:
        with pytest.raises(error):
            with fileio.atomic_path(str(path)):
                pass
    assert os.listdir(tmp_path) == ["f"]


def test_usable_cores_are_the_ones_this_process_may_run_on(monkeypatch):
    """`extract-features --workers 0` took os.cpu_count(): 64 decode threads (and 64 full-size
    decodes in memory) on a 64-core node whose job was given 4 cores (taskset, Slurm)."""
    from caption_attn import fileio
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert fileio.usable_cores() == 4
    monkeypatch.delattr(os, "sched_getaffinity")                      # not Linux
    assert fileio.usable_cores() == 64
