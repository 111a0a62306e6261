"""Image keys that differ only in letter case ("Dog.jpg", "dog.jpg") on a --cache whose file
system ignores case (macOS, exFAT/FAT/NTFS drives, SMB shares, ext4 with casefold): one
feature file for two images. `extract-features` fails such pairs and `usable_features`
(train, evaluate) refuses a file two names share (caption_attn/feature_cache.py, extract.py).

This machine's tmp folders tell case apart: a folding file system is `names_fold` patched to
say so, and a file two names share is a hard link (one inode under both names); so is one
image found under two spellings on an images folder that ignores case.
"""

import contextlib
import os
import unicodedata

import numpy as np
import pytest

from caption_attn import extract, feature_cache, feature_index
from caption_attn.extract import extract_features, format_summary, shard_of
from caption_attn.feature_cache import (CASE, FORM, SHARED_FILE, feature_path, folded_name,
                                        meeting_folder, name_variants, names_fold, names_meet,
                                        read_failed, read_manifest, usable_features)
from image_samples import extract_cfg, scene, write_rgb

DOGS = ["Dog.jpg", "dog.jpg"]
NFC, NFD = "caf\u00e9.jpg", unicodedata.normalize("NFD", "caf\u00e9.jpg")


def _work(tmp_path, names=("Dog.jpg", "dog.jpg", "cat.jpg")) -> str:
    work = tmp_path / "work"
    for seed, name in enumerate(names):
        write_rgb(str(work / name), scene(60 + seed))
    return str(work)


@pytest.fixture
def folding(monkeypatch):
    """Every folder of every cache ignores letter case and Unicode form (as APFS); returns
    the folders asked about."""
    asked = []
    monkeypatch.setattr(feature_cache, "names_fold",
                        lambda folder: asked.append(folder) or frozenset({CASE, FORM}))
    return asked


# --------------------------------------------------------------------------- names and probe
def test_folded_names_group_what_case_insensitive_file_systems_fold():
    nfc, nfd = "caf\u00e9.jpg", unicodedata.normalize("NFD", "caf\u00e9.jpg")
    keys = ["Dog.jpg", "dog.jpg", "cat.jpg", "Train/x.jpg", "train/x.jpg", nfc, nfd,
            "CAF\u00c9.jpg", "\u0131.jpg", "I.jpg", "dog.jpeg", "a/dog.jpg"]
    assert name_variants(keys) == [sorted(["CAF\u00c9.jpg", nfc, nfd]), ["Dog.jpg", "dog.jpg"],
                                   ["I.jpg", "\u0131.jpg"], ["Train/x.jpg", "train/x.jpg"]]
    assert name_variants(["a.jpg", "b.jpg", "a.jpg"]) == []
    assert folded_name("Train/Dog.JPG") == "train/dog.jpg"


def test_the_probe_tells_this_tmp_folder_apart_and_leaves_nothing(tmp_path, monkeypatch):
    assert names_fold(str(tmp_path)) == frozenset()   # ext4 / overlayfs: folds nothing
    assert os.listdir(tmp_path) == []
    assert names_fold(str(tmp_path / "absent")) is None   # cannot be told: no file made
    assert feature_cache.names_meet(str(tmp_path / "absent"), *DOGS)  # taken as meeting
    # the same probe on folders seen through a lookup that ignores case (NTFS, exFAT), or
    # only the Unicode form (case-sensitive APFS, ZFS normalization=formD), or both (APFS)
    real = os.path.lexists
    folds = {"case": lambda n: n.lower(), "form": lambda n: unicodedata.normalize("NFC", n),
             "both": lambda n: unicodedata.normalize("NFC", n).lower()}

    def lexists(path):
        head, name = os.path.split(path)
        fold = folds.get(os.path.basename(head))
        return real(path) or (fold is not None and fold(name) in map(fold, os.listdir(head)))
    monkeypatch.setattr(os.path, "lexists", lexists)
    for kind, expected in [("case", {CASE}), ("form", {FORM}), ("both", {CASE, FORM})]:
        folder = tmp_path / kind
        folder.mkdir()
        assert names_fold(str(folder)) == expected and os.listdir(folder) == []


