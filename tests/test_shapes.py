"""Tests of the built-in synthetic shapes dataset (caption_attn/shapes.py)."""

import collections
import json
import os
import re
import shutil

import cv2
import numpy as np
import pytest

from caption_attn import shapes
from caption_attn.config import ShapesConfig
from caption_attn.data import split_images
from caption_attn.errors import UserError
from caption_attn.vocab import tokenize

NUM_IMAGES = 40
SIZE = 299
MIN_GAP = 0.05  # required gap between objects, fraction of the side (the spec, not shapes.GAP)
WORDS_ONLY = re.compile(r"[a-z]+( [a-z]+)*")


def _make(out, **overrides):
    cfg = ShapesConfig(**{"num_images": NUM_IMAGES, "image_size": SIZE, **overrides})
    return shapes.make_shapes(str(out), cfg)


def _files(root) -> dict:
    """Relative path -> bytes of every file under `root`."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(summary, parsed captions.json, {filename: BGR image}) of one small dataset."""
    summary = _make(tmp_path_factory.mktemp("shapes"))
    with open(summary["captions"], encoding="utf-8") as f:
        data = json.load(f)
    images = {r["filename"]: cv2.imread(os.path.join(summary["images_dir"], r["filename"]))
              for r in data["images"]}
    return summary, data, images


def _object_pixels(image, obj) -> np.ndarray:
    """Boolean mask (h, w) of the bbox pixels that have the object's color."""
    x, y, w, h = obj["bbox"]
    return np.all(image[y:y + h, x:x + w] == shapes.COLORS[obj["color"]], axis=-1)


# --------------------------------------------------------------------------- files
def test_summary_and_layout(dataset):
    summary, data, images = dataset
    assert summary["images"] == NUM_IMAGES
    assert summary["seconds"] > 0
    assert os.path.basename(summary["captions"]) == "captions.json"
    assert data["dataset"] == "shapes"
    names = [r["filename"] for r in data["images"]]
    assert names == [f"shape_{i:05d}.png" for i in range(NUM_IMAGES)]
    assert sorted(os.listdir(summary["images_dir"])) == names  # no temporary files left
    for i, record in enumerate(data["images"]):
        assert record["imgid"] == i
        assert "filepath" not in record
        assert list(record) == ["filename", "imgid", "split", "width", "height", "sentences",
                                "objects", "relation"]
        assert record["width"] == record["height"] == SIZE
        assert images[record["filename"]].shape == (SIZE, SIZE, 3)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    _make(tmp_path / "a", seed=3)
    _make(tmp_path / "b", seed=3)
    _make(tmp_path / "c", seed=4)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == NUM_IMAGES + 1
    assert a == b
    assert a.keys() == c.keys()
    assert a["captions.json"] != c["captions.json"]
    assert sum(a[k] != c[k] for k in a) > NUM_IMAGES // 2


def test_rerun_overwrites_and_crash_leaves_no_stale_json(tmp_path, monkeypatch):
    first = _make(tmp_path, seed=1)
    assert os.path.exists(first["captions"])

    def broken(path, image):
        raise OSError("disk full")

    monkeypatch.setattr(shapes, "_write_png", broken)
    with pytest.raises(OSError):
        _make(tmp_path, seed=2, replace=True)
    assert not os.path.exists(first["captions"])  # the old JSON would describe new images


@pytest.mark.parametrize("field, value", [("num_images", 0), ("image_size", 32),
                                          ("image_size", 100_000),  # was a MemoryError
                                          ("num_images", 1_000_000_000),  # was OOM-killed
                                          ("num_images", 200_001),
                                          ("seed", -1), ("val_fraction", 1.0),
                                          ("test_fraction", -0.1)])
def test_invalid_config_names_field_and_value(tmp_path, field, value):
    with pytest.raises(UserError, match=rf"`{field}`.*{re.escape(repr(value))}"):
        _make(tmp_path, **{field: value})
    assert not os.path.exists(tmp_path / "images")


