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
    write_bytes_atomic(str(tmp_path / "new" / "x.npy"), b"done")   # creates the folder
    assert os.listdir(tmp_path / "new") == ["x.npy"]
