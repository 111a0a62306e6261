"""The one exception type users see as a message instead of a traceback, and how messages
count things (`counted`), and what a write that failed while a command ran says
(`WriteFailed`)."""

import errno

# the errors of a disk that filled up (or a quota that was reached) while a command wrote
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# what to do when a write failed, said by every command's message (`free_space`)
_FREE_SPACE = "free space{where} (or {alternative}) and rerun this command"


def free_space(where: str = "there", alternative: str = "make its folder writable") -> str:
    """What a message says to do when a write failed (a full disk, a quota, a folder made
    read-only): "free space there (or make its folder writable) and rerun this command".
    `where`: where to free space ("" for nowhere named); `alternative`: the other mend."""
    return _FREE_SPACE.format(where=f" {where}" if where else "", alternative=alternative)


FREE_SPACE = free_space()


def out_of_memory(error: BaseException):
    """The allocation TensorFlow's out-of-memory `error` names ("OOM when allocating tensor
    with shape[...]", at most 200 characters; "OOM" if none), or None for any other error.
    A tf.function's error starts "Graph execution error:" and names the allocation last."""
    import tensorflow as tf    # only once an error is met: this module imports no TensorFlow
    if not isinstance(error, tf.errors.ResourceExhaustedError):
        return None
    return next((line.strip() for line in (error.message or "").splitlines()
                 if "OOM" in line or "when allocating" in line), "OOM")[:200]


class UserError(Exception):
    """Bad input or environment: the CLI prints the message and exits with `exit_code`.

    The message must name the file or argument and say what was expected. It is one line:
    the CLI escapes control characters in it (a newline in a file name it names is printed
    as \\n). A refusal that lists things gives them as `lines`, each printed on a line of its
    own after the message (escaped the same way); str() is all of them, a line each.
    """

    def __init__(self, message: str, exit_code: int = 2, lines=()):
        self.message, self.lines = message, tuple(lines)
        super().__init__("\n".join((message, *self.lines)))
        self.exit_code = exit_code

    def reworded(self, message: str) -> "UserError":
        """This error saying `message` instead (its type, exit code and lines kept)."""
        self.message = message
        self.args = ("\n".join((message, *self.lines)),)
        return self


def counted(n, noun: str, plural: str = "") -> str:
    """How a message counts things: "1 image", "2 images", "0 images"; `plural` when the
    plural is not `noun` + "s". `n` may be a count's digits (a JSON key: "1 object")."""
    return f"{n} {noun if str(n) == '1' else plural or noun + 's'}"


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss became NaN, a feature file went bad); exit code 1."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


class OutOfMemory(TrainingError):
    """TensorFlow's out of memory in any command, said in one line (exit 1) in the terms of
    the command that met it; `what`: the allocation (`out_of_memory`). The demo says it
    again in its own flags (it has not all of the commands')."""

    def __init__(self, message: str, what: str):
        super().__init__(message)
        self.what = what


class WriteFailed(UserError):
    """A file (or stdout) could not be written while the command ran: a disk that filled up,
    a quota, a folder made read-only since it was checked. Exit code 1: the job ran and
    failed (2 is for bad input, refused before anything was done). The message names `what`
    could not be written, the reason, and what to do (`advice`)."""

    def __init__(self, what: str, error: BaseException, advice: str = FREE_SPACE):
        reason = (getattr(error, "strerror", None) or str(error) or type(error).__name__)
        super().__init__(f"cannot write {what} ({reason}): {advice}", exit_code=1)
        self.error = error