def test_fractions_summing_to_one_are_rejected(tmp_path):
    with pytest.raises(UserError, match=r"`val_fraction` \+ `test_fraction`"):
        _make(tmp_path, val_fraction=0.5, test_fraction=0.5)


def test_smallest_image_size_renders(tmp_path):
    summary = _make(tmp_path, image_size=shapes.MIN_IMAGE_SIZE, num_images=20)
    image = cv2.imread(os.path.join(summary["images_dir"], "shape_00000.png"))
    assert image.shape == (shapes.MIN_IMAGE_SIZE, shapes.MIN_IMAGE_SIZE, 3)


# --------------------------------------------------------------------------- ground truth
def test_objects_and_boxes(dataset):
    _, data, _ = dataset
    counts = collections.Counter(len(r["objects"]) for r in data["images"])
    assert set(counts) == {1, 2, 3}
    gap = MIN_GAP * SIZE
    for record in data["images"]:
        objects = record["objects"]
        for obj in objects:
            assert list(obj) == ["color", "shape", "size", "bbox"]
            assert obj["color"] in shapes.COLORS and obj["shape"] in shapes.SHAPES
            assert obj["size"] in shapes.SIZES
            x, y, w, h = obj["bbox"]
            assert all(isinstance(v, int) for v in obj["bbox"])
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
        keys = [(o["color"], o["shape"]) for o in objects]
        assert len(set(keys)) == len(keys)
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                (ax, ay, aw, ah), (bx, by, bw, bh) = a["bbox"], b["bbox"]
                apart_x = max(ax - (bx + bw), bx - (ax + aw))
                apart_y = max(ay - (by + bh), by - (ay + ah))
                assert max(apart_x, apart_y) >= gap


