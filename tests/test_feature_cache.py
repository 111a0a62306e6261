"""Tests of the feature cache (caption_attn/feature_cache.py): file checks, the refusal of a
cache made by another backbone, the cache identity, old caches and which files are usable.

`cache_copy` is a private copy of the session's float16 extraction (conftest.py).
"""

import json
import os
import re
import shutil

import numpy as np
import pytest
from conftest import file_mtimes

from caption_attn.backbone import FEATURE_SHAPE
from caption_attn.errors import UserError
from caption_attn.extract import extract_features
from caption_attn.feature_cache import (IMAGE_DIGEST_CHARS, cache_identity, check_feature_file,
                                        describe_difference, describe_problems, feature_path,
                                        npy_header, read_manifest, refuse_other_identity,
                                        usable_features, usable_features_checked_in,
                                        using_features, CacheInUse)
from caption_attn.feature_index import IMAGE_CHANGED, NOT_INDEXED, REWRITTEN
from caption_attn.fileio import file_digest
from image_samples import GOOD, extract_cfg, scene, write_rgb


def test_check_feature_file_reasons(tmp_path):
    good = np.ones(FEATURE_SHAPE, np.float16)
    cases = {"good": good, "shape": np.ones((8, 8, 2048), np.float16),
             "dtype": good.astype(np.float32), "nan": np.where(good, np.nan, 0).astype(np.float16),
             "fortran": np.asfortranarray(good)}
    for name, array in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
    with open(tmp_path / "good.npy", "rb") as f:
        data = f.read()
    (tmp_path / "short.npy").write_bytes(data[:-100])
    (tmp_path / "garbage.npy").write_bytes(os.urandom(len(data)))

    def check(name, full=False):
        return check_feature_file(str(tmp_path / f"{name}.npy"), "float16", full=full)

    assert check("good") is None and check("good", full=True) is None
    assert "shape" in check("shape")
    assert "dtype" in check("dtype")
    assert "Fortran" in check("fortran")
    assert "truncated" in check("short")
    assert "header" in check("garbage")
    assert check("missing") == "missing"
    assert check("nan") is None                              # quick check reads no data
    assert check("nan", full=True) == "non-finite values"
    assert len(npy_header("float16")) == len(data) - good.nbytes == 128


@pytest.mark.parametrize("change,message", [
    ({"seed": 1}, "weights random \\(seed 0\\)"),
    ({"dtype": "float32"}, "dtype float16"),
    ({"precision": "bfloat16"}, "precision float32"),
    ({"weights": "imagenet"}, "weights random"),
])
def test_cache_with_other_backbone_is_refused(images, cache_copy, change, message):
    with pytest.raises(UserError, match=message) as e:
        extract_features(images, extract_cfg(cache_copy, **change), progress=False)
    assert "another --cache" in str(e.value)


