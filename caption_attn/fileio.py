"""File I/O shared by every stage: atomic writes (temp file + rename) and JSON reading whose
errors name the file, line and column."""

from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import unicodedata
from typing import Any, Iterable, Union

from caption_attn import interrupts
from caption_attn.errors import UserError

# A `\uD800`-`\uDFFF` escape that is not half of a surrogate pair: json accepts it, but the
# string it makes cannot be encoded as UTF-8 again (hashing, vocab.json, any output).
_LONE_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                             r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")
HOST = socket.gethostname().replace("/", "_") or "localhost"


def usable_cores() -> int:
    """The CPU cores this process may run on (taskset, Slurm's --cpus-per-task, a container's
    cpuset), not the machine's: `os.cpu_count()` started 64 decode threads on a 64-core node
    that gave the job 4."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def temp_name(path: str, suffix: str = "") -> str:
    """`.<name>.tmp.<pid>.<host><suffix>` next to `path`: hidden, and unique to this process
    on this host (several machines may write into one shared feature cache)."""
    directory, base = os.path.split(os.path.abspath(path))
    return os.path.join(directory, _temp_base(base, os.getpid()) + suffix)


def _temp_base(base: str, pid) -> str:
    return f".{base}.tmp.{pid}.{HOST}"


def longest_temp_name(name: str) -> int:
    """Bytes of the longest `temp_name` of a file called `name` (a pid of up to 7 digits): a
    name that fits the file system's limit may still make a temporary name that does not."""
    return len(_temp_base(name, "9" * 7).encode("utf-8", "surrogateescape"))


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", temp_of: str = ""):
    """Yields a temporary path (`temp_name`) to write; renamed onto `path` when the block
    succeeds, removed when it fails, so a crash or kill never leaves a half-written file under
    the final name. Creates the parent folder. `suffix` is for writers that insist on one
    (Keras: `.keras`, `.weights.h5`); `temp_of` names the temporary file after another name
    in the same folder (one a reader of the folder must not take for `path`'s kind).

    A failure removes the folders made for `path` again when they are still empty (a
    heatmap that filled the disk left its epoch's folder empty, which a rerun took for
    heatmaps written); an OSError naming no file (write(2), fsync(2) on a full disk) is
    given `path` as its filename, so its message names the file that could not be
    written, not its temporary name nor none."""
    made = make_folders(os.path.dirname(os.path.abspath(path)))
    tmp = temp_name(os.path.join(os.path.dirname(path), temp_of) if temp_of else path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        remove_folders(made)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            e.filename = path   # (h5py's, errno None: its text names the file, kept as it is)
        raise


def make_folders(folder: str) -> list[str]:
    """Make `folder` and the folders above it that are missing; returns those this call made,
    deepest first (for `remove_folders`). They are made one at a time from the top, and only
    those whose mkdir succeeded count: one that another process (another extract-features
    shard) made at the same moment is its, and is not removed under it. One seen as there
    but removed by another process before the folder below it was made (its failed write
    removed the folders it made) is listed again and made here. A file where a folder is
    expected raises as `os.makedirs` does (FileExistsError, NotADirectoryError), having
    removed the folders it made.

    Not covered: another process may still remove a folder this call found there, after this
    call returned (its failed write, while the folder was still empty); the write into it
    then fails with FileNotFoundError, naming the file."""
    made = []
    for _ in range(3):   # listed again when a folder above vanished in between
        missing, above = [], folder
        while not os.path.lexists(above) and above != os.path.dirname(above):
            missing.append(above)
            above = os.path.dirname(above)
        try:
            for name in reversed(missing):   # from the top
                try:
                    os.mkdir(name)
                except FileExistsError:      # made by another process just now: not ours
                    continue
                made.insert(0, name)
        except FileNotFoundError:            # a folder above was removed meanwhile
            continue
        except OSError:                      # os.makedirs below says why
            pass
        break
    try:
        os.makedirs(folder, exist_ok=True)
    except BaseException:
        remove_folders(made)
        raise
    return made


def remove_folders(made: list[str]) -> None:
    """Remove the folders `make_folders` made (deepest first) again while they are empty."""
    for folder in made:
        try:
            os.rmdir(folder)
        except OSError:   # not empty: another file was written there
            break


# An h5py write through `keras_file_atomic` failed (see `exit_past_hdf5`).
_hdf5_write_failed = False


def hdf5_write_failed() -> bool:
    """Whether an h5py write through `keras_file_atomic` failed in this process."""
    return _hdf5_write_failed


@contextlib.contextmanager
def keras_file_atomic(path: str, suffix: str, model, copies: int = 1):
    """`atomic_path` for Keras' h5py writers (`save_weights`, `save`), after checking that
    `path`'s filesystem has room for `copies` of `model`'s weights (plus 10 % and 1 MB).

    A write that fills the disk leaves HDF5's library in a state that crashes the interpreter
    at exit (a segmentation fault, exit 139, in HDF5's own exit handler, after the command's
    error message). A disk already too full is refused here instead, as the OSError of a full
    disk naming `path`; a disk that fills during the write (another process writing) sets
    `hdf5_write_failed()`, for `exit_past_hdf5`.

    Ctrl-C and SIGTERM wait for the write's end (`interrupts.held`): a handler that raises
    inside h5py's writer came out as h5py's "TypeError: Operation not defined for data type
    class" (exit 1, a traceback) instead of the stop; the file is written and renamed into
    place, then the signal is delivered (a second one still stops at once)."""
    global _hdf5_write_failed
    needed = int(copies * sum(_nbytes(v) for v in model.weights) * 1.1) + 2 ** 20
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({needed / 1e6:.0f} MB "
                                    f"needed, {free / 1e6:.0f} MB free)", path)
    try:
        with interrupts.held(), atomic_path(path, suffix) as tmp:
            yield tmp
    except OSError:
        _hdf5_write_failed = True
        raise


def exit_past_hdf5(code: int) -> int:
    """`code`, for a process about to end with it; after a failed h5py write
    (`hdf5_write_failed()`) the process ends here instead (`os._exit`, its output flushed),
    past the exit handler of HDF5 that would crash it: the command's exit status stays the
    one its error message goes with, not 139."""
    if _hdf5_write_failed:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


def _nbytes(variable) -> int:
    import numpy as np  # here: every CLI start imports this module, and numpy takes 0.1 s
    return int(np.prod(variable.shape)) * np.dtype(str(variable.dtype)).itemsize


def write_bytes_atomic(path: str, payload: Union[bytes, Iterable[bytes]],
                       fsync: bool = False) -> os.stat_result:
    """Write `payload` (bytes or an iterable of bytes) to `path` through `atomic_path`;
    returns the stat of the file written, taken before the rename: a stat of `path` after
    it could be of another process's file renamed there meanwhile (an extraction's index
    entry then recorded that file as this image's features)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for part in [payload] if isinstance(payload, bytes) else payload:
            f.write(part)
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        written = os.fstat(f.fileno())
    return written


def remove_path(path: str) -> None:
    """Delete `path`: a folder with all it holds, or a file or a symlink (the link itself,
    never what it points to: rmtree refuses a link, and its target is not ours to delete)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it, symlinks on the way followed on both
    (`--run link/run` with link -> the cache is inside the cache)."""
    folder = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def file_identity(path: str):
    """(inode, mtime_ns, size) of `path`, None when it cannot be stat'ed: a file replaced or
    rewritten (train's atomic renames) gets another one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def file_digest(path: str, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (read in 1 MiB blocks); raises OSError."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str, obj: Any, file_names: bool = False) -> None:
    """Write JSON (indented, UTF-8) through `atomic_path`, synced to disk before the rename.

    `file_names`: its strings may hold file names whose bytes are not UTF-8 (Linux allows
    any; Python holds b'caf\\xe9' as 'caf\\udce9'), written as those very bytes, as `ls`
    shows them, so that `read_json(path, file_names=True)` gives back the exact path (a
    path read back changed would make the cache or the run look moved). Only then is the
    file not strict UTF-8: for files the tool reads back; outputs for people and other tools
    write such names as \\xNN instead (`printable_json`). Without it, such a string is a
    UnicodeEncodeError."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8", _errors(file_names)), fsync=True)


def _errors(file_names: bool) -> str:
    """The codec error handler of UTF-8 text that may hold file names' other bytes."""
    return "surrogateescape" if file_names else "strict"


# Byte order marks of other Unicode encodings (UTF-32 first: its little-endian mark begins
# with UTF-16's), with the name `iconv -f` knows them by.
_OTHER_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32LE"), (codecs.BOM_UTF32_BE, "UTF-32BE"),
               (codecs.BOM_UTF16_LE, "UTF-16LE"), (codecs.BOM_UTF16_BE, "UTF-16BE"))


def decode_utf8(path: str, raw: bytes, file_names: bool = False) -> str:
    """`raw`, the bytes of file `path`, as UTF-8 text (a leading BOM removed). Text in another
    encoding is a `UserError` naming the file, the encoding when its byte order mark or NUL
    bytes tell it (Windows tools save "Unicode" as UTF-16), and how to save it as UTF-8.
    `file_names`: bytes that are not UTF-8 are a file name's (`write_json_atomic`), held as
    surrogate escapes as Python holds such names; UTF-16 and UTF-32 are still refused."""
    for bom, encoding in _OTHER_BOMS:
        if raw.startswith(bom):
            raise UserError(f"{path}: {encoding} text (it starts with the byte order mark "
                            f"{bom.hex(' ')}), not UTF-8; save it as UTF-8, e.g. `iconv -f "
                            f"{encoding[:6]} -t UTF-8 {path} > NEW_FILE`") from None
    try:
        text = raw.decode("utf-8", _errors(file_names))
    except UnicodeDecodeError as e:
        before = raw[:e.start]   # lines as universal newlines read them (CR, LF, CR LF)
        line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        raise UserError(f"{path}: not valid UTF-8 at byte {e.start} (line {line}): byte "
                        f"0x{raw[e.start]:02x}; save the file as UTF-8") from None
    if "\0" in text:   # UTF-16 of ASCII text is valid UTF-8, with a NUL after every letter
        raise UserError(f"{path}: holds NUL bytes (the first at byte {raw.index(0)}): UTF-16 "
                        f"or UTF-32 text without a byte order mark, or not a text file; save "
                        f"it as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text


def parse_json(path: str, text: str, file_names: bool = False) -> Any:
    """JSON `text` read from `path`; malformed JSON is a `UserError` naming the place.
    `file_names`: `text` may hold file names' surrogate escapes (`decode_utf8`)."""
    try:
        obj = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except _DuplicateKey as e:
        raise UserError(f"{path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: "
                        f"{e.msg}") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to be read (thousands of levels of "
                        f"[ or {{); not a caption_attn file?") from None
    _check_surrogates(path, text, obj, file_names)
    return obj


class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list) -> dict:
    """`json.loads`' object hook: a key given twice in one object is an error (JSON readers
    silently keep the last value: two "images" lists of a hand-merged file, or an image's
    "captions" given twice, would lose one without a word)."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen = set()
    for key, _ in pairs:
        if key in seen:
            break
        seen.add(key)
    where = ", ".join(f"{k!r}: {v!r}" for k, v in obj.items()
                      if isinstance(v, (str, int, float)) and not isinstance(v, bool))[:120]
    raise _DuplicateKey(f"the key {key!r} appears twice in one object"
                        + (f" ({{{where}, ...}})" if where else "")
                        + "; JSON readers keep only its last value, so the first would be "
                          "silently lost: merge or remove one")


def _check_surrogates(path: str, text: str, obj: Any, file_names: bool) -> None:
    """`UserError` at the first lone surrogate escape of `text` if `obj` holds one (the regex
    alone could be fooled by an escaped backslash before `u`, so the parsed value decides)."""
    if "\\u" not in text or not _LONE_SURROGATE.search(text):
        return
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8", _errors(file_names))
    except UnicodeEncodeError:
        for match in _LONE_SURROGATE.finditer(text):
            # the escape is real when an even number of backslashes precede it
            run = len(text[:match.start()]) - len(text[:match.start()].rstrip("\\"))
            if run % 2 == 0:
                line = text.count("\n", 0, match.start()) + 1
                column = match.start() - text.rfind("\n", 0, match.start())
                raise UserError(f"{path}: line {line}, column {column}: {match.group()} is half "
                                f"of a UTF-16 surrogate pair, not a character; fix the "
                                f"text there") from None
        raise UserError(f"{path}: holds a lone UTF-16 surrogate escape (\\uD800-\\uDFFF), not "
                        f"a character") from None


def one_line(text: str, keep: str = "") -> str:
    """`text` (a file name, or a message naming files) with its control characters but those
    in `keep` written as \\n, \\t, \\x1b: `Captions for image a<newline>b.png:` broke the
    output's one line per header, `cannot read a<newline>b.png` forged a line of its own, and
    a terminal escape in a name drove the terminal."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" and c not in keep else c
                   for c in text)


