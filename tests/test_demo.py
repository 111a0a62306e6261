import dataclasses
import json
import os
import re

import pytest

from caption_attn import demo
from caption_attn.config import DemoConfig


@pytest.mark.slow
def test_demo_end_to_end_on_a_reduced_size(tmp_path, no_java):
    from caption_attn.errors import UserError
    lines = []
    cfg = DemoConfig(workdir=str(tmp_path / "work"), num_images=150, epochs=4, scst_after=3,
                     show=2, beam=2)
    out = demo.run_demo(cfg, log=lines.append)
    paths = out["paths"]
    for name in ("config.json", "vocab.json", "split.json", "history.json", "best.keras"):
        assert os.path.isfile(os.path.join(paths["run"], name)), name
    with open(os.path.join(paths["cache"], "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["count"] == 150 and manifest["weights"] == "random"
    assert len(os.listdir(paths["heatmaps"])) == 2
    assert os.listdir(os.path.join(paths["run"], "logs", "validation"))
    metrics = out["metrics"]
    with open(metrics["metrics_file"]) as f:
        assert json.load(f)["images"] == metrics["images"] == 15
    # above chance: random words score ~0 BLEU-4 and name no scene right
    assert metrics["Bleu_4"] > 0.3
    assert metrics["CIDEr"] > 0.5
    assert metrics["scene_accuracy"] is not None and metrics["grounding"] is not None
    with open(os.path.join(paths["run"], "history.json")) as f:
        assert [h["stage"] for h in json.load(f)] == ["cross-entropy"] * 3 + ["self-critical"]
    text = "\n".join(lines)
    for expected in ("tensorboard --logdir", "heatmaps:", "best model:", "BLEU-4",
                     "Captions for image"):
        assert expected in text
    # evaluate's notes under its table, before the targets are judged (METEOR n/a, the
    # Python tokenizer's scores, said nowhere but in the metrics file)
    from caption_attn.coco_metrics import NOTE_NO_METEOR
    assert metrics["notes"] and NOTE_NO_METEOR in metrics["notes"]
    notes = [i for i, line in enumerate(lines) if line.startswith("note: ")
             and line[6:] in metrics["notes"]]
    targets = [i for i, line in enumerate(lines) if line.startswith("target ")]
    assert len(notes) == len(metrics["notes"]) and notes[-1] < targets[0], lines
    # the demo has no --images flag: its train line does not name one
    checked = [line for line in lines if line.startswith("source images checked in")]
    assert checked and all(line.endswith("(the demo's dataset)") for line in checked), checked

    # a file of one's own among the heatmaps: refused at once, nothing deleted
    mine = os.path.join(paths["heatmaps"], "mine.txt")
    with open(mine, "w") as f:
        f.write("x")
    with pytest.raises(UserError, match=r"holds files the demo did not draw \(mine\.txt\)"):
        demo.run_demo(cfg, log=lines.append)
    assert len(os.listdir(paths["heatmaps"])) == 3
    os.remove(mine)

    # a rerun reuses the dataset, the cache and the finished run; with --show 0 (not part of
    # the recorded settings) it draws no heatmaps (removing those it drew: its own) and does
    # not name a heatmaps folder
    lines.clear()
    again = demo.run_demo(dataclasses.replace(cfg, show=0), log=lines.append)
    text = "\n".join(lines)
    assert "reusing" in text
    assert again["metrics"]["Bleu_4"] == pytest.approx(metrics["Bleu_4"])
    assert "none drawn (--show 0)" in text and paths["heatmaps"] not in text
    assert not os.path.exists(paths["heatmaps"])

    # an image of the dataset changed: refused before its features are extracted again
    images = os.path.join(paths["shapes"], "images")
    first, other = sorted(os.listdir(images))[:2]
    with open(os.path.join(images, other), "rb") as src, \
            open(os.path.join(images, first), "wb") as dst:
        dst.write(src.read())
    index = sorted(os.listdir(paths["cache"]))
    with pytest.raises(UserError, match=rf"^--workdir .*: 1 of the \d+ images the demo trained "
                                        rf"on changed in {re.escape(images)} since \({first}\)"
                                        rf".* add --fresh"):
        demo.run_demo(cfg, log=lines.append)
    assert sorted(os.listdir(paths["cache"])) == index


def test_settings_are_checked_before_anything_is_written(tmp_path):
    from caption_attn.errors import UserError
    work = tmp_path / "work"
    with pytest.raises(UserError, match="--scst-after"):
        demo.run_demo(DemoConfig(workdir=str(work), epochs=4, scst_after=9), log=lambda m: None)
    assert not work.exists()


def test_scst_after_equal_to_epochs_is_allowed_and_above_says_at_most(tmp_path):
    from caption_attn.errors import UserError
    DemoConfig(workdir=str(tmp_path), epochs=1, scst_after=1)  # cross-entropy only
    with pytest.raises(UserError, match=r"--scst-after 3 must be at most --epochs \(1\)"):
        DemoConfig(workdir=str(tmp_path), epochs=1, scst_after=3)


def test_a_workdir_that_is_a_file_is_refused_naming_the_flag(tmp_path, capsys):
    from caption_attn.cli import main
    work = tmp_path / "notes.txt"
    work.write_text("mine")
    assert main(["demo", "--workdir", str(work)]) == 2
    assert f"--workdir {work}: {work} is a file, not a folder" in capsys.readouterr().err
    assert work.read_text() == "mine"


def test_rerun_with_other_settings_is_refused_with_the_differences(tmp_path):
    from caption_attn.errors import UserError
    work = str(tmp_path / "work")
    demo.check_workdir(DemoConfig(workdir=work, seed=0, units=256))    # new folder: recorded
    demo.check_workdir(DemoConfig(workdir=work, seed=0, units=256, beam=1, show=2))  # same
    with pytest.raises(UserError) as e:
        demo.check_workdir(DemoConfig(workdir=work, seed=3, units=128))
    message = str(e.value)
    assert "seed: 0 -> 3" in message and "units: 256 -> 128" in message
    assert "--fresh" in message and "--workdir" in message


def test_fresh_removes_what_the_demo_made_and_nothing_else(tmp_path):
    from caption_attn.errors import UserError
    work = tmp_path / "work"
    demo.check_workdir(DemoConfig(workdir=str(work), seed=0))
    for folder in ("shapes", "features_cache", "models/shapes", "heatmaps"):
        os.makedirs(work / folder)
        (work / folder / "x").write_text("x")
    (work / "notes.txt").write_text("mine")
    # a file of one's own among the heatmaps: --fresh deleted it with them, without a word
    with pytest.raises(UserError, match=r"^--fresh: .*heatmaps holds files the demo did not "
                                        r"draw \(x\); nothing was deleted"):
        demo.check_workdir(DemoConfig(workdir=str(work), seed=5, fresh=True))
    assert (work / "heatmaps" / "x").exists() and (work / "shapes" / "x").exists()
    os.remove(work / "heatmaps" / "x")
    demo.check_workdir(DemoConfig(workdir=str(work), seed=5, fresh=True))
    assert sorted(os.listdir(work)) == ["demo.json", "models", "notes.txt"]
    assert os.listdir(work / "models") == []
    with open(work / "demo.json") as f:
        assert json.load(f)["seed"] == 5


@pytest.mark.parametrize("fresh", [False, True], ids=["again", "fresh"])
def test_a_second_demo_in_a_workdir_in_use_is_refused_in_the_demos_terms(tmp_path, capsys,
                                                                        fresh):
    """`demo --fresh` beside a running demo deleted everything that demo was making, and a
    second demo without it was refused halfway naming train's --run or extract's --cache:
    now either is refused first, deleting nothing, naming --workdir and the other's pid."""
    import fcntl
    from caption_attn.cli import main
    work = tmp_path / "work"
    demo.check_workdir(DemoConfig(workdir=str(work), seed=0))
    (work / "shapes").mkdir()
    (work / "shapes" / "x").write_text("x")
    with open(work / ".demo.lock", "a+") as held:   # the running demo's
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["demo", "--workdir", str(work), "--num-images", "20"]
                    + ["--fresh"] * fresh) == 2
    err = capsys.readouterr().err
    assert re.match(rf"caption-attn demo: error: --workdir {re.escape(str(work))}: another "
                    rf"`caption-attn demo` \(pid {os.getpid()}: .*\) is working in it now; "
                    rf".* wait for it to end, or choose another --workdir$", err), err
    assert (work / "shapes" / "x").read_text() == "x"


def test_train_flag_combinations_are_checked_before_anything_is_written(tmp_path):
    """The demo's cosine schedule is left out with --scst-after 0 (no cross-entropy epoch to
    decay over; train refuses cosine there), and a --batch-size below the self-critical
    samples of one image is refused before make-shapes, not after extraction."""
    from caption_attn.errors import UserError
    cfg = DemoConfig(workdir=str(tmp_path / "work"), epochs=2, scst_after=0)
    assert demo.run_config(cfg, "c.json", "cache").train.lr_schedule == "constant"
    assert demo.run_config(DemoConfig(epochs=2, scst_after=1), "c.json", "cache") \
        .train.lr_schedule == "cosine"
    work = tmp_path / "small"
    with pytest.raises(UserError, match=r"^--batch-size 4: the demo's self-critical epochs"):
        demo.run_demo(DemoConfig(workdir=str(work), epochs=2, scst_after=1, batch_size=4),
                      log=lambda m: None)
    assert not work.exists()
    # a model too large for this machine's memory, before make-shapes (not after extraction)
    with pytest.raises(UserError, match=r"^--units 10000000 --embedding-dim 128 .* billion "
                                        r"weights"):
        demo.run_demo(DemoConfig(workdir=str(work), units=10 ** 7), log=lambda m: None)
    assert not work.exists()


def test_a_batch_size_below_the_self_critical_samples_names_the_demos_flags():
    # train's message told the demo's user to lower --scst-samples, which demo does not have
    from caption_attn.errors import UserError
    with pytest.raises(UserError) as e:
        DemoConfig(epochs=3, scst_after=1, batch_size=4)
    assert str(e.value) == ("--batch-size 4: the demo's self-critical epochs (after "
                            "--scst-after 1) sample 5 captions of each image, and a step takes "
                            "--batch-size captions: use --batch-size 5 or more, or --scst-after "
                            "3 (cross-entropy only)")
    assert "--scst-samples" not in str(e.value)
    DemoConfig(epochs=3, scst_after=3, batch_size=4)                 # cross-entropy only


@pytest.mark.parametrize("fresh", [False, True])
def test_a_workdir_holding_folders_no_demo_made_is_refused_and_left_alone(tmp_path, fresh):
    """`--workdir .` in a project holds its own features_cache and models/shapes (README's
    train example): --fresh deleted them, and a rerun without it extracted and trained there."""
    from caption_attn.errors import UserError
    work = tmp_path / "project"
    os.makedirs(work / "features_cache")
    (work / "features_cache" / "manifest.json").write_text("{}")
    os.makedirs(work / "models" / "shapes")
    (work / "models" / "shapes" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds features_cache, models/shapes but no demo\.json"):
        demo.check_workdir(DemoConfig(workdir=str(work), fresh=fresh))
    assert (work / "features_cache" / "manifest.json").exists()
    assert (work / "models" / "shapes" / "config.json").exists()
    assert not (work / "demo.json").exists()


def test_heatmaps_of_an_earlier_demo_run_do_not_stay_beside_the_new_ones(tmp_path, monkeypatch):
    """A rerun with a smaller --show (or --show 0) after more --epochs left the earlier,
    older model's heatmaps in the folder, looking like this model's."""
    from caption_attn import captioner
    run, heat = tmp_path / "run", tmp_path / "heatmaps"
    os.makedirs(run)
    (run / "split.json").write_text(json.dumps({"splits": {"test": ["a.png", "b.png"]}}))
    os.makedirs(heat)
    for name in ("a.png", "b.png", "c.png"):
        (heat / name).write_bytes(heatmap_png())

    class Model:
        def caption_images(self, paths):
            return {}, {paths[0]: "cannot read"}
    monkeypatch.setattr(captioner.Captioner, "from_run", classmethod(lambda cls, *a: Model()))
    paths = {"run": str(run), "heatmaps": str(heat)}
    lines = []
    errors = demo.caption_test_images(DemoConfig(show=1), paths, "imgs", lines.append)
    assert not heat.exists() or os.listdir(heat) == []
    assert errors == {os.path.join("imgs", "a.png"): "cannot read"}
    assert lines == [f"[5/5] caption 1 test images -> {heat}",
                     f"could not caption {os.path.join('imgs', 'a.png')}: cannot read"]
    # a --show above the test split's size: the number captioned, not --show's
    lines.clear()
    demo.caption_test_images(DemoConfig(show=5), paths, "imgs", lines.append)
    assert lines[0] == f"[5/5] caption 2 test images (all the test split holds; --show 5) -> {heat}"
    lines.clear()
    os.makedirs(heat)
    (heat / "a.png").write_bytes(heatmap_png())
    assert demo.caption_test_images(DemoConfig(show=0), paths, "imgs", lines.append) == {}
    assert not heat.exists()
    assert lines == ["[5/5] caption test images: skipped (--show 0)"]
    # a heatmaps link (rmtree refused it, after evaluating): removed as a link, target kept
    target = tmp_path / "elsewhere"
    os.makedirs(target)
    (target / "mine.png").write_text("kept")
    os.symlink(target, heat)
    assert demo.caption_test_images(DemoConfig(show=0), paths, "imgs", lines.append) == {}
    assert not os.path.lexists(heat) and (target / "mine.png").read_text() == "kept"


def test_train_refusals_name_the_demos_scst_after_not_trains_none(monkeypatch):
    """The demo passes --scst-after equal to --epochs on as train's `none`: a refusal said
    `--scst-after none`, a value the demo's flag does not take."""
    from caption_attn import train
    from caption_attn.errors import UserError

    def refuse(cfg, run, **kwargs):
        assert cfg.train.scst_after is None
        raise UserError("--scst-after none: epoch 2 of RUN was self-critical, ...; resume "
                        "with the run's --scst-after 1, or add --fresh")
    monkeypatch.setattr(train, "train", refuse)
    data = {"captions": "c.json", "images_dir": "images"}
    paths = {"cache": "cache", "run": "run"}
    with pytest.raises(UserError) as e:
        demo.train_stage(DemoConfig(epochs=2, scst_after=2), data, paths, print)
    assert str(e.value).startswith("--scst-after 2 (= --epochs 2: cross-entropy only): epoch 2")
    assert "none" not in str(e.value) and e.value.exit_code == 2

    def refuse_old(cfg, run, **kwargs):
        raise UserError("--scst-after 1: ...; resume with the run's --scst-after none, or ...")
    monkeypatch.setattr(train, "train", refuse_old)
    with pytest.raises(UserError, match=r"the run's --scst-after equal to its --epochs "):
        demo.train_stage(DemoConfig(epochs=3, scst_after=1), data, paths, print)

    def refuse_mid_epoch(cfg, run, **kwargs):   # refuse_other_batches_mid_epoch's wording
        raise UserError("RUN stopped in epoch 3 at step 5, and this would cut it into other "
                        "batches: --scst-after 2 (was none: the epoch would be self-critical)")
    monkeypatch.setattr(train, "train", refuse_mid_epoch)
    with pytest.raises(UserError) as e:
        demo.train_stage(DemoConfig(epochs=3, scst_after=2), data, paths, print)
    assert "(was equal to the run's --epochs, cross-entropy only: the epoch" in str(e.value)
    assert "none" not in str(e.value)


@pytest.mark.parametrize("inside", ["heatmaps/mine", "models/shapes", "shapes/x/y",
                                    "features_cache"])
def test_a_workdir_inside_what_another_demo_owns_is_refused(tmp_path, inside):
    """The outer demo redraws its heatmaps on every run (and --fresh deletes its dataset,
    cache and run): a demo inside them was deleted with them."""
    from caption_attn.errors import UserError
    outer = tmp_path / "outer"
    demo.check_workdir(DemoConfig(workdir=str(outer)))
    inner = outer / inside
    with pytest.raises(UserError, match=r"^--workdir .*: inside .*, which the demo in "):
        demo.check_workdir(DemoConfig(workdir=str(inner)))
    assert not inner.exists()
    demo.check_workdir(DemoConfig(workdir=str(outer / "elsewhere")))   # not what it owns


@pytest.mark.parametrize("record", ["[1, 2]", '"x"', "{}", '{"seed": 0}'])
def test_a_demo_json_that_is_not_a_full_record_is_not_taken_as_the_same_settings(tmp_path,
                                                                                 record):
    """A list, a string or an object without the settings passed as "the same settings" (and
    was overwritten with this run's), so the folder's dataset, cache and run were reused."""
    from caption_attn.errors import UserError
    work = tmp_path / "work"
    os.makedirs(work)
    (work / "demo.json").write_text(record)
    with pytest.raises(UserError, match=r"not the object of settings|units: not recorded"):
        demo.check_workdir(DemoConfig(workdir=str(work)))
    assert (work / "demo.json").read_text() == record
    demo.check_workdir(DemoConfig(workdir=str(work), fresh=True))


def test_a_demo_made_before_ema_was_recorded_reruns_with_ema_0(tmp_path):
    """demo.json gained `ema` in stop 69: an older demo's lacks it and trained without the
    average. Taken as 0 (not as an edited record): today's default (0.995) is refused as the
    other setting it is, naming it, and `--ema 0` reuses the folder."""
    import json
    from caption_attn.errors import UserError
    work = tmp_path / "work"
    demo.check_workdir(DemoConfig(workdir=str(work)))
    record = json.loads((work / "demo.json").read_text())
    assert record["ema"] == 0.995
    del record["ema"]
    (work / "demo.json").write_text(json.dumps(record))
    with pytest.raises(UserError) as e:
        demo.check_workdir(DemoConfig(workdir=str(work)))
    assert e.value.lines[0] == "  ema: 0.0 -> 0.995"
    demo.check_workdir(DemoConfig(workdir=str(work), ema=0.0))
    assert json.loads((work / "demo.json").read_text())["ema"] == 0.0


def test_a_cluster_in_tf_config_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    # train refuses it (without --strategy multi-worker), but only in stage 3, naming a
    # --strategy the demo has not got
    from caption_attn.errors import UserError
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                                "task": {"type": "worker", "index": 0}}))
    work = tmp_path / "work"
    with pytest.raises(UserError, match=r"^the TF_CONFIG environment variable .* unset "
                                        r"TF_CONFIG$"):
        demo.run_demo(DemoConfig(workdir=str(work)), log=lambda m: None)
    assert not work.exists()