@pytest.mark.parametrize("folds,meeting", [
    ({CASE, FORM}, ["Dog", "café", "Café"]), ({CASE}, ["Dog"]), ({FORM}, ["café"]),
    (set(), []), (None, ["Dog", "café", "Café"])])
def test_names_meet_where_the_file_system_folds_how_they_differ(tmp_path, monkeypatch,
                                                                folds, meeting):
    """A pair meets where its cache folds every kind of difference it has: case-sensitive
    APFS (the form only) keeps Dog.jpg and dog.jpg apart, NTFS (case only) the NFC and NFD
    café.jpg; "Café.jpg" in NFC and "café.jpg" in NFD need both; unknown: as if they met."""
    monkeypatch.setattr(feature_cache, "names_fold",
                        lambda folder: None if folds is None else frozenset(folds))
    pairs = {"Dog": DOGS, "café": [NFC, NFD], "Café": ["Caf\u00e9.jpg", NFD]}
    assert [n for n, pair in pairs.items() if names_meet(str(tmp_path), *pair)] == meeting


def test_a_cache_folding_only_unicode_forms_extracts_names_differing_in_case(
        cache_copy, tmp_path, monkeypatch):
    """Case-sensitive APFS or ZFS with normalization=formD: Dog.jpg and dog.jpg have two
    feature files, and failed with the advice to use a case-sensitive file system."""
    monkeypatch.setattr(feature_cache, "names_fold", lambda folder: frozenset({FORM}))
    work = _work(tmp_path, DOGS + [NFC, NFD])
    summary = extract_features(work, extract_cfg(cache_copy), keys=DOGS + [NFC, NFD],
                               progress=False)
    assert summary["extracted"] == 2 and sorted(summary["failures"]) == sorted([NFC, NFD])
    assert summary["failures"][NFC] == f"{extract.FOLDED}{NFD}{extract.folded_why(NFC, NFD)}"
    # no advice to use a case-sensitive file system: it would fold these names too
    assert "Unicode form (NFC, NFD)" in summary["failures"][NFC]
    assert "letter case" not in summary["failures"][NFC]
    assert "case-sensitive" not in summary["failures"][NFC]
    assert summary["case_variants"] == [DOGS]


def test_names_meet_in_the_folder_of_their_first_difference(tmp_path):
    cache = str(tmp_path)
    assert meeting_folder(cache, "Train/x.jpg", "train/x.jpg") == cache
    assert meeting_folder(cache, "a/B/x.jpg", "a/b/x.jpg") == cache      # a/ not made yet
    os.mkdir(tmp_path / "a")
    assert meeting_folder(cache, "a/B/x.jpg", "a/b/x.jpg") == str(tmp_path / "a")
    assert meeting_folder(cache, "a/X.jpg", "a/x.jpg") == str(tmp_path / "a")


# --------------------------------------------------------------------------- extraction
def test_names_a_folding_cache_would_give_one_file_fail_before_any_is_written(
        cache_copy, tmp_path, folding):
    work = _work(tmp_path, DOGS + ["cat.jpg", "Sub/x.jpg", "sub/x.jpg"])
    keys = DOGS + ["cat.jpg", "Sub/x.jpg", "sub/x.jpg", "DOG.JPG"]     # DOG.JPG: no image
    summary = extract_features(work, extract_cfg(cache_copy), keys=keys, progress=False)
    assert summary["extracted"] == 1 and summary["exit_code"] == 0
    expected = {"Dog.jpg": "dog.jpg", "dog.jpg": "Dog.jpg", "Sub/x.jpg": "sub/x.jpg",
                "sub/x.jpg": "Sub/x.jpg"}
    failures = summary["failures"]
    assert failures["DOG.JPG"] == "missing"           # a name without its image takes none
    for key, other in expected.items():
        assert failures[key] == f"{extract.FOLDED}{other}{extract.folded_why(key, other)}"
        assert "letter case, which" in failures[key] and "case-sensitive" in failures[key]
        assert not os.path.lexists(feature_path(cache_copy, key))
        assert read_failed(cache_copy)[key] == failures[key]
    assert set(folding) == {cache_copy}                 # asked where they meet only
    assert ("failed images are listed in" in format_summary(summary)
            and "rename one of the images" in format_summary(summary))
    # nothing else to extract: the run failed as a whole
    summary = extract_features(work, extract_cfg(cache_copy), keys=DOGS, progress=False)
    assert (summary["exit_code"], summary["message"]) == (1, "nothing could be extracted")


