"""Ctrl-C or SIGTERM sent deterministically at a chosen point of a real CLI command run in a
subprocess (for tests/test_signals.py): `inject(target, ...)` runs `caption-attn ARGS` with
`target` ("module:attr.path") wrapped so that on its `call`-th call the process signals
itself:
  "before": as it is called (the handler raises before it runs);
  "after":  once it returned (between it and what comes next);
  "finalizer": as it is called, inside an object's __del__ (where Python prints an exception
            as "Exception ignored in" and goes on: TensorFlow's objects have many);
  "inside": at the `at`-th call of a C function (a builtin, a C extension's) made inside
            it, directly or deeper: a signal landing in the middle of it (as one that a
            C function notices, or that arrives in a C extension's callback into Python).
Where a module imported the function by name, target that module's name for it."""

import json
import os
import subprocess
import sys

from train_subprocess import ENV

WRAPPER = r"""
import importlib, json, os, signal, sys, threading
# Ctrl-C as in a command started from a terminal: a suite started in the background (`make
# test &`, `nohup`) passes SIGINT on ignored, and the signals sent here would be lost
signal.signal(signal.SIGINT, signal.default_int_handler)
from caption_attn import cli
spec = json.loads(sys.argv[1])
module, _, attrs = spec["target"].partition(":")
owner = importlib.import_module(module)
*path, name = attrs.split(".")
for part in path:
    owner = getattr(owner, part)
real = getattr(owner, name)
calls = [0]
fired = []
def fire():
    if not fired:
        fired.append(1)
        os.write(2, b"[injected]\n")
        if os.environ.get("SIGNAL_INJECT_STACK"):   # where it lands, for a test's author
            import traceback
            os.write(2, "".join(traceback.format_stack()[-8:-2]).encode())
        os.kill(os.getpid(), spec["signal"])
def wrapper(*args, **kwargs):
    if spec["main_thread"] and threading.current_thread() is not threading.main_thread():
        return real(*args, **kwargs)   # not counted
    calls[0] += 1
    mine = calls[0] == spec["call"] and not fired
    if mine and spec["when"] == "before":
        fire()
    if mine and spec["when"] == "finalizer":
        class Dropped:
            def __del__(self):
                fire()
        Dropped()   # collected at once: the handler runs inside its __del__
    if mine and spec["when"] == "inside":
        count = [0]
        def profile(frame, event, arg):
            # C calls only: an exception a profile function raises at a Python function's
            # "call" event was at times lost (Python 3.11), which no real signal does
            if event == "c_call" and not fired:
                count[0] += 1
                if count[0] >= spec["at"]:
                    fire()
        sys.setprofile(profile)
        try:
            result = real(*args, **kwargs)
        finally:
            sys.setprofile(None)
    else:
        result = real(*args, **kwargs)
    if mine and spec["when"] == "after":
        fire()
    return result
if isinstance(real, staticmethod) or isinstance(owner.__dict__.get(name), staticmethod):
    wrapper = staticmethod(wrapper)
setattr(owner, name, wrapper)
sys.argv = ["caption-attn"] + sys.argv[2:]
code = cli.entry()
if not fired:
    os.write(2, b"[never injected]\n")
sys.exit(code)
"""


def inject(target: str, args: list, when: str = "before", call: int = 1, at: int = 1,
           signum: int = 15, timeout: float = 300,
           main_thread: bool = False) -> subprocess.CompletedProcess:
    """`caption-attn ARGS` with SIGTERM (`signum`) sent at `target`'s `call`-th call
    (`main_thread`: of the calls made in the main thread)."""
    spec = {"target": target, "when": when, "call": call, "at": at, "signal": signum,
            "main_thread": main_thread}
    return subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(spec), *map(str, args)],
                          env=ENV, capture_output=True, text=True, timeout=timeout)


def stopped_cleanly(done: subprocess.CompletedProcess, command: str, signum: int = 15) -> None:
    """The command ended as a signal should end it: 143 / 130, its one line last, no
    traceback or other exception."""
    word, code = ("terminated", 143) if signum == 15 else ("interrupted", 130)
    assert "[injected]" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == f"caption-attn {command}: {word}", done.stderr
    assert done.returncode == code, done.stderr


def leftovers(folder: str) -> list:
    """Temporary files (`fileio.temp_name`) and lock files under `folder`."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if ".tmp." in name or name.endswith(".lock"):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)

