"""Ctrl-C (SIGINT) and SIGTERM held back where stopping must wait for a safe point.

A Ctrl-C raised between a training step and the counters that record it (or inside the
step's bookkeeping) would leave a checkpoint saved then naming the wrong step: training
holds the signals over its loop of steps instead, stops after the step that is running,
saves a checkpoint there and only then lets the signal end the program as it would have.
Keras' h5py writes hold them too (`fileio.keras_file_atomic`, `RunFolder.save_best`): raised
inside h5py's writer, the stop came out as an h5py TypeError and a traceback.
So do the feature index's segment writes (`feature_index.SegmentWriter`): a stop inside one
dropped the entries of feature files already written, and they were extracted again; so does
extract-features' wait for its writer thread's queued files (`extract._Writer.close`); and
an exclusive lock's removal (`fileio.holding_lock`), which a stop before it left beside the
user's files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Pending:
    """The signal held back in a `held` block (None: none came); true once one came."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def held(enabled: bool = True, saying: str = "") -> Iterator[Pending]:
    """Within the block, Ctrl-C and SIGTERM are noted in the `Pending` it yields instead of
    raised (`saying`, if given, is written to stderr then: what happens next); the block
    checks it where stopping is safe. When the block ends normally, the handlers are put back
    and a noted signal is delivered again: it ends the program as it would have
    (KeyboardInterrupt, `cli.Terminated`, or SIGTERM's default action); a handler of the
    caller's that returns instead is followed by KeyboardInterrupt, since the block stopped.
    Should the block raise, that error ends it and the noted signal is dropped. A second
    signal while one is held is delivered at once (a hung step, or a user who insists).
    Ignored signals stay ignored. A signal arriving while the handlers are swapped in (other
    threads may take it, so it cannot be blocked) ends the program as if it came before the
    block, and every handler is put back either way: none of this block's is left behind (a
    later Ctrl-C was swallowed). Nested in another `held` block, a noted signal is handed
    to the enclosing block when this one ends, and a second signal (the first noted by
    either block) goes through every enclosing block at once. Not `enabled`, or outside the
    main thread (where Python cannot set handlers), the block runs with the handlers as they
    are."""
    pending = Pending()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    kept = [s for s in SIGNALS if previous[s] not in (signal.SIG_IGN, None)]

    def restore() -> None:
        _set_all({s: previous[s] for s in kept})

    def note(signum, frame) -> None:
        outer = getattr(previous.get(signum), "holds", None)   # an enclosing block's
        if pending or outer:   # a second signal, here or before this block: at once
            restore()
            if outer is not None and not outer:
                outer.signum = signum       # so the enclosing block delivers it at once too
            signal.raise_signal(signum)
        else:
            pending.signum = signum
            if saying:   # a raw write: the interrupted code may be inside a stderr write
                os.write(2, saying.encode())
    note.holds = pending   # marks the handler as a `held` block's, for a nested one

    try:
        _set_all({s: note for s in kept})
    except BaseException:   # a signal before the block took effect: handled as then
        restore()
        raise
    try:
        yield pending
    finally:
        restore()
    if pending:
        signal.raise_signal(pending.signum)
        if getattr(previous[pending.signum], "holds", None) is None:
            raise KeyboardInterrupt   # the caller's handler returned: the block stopped anyway
        # else an enclosing `held` block noted it: that block goes on, and ends as it would


def _set_all(handlers: dict) -> None:
    """signal.signal for each of `handlers` {signum: handler}: all of them are set, also when
    a signal's handler raises in between (right after one `signal.signal` returns)."""
    items = list(handlers.items())

    def set_from(i: int) -> None:
        if i < len(items):
            try:
                signal.signal(*items[i])
            finally:
                set_from(i + 1)
    set_from(0)
