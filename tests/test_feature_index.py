"""Tests of the provenance index (caption_attn/feature_index.py): segments, loading, matching
and compaction. No TensorFlow: feature files here are plain bytes."""

import json
import os
import shutil

from caption_attn import feature_index
from caption_attn.feature_index import Entry, ImageStamp, SegmentWriter, make_entry

STAMP = ImageStamp(1000, 1_400_000_000_000_000_000, "ab" * 32)


def _write_feature(cache, key, payload=b"x" * 64):
    path = os.path.join(cache, key + ".npy")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(payload)
    return path


def _path(cache):
    return lambda key: os.path.join(cache, key + ".npy")


def test_segments_flush_by_count_and_on_close(tmp_path):
    cache = str(tmp_path)
    writer = SegmentWriter(cache, flush_seconds=3600, flush_entries=3)
    for i in range(7):
        path = _write_feature(cache, f"img{i}.jpg")
        writer.add(make_entry(f"img{i}.jpg", "f" * 16, os.stat(path), STAMP))
    assert writer.segments == 2 and len(writer.pending) == 1      # 3 + 3 flushed, 1 pending
    assert len(feature_index.load_index(cache)) == 6
    writer.close()
    names = sorted(os.listdir(feature_index.segments_dir(cache)))
    assert len(names) == 3 and all(n.endswith(".jsonl") and not n.startswith(".")
                                   for n in names)
    index = feature_index.load_index(cache)
    assert sorted(index.entries) == [f"img{i}.jpg" for i in range(7)]
    entry = index.entries["img3.jpg"][0]
    assert entry.identity == "f" * 16 and entry.image_sha256 == STAMP.sha256
    assert entry.matches_file(os.stat(_path(cache)("img3.jpg")))


def test_malformed_lines_and_vanished_segments_are_skipped(tmp_path):
    cache = str(tmp_path)
    path = _write_feature(cache, "a.jpg")
    good = make_entry("a.jpg", "f" * 16, os.stat(path), STAMP).to_json()
    os.makedirs(feature_index.segments_dir(cache))
    with open(os.path.join(feature_index.segments_dir(cache), "h-1-x-000000.jsonl"), "w") as f:
        f.write(good + "\n" + good[: len(good) // 2] + "\n" + '{"key": "b.jpg"}\n')
    index = feature_index._load(cache, ["h-1-x-000000.jsonl", "gone-by-now.jsonl"])
    assert list(index.entries) == ["a.jpg"] and index.skipped_lines == 2


def test_lines_with_values_of_other_types_are_skipped(tmp_path):
    """A line of valid JSON whose "key" is a list stopped every command that reads the index
    with a TypeError traceback (unhashable type: 'list'): a value of another type makes the
    line malformed, skipped like the others (its file is extracted again)."""
    cache = str(tmp_path)
    path = _write_feature(cache, "a.jpg")
    good = json.loads(make_entry("a.jpg", "f" * 16, os.stat(path), STAMP).to_json())
    bad = [{**good, "key": ["a.jpg"]}, {**good, "identity": None}, {**good, "size": "64"},
           {**good, "mtime_ns": True}, {**good, "image_sha256": 1}, [good], "a.jpg",
           {**good, "images_dir": ["/data"]}]
    with open(feature_index.index_path(cache), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in [good] + bad)
    index = feature_index.load_index(cache)
    assert list(index.entries) == ["a.jpg"] and len(index) == 1
    assert index.skipped_lines == len(bad)


def test_a_rewritten_file_matches_no_entry_but_a_copied_cache_does(tmp_path):
    cache = str(tmp_path / "cache")
    path = _write_feature(cache, "sub/a.jpg")
    with SegmentWriterClosing(cache) as writer:
        writer.add(make_entry("sub/a.jpg", "f" * 16, os.stat(path), STAMP))
    copy = str(tmp_path / "copy")
    shutil.copytree(cache, copy)                                   # new inodes, same mtimes
    assert feature_index.load_index(copy).match("sub/a.jpg", os.stat(_path(copy)("sub/a.jpg")))
    _write_feature(cache, "sub/a.jpg", b"y" * 64)                  # same size, new mtime
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))
    assert feature_index.load_index(cache).match("sub/a.jpg", os.stat(path)) == []


class SegmentWriterClosing(SegmentWriter):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_compact_keeps_the_newest_matching_entry_and_removes_segments(tmp_path):
    cache = str(tmp_path)
    a, b = _write_feature(cache, "a.jpg"), _write_feature(cache, "b.jpg")
    with SegmentWriterClosing(cache) as writer:
        writer.add(make_entry("a.jpg", "1" * 16, os.stat(a), STAMP))
        writer.add(make_entry("b.jpg", "1" * 16, os.stat(b), STAMP))
        writer.add(make_entry("gone.jpg", "1" * 16, os.stat(b), STAMP))   # no file
    os.utime(b, ns=(0, 123))                                       # b rewritten since
    with SegmentWriterClosing(cache) as writer:                    # a re-indexed: new image
        writer.add(make_entry("a.jpg", "1" * 16, os.stat(a), STAMP._replace(mtime_ns=5)))
    index, stats = feature_index.compact(cache, _path(cache))
    assert list(index.entries) == ["a.jpg"] and index.entries["a.jpg"][0].image_mtime_ns == 5
    assert set(stats) == {"a.jpg"}
    assert os.listdir(feature_index.segments_dir(cache)) == []
    with open(feature_index.index_path(cache)) as f:
        lines = f.read().splitlines()
    assert len(lines) == 1 and '"key":"a.jpg"' in lines[0]
    assert feature_index.load_index(cache).entries == index.entries
    # nothing to merge or drop: the index is left as it is (a rerun of a complete COCO cache
    # rewrote and fsynced its 33 MB every time); a line it cannot read is dropped
    os.utime(feature_index.index_path(cache), ns=(0, 7))
    assert feature_index.compact(cache, _path(cache))[0].entries == index.entries
    assert os.stat(feature_index.index_path(cache)).st_mtime_ns == 7
    with open(feature_index.index_path(cache), "a") as f:
        f.write("not json\n")
    feature_index.compact(cache, _path(cache))
    with open(feature_index.index_path(cache)) as f:
        assert f.read().splitlines() == lines