def test_a_dataset_replaced_after_the_demo_made_it_is_not_reused(tmp_path):
    """`make-shapes WORK/shapes --replace --seed 7` after a demo of --seed 0 (same image
    count): the demo reused it, re-extracted the cache's features of every image, and only
    train refused, naming its own --captions."""
    from caption_attn import shapes
    from caption_attn.config import ShapesConfig
    from caption_attn.errors import UserError
    folder = tmp_path / "work" / "shapes"
    os.makedirs(tmp_path / "work" / "features_cache")
    shapes.make_shapes(str(folder), ShapesConfig(num_images=20, seed=7))
    lines = []
    assert demo._dataset(DemoConfig(num_images=20, seed=7), str(folder), lines.append)
    assert lines == [f"reusing {folder / 'captions.json'}"]
    with pytest.raises(UserError, match=r"captions\.json: not the dataset this demo renders with "
                                        r"these settings "
                                        r"\(other image names or splits than --seed 0"):
        demo._dataset(DemoConfig(num_images=20, seed=0), str(folder), lines.append)
    with pytest.raises(UserError, match=r"\(20 images, not --num-images 30\)"):
        demo._dataset(DemoConfig(num_images=30, seed=7), str(folder), lines.append)
    data = json.loads((folder / "captions.json").read_text())
    data["images"][0]["sentences"][0]["raw"] = "a red circle"
    (folder / "captions.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"other scenes or captions than --seed 7 gives "
                                        r"\(shape_00000\.png\)"):
        demo._dataset(DemoConfig(num_images=20, seed=7), str(folder), lines.append)