def printable_json(obj: Any) -> Any:
    """`obj` (a JSON value) with the bytes that are not UTF-8 in its strings and keys (a
    file name's, which Python holds as surrogate escapes: b'\\xff' as '\\udcff') written as
    \\xNN, as the printed messages show them (`images.printable_name`): written as they
    were, a JSON output held a lone surrogate, which strict readers refuse, or could not be
    written at all."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(obj, dict):
        return {printable_json(k): printable_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [printable_json(v) for v in obj]
    return obj


def check_utf8_path(label: str, path: str, opened: str) -> None:
    """`UserError` when `path` (a flag's value; `label`: the flag) is not valid UTF-8, made
    absolute (a folder named b'caf\\xe9', Latin-1). For the paths TensorFlow opens (`opened`:
    what it does there), checked before any work: it takes paths as UTF-8 text, so such a
    path ended in a UnicodeEncodeError or ValueError traceback after the work before it (and
    its errors naming a file there cannot be decoded: UnicodeDecodeError)."""
    where = os.path.abspath(path)
    if is_utf8(where):
        return
    cwd = "" if where == path or not is_utf8(path) else \
        f" (the current folder {_printable(os.getcwd())} is not)"
    raise UserError(f"{label} {_printable(path)}: not a UTF-8 path{cwd}; TensorFlow {opened} "
                    f"there and takes only UTF-8 paths: rename the folder, or give a symlink "
                    f"to it whose path is UTF-8 (`ln -s`)")


def is_utf8(name: str) -> bool:
    """Whether the path or file name `name` (as Python holds one from the command line or the
    disk) is valid UTF-8: without the surrogate escapes of bytes that are not."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: str) -> str:
    """`path` as messages print it: bytes that are not UTF-8 as \\xNN, control characters
    escaped (`one_line`)."""
    return one_line(printable_json(path))


def read_json(path: str, file_names: bool = False) -> Any:
    """Read a JSON file; a missing or malformed file is a `UserError` naming it.
    `file_names`: one `write_json_atomic(path, obj, file_names=True)` wrote."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UserError(f"{one_line(path)}: file not found") from None
    except OSError as e:
        raise UserError(f"{one_line(path)}: cannot read ({e.strerror})") from None
    return parse_json(path, decode_utf8(path, raw, file_names), file_names)


# ------------------------------------------------------------------ locks between processes
class InUse(UserError):
    """`holding_lock` refused: another process holds the lock."""


@contextlib.contextmanager
def holding_lock(path: str, refusal, shared: bool = False, make_folder: bool = False):
    """Held while this process uses what the lock file `path` guards: a flock on it, shared
    (readers) or exclusive, never waited for. Held by another in a way that excludes this
    one, `InUse(refusal(who))` is raised, `who` naming the holders as " (pid N: COMMAND)"
    read from Linux' /proc/locks ("" when unknown). Where the lock file cannot be made or
    opened, or its file system has no locks (an NFS mount with `nolock`), the process goes
    on unlocked, as before these locks. The lock goes with the process, also when killed.
    An exclusive holder removes the file as it ends (no lock file is left beside the user's
    files); so each locker checks that the file it locked is still the one at `path`.
    `make_folder`: the lock file's folder is made if missing (the output folder the lock
    guards, checked writable by the caller), and removed again at the end if still empty
    (a command refused later leaves no empty folder behind)."""
    made = []   # the folders made for the lock file, deepest first
    if make_folder:
        with contextlib.suppress(OSError):   # cannot: the lock file cannot be opened either
            made = make_folders(os.path.dirname(os.path.abspath(path)))
    try:
        with _holding_lock(path, refusal, shared):
            yield
    finally:
        remove_folders(made)   # those the command left empty


@contextlib.contextmanager
def _holding_lock(path: str, refusal, shared: bool):
    import fcntl  # here: every CLI start imports this module, and Windows has no fcntl

    while True:
        f = lock_file(path)
        if f is None:
            yield
            return
        try:
            locked = flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            who = describe_holders(lock_holders(f))
            f.close()
            raise InUse(refusal(who)) from None
        if not locked or is_at(f, path):
            break
        f.close()   # its holder removed it as it ended: lock the file at `path` now
    with f:
        try:
            yield
        finally:
            if locked and not shared:
                # a Ctrl-C as it is removed lands after: raised before, it left the file
                with interrupts.held(), contextlib.suppress(OSError):
                    os.remove(path)


def is_at(f, path: str) -> bool:
    """Whether the open file `f` is the file at `path`."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(f.fileno())
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def flock(f, operation: int) -> bool:
    """flock `f`; False where its file system has no locks (an NFS mount with `nolock`) or
    none for this file (read-only on NFS): the process then goes on unlocked, as before
    these locks. BlockingIOError: held by another."""
    import fcntl

    try:
        fcntl.flock(f.fileno(), operation)
        return True
    except BlockingIOError:
        raise
    except OSError as e:
        # EBADF: NFS emulates flock with POSIX locks, whose exclusive lock needs a file open
        # for writing, and a lock file another user made may only open read-only
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF):
            return False
        raise