def test_a_pair_split_over_shards_fails_in_both(tmp_path, folding):
    work = _work(tmp_path, ["Cat2.jpg", "cat2.jpg"])
    keys = ["Cat2.jpg", "cat2.jpg"]
    assert shard_of(keys[0], 2) != shard_of(keys[1], 2)
    for shard in (0, 1):
        cfg = extract_cfg(tmp_path / "cache", num_shards=2, shard_index=shard)
        mine, failed = extract._shard_keys(work, cfg, keys)
        assert mine == [] and list(failed) == [k for k in keys if shard_of(k, 2) == shard]


def test_without_folding_both_names_are_extracted_and_noted(cache_copy, tmp_path):
    work = _work(tmp_path)
    summary = extract_features(work, extract_cfg(cache_copy), keys=DOGS + ["cat.jpg"],
                               progress=False)
    assert summary["extracted"] == 3 and summary["failures"] == {}
    assert summary["case_variants"] == [DOGS]
    assert not np.array_equal(*(np.load(feature_path(cache_copy, k)) for k in DOGS))
    paths, problems = usable_features(cache_copy, DOGS, read_manifest(cache_copy), work)
    assert sorted(paths) == DOGS and problems == {}
    assert ("note: 2 image names differ from another only in letter case or Unicode form "
            "(e.g. Dog.jpg and dog.jpg): this --cache keeps their feature files apart"
            in format_summary(summary))


def _share_one_file(cache, work, vouch_both: bool) -> None:
    """dog.jpg's feature file becomes Dog.jpg's (a hard link), as on a cache that ignores case;
    `vouch_both`: dog.jpg's index entry matches it too, as when an extraction before the fix
    wrote both within one coarse mtime tick (exFAT, FAT)."""
    with pytest.MonkeyPatch.context() as m:        # extracted where case is told apart
        m.setattr(feature_cache, "names_fold", lambda folder: frozenset())
        extract_features(work, extract_cfg(cache), keys=DOGS + ["cat.jpg"], progress=False)
    dog = feature_path(cache, "dog.jpg")
    os.remove(dog)
    os.link(feature_path(cache, "Dog.jpg"), dog)
    if vouch_both:
        entry = feature_index.load_index(cache).entries["dog.jpg"][-1]
        st = os.stat(dog)
        writer = feature_index.SegmentWriter(cache)
        writer.add(entry._replace(size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino))
        writer.close()


def test_train_never_takes_one_file_for_two_names(cache_copy, tmp_path):
    work = _work(tmp_path)
    _share_one_file(cache_copy, work, vouch_both=True)
    manifest = read_manifest(cache_copy)
    paths, problems = usable_features(cache_copy, DOGS + ["cat.jpg"], manifest, work)
    assert list(paths) == ["cat.jpg"] and problems == dict.fromkeys(DOGS, SHARED_FILE)
    # one of the names alone: the other's entry vouches for its file too
    paths, problems = usable_features(cache_copy, ["dog.jpg"], manifest, work)
    assert paths == {} and problems == {"dog.jpg": SHARED_FILE}
    text = feature_cache.describe_problems(problems, cache_copy, manifest=manifest)
    assert "1 shared with another image name (the names differ only in letter case" in text
    assert "Of the images sharing a file, extract-features extracts none" in text


