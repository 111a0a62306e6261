"""Tests of caption file reading, records and splits (`caption_attn.data`)."""

import itertools
import json
import os
import random
import re
import threading

import pytest

from caption_attn import data
from caption_attn.config import DataConfig, ExtractConfig, VocabConfig
from caption_attn.errors import UserError

# Three images; "a.jpg" has its captions spread over the file (merged in file order).
ENTRIES = [
    ("a.jpg", "A red circle ."),
    ("b.jpg", "Two dogs, running on grass"),
    ("a.jpg", "a circle that is red"),
    ("c.jpg", "Un café près de la mer"),
    ("b.jpg", "dogs play"),
]
EXPECTED = {
    "a.jpg": ["A red circle .", "a circle that is red"],
    "b.jpg": ["Two dogs, running on grass", "dogs play"],
    "c.jpg": ["Un café près de la mer"],
}


def write(tmp_path, name, text, bom=False, crlf=False):
    """Write `text` as UTF-8 (optionally with BOM / CRLF line ends); return the path."""
    if crlf:
        text = text.replace("\n", "\r\n")
    raw = text.encode("utf-8")
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + raw if bom else raw)
    return str(path)


def coco_text(entries=ENTRIES):
    names = sorted({n for n, _ in entries})
    ids = {n: 100 + i for i, n in enumerate(names)}
    return json.dumps({
        "info": {}, "images": [{"file_name": n, "id": ids[n]} for n in names],
        "annotations": [{"id": i, "image_id": ids[n], "caption": c}
                        for i, (n, c) in enumerate(entries)]}, indent=1, ensure_ascii=False)


def karpathy_images(entries=ENTRIES, split="train"):
    images = {}
    for name, caption in entries:
        images.setdefault(name, {"filename": name, "split": split, "sentences": []})
        images[name]["sentences"].append({"raw": caption, "tokens": caption.split()})
    return list(images.values())


def karpathy_text(images):
    return json.dumps({"dataset": "test", "images": images}, indent=1, ensure_ascii=False)


def token_text(entries=ENTRIES):
    """`IMAGE#N<TAB>CAPTION` lines, N counting each image's captions from 0."""
    lines, count = [], {}
    for n, c in entries:
        lines.append(f"{n}#{count.get(n, 0)}\t{c}\n")
        count[n] = count.get(n, 0) + 1
    return "".join(lines)


def csv_text(entries=ENTRIES):
    def quote(c):
        return f'"{c}"' if "," in c else c
    return "image,caption\n" + "".join(f"{n},{quote(c)}\n" for n, c in entries)


TEXTS = {"coco": coco_text, "karpathy": lambda: karpathy_text(karpathy_images()),
         "flickr-token": token_text, "flickr-csv": csv_text}


def as_dict(captions):
    return {r.image: r.captions for r in captions.records}


# --------------------------------------------------------------------------- every format
@pytest.mark.parametrize("fmt", sorted(TEXTS))
@pytest.mark.parametrize("bom,crlf", [(False, False), (True, False), (False, True),
                                      (True, True)])
def test_every_format_auto_detected_and_merged(tmp_path, fmt, bom, crlf):
    path = write(tmp_path, "captions", TEXTS[fmt](), bom=bom, crlf=crlf)
    assert data.detect_format(path) == fmt
    for format in ("auto", fmt):
        captions = data.load_captions(path, format)
        assert captions.format == fmt
        assert as_dict(captions) == EXPECTED  # merged, file order, no stray \r or BOM
        assert [r.image for r in captions.records] == ["a.jpg", "b.jpg", "c.jpg"]
        assert captions.num_captions == 5
        assert captions.has_split == (fmt == "karpathy")


@pytest.mark.parametrize("fmt", sorted(TEXTS))
def test_old_mac_line_ends_are_line_ends(tmp_path, fmt):
    """A file with CR-only line ends (classic Mac, some spreadsheet exports): a Flickr token
    file was read as one image with one caption of every line (exit 0), a CSV crashed with a
    csv.Error traceback while its format was detected."""
    path = write(tmp_path, "captions", TEXTS[fmt]().replace("\n", "\r"))
    captions = data.load_captions(path)
    assert captions.format == fmt and as_dict(captions) == EXPECTED


def test_a_stray_carriage_return_in_a_csv_header_is_a_one_line_error(tmp_path):
    path = write(tmp_path, "c.csv", "image,cap\rtion\na.jpg,one\n")
    with pytest.raises(UserError, match="cannot detect the caption format from line 1"):
        data.load_captions(path)


@pytest.mark.parametrize("fmt", sorted(TEXTS))
def test_a_bare_carriage_return_ends_a_line_in_a_file_with_line_feeds_too(tmp_path, fmt):
    """Line ends mixed (LF, bare CR, CRLF) as Python's universal newlines read them: a token
    file with both read as 2 images, the second's caption holding the other lines (exit 0),
    and a CR-only file with one final LF as 1 image."""
    text = TEXTS[fmt]().rstrip("\n") + "\n"
    lines = text.split("\n")[:-1]
    mixed = "".join(line + ("\r", "\n", "\r\n")[i % 3] for i, line in enumerate(lines))
    captions = data.load_captions(write(tmp_path, "mixed", mixed))
    assert captions.format == fmt and as_dict(captions) == EXPECTED
    cr_then_lf = text.replace("\n", "\r")[:-1] + "\n"
    assert as_dict(data.load_captions(write(tmp_path, "cr_lf", cr_then_lf))) == EXPECTED


def test_a_stray_carriage_return_inside_a_token_line_ends_it_and_is_refused(tmp_path):
    """It was kept inside the caption, while the same carriage return in a CSV ended the row
    (the csv module reads with universal newlines): now it ends the line everywhere, so the
    rest of the line is a line without a tab, refused naming it and saying why."""
    stray = write(tmp_path, "stray.txt", "a.jpg#0\ta dog\r running\nb.jpg#0\ta cat\n")
    with pytest.raises(UserError, match=r"stray\.txt: line 2: expected `IMAGE#N<TAB>CAPTION`, "
                                        r"got ' running' \(a line ends at a line feed, CRLF or "
                                        r"a bare carriage return\)"):
        data.load_captions(stray)


def test_coco_image_id_is_the_coco_id(tmp_path):
    captions = data.load_captions(write(tmp_path, "c.json", coco_text()))
    assert {r.image: r.image_id for r in captions.records} == {
        "a.jpg": 100, "b.jpg": 101, "c.jpg": 102}


def test_coco_image_without_captions_is_dropped(tmp_path):
    obj = json.loads(coco_text())
    obj["images"].append({"file_name": "lonely.jpg", "id": 7})
    captions = data.load_captions(write(tmp_path, "c.json", json.dumps(obj)))
    assert "lonely.jpg" not in as_dict(captions)
    # ... and named: it was dropped without a count
    assert captions.uncaptioned == ["lonely.jpg"] and captions.skipped_empty == 0
    assert captions.empty_note() == (f"1 image(s) in {tmp_path / 'c.json'} have no usable "
                                     f"caption and are left out (e.g. 'lonely.jpg')")


def test_flickr_image_ids_follow_key_order_not_file_order(tmp_path):
    shuffled = list(reversed(ENTRIES))
    captions = data.load_captions(write(tmp_path, "t.txt", token_text(shuffled)))
    assert [(r.image, r.image_id) for r in captions.records] == [
        ("a.jpg", 0), ("b.jpg", 1), ("c.jpg", 2)]
    assert captions.records[0].captions == ["a circle that is red", "A red circle ."]


def test_flickr_csv_quoted_commas_and_quotes(tmp_path):
    text = 'image,caption\nx.jpg,"A dog, a cat ""and"" a bird"\nx.jpg,a man in a "x" shirt\n'
    captions = data.load_captions(write(tmp_path, "captions.txt", text))
    assert captions.records[0].captions == ['A dog, a cat "and" a bird',
                                            'a man in a "x" shirt']


def test_karpathy_fields(tmp_path):
    objects = [{"color": "red", "shape": "circle", "size": "large", "bbox": [1, 2, 30, 40]}]
    images = [
        {"filepath": "val2014", "filename": "v.jpg", "cocoid": 42, "imgid": 0,
         "split": "restval", "sentences": [{"raw": "one"}]},
        {"filename": "f.jpg", "imgid": 5, "split": "test", "sentences": [{"raw": "two"}],
         "objects": objects},
        {"filename": "s.png", "split": "val", "sentences": [{"raw": "three"}]},
    ]
    captions = data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))
    by_key = {r.image: r for r in captions.records}
    assert sorted(by_key) == ["f.jpg", "s.png", "val2014/v.jpg"]
    assert by_key["val2014/v.jpg"].split == "train"  # restval joins train
    assert by_key["val2014/v.jpg"].image_id == 42    # cocoid first
    assert by_key["f.jpg"].image_id == 5             # then imgid
    assert by_key["s.png"].image_id == 2             # then the running index
    assert by_key["f.jpg"].objects == objects
    assert by_key["s.png"].objects is None
    assert by_key["f.jpg"].split == "test" and by_key["s.png"].split == "val"


@pytest.mark.parametrize("objects, message", [
    ([1, 2], r"images\[0\]\.objects\[0\] must be a JSON object"),
    ([{"color": "red", "bbox": [0, 0, 5, 5]}], r"images\[0\]\.objects\[0\] has no `shape` key"),
    ([{"color": "red", "shape": 3, "bbox": [0, 0, 5, 5]}], r"images\[0\]\.objects\[0\]\.shape must be a string"),
    ([{"color": "red", "shape": "circle", "bbox": [0, 0, 5]}],
     r"images\[0\]\.objects\[0\]\.bbox must be \[x, y, w, h\]"),
    ([{"color": "red", "shape": "circle", "bbox": [0, 0, "5", 5]}],
     r"images\[0\]\.objects\[0\]\.bbox must be \[x, y, w, h\]"),
])
def test_karpathy_objects_that_scoring_cannot_read_are_refused(tmp_path, objects, message):
    """Ground truth that evaluate's shapes metrics cannot read (TypeError / KeyError
    tracebacks after decoding the whole split) is refused when the file is read."""
    images = [{"filename": "a.png", "split": "test", "sentences": [{"raw": "a red circle"}],
               "objects": objects}]
    with pytest.raises(UserError, match=r"k\.json: " + message):
        data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))


