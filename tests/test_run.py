"""The run folder: paths, and clear refusals for a damaged or missing best model."""

import json
import os
import zipfile

import pytest

from caption_attn.errors import UserError
from caption_attn.run import RunFolder, check_folder_writable


def test_paths_and_eval_outputs(tmp_path):
    run = RunFolder(str(tmp_path / "r"))
    assert run.best_model.endswith(os.path.join("r", "best.keras"))
    assert run.attention_epoch(3).endswith(os.path.join("attention", "epoch_3"))
    assert run.eval_outputs("val")[0].endswith(os.path.join("eval", "val_metrics.json"))
    assert run.eval_outputs("val", "x/m_metrics.json") == ("x/m_metrics.json",
                                                           "x/m_results.json")
    with pytest.raises(UserError, match="--run must name a folder"):
        RunFolder(" ")


def test_not_a_run(tmp_path):
    with pytest.raises(UserError, match="not a training run"):
        RunFolder(str(tmp_path)).load_config()


@pytest.mark.parametrize("command", ["caption", "evaluate", "export"])
def test_a_run_flag_that_names_no_run_is_named_as_the_flag(tmp_path, capsys, command):
    # `caption --run nope IMG` said "nope: not a training run": not which flag was wrong
    from caption_attn.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "x.png").write_bytes(b"")
    extra = {"caption": [str(tmp_path / "x.png")], "evaluate": [],
             "export": ["--out", str(tmp_path / "out")]}[command]
    # a file given as the run (its best.keras): evaluate told of its default output folder
    # inside that file and to pass --out FILE, which then met this refusal
    for name, why in (("nope", "no such folder"), ("empty", "no config.json"),
                      ("x.png", "a file, not a folder")):
        run = str(tmp_path / name)
        assert main([command, "--run", run, *extra]) == 2
        assert capsys.readouterr().err == (
            f"caption-attn {command}: error: --run {run}: not a training run ({why}); train "
            f"one with `caption-attn train --run {run} ...`\n")


