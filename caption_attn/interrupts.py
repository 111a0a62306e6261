"""Ctrl-C (SIGINT) and SIGTERM held back where stopping must wait for a safe point.

A Ctrl-C raised between a training step and the counters that record it (or inside the
step's bookkeeping) would leave a checkpoint saved then naming the wrong step: training
holds the signals over its loop of steps instead, stops after the step that is running,
saves a checkpoint there and only then lets the signal end the program as it would have.
"""

from __future__ import annotations

import contextlib
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
def held(enabled: bool = True) -> Iterator[Pending]:
    """Within the block, Ctrl-C and SIGTERM are noted in the `Pending` it yields instead of
    raised; the block checks it where stopping is safe. When the block ends normally, the
    handlers are put back and a noted signal is delivered again: it ends the program as it
    would have (KeyboardInterrupt, `cli.Terminated`, or SIGTERM's default action). Should the
    block raise, that error ends it and the noted signal is dropped. A second signal while
    one is held is delivered at once (a hung step, or a user who insists). Signals that are
    ignored (`nohup`) stay ignored. Not `enabled`, or outside the main thread (where Python
    cannot set handlers), the block runs with the handlers as they are."""
    pending = Pending()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    kept = [s for s in SIGNALS if previous[s] not in (signal.SIG_IGN, None)]

    def restore() -> None:
        for s in kept:
            signal.signal(s, previous[s])

    def note(signum, frame) -> None:
        if pending:
            restore()
            signal.raise_signal(signum)
        else:
            pending.signum = signum

    for s in kept:
        signal.signal(s, note)
    try:
        yield pending
    finally:
        restore()
    if pending:
        signal.raise_signal(pending.signum)