def test_load_dataset_keeps_the_karpathy_split(tmp_path):
    images = karpathy_images(split="test")
    path = write(tmp_path, "k.json", karpathy_text(images))
    captions = data.load_dataset(path, DataConfig(val_fraction=0.5, test_fraction=0.0))
    assert [r.split for r in captions.records] == ["test", "test", "test"]


def test_karpathy_unknown_split_lists_allowed(tmp_path):
    images = karpathy_images()
    images[1]["split"] = "holdout"
    path = write(tmp_path, "k.json", karpathy_text(images))
    with pytest.raises(UserError) as e:
        data.load_captions(path)
    msg = str(e.value)
    assert "k.json" in msg and "images[1]" in msg and "'holdout'" in msg
    for split in ("train", "val", "test", "restval"):
        assert split in msg


def test_karpathy_same_image_in_two_splits_is_an_error(tmp_path):
    images = karpathy_images()
    images.append({"filename": "a.jpg", "split": "test", "sentences": [{"raw": "again"}]})
    with pytest.raises(UserError, match=r"images\[3\].*'a\.jpg'.*one split"):
        data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))


def test_coco_duplicate_image_id_is_an_error(tmp_path):
    # the annotation of id 1 must not silently go to b.png while a.png vanishes
    obj = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
           "annotations": [{"image_id": 1, "caption": "a red circle"}]}
    with pytest.raises(UserError, match=r"dup\.json: images\[1\] and images\[0\] have the "
                                        r"same id 1 .*'a\.png'.*'b\.png'"):
        data.load_captions(write(tmp_path, "dup.json", json.dumps(obj)))


def test_coco_image_listed_twice_with_the_same_id_is_one_image(tmp_path):
    obj = json.loads(coco_text())
    obj["images"].append(dict(obj["images"][0]))  # an exact repeat contradicts nothing
    captions = data.load_captions(write(tmp_path, "c.json", json.dumps(obj)))
    assert as_dict(captions) == EXPECTED


def test_coco_annotation_listed_twice_is_one_caption(tmp_path):
    # files merged with an overlap repeat annotations: each counted twice, weighing double in
    # training and in CIDEr's mean over references
    obj = json.loads(coco_text())
    obj["annotations"] += [dict(a) for a in obj["annotations"]]
    captions = data.load_captions(write(tmp_path, "c.json", json.dumps(obj)))
    assert as_dict(captions) == EXPECTED
    # a repeat that differs only in whitespace around the caption is a repeat too
    obj = json.loads(coco_text())
    obj["annotations"].append({**obj["annotations"][0], "caption": " A red circle . "})
    assert as_dict(data.load_captions(write(tmp_path, "c.json", json.dumps(obj)))) == EXPECTED


@pytest.mark.parametrize("change", [{"caption": "a blue square"}, {"image_id": 102}])
def test_coco_annotation_id_of_two_different_annotations_keeps_both(tmp_path, change):
    """One annotation id on two different annotations (a converter numbering each image's
    captions from 0) keeps both, as pycocoevalcap scores them (COCOEvalCap reads
    `imgToAnns`, which keeps every annotation): refusing the whole file broke files read
    before, and the runs and evaluations made on them."""
    obj = json.loads(coco_text())
    obj["annotations"].append({**obj["annotations"][0], **change})
    captions = as_dict(data.load_captions(write(tmp_path, "c.json", json.dumps(obj))))
    image = "a.jpg" if "caption" in change else "c.jpg"                # (ids 100, 102)
    assert captions[image] == EXPECTED[image] + [change.get("caption", "A red circle .")]


def test_coco_annotation_repeated_is_read_once_whatever_comes_before_it(tmp_path):
    """A converter numbering each image's captions from 0, joined with an overlap: a repeat
    was compared only with the first annotation of its id, another image's, so b.jpg's
    caption 0 was kept twice when a.jpg's came first, and once otherwise."""
    annotations = [{"id": 0, "image_id": 1, "caption": "a cat"},
                   {"id": 0, "image_id": 2, "caption": "a dog"},
                   {"id": 0, "image_id": 2, "caption": "a dog "}]
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
    for order in itertools.permutations(annotations):
        path = write(tmp_path, "c.json", json.dumps({"images": images,
                                                     "annotations": list(order)}))
        assert as_dict(data.load_captions(path)) == {"a.jpg": ["a cat"], "b.jpg": ["a dog"]}


def test_coco_image_id_of_another_json_type_says_so(tmp_path):
    obj = {"images": [{"id": 1, "file_name": "a.png"}, {"id": "2", "file_name": "b.png"}],
           "annotations": [{"image_id": "1", "caption": "a red circle"}]}
    with pytest.raises(UserError, match=r"annotations\[0\]\.image_id '1' is not the `id` of "
                                        r"any entry of `images` \(`images` has the id 1 as a "
                                        r"number: ids must be of the same JSON type\)"):
        data.load_captions(write(tmp_path, "c.json", json.dumps(obj)))
    obj["annotations"][0]["image_id"] = 2
    with pytest.raises(UserError, match=r"has the id '2' as a string"):
        data.load_captions(write(tmp_path, "c.json", json.dumps(obj)))
    # a digit to str.isdigit that int() refuses: the plain error, not a ValueError traceback
    obj["annotations"][0]["image_id"] = "\u00b2"
    with pytest.raises(UserError, match=r"image_id '\u00b2' is not the `id` of any entry of "
                                        r"`images`$"):
        data.load_captions(write(tmp_path, "c.json", json.dumps(obj)))


def test_coco_one_file_under_two_ids_is_an_error(tmp_path):
    # merging both ids' captions into one record would describe one image with another's
    obj = json.loads(coco_text())
    obj["images"].append({"id": 7, "file_name": "./a.jpg"})
    obj["annotations"].append({"image_id": 7, "caption": "a blue square"})
    with pytest.raises(UserError, match=r"c\.json: images\[3\] \(id 7\) and images\[0\] "
                                        r"\(id 100\) are both the file 'a\.jpg'"):
        data.load_captions(write(tmp_path, "c.json", json.dumps(obj)))


@pytest.mark.parametrize("field, first, second", [
    ("objects", [{"color": "red", "shape": "circle", "bbox": [0, 0, 9, 9]}],
     [{"color": "blue", "shape": "square", "bbox": [0, 0, 9, 9]}]),
    ("height", 100, 200)])
def test_karpathy_image_listed_twice_with_other_ground_truth_is_an_error(
        tmp_path, field, first, second):
    # scoring would silently use the first entry's objects / size for both entries' captions
    images = karpathy_images()
    images[0].update({field: first, "width": 100})
    images.append({"filename": "a.jpg", "split": "train", "sentences": [{"raw": "again"}],
                   field: second, "width": 100})
    name = "objects" if field == "objects" else "size"
    with pytest.raises(UserError, match=rf"k\.json: images\[3\]: image 'a\.jpg' has other "
                                        rf"{name} here than earlier"):
        data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))


@pytest.mark.parametrize("objects, problem", [
    ([1, 2], r"objects\[0\] must be a JSON object, got int"),
    ([{"shape": "circle"}], r"objects\[0\] has no `color` key"),
    ([{"color": "red", "shape": None}], r"objects\[0\]\.shape must be a string"),
    ([{"color": "red", "shape": "circle", "bbox": [1, 2]}],
     r"objects\[0\]\.bbox must be \[x, y, w, h\]")])
def test_karpathy_objects_that_are_no_ground_truth_are_refused(tmp_path, objects, problem):
    """`objects` were only checked to be a list: [1, 2] or objects without a color were read,
    and `evaluate` crashed with a TypeError/KeyError traceback after decoding the split."""
    images = karpathy_images()
    images[1]["objects"] = objects
    with pytest.raises(UserError, match=r"k\.json: images\[1\]\." + problem):
        data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))


@pytest.mark.parametrize("change, differ", [
    (lambda e: e.update(filepath="train2014/"), "filepath"),     # the path spelled otherwise
    (lambda e: e.update(sentids=[5, 6]), "sentids"),
    (lambda e: e.update(sentences=[{"raw": "again"}]), "sentences")])
def test_karpathy_image_in_two_different_entries_is_refused_naming_both(
        tmp_path, change, differ):
    """One image in two entries that differ only in the spelling of its path or in `sentids`
    (files joined with an overlap, one of them rewritten) had its captions read twice,
    weighing double in training and in CIDEr (`inspect` counted 160 captions of 150). As
    COCO's parser refuses two different `images` entries of one id, so is a second entry of
    one image that is not an exact repeat (which is read once)."""
    images = karpathy_images()
    for i, image in enumerate(images):
        image.update(filepath="train2014", cocoid=100 + i, sentids=[0, 1])
    images.insert(2, dict(images[0]))
    change(images[2])
    with pytest.raises(UserError) as e:
        data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))
    assert str(e.value) == (
        f"{tmp_path / 'k.json'}: images[2] and images[0] are both the image "
        f"'train2014/a.jpg' (cocoid 100), but different entries (they differ in {differ}): "
        f"its captions would be read twice; list every image once, with all its captions")


