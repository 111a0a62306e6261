"""The one progress bar of every long job: Keras' `Progbar` (as `model.fit` shows it)."""

from __future__ import annotations

import sys
from typing import Sequence

LOG_INTERVAL_S = 60.0   # a line this often when the output is a log file, not a terminal


def bar(target: int, enabled: bool = True, unit_name: str = "step",
        stateful: Sequence[str] = (), periodic: bool = False):
    """A `keras.utils.Progbar` for `target` units.

    On a terminal: the live bar. In a log file: one line at the end, as Keras' `fit` does
    (verbose 2), or with `periodic` (one long job: extraction, evaluation) also a line every
    `LOG_INTERVAL_S` seconds so the log shows it progressing. Nothing when not `enabled`.
    """
    import keras

    tty = sys.stdout.isatty()
    verbose = 0 if not enabled or target <= 0 else 1 if tty or periodic else 2
    return keras.utils.Progbar(target, verbose=verbose, unit_name=unit_name,
                               interval=0.05 if tty else LOG_INTERVAL_S,
                               stateful_metrics=list(stateful))
