"""Tests of the `extract-features` pipeline (caption_attn/extract.py): shards, the summary,
resume, repair, exit codes, and killed / concurrent processes.

One float16 extraction of the session's images is shared (`extracted`, conftest.py); tests that
change a cache work on a copy of it (`cache_copy`).
"""

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from caption_attn import extract, feature_cache, feature_index
from caption_attn.errors import OutOfMemory, UserError
from caption_attn.fileio import HOST
from caption_attn.extract import extract_features, format_summary, shard_of
from caption_attn.feature_cache import (FORMAT_VERSION, check_feature_file, feature_path,
                                        read_failed, read_manifest)
from caption_attn.images import list_images, mark_heatmap
from image_samples import BAD, GOOD, extract_cfg, run_as_user, scene, write_rgb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- shards
def test_shards_are_disjoint_and_complete():
    keys = [f"dir{i % 7}/img_{i}.jpg" for i in range(1000)]
    shards = [{k for k in keys if shard_of(k, 3) == i} for i in range(3)]
    assert set().union(*shards) == set(keys)
    assert sum(len(s) for s in shards) == len(keys)
    assert all(250 < len(s) < 420 for s in shards)           # roughly balanced
    assert [shard_of(k, 3) for k in reversed(keys)][::-1] == [shard_of(k, 3) for k in keys]


@pytest.mark.parametrize("shards,index", [(2, 2), (2, -1), (0, 0)])
def test_shard_flags_are_validated(images, tmp_path, shards, index):
    with pytest.raises(UserError, match="--shard-index|--num-shards"):
        extract_features(images, extract_cfg(tmp_path, num_shards=shards, shard_index=index),
                         progress=False)


# --------------------------------------------------------------------------- extraction
def test_extraction_writes_files_and_manifest(images, extracted):
    cache, summary = extracted
    assert summary["extracted"] == len(GOOD) and summary["skipped"] == 0
    assert summary["failed"] == len(BAD) and summary["exit_code"] == 0
    assert summary["images"] == len(GOOD) + len(BAD) and summary["count"] == len(GOOD)
    for key in GOOD:
        path = feature_path(cache, key)
        assert path == os.path.join(cache, *key.split("/")) + ".npy"
        assert check_feature_file(path, "float16", full=True) is None, key
        assert np.load(path).shape == (64, 2048)

    m = read_manifest(cache)
    assert m["backbone"] == "InceptionV3" and m["weights"] == "random" and m["seed"] == 0
    assert m["dtype"] == "float16" and m["feature_shape"] == [64, 2048]
    assert m["image_size"] == 299 and m["format_version"] == FORMAT_VERSION
    assert m["count"] == len(GOOD) and "INTER_AREA" in m["resize"]
    assert len(m["weights_sha256"]) == 64
    assert m["feature_scale"] > 1 and np.log2(m["feature_scale"]).is_integer()
    assert os.path.isfile(os.path.join(cache, m["weights_file"]))
    # the raw-bytes reader of the training pipeline: header length + data
    with open(feature_path(cache, "a.jpg"), "rb") as f:
        raw = f.read()
    np.testing.assert_array_equal(
        np.frombuffer(raw[m["npy_header_bytes"]:], np.float16).reshape(64, 2048),
        np.load(feature_path(cache, "a.jpg")))

    assert read_failed(cache) == BAD
    with open(os.path.join(cache, "failed.tsv")) as f:
        lines = f.read().splitlines()
    assert lines == sorted(lines) and all(line.count("\t") == 1 for line in lines)
    text = format_summary(summary)
    assert "extracted 10" in text and "failed.tsv" in text


def test_strict_and_nothing_extracted_exit_codes(extracted):
    summary = dict(extracted[1])
    assert extract._exit_status(summary, strict=True)[0] == 1
    assert extract._exit_status(summary, strict=False)[0] == 0
    summary.update(extracted=0, skipped=0)
    assert extract._exit_status(summary, strict=False) == (1, "nothing could be extracted")


def test_rerun_resumes_and_updates_failed(images, cache_copy, tmp_path):
    work = tmp_path / "images"
    shutil.copytree(images, work)
    os.remove(feature_path(cache_copy, "sub/c.jpg"))          # not done yet
    write_rgb(str(work / "notes.jpg"), scene(11))             # a failure that gets fixed
    from caption_attn.fileio import HOST as host
    stale = os.path.join(cache_copy, "sub", f".c.jpg.npy.tmp.999999999.{host}")
    live = os.path.join(cache_copy, f".x.jpg.npy.tmp.1.{host}")  # pid 1 is alive
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"half")

    keys = list_images(str(work)) + ["missing.jpg"]
    summary = extract_features(str(work), extract_cfg(cache_copy), keys=keys, progress=False)
    assert summary["extracted"] == 2 and summary["skipped"] == len(GOOD) - 1
    assert summary["failed"] == len(BAD) - 1 and summary["count"] == len(GOOD) + 1
    assert summary["stale_temp_removed"] == 1
    assert not os.path.exists(stale) and os.path.exists(live)
    assert "notes.jpg" not in read_failed(cache_copy)
    assert read_manifest(cache_copy)["count"] == len(GOOD) + 1