# --------------------------------------------------------------------------- splits
def many_entries(n_images=400, per_image=3):
    return [(f"img{i:04d}.jpg", f"caption {k} of image {i}")
            for k in range(per_image) for i in range(n_images)]


def split_of(captions):
    return {r.image: r.split for r in captions.records}


def test_split_keeps_images_whole_and_honours_fractions(tmp_path):
    path = write(tmp_path, "t.txt", token_text(many_entries()))
    captions = data.load_dataset(path, DataConfig(val_fraction=0.1, test_fraction=0.2))
    keys = {s: [r.image for r in captions.split(s)] for s in data.SPLITS}
    assert len(keys["test"]) == 80 and len(keys["val"]) == 40 and len(keys["train"]) == 280
    all_keys = keys["train"] + keys["val"] + keys["test"]
    assert len(all_keys) == len(set(all_keys)) == 400  # no image in two splits
    assert all(len(r.captions) == 3 for r in captions.records)  # captions never separated


def test_split_is_deterministic_and_stable_under_shuffled_lines(tmp_path):
    lines = token_text(many_entries()).splitlines(keepends=True)
    cfg = DataConfig(val_fraction=0.1, test_fraction=0.1, seed=3)
    first = split_of(data.load_dataset(write(tmp_path, "a.txt", "".join(lines)), cfg))
    random.Random(0).shuffle(lines)
    shuffled = split_of(data.load_dataset(write(tmp_path, "b.txt", "".join(lines)), cfg))
    again = split_of(data.load_dataset(write(tmp_path, "a.txt", "".join(lines)), cfg))
    assert first == shuffled == again
    assert set(first.values()) == {"train", "val", "test"}


def test_seed_changes_the_split(tmp_path):
    path = write(tmp_path, "t.txt", token_text(many_entries()))
    a = split_of(data.load_dataset(path, DataConfig(seed=0)))
    b = split_of(data.load_dataset(path, DataConfig(seed=1)))
    assert a.keys() == b.keys() and a != b


def test_bad_fractions_are_a_user_error(tmp_path):
    path = write(tmp_path, "t.txt", token_text())
    with pytest.raises(UserError, match="val_fraction"):
        data.load_dataset(path, DataConfig(val_fraction=0.6, test_fraction=0.5))


# --------------------------------------------------------------------------- Flickr8k's lists
LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
         "test": "Flickr_8k.testImages.txt"}


def flickr8k_folder(tmp_path, fmt="flickr-token", lists=True, n_images=40):
    """A Flickr8k caption file of `n_images` images whose official lists (with `lists`) put
    the first 30 images in train, 5 in dev (val), 5 in test, and the rest in none."""
    entries = many_entries(n_images, per_image=2)
    path = write(tmp_path, "Flickr8k.token.txt" if fmt == "flickr-token" else "captions.txt",
                 token_text(entries) if fmt == "flickr-token" else csv_text(entries))
    official = {"train": range(0, 30), "val": range(30, 35), "test": range(35, 40)}
    for split, name in LISTS.items():
        if lists:
            write(tmp_path, name, "".join(f"img{i:04d}.jpg\n" for i in official[split]),
                  crlf=split == "val")
    return path, {f"img{i:04d}.jpg": s for s, r in official.items() for i in r}


@pytest.mark.parametrize("fmt", ["flickr-token", "flickr-csv"])
def test_flickr8k_official_lists_beside_the_file_are_its_split(tmp_path, fmt):
    """The README's Flickr8k line trained on Flickr8k.token.txt with a split by image hash:
    the official test and dev images were trained on, and images in none of the lists (92 in
    the real file) too, without a word. The lists beside the file now give the split; the
    images in none of them are left out with a note; --val-fraction is refused as for a
    Karpathy file, whose split is its own."""
    path, official = flickr8k_folder(tmp_path, fmt, n_images=43)
    captions = data.load_dataset(path, DataConfig())
    assert split_of(captions) == official                     # img0040-42 left out
    assert captions.split_source == "lists" and captions.unlisted == [
        "img0040.jpg", "img0041.jpg", "img0042.jpg"]
    assert captions.split_note == (
        f"split by Flickr8k's official lists beside {path} (Flickr_8k.trainImages.txt, "
        f"Flickr_8k.devImages.txt as val, Flickr_8k.testImages.txt); 3 image(s) in none of "
        f"them are left out (e.g. 'img0040.jpg', 'img0041.jpg', 'img0042.jpg')")
    with pytest.raises(UserError, match=r"^--val-fraction 0.2 splits files without a split of "
                                        r"their own, but Flickr8k's official lists beside "):
        data.refuse_unused_fractions(captions, DataConfig(val_fraction=0.2))
    stats = data.describe(path, DataConfig(), VocabConfig())
    assert stats["splits"] == {"train": 30, "val": 5, "test": 5} and stats["images"] == 40
    assert stats["unlisted_images"] == {"count": 3, "examples": [
        "img0040.jpg", "img0041.jpg", "img0042.jpg"]}
    assert ("(split by Flickr8k's official lists Flickr_8k.*Images.txt beside the file; 3 "
            "images in none of them left out (e.g. 'img0040.jpg', 'img0041.jpg', "
            "'img0042.jpg'))") in data.format_description(stats)
    # a run split by image hash before keeps it (`lists=False`): every image, as then
    hashed = data.load_dataset(path, DataConfig(), lists=False)
    assert hashed.split_source == "hash" and len(hashed.records) == 43


def test_flickr8k_lists_with_cr_line_ends_are_read_line_by_line(tmp_path):
    """A list with CR-only line ends (or LF and bare CR mixed) was one line naming no image:
    an empty test split, its images called "in none of them" (exit 0)."""
    path, official = flickr8k_folder(tmp_path)
    test = "".join(f"img{i:04d}.jpg\r" for i in range(35, 40))
    (tmp_path / LISTS["test"]).write_bytes(test.encode())
    train = "".join(f"img{i:04d}.jpg" + "\r\n"[i % 2] for i in range(30))
    (tmp_path / LISTS["train"]).write_bytes(train.encode())
    captions = data.load_dataset(path, DataConfig())
    assert split_of(captions) == official and captions.unlisted == []


def test_list_names_in_no_caption_data_are_counted_per_list_with_an_example(tmp_path):
    """A list naming an image the caption file lacks dropped it without a word."""
    path, official = flickr8k_folder(tmp_path)
    train = tmp_path / LISTS["train"]
    train.write_text(train.read_text() + "zz.jpg\nimg0099.jpg\n")
    test = tmp_path / LISTS["test"]
    test.write_text(test.read_text() + "gone.jpg\n")
    captions = data.load_dataset(path, DataConfig())
    assert split_of(captions) == official
    assert captions.unmatched == {str(train): ["zz.jpg", "img0099.jpg"],
                                  str(test): ["gone.jpg"]}
    assert captions.split_note.endswith(
        f"; 2 name(s) in {train} are in no caption data of {path} (e.g. 'zz.jpg', "
        f"'img0099.jpg'); 1 name(s) in {test} are in no caption data of {path} (e.g. "
        f"'gone.jpg')")
    stats = data.describe(path, DataConfig(), VocabConfig())
    assert stats["unmatched_list_names"] == {
        str(train): {"count": 2, "examples": ["zz.jpg", "img0099.jpg"]},
        str(test): {"count": 1, "examples": ["gone.jpg"]}}
    assert ("beside the file; 2 names in Flickr_8k.trainImages.txt, 1 name in "
            "Flickr_8k.testImages.txt in no caption data (e.g. 'zz.jpg', 'gone.jpg'))"
            ) in data.format_description(stats)


@pytest.mark.parametrize("line", ["img0001.jpg#0", "img0001.jpg\tx", "img0001.jpg#12  "])
def test_a_list_line_with_a_tab_or_hash_n_is_refused_naming_it(tmp_path, line):
    """A token line pasted into a list (`a.jpg#0`, `a.jpg<TAB>...`) named no image: dropped
    without a word."""
    path, _ = flickr8k_folder(tmp_path)
    train = tmp_path / LISTS["train"]
    train.write_text("img0000.jpg\n" + line + "\n")
    with pytest.raises(UserError) as e:
        data.load_dataset(path, DataConfig())
    assert str(e.value) == (
        f"{train}: line 2: expected an image name, got {line!r}: a Flickr8k split list "
        f"names one image a line, without `#N` or a tab (those are the caption file's)")


def test_list_changes_say_what_the_lists_moved_and_nothing_when_captions_changed(tmp_path):
    path, _ = flickr8k_folder(tmp_path, n_images=41)                # img0040 in no list
    before = data.load_dataset(path, DataConfig())
    splits = {s: sorted(r.image for r in before.split(s)) for s in data.SPLITS}
    recorded = data.caption_fingerprint(before.records, splits)
    assert data.list_changes(recorded, splits, before) is None      # nothing moved
    test = tmp_path / LISTS["test"]
    test.write_text(test.read_text() + "img0040.jpg\n")
    after = data.load_dataset(path, DataConfig())
    assert data.list_changes(recorded, splits, after) == (
        "1 image is newly listed ('img0040.jpg': in Flickr_8k.testImages.txt)")
    with open(path, "a") as f:
        f.write("img0001.jpg#7\tanother caption\n")
    assert data.list_changes(recorded, splits, data.load_dataset(path, DataConfig())) is None