def lock_file(path: str):
    """`path` opened to flock it (created if need be), or None when it cannot be opened."""
    for mode in ("a+", "r"):   # "r": an existing lock file of a folder this user cannot write
        try:
            return open(path, mode)
        except OSError:
            continue
    return None


def lock_holders(f) -> list[int]:
    """Pids holding a flock on the open file `f`, from Linux' /proc/locks ([] elsewhere)."""
    st = os.fstat(f.fileno())
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return []
    pids = {int(fields[4]) for fields in (line.split() for line in lines)
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device
            and fields[4].isdigit()}
    return sorted(pids - {os.getpid()}) or sorted(pids)


def describe_holders(pids: list[int]) -> str:
    """" (pid N: caption-attn evaluate --run r)" for the lock holders `pids` ("" for none)."""
    if not pids:
        return ""
    return " (" + "; ".join(f"pid {p}{_command_of(p)}" for p in pids[:3]) + ")"


def _command_of(pid: int) -> str:
    """": COMMAND" of the process `pid`, as `caption-attn ...` when it runs the CLI ("" when
    it cannot be read)."""
    import shlex

    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode("utf-8", "replace").split("\0")[:-1]
    except OSError:
        return ""
    for i, arg in enumerate(args):
        if arg == "caption_attn" or os.path.basename(arg) == "caption-attn":
            args = ["caption-attn"] + args[i + 1:]
            break
    text = one_line(shlex.join(args)) if args else ""
    return f": {text[:120]}{'...' if len(text) > 120 else ''}" if text else ""