def test_truncated_best_model_names_the_file_and_the_recovery(run_copy):
    with open(run_copy.best_model, "r+b") as f:
        f.truncate(os.path.getsize(run_copy.best_model) // 2)
    with pytest.raises(UserError) as e:
        run_copy.load_best_model()
    message = str(e.value)
    assert run_copy.best_model in message and "damaged or truncated" in message
    assert "caption-attn train" in message and "best.weights.h5" in message


def test_missing_best_model_with_kept_weights_says_how_to_rewrite_it(run_copy):
    os.remove(run_copy.best_model)
    open(run_copy.best_weights, "wb").close()
    with pytest.raises(UserError, match=r"best\.keras: missing; rerun `caption-attn train"):
        run_copy.load_best_model()


def test_best_model_of_an_older_format_is_refused(run_copy):
    with zipfile.ZipFile(run_copy.best_model) as z:
        members = {n: z.read(n) for n in z.namelist()}
    config = json.loads(members["config.json"])
    del config["config"]["model_format"]                      # as caption_attn 0.1 wrote it
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(run_copy.best_model, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(UserError, match=r"best\.keras: the saved model has model format 1"):
        run_copy.load_best_model()


def test_damaged_config_names_the_file(run_copy):
    with open(run_copy.config, "w") as f:
        f.write('{"model": {"units": 0}}')
    with pytest.raises(UserError, match=r"config\.json: .*--units"):
        run_copy.load_config()


def test_writable_check_names_the_culprit(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_folder_writable(str(tmp_path / "file" / "sub"), "--out")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):           # root ignores permissions
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(UserError, match="is not writable"):
            check_folder_writable(str(locked / "new"), "--out")
    finally:
        os.chmod(locked, 0o700)
    check_folder_writable(str(tmp_path / "new" / "deeper"), "--out")


@pytest.mark.parametrize("lost", ["split.json", "vocab.json"])
def test_a_trained_run_that_lost_its_split_or_vocabulary_is_refused(tmp_path, lost):
    """Without split.json a resume rebuilt the split and recorded today's cache identity and
    caption data as the run's own: a model trained on other features (or other val images)
    went on training, told nothing."""
    from caption_attn.config import RunConfig
    run = RunFolder(str(tmp_path / "run"))
    os.makedirs(run.checkpoints)
    cfg = RunConfig(captions="captions.json", cache="cache")
    cfg.save(run.config)
    for name in ("split.json", "vocab.json"):
        (tmp_path / "run" / name).write_text("{}")
    assert run.reopen_notes(cfg) == []                      # all there: nothing to say
    os.remove(run.file(lost))
    assert run.reopen_notes(cfg) == []                      # not trained yet: remade freely
    (tmp_path / "run" / "checkpoints" / "checkpoint").write_text("x")
    with pytest.raises(UserError, match=rf"{lost}: missing, but .* has trained "
                                        rf"\(checkpoints\).*add --fresh"):
        run.reopen_notes(cfg)


@pytest.mark.parametrize("trained", ["checkpoints/ckpt-20.index", "history.json",
                                     "best.keras"])
def test_a_trained_run_that_lost_its_config_is_refused(tmp_path, trained):
    """Without config.json a resume took today's flags for the run's: --dropout 0.1
    --max-length 5 trained on from the checkpoint of a run made with others (refused while
    config.json was there), exit 0, and config.json then recorded them for all its epochs."""
    from caption_attn.config import RunConfig
    run = RunFolder(str(tmp_path / "run"))
    os.makedirs(run.checkpoints)
    cfg = RunConfig(captions="captions.json", cache="cache")
    assert run.reopen_notes(cfg) == []                      # nothing trained: a new run
    (tmp_path / "run" / trained).write_text("[]")
    with pytest.raises(UserError, match=rf"^{run.config}: missing, but {run.path} has trained "
                                        rf"\({os.path.basename(trained.split('/')[0])}\); "
                                        rf"it records the data, vocabulary and model settings "
                                        rf".* restore it, use another --run, or add --fresh "
                                        rf"to start this run over$"):
        run.reopen_notes(cfg)


def test_a_run_inside_the_images_or_inside_another_runs_folders_is_refused(tmp_path):
    """`--run images/run` was accepted: its attention/epoch_K/*.png heatmaps were then taken
    for dataset images (extract-features extracted them, `caption images` captioned them).
    `--run other/checkpoints/inner` too: `train --run other --fresh` then deleted it with
    other's own folders. Both refused before anything is written; a run beside another one
    (models/a, models/b) or in a folder of its own inside one (other/trials/b) is fine."""
    images, other = tmp_path / "images", RunFolder(str(tmp_path / "other"))
    os.makedirs(images)
    os.makedirs(other.checkpoints)
    (tmp_path / "other" / "config.json").write_text("{}")
    project = tmp_path / "project"      # a project's config.json beside its logs/: no run
    os.makedirs(project / "logs")
    (project / "config.json").write_text("{}")
    RunFolder(str(project / "logs" / "run")).check_writable("cache")
    (tmp_path / "other" / "vocab.json").write_text("{}")
    for path, images_dirs in ((images / "run", [str(images)]),
                              (images / "a" / "run", [None, str(images)])):
        with pytest.raises(UserError, match=rf"^--run {path}: inside the images folder "
                                            rf"{images} \(of the dataset, or one the feature "
                                            rf"cache was extracted from\): its attention "
                                            rf"heatmaps \(PNG files\) would be taken for "
                                            rf"images of the dataset"):
            RunFolder(str(path)).check_writable("cache", images_dirs)
    for own in ("checkpoints", "attention", "eval"):
        inner = tmp_path / "other" / own / "inner"
        outer = os.path.realpath(tmp_path / "other")
        with pytest.raises(UserError, match=rf"^--run {inner}: inside {own}/ of the run "
                                            rf"{outer}, which that run manages \(its --fresh "
                                            rf"deletes it\)"):
            RunFolder(str(inner)).check_writable("cache", [str(images)])
    assert not (tmp_path / "other" / "eval").exists() and not (images / "run").exists()
    for fine in (tmp_path / "models" / "b", tmp_path / "other" / "trials" / "b"):
        RunFolder(str(fine)).check_writable("cache", [str(images), None])


@pytest.mark.parametrize("place", ["logs", "logs/train", "attention",
                                   "attention/epoch_4", "checkpoints"])
def test_a_file_where_train_keeps_a_folder_is_refused_before_anything_runs(tmp_path, place):
    """logs/ as a file ended train in a TensorFlow traceback once the data was loaded, and
    attention/epoch_N as a file failed only after that epoch had trained ("File exists ...
    free space (or fix the folder)")."""
    run = RunFolder(str(tmp_path / "run"))
    path = tmp_path / "run" / place
    os.makedirs(path.parent, exist_ok=True)
    path.write_text("x")
    with pytest.raises(UserError, match=rf"^--run {run.path}: {path} is a file, where train "
                                        rf"keeps its {place}/ folder; move that file away"):
        run.check_writable("cache")
    path.unlink()
    (tmp_path / "run" / "attention").mkdir(exist_ok=True)
    (tmp_path / "run" / "attention" / "epoch_notes.txt").write_text("x")   # not train's name
    (tmp_path / "run" / "config.json").write_text("{}")   # (a run: no folder of others)
    run.check_writable("cache")


def test_a_disk_without_room_for_the_best_model_is_refused_before_h5py_writes(tmp_path,
                                                                               monkeypatch):
    # Keras left its h5py file open when a full disk failed the write, and h5py then crashed
    # the interpreter at exit: a segmentation fault (exit 139) after train's own one-line
    # error. A disk without room for the weights is now a full disk's OSError up front.
    import collections
    import errno

    from caption_attn import fileio
    from caption_attn.model import ShowAttendTell
    model = ShowAttendTell(50, 8, 16)
    weights = sum(int(v.numpy().nbytes) for v in model.weights)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: usage(10 ** 9, 0, 2 ** 20))
    run = RunFolder(str(tmp_path / "run"))
    with pytest.raises(OSError) as e:
        run.save_best(model, 1, "val_loss", 1.0)
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, run.best_weights)
    assert e.value.strerror == (f"No space left on device ({(weights * 1.1 + 2 ** 20) / 1e6:.0f}"
                                f" MB needed, 1 MB free)")
    assert os.listdir(run.path) == []                          # nothing half-written
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: usage(10 ** 9, 0, 10 ** 8))
    run.save_best(model, 1, "val_loss", 1.0)                   # room: written as before
    assert sorted(os.listdir(run.path)) == ["best.json", "best.keras", "best.weights.h5"]