def test_without_flickr8k_lists_the_split_by_image_hash_is_said(tmp_path):
    path, _ = flickr8k_folder(tmp_path, lists=False)
    captions = data.load_dataset(path, DataConfig())
    assert captions.split_source == "hash" and len(captions.records) == 40
    assert captions.split_note == (
        f"split by image hash (--val-fraction 0.05, --test-fraction 0.05, --seed 0): "
        f"Flickr8k's official lists Flickr_8k.*Images.txt are not beside {path}")
    assert data.describe(path, DataConfig(), VocabConfig())["split_source"] == (
        "by image hash (val 0.05, test 0.05, seed 0): Flickr8k's official lists "
        "Flickr_8k.*Images.txt are not beside the file")
    coco = data.load_dataset(write(tmp_path, "c.json", coco_text()), DataConfig())
    assert coco.split_note == (f"split by image hash (--val-fraction 0.05, --test-fraction "
                               f"0.05, --seed 0): {tmp_path / 'c.json'} has no split of its own")


def test_flickr8k_lists_that_cannot_split_are_refused_naming_the_file(tmp_path):
    path, _ = flickr8k_folder(tmp_path)
    os.remove(tmp_path / LISTS["val"])
    os.remove(tmp_path / LISTS["test"])
    with pytest.raises(UserError) as e:
        data.load_dataset(path, DataConfig())
    assert str(e.value) == (
        f"{path}: Flickr8k's official split lists beside it are incomplete: "
        f"{tmp_path / LISTS['val']} and {tmp_path / LISTS['test']} are missing (only "
        f"Flickr_8k.trainImages.txt is there); put all three beside it, or move them away "
        f"to split by image hash (--val-fraction, --test-fraction)")
    (tmp_path / LISTS["val"]).write_text("img0030.jpg\n")
    (tmp_path / LISTS["test"]).write_text("img0035.jpg\n\nimg0003.jpg\n")   # also in train
    with pytest.raises(UserError) as e:
        data.load_dataset(path, DataConfig())
    assert str(e.value) == (
        f"{tmp_path / LISTS['test']}: line 3: 'img0003.jpg' is also in "
        f"{tmp_path / LISTS['train']} (line 4): an image must be in one split; remove it from "
        f"one of the lists")
    (tmp_path / LISTS["test"]).write_bytes(b"img0035.jpg\n\xe9t\xe9.jpg\n")   # Latin-1
    with pytest.raises(UserError, match=r"^.*Flickr_8k\.testImages\.txt: not valid UTF-8 "):
        data.load_dataset(path, DataConfig())
    os.remove(tmp_path / LISTS["test"])
    os.mkdir(tmp_path / LISTS["test"])
    with pytest.raises(UserError, match=r"^.*Flickr_8k\.testImages\.txt: a folder, expected "
                                        r"Flickr8k's split list"):
        data.load_dataset(path, DataConfig())
    # the lists of another dataset name none of the file's images
    for split, name in LISTS.items():
        os.rmdir(tmp_path / name) if split == "test" else None
        (tmp_path / name).write_text(f"other_{split}.jpg\n")
    with pytest.raises(UserError, match=r"none of its 40 images is in Flickr8k's official "
                                        r"split lists beside it"):
        data.load_dataset(path, DataConfig())


# --------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(UserError, match="nope.json.*not found") as e:
        data.load_captions(path)
    assert e.value.exit_code == 2


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(UserError, match="folder"):
        data.load_captions(str(tmp_path))


def test_check_caption_file_refuses_in_the_words_of_reading_it(tmp_path):
    """`check_caption_file` refuses before TensorFlow's import what `load_captions` refuses
    after it (train, extract-features: seconds), in the same words; a named pipe is not
    opened (its writer would lose its one reader) and passes, as reading it would."""
    file = write(tmp_path, "c.csv", csv_text())
    for path, why in ((str(tmp_path / "typo.json"), "caption file not found"),
                      (str(tmp_path), "is a folder, expected a caption file"),
                      (os.path.join(file, "b.json"), "cannot read (Not a directory)")):
        with pytest.raises(UserError) as read:
            data.load_captions(path)
        with pytest.raises(UserError) as checked:
            data.check_caption_file(path)
        assert str(checked.value) == str(read.value) == f"{path}: {why}"
    pipe = str(tmp_path / "pipe")
    os.mkfifo(pipe)
    checking = threading.Thread(target=data.check_caption_file, args=(pipe,), daemon=True)
    checking.start()
    checking.join(10)
    assert not checking.is_alive()
    data.check_caption_file(file)


def test_malformed_json_names_line_and_column(tmp_path):
    path = write(tmp_path, "bad.json", '{"images": [\n  {"file_name": "a.jpg",}\n]}',
                 crlf=True)
    with pytest.raises(UserError, match=r"bad\.json: malformed JSON at line 2, column 25"):
        data.load_captions(path)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, r"deep\.json: JSON nested too deeply"),
    ('{"images": [{"id": 1, "file_name": "a\\ud800.png"}],\n "annotations": '
     '[{"image_id": 1, "caption": "x"}]}', r"deep\.json: line 1, column 38: .*\\ud800"),
    ('{"images": [{"id": 1, "file_name": "a.png"}],\n "annotations": '
     '[{"image_id": 1, "caption": "x \\uDC00 y"}]}', r"deep\.json: line 2, column 48: "),
])
def test_json_python_cannot_hold_is_a_user_error(tmp_path, text, message):
    """Deep nesting (RecursionError) and a lone UTF-16 surrogate escape (text that cannot be
    written as UTF-8 again: the split hash and vocab.json failed with tracebacks)."""
    path = write(tmp_path, "deep.json", text)
    with pytest.raises(UserError, match=message):
        data.load_captions(path)


def test_json_surrogate_pairs_and_escaped_backslashes_are_fine(tmp_path):
    text = ('{"images": [{"id": 1, "file_name": "a\\\\ud800.png"}], "annotations": '
            '[{"image_id": 1, "caption": "a \\ud83d\\ude00 face"}]}')
    captions = data.load_captions(write(tmp_path, "ok.json", text))
    assert captions.records[0].image == "a/ud800.png"
    assert captions.records[0].captions == ["a \U0001F600 face"]


def test_wrong_csv_header(tmp_path):
    path = write(tmp_path, "good.txt", "image,caption\na.jpg,x\n")
    with pytest.raises(UserError, match=r"captions\.txt: line 1: expected the CSV header"):
        data.load_captions(write(tmp_path, "captions.txt", "img,text\na.jpg,x\n"),
                           "flickr-csv")
    assert data.load_captions(path, "flickr-csv").num_captions == 1


def test_csv_unterminated_quote_names_its_line(tmp_path):
    path = write(tmp_path, "c.csv", 'image,caption\na.jpg,x\nb.jpg,"open\nc.jpg,y\n')
    with pytest.raises(UserError, match=r"c\.csv: line 3: .*unterminated quote"):
        data.load_captions(path)


def test_csv_quote_closed_lines_later_names_the_opening_line(tmp_path):
    path = write(tmp_path, "c.csv", 'image,caption\nb.jpg,"open\nc.jpg,y"\nd.jpg,z\n')
    with pytest.raises(UserError, match=r"c\.csv: line 2: .*several lines"):
        data.load_captions(path)


def test_csv_wrong_number_of_fields(tmp_path):
    path = write(tmp_path, "c.csv", "image,caption\na.jpg,x\n\nb.jpg,a dog, a cat\n",
                 crlf=True)
    with pytest.raises(UserError, match=r"c\.csv: line 4: expected 2 fields.*got 3"):
        data.load_captions(path)


def test_token_line_repeated_is_one_caption(tmp_path):
    # `cat` of two token files that overlap: each repeated IMAGE#N line was a second,
    # double-weighted copy of the caption (in training and in CIDEr's mean over references)
    captions = data.load_captions(write(tmp_path, "t.txt", token_text() + token_text()))
    assert as_dict(captions) == EXPECTED
    # the same caption under another #N is another annotator's: kept
    path = write(tmp_path, "t.txt", "a.jpg#0\ta dog\na.jpg#1\ta dog\n")
    assert as_dict(data.load_captions(path)) == {"a.jpg": ["a dog", "a dog"]}


def test_token_lines_without_a_number_read_once_are_said(tmp_path):
    """Two lines `a.jpg<TAB>A dog runs .` (no #N) were read once without a word, where a
    CSV's repeated row gets a note: two annotators may have written the caption alike."""
    path = write(tmp_path, "t.txt", "a.jpg\tA dog runs .\nb.jpg\tA cat\na.jpg\tA dog runs .\n"
                                    "b.jpg#0\tA cat\nb.jpg#0\tA cat\n")
    captions = data.load_captions(path, "flickr-token")
    assert as_dict(captions) == {"a.jpg": ["A dog runs ."], "b.jpg": ["A cat", "A cat"]}
    assert captions.repeated == [(3, "a.jpg")]       # (IMAGE#N repeated: one caption, as ever)
    assert captions.repeated_note() == (
        f"1 line of {path} repeats an earlier line of the same image and caption (e.g. line 3, "
        f"'a.jpg') and is read once, as lines of a file joined with an overlap; captions "
        f"written alike for one image by two annotators are read once too (a line without #N "
        f"does not number them; Flickr8k.token.txt's IMAGE#N keeps both)")


def test_csv_files_joined_with_cat_skip_the_second_header(tmp_path):
    """The second half's header became an image named 'image' with the caption 'caption'."""
    first, second = csv_text(ENTRIES[:2]), csv_text(ENTRIES[2:])
    second = "\ufeff" + second.replace("image,caption", "Image, Caption")   # its own BOM
    captions = data.load_captions(write(tmp_path, "c.csv", first + second, bom=True))
    assert as_dict(captions) == EXPECTED