def test_pixels_match_objects(dataset):
    _, data, images = dataset
    background = np.array(shapes.BACKGROUND, np.uint8)
    for record in data["images"]:
        image = images[record["filename"]]
        outside = np.ones(image.shape[:2], bool)
        for obj in record["objects"]:
            x, y, w, h = obj["bbox"]
            mask = _object_pixels(image, obj)
            assert mask.mean() >= 0.45  # a triangle fills half of its box
            assert mask[h // 2, w // 2]  # the box center is on the object
            # tight: the object touches all four sides of its box
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
            box = image[y:y + h, x:x + w]
            assert np.all(box[~mask] == background)  # no other color inside the box
            outside[y:y + h, x:x + w] = False
        assert np.all(image[outside] == background)


def test_large_objects_are_larger(dataset):
    _, data, images = dataset
    areas = collections.defaultdict(list)
    for record in data["images"]:
        for obj in record["objects"]:
            pixels = _object_pixels(images[record["filename"]], obj).sum()
            areas[obj["size"], obj["shape"]].append(pixels)
            areas[obj["size"]].append(pixels)
    assert min(areas["large"]) > max(areas["small"])
    for shape in shapes.SHAPES:
        assert min(areas["large", shape]) > 2.5 * max(areas["small", shape])
    # visible in the 8x8 feature grid: even a small triangle covers ~half of a 37 px cell
    assert min(areas["small"]) >= 0.45 * (SIZE / 8) ** 2


def test_relations_match_box_centers(dataset):
    _, data, _ = dataset
    seen = set()
    for record in data["images"]:
        if len(record["objects"]) != 2:
            assert record["relation"] is None
            continue
        relation = record["relation"]
        seen.add(relation)
        (ax, ay, aw, ah), (bx, by, bw, bh) = (o["bbox"] for o in record["objects"])
        dx, dy = (ax + aw / 2) - (bx + bw / 2), (ay + ah / 2) - (by + bh / 2)
        expected = {"left of": dx < 0 and -dx >= 1.5 * abs(dy),
                    "right of": dx > 0 and dx >= 1.5 * abs(dy),
                    "above": dy < 0 and -dy >= 1.5 * abs(dx),
                    "below": dy > 0 and dy >= 1.5 * abs(dx)}
        assert expected[relation], (record["filename"], relation, dx, dy)
    assert seen <= set(shapes.RELATIONS) and len(seen) >= 3


def test_two_objects_large_or_reading_order_first_in_every_caption(dataset):
    _, data, _ = dataset
    pairs = [r for r in data["images"] if len(r["objects"]) == 2]
    assert pairs
    for record in pairs:
        first, second = record["objects"]
        if first["size"] == second["size"]:
            axis = 1 if record["relation"] in ("above", "below") else 0
            assert first["bbox"][axis] < second["bbox"][axis]
        else:
            assert first["size"] == "large"
        expected = [(o["color"], o["shape"]) for o in record["objects"]]
        for sentence in record["sentences"]:
            assert shapes.parse_objects(sentence["raw"]) == expected


def test_three_objects_listed_left_to_right(dataset):
    _, data, _ = dataset
    triples = [r for r in data["images"] if len(r["objects"]) == 3]
    assert triples
    for record in triples:
        xs = [o["bbox"][0] + o["bbox"][2] / 2 for o in record["objects"]]
        assert all(x1 - x0 >= shapes.ORDER_GAP * SIZE for x0, x1 in zip(xs, xs[1:]))


# --------------------------------------------------------------------------- captions
def test_five_distinct_clean_captions(dataset):
    _, data, _ = dataset
    words = set(shapes.caption_words())
    for record in data["images"]:
        raws = [s["raw"] for s in record["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5
        for sentence in record["sentences"]:
            assert WORDS_ONLY.fullmatch(sentence["raw"])
            assert sentence["tokens"] == tokenize(sentence["raw"])
            assert set(sentence["tokens"]) <= words


def test_captions_parse_back_to_objects(dataset):
    _, data, _ = dataset
    for record in data["images"]:
        truth = collections.Counter((o["color"], o["shape"]) for o in record["objects"])
        for sentence in record["sentences"]:
            assert collections.Counter(shapes.parse_objects(sentence["raw"])) == truth


def test_caption_relation_words_agree_with_boxes(dataset):
    _, data, _ = dataset
    phrases = {"to the left of": "left of", "to the right of": "right of",
               "above": "above", "below": "below"}
    checked = 0
    for record in data["images"]:
        by_name = {(o["color"], o["shape"]): o["bbox"] for o in record["objects"]}
        for sentence in record["sentences"]:
            for phrase, relation in phrases.items():
                if f" {phrase} " not in sentence["raw"]:
                    continue
                first, second = sentence["raw"].split(f" {phrase} ")
                (a,), (b,) = shapes.parse_objects(first), shapes.parse_objects(second)
                assert shapes.relation_between(by_name[a], by_name[b]) == relation
                checked += 1
    assert checked > 0


def test_parse_objects():
    assert shapes.parse_objects("a large red circle to the left of a blue square") == [
        ("red", "circle"), ("blue", "square")]
    assert shapes.parse_objects("a red large circle") == [("red", "circle")]
    assert shapes.parse_objects("a red and a square") == []
    assert shapes.parse_objects("there are three shapes") == []
    assert shapes.parse_objects("") == []


def test_caption_words_cover_templates():
    words = shapes.caption_words()
    assert words == sorted(set(words))
    used = set()
    for index in range(200):
        rng = np.random.default_rng([0, index])
        objects, relation = shapes.sample_scene(rng, SIZE)
        for caption in shapes.make_captions(objects, relation, rng):
            used.update(caption.split())
    assert used == set(words)


# --------------------------------------------------------------------------- splits
def test_splits(dataset):
    _, data, _ = dataset
    cfg = ShapesConfig()
    splits = {r["filename"]: r["split"] for r in data["images"]}
    counts = collections.Counter(splits.values())
    assert counts["test"] == round(NUM_IMAGES * cfg.test_fraction)
    assert counts["val"] == round(NUM_IMAGES * cfg.val_fraction)
    assert counts["train"] == NUM_IMAGES - counts["test"] - counts["val"]
    assert splits == split_images(list(splits), cfg.val_fraction, cfg.test_fraction, cfg.seed)


# --------------------------------------------------------------------------- speed
@pytest.mark.slow
def test_thousand_images_under_30_seconds(tmp_path):
    summary = _make(tmp_path, num_images=1000)
    assert summary["images"] == 1000
    assert len(os.listdir(summary["images_dir"])) == 1000
    assert summary["seconds"] < 30


@pytest.mark.parametrize("what", ["photo", "captions"])
def test_replace_deletes_only_what_make_shapes_made(tmp_path, what):
    """A dataset of one's own in the same layout (OUT/images + OUT/captions.json) was deleted
    whole by --replace, photos included."""
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    if what == "photo":
        _make(tmp_path / "other", num_images=1)
        shutil.copy(tmp_path / "other" / "captions.json", out / "captions.json")
        (out / "images" / "holiday.jpg").write_bytes(b"mine")
        message = r"images/holiday\.jpg"
    else:
        (out / "images" / "shape_00000.png").write_bytes(b"x")
        (out / "captions.json").write_text('{"images": [], "annotations": []}')
        message = r"captions\.json: not written by make-shapes"
    before = _files(out)
    with pytest.raises(UserError, match=message):
        _make(out, replace=True)
    assert _files(out) == before


def test_existing_dataset_folder_is_refused_unless_replace(tmp_path):
    first = _make(tmp_path / "d", seed=1)
    before = _files(tmp_path / "d")
    with pytest.raises(UserError, match=r"d: not empty .*--replace"):
        _make(tmp_path / "d", seed=2)
    assert _files(tmp_path / "d") == before                        # nothing overwritten
    second = _make(tmp_path / "d", seed=2, replace=True)
    assert _files(tmp_path / "d") != before and os.path.exists(second["captions"])
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):             # never deleted by --replace
        _make(tmp_path / "d", seed=3, replace=True)
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
    assert first["images"] == second["images"]


@pytest.mark.parametrize("mine", ["shape_00003.png.orig", "shape_00001.png.backup/notes.txt",
                                  "shape_00007.png/x.txt", ".shape_00000.png.swp"])
def test_replace_refuses_files_that_only_start_like_its_images(tmp_path, mine):
    """`shape_00003.png.orig` and a folder `shape_00001.png.backup/` passed as the command's
    images (a name starting with shape_N.png) and were deleted by --replace."""
    out = tmp_path / "d"
    _make(out, num_images=4)
    path = out / "images" / mine
    path.parent.mkdir(exist_ok=True)
    path.write_text("mine")
    before = _files(out)
    with pytest.raises(UserError, match=r"images/" + re.escape(mine.split("/")[0])
                       + r" was not made by make-shapes"):
        _make(out, num_images=4, replace=True)
    assert _files(out) == before


def test_replace_deletes_its_images_and_their_temporary_files(tmp_path):
    """What a killed make-shapes leaves (its images and fileio's temporary files,
    `.shape_N.png.tmp.<pid>.<host>`) is its own, deleted by --replace."""
    from caption_attn.fileio import temp_name
    out = tmp_path / "d"
    _make(out, num_images=4)
    temp = temp_name(str(out / "images" / "shape_00001.png"))
    with open(temp, "wb") as f:
        f.write(b"half a png")
    _make(out, num_images=4, seed=3, replace=True)
    assert sorted(os.listdir(out / "images")) == [f"shape_{i:05d}.png" for i in range(4)]


def test_replace_deletes_what_a_kill_while_writing_captions_json_left(tmp_path):
    """`kill -9` while captions.json was written (seconds for 100k+ images) left the images
    and fileio's temporary file `.captions.json.tmp.<pid>.<host>`, and --replace refused the
    folder as "not a shapes dataset", where the README says to rerun with --replace."""
    from caption_attn.fileio import temp_name
    out = tmp_path / "d"
    (out / "images").mkdir(parents=True)
    (out / "images" / "shape_00000.png").write_bytes(b"a png")
    (out / ".captions.json.tmp.1.h").write_text('{"dataset": "shapes", "ima')
    with open(temp_name(str(out / "captions.json")), "w") as f:   # this host's, as written
        f.write('{"dataset": "sh')
    summary = _make(out, num_images=2, replace=True)
    assert sorted(os.listdir(out)) == ["captions.json", "images"]
    assert sorted(os.listdir(summary["images_dir"])) == ["shape_00000.png", "shape_00001.png"]


@pytest.mark.parametrize("mine", [".captions.json.tmp", ".captions.json.tmp.x.h",
                                  "captions.json.tmp.1.h", ".captions.json.swp",
                                  ".captions.json.tmp.1.h/notes.txt"])
def test_replace_refuses_files_that_only_look_like_a_temporary_captions_json(tmp_path, mine):
    """Only fileio's exact temporary name of captions.json, and only a regular file, is a
    killed run's: anything else of that look in OUT is someone's, refused and kept."""
    out = tmp_path / "d"
    _make(out, num_images=2)
    path = out / mine
    path.parent.mkdir(exist_ok=True)
    path.write_text("mine")
    before = _files(out)
    with pytest.raises(UserError, match=r"not a shapes dataset \(" +
                       re.escape(mine.split("/")[0]) + r"\)"):
        _make(out, num_images=2, replace=True)
    assert _files(out) == before


def test_replace_refuses_an_images_folder_that_is_a_link(tmp_path):
    """rmtree refused the link only after captions.json was deleted: a half-deleted dataset."""
    target = tmp_path / "photos"
    target.mkdir()
    (target / "shape_00000.png").write_bytes(b"mine")
    out = tmp_path / "d"
    _make(out, num_images=1)
    shutil.rmtree(out / "images")
    os.symlink(target, out / "images")
    before = _files(out)
    with pytest.raises(UserError, match=r"images: a link, not make-shapes' images folder"):
        _make(out, num_images=1, replace=True)
    assert _files(out) == before and (target / "shape_00000.png").read_bytes() == b"mine"


def test_a_split_rounded_to_no_image_is_noted(tmp_path, capsys):
    """`--num-images 5` made no val and no test image (round(0.5) = 0) without a word."""
    from caption_attn.cli import main
    assert main(["make-shapes", str(tmp_path / "five"), "--num-images", "5"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"note: --num-images 5 gives the {split} split no image (round(5 x 0.1) = "
                   f"0): use --num-images 6 or more, or a larger --{split}-fraction"
                   for split in ("val", "test")]
    assert _make(tmp_path / "six", num_images=6)["notes"] == []
    assert _make(tmp_path / "none", num_images=3, val_fraction=0.0,
                 test_fraction=0.4)["notes"] == []          # val asked for none; test has 1
    tiny = _make(tmp_path / "tiny", num_images=3, val_fraction=1e-9, test_fraction=0.4)
    assert tiny["notes"] == ["--num-images 3 gives the val split no image (round(3 x 1e-09) = "
                             "0): use --num-images 500000001 or more, or a larger "
                             "--val-fraction"]          # (the search for it ended at 10**7)
    assert _make(tmp_path / "two", num_images=2, val_fraction=0.3, test_fraction=0.3)[
        "notes"] == ["--num-images 2 leaves the train split no image (val and test take them "
                     "all): use more images or smaller --val-fraction / --test-fraction"]


def test_the_module_docstring_gives_the_sizes_the_code_draws():
    """It said 0.18/0.30 (54/90 px) after the sizes became 0.22/0.36."""
    small, large = shapes.SIZES["small"], shapes.SIZES["large"]
    assert f"Sizes {small} and {large} of the image side ({shapes._side('small', 299)} and " \
           f"{shapes._side('large', 299)} px at 299 px" in " ".join(shapes.__doc__.split())