FIX = "restore the split.json train wrote, or train the run again with --fresh"


@pytest.mark.parametrize("splits, problem", [
    ({"train": ["a.png"], "validation": ["b.png"], "test": ["c.png"]},
     "its splits are test, train, validation, not train, val and test"),
    ({"train": ["a.png"], "test": ["c.png"]}, "its splits are test, train, not train, val and "
                                              "test"),
    ({"train": ["a.png"], "val": "b.png", "test": []},
     "splits.val must be a list of image keys (strings)"),
    ({"train": ["a.png", "d.png", "a.png"], "val": ["b.png"], "test": []},
     "splits.train lists 'a.png' twice"),
    ({"train": ["a.png", "d.png"], "val": ["b.png"], "test": ["c.png", "d.png"]},
     "1 image(s) are in both splits.train and splits.test (e.g. 'd.png'): an image must be in "
     "one split (one trained on and scored would flatter the metrics)")])
def test_a_split_json_that_is_not_three_disjoint_splits_is_refused(tmp_path, splits, problem):
    """Only the types were checked: an image added to two splits (or moved from train to test)
    resumed silently, training on images it scores; a missing `val` crashed with KeyError."""
    run = RunFolder(str(tmp_path / "run"))
    os.makedirs(run.path)
    with open(run.split, "w") as f:
        json.dump({"splits": splits}, f)
    with pytest.raises(UserError) as e:
        run.load_splits()
    assert str(e.value) == f"{run.split}: {problem}; {FIX}"