def test_csv_files_quoted_and_joined_with_cat_read_no_byte_order_mark_into_a_field(tmp_path):
    """Parts written with every field quoted and a BOM (pandas' `to_csv(quoting=QUOTE_ALL,
    encoding="utf-8-sig")`), joined with `cat`: the csv module read `\\ufeff"image"` as an
    unquoted field, quotes and all, so the second header became an image '"image"' with the
    caption 'caption', and a second part's first row `"b,c.jpg"` three fields."""
    part = '\ufeff"image","caption"\n"a.jpg","a dog"\n'
    path = write(tmp_path, "c.csv", part + part.replace("a.jpg", "b.jpg"))
    assert as_dict(data.load_captions(path)) == {"a.jpg": ["a dog"], "b.jpg": ["a dog"]}
    path = write(tmp_path, "c.csv", part + '\ufeff"b,c.jpg","a cat"\n')
    assert as_dict(data.load_captions(path)) == {"a.jpg": ["a dog"], "b,c.jpg": ["a cat"]}
    # a line inside a quoted field is no row's start: such a field is refused all the same
    path = write(tmp_path, "c.csv", 'image,caption\na.jpg,"a dog\n\ufeffrunning"\n')
    with pytest.raises(UserError, match=r"c\.csv: line 2: a quoted field runs over several"):
        data.load_captions(path)


def test_csv_row_repeated_is_one_caption(tmp_path):
    """A file joined with an overlap kept each repeated row twice (token files read a repeated
    line once): it weighed double in training and in CIDEr."""
    text = (csv_text() + csv_text()[len("image,caption\n"):]
            + "\ufeffa.jpg,a circle that is red\n")
    path = write(tmp_path, "c.csv", text)
    captions = data.load_captions(path)
    assert as_dict(captions) == EXPECTED
    # said: a CSV cannot tell an overlap from two annotators' identical captions (Kaggle's
    # Flickr8k captions.txt: Flickr8k.token.txt keeps both, and pycocoevalcap scores both)
    n = len(ENTRIES) + 1
    assert len(captions.repeated) == n
    assert captions.repeated_note() == (
        f"{n} rows of {path} repeat an earlier row of the same image and caption (e.g. line "
        f"{len(ENTRIES) + 2}, {ENTRIES[0][0]!r}) and are read once, as rows of a file joined "
        f"with an overlap; captions written alike for one image by two annotators are read "
        f"once too (a CSV does not number them; Flickr8k.token.txt's IMAGE#N keeps both)")
    stats = data.describe(path, DataConfig(), VocabConfig())
    images = ["a.jpg", "b.jpg", "c.jpg"][:data.MAX_EXAMPLES]
    assert stats["repeated_rows"] == {"count": n, "examples": images}
    assert [" ".join(r.split()) for r in data.format_description(stats).splitlines()
            if r.startswith("repeated rows")] == [
        f"repeated rows {n} read once (e.g. {', '.join(map(repr, images))})"]
    # the same caption of another image is another caption
    captions = data.load_captions(write(tmp_path, "c.csv", csv_text() + "c.jpg,dogs play\n"))
    assert as_dict(captions)["c.jpg"] == EXPECTED["c.jpg"] + ["dogs play"]
    assert captions.repeated == [] and captions.repeated_note() is None


def test_token_image_n_with_two_different_captions_is_refused_naming_both_lines(tmp_path):
    """Flickr8k.token.txt joined with Flickr8k.lemma.token.txt kept both captions of every
    IMAGE#N (exit 0); a repeat that differs only in surrounding whitespace was kept twice."""
    path = write(tmp_path, "t.txt", "a.jpg#0\tA dog.\n a.jpg#0\tA dog. \na.jpg#1\t A dog.\n")
    assert as_dict(data.load_captions(path)) == {"a.jpg": ["A dog.", "A dog."]}
    path = write(tmp_path, "t.txt", "a.jpg#0\tA dog runs .\nb.jpg#0\tx\n\ufeffa.jpg#0\tA dog "
                                    "run .\n")
    with pytest.raises(UserError) as e:
        data.load_captions(path)
    assert str(e.value) == (
        f"{path}: line 3: 'a.jpg#0' has another caption here than on line 1 ('A dog run .', "
        f"not 'A dog runs .'): an IMAGE#N is one caption (two files joined, such as "
        f"Flickr8k.token.txt and Flickr8k.lemma.token.txt?); keep one of the lines")


@pytest.mark.parametrize("first,second", [("a.jpg", "./a.jpg"), ("d/a.jpg", "d\\a.jpg"),
                                          ("d/a.jpg", "d//a.jpg")])
def test_token_image_n_spelled_two_ways_is_one_image_n(tmp_path, first, second):
    """The repeat check compared the names as written: `a.jpg#0` and `./a.jpg#0` (two token
    files joined, one written with ./) were two IMAGE#Ns, and the records merged them into
    one image with the caption twice (double weight in training and CIDEr), or both of two
    different captions, which a repeat spelled alike is refused for."""
    path = write(tmp_path, "t.txt", f"{first}#0\tA dog.\n{second}#0\tA dog.\n")
    assert as_dict(data.load_captions(path)) == {"d/a.jpg" if "d" in first else "a.jpg":
                                                 ["A dog."]}
    path = write(tmp_path, "t.txt", f"{first}#0\tA dog.\n{second}#0\tA cat.\n")
    with pytest.raises(UserError, match=rf"line 2: {re.escape(repr(second + '#0'))} has another "
                                        rf"caption here than on line 1 \('A cat\.', not "
                                        rf"'A dog\.'\)"):
        data.load_captions(path)


def test_csv_row_repeated_with_other_whitespace_is_one_caption(tmp_path):
    path = write(tmp_path, "c.csv", "image,caption\na.jpg,a dog\n a.jpg , a dog \n"
                                    "./a.jpg,a dog\n")
    captions = data.load_captions(path)
    assert as_dict(captions) == {"a.jpg": ["a dog"]}
    assert captions.repeated == [(3, "a.jpg"), (4, "a.jpg")]


def test_token_line_without_tab(tmp_path):
    path = write(tmp_path, "t.token", "a.jpg#0\tfine\na.jpg#1 no tab here\n")
    with pytest.raises(UserError, match=r"t\.token: line 2: expected `IMAGE#N<TAB>CAPTION`"):
        data.load_captions(path)


@pytest.mark.parametrize("text", ["just some words\nmore words\n", '["a list"]',
                                  '{"images": [{"name": "a.jpg"}]}'])
def test_unknown_format_lists_supported_formats(tmp_path, text):
    path = write(tmp_path, "what.txt", text)
    with pytest.raises(UserError) as e:
        data.load_captions(path)
    msg = str(e.value)
    assert "what.txt" in msg and "cannot detect" in msg
    for fmt in ("coco", "karpathy", "flickr-token", "flickr-csv"):
        assert fmt in msg


def test_empty_file(tmp_path):
    with pytest.raises(UserError, match=r"e\.txt: file is empty.*flickr-csv"):
        data.detect_format(write(tmp_path, "e.txt", " \n\n"))


def test_a_file_of_byte_order_marks_only_is_empty(tmp_path):
    """Two BOMs and a newline crashed with a StopIteration traceback."""
    for text in ("\ufeff\ufeff\n", "\ufeff\n\ufeff \r\n\ufeff"):
        with pytest.raises(UserError, match=r"b\.txt: file is empty"):
            data.load_captions(write(tmp_path, "b.txt", text))


@pytest.mark.parametrize("fmt", ["auto", "coco", "karpathy"])
def test_json_after_a_second_byte_order_mark_names_it(tmp_path, fmt):
    """JSON saved with a BOM twice was "cannot detect the caption format from line 1
    ('{"images":...')", the BOM hidden."""
    path = write(tmp_path, "c.json", "\ufeff" + coco_text(), bom=True)
    with pytest.raises(UserError) as e:
        data.load_captions(path, fmt)
    assert str(e.value) == (
        f"{path}: a second byte order mark (U+FEFF) is at the start, before its JSON (saved "
        f"with a BOM twice, or joined to another file?); remove it: a JSON file may start "
        f"with one BOM at most")


def test_unknown_format_value(tmp_path):
    with pytest.raises(UserError, match="'yaml'.*coco, karpathy"):
        data.load_captions(write(tmp_path, "t.txt", token_text()), "yaml")


def test_coco_missing_annotations_names_the_key(tmp_path):
    path = write(tmp_path, "c.json", json.dumps({"images": [{"file_name": "a.jpg", "id": 1}]}))
    with pytest.raises(UserError, match=r"c\.json: COCO captions JSON has no `annotations`"):
        data.load_captions(path)


def test_format_override_is_obeyed(tmp_path):
    path = write(tmp_path, "k.json", karpathy_text(karpathy_images()))
    with pytest.raises(UserError, match="no `annotations`"):
        data.load_captions(path, "coco")


@pytest.mark.parametrize("mutate,message", [
    (lambda o: o["annotations"][0].pop("caption"), r"annotations\[0\] has no `caption`"),
    (lambda o: o["annotations"][0].update(caption=5), r"annotations\[0\]\.caption must be a "
                                                      r"string, got int"),
    (lambda o: o["annotations"][1].update(image_id=999), r"annotations\[1\]\.image_id 999 is "
                                                         r"not the `id`"),
    (lambda o: o.update(images={}), r"images must be a list, got dict"),
])
def test_coco_wrong_structure(tmp_path, mutate, message):
    obj = json.loads(coco_text())
    mutate(obj)
    with pytest.raises(UserError, match=r"c\.json: .*" + message):
        data.load_captions(write(tmp_path, "c.json", json.dumps(obj)))