@pytest.mark.parametrize("linked", ["features_cache", "heatmaps", "models/shapes"])
def test_fresh_removes_a_link_as_a_link_and_keeps_its_target(tmp_path, linked):
    """A cache moved elsewhere and linked back: rmtree refused the link after `shapes` was
    deleted (a half-deleted work folder, exit 1, no file named)."""
    work = tmp_path / "work"
    demo.check_workdir(DemoConfig(workdir=str(work), seed=0))
    for folder in ("shapes", "features_cache", "models/shapes", "heatmaps"):
        if folder != linked:
            os.makedirs(work / folder)
            if folder != "heatmaps":   # a file there would be one's own: refused
                (work / folder / "x").write_text("x")
    target = tmp_path / "elsewhere"
    os.makedirs(target)
    (target / "big").write_text("kept")
    os.makedirs((work / linked).parent, exist_ok=True)
    os.symlink(target, work / linked)
    demo.check_workdir(DemoConfig(workdir=str(work), seed=5, fresh=True))
    assert sorted(os.listdir(work)) == ["demo.json", "models"]
    assert os.listdir(work / "models") == []
    assert os.listdir(target) == ["big"] and (target / "big").read_text() == "kept"


def test_fresh_checks_every_folder_before_deleting_anything(tmp_path, monkeypatch):
    from caption_attn.errors import UserError
    work = tmp_path / "work"
    demo.check_workdir(DemoConfig(workdir=str(work), seed=0))
    for folder in ("heatmaps", "shapes/deep"):
        os.makedirs(work / folder)
    (work / "shapes" / "deep" / "x").write_text("x")
    (work / "shapes" / "x").write_text("x")
    locked = str(work / "shapes" / "deep")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != locked and real_access(p, mode))
    with pytest.raises(UserError, match=r"^--fresh: cannot delete .* --workdir .*: "
                                        r".*deep is not writable; nothing was deleted"):
        demo.check_workdir(DemoConfig(workdir=str(work), seed=5, fresh=True))
    assert (work / "shapes" / "x").exists() and (work / "shapes" / "deep" / "x").exists()
    assert (work / "heatmaps").is_dir()
    assert json.loads((work / "demo.json").read_text())["seed"] == 0