def test_entry_round_trip():
    entry = Entry("dir/ü x.jpg", "0123456789abcdef", 262272, 17, 99, 5, 6, "cd" * 32,
                  "/data/ü")
    index = feature_index.Index()
    feature_index._parse_lines(entry.to_json() + "\n", index)
    assert index.entries == {"dir/ü x.jpg": [entry]}
    # a line written before the images folder was recorded: read, with none
    old = entry._replace(key="old.jpg", images_dir=None)
    assert "images_dir" not in json.loads(old.to_json())
    feature_index._parse_lines(old.to_json() + "\n", index)
    assert index.entries["old.jpg"] == [old] and index.skipped_lines == 0


def test_an_images_folder_whose_name_is_not_utf8_is_read_back_exactly(tmp_path):
    """The index records each feature file's images folder: one named with bytes that are not
    UTF-8 (b'caf\\xe9') crashed the flush after the whole extraction (UnicodeEncodeError), and
    read back as U+FFFD it would not match the folder again."""
    cache = str(tmp_path)
    folder = os.fsdecode(b"/data/caf\xe9/images")
    writer = SegmentWriter(cache, flush_seconds=3600, flush_entries=100)
    path = _write_feature(cache, "a.jpg")
    writer.add(make_entry("a.jpg", "f" * 16, os.stat(path), STAMP, images_dir=folder))
    writer.close()
    assert feature_index.load_index(cache).entries["a.jpg"][0].images_dir == folder
    index, _ = feature_index.compact(cache, _path(cache))
    assert index.entries["a.jpg"][0].images_dir == folder
    with open(feature_index.index_path(cache), "rb") as f:
        assert b'"images_dir":"/data/caf\xe9/images"' in f.read()
    assert feature_index.load_index(cache).entries["a.jpg"][0].images_dir == folder


def test_names_with_unicode_line_separators_are_read_back_as_written(tmp_path):
    """JSON leaves U+2028, U+2029 and U+0085 unescaped, but `str.splitlines` ends a line at
    each: an image named "a\u2028b.png" (or in such a folder) was split into two lines, read
    back under another key ("a,b.png") or as malformed, so every rerun extracted it again and
    train left it out as "not in the cache's index"."""
    cache = str(tmp_path)
    keys = ["a\u2028b.png", "c\u2029d.png", "e\x85f.png", "g\x1ch.png", "plain.png"]
    writer = SegmentWriter(cache, flush_seconds=3600, flush_entries=100)
    for key in keys:
        path = _write_feature(cache, key)
        writer.add(make_entry(key, "f" * 16, os.stat(path), STAMP,
                              images_dir="/data/x\u2028y"))
    writer.close()
    index = feature_index.load_index(cache)
    assert sorted(index.entries) == sorted(keys) and index.skipped_lines == 0
    assert {e[0].images_dir for e in index.entries.values()} == {"/data/x\u2028y"}
    compacted, _ = feature_index.compact(cache, _path(cache))
    assert sorted(compacted.entries) == sorted(keys)
    assert sorted(feature_index.load_index(cache).entries) == sorted(keys)


def test_a_segment_that_cannot_be_written_is_named_and_its_entries_stay_pending(
        tmp_path, monkeypatch):
    """A full disk while a segment was written raised the bare OSError (no file named; the
    CLI said `error: No space left on device`)."""
    import errno

    import pytest

    from caption_attn.errors import UserError
    cache = str(tmp_path)
    writer = SegmentWriter(cache, flush_seconds=3600, flush_entries=100)
    path = _write_feature(cache, "a.jpg")
    writer.add(make_entry("a.jpg", "f" * 16, os.stat(path), STAMP))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(feature_index, "write_bytes_atomic", full)
    with pytest.raises(UserError) as e:
        writer.close()
    assert e.value.exit_code == 1
    segments = feature_index.segments_dir(cache)
    assert str(e.value).startswith(f"cannot write the feature index's segment {segments}/")
    assert " (No space left on device): free space " in str(e.value)
    assert len(writer.pending) == 1 and writer.segments == 0
    monkeypatch.undo()
    writer.close()                                   # room again: the entry is written
    assert sorted(feature_index.load_index(cache).entries) == ["a.jpg"]


def test_an_index_that_cannot_be_compacted_is_named_and_its_segments_are_kept(
        tmp_path, monkeypatch):
    """A full disk while the segments were merged into index.jsonl (the .npy files fitted)
    said `error: No space left on device`, no file named."""
    import errno

    import pytest

    from caption_attn.errors import UserError
    cache = str(tmp_path)
    writer = SegmentWriter(cache, flush_seconds=3600, flush_entries=100)
    path = _write_feature(cache, "a.jpg")
    writer.add(make_entry("a.jpg", "f" * 16, os.stat(path), STAMP))
    writer.close()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(feature_index, "write_bytes_atomic", full)
    with pytest.raises(UserError) as e:
        feature_index.compact(cache, _path(cache))
    assert e.value.exit_code == 1
    assert str(e.value).startswith(f"cannot write the feature index "
                                   f"{feature_index.index_path(cache)} (No space left on "
                                   f"device): free space ")
    assert sorted(feature_index.load_index(cache).entries) == ["a.jpg"]   # segments kept