def test_karpathy_imgid_given_to_two_images_is_refused_naming_both(tmp_path):
    # two Flickr8k split files merged by hand both number `imgid` from 0: the results file
    # had one image_id for two images (COCO's evaluation scores them as one)
    images = karpathy_images()
    for i, image in enumerate(images):
        image["imgid"] = i % 2
    with pytest.raises(UserError) as e:
        data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))
    first, third = images[0]["filename"], images[2]["filename"]
    assert str(e.value) == (
        f"{tmp_path / 'k.json'}: images[2] ({third!r}) and images[0] ({first!r}) have the same "
        f"imgid 0; the results file would give both images one id (files merged by hand?): "
        f"give every image its own `imgid`")
    for i, image in enumerate(images):      # cocoid decides when given (COCO's Karpathy file)
        image["cocoid"] = 100 + i
    assert [r.image_id for r in data.load_captions(
        write(tmp_path, "k.json", karpathy_text(images))).records] == \
        [100 + i for i in range(len(images))]
    images.append(dict(images[0]))                  # one image twice, exactly: read once
    assert len(data.load_captions(write(tmp_path, "k.json", karpathy_text(images))).records) \
        == len(images) - 1


def test_karpathy_entry_listed_twice_exactly_is_read_once(tmp_path):
    """Files joined with an overlap repeat whole entries: each caption was read twice, weighing
    double in training and in CIDEr (COCO's parser reads such a repeat once)."""
    images = karpathy_images()
    for i, image in enumerate(images):
        image["cocoid"] = 100 + i
    images += [dict(images[0]), dict(images[2])]
    captions = data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))
    assert as_dict(captions) == EXPECTED
    # without an id too: the same entry twice is one
    images = karpathy_images()
    images.append(dict(images[1]))
    assert as_dict(data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))) \
        == EXPECTED


@pytest.mark.parametrize("field", ["cocoid", "imgid"])
def test_karpathy_one_file_under_two_ids_is_refused_naming_both(tmp_path, field):
    """Its captions were merged into one record under the first id, silently (COCO's parser
    refuses one file under two ids)."""
    images = karpathy_images()
    for i, image in enumerate(images):
        image[field] = 100 + i
    images.append({"filename": "./a.jpg", "split": "train", field: 7,
                   "sentences": [{"raw": "a blue square"}]})
    with pytest.raises(UserError) as e:
        data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))
    assert str(e.value) == (
        f"{tmp_path / 'k.json'}: images[3] ({field} 7) and images[0] ({field} 100) are both "
        f"the file 'a.jpg'; list every image once, with one `{field}`")


@pytest.mark.parametrize("value, kind", [([1], "list"), ({"id": 1}, "dict"), (True, "bool")])
def test_karpathy_id_that_is_not_an_integer_or_string_is_refused(tmp_path, value, kind):
    # an unhashable imgid crashed the duplicate-id check with `TypeError: unhashable type`
    images = karpathy_images()
    images[1]["imgid"] = value
    with pytest.raises(UserError, match=rf"^.*k\.json: images\[1\]\.imgid must be an "
                                        rf"integer or a string, got {kind}$"):
        data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))
    images[1]["imgid"], images[1]["cocoid"] = 7, None     # a null cocoid: imgid decides
    records = data.load_captions(write(tmp_path, "k.json", karpathy_text(images))).records
    assert records[1].image_id == 7


def test_karpathy_sentence_without_raw(tmp_path):
    images = karpathy_images()
    images[2]["sentences"] = [{"tokens": ["x"]}]
    with pytest.raises(UserError, match=r"images\[2\]\.sentences\[0\] has no `raw`"):
        data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))


def test_non_utf8_names_the_byte_position(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("a.jpg#0\tok\nb.jpg#0\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt: not valid UTF-8 at byte 22 \(line 2\)"):
        data.load_captions(str(path))


@pytest.mark.parametrize("end", ["\r", "\r\n"])
def test_non_utf8_line_counts_every_line_end_the_parser_reads(tmp_path, end):
    """Caption files are read with universal newlines (a bare CR ends a line): the line
    number of a bad byte counted LF only, so a Mac-style file said line 1 for line 3."""
    path = tmp_path / "latin1.txt"
    path.write_bytes(f"a.jpg#0\tok{end}b.jpg#0\tok{end}c.jpg#0\tcaf\xe9{end}"
                     .encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.txt: not valid UTF-8 at byte \d+ \(line 3\)"):
        data.load_captions(str(path))


@pytest.mark.parametrize("encoding, bom", [("utf-16", "ff fe"), ("utf-16-be", "fe ff"),
                                           ("utf-32", "ff fe 00 00")])
def test_utf16_and_utf32_files_are_named_as_such_with_the_fix(tmp_path, encoding, bom):
    # Windows' "Unicode" is UTF-16 with a BOM: it was only "not valid UTF-8 at byte 0".
    path = tmp_path / "captions.csv"
    text = "image,caption\na.jpg,a red circle\n"
    path.write_bytes(text.encode(encoding) if encoding != "utf-16-be"
                     else b"\xfe\xff" + text.encode(encoding))
    with pytest.raises(UserError) as e:
        data.load_captions(str(path))
    name = encoding[:6].upper()
    assert str(e.value).startswith(f"{path}: {name}")
    assert f"byte order mark {bom}), not UTF-8; save it as UTF-8, e.g. `iconv -f {name} " \
        f"-t UTF-8 {path} > NEW_FILE`" in str(e.value)


def test_utf16_without_a_bom_is_refused_not_read_as_names_full_of_nul(tmp_path):
    # UTF-16 of ASCII text is valid UTF-8 (a NUL after every letter): it was read as such
    path = tmp_path / "captions.txt"
    path.write_bytes("a.jpg#0\ta red circle\n".encode("utf-16-le"))
    with pytest.raises(UserError, match=r"captions\.txt: holds NUL bytes \(the first at byte "
                                        r"1\): UTF-16 or UTF-32 text without a byte order mark"):
        data.load_captions(str(path))


def test_empty_captions_are_skipped_and_counted(tmp_path):
    # (a.jpg's "" and "  " would be one caption repeated: whitespace around it aside)
    text = "image,caption\na.jpg,one\na.jpg,\nc.jpg,\"  \"\nb.jpg,\t\nc.jpg,two\n"
    captions = data.load_captions(write(tmp_path, "c.csv", text))
    assert as_dict(captions) == {"a.jpg": ["one"], "c.jpg": ["two"]}
    assert captions.skipped_empty == 3



def test_images_left_without_a_usable_caption_are_named(tmp_path):
    """An image whose captions were all empty vanished without a word (only the captions were
    counted); one with a usable caption elsewhere in the file is kept."""
    text = "a.jpg#0\t...\nb.jpg#0\t-\nb.jpg#1\t \na.jpg#1\tone dog\nc.jpg#0\tcafé.\n"
    path = write(tmp_path, "t.txt", text)
    captions = data.load_captions(path)
    assert as_dict(captions) == {"a.jpg": ["one dog"], "c.jpg": ["café."]}
    assert captions.uncaptioned == ["b.jpg"]
    assert captions.empty_note() == (
        f"3 caption(s) in {path} are skipped as empty (no word once punctuation is removed); "
        f"1 image(s) have no usable caption and are left out (e.g. 'b.jpg')")
    images = karpathy_images()
    images[1]["sentences"] = []
    images.append({"filename": "d.jpg", "split": "train", "sentences": [{"raw": "?"}]})
    captions = data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))
    assert captions.uncaptioned == ["b.jpg", "d.jpg"] and captions.skipped_empty == 1
    assert data.load_captions(write(tmp_path, "c.csv", csv_text())).empty_note() is None


def test_images_whose_captions_all_lack_a_word_are_kept_for_scoring(tmp_path):
    # pycocoevalcap scores such an image (against "" once tokenized); evaluate needs its
    # captions, id and ground truth, which were dropped with the image
    text = "a.jpg#0\tone dog\nb.jpg#0\t-\nb.jpg#1\t!!\nc.jpg#0\t \nd.jpg#0\t.\nd.jpg#1\ta cat\n"
    captions = data.load_captions(write(tmp_path, "t.txt", text))
    assert captions.uncaptioned == ["b.jpg", "c.jpg"]
    assert [(r.image, r.captions, r.wordless, r.image_id) for r in captions.wordless_only] == [
        ("b.jpg", [], ["-", "!!"], 2), ("c.jpg", [], [" "], 3)]  # after a.jpg 0, d.jpg 1
    assert [r.image_id for r in captions.records] == [0, 1]


def test_captions_without_a_word_are_skipped_and_counted_as_empty(tmp_path):
    """A caption of only punctuation or symbols ("...", "-", "!!") has no word once
    standardised: trained on, it taught the model to end at once, and it was not counted."""
    text = "a.jpg#0\tone dog\na.jpg#1\t...\nb.jpg#0\t - !!\nc.jpg#0\tcafé.\n"
    captions = data.load_captions(write(tmp_path, "t.txt", text))
    assert as_dict(captions) == {"a.jpg": ["one dog"], "c.jpg": ["café."]}
    assert captions.skipped_empty == 2


def test_a_byte_order_mark_inside_a_joined_file_is_not_part_of_the_image_name(tmp_path):
    """Two token files joined with `cat` (each with a BOM): the second one's first image was
    '\\ufeffc.jpg', never found."""
    text = "a.jpg#0\tA dog\r\n\ufeffc.jpg#0\tA bird\r\n"
    captions = data.load_captions(write(tmp_path, "t.txt", text, bom=True))
    assert as_dict(captions) == {"a.jpg": ["A dog"], "c.jpg": ["A bird"]}


def test_a_token_file_joined_with_itself_reads_its_first_line_once_despite_its_bom(tmp_path):
    """The exact-repeat check saw the second copy's first line as '\ufeffa.jpg#0' and kept
    its caption twice (the BOM was only stripped later, from the image name)."""
    one = "a.jpg#0\tA dog\na.jpg#1\tA cat\n"
    captions = data.load_captions(write(tmp_path, "t.txt", one + "\ufeff" + one, bom=True))
    assert as_dict(captions) == {"a.jpg": ["A dog", "A cat"]}