def test_a_cache_of_a_weights_file_takes_the_random_backbone_of_the_same_weights(
        images, cache_copy):
    """A cache made with `--weights PATH` (a random backbone's saved weights) refused
    `--weights random --seed 0`, the same weights by name only: compared by sha256 now."""
    manifest = read_manifest(cache_copy)
    path = os.path.join(cache_copy, manifest.pop("weights_file"))
    manifest.update(weights=path, seed=None)
    with open(os.path.join(cache_copy, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    os.remove(feature_path(cache_copy, sorted(GOOD)[0]))
    summary = extract_features(images, extract_cfg(cache_copy), keys=GOOD, progress=False)
    assert summary["extracted"] == 1 and summary["count"] == len(GOOD)


# --------------------------------------------------------------------------- identity
def test_cache_identity_fingerprint_description_and_difference(extracted):
    manifest = read_manifest(extracted[0])
    identity = cache_identity(manifest)
    assert identity == cache_identity(json.loads(json.dumps(manifest)))   # JSON round trip
    assert len(identity["fingerprint"]) == 16
    assert identity["fingerprint"] == manifest["identity_fingerprint"]
    assert identity["description"].startswith("InceptionV3, random weights (seed 0, sha256 ")
    assert identity["description"].endswith(
        f"float16 files, float32 compute, scale {manifest['feature_scale']:g}")
    moved = cache_identity({**manifest, "weights": "/elsewhere/w.h5", "seed": None})
    assert moved["fingerprint"] == identity["fingerprint"]               # name is not identity
    for field, value in [("weights_sha256", "0" * 64), ("dtype", "float32"), ("precision",
                         "bfloat16"), ("feature_scale", 1.0), ("resize", "crop"),
                         ("format_version", 3)]:
        other = cache_identity({**manifest, field: value})
        assert other["fingerprint"] != identity["fingerprint"], field
        assert describe_difference(identity, other).startswith(
            "weights:" if field == "weights_sha256" else f"{field}:"), field
    assert describe_difference(identity, identity) == ""
    other = cache_identity({**manifest, "weights": "imagenet", "weights_sha256": "9" * 64,
                            "feature_scale": 1.0})
    with pytest.raises(UserError) as e:
        refuse_other_identity(identity, {**manifest, **{k: other[k] for k in (
            "weights", "weights_sha256", "feature_scale")}}, "run models/x", "cache_b")
    message = str(e.value)
    assert identity["description"] in message and other["description"] in message
    assert "weights: random weights (seed 0" in message and "feature_scale:" in message
    assert "--weights random --seed 0 --dtype float16 --precision float32" in message
    refuse_other_identity(identity, manifest, "run models/x", "cache_a")     # same: no error


def test_a_manifest_field_of_the_wrong_type_is_refused_as_malformed(cache_copy):
    """A header size written as text ended `train` in a ValueError traceback from the feature
    reader; a scale written as text made the features look like another backbone's."""
    path = os.path.join(cache_copy, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    with open(path, "w") as f:
        json.dump({**manifest, "npy_header_bytes": "x", "feature_scale": "1024",
                   "count": True}, f)
    with pytest.raises(UserError) as e:
        read_manifest(cache_copy)
    assert str(e.value) == (
        f"{path}: malformed manifest: npy_header_bytes 'x' (not an integer); count True (not "
        f"an integer); feature_scale '1024' (not a number); extract into a new --cache "
        f"folder")
    # a file given as the cache: said so (not "FILE/manifest.json: no manifest")
    with pytest.raises(UserError, match=f"^{re.escape(path)}: is a file, not a folder: a "
                                        f"feature cache is the folder"):
        read_manifest(path)


@pytest.mark.parametrize("field", ["resize", "preprocess", "feature_layout", "image_size"])
def test_a_cache_made_from_images_otherwise_is_refused_where_images_are_captioned(
        images, cache_copy, field):
    """Only the extraction compared how its images were resized, and not how they were
    scaled: `caption` and `export`, which turn images into features with this version, and
    a new run, trained on features `caption` would not reproduce, took a cache made
    otherwise (by another version) without a word."""
    from caption_attn.backbone import Backbone
    from caption_attn.feature_cache import OtherCache
    from caption_attn.train_data import check_manifest
    path = os.path.join(cache_copy, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    value = 331 if field == "image_size" else "another way"
    with open(path, "w") as f:
        json.dump({**manifest, field: value}, f)
    said = (rf"^{re.escape(path)}: its features were made from the images by another "
            rf"version of caption_attn: {field} {value!r} \(this version: .*\); ")
    with pytest.raises(UserError, match=said + "captioned with this version, .*: caption with "
                                               "the version that made the cache, or train a "
                                               "run on a cache this version extracts$"):
        Backbone.from_manifest(cache_copy)
    with pytest.raises(UserError, match=said + ".*: extract the images again into a new "
                                               "--cache folder$"):
        check_manifest(cache_copy)
    with pytest.raises(OtherCache, match=rf"holds features made with {field} {value}"):
        extract_features(images, extract_cfg(cache_copy), keys=GOOD, progress=False)
    # features of another backbone (the benchmarks' synthetic ones) train as they are
    with open(path, "w") as f:
        json.dump({**manifest, field: value, "backbone": "synthetic"}, f)
    check_manifest(cache_copy)
    with pytest.raises(UserError, match=rf"^{re.escape(path)}: its features were made from "
                                        rf"the images by another version of caption_attn: "
                                        rf"backbone 'synthetic' \(this version: 'InceptionV3'\)"):
        Backbone.from_manifest(cache_copy)


def test_the_project_s_own_features_cache_folder_takes_a_first_extraction():
    """The clone's features_cache/ held a README.md, so the README's own first command
    (`extract-features ... --cache features_cache`) was refused as a folder of other files,
    naming the same folder as the one to use."""
    from caption_attn.feature_cache import check_cache_folder
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    check_cache_folder(os.path.join(repo, "features_cache"))


def test_format_1_cache_is_refused_with_the_fix(images, cache_copy):
    path = os.path.join(cache_copy, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    manifest["format_version"] = 1
    with open(path, "w") as f:
        json.dump(manifest, f)
    for call in (lambda: read_manifest(cache_copy),
                 lambda: extract_features(images, extract_cfg(cache_copy), progress=False)):
        with pytest.raises(UserError, match="format 1") as e:
            call()
        assert "extract-features --cache NEW_FOLDER" in str(e.value)
        assert "--weights random --seed 0 --dtype float16" in str(e.value)


# --------------------------------------------------------------------------- provenance
def test_usable_features_checks_index_stat_and_source(images, cache_copy, tmp_path):
    manifest = read_manifest(cache_copy)
    paths, problems = usable_features(cache_copy, GOOD + ["nothing.jpg"], manifest, images)
    assert sorted(paths) == sorted(GOOD) and list(problems) == ["nothing.jpg"]
    assert problems["nothing.jpg"] == "missing"
    assert paths["sub/c.jpg"] == feature_path(cache_copy, "sub/c.jpg")

    np.save(feature_path(cache_copy, "a.jpg"), np.ones(FEATURE_SHAPE, np.float16))  # rewritten
    work = str(tmp_path / "images")
    shutil.copytree(images, work)
    write_rgb(os.path.join(work, "b.png"), scene(30))                    # image changed
    os.remove(os.path.join(work, "gray.jpg"))                           # image gone: still ok
    stray = feature_path(cache_copy, "stray.jpg")                       # never indexed
    np.save(stray, np.ones(FEATURE_SHAPE, np.float16))
    paths, problems = usable_features(cache_copy, GOOD + ["stray.jpg"], manifest, work)
    assert problems == {"a.jpg": REWRITTEN, "b.png": IMAGE_CHANGED, "stray.jpg": NOT_INDEXED}
    assert "gray.jpg" in paths
    paths, problems = usable_features(cache_copy, GOOD, manifest, images_dir=None)
    assert set(problems) == {"a.jpg"}                                    # no source check
    other = {**manifest, "weights_sha256": "0" * 64}
    _, problems = usable_features(cache_copy, ["c.jpg", "sub/c.jpg"], other)
    assert problems["sub/c.jpg"].startswith("made by another backbone")
    text = describe_problems({"a.jpg": REWRITTEN, "b.png": IMAGE_CHANGED, "x.jpg": "missing"},
                             cache_copy)
    assert text.startswith(f"3 feature file(s) in {cache_copy} cannot be used")
    assert feature_path(cache_copy, "a.jpg") in text and "extract-features --cache" in text


def test_problems_give_examples_of_each_reason_after_that_reason(cache_copy):
    # "5 changed ...; 1 missing (e.g. a, b, c)" where a and c were changed ones: the examples
    # of all reasons came after the last reason.
    problems = {f"c{i}.jpg": IMAGE_CHANGED for i in range(5)}
    problems = {"c0.jpg": IMAGE_CHANGED, "x.jpg": "missing", **problems}
    text = describe_problems(problems, cache_copy, examples=2)
    path = lambda key: feature_path(cache_copy, key)  # noqa: E731
    assert f"cannot be used: 5 {IMAGE_CHANGED} (e.g. {path('c0.jpg')}, {path('c1.jpg')}); " \
           f"1 missing (e.g. {path('x.jpg')})." in text, text


def _two_folder_cache(images, cache_copy, tmp_path):
    """The cache extracted from `work` (a copy of `images` with their modification times:
    the index then records `work` as their folder), and as if then from `other` (other
    names): (manifest, work, other)."""
    work, other = tmp_path / "work", tmp_path / "other"
    shutil.copytree(images, work)
    extract_features(str(work), extract_cfg(cache_copy), keys=GOOD, progress=False)
    write_rgb(str(other / "new.jpg"), scene(34))
    manifest = {**read_manifest(cache_copy), "images_dir": str(other),
                "images_dirs": [str(work), str(other)]}
    return manifest, str(work), str(other)


def test_an_image_missing_from_the_last_folder_is_checked_in_the_cache_s_others(
        images, cache_copy, tmp_path):
    """A cache extracted from two folders (COCO's train2014 and val2014) checked the source
    images in the last one only: the first folder's images are not there, so each was taken
    as a gone image, whatever it had become since: a changed image trained (and was scored)
    on its old features without a word. It is checked in the folder that has it now."""
    manifest, work, other = _two_folder_cache(images, cache_copy, tmp_path)
    write_rgb(os.path.join(work, "b.png"), scene(30))                    # changed since
    paths, problems = usable_features(cache_copy, GOOD, manifest, other)
    assert problems == {"b.png": IMAGE_CHANGED} and len(paths) == len(GOOD) - 1
    # the fix extracts it from the folder that has it, not from the last one
    assert f"--images {work} --cache" in describe_problems(problems, cache_copy,
                                                           manifest=manifest, images_dir=other)
    # gone from every folder: the features stand for the image as it was
    os.remove(os.path.join(work, "b.png"))
    assert usable_features(cache_copy, GOOD, manifest, other)[1] == {}
    # without the other folders (as a run's retry in the last folder asks): not checked
    write_rgb(os.path.join(work, "b.png"), scene(30))
    assert usable_features(cache_copy, GOOD, manifest, other, other_folders=False)[1] == {}


def test_a_run_s_changed_image_is_not_taken_because_the_last_folder_lacks_it(
        images, cache_copy, tmp_path):
    """A run checks its images where it trained (`checked_in`); one changed there was retried
    in the cache's last folder, and, missing there, taken with its old features. Retried
    only when the last folder has it."""
    manifest, work, other = _two_folder_cache(images, cache_copy, tmp_path)
    manifest = {**manifest, "images_dirs": [str(other)]}    # `work` itself never extracted
    write_rgb(os.path.join(work, "b.png"), scene(30))
    paths, problems = usable_features_checked_in(cache_copy, GOOD, manifest, work,
                                                 known={"b.png": "0" * 16})
    assert problems == {"b.png": IMAGE_CHANGED} and "b.png" not in paths


def test_a_run_s_edited_image_is_not_taken_for_an_old_copy_in_the_last_folder(
        images, cache_copy, tmp_path):
    """A run trained on `work`; the cache then extracted from `copy`, a copy of it with new
    modification times (the index now records copy's files); then work/b.png edited. Changed
    where the run checks it, it was retried in `copy`, whose old b.png matches the index,
    and taken with the old image's features. It must hold the bytes the run recorded."""
    work, copy = tmp_path / "work", tmp_path / "copy"
    shutil.copytree(images, work)
    shutil.copytree(images, copy)
    for name in GOOD:
        os.utime(copy / name, (1e9, 1e9))
    extract_features(str(copy), extract_cfg(cache_copy), keys=GOOD, progress=False)
    manifest = read_manifest(cache_copy)
    assert manifest["images_dir"] == str(copy)
    known = {k: file_digest(str(work / k))[:IMAGE_DIGEST_CHARS] for k in GOOD}
    paths, problems = usable_features_checked_in(cache_copy, GOOD, manifest, str(work), known)
    assert problems == {} and sorted(paths) == sorted(GOOD)       # the same bytes: taken
    edited = bytearray((work / "b.png").read_bytes())             # same size, other bytes
    edited[-1] ^= 1
    (work / "b.png").write_bytes(bytes(edited))
    write_rgb(str(work / "a.jpg"), scene(30))                     # other size
    digests = {}
    paths, problems = usable_features_checked_in(cache_copy, GOOD, manifest, str(work), known,
                                                 digests)
    assert problems == {"a.jpg": IMAGE_CHANGED, "b.png": IMAGE_CHANGED}
    assert sorted(paths) == sorted(set(GOOD) - {"a.jpg", "b.png"}) == sorted(digests)
    # features of another image than the run's (its record differs from the index's): taken,
    # for `RunFolder.check_image_digests` to refuse naming them, not called changed
    paths, problems = usable_features_checked_in(cache_copy, GOOD, manifest, str(work),
                                                 {**known, "b.png": "0" * IMAGE_DIGEST_CHARS})
    assert "b.png" in paths and problems == {"a.jpg": IMAGE_CHANGED}


def _forget_folders(cache):
    """Take the images folder out of every index entry: an index written before it was
    recorded."""
    index = os.path.join(cache, "index.jsonl")
    with open(index) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    assert all("images_dir" in e for e in entries)
    with open(index, "w") as f:
        f.writelines(json.dumps({k: v for k, v in e.items() if k != "images_dir"}) + "\n"
                     for e in entries)


def test_an_image_gone_from_the_folder_that_replaced_its_features_is_not_changed(
        images, cache_copy, tmp_path):
    """Extracted from `work`, then from `other` with --replace-other-images (its a.jpg's
    features replaced work's), then other/a.jpg deleted: the other-folders lookup found
    work/a.jpg and compared it with the image recorded from other/a.jpg, "source image
    changed", a false refusal whose fix extracted work's a.jpg again, features the cache does
    not say it holds. An image is compared only in the folder its features were extracted
    from (each index entry records it); gone from there, its features stand."""
    work, other = tmp_path / "work", tmp_path / "other"
    shutil.copytree(images, work)
    extract_features(str(work), extract_cfg(cache_copy), keys=GOOD, progress=False)
    write_rgb(str(other / "a.jpg"), scene(33))
    write_rgb(str(other / "new.jpg"), scene(34))
    extract_features(str(other), extract_cfg(cache_copy, replace_other_images=True),
                     progress=False)
    os.remove(other / "a.jpg")
    manifest, keys = read_manifest(cache_copy), GOOD + ["new.jpg"]
    paths, problems = usable_features(cache_copy, keys, manifest, str(other))
    assert problems == {} and sorted(paths) == sorted(keys)
    # checked in work (a run on its captions): a.jpg's features are other's, left out
    assert usable_features(cache_copy, keys, manifest, str(work))[1] == {"a.jpg": IMAGE_CHANGED}
    # an image changed in the folder it was extracted from is still found there
    write_rgb(str(work / "b.png"), scene(30))
    assert usable_features(cache_copy, keys, manifest, str(other))[1] == {"b.png": IMAGE_CHANGED}
    # an index that does not say which folder (written before it did): each other folder in
    # turn, as before, so that b.png's change is still seen (a.jpg's false "changed" is the
    # price: a refusal that says so, where a change left unseen would be silent)
    _forget_folders(cache_copy)
    assert usable_features(cache_copy, keys, manifest, str(other))[1] == {
        "a.jpg": IMAGE_CHANGED, "b.png": IMAGE_CHANGED}
    # extracting work again records the folder of its images, those kept as they are too
    # (a.jpg, not extracted again, still records no folder)
    extract_features(str(work), extract_cfg(cache_copy), keys=GOOD[1:], progress=False)
    write_rgb(str(work / "gray.jpg"), scene(31))
    assert usable_features(cache_copy, keys, manifest, str(other))[1] == {
        "a.jpg": IMAGE_CHANGED, "gray.jpg": IMAGE_CHANGED}


def test_features_of_a_deleted_image_of_another_folder_are_not_replaced_without_a_word(
        images, cache_copy, tmp_path):
    """After --replace-other-images (work's a.jpg features replaced by other's) and other/a.jpg
    deleted, extracting work again replaced other's features with work's a.jpg without a word
    (the refusal looked for other's image, gone): a run on other's captions, whose a.jpg
    features stand while the image is gone, then trained on work's image. Refused now, naming
    the folder the features were extracted from; --replace-other-images still replaces them."""
    work, other = tmp_path / "work", tmp_path / "other"
    shutil.copytree(images, work)
    extract_features(str(work), extract_cfg(cache_copy), keys=GOOD, progress=False)
    write_rgb(str(other / "a.jpg"), scene(33))
    extract_features(str(other), extract_cfg(cache_copy, replace_other_images=True),
                     progress=False)
    os.remove(other / "a.jpg")
    before = open(os.path.join(cache_copy, "a.jpg.npy"), "rb").read()
    with pytest.raises(UserError, match=f"1 of its images have the names of images of {other}"):
        extract_features(str(work), extract_cfg(cache_copy), keys=GOOD, progress=False)
    assert open(os.path.join(cache_copy, "a.jpg.npy"), "rb").read() == before
    summary = extract_features(str(work), extract_cfg(cache_copy, replace_other_images=True),
                               keys=GOOD, progress=False)
    assert summary["replaced_others"] == {"a.jpg": str(other)}
    assert usable_features(cache_copy, GOOD, read_manifest(cache_copy), str(work))[1] == {}


def test_problems_in_two_images_folders_get_a_command_each(images, cache_copy, tmp_path):
    """Changed images of two folders the cache was extracted from got one fix command, with
    the --images of the first one listed: the others were not extracted again by it. Each
    folder gets its own command now; missing files and failed images go with the folder
    checked."""
    work, other = tmp_path / "work", tmp_path / "other"
    shutil.copytree(images, work)
    extract_features(str(work), extract_cfg(cache_copy), keys=GOOD, progress=False)
    write_rgb(str(other / "new.jpg"), scene(34))
    extract_features(str(other), extract_cfg(cache_copy), progress=False)
    write_rgb(str(work / "b.png"), scene(30))
    write_rgb(str(work / "rgba.png"), scene(32))
    write_rgb(str(other / "new.jpg"), scene(35))
    manifest = read_manifest(cache_copy)
    _, problems = usable_features(cache_copy, GOOD + ["new.jpg", "x.jpg"], manifest,
                                  str(other))
    assert problems == {"b.png": IMAGE_CHANGED, "rgba.png": IMAGE_CHANGED,
                        "new.jpg": IMAGE_CHANGED, "x.jpg": "missing"}
    problems["truncated.jpg"] = "missing"                     # failed.tsv says why
    text = describe_problems(problems, cache_copy, manifest=manifest, captions="caps.json",
                             images_dir=str(other))
    command = (f"caption-attn extract-features --captions caps.json --images {{}} --cache "
               f"{cache_copy} --weights random --seed 0 --dtype float16 --precision float32")
    assert (f"Rerun `{command.format(other)}` (for 2 of them, e.g. new.jpg) and "
            f"`{command.format(work)}` (for 2 of them, e.g. b.png): they extract exactly these "
            f"again") in text
    assert text.count("--images") == 3
    assert text.endswith(f"then rerun `{command.format(other)}`")
    # an index written before entries recorded their folder: each other folder in turn, as
    # `usable_features` looks there (the fix named the folder checked, which has no b.png,
    # and extracted nothing again)
    _forget_folders(cache_copy)
    text = describe_problems(problems, cache_copy, manifest=manifest, captions="caps.json",
                             images_dir=str(other))
    assert f"`{command.format(work)}` (for 2 of them, e.g. b.png)" in text


def test_problems_name_images_that_failed_to_extract_and_why(cache_copy):
    """An image extract-features could not read was called "missing" by train and evaluate,
    with the advice to rerun extract-features ("it extracts exactly these again"), which
    failed on it again. failed.tsv says why: the image (or its folder) must be fixed."""
    failed = os.path.join(cache_copy, "failed.tsv")
    with open(failed, "a") as f:
        f.write("locked/\tfolder cannot be read (Permission denied): its images were not "
                "listed\n")
    text = describe_problems({"truncated.jpg": "missing", "locked/b.jpg": "missing"},
                             cache_copy)
    assert text == (
        f"2 image(s) failed to extract, so they have no feature file in {cache_copy} (listed "
        f"in {failed}): truncated.jpg (truncated); locked/b.jpg (locked/: folder cannot be "
        f"read (Permission denied): its images were not listed). Extracting them again fails "
        f"the same way: fix or remove these images (or their captions), then rerun "
        f"`caption-attn extract-features --cache {cache_copy} ...`")
    text = describe_problems({"x.jpg": "missing", "empty.jpg": "missing"}, cache_copy)
    assert text == (
        f"1 feature file(s) in {cache_copy} cannot be used: 1 missing (e.g. "
        f"{feature_path(cache_copy, 'x.jpg')}). Rerun `caption-attn extract-features --cache "
        f"{cache_copy} ...` with the cache's settings: it extracts exactly these again "
        f"(--verify also reads every other file's values). 1 image(s) failed to extract, so "
        f"they have no feature file in {cache_copy} (listed in {failed}): empty.jpg (empty "
        f"file (0 bytes)). Extracting them again fails the same way: fix or remove these "
        f"images (or their captions), then rerun `caption-attn extract-features --cache "
        f"{cache_copy} ...`")


def test_problems_name_the_command_for_the_caption_file_and_its_images(images, cache_copy):
    """The fix said "Rerun `caption-attn extract-features --cache CACHE ...` with the cache's
    settings: it extracts exactly these again", which extracts the cache's last --images
    again, never a caption file's images it lacks; and a cache extracted with --images one
    folder above the caption file's names holds them as train2017/NAME, so that rerun
    extracted nothing. The command now names --captions and --images, and the folder the
    caption file's names are relative to."""
    manifest = read_manifest(cache_copy)
    settings = "--weights random --seed 0 --dtype float16 --precision float32"
    text = describe_problems({"x.jpg": "missing"}, cache_copy, manifest=manifest,
                             captions="caps.json")
    assert (f"Rerun `caption-attn extract-features --captions caps.json --images {images} "
            f"--cache {cache_copy} {settings}`: it extracts exactly these again") in text
    assert "longer path" not in text
    text = describe_problems({"c.jpg": "missing", "deeper/d.jpg": "missing"}, cache_copy,
                             manifest=manifest, captions="caps.json")
    sub = os.path.join(images, "sub")
    assert (f"2 of the missing ones are in the cache under a longer path (e.g. c.jpg as "
            f"sub/c.jpg): feature files are named after the image's path relative to "
            f"--images, and the caption file's names are relative to {sub}: extract with "
            f"--images {sub} instead. Rerun `caption-attn extract-features --captions "
            f"caps.json --images {sub} --cache {cache_copy} {settings}`") in text


def test_readers_and_writers_of_a_cache_refuse_each_other(tmp_path):
    """`extract-features` rewrote the file of a changed image under a `train` streaming the
    cache, which trained on the new features without a word; a `train` started during an
    extraction trained on the images done so far. Readers share, writers (shards) share, a
    reader and a writer refuse each other, naming the other's pid and command line, as the
    other locks do (`fileio.describe_holders`; it named the pid alone)."""
    import subprocess
    import sys

    cache = str(tmp_path / "cache")
    os.makedirs(cache)
    (tmp_path / "cache" / "manifest.json").write_text("{}")
    me = os.getpid()
    refused = {True: rf"^--cache {cache}: a `caption-attn train` or `evaluate` \(pid {me}: "
                     rf".*\) is reading its features now; extracting would change",
               False: rf"^--cache {cache}: `caption-attn extract-features` \(pid {me}: .*\) "
                      rf"is writing into it now"}
    for writing in (False, True):   # two of a kind share; the other kind is refused
        with using_features(cache, writing), using_features(cache, writing):
            with pytest.raises(UserError, match=refused[not writing]):
                with using_features(cache, not writing):
                    pass
    with using_features(cache, writing=False):   # both released: each may start again
        pass
    # another process's lock is named by its pid and command (this one's left out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)",
         os.path.join(cache, ".reading.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=rf"\(pid {holder.pid}: "
                                            rf"{re.escape(sys.executable)} -c .*\) is reading"):
            with using_features(cache, writing=True):
                pass
    finally:
        holder.kill()
        holder.wait()
    with using_features(cache, writing=True):   # its lock went with the process
        pass


def test_a_cache_on_a_file_system_without_locks_is_used_unlocked(tmp_path, no_locks):
    """On an NFS mount with `nolock` every flock fails with ENOLCK: the readers' and writers'
    locks went on unlocked (`fileio.flock`), but the cache's own exclusive lock, taken
    first, raised it, and no extraction could run there."""
    cache = str(tmp_path / "cache")
    with using_features(cache, writing=True) as refusal:
        assert refusal is None
        (tmp_path / "cache" / "manifest.json").write_text("{}")
    with using_features(cache, writing=False):
        pass


def test_features_in_use_holds_nothing_where_there_is_no_cache(tmp_path):
    """A reader of a folder without a manifest creates no lock files in it (its own checks
    refuse it); a first extraction that fails before writing anything leaves no folder."""
    other = tmp_path / "photos"
    other.mkdir()
    with using_features(str(other), writing=False):
        pass
    assert os.listdir(other) == []
    new = tmp_path / "new_cache"
    with pytest.raises(RuntimeError):
        with using_features(str(new), writing=True):
            assert new.is_dir()
            raise RuntimeError("the backbone could not be built")
    assert not new.exists()
    with using_features(str(new), writing=True):
        (new / "manifest.json").write_text("{}")
    assert sorted(os.listdir(new)) == [".lock", ".reading.lock", ".writing.lock",
                                       "manifest.json"]


def test_a_failed_first_extraction_keeps_a_folder_another_extraction_holds(tmp_path):
    """A first extraction that failed before its manifest removed its new cache folder of
    lock files, the .writing.lock another extraction (a shard started meanwhile) held with
    it: a `train` started then was not refused, and trained on a half-extracted cache. The
    folder stays while another holds a lock in it (with none: removed, as
    test_features_in_use_holds_nothing_where_there_is_no_cache checks)."""
    import fcntl

    new = tmp_path / "new_cache"
    held = []
    with pytest.raises(RuntimeError):
        with using_features(str(new), writing=True):
            shard = open(new / ".writing.lock", "a+")       # another shard's lock
            fcntl.flock(shard.fileno(), fcntl.LOCK_SH)
            held.append(shard)
            raise RuntimeError("the backbone could not be built")
    with held[0]:
        lock = new / ".writing.lock"
        assert lock.exists() and os.path.samestat(os.stat(lock), os.fstat(held[0].fileno()))
        (new / "manifest.json").write_text("{}")            # the shard's, written on
        with pytest.raises(CacheInUse, match="is writing into it"):
            with using_features(str(new), writing=False):   # a train started now
                pass


def test_a_cache_lock_waited_for_while_its_folder_is_removed_locks_the_new_one(tmp_path):
    """A first extraction that failed removes its new cache folder under the cache's lock; a
    shard waiting for that lock then got it on the deleted .lock, opened no .writing.lock
    (its folder gone) and wrote unlocked: a `train` started then was not refused. The
    waiter now takes the lock of the file at the path, in the folder made again."""
    import fcntl
    import threading
    import time

    from caption_attn.feature_cache import LOCK, cache_lock

    cache = str(tmp_path / "new_cache")
    path = os.path.join(cache, LOCK)
    seen = []

    def shard():                                    # waits for the lock the first one holds
        with cache_lock(cache):
            with open(path) as probe:               # another process's view of the lock
                try:
                    fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    seen.append("unlocked")
                except BlockingIOError:
                    seen.append("locked")

    waiting = threading.Thread(target=shard, daemon=True)
    with cache_lock(cache):                         # the failing first extraction
        waiting.start()
        time.sleep(0.5)                             # the shard blocks in flock meanwhile
        shutil.rmtree(cache)                        # `_remove_if_only_locks`
    waiting.join(10)
    assert seen == ["locked"] and os.path.exists(path)


def test_fix_commands_quote_the_weights_path(cache_copy):
    """A cache made with `--weights PATH` printed the path unquoted in every fix command:
    pasted, one with a space ended as "--weights /m/My" and an unrecognised argument."""
    import shlex

    from caption_attn.feature_cache import _settings_text, extract_command

    manifest = {**read_manifest(cache_copy), "weights": "/m/My W/w.h5", "seed": None}
    assert "--weights '/m/My W/w.h5' --dtype float16" in _settings_text(manifest)
    command = extract_command(cache_copy, manifest, "caps.json", "/data/my images")
    words = shlex.split(command)
    assert words[words.index("--weights") + 1] == "/m/My W/w.h5"
    assert words[words.index("--images") + 1] == "/data/my images"
    assert "--weights random --seed 0" in _settings_text(read_manifest(cache_copy))


def test_extraction_beside_a_reader_refuses_only_to_change_its_files(images, cache_copy):
    """Beside a running train or evaluate, a feature file to extract again (its image
    changed, or the file) is refused before anything is written; new images' files harm
    no reader and are extracted (`extract-features && train` rerun beside a running train);
    a train starting meanwhile is refused."""
    def features():   # {path: mtime} of every file but the lock files
        return {p: t for p, t in file_mtimes(cache_copy).items() if not p.endswith(".lock")}

    keys = sorted(GOOD)
    gone, touched = feature_path(cache_copy, keys[0]), feature_path(cache_copy, keys[1])
    os.remove(gone)
    with using_features(cache_copy, writing=False):
        st = os.stat(touched)
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # not the indexed file
        before = features()
        with pytest.raises(UserError, match=r"is reading its features now; extracting would "
                                            r"change feature files under it"):
            extract_features(images, extract_cfg(cache_copy), keys=keys, progress=False)
        assert features() == before
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns))              # as indexed
        npy = {p: t for p, t in features().items() if p.endswith(".npy")}
        with using_features(cache_copy, writing=True, readers_ok=True) as busy:
            assert isinstance(busy, CacheInUse)
            with pytest.raises(CacheInUse, match=r"extract-features` \(pid \d+: .*\) is "
                                                 r"writing"):
                with using_features(cache_copy, writing=False):
                    pass
        summary = extract_features(images, extract_cfg(cache_copy), keys=keys, progress=False)
        assert summary["extracted"] == 1 and os.path.exists(gone)
        assert {p: t for p, t in features().items() if p.endswith(".npy") and p != gone} == npy


def test_looking_for_the_caption_files_images_takes_few_stats(tmp_path, monkeypatch):
    """`train`'s checks of a new run without --images (which folder holds the caption file's
    images) look up a sample of its names: at COCO size (123k names) a stat of every name in
    every folder would double the cost of checking the features."""
    from caption_attn import feature_cache, feature_index
    stats = []
    real = feature_index._stat
    monkeypatch.setattr(feature_index, "_stat", lambda p: stats.append(p) or real(p))
    keys = [f"COCO_train2014_{i:012d}.jpg" for i in range(123_287)]
    train2014, val2014 = tmp_path / "train2014", tmp_path / "val2014"
    for folder in (train2014, val2014):
        folder.mkdir()
    (train2014 / keys[0]).write_bytes(b"x")
    manifest = {"images_dir": str(val2014), "images_dirs": [str(train2014), str(val2014)]}
    assert feature_cache.shared_names(manifest, keys) is None    # no name in both
    assert len(stats) == 2 * feature_cache.SAMPLE_NAMES
    (val2014 / keys[0]).write_bytes(b"y")
    assert feature_cache.shared_names(manifest, keys) == (
        keys[0], [str(train2014), str(val2014)], 1, feature_cache.SAMPLE_NAMES)
    # beside the caption file: its folder and at most MAX_BESIDE subfolders
    for i in range(40):
        (tmp_path / f"sub{i:02d}").mkdir()
    stats.clear()
    digests = {k: "0" * 16 for k in keys}
    assert feature_cache.other_images_beside(str(tmp_path / "captions.json"), digests,
                                             None) is None
    assert len(stats) == (1 + feature_cache.MAX_BESIDE) * feature_cache.PROBE_NAMES


def test_modification_times_a_copy_keeps_coarser_still_match_the_index():
    """A cache moved with tar (GNU's default format keeps whole seconds), zip (2 s, rounded
    up), scp -p, or onto exFAT, FAT, NTFS or SMB had every feature file "changed after
    extraction", and the advice (copy it again with `cp -a`) could not mend that. A time cut
    (or rounded) to such a step matches; any other time does not."""
    from caption_attn.feature_index import same_mtime
    t = 1_733_650_123_456_789_123                      # ns, as ext4 records a write
    for kept in (t, t - t % 100, t - t % 1_000, t - t % 10_000_000, t - t % 10**9,
                 t - t % (2 * 10**9), t - t % (2 * 10**9) + 2 * 10**9):   # zip: rounded up
        assert same_mtime(t, kept), kept
    for other in (t + 1, t - 1, t + 10**9, t - t % 10**9 - 3 * 10**9, t - t % 10**9 + 2 * 10**9,
                  1_000_000_000, t + 37):              # a later write; `touch -d @1`
        assert not same_mtime(t, other), other
    # a file system of coarse times (whole seconds, exFAT's 10 ms): a write a second (or a
    # few ms) later lands on a whole step by itself, and is no copy's
    whole, exfat = 101 * 10**9, 100_370_000_000
    for recorded, rewritten in ((whole, whole + 10**9), (whole, whole + 2 * 10**9),
                                (exfat, 101 * 10**9), (exfat, 102 * 10**9)):
        assert not same_mtime(recorded, rewritten), (recorded, rewritten)
    assert same_mtime(exfat, 100 * 10**9)              # exFAT's cut to a second by tar


def test_a_cache_and_images_copied_with_whole_second_times_are_usable(images, cache_copy,
                                                                      tmp_path):
    manifest = read_manifest(cache_copy)
    work = str(tmp_path / "images")
    shutil.copytree(images, work)
    for folder in (cache_copy, work):                  # as `tar x` sets them
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                mtime = os.stat(path).st_mtime_ns
                os.utime(path, ns=(mtime, mtime - mtime % 10**9))
    paths, problems = usable_features(cache_copy, GOOD, manifest, work)
    assert sorted(paths) == sorted(GOOD) and problems == {}