def test_a_rerun_neither_replaces_nor_takes_another_names_file(cache_copy, tmp_path, folding):
    work = _work(tmp_path)
    _share_one_file(cache_copy, work, vouch_both=False)   # Dog.jpg's, by its entry alone
    summary = extract_features(work, extract_cfg(cache_copy), keys=["dog.jpg", "cat.jpg"],
                               progress=False)
    assert summary["failures"] == {"dog.jpg": f"{extract.HELD}Dog.jpg"
                                              f"{extract.folded_why('dog.jpg', 'Dog.jpg')}"}
    assert summary["extracted"] == 0 and summary["stale_removed"] == {}
    paths, _ = usable_features(cache_copy, ["Dog.jpg"], read_manifest(cache_copy), work)
    assert list(paths) == ["Dog.jpg"]                    # its features kept, still usable


def test_a_file_both_names_entries_vouch_for_is_removed(cache_copy, tmp_path, folding):
    work = _work(tmp_path)
    _share_one_file(cache_copy, work, vouch_both=True)
    summary = extract_features(work, extract_cfg(cache_copy), keys=["dog.jpg", "cat.jpg"],
                               progress=False)
    assert list(summary["failures"]) == ["dog.jpg"] and list(summary["stale_removed"]) == \
        ["dog.jpg"]
    assert not os.path.lexists(feature_path(cache_copy, "dog.jpg"))
    # both named: both fail, and the file (either's) is gone
    _share_one_file(cache_copy, work, vouch_both=True)
    summary = extract_features(work, extract_cfg(cache_copy), keys=DOGS, progress=False)
    assert sorted(summary["failures"]) == DOGS and sorted(summary["stale_removed"]) == DOGS
    assert not any(os.path.lexists(feature_path(cache_copy, k)) for k in DOGS)