@pytest.mark.parametrize("blocker", ["models", "models/shapes", "features_cache", "heatmaps",
                                     "shapes"])
def test_a_file_where_the_demo_makes_a_folder_is_refused_before_the_first_stage(
        tmp_path, monkeypatch, blocker):
    """`WORKDIR/models` a file: make-shapes and extract-features ran in full, then train
    refused, naming its --run (a flag the demo has not)."""
    from caption_attn.errors import UserError

    def first_stage(*args):
        raise AssertionError("make-shapes ran")
    monkeypatch.setattr(demo, "_dataset", first_stage)
    work = tmp_path / "work"
    cfg = DemoConfig(workdir=str(work), num_images=20, epochs=1, scst_after=1)
    demo.check_workdir(cfg)
    os.makedirs((work / blocker).parent, exist_ok=True)
    (work / blocker).write_text("mine")
    with pytest.raises(UserError, match=r"^--workdir .*: .*" + re.escape(blocker)
                       + r" is not a folder, but the demo makes its .* there: move it away, "
                         r"or choose another --workdir$") as e:
        demo.run_demo(cfg, log=lambda m: None)
    assert "--run" not in str(e.value) and "--cache" not in str(e.value)
    assert sorted(os.listdir(work)) == sorted(["demo.json", blocker.split("/")[0]])
    if blocker != "models":
        # --fresh deletes what the demo made, a file of those names included
        demo.check_paths(dataclasses.replace(cfg, fresh=True), paths(work))
    new = tmp_path / "new" / "work"                             # made by the demo: fine
    demo.check_paths(dataclasses.replace(cfg, workdir=str(new)), paths(new))