def test_splits_other_than_the_recorded_ones_are_refused(tmp_path):
    """A consistent edit (an image moved from train to test) is caught by the digest that
    split.json records of its splits, as vocab.json's by vocab_sha256."""
    from caption_attn.run import splits_digest
    splits = {"train": ["a.png", "d.png"], "val": ["b.png"], "test": ["c.png"]}
    for name, recorded in (("old", None), ("new", splits_digest(splits))):
        run = RunFolder(str(tmp_path / name))
        os.makedirs(run.path)
        with open(run.split, "w") as f:    # a run made before the digest: not checked
            json.dump({"splits": splits, "splits_sha256": recorded}, f)
        assert run.load_splits() == splits
    moved = {"train": ["a.png"], "val": ["b.png"], "test": ["c.png", "d.png"]}
    run = RunFolder(str(tmp_path / "moved"))
    os.makedirs(run.path)
    with open(run.split, "w") as f:
        json.dump({"splits": moved, "splits_sha256": splits_digest(splits)}, f)
    with pytest.raises(UserError) as e:
        run.load_splits()
    assert str(e.value) == (f"{run.split}: its splits are not the ones recorded when the run "
                            f"started (splits_sha256 differs: edited by hand?); {FIX}")


def test_data_vocab_or_model_settings_edited_in_config_json_are_refused(run_copy):
    """`"feature_norm": false` edited into config.json and resumed with --no-feature-norm
    trained on with the checkpoint's standardisation while config.json said none: the flags
    matched the file, and the file was taken at its word. split.json records a digest of
    its data, vocab and model settings (runs made before it are not checked)."""
    assert run_copy.reopen_notes(run_copy.load_config()) == []
    with open(run_copy.config) as f:
        edited = json.load(f)
    edited["model"]["feature_norm"] = False
    with open(run_copy.config, "w") as f:
        json.dump(edited, f)
    cfg = run_copy.load_config()
    with pytest.raises(UserError, match=rf"^{run_copy.config}: its data, vocabulary or model "
                                        rf"settings are not the ones .*edited by hand\?.* "
                                        rf"--fresh"):
        run_copy.reopen_notes(cfg)
    with open(run_copy.split) as f:
        split = json.load(f)
    del split["settings_sha256"]                    # a run made before the digest
    with open(run_copy.split, "w") as f:
        json.dump(split, f)
    assert run_copy.reopen_notes(cfg) == []


def test_a_format_that_resolves_to_the_runs_is_not_a_changed_setting(run_copy):
    """`--format karpathy` on a run made with `--format auto` (split.json records the format
    auto found: karpathy) was refused as another data configuration; it reads the same file
    the same way. config.json keeps the run's own value (its digest is split.json's)."""
    import dataclasses
    saved = run_copy.load_config()
    assert saved.data.format == "auto"
    typed = dataclasses.replace(saved, data=dataclasses.replace(saved.data, format="karpathy"))
    assert run_copy.reopen_notes(typed) == []
    assert run_copy.with_recorded_format(typed) == saved
    other = dataclasses.replace(saved, data=dataclasses.replace(saved.data, format="coco"))
    with pytest.raises(UserError, match="data.format: 'auto' -> 'coco'"):
        run_copy.reopen_notes(other)


def _make(root, names, text="x"):
    for name in names:
        path = os.path.join(str(root), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def _listing(root) -> list:
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, dirs, files in os.walk(root) for n in dirs + files)


@pytest.mark.parametrize("names", [
    ["logs/server.log", "checkpoints/other_model.pt", "eval/results.csv"],
    [".git/HEAD"], ["attention/epoch_1/notes.txt"], ["logs/train/my.csv"]])
def test_a_folder_that_is_no_run_and_holds_anything_is_refused(tmp_path, names):
    """`train --run Q --fresh` on a folder with no config.json deleted the files of others in
    its logs/, checkpoints/ and eval/ (exit 0), and without --fresh mixed the run's files with
    them: entries named like the run's folders, and dotfiles (.git), were not looked into."""
    run = tmp_path / "Q"
    _make(run, names)
    before = _listing(run)
    with pytest.raises(UserError, match=r"not a run folder and not empty \(it holds ") as e:
        RunFolder(str(run)).check_writable(str(tmp_path / "cache"))
    assert names[0].split("/")[0] in str(e.value)
    assert _listing(run) == before