def test_captions_of_only_emoji_are_skipped_and_counted_as_empty(tmp_path):
    """An emoji's variation selector or joiner was left as an invisible one-word caption."""
    text = "a.jpg#0\tone dog\na.jpg#1\t\u2764\ufe0f\nb.jpg#0\t\U0001f468\u200d\U0001f469\n"
    captions = data.load_captions(write(tmp_path, "t.txt", text))
    assert as_dict(captions) == {"a.jpg": ["one dog"]}
    assert captions.skipped_empty == 2

UNSAFE = ["/etc/passwd", "C:\\x.jpg", "c:x.jpg", "\\\\server\\share\\x.jpg", "\\x.jpg",
          "../x.jpg", "a/../../x.jpg", "..\\x.jpg", "a/..", ""]


@pytest.mark.parametrize("raw", UNSAFE)
def test_safe_image_key_refuses(raw):
    assert data.safe_image_key(raw) is None


@pytest.mark.parametrize("raw,key", [("a.jpg", "a.jpg"), ("dir\\b.jpg", "dir/b.jpg"),
                                     ("./d/./e/../f.jpg", "d/f.jpg"), (" x y.jpg ", "x y.jpg"),
                                     ("a/../b.jpg", "b.jpg")])
def test_safe_image_key_normalises(raw, key):
    assert data.safe_image_key(raw) == key


def test_image_key_problem_accepts_only_safe_keys():
    """A usable key is exactly what safe_image_key returns; anything else gets a reason."""
    for key in ["a.jpg", "sub/deeper/d.jpg", "x y.jpg"]:
        assert data.image_key_problem(key) is None
    for raw in UNSAFE:
        assert "inside the images folder" in data.image_key_problem(raw)
    for key in ["dir\\b.jpg", "./a.jpg", "a//b.jpg", "a/../b.jpg", " a.jpg"]:
        assert "normalised" in data.image_key_problem(key)


def test_unsafe_paths_refused_counted_and_never_touched(tmp_path, monkeypatch):
    bad = ["/etc/passwd", "C:\\x.jpg", "\\\\server\\x.jpg", "../x.jpg", "a/../../x.jpg",
           "../y.jpg"]
    entries = [("ok.jpg", "fine")] + [(b, "evil") for b in bad] + [("../x.jpg", "again")]
    path = write(tmp_path, "c.csv", csv_text(entries))
    images = tmp_path / "images"
    images.mkdir()
    touched = []
    real_isfile = os.path.isfile
    monkeypatch.setattr(os.path, "isfile", lambda p: touched.append(p) or real_isfile(p))
    stats = data.describe(path, DataConfig(), VocabConfig(), images_dir=str(images))
    assert stats["images"] == 1 and stats["captions"] == 1
    assert stats["refused_paths"] == {"count": 6, "examples": bad[:5]}  # distinct paths
    assert touched == [os.path.join(str(images), "ok.jpg")]


def test_refused_paths_are_named_by_train_and_extracted_as_failures(tmp_path):
    """`train` and `extract-features --captions` dropped the captions of absolute and `..`
    paths without a word (only `inspect` counted them): train now says so in a note, and
    extract-features is given them, to list each in failed.tsv as a bad image path."""
    from caption_attn import extract
    bad = ["/data/pics/a.jpg", "../b.jpg", "/data/pics/c.jpg"]
    path = write(tmp_path, "c.csv", csv_text([("ok.jpg", "fine")] + [(b, "x") for b in bad]))
    captions = data.load_captions(path)
    assert captions.refused_note() == (
        f"3 image path(s) in {path} are refused (absolute or outside the images folder) (e.g. "
        f"'/data/pics/a.jpg', '../b.jpg', '/data/pics/c.jpg'): their captions are left out; "
        f"write them relative to the images folder")
    keys = captions.keys_to_extract()
    assert keys == ["ok.jpg", *bad]
    mine, failed = extract._shard_keys(str(tmp_path), ExtractConfig(
        cache=str(tmp_path / "cache"), weights="random"), keys)
    assert mine == ["ok.jpg"] and set(failed) == set(bad)
    assert all(r.startswith("bad image path") for r in failed.values())
    clean = write(tmp_path, "d.csv", csv_text([("ok.jpg", "fine")]))
    assert data.load_captions(clean).refused_note() is None


def test_empty_image_names_are_called_empty_not_absolute_or_outside(tmp_path):
    obj = json.loads(coco_text())
    obj["images"][0]["file_name"] = " "
    captions = data.load_captions(write(tmp_path, "c.json", json.dumps(obj)))
    assert captions.refused_note() == (
        f"1 image path(s) in {tmp_path / 'c.json'} are refused (empty) (e.g. ' '): their "
        f"captions are left out; give every image its file name")
    obj["images"][1]["file_name"] = "/abs.jpg"
    captions = data.load_captions(write(tmp_path, "c.json", json.dumps(obj)))
    assert captions.refused_note().startswith(
        f"2 image path(s) in {tmp_path / 'c.json'} are refused (empty, absolute or outside the "
        f"images folder) (e.g. ' ', '/abs.jpg'): their captions are left out; give every "
        f"image its file name, relative to the images folder")


def test_coco_images_without_any_annotation_say_so(tmp_path):
    obj = json.loads(coco_text())
    obj["annotations"] = []
    path = write(tmp_path, "c.json", json.dumps(obj))
    with pytest.raises(UserError) as e:
        data.load_captions(path)
    assert str(e.value) == (f"no usable captions in {path} (0 empty captions, 0 refused image "
                            f"paths, 3 images without annotations)")


def test_karpathy_images_that_are_an_object_must_be_a_list(tmp_path):
    path = write(tmp_path, "k.json", json.dumps({"dataset": "coco", "images": {"a": 1}}))
    with pytest.raises(UserError) as e:
        data.load_captions(path)
    assert str(e.value) == f"{path}: Karpathy split JSON.images must be a list, got dict"


def test_extract_features_is_given_the_refused_paths(tmp_path, monkeypatch, capsys):
    """`extract-features --captions` hands them to extraction (which lists each in
    failed.tsv, as the test above shows); it left them out of its keys."""
    from caption_attn import cli, extract
    path = write(tmp_path, "c.csv", csv_text([("ok.jpg", "fine"), ("/abs/x.jpg", "x")]))
    given = []

    def extract_features(images, cfg, keys=None, **kwargs):
        given.append(keys)
        raise UserError("stopped here")
    monkeypatch.setattr(extract, "extract_features", extract_features)
    assert cli.main(["extract-features", "--captions", path, "--images", str(tmp_path),
                     "--cache", str(tmp_path / "cache"), "--weights", "random"]) == 2
    assert given == [["ok.jpg", "/abs/x.jpg"]] and "stopped here" in capsys.readouterr().err


def test_no_usable_captions(tmp_path):
    path = write(tmp_path, "bad.csv", csv_text([("/abs.jpg", "x"), ("ok.jpg", "  ")]))
    with pytest.raises(UserError, match=r"no usable captions in .*bad\.csv"):
        data.load_captions(path)


# --------------------------------------------------------------------------- describe
def describe_fixture(tmp_path):
    images = [
        {"filename": "a.jpg", "split": "train",
         "sentences": [{"raw": "A red circle."}, {"raw": "red circle"}, {"raw": " "}]},
        {"filename": "b.jpg", "split": "restval",
         "sentences": [{"raw": "a blue square on a red floor"}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "zebra"}]},
        {"filename": "d.jpg", "split": "test", "sentences": [{"raw": "giraffe giraffe"}]},
        {"filename": "../e.jpg", "split": "test", "sentences": [{"raw": "hidden"}]},
        {"filename": "f.jpg", "split": "test", "sentences": []},
    ]
    path = write(tmp_path, "k.json", karpathy_text(images))
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "c.jpg"):
        (folder / name).write_bytes(b"x")
    return path, str(folder)


def test_describe_numbers(tmp_path):
    path, folder = describe_fixture(tmp_path)
    stats = data.describe(path, DataConfig(), VocabConfig(), images_dir=folder)
    assert stats["format"] == "karpathy" and stats["file"] == path
    assert stats["images"] == 4 and stats["captions"] == 5
    assert stats["splits"] == {"train": 2, "val": 1, "test": 1}
    assert stats["split_source"] == "file"
    assert stats["skipped_empty_captions"] == 1
    assert stats["uncaptioned_images"] == {"count": 1, "examples": ["f.jpg"]}
    assert stats["refused_paths"] == {"count": 1, "examples": ["../e.jpg"]}
    assert stats["missing_images"] == {"count": 2, "examples": ["b.jpg", "d.jpg"]}
    # train words: a red circle blue square on floor -> 7 + 4 special tokens; no zebra/giraffe
    assert stats["vocab_size"] == 11
    # lengths 3, 2, 7, 1, 2 -> sorted 1 2 2 3 7
    assert stats["caption_length"] == {"mean": 3.0, "p50": 2, "p95": 7, "max": 7}
    json.dumps(stats)  # JSON-able


def test_describe_vocab_config_and_no_images_dir(tmp_path):
    path, _ = describe_fixture(tmp_path)
    stats = data.describe(path, DataConfig(), VocabConfig(vocab_size=2, min_count=2))
    assert stats["vocab_size"] == 4 + 2  # red (3), a (3), circle (2) -> top 2
    assert stats["missing_images"] is None


def test_describe_missing_images_dir(tmp_path):
    path, _ = describe_fixture(tmp_path)
    with pytest.raises(UserError, match=r"nowhere: images folder not found"):
        data.describe(path, DataConfig(), VocabConfig(), images_dir=str(tmp_path / "nowhere"))