def paths(work):
    return {"shapes": str(work / "shapes"), "cache": str(work / "features_cache"),
            "run": str(work / "models" / "shapes"), "heatmaps": str(work / "heatmaps")}


@pytest.mark.parametrize("native, recorded, expected, note", [
    (True, None, "bfloat16", None), (False, None, "float32", None),
    (True, "bfloat16", "bfloat16", None),
    (True, "float32", "float32", "extracted in float32, and the demo keeps its precision to "
                                 "reuse it; this machine would pick bfloat16"),
    (False, "bfloat16", "bfloat16", "extracted in bfloat16, and the demo keeps its precision to "
                                    "reuse it (bfloat16 is emulated here: slower); this machine "
                                    "would pick float32 (--fresh starts over in float32)")])
def test_a_rerun_keeps_the_precision_its_cache_was_extracted_in(tmp_path, monkeypatch, native,
                                                                recorded, expected, note):
    """A workdir made on another CPU kind (or under ONEDNN_MAX_CPU_ISA=AVX2, as the README's
    Results do) was refused by extract-features, naming --cache and --precision, flags the
    demo has not: a rerun reuses the cache, as the README promises."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(demo, "native_bfloat16", lambda: native)
    cache = tmp_path / "features_cache"
    if recorded:
        os.makedirs(cache)
        (cache / "manifest.json").write_text(json.dumps({"precision": recorded}))
    lines = []
    assert demo.backbone_precision(DemoConfig(), str(cache), lines.append) == expected
    if note is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith(f"note: {cache} was {note}")


def test_a_bfloat16_cache_under_onednn_capped_below_it_is_refused_in_the_demos_terms(
        tmp_path, monkeypatch, onednn_capped_below):
    """oneDNN capped at AVX2 has no bfloat16 kernels: captioning the test images with the
    cache's bfloat16 backbone failed after training and evaluating."""
    from caption_attn.errors import UserError
    onednn_capped_below("bfloat16")
    monkeypatch.setattr(demo, "native_bfloat16", lambda: False)
    os.makedirs(tmp_path / "c")
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({"precision": "bfloat16"}))
    with pytest.raises(UserError, match=r"^--workdir w: its feature cache .* bfloat16 backbone, "
                                        r"which oneDNN capped at AVX2 \(ONEDNN_MAX_CPU_ISA\) "
                                        r"cannot run: .* add --fresh to start the demo over"):
        demo.backbone_precision(DemoConfig(workdir="w"), str(tmp_path / "c"), print)


