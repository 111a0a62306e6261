"""The progress bar of every long job, in a log file (stdout not a terminal: pytest's capture)."""

import re

from caption_attn import progress


def test_a_periodic_bar_writes_plain_lines_into_a_log(capsys, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)       # a line at every update
    bar = progress.bar(3, unit_name="image", stateful=["failed"], periodic=True)
    for i in (1, 2):
        bar.update(i, [("failed", 0)])
    bar.update(3, [("failed", 1)], finalize=True)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" - ")[0] for line in lines] == ["1/3", "2/3", "3/3"]
    assert lines[-1].endswith("failed: 1")                      # a count, not 1.0000
    # the minute's lines say the ETA and the values given too (the last line only did)
    for line in lines[:2]:
        assert re.fullmatch(r"ETA: \d+s", line.split(" - ")[2]) and line.endswith(" - failed: 0")
    assert not any("\x1b" in line or "\b" in line or "\r" in line for line in lines)


def test_a_bar_in_a_log_is_one_line_at_the_end_and_none_when_disabled(capsys):
    bar = progress.bar(2, stateful=["loss"])
    bar.update(1, [("loss", 0.5)])
    bar.update(2, [("loss", 0.25)], finalize=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("2/2 - ") and "loss: 0.25" in lines[0]
    quiet = progress.bar(2, enabled=False)
    quiet.update(2, finalize=True)
    assert capsys.readouterr().out == ""


def test_counts_show_as_integers_on_a_terminal_too(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    bar = progress.bar(3, unit_name="image", stateful=["failed", "loss"])
    bar.update(3, [("failed", 2), ("loss", 0.5)], finalize=True)
    out = capsys.readouterr().out
    assert "failed: 2 " in out + " " and "failed: 2.0" not in out and "loss: 0.5000" in out


def test_a_resumed_bar_times_only_the_steps_it_saw(capsys, monkeypatch):
    """An epoch resumed at step 90 of 100: Keras divided the time since the restart by all
    90+ steps, so the bar showed a tenth of the true time per step and an ETA as short
    (100ms/step here, where each step took 1 s)."""
    import keras.src.utils.progbar as keras_progbar
    now = [0.0]
    monkeypatch.setattr(keras_progbar.time, "time", lambda: now[0])
    bar = progress.bar(100, stateful=["loss"], initial=90)
    for step in range(91, 101):
        now[0] += 1.0
        bar.update(step, [("loss", 0.5)])
    line, = capsys.readouterr().out.splitlines()
    assert line.startswith("100/100 - 10s - 1s/step - loss: 0.5"), line
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)    # the live bar's ETA
    now[0] = 0.0
    bar = progress.bar(100, stateful=["loss"], initial=90)
    for step in (91, 92, 93):
        now[0] += 1.0
        bar.update(step, [("loss", 0.5)])
    live = capsys.readouterr().out.rsplit("\r", 1)[-1]
    assert " 93/100" in live and "\x1b[1m7s\x1b[0m 1s/step - " in live, live   # ETA 7 s