def _one_file(cache, key, other) -> None:
    """`other`'s feature file becomes `key`'s (a hard link), as on a cache ignoring case."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(feature_path(cache, other))
    os.link(feature_path(cache, key), feature_path(cache, other))


@pytest.mark.parametrize("old_name", ["gone", "one_file"])
def test_an_image_renamed_only_in_case_is_extracted_again(cache_copy, tmp_path, folding,
                                                          old_name):
    """IMG.JPG, extracted, is img.jpg now (the old name gone; or, on an images folder that
    ignores case too, one image under both names). Its feature file, IMG.JPG's by that
    key's entry, held it back on every run ("nothing could be extracted", and train's
    advice, to extract again, looped). It is extracted again now, its write replacing the
    one file: img.jpg's features from then on, and IMG.JPG's old entry gives them to no
    one, also where a coarse mtime lets it vouch for the new file."""
    work = tmp_path / "work"
    write_rgb(str(work / "IMG.JPG"), scene(70))
    extract_features(str(work), extract_cfg(cache_copy), keys=["IMG.JPG"], progress=False)
    old = feature_index.load_index(cache_copy).entries["IMG.JPG"][-1]
    (os.rename if old_name == "gone" else os.link)(work / "IMG.JPG", work / "img.jpg")
    _one_file(cache_copy, "IMG.JPG", "img.jpg")
    summary = extract_features(str(work), extract_cfg(cache_copy), keys=["img.jpg"],
                               progress=False)
    assert summary["failures"] == {} and summary["exit_code"] == 0, summary["failures"]
    assert summary["extracted"] == 1 and summary["invalid"] == {
        "img.jpg": f"{extract.RENAMED}IMG.JPG{extract.RENAMED_WHY}"}
    _one_file(cache_copy, "img.jpg", "IMG.JPG")          # the write replaced the one file
    manifest = read_manifest(cache_copy)
    paths, problems = usable_features(cache_copy, ["img.jpg"], manifest, str(work))
    assert list(paths) == ["img.jpg"] and problems == {}
    paths, problems = usable_features(cache_copy, ["IMG.JPG"], manifest, str(work))
    assert paths == {} and problems == {"IMG.JPG": feature_index.REWRITTEN}
    summary = extract_features(str(work), extract_cfg(cache_copy), keys=["img.jpg"],
                               progress=False)
    assert (summary["skipped"], summary["extracted"], summary["failures"]) == (1, 0, {})
    # a coarse mtime (exFAT, FAT): the new file got the old one's, so both entries vouch
    new = feature_index.load_index(cache_copy).entries["img.jpg"][-1]
    os.utime(feature_path(cache_copy, "img.jpg"), ns=(old.mtime_ns, old.mtime_ns))
    writer = feature_index.SegmentWriter(cache_copy)
    writer.add(old)
    writer.add(new._replace(mtime_ns=old.mtime_ns))
    writer.close()
    for key in ("IMG.JPG", "img.jpg"):                   # whose they are cannot be told
        paths, problems = usable_features(cache_copy, [key], manifest, str(work))
        assert paths == {} and problems == {key: SHARED_FILE}
    summary = extract_features(str(work), extract_cfg(cache_copy), keys=["img.jpg"],
                               progress=False)
    assert summary["extracted"] == 1 and summary["failures"] == {}
    _one_file(cache_copy, "img.jpg", "IMG.JPG")
    paths, problems = usable_features(cache_copy, ["img.jpg"], manifest, str(work))
    assert list(paths) == ["img.jpg"] and problems == {}


def test_a_renamed_images_other_name_still_there_as_another_image_holds_it(
        cache_copy, tmp_path, folding):
    """The other name's image still there, another file: two images, one feature file, held
    (as before); with only the new name's image missing, held too (not removed)."""
    work = _work(tmp_path)
    _share_one_file(cache_copy, work, vouch_both=False)
    os.remove(os.path.join(work, "dog.jpg"))
    summary = extract_features(work, extract_cfg(cache_copy), keys=["dog.jpg"], progress=False)
    assert summary["failures"] == {"dog.jpg": f"{extract.HELD}Dog.jpg"
                                              f"{extract.folded_why('dog.jpg', 'Dog.jpg')}"}
    assert os.path.samefile(feature_path(cache_copy, "dog.jpg"),
                            feature_path(cache_copy, "Dog.jpg"))


def test_another_folders_image_of_the_other_case_is_no_rename(tmp_path, monkeypatch):
    """A cache extracted from two folders, on a file system that ignores case: A's Dog.jpg
    and B's dog.jpg are two pictures. B's dog.jpg was taken for a rename of Dog.jpg (B has
    none) and overwrote A's features with exit 0; it is held now, as Dog.jpg is still in
    the folder its index entry records, and A's features stay usable."""
    cache = str(tmp_path / "cache")
    a, b = tmp_path / "A", tmp_path / "B"
    write_rgb(str(a / "Dog.jpg"), scene(70))
    write_rgb(str(b / "dog.jpg"), scene(71))
    with monkeypatch.context() as m:
        m.setattr(feature_cache, "names_fold", lambda folder: frozenset())
        extract_features(str(a), extract_cfg(cache), keys=["Dog.jpg"], progress=False)
    os.link(feature_path(cache, "Dog.jpg"), feature_path(cache, "dog.jpg"))   # one file
    before = open(feature_path(cache, "Dog.jpg"), "rb").read()
    monkeypatch.setattr(feature_cache, "names_fold", lambda folder: frozenset({CASE, FORM}))
    summary = extract_features(str(b), extract_cfg(cache), keys=["dog.jpg"], progress=False)
    assert summary["failures"]["dog.jpg"].startswith(extract.HELD), summary["failures"]
    assert summary["extracted"] == 0 and summary["exit_code"] == 1
    assert open(feature_path(cache, "Dog.jpg"), "rb").read() == before
    paths, problems = usable_features(cache, ["Dog.jpg"], read_manifest(cache), str(a))
    assert "Dog.jpg" in paths and not problems