def test_run_demo_extracts_in_the_precision_the_cache_records(tmp_path, monkeypatch):
    from caption_attn import extract
    monkeypatch.setattr(demo, "native_bfloat16", lambda: True)
    work = tmp_path / "work"
    cfg = DemoConfig(workdir=str(work), num_images=20, epochs=1, scst_after=1)
    demo.check_workdir(cfg)
    os.makedirs(work / "features_cache")
    (work / "features_cache" / "manifest.json").write_text(json.dumps({"precision": "float32"}))
    monkeypatch.setattr(demo, "_dataset", lambda *a: {"images_dir": "i", "captions": "c"})
    asked = []

    def extract_features(images_dir, extract_cfg, **kwargs):
        asked.append(extract_cfg.precision)
        raise KeyboardInterrupt                                # stop before training
    monkeypatch.setattr(extract, "extract_features", extract_features)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(cfg, log=lines.append)
    assert asked == ["float32"]
    assert any(line.startswith("[2/5] extract-features (random InceptionV3, seed 0, float32)")
               for line in lines)


def test_a_cache_of_other_settings_is_refused_in_the_demos_terms(monkeypatch):
    from caption_attn import extract, feature_cache
    from caption_attn.errors import UserError

    def refuse(*args, **kwargs):
        raise feature_cache._refuse("W/features_cache", "dtype", "float32", "float16",
                                    " (or --dtype float32)")
    monkeypatch.setattr(extract, "extract_features", refuse)
    with pytest.raises(UserError) as e:
        demo.extract_stage(DemoConfig(workdir="W"), {"images_dir": "i"},
                           {"cache": "W/features_cache"}, "float32")
    assert str(e.value) == ("--workdir W: its feature cache W/features_cache holds features "
                            "made with dtype float32, the demo asks for float16: add --fresh "
                            "to start the demo over, or choose another --workdir")


def test_a_workdir_not_utf8_is_refused_before_anything_is_written(tmp_path):
    """The demo trains into its work folder, whose checkpoints and TensorBoard logs
    TensorFlow opens by UTF-8 paths: in a folder named b'caf\\xe9' it made the dataset, then
    crashed (UnicodeEncodeError) at the end of the extraction, leaving them behind."""
    from caption_attn.errors import UserError
    work = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9/work")
    with pytest.raises(UserError) as e:
        demo.run_demo(DemoConfig(workdir=work, num_images=20, epochs=1, scst_after=1),
                      log=lambda m: None)
    assert str(e.value).startswith(f"--workdir {tmp_path}/caf\\xe9/work: not a UTF-8 path")
    assert os.listdir(tmp_path) == []


def heatmap_png() -> bytes:
    """A PNG carrying the mark of the heatmaps `caption --plot-attention` (and the demo) draw."""
    import cv2
    import numpy as np
    from caption_attn.images import mark_heatmap
    return mark_heatmap(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1].tobytes())


def test_a_rerun_removes_only_the_heatmaps_it_drew(tmp_path, monkeypatch):
    """A rerun deleted the whole heatmaps folder: files of one's own put there went with the
    demo's heatmaps, without a word."""
    from caption_attn import captioner
    run, heat = tmp_path / "run", tmp_path / "heatmaps"
    os.makedirs(run)
    (run / "split.json").write_text(json.dumps({"splits": {"test": ["a.png"]}}))
    os.makedirs(heat / "sub")
    (heat / "old.png").write_bytes(heatmap_png())
    (heat / ".old.png.tmp.123.host").write_bytes(heatmap_png()[:20])   # a killed write's
    (heat / "mine.txt").write_text("x")
    (heat / "sub" / "keep.txt").write_text("y")
    monkeypatch.setattr(captioner.Captioner, "from_run", classmethod(lambda cls, *a: None))
    paths = {"run": str(run), "heatmaps": str(heat)}
    assert demo.caption_test_images(DemoConfig(show=0), paths, "imgs", lambda m: None) == {}
    assert sorted(os.listdir(heat)) == ["mine.txt", "sub"]
    assert (heat / "mine.txt").read_text() == "x" and (heat / "sub" / "keep.txt").read_text() == "y"


