"""The one progress bar of every long job: Keras' `Progbar` (as `model.fit` shows it)."""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from typing import Optional, Sequence, TextIO

LOG_INTERVAL_S = 60.0   # a line this often when the output is a log file, not a terminal


def bar(target: int, enabled: bool = True, unit_name: str = "step",
        stateful: Sequence[str] = (), periodic: bool = False, stream: Optional[TextIO] = None,
        initial: int = 0):
    """A `keras.utils.Progbar` for `target` units, `initial` of them done before it started
    (a resumed epoch's: its time per unit and ETA count only the units it saw).

    On a terminal: the live bar. In a log file: one plain line at the end, as Keras' `fit`
    does (verbose 2), or with `periodic` (one long job: extraction, evaluation) also a plain
    line every `LOG_INTERVAL_S` seconds so the log shows it progressing (Keras' live bar
    would write colour codes and backspaces into the file). Nothing when not `enabled`.
    `stream` (e.g. sys.stderr when stdout carries the command's output) takes the bar
    instead of stdout (Keras' bar writes to whatever `sys.stdout` is).
    """
    import keras

    with contextlib.redirect_stdout(stream or sys.stdout):
        tty = sys.stdout.isatty()
        verbose = 0 if not enabled or target <= 0 else 1 if tty else 2
        cls = _periodic_class(keras) if periodic and verbose == 2 else _count_class(keras)
        progbar = cls(target, verbose=verbose, unit_name=unit_name, interval=0.05,
                      stateful_metrics=list(stateful))
    if stream is not None:
        progbar.update = _on(stream, progbar.update)
        progbar.add = _on(stream, progbar.add)
    if initial:
        progbar.initial = initial
        progbar.update(initial)
    return progbar


def _on(stream: TextIO, method):
    @functools.wraps(method)
    def redirected(*args, **kwargs):
        with contextlib.redirect_stdout(stream):
            return method(*args, **kwargs)
    return redirected


class _Count(float):
    """A whole number that Keras' Progbar (which formats every value with `.4f`) prints as
    one: `failed: 2`, not `failed: 2.0000`."""

    def __format__(self, spec: str) -> str:
        return str(int(self))

    def __truediv__(self, other):  # Progbar shows value / count, count 1 for stateful values
        return _Count(float(self) / other) if other == 1 else float(self) / other


def _with_counts(values):
    return values and [(k, _Count(v) if isinstance(v, int) and not isinstance(v, bool) else v)
                       for k, v in values]


def _count_class(keras):
    class Progbar(keras.utils.Progbar):
        """Keras' bar, integer values printed as integers, timed from `initial` units (a
        resumed epoch's): Keras divided the time since it started by all `current` units,
        so a bar resumed at 90 of 100 showed a tenth of the true time per unit and ETA."""

        initial = 0
        _after_first = None

        def update(self, current, values=None, finalize=None):
            super().update(current, _with_counts(values), finalize)

        def _estimate_step_duration(self, current, now):
            if not self.initial:
                return super()._estimate_step_duration(current, now)
            seen = current - self.initial
            if seen <= 0:
                return 0
            if seen > 1 and self._after_first is not None:   # the first unit left out, as
                return (now - self._after_first) / (seen - 1)  # Keras does (a trace, say)
            if seen == 1:
                self._after_first = now
            return (now - self._start) / seen
    return Progbar


def _periodic_class(keras):
    class PeriodicProgbar(_count_class(keras)):
        """Keras' verbose-2 bar (a plain line at the end) that also prints `current/target -
        elapsed - ETA - the values given` every `LOG_INTERVAL_S` seconds (the ETA and the
        failures so far were in the last line only)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._started = self._last_line = time.monotonic()

        def update(self, current, values=None, finalize=None):
            super().update(current, values, finalize)
            done = finalize if finalize is not None else current >= self.target
            now = time.monotonic()
            if not done and now - self._last_line >= LOG_INTERVAL_S:
                self._last_line = now
                seen = current - self.initial
                eta = (f" - ETA: {(now - self._started) / seen * (self.target - current):.0f}s"
                       if seen > 0 and self.target else "")
                shown = "".join(f" - {k}: {v}" if isinstance(v, int) else f" - {k}: {v:.4g}"
                                for k, v in (values or []))
                print(f"{current}/{self.target} - {now - self._started:.0f}s{eta}{shown}",
                      flush=True)
    return PeriodicProgbar