def test_what_a_first_train_stopped_before_config_json_left_is_no_foreign_file(tmp_path):
    run = tmp_path / "r"
    _make(run, [".train.lock", "logs/events.out.tfevents.1700000000.h.1.0-history.v2",
                "logs/train/events.out.tfevents.1700000000.h.1.v2", "vocab.json"])
    os.makedirs(run / "checkpoints")
    RunFolder(str(run)).check_writable(str(tmp_path / "cache"))


RUNS_OWN = [
    "config.json", "vocab.json", "split.json", "history.json", "best.keras", "best.json",
    "best.weights.h5", "cider_df.json", ".config.json.tmp.123.host",
    "checkpoints/checkpoint", "checkpoints/ckpt-3.index",
    "checkpoints/ckpt-3.data-00000-of-00001", "checkpoints/damaged-ckpt-2.index",
    "checkpoints/ckpt-4_temp/part-00000-of-00001.index",
    "checkpoints/checkpoint.tmp0123456789abcdef0123456789abcdef",
    "checkpoints/worker_1/ckpt-1.index", "checkpoints/worker_1/checkpoint",
    "logs/events.out.tfevents.1700000000.h.1.0-history.v2",
    "logs/train/events.out.tfevents.1700000000.h.2.v2",
    "logs/validation/events.out.tfevents.1700000000.h.2.v2",
    "attention/epoch_1/cat.png", "attention/epoch_12/.dog.png.tmp.9.host",
    "eval/test_metrics.json", "eval/test_results.json", "eval/.test_metrics.json.lock"]
FOREIGN_INSIDE = ["eval/mine.txt", "checkpoints/README", "checkpoints/other_model.pt",
                  "logs/server.log", "logs/train/notes.md", "attention/epoch_1/notes.txt",
                  "attention/mine.png", "attention/old/cat.png"]


def test_fresh_deletes_only_what_the_run_writes_and_says_what_it_kept(tmp_path):
    """--fresh deleted every file in logs/, checkpoints/, eval/ and attention/, the user's
    own among them (eval/mine.txt, checkpoints/README), though the README says other files
    are kept: only files named as the run's go, the others stay and are named."""
    run = tmp_path / "r"
    _make(run, RUNS_OWN + FOREIGN_INSIDE + ["notes.txt", ".git/HEAD"])
    # `evaluate --out RUN/eval/my.json` names its metrics file as it was told
    _make(run, ["eval/my.json"], json.dumps({"split": "val", "metrics_file": "x/eval/my.json",
                                              "results_file": "x/eval/my_results.json"}))
    _make(run, ["eval/my_results.json"], "[]")
    kept = RunFolder(str(run)).delete_previous()
    left = [p for p in _listing(run) if os.path.isfile(os.path.join(run, p))]
    assert left == sorted(FOREIGN_INSIDE + ["notes.txt", ".git/HEAD"])
    assert sorted(kept) == sorted(FOREIGN_INSIDE)   # (the folder's own files are not news)
    # folders emptied of the run's files go; those holding the user's stay
    assert not os.path.exists(run / "logs" / "validation")
    assert not os.path.exists(run / "attention" / "epoch_12")
    assert not os.path.exists(run / "checkpoints" / "worker_1")


def test_multi_worker_workers_share_the_training_lock_and_no_other_train_does(tmp_path):
    """A multi-worker run took no lock, so a `train` or `train --fresh` of its run folder (a
    shell on the chief's machine) trained beside it, or deleted its checkpoints. Its workers
    hold the lock shared: together, never with another `train`."""
    run = RunFolder(str(tmp_path / "run"))
    os.makedirs(run.path)
    lock = os.path.join(run.path, ".train.lock")
    busy = r"another `caption-attn train`.* is training this run now"
    with run.training_lock(shared=True):
        with run.training_lock(shared=True):        # another worker of the run, beside it
            with pytest.raises(UserError, match=busy):
                with run.training_lock():            # a single-process train
                    pass
        assert os.path.exists(lock)                  # the first worker holds it still
        with pytest.raises(UserError, match=busy):
            with run.training_lock():
                pass
    assert not os.path.exists(lock)                  # the last worker removed it
    with run.training_lock():                        # the other way round
        with pytest.raises(UserError, match=busy):
            with run.training_lock(shared=True):
                pass
        assert os.path.exists(lock)
    assert not os.path.exists(lock)