def test_a_rerun_with_files_of_ones_own_in_heatmaps_is_refused_before_anything(tmp_path,
                                                                              monkeypatch):
    """The demo treats files it did not make as it does elsewhere (a workdir of someone's
    folders, a replaced dataset): it refuses, deleting nothing, and says what to do."""
    from caption_attn.errors import UserError

    def first_stage(*args):
        raise AssertionError("make-shapes ran")
    monkeypatch.setattr(demo, "_dataset", first_stage)
    work = tmp_path / "work"
    cfg = DemoConfig(workdir=str(work), num_images=20, epochs=1, scst_after=1)
    demo.check_workdir(cfg)
    heat = work / "heatmaps"
    os.makedirs(heat / "sub")
    (heat / "shape_00001.png").write_bytes(heatmap_png())
    (heat / "mine.txt").write_text("x")
    (heat / "sub" / "keep.txt").write_text("y")
    with pytest.raises(UserError) as e:
        demo.run_demo(cfg, log=lambda m: None)
    assert str(e.value) == (
        f"--workdir {work}: {heat} holds files the demo did not draw (mine.txt, sub/); a rerun "
        f"redraws the demo's heatmaps there and deletes only those it drew, so it leaves "
        f"these alone and stops here, nothing deleted: move them out of {heat}, or choose "
        f"another --workdir")
    assert "--cache" not in str(e.value) and "--run" not in str(e.value)
    assert sorted(os.listdir(heat)) == ["mine.txt", "shape_00001.png", "sub"]
    assert (heat / "sub" / "keep.txt").read_text() == "y"
    # the demo's own heatmaps alone (and its lock) are no reason to stop
    os.remove(heat / "mine.txt")
    os.remove(heat / "sub" / "keep.txt")
    os.rmdir(heat / "sub")
    (heat / ".caption-attn.lock").write_text("")
    with pytest.raises(AssertionError, match="make-shapes ran"):
        demo.run_demo(cfg, log=lambda m: None)