def test_nothing_to_extract_builds_no_backbone(images, cache_copy, monkeypatch):
    """A rerun on a random backbone's complete cache skips every image without building the
    backbone (seconds); with an image to do, the cache's saved weights are still checked."""
    from caption_attn import backbone as backbone_lib

    built = []   # every InceptionV3 built (a cache's random backbone skips `build_backbone`)
    real = backbone_lib._inception_v3
    monkeypatch.setattr(backbone_lib, "_inception_v3",
                        lambda *a, **k: built.append(a) or real(*a, **k))
    keys = sorted(GOOD)  # (failed images are tried again on every run)
    summary = extract_features(images, extract_cfg(cache_copy), keys=keys, progress=False)
    assert summary["extracted"] == 0 and summary["skipped"] == len(GOOD) and built == []
    assert "images/s" not in format_summary(summary)  # no rate of nothing

    weights = os.path.join(cache_copy, feature_cache.read_manifest(cache_copy)["weights_file"])
    with open(weights, "r+b") as f:  # damaged: refused as soon as it is needed
        f.seek(os.path.getsize(weights) // 2)
        f.write(b"\x00" * 4096)
    assert extract_features(images, extract_cfg(cache_copy), keys=keys,
                            progress=False)["extracted"] == 0
    os.remove(feature_path(cache_copy, sorted(GOOD)[0]))
    with pytest.raises(UserError, match="extract into a new --cache folder"):
        extract_features(images, extract_cfg(cache_copy), keys=keys, progress=False)
    assert len(built) == 1


def _first_of_shard(shard, shards=2):
    return next(k for k in sorted(GOOD) if shard_of(k, shards) == shard)


def test_a_weights_file_of_the_caches_own_weights_is_the_same_backbone(images, cache_copy,
                                                                       tmp_path):
    """A cache of `--weights random` given `--weights PATH` of the very weights it saved (a
    shard, a rerun) was refused ("holds features made with weights random (seed 0), this run
    asks for PATH"): the name was compared, though the identity is the weights' sha256. The
    same weights are accepted and write files of the cache's identity; other weights are
    refused, naming both with their sha256."""
    from caption_attn.backbone import build_backbone

    manifest = read_manifest(cache_copy)
    own = os.path.join(cache_copy, manifest["weights_file"])
    fingerprint = feature_cache.cache_identity(manifest)["fingerprint"]
    redo = [_first_of_shard(1), _first_of_shard(0)]
    for key in redo:
        os.remove(feature_path(cache_copy, key))
    summary = extract_features(images, extract_cfg(cache_copy, weights=own, num_shards=2,
                                                   shard_index=1), keys=GOOD, progress=False)
    assert summary["extracted"] == 1 and summary["count"] == len(GOOD) - 1
    summary = extract_features(images, extract_cfg(cache_copy, weights=own), keys=GOOD,
                               progress=False)                  # a plain rerun, not sharded
    assert summary["extracted"] == 1 and summary["count"] == len(GOOD)
    index = feature_index.load_index(cache_copy)
    assert all(index.entries[k][-1].identity == fingerprint for k in redo)
    assert read_manifest(cache_copy)["weights"] == "random"

    model = build_backbone(own)                   # other bytes: one weight changed
    model.weights[0].assign(model.weights[0] + 1.0)
    other = str(tmp_path / "other.weights.h5")
    model.save_weights(other)
    sha = manifest["weights_sha256"][:12]
    with pytest.raises(UserError, match=rf"holds features made with weights random \(seed 0\) "
                                        rf"\(sha256 {sha}…\), this run asks for "
                                        rf"{re.escape(other)} \(sha256 (?!{sha})\w{{12}}…\)"):
        extract_features(images, extract_cfg(cache_copy, weights=other), keys=GOOD,
                         progress=False)


def test_count_and_index_cover_every_shard(images, cache_copy):
    """The manifest's count and the compacted index cover every shard's files, and the index
    is compacted into index.jsonl (no segment left)."""
    redo = next(k for k in sorted(GOOD) if shard_of(k, 2) == 0)
    os.remove(feature_path(cache_copy, redo))
    summary = extract_features(images, extract_cfg(cache_copy, num_shards=2, shard_index=0),
                               progress=False)
    assert summary["extracted"] == 1 and summary["skipped"] > 0
    assert summary["count"] == len(GOOD)                        # both shards' files
    index = feature_index.load_index(cache_copy)
    assert sorted(index.entries) == sorted(GOOD)
    assert all(len(entries) == 1 for entries in index.entries.values())
    assert os.listdir(feature_index.segments_dir(cache_copy)) == []


def _restore_mtime(path, st):
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_rerun_replaces_damaged_files_and_verify_reads_values(images, extracted, cache_copy):
    keys = list_images(images)
    reference = {k: np.load(feature_path(extracted[0], k)) for k in ("a.jpg", "b.png")}
    path_a, path_b = feature_path(cache_copy, "a.jpg"), feature_path(cache_copy, "b.png")
    with open(path_a, "r+b") as f:
        f.truncate(os.path.getsize(path_a) // 2)                 # truncated: its stat changes
    st_b = os.stat(path_b)
    with open(path_b, "r+b") as f:                               # bit rot: the stat does not
        f.seek(128)
        f.write(np.full(1000, np.nan, np.float16).tobytes())
    _restore_mtime(path_b, st_b)

    summary = extract_features(images, extract_cfg(cache_copy), keys=keys, progress=False)
    assert summary["extracted"] == 1 and summary["repaired"] == 1   # index + stat: a.jpg
    assert summary["invalid"] == {"a.jpg": feature_index.REWRITTEN}
    summary = extract_features(images, extract_cfg(cache_copy, verify=True), keys=keys,
                               progress=False)
    assert summary["extracted"] == 1 and summary["repaired"] == 1   # full read: b.png
    assert summary["invalid"] == {"b.png": "non-finite values"}
    assert "unusable feature file" in format_summary(summary)
    for key, ref in reference.items():
        path = feature_path(cache_copy, key)
        assert check_feature_file(path, "float16", full=True) is None
        np.testing.assert_allclose(np.load(path).astype(np.float32), ref.astype(np.float32),
                                   rtol=1e-2, atol=1e-2 * np.abs(ref).max())


def test_changed_images_are_extracted_again(images, extracted, cache_copy, tmp_path):
    """Same name, new content and mtime: extracted again; new mtime, same bytes: re-indexed;
    same size and mtime, other bytes: only --verify (sha256) notices."""
    work = str(tmp_path / "images")
    shutil.copytree(images, work)                                # keeps sizes and mtimes
    keys = list_images(work)
    write_rgb(os.path.join(work, "a.jpg"), scene(21))             # new content
    os.utime(os.path.join(work, "b.png"))                         # touched only
    bmp = os.path.join(work, "bitmap.bmp")
    st = os.stat(bmp)
    with open(bmp, "r+b") as f:                                   # pixels changed in place
        f.seek(st.st_size - 3000)
        f.write(bytes(range(256)) * 4)
    _restore_mtime(bmp, st)

    summary = extract_features(work, extract_cfg(cache_copy), keys=keys, progress=False)
    assert summary["extracted"] == 1 and summary["changed_images"] == 1
    assert summary["invalid"] == {"a.jpg": feature_index.IMAGE_CHANGED}
    # a copy of the first folder (its other images the same files): an edit, not refused
    assert summary["replaced_others"] == {"a.jpg": images}
    assert summary["reindexed"] == 1 and "changed image" in format_summary(summary)
    before = np.load(feature_path(extracted[0], "a.jpg")).astype(np.float32)
    assert not np.allclose(np.load(feature_path(cache_copy, "a.jpg")), before, atol=1e-2)

    summary = extract_features(work, extract_cfg(cache_copy), keys=keys, progress=False)
    assert summary["extracted"] == 0 and summary["reindexed"] == 0
    summary = extract_features(work, extract_cfg(cache_copy, verify=True), keys=keys,
                               progress=False)
    assert summary["extracted"] == 1 and summary["changed_images"] == 1
    assert "other content" in summary["invalid"]["bitmap.bmp"]
    _, problems = feature_cache.usable_features(cache_copy, GOOD, read_manifest(cache_copy),
                                                work)
    assert problems == {}


def _with_changed_bitmap(images, tmp_path) -> str:
    """A copy of `images` (sizes and mtimes kept) whose bitmap.bmp has other pixels under
    the same size and mtime: only --verify (sha256) tells."""
    work = str(tmp_path / "images")
    shutil.copytree(images, work)
    bmp = os.path.join(work, "bitmap.bmp")
    st = os.stat(bmp)
    with open(bmp, "r+b") as f:
        f.seek(st.st_size - 3000)
        f.write(bytes(range(256)) * 4)
    _restore_mtime(bmp, st)
    return work


def test_a_verify_finding_is_named_by_the_refusal_that_stops_the_run(images, cache_copy,
                                                                     tmp_path):
    """--verify found an image changed under the same size and mtime, and a refusal (here:
    a train reads the cache) stopped the run without a word of it: the index still vouched
    for the old features, and train went on with them. The refusal names them now."""
    work = _with_changed_bitmap(images, tmp_path)
    path = feature_path(cache_copy, "bitmap.bmp")
    before = os.stat(path).st_mtime_ns
    with feature_cache.using_features(cache_copy, writing=False):        # a running train
        with pytest.raises(feature_cache.CacheInUse) as e:
            extract_features(work, extract_cfg(cache_copy, verify=True),
                             keys=list_images(work), progress=False)
    assert "is reading its features now" in str(e.value)
    assert ("Also, --verify found 1 image whose content changed under the same size and "
            "modification time (e.g. bitmap.bmp): its feature file is still of the image as "
            "it was" in str(e.value))
    assert os.stat(path).st_mtime_ns == before                           # nothing changed
    refusal = extract._naming_unmarked(extract._refuse_replacing(work, {"a.jpg": images}),
                                       ["bitmap.bmp", "b.png"])
    assert refusal.message.startswith(f"--images {work}: 1 of its images have the names")
    assert "--verify found 2 images whose content changed" in refusal.message
    assert "(e.g. bitmap.bmp): their feature files are still" in refusal.message


def test_a_verify_finding_survives_a_run_stopped_before_its_turn(images, cache_copy, tmp_path,
                                                                 monkeypatch, capsys):
    """A run stopped after --verify found an image changed under the same size and mtime
    (Ctrl-C, a kill, random weights that cannot be read) left the old features vouched
    for by the index: train took them. They are removed before anything else, so they are
    "missing" until extracted."""
    from caption_attn.backbone import Backbone

    work = _with_changed_bitmap(images, tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Backbone, "from_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_features(work, extract_cfg(cache_copy, verify=True), keys=list_images(work),
                         progress=False)
    assert "the same command extracts them" in capsys.readouterr().err
    _, problems = feature_cache.usable_features(cache_copy, GOOD, read_manifest(cache_copy),
                                                work)
    assert problems == {"bitmap.bmp": "missing"}


def test_a_folder_sharing_fewer_images_than_it_changes_is_no_copy(images, cache_copy,
                                                                  tmp_path):
    """One image copied from the cache's folder into a folder of other images made the whole
    folder pass for a copy (an edited dataset): its same-named images of other content
    replaced the first folder's features with a note, where another dataset is refused."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy2(os.path.join(images, "gray.jpg"), other / "gray.jpg")   # the very file
    write_rgb(str(other / "a.jpg"), scene(33))                            # other content
    write_rgb(str(other / "b.png"), scene(35))                            # other content
    with pytest.raises(UserError, match=rf"^--images {other}: 2 of its images have the names "
                                        rf"of images of {images}"):
        extract_features(str(other), extract_cfg(cache_copy),
                         keys=["a.jpg", "b.png", "gray.jpg"], progress=False)
    # with as many of its images the very files as it changes: a copy, edited
    for name in ("rgba.png",):
        shutil.copy2(os.path.join(images, name), other / name)
    summary = extract_features(str(other), extract_cfg(cache_copy), progress=False)
    assert summary["replaced_others"] == {"a.jpg": images, "b.png": images}


def test_images_missing_here_are_no_evidence_of_a_copy(images, cache_copy, tmp_path):
    """The caption file's images missing from --images kept their features and counted as
    this folder's images the very files of the cache's folder: a folder of two other
    images sharing two names passed for a copy, and their features were replaced."""
    other = tmp_path / "other"
    write_rgb(str(other / "a.jpg"), scene(33))
    write_rgb(str(other / "b.png"), scene(35))
    keys = ["a.jpg", "b.png", "sub/c.jpg", "gray.jpg"]      # the last two: not in `other`
    before = os.stat(feature_path(cache_copy, "a.jpg")).st_mtime_ns
    with pytest.raises(UserError, match=rf"^--images {other}: 2 of its images have the names "
                                        rf"of images of {images}"):
        extract_features(str(other), extract_cfg(cache_copy), keys=keys, progress=False)
    assert os.stat(feature_path(cache_copy, "a.jpg")).st_mtime_ns == before


def test_same_names_from_another_images_folder_are_refused(images, cache_copy, tmp_path):
    """Extracting a second dataset into a cache replaced the features of its same-named images
    (one file per image path) with a note after the fact, and every run on the first folder's
    captions then trained on the second's features. Refused now, before anything is written,
    naming the folder; --replace-other-images replaces them (with the note), and the images
    of a folder no other holds, or the same folder again, are extracted as before (so are
    those of a copy of the folder: test_changed_images_are_extracted_again)."""
    other = tmp_path / "other"
    write_rgb(str(other / "a.jpg"), scene(33))
    write_rgb(str(other / "new.jpg"), scene(34))
    before = {n: os.stat(os.path.join(cache_copy, n)).st_mtime_ns
              for n in os.listdir(cache_copy) if n.endswith(".npy")}
    with pytest.raises(UserError) as e:
        extract_features(str(other), extract_cfg(cache_copy), progress=False)
    assert str(e.value) == (
        f"--images {other}: 1 of its images have the names of images of {images} whose "
        f"features this cache holds, with other content (e.g. a.jpg): extracting would "
        f"replace those features, and runs on {images}'s captions would train on or be scored "
        f"against these images. A cache holds one feature file per image path: extract this "
        f"dataset into another --cache (one per dataset), or, if these images are to replace "
        f"those, add --replace-other-images")
    assert {n: os.stat(os.path.join(cache_copy, n)).st_mtime_ns for n in os.listdir(cache_copy)
            if n.endswith(".npy")} == before
    summary = extract_features(str(other), extract_cfg(cache_copy, replace_other_images=True),
                               progress=False)
    assert summary["changed_images"] == 1 and summary["replaced_others"] == {"a.jpg": images}
    assert (f"note: 1 of these images had been extracted from {images}: same path, other "
            f"content" in format_summary(summary))
    assert read_manifest(cache_copy)["images_dirs"] == [images, str(other)]
    summary = extract_features(str(other), extract_cfg(cache_copy), progress=False)
    assert summary["replaced_others"] == {} and "note:" not in format_summary(summary)
    # back to the first folder: its a.jpg is now the one another folder's features are of
    with pytest.raises(UserError, match=f"1 of its images have the names of images of {other}"):
        extract_features(images, extract_cfg(cache_copy), keys=["a.jpg"], progress=False)


def test_a_folder_walk_takes_jfif_and_notes_the_files_it_leaves_out(cache_copy, tmp_path):
    """Without --captions, real JPEGs named .jfif and a .heic were skipped without a word (12
    of 24 images of a folder); a rerun said "skipped 12 already done" (the 12 it had taken).
    .jfif is an image now, and the summary counts the files left out, naming two."""
    work = tmp_path / "work"
    write_rgb(str(work / "p.jpg"), scene(41))
    write_rgb(str(work / "q.jpg"), scene(42))
    os.rename(work / "q.jpg", work / "q.jfif")
    for name in ("r.heic", "s.heic", "notes.txt", ".hidden.heic"):
        (work / name).write_bytes(b"x")
    for extracted, skipped in ((2, 0), (0, 2)):          # and the rerun
        summary = extract_features(str(work), extract_cfg(cache_copy), progress=False)
        assert (summary["extracted"], summary["skipped"]) == (extracted, skipped)
        assert summary["left_out"] == ["notes.txt", "r.heic", "s.heic"]
        assert (f"note: left out 3 file(s) under --images {work} whose extension is not an "
                f"image's (notes.txt, r.heic, ...); images are taken by extension: .jpg .jpeg "
                f".jpe .jfif" in format_summary(summary))
    summary = extract_features(str(work), extract_cfg(cache_copy), keys=["p.jpg"],
                               progress=False)
    assert summary["left_out"] == [] and "left out" not in format_summary(summary)


def _heatmap_png(seed: int) -> bytes:
    """A PNG carrying the mark of the heatmaps `caption --plot-attention` draws."""
    return mark_heatmap(cv2.imencode(".png", scene(seed, 64, 48))[1].tobytes())


def test_a_folder_walk_leaves_out_the_heatmaps_caption_drew(cache_copy, tmp_path):
    """`caption photos --plot-attention photos/heat`, then `extract-features --images photos`:
    the heatmaps were extracted as dataset images without a word (features of heatmaps in
    the cache). The walk leaves out every PNG with the heatmap mark and a note counts them."""
    work = tmp_path / "work"
    write_rgb(str(work / "p.jpg"), scene(43))
    write_rgb(str(work / "heat" / "q.png"), scene(44))         # a photo among them
    for name in ("heat/p.png", "heat/r.png"):
        (work / name).write_bytes(_heatmap_png(45))
    summary = extract_features(str(work), extract_cfg(cache_copy), progress=False)
    assert (summary["extracted"], summary["failed"]) == (2, 0)
    assert summary["heatmaps"] == ["heat/p.png", "heat/r.png"]
    assert not os.path.exists(feature_path(cache_copy, "heat/p.png"))
    assert (f"note: left out 2 heatmaps caption-attn drew under --images {work} (heat/p.png, "
            f"heat/r.png): they are not photos (`caption --plot-attention` marks each PNG it "
            f"writes)" in format_summary(summary))
    os.remove(work / "heat" / "q.png")
    with pytest.raises(UserError, match=rf"^--images {re.escape(str(work / 'heat'))}: no image "
                                        rf"files found .*\); left out 2 heatmaps "
                                        rf"caption-attn drew there \(p.png, r.png\): they "
                                        rf"are not photos$"):
        extract_features(str(work / "heat"), extract_cfg(cache_copy), progress=False)


def test_a_heatmap_the_caption_file_names_fails_and_loses_old_features(cache_copy, tmp_path,
                                                                        monkeypatch):
    """A caption file naming a heatmap caption-attn drew: not extracted as an image, but one
    failure naming it (failed.tsv, the summary, --strict); features an earlier version
    extracted of it are removed (`train` would have used them), not while a train reads."""
    work = tmp_path / "work"
    write_rgb(str(work / "p.jpg"), scene(46))
    (work / "heat").mkdir()
    (work / "heat" / "p.png").write_bytes(_heatmap_png(47))
    keys = ["p.jpg", "heat/p.png"]
    with monkeypatch.context() as m:        # a version that did not know the mark
        m.setattr(extract, "is_heatmap_file", lambda *a, **k: False)
        assert extract_features(str(work), extract_cfg(cache_copy), keys=keys,
                                progress=False)["extracted"] == 2
    old = feature_path(cache_copy, "heat/p.png")
    with feature_cache.using_features(cache_copy, writing=False):
        with pytest.raises(UserError, match="is reading its features now; extracting would "):
            extract_features(str(work), extract_cfg(cache_copy), keys=keys, progress=False)
    assert os.path.exists(old)
    summary = extract_features(str(work), extract_cfg(cache_copy), keys=keys, progress=False)
    assert summary["failures"] == {"heat/p.png": extract.HEATMAP}
    assert summary["stale_removed"] == {"heat/p.png": extract.HEATMAP}
    assert (summary["skipped"], summary["failed"], summary["exit_code"]) == (1, 1, 0)
    assert not os.path.exists(old)
    assert read_failed(cache_copy)["heat/p.png"] == extract.HEATMAP
    text = format_summary(summary)
    assert ("removed 1 outdated feature file(s) whose image fails now: heat/p.png: a heatmap "
            "caption-attn drew (caption --plot-attention), not a photo: take it out of the "
            "caption file" in text)
    assert (f"failed images are listed in {os.path.join(cache_copy, 'failed.tsv')}: "
            f"heat/p.png: a heatmap caption-attn drew" in text)
    summary = extract_features(str(work), extract_cfg(cache_copy, strict=True), keys=keys,
                               progress=False)
    assert summary["failures"] == {"heat/p.png": extract.HEATMAP}
    assert summary["stale_removed"] == {} and summary["exit_code"] == 1


def test_a_file_name_that_is_not_utf8_fails_alone(images, cache_copy, tmp_path):
    """A Latin-1 file name (caf\xe9.jpg, from an old archive) reaches Python as 'caf\udce9.jpg',
    which cannot be hashed for its shard nor written to the index: the whole run died with a
    UnicodeEncodeError traceback. It is one failed image now, listed readably."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(os.path.join(images, "a.jpg"), work / "a.jpg")
    shutil.copy(os.path.join(images, "b.png"), os.path.join(bytes(work), b"caf\xe9.jpg"))
    summary = extract_features(str(work), extract_cfg(cache_copy), progress=False)
    assert summary["failures"] == {"caf\\xe9.jpg": "file name is not valid UTF-8: rename the "
                                                    "file"}
    assert summary["exit_code"] == 0 and read_failed(cache_copy)["caf\\xe9.jpg"]


def test_an_image_name_too_long_for_its_feature_file_fails_alone(images, cache_copy, tmp_path):
    """80 CJK characters are a legal 244-byte file name, but its feature file's temporary name
    (.NAME.npy.tmp.PID.HOST) is not: the writer's ENAMETOOLONG stopped the whole run, with no
    failed.tsv and no count. It is one failed image now, refused before any extraction."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(os.path.join(images, "a.jpg"), work / "a.jpg")
    long_name = "\u732b" * 80 + ".jpg"                      # 244 bytes in UTF-8
    shutil.copy(os.path.join(images, "b.png"), work / long_name)
    summary = extract_features(str(work), extract_cfg(cache_copy), progress=False)
    assert list(summary["failures"]) == [long_name]
    assert "file name too long for the feature cache" in summary["failures"][long_name]
    assert summary["exit_code"] == 0 and long_name in read_failed(cache_copy)
    assert summary["skipped"] == 1


def test_names_with_tabs_and_newlines_stay_one_entry_each_in_failed_tsv(images, cache_copy,
                                                                         tmp_path):
    """Linux allows a tab or a newline in a file name: written raw, "a\tb.jpg" read back as
    the key "a" failed for "b.jpg\t...", and "c\nd.jpg" as two lines, so a fixed image's
    entry was never removed. Fields are escaped as \\t, \\n, \\r and \\\\."""
    work = tmp_path / "work"
    work.mkdir()
    names = ["a\tb.jpg", "c\nd.jpg", "e\\nf.jpg", "g\rh.jpg"]
    for name in names:
        (work / name).write_text("not pixels")
    shutil.copy(os.path.join(images, "a.jpg"), work / "ok.jpg")
    before = read_failed(cache_copy)
    summary = extract_features(str(work), extract_cfg(cache_copy), progress=False)
    assert sorted(summary["failures"]) == sorted(names)
    failed = read_failed(cache_copy)
    assert failed == {**before, **{name: summary["failures"][name] for name in names}}
    with open(os.path.join(cache_copy, "failed.tsv"), "rb") as f:
        lines = f.read().split(b"\n")[:-1]
    assert len(lines) == len(failed) and all(line.count(b"\t") == 1 for line in lines)
    assert any(line.startswith(b"a\\tb.jpg\t") for line in lines)
    assert b"\r" not in b"".join(lines)
    # fixed images leave failed.tsv, the others stay
    for name in names[:2]:
        shutil.copy(os.path.join(images, "a.jpg"), work / name)
    extract_features(str(work), extract_cfg(cache_copy), progress=False)
    assert sorted(set(read_failed(cache_copy)) - set(before)) == sorted(names[2:])


def test_changed_image_that_now_fails_is_reported_failed_and_its_old_file_removed(
        images, cache_copy, tmp_path):
    """An image truncated after extraction: not "extracted again" but failed, and its old
    features (of the image as it was) are neither counted nor vouched for by the index."""
    work = str(tmp_path / "images")
    shutil.copytree(images, work)
    keys = list_images(work)
    path = os.path.join(work, "b.png")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)                  # new size: image changed
    summary = extract_features(work, extract_cfg(cache_copy), keys=keys, progress=False)
    assert "b.png" in summary["failures"] and "b.png" not in summary["invalid"]
    assert summary["stale_removed"] == {"b.png": feature_index.IMAGE_CHANGED}
    text = format_summary(summary)
    assert "extracted again" not in text and "removed 1 outdated feature file" in text
    assert summary["count"] == len(GOOD) - 1
    assert "b.png" in read_failed(cache_copy)
    assert not os.path.exists(feature_path(cache_copy, "b.png"))
    assert "b.png" not in feature_index.load_index(cache_copy).entries
    usable, problems = feature_cache.usable_features(cache_copy, GOOD,
                                                     read_manifest(cache_copy))
    assert "b.png" not in usable and "b.png" in problems


def test_an_image_replaced_by_a_fifo_fails_alone_instead_of_hanging_the_rerun(
        images, cache_copy, tmp_path):
    """An image replaced by a FIFO has a new stat, so the rerun hashed it (an edit or only a
    touch?) with a plain open(), which waits for a writer forever, in a pool thread even
    Ctrl-C waited for. It is read as the decode path reads it now: not a regular file, it
    fails alone and its old features are removed."""
    work = str(tmp_path / "images")
    shutil.copytree(images, work)
    fifo = os.path.join(work, "a.jpg")
    os.remove(fifo)
    os.mkfifo(fifo)
    result = []
    hashing = threading.Thread(target=lambda: result.append(extract._image_sha256(work, "a.jpg")),
                               daemon=True)
    hashing.start()
    hashing.join(10)
    hung = hashing.is_alive()
    while hashing.is_alive():   # let a thread stuck in open() go: a writer, then end of file
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        hashing.join(0.1)
    assert not hung and result == [extract._UNREADABLE]

    summary = extract_features(work, extract_cfg(cache_copy), keys=["a.jpg", "b.png"],
                               progress=False)
    assert summary["failures"]["a.jpg"].startswith("not a regular file")
    assert summary["stale_removed"] == {"a.jpg": feature_index.IMAGE_CHANGED}
    assert summary["skipped"] == 1 and not os.path.exists(feature_path(cache_copy, "a.jpg"))


EXTRACT_AS_USER = """
import json, sys
sys.path.insert(0, "tests")
from caption_attn.extract import extract_features, format_summary
from image_samples import extract_cfg
summary = extract_features(sys.argv[1], extract_cfg(sys.argv[2]), progress=False)
print(format_summary(summary))
print(json.dumps({k: summary[k] for k in ("skipped", "failed", "unreadable_folders", "images",
                                          "failures", "exit_code")}))
print("--- the changed image")
summary = extract_features(sys.argv[3], extract_cfg(sys.argv[4]), keys=["a.jpg", "b.png"],
                           progress=False)
print(json.dumps({k: summary[k] for k in ("skipped", "failures", "exit_code",
                                          "stale_removed")}))
"""


@pytest.fixture(scope="module")
def extracted_as_user(images, extracted, tmp_path_factory):
    """The extractions of the two tests below, each into its own copy of the `extracted`
    cache, run in one process as a user to whom file permissions apply (each such process
    imports TensorFlow and reads the backbone: ~5 s of CPU): per test, its images folder,
    its cache and what the extraction printed."""
    root = tmp_path_factory.mktemp("as_user")
    folder, changed = root / "folder", root / "changed"
    for case in (folder, changed):
        shutil.copytree(extracted[0], case / "cache")
    work = folder / "images"                                      # a folder it cannot list
    for key in GOOD:                                              # all extracted already
        os.makedirs(os.path.dirname(work / key), exist_ok=True)
        shutil.copy2(os.path.join(images, key), work / key)
    (changed / "images").mkdir()
    for key in ("a.jpg", "b.png"):                                # as extracted
        shutil.copy2(os.path.join(images, key), changed / "images" / key)
    write_rgb(str(changed / "images" / "a.jpg"), scene(21))        # another picture ...
    os.chmod(work / "sub", 0)
    os.chmod(changed / "images" / "a.jpg", 0)                      # ... that cannot be read
    try:
        out = run_as_user(EXTRACT_AS_USER, str(work), str(folder / "cache"),
                          str(changed / "images"), str(changed / "cache"), cwd=REPO)
    finally:
        os.chmod(work / "sub", 0o755)
        os.chmod(changed / "images" / "a.jpg", 0o644)
    assert out.returncode == 0, out.stderr
    printed = out.stdout.split("--- the changed image\n")
    assert len(printed) == 2, out.stdout + out.stderr
    return {"folder": (str(work), str(folder / "cache"), printed[0]),
            "changed": (str(changed / "images"), str(changed / "cache"), printed[1])}


def test_a_folder_that_cannot_be_read_is_a_failure_in_failed_tsv(extracted_as_user):
    """A subfolder of --images that cannot be listed was skipped without a word: its images
    neither extracted nor in failed.tsv, exit 0. It is listed there (FOLDER/) until a run
    can read it."""
    work, cache, stdout = extracted_as_user["folder"]
    reason = "folder cannot be read (Permission denied): its images were not listed"
    # the folder is no image: not in the counts of images (it was "failed 1 of 7 images")
    assert json.loads(stdout.splitlines()[-1]) == {
        "skipped": len(GOOD) - 2, "failed": 0, "unreadable_folders": 1,
        "images": len(GOOD) - 2, "failures": {"sub/": reason}, "exit_code": 0}
    assert f"failed 0 of {len(GOOD) - 2} images (1 folder(s) could not be read)" in stdout
    assert read_failed(cache) == {**BAD, "sub/": reason}
    summary = extract_features(work, extract_cfg(cache), progress=False)
    assert summary["skipped"] == len(GOOD) and summary["failed"] == 0
    assert read_failed(cache) == BAD


def test_changed_image_that_cannot_be_read_is_reported_failed_not_done(extracted_as_user):
    """An image replaced since extraction by one this user cannot read kept its old features
    as "already done" (its sha256 could not be taken, as if it were gone); train then refused
    them as changed and advised extract-features, which said "already done" again. It fails
    now with the reason, and its outdated feature file is removed."""
    _, cache, stdout = extracted_as_user["changed"]
    assert json.loads(stdout) == {
        "skipped": 1, "failures": {"a.jpg": "unreadable (Permission denied)"}, "exit_code": 0,
        "stale_removed": {"a.jpg": feature_index.IMAGE_CHANGED}}
    assert read_failed(cache)["a.jpg"] == "unreadable (Permission denied)"
    assert not os.path.exists(feature_path(cache, "a.jpg"))


def test_a_feature_file_that_cannot_be_written_is_named(images, cache_copy, monkeypatch):
    """A write that failed (disk full, quota, EFBIG) was reported with the path of the next
    file queued, or with none ("cannot write features into CACHE: ...")."""
    import errno
    real = extract.write_bytes_atomic
    bad = feature_path(cache_copy, "a.jpg")

    def write(path, *args, **kwargs):
        if path == bad:
            raise OSError(errno.EFBIG, "File too large")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(extract, "write_bytes_atomic", write)
    keys = ["a.jpg", "b.png", "cmyk.jpg", "gray.jpg"]
    for key in keys:
        os.remove(feature_path(cache_copy, key))
    with pytest.raises(UserError) as e:
        extract_features(images, extract_cfg(cache_copy, batch_size=1), keys=keys,
                         progress=False)
    # the job ran and failed: exit code 1 (it was 2, "bad input, nothing was done")
    assert e.value.exit_code == 1
    assert str(e.value).startswith(f"cannot write {bad} (File too large): free space ")


@pytest.mark.parametrize("code", ["EINVAL", "EILSEQ", "ENAMETOOLONG", "EINVAL of a write"])
def test_a_name_the_cache_file_system_refuses_fails_that_image_only(images, cache_copy,
                                                                    monkeypatch, code):
    """A cache on an exFAT or FAT drive and an image named `IMG 10:32.jpg` (EINVAL), a name
    not in the drive's character set (EILSEQ), or a folder longer than its limit: the whole
    run stopped with "cannot write ... free space there", and every rerun stopped at that
    image again. It fails alone, in failed.tsv with the reason; the rest are extracted."""
    import errno
    real = extract.write_bytes_atomic
    bad = feature_path(cache_copy, "b.png")

    def write(path, *args, **kwargs):
        if path == bad:
            number = getattr(errno, code.split()[0])
            if code.endswith("write"):   # no file named: the disk's error, not the name's
                raise OSError(number, os.strerror(number))
            raise OSError(number, os.strerror(number), path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(extract, "write_bytes_atomic", write)
    keys = ["a.jpg", "b.png", "cmyk.jpg", "gray.jpg"]
    for key in keys:
        os.remove(feature_path(cache_copy, key))
    if code.endswith("write"):
        with pytest.raises(UserError, match=rf"^cannot write {re.escape(bad)} \(Invalid "):
            extract_features(images, extract_cfg(cache_copy, batch_size=1), keys=keys,
                             progress=False)
        return
    summary = extract_features(images, extract_cfg(cache_copy, batch_size=1), keys=keys,
                               progress=False)
    assert (summary["exit_code"], summary["extracted"], summary["failed"]) == (0, 3, 1)
    reason = summary["failures"]["b.png"]
    assert reason.startswith(f"its feature file's name is refused by the --cache file system "
                             f"({os.strerror(getattr(errno, code))}): rename the image"), reason
    assert feature_cache.read_failed(cache_copy)["b.png"] == reason
    assert not os.path.exists(bad)


def test_out_of_memory_in_the_backbone_is_one_line_and_keeps_what_was_written(
        images, cache_copy, monkeypatch):
    """`--batch-size 1024` on a GPU: TensorFlow's ResourceExhaustedError ended the command in
    a traceback (train says it in a line, with what to do)."""
    import tensorflow as tf

    from caption_attn.backbone import Backbone
    keys = ["a.jpg", "b.png", "cmyk.jpg", "gray.jpg"]
    for key in keys:
        os.remove(feature_path(cache_copy, key))
    real, calls = Backbone.__call__, []

    def call(self, batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise tf.errors.ResourceExhaustedError(
                None, None, "Graph execution error:\n\nOOM when allocating tensor with "
                            "shape[1,147,147,64]")
        return real(self, batch)
    monkeypatch.setattr(Backbone, "__call__", call)
    with pytest.raises(UserError) as e:
        extract_features(images, extract_cfg(cache_copy, batch_size=1), keys=keys,
                         progress=False)
    assert e.value.exit_code == 1 and isinstance(e.value, OutOfMemory)   # the demo's to say
    assert str(e.value) == (
        "out of memory in the backbone at --batch-size 1 (OOM when allocating tensor with "
        "shape[1,147,147,64]); rerun with a lower --batch-size: the feature files written so "
        "far are kept, and the command rerun goes on with the rest")
    monkeypatch.setattr(Backbone, "__call__", real)      # the rerun goes on from there
    summary = extract_features(images, extract_cfg(cache_copy, batch_size=1), keys=keys,
                               progress=False)
    assert (summary["skipped"], summary["extracted"]) == (1, 3)


def test_an_index_segment_that_cannot_be_written_is_named_with_exit_code_1(
        images, cache_copy, monkeypatch, capsys):
    """The disk filled while the feature index was written (the .npy files fitted): it said
    `error: No space left on device`, no file, exit 1; a failed .npy write said `cannot write
    PATH: [Errno 28] ...`, exit 2."""
    import errno

    from caption_attn.cli import main
    real = feature_index.write_bytes_atomic
    segments = feature_index.segments_dir(cache_copy)

    def write(path, *args, **kwargs):
        if os.path.dirname(path) == segments:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(feature_index, "write_bytes_atomic", write)
    keys = ["a.jpg", "b.png"]
    for key in keys:
        os.remove(feature_path(cache_copy, key))
    code = main(["extract-features", "--images", images, "--cache", cache_copy,
                 "--weights", "random", "--dtype", "float16", "--batch-size", "1"])
    err = capsys.readouterr().err
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"caption-attn extract-features: error: cannot write the feature index's segment "
        rf"{re.escape(segments)}/\S+\.jsonl \(No space left on device\): free space .*",
        line), line


def test_lost_manifest_never_adopts_other_backbones_files(images, cache_copy):
    os.remove(os.path.join(cache_copy, "manifest.json"))
    summary = extract_features(images, extract_cfg(cache_copy, seed=1), progress=False)
    assert summary["skipped"] == 0 and summary["extracted"] == len(GOOD)
    assert set(summary["invalid"]) == set(GOOD)
    assert all(r.startswith("made by another backbone") for r in summary["invalid"].values())
    manifest = read_manifest(cache_copy)
    paths, problems = feature_cache.usable_features(cache_copy, GOOD, manifest, images)
    assert len(paths) == len(GOOD) and problems == {}
    assert summary["count"] == len(GOOD) == manifest["count"]


def test_lost_manifest_same_backbone_keeps_its_files(images, cache_copy):
    os.remove(os.path.join(cache_copy, "manifest.json"))
    summary = extract_features(images, extract_cfg(cache_copy), progress=False)
    assert summary["extracted"] == 0 and summary["skipped"] == len(GOOD)


def test_progress_in_a_log_is_one_line(images, cache_copy, capsys):
    """stdout not a terminal (a log file; here pytest's capture): Keras' Progbar writes one
    line at the end, with the failed count."""
    os.remove(feature_path(cache_copy, "a.jpg"))
    extract_features(images, extract_cfg(cache_copy), keys=["a.jpg", "notes.jpg"])
    out = capsys.readouterr().out
    assert out.startswith("2/2 - ") and out.count("\n") == 1 and "failed: 1" in out


# --------------------------------------------------------------------------- processes
RUNNER = """
import sys
from caption_attn import feature_index
from caption_attn.config import ExtractConfig
from caption_attn.extract import extract_features
images, cache, shards, index = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
feature_index.FLUSH_SECONDS = float(sys.argv[5])
cfg = ExtractConfig(cache=cache, weights="random", dtype="float16", batch_size=2,
                    num_shards=shards, shard_index=index)
s = extract_features(images, cfg, progress=False)
print(s["extracted"], s["skipped"], s["failed"], s["count"])
"""


def _runner(images, cache, shards=1, index=0, flush_seconds=10.0):
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(images), str(cache), str(shards),
                             str(index), str(flush_seconds)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def _npy_files(cache):
    out = []
    for root, _, names in os.walk(cache):
        out += [os.path.join(root, n) for n in names if n.endswith(".npy")
                and not n.startswith(".")]
    return out


def _indexed(cache):
    """Keys whose index entry describes their feature file on disk."""
    index = feature_index.load_index(str(cache))
    return {k for k in index.entries
            if index.match(k, os.stat(feature_path(str(cache), k)))}


def _check_compacted_index(cache, keys):
    """index.jsonl holds exactly one matching entry per key, and no segment is left."""
    assert os.listdir(feature_index.segments_dir(str(cache))) == []
    index = feature_index.load_index(str(cache))
    assert sorted(index.entries) == sorted(keys)
    fingerprint = feature_cache.cache_identity(read_manifest(str(cache)))["fingerprint"]
    for key, entries in index.entries.items():
        assert len(entries) == 1 and entries[0].identity == fingerprint
        assert entries[0].matches_file(os.stat(feature_path(str(cache), key)))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path):
    """A killed extraction leaves whole feature files and a consistent index (whole segments:
    flushed here every 0.1 s); the rerun skips exactly the indexed files and extracts the rest,
    including files written after the last segment."""
    images, cache = tmp_path / "images", tmp_path / "cache"
    for i in range(16):
        write_rgb(str(images / f"img_{i:02d}.jpg"), scene(i))
    proc = _runner(images, cache, flush_seconds=0.1)
    deadline = time.monotonic() + 240
    while len(_npy_files(cache)) < 5:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _npy_files(cache)
    assert 5 <= len(done) < 16
    for path in done:                                           # no invalid final file
        assert check_feature_file(path, "float16", full=True) is None, path
    indexed = _indexed(cache)
    assert indexed <= {os.path.relpath(p, cache)[:-4] for p in done}
    assert len(indexed) >= 2                                    # segments were flushed

    # the rerun in this process (the RUNNER's settings): a second TensorFlow import bought
    # nothing the killed process does not already test
    s = extract_features(str(images), extract_cfg(cache, batch_size=2), progress=False)
    assert s["skipped"] == len(indexed) and s["extracted"] == 16 - len(indexed)
    assert s["failed"] == 0 and s["count"] == 16 and len(_npy_files(cache)) == 16
    leftovers = [n for _, _, names in os.walk(cache) for n in names if ".tmp." in n]
    assert leftovers == []
    _check_compacted_index(cache, [f"img_{i:02d}.jpg" for i in range(16)])


@pytest.mark.slow
def test_concurrent_shards_share_one_cache(tmp_path):
    images, cache = tmp_path / "images", tmp_path / "cache"
    keys = [f"img_{i:02d}.jpg" for i in range(10)]
    for i, key in enumerate(keys):
        write_rgb(str(images / key), scene(i))
    bad = ["bad_0.jpg", "bad_1.jpg", "bad_2.jpg", "bad_3.jpg"]
    for key in bad:
        (images / key).write_text("not an image")
    procs = [_runner(images, cache, 2, i) for i in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(list(map(int, out.split())))
    assert sum(r[0] for r in results) == len(keys)              # each image exactly once
    assert sum(r[2] for r in results) == len(bad)
    assert sorted(os.path.relpath(p, cache)[:-4] for p in _npy_files(cache)) == keys
    assert set(read_failed(str(cache))) == set(bad)
    m = read_manifest(str(cache))
    assert m["count"] == len(keys)
    with open(os.path.join(cache, "manifest.json")) as f:
        json.load(f)
    _check_compacted_index(cache, keys)


def test_cli_strict_failure_is_an_error_on_stderr_with_the_prefix(images, cache_copy, capsys):
    from caption_attn.cli import main
    code = main(["extract-features", "--images", images, "--cache", str(cache_copy),
                 "--weights", "random", "--seed", "0", "--dtype", "float16", "--batch-size",
                 "4", "--strict"])
    captured = capsys.readouterr()
    assert code == 1
    assert re.search(r"^caption-attn extract-features: error: \d+ image\(s\) failed and "
                     r"--strict is set$", captured.err, re.M)
    assert "error:" not in captured.out


def test_a_cache_that_is_a_file_is_refused_naming_the_flag_before_the_backbone(
        tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "open_cache", None)          # must not be reached
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    with pytest.raises(UserError, match=f"--cache {cache}: {cache} is a file, not a folder"):
        extract_features(str(tmp_path), extract_cfg(str(cache)))


def test_a_cache_that_is_a_folder_of_other_files_is_refused_before_the_backbone(
        tmp_path, monkeypatch):
    """`--cache RUN` (a trained run folder) exited 0 with 40 .npy files, an index and 88 MB
    of backbone weights among the run's files: any existing folder was taken for a cache.
    A folder without the cache's manifest.json that holds other files is refused, as
    `train --run` and `export --out` refuse a folder of other files; an empty one, or one
    holding only what a cache writes first (its lock), is fine."""
    monkeypatch.setattr(feature_cache, "open_cache", None)          # must not be reached
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    for name in ("config.json", "history.json"):
        (run / name).write_text("{}")
    with pytest.raises(UserError, match=rf"^--cache {run}: not a feature cache \(no "
                                        rf"manifest.json\) and not empty \(it holds "
                                        rf"checkpoints, config.json, history.json\); extract "
                                        rf"into a new or empty folder"):
        extract_features(str(tmp_path), extract_cfg(str(run)))
    assert sorted(os.listdir(run)) == ["checkpoints", "config.json", "history.json"]
    # the random weights alone: a first run killed before its manifest was written
    for i, fine in enumerate(((), (".lock",), ("backbone_random_seed0.weights.h5",))):
        folder = tmp_path / f"fine{i}"
        os.makedirs(folder)
        for name in fine:
            (folder / name).write_text("")
        feature_cache.check_cache_folder(str(folder))


def test_the_summary_lists_failed_and_re_extracted_images_one_line_each():
    """The summary printed failed image keys raw: an image named "a<newline>b.jpg" split the
    `failed images are listed in ...` line (a forged line), an ESC in a name drove the
    terminal. Written as \\n, \\x1b, as `caption` prints such names."""
    summary = dict(changed_images=0, repaired=0, extracted=0, skipped=0, failed=1, images=2,
                   shard="0/1", seconds=1.0, images_per_s=0.0, cache="c", count=1,
                   dtype="float16", weights="imagenet", feature_scale=1.0, reindexed=0,
                   invalid={"x\x1b[2J.jpg": "wrong size"}, stale_removed={},
                   failures={"a\nb.jpg": "truncated"}, failed_file="c/failed.tsv")
    lines = format_summary(summary).splitlines()
    assert len(lines) == 4 and "\x1b" not in "".join(lines)
    assert lines[2:] == ["extracted again: x\\x1b[2J.jpg: wrong size",
                         "failed images are listed in c/failed.tsv: a\\nb.jpg: truncated"]


def test_ctrl_c_while_the_feature_writer_finishes_keeps_its_queued_files(tmp_path,
                                                                           default_sigint):
    """A Ctrl-C while extract-features waited for its writer thread to finish the queued
    feature files ended the wait at once: the thread went on writing past the index's last
    segment, and the files it wrote then had no entry (extracted again by the rerun), or it
    died with the process in the middle of one. The queued files are now finished and
    indexed first; the Ctrl-C lands after."""
    import threading

    added = []

    class SlowIndex:                       # each entry takes 0.5 s: the wait is ~1.5 s long
        def add(self, entry):
            time.sleep(0.5)
            added.append(entry.key)

    header = feature_cache.npy_header("float16")
    writer = extract._Writer(header, "float16", 8, SlowIndex(), "identity", str(tmp_path))
    stamp = feature_index.ImageStamp(0, 0, "")
    for key in ("a.jpg", "b.jpg", "c.jpg"):
        writer.put(key, str(tmp_path / f"{key}.npy"), np.zeros((64, 2048), np.float32), stamp)
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))  # during the wait
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            writer.close()
    finally:
        timer.cancel()                     # never a stray Ctrl-C for a later test
    assert added == ["a.jpg", "b.jpg", "c.jpg"] and writer.written == added
    assert not writer.thread.is_alive()


def test_ctrl_c_while_the_decode_pool_shuts_down_still_finishes_the_writer(images, tmp_path,
                                                                             monkeypatch):
    """A Ctrl-C while extract-features waited for its decode pool to shut down skipped the
    writer's close: its thread wrote on unwaited, past the index's last segment."""
    closed = []
    real_close = extract._Writer.close
    real_shutdown = concurrent.futures.ThreadPoolExecutor.shutdown

    def interrupted_shutdown(self, *args, **kwargs):
        real_shutdown(self, *args, **kwargs)
        if self._thread_name_prefix == "decode":       # the pipeline's, not the planning's
            raise KeyboardInterrupt

    def close(self):
        closed.append(True)
        real_close(self)

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "shutdown",
                        interrupted_shutdown)
    monkeypatch.setattr(extract._Writer, "close", close)
    with pytest.raises(KeyboardInterrupt):
        extract_features(images, extract_cfg(tmp_path / "cache"), keys=GOOD[:2],
                         progress=False)
    assert closed == [True]


def test_an_interrupted_extraction_says_what_it_kept_and_that_a_rerun_continues(
        images, cache_copy, monkeypatch, capsys):
    """Ctrl-C or SIGTERM in an extraction said only "interrupted": not that the feature files
    written are kept and the same command continues with the rest. One line on stderr says
    how many, then the interrupt goes on (the CLI's exit 130 or 143)."""
    from caption_attn.backbone import Backbone

    todo = sorted(GOOD)[:3]
    for key in todo:
        os.remove(feature_path(cache_copy, key))
    real, calls = Backbone.__call__, []

    def interrupted(self, x):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(Backbone, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_features(images, extract_cfg(cache_copy, batch_size=1), keys=GOOD,
                         progress=False)
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"note: feature extraction stopped after 1 of the 3 feature files to "
        f"extract, written and kept in {cache_copy} ({len(GOOD) - 3} were "
        f"there before): the same command continues from there (only the other 2 are "
        f"extracted)"]
    monkeypatch.setattr(Backbone, "__call__", real)
    summary = extract_features(images, extract_cfg(cache_copy), keys=GOOD, progress=False)
    assert summary["extracted"] == 2 and summary["skipped"] == len(GOOD) - 2


def test_the_summary_says_another_shard_is_still_writing(images, cache_copy):
    """A shard that ended while another was still writing gave the cache's count at that
    moment as if it were the cache's ("cache c: 28 feature files"). The other writers hold
    the cache's .writing.lock: the summary names them."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_SH); print('locked', flush=True); sys.stdin.read()",
         os.path.join(cache_copy, feature_cache.WRITING)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        summary = extract_features(images, extract_cfg(cache_copy), keys=GOOD, progress=False)
    finally:
        holder.stdin.close()
        holder.wait()
    assert summary["other_writers"] == [holder.pid]
    line = format_summary(summary).splitlines()[1]
    assert line.startswith(f"cache {cache_copy}: {len(GOOD)} feature files so far (")
    assert f"; another extract-features (pid {holder.pid}: " in line
    assert line.endswith(") is still writing into it")
    summary = extract_features(images, extract_cfg(cache_copy), keys=GOOD, progress=False)
    assert summary["other_writers"] == []
    assert "still writing" not in format_summary(summary)


def _markers(cache):
    """The names of the markers of extractions running into `cache` (`extracting_from`)."""
    return sorted(n for n in os.listdir(cache) if n.startswith(feature_cache.EXTRACTING + "."))


def _while_extracting(monkeypatch, folder, action):
    """A list that receives what `action()` returns or raises (a UserError), called once
    while the extraction of `folder` is about to extract (its marker made and its folder
    registered, no feature file written yet): a second extraction started then."""
    real, seen = extract._extract_with_progress, []

    def paused(backbone, images_dir, *args):
        if images_dir == str(folder) and not seen:
            try:
                seen.append(action())
            except UserError as e:
                seen.append(e)
        return real(backbone, images_dir, *args)

    monkeypatch.setattr(extract, "_extract_with_progress", paused)
    return seen


def test_an_extraction_of_another_folder_running_into_the_cache_refuses_this_one(
        cache_copy, tmp_path, monkeypatch):
    """Two datasets with same-named images extracted into one cache at once (two terminals)
    both passed the refusal of another folder's same-named images, since neither's features
    were there yet, and of each such name the last writer's features stood for both folders,
    indexed as fine. The second is refused now, before it writes anything, naming the folder
    the first reads, with --replace-other-images too; once the first has ended, a rerun
    meets the refusal of same-named images of other content."""
    first, second = tmp_path / "coco", tmp_path / "other_coco"
    write_rgb(str(first / "x.jpg"), scene(40))
    write_rgb(str(second / "x.jpg"), scene(41))

    def second_run():
        try:
            extract_features(str(second), extract_cfg(cache_copy, replace_other_images=True),
                             progress=False)
        except UserError as e:
            return e, os.path.lexists(feature_path(cache_copy, "x.jpg")), _markers(cache_copy)
        return None, os.path.lexists(feature_path(cache_copy, "x.jpg")), _markers(cache_copy)

    seen = _while_extracting(monkeypatch, first, second_run)
    summary = extract_features(str(first), extract_cfg(cache_copy), progress=False)
    error, written, markers = seen[0]
    assert isinstance(error, UserError), "the second extraction was not refused"
    assert re.fullmatch(
        rf"--images {re.escape(str(second))}: another extract-features \(pid {os.getpid()}: "
        rf".+\) is extracting the images of {re.escape(str(first))} into --cache "
        rf"{re.escape(cache_copy)} now: two images folders .+ Extract this dataset into "
        rf"another --cache \(one per dataset\), or wait for that extraction to end and run "
        rf"this command again \(shards of one --images folder may run together\)",
        str(error)), str(error)
    assert not written and len(markers) == 1          # the first's marker only
    assert summary["extracted"] == 1 and summary["failed"] == 0
    entry = feature_index.load_index(cache_copy).entries["x.jpg"][-1]
    assert entry.image_sha256 == hashlib.sha256((first / "x.jpg").read_bytes()).hexdigest()
    assert str(second) not in read_manifest(cache_copy)["images_dirs"]
    assert _markers(cache_copy) == []
    with pytest.raises(UserError, match=f"1 of its images have the names of images of {first}"):
        extract_features(str(second), extract_cfg(cache_copy), progress=False)


def test_shards_of_one_folder_run_together_by_a_link_or_a_relative_path(cache_copy, tmp_path,
                                                                        monkeypatch):
    """Shards of one --images folder share a cache as before, also when one names the
    folder through a symlink and a relative path (its real path is the same)."""
    folder = tmp_path / "data" / "images"
    keys = [f"img_{i}.jpg" for i in range(6)]
    for i, key in enumerate(keys):
        write_rgb(str(folder / key), scene(50 + i))
    assert {shard_of(k, 2) for k in keys} == {0, 1}
    os.symlink(folder, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    seen = _while_extracting(monkeypatch, folder, lambda: extract_features(
        "link", extract_cfg(cache_copy, num_shards=2, shard_index=1), progress=False))
    first = extract_features(str(folder), extract_cfg(cache_copy, num_shards=2, shard_index=0),
                             progress=False)
    assert len(seen) == 1 and not isinstance(seen[0], UserError), seen
    assert seen[0]["extracted"] == sum(shard_of(k, 2) == 1 for k in keys)
    assert first["extracted"] == sum(shard_of(k, 2) == 0 for k in keys)
    assert all(check_feature_file(feature_path(cache_copy, k), "float16") is None
               for k in keys)
    assert _markers(cache_copy) == []


# a live extraction of a folder, as far as the cache can tell (its marker, held), until stdin ends
MARKER_HOLDER = """
import sys
from caption_attn import feature_cache
marker = feature_cache.extracting_from(sys.argv[1], sys.argv[2])   # (kept: not collected)
marker.__enter__()
print("marked", flush=True)
sys.stdin.read()
"""


def test_a_killed_extractions_marker_refuses_no_later_one(images, cache_copy, tmp_path):
    """Another process's extraction of another folder, running, refuses one into the same
    cache, naming its pid and folder; killed, its marker is left behind, holding no lock:
    it refuses nothing, and the next extraction removes it."""
    other = tmp_path / "other"
    other.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", MARKER_HOLDER, cache_copy, str(other)],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "marked\n"
        with pytest.raises(UserError, match=rf"^--images {re.escape(images)}: another "
                                            rf"extract-features \(pid {holder.pid}: .+\) is "
                                            rf"extracting the images of {re.escape(str(other))}"
                                            rf" into --cache {re.escape(cache_copy)} now"):
            extract_features(images, extract_cfg(cache_copy), keys=GOOD, progress=False)
        assert len(_markers(cache_copy)) == 1          # the holder's, none of the refused
    finally:
        holder.kill()
        holder.wait()
    assert len(_markers(cache_copy)) == 1              # left by the killed process
    summary = extract_features(images, extract_cfg(cache_copy), keys=GOOD, progress=False)
    assert summary["skipped"] == len(GOOD) and summary["exit_code"] == 0
    assert _markers(cache_copy) == []


@contextlib.contextmanager
def _extracting_elsewhere(cache, host, folder, **shard):
    """A live extraction of `folder` by pid 4242 on `host` into `cache`, as far as the cache
    can tell (its marker, written and flock'ed as `extracting_from` does), until the block
    ends; `shard`: the num_shards and shard_index its marker records (none: an older one)."""
    path = os.path.join(cache, f"{feature_cache.EXTRACTING}.4242.abcd1234.{host}")
    marker = feature_cache._make_marker(path, {"images_dir": folder, "real_path": folder,
                                               "pid": 4242, "host": host, **shard})
    try:
        yield
    finally:
        marker.close()
        os.remove(path)


def test_without_locks_a_marker_is_told_by_its_process(images, cache_copy, tmp_path,
                                                       no_locks):
    """On a file system without locks (NFS with `nolock`: every flock fails with ENOLCK) a
    marker holds no lock, so whether its extraction runs is told by its pid: of this host
    and running, it refuses another folder's extraction; its process gone, it is removed;
    another host's cannot be told, and is left (not taken for one running)."""
    other = str(tmp_path / "other")
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    markers = {}
    for pid, host in ((live.pid, HOST), (4242, "machine0")):
        path = os.path.join(cache_copy, f"{feature_cache.EXTRACTING}.{pid}.abcd1234.{host}")
        markers[host] = path
        feature_cache._make_marker(path, {"images_dir": other, "real_path": other,
                                          "pid": pid, "host": host}).close()
    try:
        with pytest.raises(UserError, match=rf"another extract-features \(pid {live.pid}[:)]"):
            extract_features(images, extract_cfg(cache_copy), keys=GOOD, progress=False)
        assert _markers(cache_copy) == sorted(os.path.basename(p) for p in markers.values())
    finally:
        live.kill()
        live.wait()
    summary = extract_features(images, extract_cfg(cache_copy), keys=GOOD, progress=False)
    assert summary["skipped"] == len(GOOD) and summary["exit_code"] == 0
    # the gone process's marker and this extraction's own are removed; the other host's left
    assert _markers(cache_copy) == [os.path.basename(markers["machine0"])]


@pytest.mark.parametrize("host,folder,shard,refused", [
    ("machine0", "/local/coco", {"num_shards": 2, "shard_index": 0}, False),  # the other shard
    ("machine0", "/local/coco", {"num_shards": 2, "shard_index": 1}, True),   # this one, twice
    ("machine0", "/local/coco", {"num_shards": 4, "shard_index": 0}, True),   # another job's
    ("machine0", "/local/coco", {}, True),        # an older version's, of another folder path
    ("machine0", None, {}, False),                # ... of this one: as before
    (HOST, "/local/coco", {"num_shards": 2, "shard_index": 0}, True)])  # here: by folder
def test_another_machines_marker_is_told_apart_by_its_shard(images, cache_copy, host, folder,
                                                            shard, refused):
    """README, several machines for extraction: each runs shard I of N into one shared
    --cache, its images at a path of its own (a local copy, another mount point, a
    container's /data). Where flock works across hosts (NFSv4) the second machine's shard
    was refused as extracting "another images folder". Another machine's shard of the same
    N goes on now; anything else of another machine is refused, saying how shards of
    several machines run together (an older version's marker: by folder path, as before)."""
    folder = folder or os.path.realpath(images)
    cfg = extract_cfg(cache_copy, num_shards=2, shard_index=1)
    with _extracting_elsewhere(cache_copy, host, folder, **shard):
        if not refused:
            summary = extract_features(images, cfg, keys=GOOD, progress=False)
            assert summary["exit_code"] == 0 and summary["failures"] == {}
            assert summary["skipped"] == sum(shard_of(k, 2) == 1 for k in GOOD) > 0
        else:
            with pytest.raises(UserError) as e:
                extract_features(images, cfg, keys=GOOD, progress=False)
            assert re.match(rf"--images {re.escape(images)}: another extract-features \(pid "
                            rf"4242.*\) is extracting the images of {re.escape(folder)} into "
                            rf"--cache {re.escape(cache_copy)} now", str(e.value)), str(e.value)
            note = ("Another machine's extraction is told apart by its shard, not its folder "
                    "(a path of that machine): shards of one extraction on several machines run "
                    "together when each runs the same --num-shards with its own --shard-index "
                    "(this one: shard 1/2)")
            assert (note in str(e.value)) == (host != HOST)
            if host != HOST:
                assert (f"(pid 4242 on machine0, shard {shard['shard_index']}/"
                        f"{shard['num_shards']})" if shard else "(pid 4242 on machine0)") \
                    in str(e.value)
                assert ("an older caption-attn records no shard" in str(e.value)) == (not shard)
        assert len(_markers(cache_copy)) == 1             # the other's only
    assert _markers(cache_copy) == []


def test_an_images_folder_whose_name_is_not_utf8_is_extracted_and_then_done(cache_copy,
                                                                             tmp_path):
    """--images of a folder named with bytes that are not UTF-8 (b'caf\\xe9', Latin-1): the
    whole extraction ended in a UnicodeEncodeError writing the index, leaving feature files
    no index entry vouched for. Now the manifest and the index record the very folder, so
    that a rerun finds its features done (a folder read back changed would not match)."""
    folder = os.path.join(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9"), "images")
    write_rgb(tmp_path / "new.png", scene(7))          # (OpenCV cannot open such a name)
    os.makedirs(folder)
    os.rename(tmp_path / "new.png", os.path.join(folder, "new.png"))
    summary = extract_features(folder, extract_cfg(cache_copy), keys=["new.png"],
                               progress=False)
    assert summary["extracted"] == 1 and summary["failed"] == 0
    manifest = feature_cache.read_manifest(cache_copy)
    assert manifest["images_dir"] == folder and manifest["images_dirs"][-1] == folder
    entries = feature_index.load_index(cache_copy).entries["new.png"]
    assert entries[-1].images_dir == folder
    again = extract_features(folder, extract_cfg(cache_copy), keys=["new.png"],
                             progress=False)
    assert again["extracted"] == 0 and again["skipped"] == 1


def test_a_precision_the_capped_onednn_would_abort_in_is_refused_before_anything(
        images, tmp_path, onednn_capped_below):
    """`extract-features --precision bfloat16` under ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512
    CPU died in the backbone's first convolution with TensorFlow's traceback."""
    onednn_capped_below("bfloat16")
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match=r"^--precision bfloat16: oneDNN capped at AVX2 "
                                        r"\(ONEDNN_MAX_CPU_ISA\) has no bfloat16 kernels, .* "
                                        r"use --precision float32 \(with another --cache"):
        extract_features(str(images), extract_cfg(cache, precision="bfloat16"), keys=GOOD,
                         progress=False)
    assert not cache.exists()


def test_a_cache_folder_not_utf8_is_refused_before_anything(images, tmp_path):
    """--cache of a folder named with bytes that are not UTF-8: extracted into (Python writes
    there), then refused by `train` and `evaluate` (TensorFlow reads the feature files by
    UTF-8 paths), after the whole extraction. Refused first now, nothing written."""
    parent = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    cache = os.path.join(parent, "cache")
    with pytest.raises(UserError, match=r"--cache .*caf\\xe9/cache: not a UTF-8 path"):
        extract_features(str(images), extract_cfg(cache), keys=GOOD, progress=False)
    assert not os.path.lexists(parent)


def test_other_settings_than_the_caches_are_refused_before_the_captions_are_read(
        images, cache_copy, tmp_path, monkeypatch, capsys):
    """`extract-features --captions coco.json` into a float16 cache without --dtype float16
    was refused only after TensorFlow's import and the whole caption file's parse (seconds
    to a minute at COCO's size): the cache's settings are checked with the flags."""
    from caption_attn import cli, data, quiet
    captions = tmp_path / "captions.txt"
    captions.write_text("a.jpg#0\tA red circle .\n")

    def never(*args, **kwargs):
        raise AssertionError("read before the cache's settings were checked")
    monkeypatch.setattr(data, "load_captions", never)
    monkeypatch.setattr(quiet, "import_tensorflow", never)
    before = sorted(os.listdir(cache_copy))
    assert cli.main(["extract-features", "--images", images, "--captions", str(captions),
                     "--cache", cache_copy, "--weights", "random"]) == 2
    err = capsys.readouterr().err
    assert err == (f"caption-attn extract-features: error: --cache {cache_copy} holds "
                   f"features made with dtype float16, this run asks for float32; a cache "
                   f"holds one backbone's features only: use another --cache folder (or "
                   f"--dtype float16)\n")
    assert sorted(os.listdir(cache_copy)) == before


def test_a_refused_extraction_records_none_of_its_images_in_the_index(images, cache_copy,
                                                                      tmp_path):
    """A folder whose same-named images are refused (another dataset) also held a copy of
    one of the cache's images (same bytes, a new mtime): its refreshed entry, recording the
    refused folder, was written all the same, and once the index was compacted the cache's
    own folder's unchanged image counted as changed (left out of train and evaluate)."""
    other = tmp_path / "other"
    write_rgb(str(other / "a.jpg"), scene(33))
    write_rgb(str(other / "gray.jpg"), scene(35))
    shutil.copy(os.path.join(images, "b.png"), other / "b.png")       # same bytes, new mtime
    with pytest.raises(UserError, match="2 of its images have the names of images of"):
        extract_features(str(other), extract_cfg(cache_copy), progress=False)
    recorded = {e.images_dir for entries in feature_index.load_index(cache_copy).entries.values()
                for e in entries}
    assert str(other) not in recorded
    feature_index.compact(cache_copy, lambda key: feature_path(cache_copy, key))
    manifest = read_manifest(cache_copy)
    paths, problems = feature_cache.usable_features(cache_copy, GOOD, manifest, images)
    assert problems == {} and sorted(paths) == sorted(GOOD)


def test_an_images_folder_holding_none_of_the_captions_images_fails(images, cache_copy,
                                                                    tmp_path):
    """`--images /data/Flickr8k` for /data/Flickr8k/Images: the caption file's images that
    had features counted as "already done", extracted 0, exit 0 (even with --strict). The
    job ends with exit 1 saying which folder to give."""
    above = tmp_path / "dataset"
    shutil.copytree(images, above / "Images")
    keys = ["a.jpg", "b.png", "sub/c.jpg"]
    summary = extract_features(str(above), extract_cfg(cache_copy), keys=keys, progress=False)
    assert summary["skipped"] == 3 and summary["exit_code"] == 1
    assert summary["message"] == (f"none of the 3 images the caption file names is in "
                                  f"--images {above}: give the folder the caption file's "
                                  f"image names are relative to")
    summary = extract_features(str(above / "Images"), extract_cfg(cache_copy), keys=keys,
                               progress=False)
    assert (summary["skipped"], summary["exit_code"]) == (3, 0)