def test_format_description(tmp_path):
    path, folder = describe_fixture(tmp_path)
    text = data.format_description(data.describe(path, DataConfig(), VocabConfig(), folder))
    lines = text.splitlines()
    assert lines[0].split() == ["file", path]
    assert "format          karpathy" in text
    assert "train 2, val 1, test 1 images" in text
    assert "2 (e.g. 'b.jpg', 'd.jpg')" in text
    assert "no caption      1 image left out (e.g. 'f.jpg')" in text
    assert "11 tokens (train split, incl. 4 special tokens)" in text
    assert "mean 3.0, p50 2, p95 7, max 7 words" in text
    width = len("caption length")  # the longest label
    assert all(line[width:width + 2] == "  " and line[width + 2] != " " for line in lines)


def test_read_json_names_the_file_for_every_failure(tmp_path):
    from caption_attn.fileio import read_json
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": 1,\n "b": }')
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"caf\xe9": 1}')
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes('{"a": 1}'.encode("utf-16"))
    for path, expected in ((bad, "malformed JSON at line 2"), (latin, "not valid UTF-8"),
                           (utf16, "UTF-16LE text (it starts with the byte order mark ff fe)"),
                           (tmp_path / "none.json", "file not found")):
        with pytest.raises(UserError) as e:
            read_json(str(path))
        assert str(path) in str(e.value) and expected in str(e.value)
    good = tmp_path / "bom.json"
    good.write_bytes('\ufeff{"a": [1]}'.encode("utf-8"))
    assert read_json(str(good)) == {"a": [1]}


# --------------------------------------------------------------------------- fingerprint
def _records(**captions):
    return [data.ImageRecord(k + ".jpg", c, split) for k, (split, c) in captions.items()]


def test_caption_fingerprint_counts_what_changed():
    before = _records(a=("train", ["a cat"]), b=("train", ["a dog"]), c=("val", ["a cow"]),
                      d=("test", ["a hen"]))
    splits = {s: sorted(r.image for r in before if r.split == s) for s in data.SPLITS}
    recorded = data.caption_fingerprint(before, splits)
    # the same records, parsed again in another order: the same data
    assert data.caption_changes(recorded, splits, list(reversed(before))) is None
    after = _records(a=("train", ["a cat"]), b=("train", ["a mat"]), c=("test", ["a cow"]),
                     e=("train", ["a pig"]))
    changes = data.caption_changes(recorded, splits, after)
    assert changes == ("1 of 4 images has other captions (e.g. 'b.jpg'), 1 image is in "
                       "another split (e.g. 'c.jpg'), 1 image added (e.g. 'e.jpg'), "
                       "1 image removed (e.g. 'd.jpg')")
    # one split only (evaluate's references): other captions or missing images there
    assert data.caption_changes(recorded, splits, after, only="val") is None
    assert data.caption_changes(recorded, splits, after, only="train") == \
        "1 of 2 images has other captions (e.g. 'b.jpg')"
    # another caption order is another epoch order: not the same data
    swapped = _records(a=("train", ["a cat", "x"]), b=("train", ["a dog"]),
                       c=("val", ["a cow"]), d=("test", ["a hen"]))
    recorded = data.caption_fingerprint(swapped, splits)
    swapped[0].captions.reverse()
    assert "the same captions in another order in 1 of 4 images" in data.caption_changes(
        recorded, splits, swapped)


def test_the_same_captions_in_another_order_are_called_so():
    """A file with its lines in another order was reported as "N of N images have other
    captions" by train's resume check and by evaluate's note on the references."""
    def records(reordered=(), changed=()):
        out = _records(a=("train", ["a cat", "x cat"]), b=("train", ["a dog", "y dog"]),
                       c=("val", ["a cow", "z cow"]), d=("test", ["a hen", "w hen"]))
        for r in out:
            r.captions = (r.captions[::-1] if r.image[0] in reordered else
                          ["a mat"] if r.image[0] in changed else r.captions)
        return out
    before = records()
    splits = {s: sorted(r.image for r in before if r.split == s) for s in data.SPLITS}
    recorded = data.caption_fingerprint(before, splits)
    after = records(reordered="ac")
    # train: still refused (the order decides the batches a resume replays), called so
    assert data.caption_changes(recorded, splits, after) == (
        "the same captions in another order in 2 of 4 images (e.g. 'a.jpg'), which changes "
        "the batches a resume replays")
    # evaluate: references are a set: nothing to note
    for split in data.SPLITS:
        assert data.caption_changes(recorded, splits, after, only=split) is None
    # a real change is still one
    changes = data.caption_changes(recorded, splits, records(reordered="a", changed="b"))
    assert "other captions" in changes and "another order" not in changes
    assert data.caption_changes(recorded, splits, records(changed="c"), only="val") == \
        "1 of 1 images has other captions (e.g. 'c.jpg')"


def test_evaluate_compares_each_image_s_references_as_a_set():
    """One test image's captions reordered and a train caption edited (so the data differ
    in any order too): evaluate noted "1 of 1 images has other captions" for the test image,
    whose references are the same set, as it compared each image's captions in order."""
    def records(reordered=(), changed=()):
        out = _records(a=("train", ["a cat", "x cat"]), b=("train", ["a dog", "y dog"]),
                       c=("val", ["a cow", "z cow"]), d=("test", ["a hen", "w hen"]))
        for r in out:
            r.captions = (r.captions[::-1] if r.image[0] in reordered else
                          [r.captions[0], "a mat"] if r.image[0] in changed else r.captions)
        return out
    before = records()
    splits = {s: sorted(r.image for r in before if r.split == s) for s in data.SPLITS}
    recorded = data.caption_fingerprint(before, splits)
    after = records(reordered="d", changed="a")
    assert data.caption_changes(recorded, splits, after, only="test") is None
    assert data.caption_changes(recorded, splits, after, only="train") == \
        "1 of 2 images has other captions (e.g. 'a.jpg')"
    # an edited caption of the scored split is still one, reordered or not
    assert data.caption_changes(recorded, splits, records(reordered="a", changed="ad"),
                                only="test") == "1 of 1 images has other captions (e.g. 'd.jpg')"
    # a run recorded before the order-free digests (split.json without them): compared in
    # order as before, its notes neither lost nor new
    old = {k: v for k, v in recorded.items() if k != "unordered_digests"}
    assert data.caption_changes(old, splits, after, only="test") == \
        "1 of 1 images has other captions (e.g. 'd.jpg')"
    assert data.caption_changes(old, splits, records(reordered="ad"), only="test") is None
    assert data.caption_changes(old, splits, records(changed="d"), only="test") == \
        "1 of 1 images has other captions (e.g. 'd.jpg')"
    assert data.caption_changes(old, splits, records(changed="a"), only="test") is None
    # train's resume check still tells another order from the same data
    assert "another order" not in data.caption_changes(recorded, splits, after)
    assert data.caption_changes(recorded, splits, records(reordered="d")) == (
        "the same captions in another order in 1 of 4 images (e.g. 'd.jpg'), which changes "
        "the batches a resume replays")


def test_the_fingerprint_records_the_ground_truth_objects_apart_from_the_captions():
    """`evaluate` scored against other `objects` than the run had without a word: the run
    did not record them. They are recorded apart: training does not read them, so they
    change neither `sha256` (a resume's check) nor `caption_changes`."""
    box = {"color": "red", "shape": "circle", "size": "small", "bbox": [1, 2, 3, 4]}

    def records(color="red", size=(80, 80), d_objects=None):
        out = _records(a=("train", ["a cat"]), b=("test", ["a dog"]), c=("test", ["a cow"]),
                       d=("test", ["a hen"]))
        for r in out[:3]:
            r.objects, r.size = [dict(box)], (80, 80)
        out[1].objects[0]["color"], out[1].size, out[3].objects = color, size, d_objects
        return out
    before = records()
    splits = {s: sorted(r.image for r in before if r.split == s) for s in data.SPLITS}
    recorded = data.caption_fingerprint(before, splits)
    assert data.objects_recorded(recorded)
    assert data.objects_changes(recorded, splits, records(), "test") is None
    for after in (records(color="blue"), records(size=(160, 80))):
        assert data.caption_fingerprint(after, splits)["sha256"] == recorded["sha256"]
        assert data.caption_changes(recorded, splits, after) is None
        assert data.objects_changes(recorded, splits, after, "test") == \
            "1 of 3 images has other objects (e.g. 'b.jpg')"
        assert data.objects_changes(recorded, splits, after, "train") is None
    # objects where there were none, and none where there were
    after = records(d_objects=[box])
    after[2].objects = None
    assert data.objects_changes(recorded, splits, after, "test") == \
        "2 of 3 images have other objects (e.g. 'c.jpg')"
    # a dataset without objects records none; one recorded before they were is no change
    plain = _records(a=("train", ["a cat"]), b=("test", ["a dog"]))
    assert data.caption_fingerprint(plain, splits)["objects"] == {}
    old = {k: v for k, v in recorded.items() if k != "objects"}
    assert not data.objects_recorded(old) and not data.objects_recorded(None)
    assert data.objects_changes(old, splits, records(color="blue"), "test") is None


@pytest.mark.parametrize("height", [1e999, float("nan"), -5, "299", True])
def test_an_image_size_that_is_no_finite_positive_number_is_not_used(tmp_path, height):
    """Karpathy's `height: Infinity` (or 1e999) was taken as the image's size, and grounding
    mapped every box into the first cell of the 8x8 grid."""
    images = karpathy_images()
    for image in images:
        image.update(height=299, width=299)
    images[0]["height"] = height
    captions = data.load_captions(write(tmp_path, "k.json", karpathy_text(images)))
    sizes = {r.image: r.size for r in captions.records}
    assert sizes[images[0]["filename"]] is None
    assert all(sizes[i["filename"]] == (299, 299) for i in images[1:])