def _digest(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()[:16]


def test_images_changed_since_the_run_trained_are_refused_before_extraction(tmp_path,
                                                                           monkeypatch):
    """One image of WORKDIR/shapes/images changed: the rerun extracted it into the cache
    again, and only then train refused, saying `Point --cache at the run's cache`, a flag the
    demo has not."""
    from caption_attn import extract
    from caption_attn.errors import UserError
    work = tmp_path / "work"
    cfg = DemoConfig(workdir=str(work), num_images=20, epochs=1, scst_after=1)
    demo.check_workdir(cfg)
    images = work / "shapes" / "images"
    os.makedirs(images)
    os.makedirs(work / "models" / "shapes")
    (images / "shape_00.png").write_bytes(b"one")
    (images / "shape_01.png").write_bytes(b"two")
    (work / "models" / "shapes" / "split.json").write_text(json.dumps(
        {"image_digests": {"shape_00.png": _digest(b"one"), "shape_01.png": _digest(b"two")}}))
    monkeypatch.setattr(demo, "_dataset", lambda *a: {"images_dir": str(images),
                                                      "captions": "c"})

    def extract_features(*args, **kwargs):
        raise AssertionError("extracted")
    monkeypatch.setattr(extract, "extract_features", extract_features)
    os.utime(images / "shape_00.png", (1, 1))           # touched, the same bytes: not changed
    with pytest.raises(AssertionError, match="extracted"):
        demo.run_demo(cfg, log=lambda m: None)
    (images / "shape_01.png").write_bytes(b"edited")
    with pytest.raises(UserError) as e:
        demo.run_demo(cfg, log=lambda m: None)
    assert str(e.value) == (
        f"--workdir {work}: 1 of the 2 images the demo trained on changed in {images} since "
        f"(shape_01.png): the demo would extract their features again over those the run "
        f"was trained on; add --fresh to render the dataset again and start the demo over, "
        f"or choose another --workdir")


def test_trains_refusal_of_other_images_names_the_demos_flags(tmp_path, monkeypatch):
    """If the cache already holds the changed images' features (an earlier rerun extracted
    them), train's refusal is said in the demo's terms: no --cache, --run or a new run."""
    from caption_attn import train
    from caption_attn.errors import UserError
    from caption_attn.run import RunFolder
    run = tmp_path / "run"
    os.makedirs(run)
    (run / "split.json").write_text(json.dumps({"image_digests": {"a.png": "1" * 16}}))
    with pytest.raises(UserError) as refused:
        RunFolder(str(run)).check_image_digests("W/features_cache", ["a.png"],
                                                {"a.png": "2" * 16}, "W/shapes/images")
    assert "Point --cache" in str(refused.value)       # train's own advice stays as it was

    def refuse(cfg, run, **kwargs):
        raise refused.value
    monkeypatch.setattr(train, "train", refuse)
    with pytest.raises(UserError) as e:
        demo.train_stage(DemoConfig(workdir="W", epochs=2, scst_after=2),
                         {"captions": "c.json", "images_dir": "W/shapes/images"},
                         {"cache": "W/features_cache", "run": "W/models/shapes"}, print)
    message = str(e.value)
    assert message == ("--workdir W: feature cache W/features_cache: the features of 1 of "
                       "the 1 images were extracted from other images than the run's of the "
                       "same name (e.g. 'a.png', from W/shapes/images): images the demo "
                       "trained on changed since; add --fresh to render the dataset again and "
                       "start the demo over, or choose another --workdir")
    for flag in ("--cache", "--run", "train a new run", "another dataset"):
        assert flag not in message
    assert e.value.exit_code == refused.value.exit_code


@pytest.mark.parametrize("stage", ["extract", "train", "evaluate", "caption"])
def test_out_of_memory_in_a_stage_is_said_in_the_demos_flags(tmp_path, monkeypatch, stage):
    """A stage's out of memory named the flags of its own command: extract-features' and
    evaluate's --batch-size (the demo's is training's), train's --memory-cache-gb (the demo
    has none) and a rerun that the demo refuses for its changed settings. It names what the
    stage did and the command that does it in smaller batches."""
    from caption_attn import evaluate, extract, train
    from caption_attn.errors import OutOfMemory
    work = tmp_path / "work"
    cfg = DemoConfig(workdir=str(work), num_images=20, epochs=1, scst_after=1)
    images = str(work / "shapes" / "images")
    monkeypatch.setattr(demo, "_dataset", lambda *a: {"images_dir": images, "captions": "c"})
    monkeypatch.setattr(demo, "check_images_unchanged", lambda *a: None)
    monkeypatch.setattr(demo, "backbone_precision", lambda *a: "float32")
    said = "the stage's own message, naming its own flags"

    def fails_in(name, result):
        def call(*args, **kwargs):
            if name == stage:
                raise OutOfMemory(said, "OOM when allocating tensor with shape[64,512]")
            return result
        return call
    monkeypatch.setattr(extract, "extract_features", fails_in("extract", {}))
    monkeypatch.setattr(extract, "format_summary", lambda summary: "extracted")
    monkeypatch.setattr(train, "train", fails_in("train", {}))
    monkeypatch.setattr(train, "format_summary", lambda summary: "trained")
    monkeypatch.setattr(evaluate, "evaluate_run", fails_in("evaluate", {}))
    monkeypatch.setattr(demo, "caption_test_images", fails_in("caption", {}))
    with pytest.raises(OutOfMemory) as e:
        demo.run_demo(cfg, log=lambda line: None)
    message, run = str(e.value), os.path.join(str(work), "models", "shapes")
    assert e.value.exit_code == 1 and said not in message
    assert message.startswith(f"--workdir {work}: out of memory ")
    assert message.count("(OOM when allocating tensor with shape[64,512]); ") == 1
    assert "--memory-cache-gb" not in message
    assert message.endswith({
        "extract": f"extract the rest in smaller batches, then rerun the demo (it keeps the "
                   f"features written): caption-attn extract-features --images {images} --cache "
                   f"{work / 'features_cache'} --weights random --seed 0 --dtype float16 "
                   f"--precision float32 --batch-size 8",
        "train": "rerun the demo with --fresh and a lower --batch-size (now 32), or smaller "
                 "--units / --embedding-dim (now 256 / 128)",
        "evaluate": f"the model is trained: evaluate it in smaller batches: caption-attn "
                    f"evaluate --run {run} --beam 3 --batch-size 16",
        "caption": f"the model is trained and evaluated: caption in smaller batches: "
                   f"caption-attn caption --run {run} --beam 3 --batch-size 16 "
                   f"--plot-attention {work / 'heatmaps'} IMAGE..."}[stage])


def test_the_extract_command_of_the_demos_out_of_memory_makes_the_demos_cache(tmp_path):
    """The command the demo's extraction out of memory prints is accepted by extract-features
    and asks for the very cache the demo extracts (only the batch smaller): the rerun demo
    keeps its features."""
    import shlex

    from caption_attn import cli
    from caption_attn.config import ExtractConfig
    from caption_attn.errors import OutOfMemory
    cfg = DemoConfig(workdir=str(tmp_path), seed=4)
    images, paths = tmp_path / "shapes" / "images", {"cache": str(tmp_path / "features cache"),
                                                     "run": "R"}
    os.makedirs(images)
    advice = demo._out_of_memory_advice(cfg, "extract", {"images_dir": str(images)}, paths,
                                        "bfloat16")
    with pytest.raises(OutOfMemory) as e, advice:
        raise OutOfMemory("extract's", "OOM")
    command = str(e.value).split(": ")[-1]
    words = shlex.split(command)
    assert words[:2] == ["caption-attn", "extract-features"]
    args = cli.build_parser().parse_args(words[1:])
    cli.check_flags(args)
    asked = cli.config_of(args, ExtractConfig)
    wanted = dataclasses.replace(demo.extract_config(cfg, paths, "bfloat16"), batch_size=8)
    assert (args.images, args.captions, asked) == (str(images), None, wanted)


def test_a_model_too_large_for_memory_is_refused_in_the_demos_flags(tmp_path, monkeypatch):
    """`demo --units 60000` was told to lower --vocab-size, a flag the demo has not."""
    from caption_attn import train
    from caption_attn.errors import UserError
    monkeypatch.setattr(train, "machine_memory", lambda: 24 * 2**30)
    work = tmp_path / "work"
    with pytest.raises(UserError) as e:
        demo.run_demo(DemoConfig(workdir=str(work), units=60000), log=lambda line: None)
    message = str(e.value)
    assert message.startswith("--units 60000 --embedding-dim 128 (a vocabulary of up to ")
    assert message.endswith("lower --units / --embedding-dim (the demo's defaults: 256 / 128)")
    assert "--vocab-size" not in message and not work.exists()
