import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest
from conftest import give_other_images, shapes_csv

from caption_attn import captioner as captioner_lib
from caption_attn import coco_metrics, evaluate
from caption_attn.cli import main
from caption_attn.config import DecodeConfig
from caption_attn.errors import UserError
from caption_attn.run import RunFolder, splits_digest


def _references(shapes_data, keys):
    with open(shapes_data["captions"]) as f:
        images = {i["filename"]: i for i in json.load(f)["images"]}
    return images, {k: [s["raw"] for s in images[k]["sentences"]] for k in keys}


def test_evaluate_run_writes_results_and_metrics(shapes_data, trained_run, tmp_path):
    out = str(tmp_path / "m.json")
    metrics = evaluate.evaluate_run(trained_run, "test", DecodeConfig(beam=2), out=out,
                                    progress=False, use_java=False)
    assert metrics["metrics_file"] == out and os.path.exists(out)
    assert metrics["results_file"] == str(tmp_path / "m_results.json")
    with open(metrics["results_file"]) as f:
        results = json.load(f)
    with open(os.path.join(trained_run, "split.json")) as f:
        test_keys = json.load(f)["splits"]["test"]
    images, refs = _references(shapes_data, test_keys)
    assert len(results) == len(test_keys) == metrics["images"]
    assert {r["image_id"] for r in results} == {images[k]["imgid"] for k in test_keys}
    assert all(set(r) == {"image_id", "caption"} for r in results)
    # the numbers are pycocoevalcap's on exactly these captions
    by_id = {images[k]["imgid"]: k for k in test_keys}
    hyps = {by_id[r["image_id"]]: r["caption"] for r in results}
    direct, _ = coco_metrics.coco_metrics(refs, hyps, use_java=False)
    for name, value in direct.items():
        assert metrics[name] == pytest.approx(value)
    for name in ("scene_accuracy", "grounding", "matched_words"):
        assert name in metrics
    assert 0.0 <= metrics["scene_accuracy"] <= 1.0
    with open(out) as f:
        assert json.load(f)["decode"] == {"method": "beam", "beam": 2, "length_penalty": 0.0,
                                          "max_length": 21}


def test_evaluate_from_a_cache_being_extracted_is_refused(trained_run, tmp_path):
    """The split's features may be missing or change under it: refused, writing nothing."""
    from caption_attn.feature_cache import using_features

    cache = RunFolder(trained_run).load_config().cache
    out = tmp_path / "m.json"
    with using_features(cache, writing=True):
        with pytest.raises(UserError, match=rf"^--cache {re.escape(cache)}: `caption-attn "
                                            rf"extract-features` \(pid {os.getpid()}: .*\) is "
                                            rf"writing into it now"):
            evaluate.evaluate_run(trained_run, "test", out=str(out), progress=False,
                                  use_java=False)
    assert not out.exists()


def _held(path, shared=False):
    """The lock file `path` flock'ed by this test as another process would (a file opened
    apart conflicts with the command's own opening of it)."""
    import fcntl

    f = open(path, "a+")
    fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    return f


def test_evaluate_while_train_fresh_deletes_the_run_is_refused(run_copy, tmp_path):
    """`train --fresh` deleted the run's files while evaluate read them, and evaluate then
    wrote the deleted model's metrics into the fresh run: each refuses the other now."""
    out = tmp_path / "m.json"
    with _held(os.path.join(run_copy.path, ".reading.lock")):   # train --fresh deleting
        with pytest.raises(UserError, match=rf"^--run {re.escape(run_copy.path)}: "
                                            rf"`caption-attn train --fresh` \(pid "
                                            rf"{os.getpid()}: .*\) is deleting this run's "
                                            rf"files now; .* then evaluate again$"):
            evaluate.evaluate_run(run_copy.path, "test", out=str(out), progress=False,
                                  use_java=False)
    assert not out.exists()


def test_a_second_evaluate_to_the_same_out_is_refused_before_decoding(run_copy, tmp_path,
                                                                    monkeypatch):
    """Two evaluates with one --out paired one's metrics with the other's captions (or the
    second crashed on the file the first replaced, after decoding)."""
    out = tmp_path / "m.json"
    decoded = []
    monkeypatch.setattr(evaluate, "_decode", lambda *a: decoded.append(1))
    with _held(tmp_path / ".m.json.lock"):   # the first evaluate's
        with pytest.raises(UserError, match=rf"^--out {re.escape(str(out))}: another "
                                            rf"`caption-attn evaluate` \(pid {os.getpid()}"
                                            rf": .*\) is writing it now; .* choose another "
                                            rf"--out$"):
            evaluate.evaluate_run(run_copy.path, "test", out=str(out), progress=False,
                                  use_java=False)
    assert not decoded and not out.exists()
    # the default output: its own words
    with _held(os.path.join(run_copy.path, "eval", ".test_metrics.json.lock")
               if os.makedirs(os.path.join(run_copy.path, "eval"), exist_ok=True) is None
               else None):
        with pytest.raises(UserError, match=r"^the default output .*test_metrics.json: "
                                            r"another `caption-attn evaluate`.* pass --out "
                                            r"FILE$"):
            evaluate.evaluate_run(run_copy.path, "test", progress=False, use_java=False)
    assert not decoded


def test_evaluate_of_a_folder_that_is_no_run_writes_nothing_there(tmp_path):
    """The lock beside the default output must not make RUN/eval/ in a folder that is no
    run before evaluate says so."""
    with pytest.raises(UserError, match="not a training run"):
        evaluate.evaluate_run(str(tmp_path), "test", progress=False, use_java=False)
    assert os.listdir(tmp_path) == []


def test_the_metrics_record_every_decoding_setting(trained_run, tmp_path, monkeypatch):
    # --max-length and the sampling flags change the captions but were not in the metrics
    # JSON: a run scored with --max-length 3 or --sample --seed 7 looked like the default.
    monkeypatch.setattr(evaluate, "_decode", lambda captioner, found, progress: {
        k: captioner_lib.Caption(["a"], 0.0, np.zeros((2, 64))) for k in found.keys})
    cfg = DecodeConfig(sample=True, seed=7, top_k=2, temperature=0.5, max_length=3)
    metrics = evaluate.evaluate_run(trained_run, "val", cfg, out=str(tmp_path / "m.json"),
                                    progress=False, use_java=False)
    # (not the beam width and length penalty, which sampling does not use)
    assert metrics["decode"] == {"method": "sample", "max_length": 3, "temperature": 0.5,
                                 "top_k": 2, "seed": 7}


def test_repeated_csv_rows_of_the_references_are_said(shapes_data, trained_run, tmp_path,
                                                      monkeypatch):
    """The references from a CSV caption file (Kaggle's Flickr8k captions.txt) whose rows
    repeat exactly: read once, which two annotators' identical captions are too; the
    metrics' notes say so."""
    from caption_attn import data as data_lib
    monkeypatch.setattr(evaluate, "_decode", lambda captioner, found, progress: {
        k: captioner_lib.Caption(["a"], 0.0, np.zeros((2, 64))) for k in found.keys})
    val = set(RunFolder(trained_run).load_splits()["val"])
    path = tmp_path / "captions.txt"
    shapes_csv(shapes_data, path, lambda rows: [(i, c) for i, c in rows if i in val][:2]
               + [(i, c) for i, c in rows if i not in val][:1])
    metrics = evaluate.evaluate_run(trained_run, "val", DecodeConfig(),
                                    out=str(tmp_path / "m.json"), progress=False,
                                    use_java=False, captions=str(path))
    # of the split scored: its images' rows (the whole file's are train's and inspect's)
    captions = data_lib.load_captions(str(path))
    note = captions.repeated_note(val, " for images of the val split")
    assert note.startswith(f"2 rows of {path} for images of the val split repeat an earlier")
    assert note in metrics["notes"], metrics["notes"]
    assert captions.repeated_note().startswith(f"3 rows of {path} repeat an earlier row")


def test_greedy_metrics_record_no_length_penalty(trained_run, tmp_path, monkeypatch):
    # --beam 1 (greedy) recorded "length_penalty": 0.0, a setting greedy decoding never uses
    monkeypatch.setattr(evaluate, "_decode", lambda captioner, found, progress: {
        k: captioner_lib.Caption(["a"], 0.0, np.zeros((2, 64))) for k in found.keys})
    metrics = evaluate.evaluate_run(trained_run, "val", DecodeConfig(beam=1, max_length=5),
                                    out=str(tmp_path / "m.json"), progress=False,
                                    use_java=False)
    assert metrics["decode"] == {"method": "greedy", "beam": 1, "max_length": 5}
    with open(tmp_path / "m.json") as f:
        assert json.load(f)["decode"] == metrics["decode"]


def test_the_metrics_name_the_best_model_scored_and_a_replaced_one_is_refused(
        run_copy, tmp_path, monkeypatch, capsys, no_java):
    # After a resumed `train` saved a new best, eval/test_metrics.json of the old best model
    # could not be told from a current one: it did not say which model it scored.
    monkeypatch.setattr(evaluate, "_decode", lambda captioner, found, progress: {
        k: captioner_lib.Caption(["a"], 0.0, np.zeros((2, 64))) for k in found.keys})
    with open(run_copy.best_info) as f:
        best = json.load(f)
    out = str(tmp_path / "m.json")
    assert main(["evaluate", "--run", run_copy.path, "--out", out]) == 0
    with open(out) as f:
        assert json.load(f)["best"] == best
    assert f"best model of epoch {best['epoch']}" in capsys.readouterr().out
    # train saving a new best while evaluate loads the model: refused, not scored as either
    real = captioner_lib.Captioner.from_run

    def from_run_during_a_new_best(*args, **kwargs):
        loaded = real(*args, **kwargs)
        with open(run_copy.best_info, "w") as f:
            json.dump({**best, "epoch": best["epoch"] + 1}, f)
        return loaded
    monkeypatch.setattr(captioner_lib.Captioner, "from_run", from_run_during_a_new_best)
    assert main(["evaluate", "--run", run_copy.path, "--out", out]) == 2
    assert "best.keras: replaced while evaluate read it" in capsys.readouterr().err


def test_cli_evaluate_header_says_1_image_not_1_images(trained_run, capsys, monkeypatch,
                                                       tmp_path, no_java):
    monkeypatch.setattr(evaluate, "_decode", lambda captioner, found, progress: {
        k: captioner_lib.Caption(["a"], 0.0, np.zeros((2, 64))) for k in found.keys[:1]})
    real = evaluate._load_split

    def one_image(*args, **kwargs):
        found = real(*args, **kwargs)
        return dataclasses.replace(found, keys=found.keys[:1], places=[0])
    monkeypatch.setattr(evaluate, "_load_split", one_image)
    assert main(["evaluate", "--run", trained_run, "--split", "val", "--beam", "1", "--out",
                 str(tmp_path / "m.json")]) == 0
    assert "val split, 1 image, greedy decoding" in capsys.readouterr().out


def test_cli_evaluate_prints_the_table(trained_run, capsys, no_java):
    assert main(["evaluate", "--run", trained_run, "--split", "val", "--beam", "1"]) == 0
    captured = capsys.readouterr()
    for name in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "scene accuracy"):
        assert name in captured.out
    assert "METEOR needs Java" in captured.err
    assert os.path.exists(os.path.join(trained_run, "eval", "val_metrics.json"))
    assert os.path.exists(os.path.join(trained_run, "eval", "val_results.json"))


def test_an_out_that_cannot_be_written_is_refused_before_decoding(trained_run, capsys,
                                                                  monkeypatch):
    # /proc refuses new files even to root, for whom os.access says yes to everything
    monkeypatch.setattr(evaluate, "_decode", None)                 # must not be reached
    assert main(["evaluate", "--run", trained_run, "--out", "/proc/m.json"]) == 2
    err = capsys.readouterr().err
    # --out as given, and the folder that cannot be written (it said "--out /proc: ...")
    assert "error: --out /proc/m.json: cannot create files in /proc (" in err
    assert ".tmp" not in err
    assert main(["evaluate", "--run", trained_run, "--out", "/proc/new/m.json"]) == 2
    err = capsys.readouterr().err
    assert "error: --out /proc/new/m.json: cannot create files in /proc (" in err
    assert "), where its folder /proc/new would be made" in err


def test_an_out_whose_results_file_is_a_folder_is_refused_naming_both(trained_run, tmp_path,
                                                                      capsys):
    (tmp_path / "m_results.json").mkdir()
    out = str(tmp_path / "m.json")
    assert main(["evaluate", "--run", trained_run, "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: its captions go to {tmp_path / 'm_results.json'}, which is a " \
        "folder" in err and "m_results.json/" not in err


@pytest.mark.parametrize("name", ["eval", "cider_df.json", "logs"])
def test_an_out_on_a_path_the_run_uses_is_refused_even_before_that_exists(
        run_copy, capsys, monkeypatch, name):
    # `--out RUN/eval` wrote the metrics as a file where eval/ goes (each later evaluate
    # without --out then failed); `--out RUN/cider_df.json` left a file that a later
    # self-critical train reads as its document frequencies
    monkeypatch.setattr(evaluate, "_decode", None)                 # must not be reached
    import shutil
    path = os.path.join(run_copy.path, name)
    shutil.rmtree(path, ignore_errors=True)
    assert main(["evaluate", "--run", run_copy.path, "--out", path]) == 2
    err = capsys.readouterr().err
    assert f"--out {path}: the run's own {name} (`train` and `evaluate` use that path)" in err
    assert not os.path.exists(path)


def test_an_out_naming_a_folder_train_manages_is_told_the_run_uses_it(run_copy, capsys):
    # it was told "is a folder; give the metrics JSON file to write, e.g. RUN/logs/
    # test_metrics.json", a path refused in turn
    path = os.path.join(run_copy.path, "logs")
    assert os.path.isdir(path)
    assert main(["evaluate", "--run", run_copy.path, "--out", path]) == 2
    assert f"--out {path}: the run's own logs" in capsys.readouterr().err


@pytest.mark.parametrize("where", [("attention", "epoch_2"), ("checkpoints",), ("logs",)])
def test_an_out_inside_a_folder_train_manages_is_refused(run_copy, capsys, monkeypatch,
                                                         where):
    # a resume deletes the heatmap folders of the epochs it trains again, --fresh them all
    monkeypatch.setattr(evaluate, "_decode", None)                 # must not be reached
    out = os.path.join(run_copy.path, *where, "m.json")
    assert main(["evaluate", "--run", run_copy.path, "--out", out]) == 2
    assert f"--out {out}: inside the run's {where[0]}/, which `train` manages" in \
        capsys.readouterr().err
    assert not os.path.exists(out)


def test_a_default_output_in_the_way_is_named_as_such_not_as_an_out_never_given(
        run_copy, capsys, monkeypatch):
    # Without --out, a file in the way of RUN/eval/test_metrics.json (or a file named
    # RUN/eval, e.g. left by `--out RUN/eval`) was reported as "--out ...: ...; choose
    # another --out", a flag the user never gave.
    monkeypatch.setattr(evaluate, "_decode", None)                 # must not be reached
    eval_dir = os.path.join(run_copy.path, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    metrics = os.path.join(eval_dir, "test_metrics.json")
    with open(metrics, "w") as f:
        f.write("my notes")
    assert main(["evaluate", "--run", run_copy.path]) == 2
    err = capsys.readouterr().err
    assert f"the default output {metrics}: {metrics}, which exists and was not written" in err
    assert "pass --out FILE (or remove that file)" in err and "--out " + metrics not in err
    import shutil
    shutil.rmtree(eval_dir)
    open(eval_dir, "w").close()
    assert main(["evaluate", "--run", run_copy.path]) == 2
    err = capsys.readouterr().err
    assert f"the default output folder {eval_dir}: {os.path.abspath(eval_dir)} is a file, " \
        "not a folder; pass --out FILE" in err


@pytest.mark.parametrize("target", ["config", "captions", "manifest", "results_of",
                                    "coco_results_of", "empty_results_of"])
def test_an_out_that_would_overwrite_another_file_is_refused_before_decoding(
        shapes_data, run_copy, tmp_path, capsys, monkeypatch, target):
    """--out (or the results file next to it) over the run's config.json, the caption file,
    the cache's manifest or any file that evaluate did not write: refused, nothing written;
    evaluate wrote them with exit 0 before."""
    import shutil
    monkeypatch.setattr(evaluate, "_decode", None)                 # must not be reached
    run = run_copy.path
    captions = str(tmp_path / "captions.json")
    shutil.copy(shapes_data["captions"], captions)
    manifest = os.path.join(shapes_data["cache"], "manifest.json")
    notes = tmp_path / "notes_results.json"                         # results of --out notes.json
    # another tool's COCO results (or an empty list): the format evaluate writes, so they
    # passed for its own and were replaced
    notes.write_text({"coco_results_of": '[{"image_id": 1, "caption": "my other model"}]',
                      "empty_results_of": "[]"}.get(target, "my notes"))
    target = "results_of" if target.endswith("results_of") else target
    out, victim = {"config": (os.path.join(run, "config.json"),) * 2,
                   "captions": (captions,) * 2,
                   "manifest": (manifest,) * 2,
                   "results_of": (str(tmp_path / "notes.json"), str(notes))}[target]
    before = open(victim, "rb").read()
    assert main(["evaluate", "--run", run, "--out", out]) == 2
    err = capsys.readouterr().err
    why = "the run's own config.json" if target == "config" else \
        "not written by `caption-attn evaluate`"
    assert victim in err and why in err
    assert open(victim, "rb").read() == before
    assert not os.path.exists(str(tmp_path / "notes.json"))


def test_evaluate_may_replace_its_own_earlier_outputs(trained_run, tmp_path, monkeypatch,
                                                      no_java):
    out = str(tmp_path / "m.json")
    for beam in (1, 2):
        assert main(["evaluate", "--run", trained_run, "--split", "val", "--beam", str(beam),
                     "--out", out]) == 0
        with open(out) as f:
            assert json.load(f)["decode"]["beam"] == beam


def test_a_kill_between_the_two_outputs_leaves_no_stale_metrics_beside_new_results(
        tmp_path, monkeypatch):
    # results were written first and the metrics after them: killed between the two, the
    # old metrics (other scores, another --beam) stood beside the new captions as one pair
    metrics, results = str(tmp_path / "test_metrics.json"), str(tmp_path / "test_results.json")
    old = {"split": "test", "metrics_file": metrics, "results_file": results, "BLEU-4": 0.5}
    for path, obj in ((metrics, old), (results, [{"image_id": 1, "caption": "old"}])):
        with open(path, "w") as f:
            json.dump(obj, f)
    real = evaluate.write_json_atomic

    def killed_before_the_metrics(path, obj):
        if path == metrics:
            raise KeyboardInterrupt
        real(path, obj)
    monkeypatch.setattr(evaluate, "write_json_atomic", killed_before_the_metrics)
    monkeypatch.setattr(coco_metrics, "write_json_atomic", killed_before_the_metrics)
    new = {"split": "test", "metrics_file": metrics, "results_file": results, "BLEU-4": 0.1}
    with pytest.raises(KeyboardInterrupt):
        evaluate.write_outputs(new, {"a.png": "new"}, {"a.png": 1})
    with open(results) as f:
        assert json.load(f) == [{"image_id": 1, "caption": "new"}]
    assert not os.path.exists(metrics)
    monkeypatch.setattr(evaluate, "write_json_atomic", real)
    evaluate.write_outputs(new, {"a.png": "new"}, {"a.png": 1})
    with open(metrics) as f:
        assert json.load(f) == new


def test_a_full_disk_while_the_metrics_are_written_leaves_nothing_that_blocks_the_rerun(
        trained_run, tmp_path, capsys, monkeypatch, no_java):
    """The results file was written, then the metrics file hit a full disk: evaluate said
    `error: No space left on device` (no file named, exit 1) and left the results file,
    which the rerun of the same command refused as no metrics file's (exit 2)."""
    import errno
    out = str(tmp_path / "m.json")
    real = evaluate.write_json_atomic

    def full(path, obj, **kwargs):
        if path == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, obj, **kwargs)
    monkeypatch.setattr(evaluate, "write_json_atomic", full)
    command = ["evaluate", "--run", trained_run, "--split", "val", "--beam", "1", "--out", out]
    assert main(command) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {out} (No space left on device): free space" in err
    assert "rerun this command" in err
    assert sorted(os.listdir(tmp_path)) == []           # no results, no metrics, no lock
    monkeypatch.setattr(evaluate, "write_json_atomic", real)
    assert main(command) == 0
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m_results.json"]


def test_a_results_file_that_cannot_be_written_is_named_and_the_old_pair_is_not_left_half(
        tmp_path, monkeypatch):
    """The earlier evaluate's metrics go first (`write_outputs`): its results, left alone by
    a failed write of the new ones, were named by no metrics file and blocked the rerun."""
    import errno
    metrics, results = str(tmp_path / "m.json"), str(tmp_path / "m_results.json")
    old = {"split": "test", "metrics_file": metrics, "results_file": results, "BLEU-4": 0.5}
    for path, obj in ((metrics, old), (results, [{"image_id": 1, "caption": "old"}])):
        with open(path, "w") as f:
            json.dump(obj, f)

    def full(path, obj, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(coco_metrics, "write_json_atomic", full)
    new = {"split": "test", "metrics_file": metrics, "results_file": results, "BLEU-4": 0.1}
    with pytest.raises(UserError) as e:
        evaluate.write_outputs(new, {"a.png": "new"}, {"a.png": 1})
    assert e.value.exit_code == 1
    assert str(e.value).startswith(f"cannot write {results} (No space left on device): ")
    assert os.listdir(tmp_path) == []


def test_a_ctrl_c_while_evaluate_writes_its_outputs_lands_once_both_are_written(
        tmp_path, monkeypatch, default_sigint):
    """Stopped between its two files, evaluate left results that no metrics file names,
    which the next evaluate with that --out refuses (such a list may be another tool's
    results). A Ctrl-C there lands once both are written."""
    import signal
    metrics, results = str(tmp_path / "test_metrics.json"), str(tmp_path / "test_results.json")
    real = evaluate.write_results

    def interrupted(*args):
        signal.raise_signal(signal.SIGINT)
        real(*args)
    monkeypatch.setattr(evaluate, "write_results", interrupted)
    new = {"split": "test", "metrics_file": metrics, "results_file": results, "BLEU-4": 0.1}
    with pytest.raises(KeyboardInterrupt):
        evaluate.write_outputs(new, {"a.png": "new"}, {"a.png": 1})
    with open(metrics) as f:
        assert json.load(f) == new
    assert evaluate._is_results(results, metrics)


def test_an_empty_split_is_refused_as_empty(run_copy, capsys, monkeypatch):
    """A run trained with --test-fraction 0 has no test images: say so, not that the caption
    file lacks them."""
    monkeypatch.setattr(evaluate, "_decode", None)                 # must not be reached
    run = run_copy.path
    with open(os.path.join(run, "split.json")) as f:
        split = json.load(f)
    split["splits"]["train"] += split["splits"]["test"]
    split["splits"]["test"] = []
    split["splits_sha256"] = splits_digest(split["splits"])  # as train had written them
    with open(os.path.join(run, "split.json"), "w") as f:
        json.dump(split, f)
    assert main(["evaluate", "--run", run]) == 2
    err = capsys.readouterr().err
    # val first; train named with why its scores flatter the model (it was offered as one of
    # two equal choices)
    assert "the run's test split is empty" in err and err.rstrip().endswith(
        "--split (val; train, whose images it was trained on: scores there flatter it)")


@pytest.mark.parametrize("moved", ["cache", "captions"])
def test_a_run_whose_cache_or_captions_moved_says_how_to_point_at_them(run_copy, tmp_path,
                                                                        capsys, moved):
    """evaluate of a run whose cache moved said `CACHE/manifest.json: no feature cache
    manifest (run extract-features --cache CACHE first)`, as if the features had to be made
    again, and of one whose caption file moved only `FILE: caption file not found`: both
    name the run's path now and the flag that points at the new place."""
    run = run_copy.path
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    config[moved] = str(tmp_path / "moved")
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(config, f)
    assert main(["evaluate", "--run", run, "--split", "val"]) == 2
    err = capsys.readouterr().err
    what = {"cache": "feature cache", "captions": "caption file"}[moved]
    assert f"the run's {what} {tmp_path / 'moved'} does not exist" in err, err
    assert f"--{moved} NEW" in err and "extract-features" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["missing", "folder", "not JSON"])
def test_a_bad_captions_flag_is_refused_before_the_model_loads(trained_run, tmp_path, capsys,
                                                               monkeypatch, kind):
    """`evaluate --captions X` loaded best.keras before it read X (README: every flag and
    path is checked before any expensive step)."""
    monkeypatch.setattr(RunFolder, "load_best_model", lambda self: pytest.fail(
        "the model was loaded before --captions was checked"))
    captions = tmp_path / "captions.json"
    if kind == "folder":
        captions.mkdir()
    elif kind == "not JSON":
        captions.write_text("{")
    out = tmp_path / "m.json"
    assert main(["evaluate", "--run", trained_run, "--captions", str(captions), "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(captions) in err[0], err
    recorded = RunFolder(trained_run).load_config().captions
    if kind != "not JSON":
        why = "does not exist" if kind == "missing" else "is a folder"
        assert err[0] == (f"caption-attn evaluate: error: --captions {captions}: {why}; give "
                          f"the caption file with the references (the run was trained on "
                          f"{recorded})")
    assert not out.exists()


def test_an_out_inside_the_feature_cache_is_refused(shapes_data, trained_run, capsys,
                                                    monkeypatch):
    """`evaluate --out CACHE/m.json` wrote the metrics into the feature cache, where
    `export` refuses its --out."""
    monkeypatch.setattr(RunFolder, "load_best_model", lambda self: pytest.fail(
        "the model was loaded before --out was checked"))
    out = os.path.join(shapes_data["cache"], "m.json")
    assert main(["evaluate", "--run", trained_run, "--out", out]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"caption-attn evaluate: error: --out {out}: inside the feature cache "
        f"{shapes_data['cache']}; choose another --out, e.g. "
        f"{os.path.join(trained_run, 'eval', 'my_metrics.json')}"]
    assert not os.path.exists(out)


def test_a_run_without_a_best_model_says_so_before_its_cache_is_checked(tmp_path, capsys):
    """A run that has not finished an epoch is told so, not that its cache is missing."""
    from caption_attn.config import RunConfig
    run = tmp_path / "run"
    run.mkdir()
    RunConfig(captions=str(tmp_path / "c.json"), cache=str(tmp_path / "cache")).save(
        str(run / "config.json"))
    assert main(["evaluate", "--run", str(run), "--out", str(tmp_path / "m.json")]) == 2
    assert "no best model yet" in capsys.readouterr().err


def test_unknown_split_is_refused(trained_run, capsys):
    assert main(["evaluate", "--run", trained_run, "--split", "dev"]) == 2


@pytest.mark.slow
def test_metrics_with_java_equal_a_direct_pycocoevalcap_call(shapes_data, trained_run,
                                                             tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not coco_metrics.java_available():
        pytest.skip("Java is not installed")
    metrics = evaluate.evaluate_run(trained_run, "test", DecodeConfig(beam=1),
                                    out=str(tmp_path / "m.json"), progress=False)
    with open(metrics["results_file"]) as f:
        results = json.load(f)
    with open(os.path.join(trained_run, "split.json")) as f:
        test_keys = json.load(f)["splits"]["test"]
    images, refs = _references(shapes_data, test_keys)
    ids = {images[k]["imgid"]: k for k in test_keys}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs[k]] for i, k in ids.items()})
    res = tokenizer.tokenize({r["image_id"]: [{"caption": r["caption"]}] for r in results})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f"Bleu_{i + 1}": b for i, b in enumerate(bleu)}
    expected["METEOR"] = Meteor().compute_score(gts, res)[0]
    expected["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr"] = Cider().compute_score(gts, res)[0]
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name


def test_images_without_a_valid_feature_file_are_skipped_and_reported(trained_run,
                                                                      copy_cache, tmp_path):
    import shutil

    from caption_attn.feature_cache import feature_path
    run = str(tmp_path / "run")
    shutil.copytree(trained_run, run)
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    cfg["cache"] = copy_cache
    with open(os.path.join(run, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(run, "split.json")) as f:
        test_keys = json.load(f)["splits"]["test"]
    truncated, missing = feature_path(copy_cache, test_keys[0]), feature_path(copy_cache,
                                                                                test_keys[1])
    with open(truncated, "r+b") as f:
        f.truncate(1000)
    os.remove(missing)
    metrics = evaluate.evaluate_run(run, "test", DecodeConfig(beam=1), progress=False,
                                    use_java=False)
    assert metrics["images"] == len(test_keys) - 2
    assert metrics["images_without_features"] == 2
    assert any("2 images of the test split" in n and "--verify" in n for n in metrics["notes"])


def test_sampled_images_draw_the_stream_of_their_place_in_the_split(run_copy, copy_cache,
                                                                  monkeypatch):
    """`evaluate --sample` numbered the streams among the images with features: one test image
    without a feature file changed every later image's sample (the README: by its place in
    the split)."""
    from caption_attn.feature_cache import feature_path
    test_keys = run_copy.load_splits()["test"]
    os.remove(feature_path(copy_cache, test_keys[0]))
    seen, real = [], captioner_lib.Captioner.decode

    def decode(self, features, ids=None):
        seen.extend(ids)
        return real(self, features, ids)
    monkeypatch.setattr(captioner_lib.Captioner, "decode", decode)
    metrics = evaluate.evaluate_run(run_copy.path, "test", DecodeConfig(sample=True, seed=3,
                                                                        batch_size=2),
                                    progress=False, use_java=False, cache=copy_cache)
    assert metrics["images"] == len(test_keys) - 1
    assert seen == list(range(1, len(test_keys)))


def test_a_feature_file_gone_bad_names_its_reason_and_the_whole_repair_command(
        trained_run, copy_cache, tmp_path):
    """NaN under the same size and mtime (the index still vouches for it): found in-graph
    while decoding; the note names the file, what is wrong and the command with every flag
    the cache needs. One damaged file of many ended the whole evaluate (exit 2, nothing
    scored); it is left out now, as a missing file is, and the rest are scored."""
    import shutil

    import numpy as np

    from caption_attn.feature_cache import feature_path
    run = str(tmp_path / "run")
    shutil.copytree(trained_run, run)
    with open(os.path.join(run, "split.json")) as f:
        key = json.load(f)["splits"]["test"][0]
    path = feature_path(copy_cache, key)
    _damage_in_place(path, np.inf)
    result = evaluate.evaluate_run(run, "test", DecodeConfig(beam=1), progress=False,
                                   use_java=False, cache=copy_cache)
    with open(os.path.join(run, "split.json")) as f:
        test_keys = json.load(f)["splits"]["test"]
    assert result["images"] == len(test_keys) - 1
    with open(result["results_file"]) as f:
        assert len(json.load(f)) == len(test_keys) - 1
    note = next(n for n in result["notes"] if "left out" in n)
    m = json.load(open(os.path.join(copy_cache, "manifest.json")))
    assert note.startswith(f"1 image of the test split was left out: 1 damaged feature "
                           f"file(s) found while decoding: damaged feature file: {path} "
                           f"(non-finite values): repair the cache with")
    assert (f"`caption-attn extract-features --verify --images {m['images_dir']} --cache "
            f"{copy_cache} --weights {m['weights']} --seed {m['seed']} --dtype {m['dtype']} "
            f"--precision {m['precision']}`") in note
    # more than evaluate.MAX_DAMAGED: a damaged cache, one error (each costs a decoding)
    for key in test_keys[1:evaluate.MAX_DAMAGED + 1]:
        _damage_in_place(feature_path(copy_cache, key), np.nan)
    with pytest.raises(UserError, match=rf"\({evaluate.MAX_DAMAGED} other damaged file\(s\) "
                                        rf"found before it: "):
        evaluate.evaluate_run(run, "test", DecodeConfig(beam=1), progress=False,
                              use_java=False, cache=copy_cache)


def test_the_repair_of_a_damaged_file_names_the_folder_the_run_checks_its_images_in(
        trained_run, shapes_data, copy_cache, tmp_path):
    """A run trained with `--images NEW` (its images moved): the repair evaluate printed
    named the cache's last --images, the old folder, not where the run checks them."""
    import shutil

    import numpy as np

    from caption_attn.feature_cache import feature_path
    run, moved = str(tmp_path / "run"), str(tmp_path / "moved")
    shutil.copytree(trained_run, run)
    shutil.copytree(shapes_data["images"], moved, copy_function=shutil.copy2)
    with open(os.path.join(run, "split.json")) as f:
        record = json.load(f)
    record["images_dir"] = moved                   # as `train --images moved` records it
    with open(os.path.join(run, "split.json"), "w") as f:
        json.dump(record, f)
    _damage_in_place(feature_path(copy_cache, record["splits"]["test"][0]), np.nan)
    result = evaluate.evaluate_run(run, "test", DecodeConfig(beam=1), progress=False,
                                   use_java=False, cache=copy_cache)
    note = next(n for n in result["notes"] if "left out" in n)
    assert f"`caption-attn extract-features --verify --images {moved} --cache " in note
    assert shapes_data["images"] not in note


def _damage_in_place(path: str, value) -> None:
    """One value of a feature file set to `value` under its size and mtime (the index still
    vouches for the file)."""
    import numpy as np
    st = os.stat(path)
    values = np.load(path)
    values[0, 0] = value
    np.save(path, values)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_results_left_in_the_run_s_own_eval_folder_do_not_block_the_next_evaluate(tmp_path):
    """An evaluate that died between its two files (a full disk, a kill) left results no
    metrics file names: refused as another tool's where --out names them, but in the run's
    own eval/ (no --out) they are that evaluate's."""
    metrics, results = str(tmp_path / "test_metrics.json"), str(tmp_path / "test_results.json")
    with open(results, "w") as f:
        json.dump([{"image_id": 1, "caption": "a red circle"}], f)
    evaluate._check_outputs(metrics, results, given=False)
    with pytest.raises(UserError, match="no metrics file of `caption-attn evaluate` names it"):
        evaluate._check_outputs(metrics, results, given=True)


@pytest.mark.parametrize("other", ["test.json", "test"])
def test_an_out_whose_results_file_another_metrics_file_names_is_refused(tmp_path, other):
    """`--out D/test.json`, `--out D/test` and the default D/test_metrics.json all put their
    captions in D/test_results.json: the second replaced the captions the first's scores
    are of, exit 0. Refused naming that metrics file; not for a copy of one under another
    name (its captions are where it was written)."""
    other, results = str(tmp_path / other), str(tmp_path / "test_results.json")
    with open(other, "w") as f:
        json.dump({"split": "test", "metrics_file": other, "results_file": results}, f)
    with open(results, "w") as f:
        json.dump([{"image_id": 1, "caption": "a red circle"}], f)
    metrics = str(tmp_path / "test_metrics.json")
    for given, name, fix in ((False, "the default output", "pass --out FILE"),
                             (True, "--out", "choose another --out")):
        with pytest.raises(UserError, match=(
                rf"^{name} {re.escape(metrics)}: its captions go to {re.escape(results)}, "
                rf"which {re.escape(other)}, the metrics file of another `caption-attn "
                rf"evaluate`, names: .*; {fix} \(or remove both {re.escape(other)} and "
                rf"{re.escape(results)}\)$")):
            evaluate._check_outputs(metrics, results, given=given)
    evaluate._check_outputs(other, results)                  # its own pair: replaced
    # renamed here (eval/test_epoch5.json): its captions are still these
    renamed = str(tmp_path / "test_epoch5.json")
    os.rename(other, renamed)
    with pytest.raises(UserError, match=rf"which {re.escape(renamed)}, the metrics file"):
        evaluate._check_outputs(metrics, results, given=False)
    # a copy of another folder's (test_results.json there): not these captions
    with open(renamed, "w") as f:
        json.dump({"split": "test", "metrics_file": str(tmp_path / "a" / os.path.basename(other)),
                   "results_file": str(tmp_path / "a" / "test_results.json")}, f)
    evaluate._check_outputs(metrics, results, given=False)
    os.remove(renamed)
    # named by none (left by a killed evaluate): still taken in the run's own eval/
    with open(other, "w") as f:
        json.dump({"split": "test", "metrics_file": other,
                   "results_file": str(tmp_path / "val_results.json")}, f)
    evaluate._check_outputs(metrics, results, given=False)


def test_evaluate_after_an_out_sharing_the_default_results_file_is_refused_before_decoding(
        run_copy, capsys, monkeypatch, no_java):
    """`evaluate --run R --beam 1 --out R/eval/test.json`, then `evaluate --run R`: the
    second replaced R/eval/test_results.json with its captions, while R/eval/test.json kept
    the first's scores and named that file (exit 0 both times)."""
    _decoded_as_a(monkeypatch)
    eval_dir = os.path.join(run_copy.path, "eval")
    out, results = os.path.join(eval_dir, "test.json"), os.path.join(eval_dir,
                                                                      "test_results.json")
    assert main(["evaluate", "--run", run_copy.path, "--beam", "1", "--out", out]) == 0
    capsys.readouterr()
    before, listed = open(results, "rb").read(), sorted(os.listdir(eval_dir))
    monkeypatch.setattr(evaluate, "_decode", None)                 # must not be reached
    assert main(["evaluate", "--run", run_copy.path]) == 2
    err = capsys.readouterr().err
    assert f"the default output {os.path.join(eval_dir, 'test_metrics.json')}: its captions " \
        f"go to {results}, which {out}, the metrics file of another `caption-attn " \
        f"evaluate`, names" in err
    assert f"pass --out FILE (or remove both {out} and {results})" in err
    assert open(results, "rb").read() == before
    assert sorted(os.listdir(eval_dir)) == listed and "test_metrics.json" not in listed


def test_two_evaluates_whose_outs_share_a_results_file_cannot_both_proceed(
        run_copy, tmp_path, monkeypatch, no_java):
    """`--out D/x.json` and `--out D/x_metrics.json` at once took different locks and both
    wrote D/x_results.json: the one started second is refused while the first decodes, and
    once the first has written its files, by them."""
    folder = tmp_path / "out"
    first, second = str(folder / "x.json"), str(folder / "x_metrics.json")
    results = str(folder / "x_results.json")
    refused = []

    def decode(captioner, found, progress):
        if not refused:   # the second starts while the first decodes
            with pytest.raises(UserError) as e:
                evaluate.evaluate_run(run_copy.path, "test", out=second, progress=False,
                                      use_java=False)
            refused.append(str(e.value))
        return {k: captioner_lib.Caption(["a"], 0.0, np.zeros((2, 64))) for k in found.keys}
    monkeypatch.setattr(evaluate, "_decode", decode)
    evaluate.evaluate_run(run_copy.path, "test", out=first, progress=False, use_java=False)
    assert re.fullmatch(rf"--out {re.escape(second)}: another `caption-attn evaluate` \(pid "
                        rf"{os.getpid()}: .*\) is writing {re.escape(results)} now, where "
                        rf"this one's captions go; .* choose another --out", refused[0])
    assert sorted(os.listdir(folder)) == ["x.json", "x_results.json"]
    with open(first) as f:
        assert json.load(f)["results_file"] == results
    with pytest.raises(UserError, match=rf"^--out {re.escape(second)}: its captions go to "
                                        rf"{re.escape(results)}, which {re.escape(first)}, "):
        evaluate.evaluate_run(run_copy.path, "test", out=second, progress=False,
                              use_java=False)
    assert len(refused) == 1 and sorted(os.listdir(folder)) == ["x.json", "x_results.json"]


def test_other_references_are_scored_with_a_note(shapes_data, trained_run, tmp_path):
    with open(os.path.join(trained_run, "split.json")) as f:
        test_keys = json.load(f)["splits"]["test"]
    with open(shapes_data["captions"]) as f:
        captions = json.load(f)
    changed = [i for i in captions["images"] if i["filename"] == test_keys[1]][0]
    changed["sentences"][0]["raw"] = "a cat sits on a mat"
    other = str(tmp_path / "other.json")
    with open(other, "w") as f:
        json.dump(captions, f)
    metrics = evaluate.evaluate_run(trained_run, "test", DecodeConfig(beam=1), progress=False,
                                    out=str(tmp_path / "m.json"), use_java=False,
                                    captions=other)
    assert metrics["images"] == len(test_keys)  # scored, not refused
    assert metrics["notes"][0] == (
        f"the references in {other} differ from the captions the run was trained with in its "
        f"test split: 1 of {len(test_keys)} images has other captions (e.g. {test_keys[1]!r})"
        f"; the scores are against {other}")
    same = evaluate.evaluate_run(trained_run, "test", DecodeConfig(beam=1), progress=False,
                                 out=str(tmp_path / "m.json"), use_java=False)
    assert not any("references" in n for n in same["notes"])



def test_references_only_reordered_are_scored_without_a_note(shapes_data, trained_run,
                                                             tmp_path, monkeypatch):
    # A test image's sentences reversed and a train caption edited: "1 of 8 images has other
    # captions" was noted for the test image, whose references are the same set.
    _decoded_as_a(monkeypatch)
    with open(os.path.join(trained_run, "split.json")) as f:
        splits = json.load(f)["splits"]

    def edit(reverse, change):
        with open(shapes_data["captions"]) as f:
            captions = json.load(f)
        images = {i["filename"]: i for i in captions["images"]}
        images[reverse]["sentences"].reverse()
        images[change]["sentences"][0]["raw"] += " again"
        other = str(tmp_path / "other.json")
        with open(other, "w") as f:
            json.dump(captions, f)
        return other
    other = edit(splits["test"][0], splits["train"][0])
    metrics = evaluate.evaluate_run(trained_run, "test", progress=False, use_java=False,
                                    out=str(tmp_path / "m.json"), captions=other)
    assert not any("references" in n for n in metrics["notes"]), metrics["notes"]
    other = edit(splits["test"][0], splits["test"][1])
    metrics = evaluate.evaluate_run(trained_run, "test", progress=False, use_java=False,
                                    out=str(tmp_path / "m.json"), captions=other)
    assert f"1 of {len(splits['test'])} images has other captions (e.g. " \
        f"{splits['test'][1]!r})" in metrics["notes"][0]


def test_a_split_the_model_was_trained_or_chosen_on_is_scored_with_a_note(
        trained_run, tmp_path, monkeypatch, capsys, no_java):
    # --split train and --split val flatter the model (it trained on one; best.keras was
    # chosen on the other), and were scored without a word: only test is unbiased
    _decoded_as_a(monkeypatch)
    out = str(tmp_path / "m.json")
    starts = {"train": "scored on the train split, which the model trained on: not an "
                       "estimate of its quality on new images",
              "val": "scored on the val split, which chose best.keras"}
    for split in ("train", "val", "test"):
        assert main(["evaluate", "--run", trained_run, "--split", split, "--out", out]) == 0
        err = capsys.readouterr().err
        with open(out) as f:
            notes = json.load(f)["notes"]
        for name, start in starts.items():
            said = name == split
            assert sum(n.startswith(start) for n in notes) == said, (split, notes)
            assert (f"note: {start}" in err) == said, (split, err)

# --------------------------------------------------------------------------- printing
def test_format_metrics_table():
    metrics = {"Bleu_1": 0.71234, "Bleu_2": 0.5, "Bleu_3": 0.4, "Bleu_4": 0.3,
               "ROUGE_L": 0.6, "CIDEr": 1.23456}
    lines = evaluate.format_metrics(metrics).splitlines()
    assert [line.split("  ")[0].strip() for line in lines] == [
        "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    assert lines[0].endswith("0.7123") and lines[4].endswith("n/a")
    assert lines[6].endswith("1.2346")
    assert len({len(line) for line in lines}) == 1  # values right-aligned in one column
    shapes = {"scene_accuracy": 0.25, "scene_images": 12, "grounding": None,
              "grounding_images": 10, "grounded_words": 0, "matched_words": 0}
    table = evaluate.format_metrics({**metrics, **shapes}).splitlines()
    assert table[7].startswith("scene accuracy") and table[8].endswith(" 12")
    assert table[8].startswith("  over images") and table[10].startswith("  over images")
    assert table[9].endswith("n/a") and table[10].endswith(" 10")  # grounding None


def test_an_image_without_a_live_caption_is_refused_not_an_index_error():
    import types

    from caption_attn import pipeline
    found = types.SimpleNamespace(keys=["a.png", "b.png"], cache="nowhere", places=None,
                                  reader=pipeline.NpyReader(128, "float16", (64, 2048)),
                                  split="test", manifest={})
    model = types.SimpleNamespace(cfg=types.SimpleNamespace(batch_size=2),
                                  decode_batches=lambda batches, bar, places: [[], ["b"]])
    with pytest.raises(UserError, match=re.escape(
            "1 of the 2 test images (e.g. 'a.png'): no caption could be decoded")) as e:
        evaluate._decode(model, found, progress=False)
    assert e.value.exit_code == 1         # the input was fine: the model's output is not


def test_shapes_metrics_say_which_images_they_are_over_and_need_the_image_size():
    # Scene accuracy and grounding were over the images with objects, and their count
    # replaced the split's "images" (the printed `test split, N images`); an image without
    # height/width was grounded as if it were 299 x 299 (the cache's size, not the boxes').
    from caption_attn.data import ImageRecord
    box = {"color": "red", "shape": "circle", "size": "small", "bbox": [0, 0, 10, 10]}
    records = {"a.png": ImageRecord("a.png", ["a red circle"], "test", 1, [box], (80, 80)),
               "b.png": ImageRecord("b.png", ["a red circle"], "test", 2, [box], None),
               "c.png": ImageRecord("c.png", ["a photo"], "test", 3, None, None),
               # objects without boxes: scene accuracy's, not grounding's
               "d.png": ImageRecord("d.png", ["a red circle"], "test", 4,
                                    [{**box, "bbox": None}], (80, 80))}
    found = evaluate._SplitFeatures("test", "cache", list(records), [], records,
                                    {"image_size": 299}, None)
    hypotheses = {k: "a red circle" for k in records}
    caption = captioner_lib.Caption(["a", "red", "circle"], -1.0,
                                    np.eye(64, dtype=np.float32)[[0, 0, 0, 0]])
    result = evaluate._score(found, hypotheses, {k: caption for k in records}, False)
    assert (result["scene_accuracy"], result["scene_images"]) == (1.0, 3)
    assert (result["grounding"], result["grounding_images"], result["matched_words"]) == \
        (1.0, 1, 2)
    assert "images" not in result            # evaluate's own count of the split stays
    assert "scene accuracy and grounding are over the 3 of the 4 images that have " \
        "ground-truth `objects` in the caption file" in result["notes"]
    # objects the metrics cannot read (another dataset's words, a capital) scored their
    # image wrong whatever the caption said: left out, with a note
    for color, shape in (("Red", "circle"), ("red", "cube")):
        odd = {**records, "e.png": ImageRecord("e.png", ["a red circle"], "test", 5, [{
            **box, "color": color, "shape": shape}], (80, 80))}
        found = evaluate._SplitFeatures("test", "cache", list(odd), [], odd,
                                        {"image_size": 299}, None)
        result = evaluate._score(found, {**hypotheses, "e.png": "a red circle"},
                                 {k: caption for k in odd}, False)
        assert (result["scene_accuracy"], result["scene_images"]) == (1.0, 3)
        assert (f"scene accuracy and grounding leave out 1 images whose `objects` name a "
                f"colour or shape the shapes metrics do not know (e.g. {color!r} {shape!r} in "
                f"'e.png'; they know red, green, blue, yellow, purple and circle, square, "
                f"triangle, lower-case)") in result["notes"]
    assert [n for n in result["notes"] if n.startswith(
        "grounding leaves out 1 images whose objects have boxes but whose entries in the "
        "caption file have no valid `height` and `width` (e.g. 'b.png')")]
    # left out of grounding with a note too, as the README says (they were left out silently)
    assert [n for n in result["notes"] if n.startswith(
        "grounding leaves out 1 images whose objects have no `bbox` in the caption file "
        "(e.g. 'd.png')")]


def test_a_cache_of_other_images_with_the_same_names_is_refused(trained_run, copy_cache,
                                                                tmp_path, monkeypatch):
    # `evaluate --cache` of another shapes dataset (another --seed, the same random backbone
    # and file names) scored the captions of other images against the run's references.
    with open(os.path.join(trained_run, "split.json")) as f:
        test = set(json.load(f)["splits"]["test"])
    give_other_images(copy_cache, test)   # the same feature files, other images
    monkeypatch.setattr(evaluate, "_decode", None)                 # must not be reached
    out = str(tmp_path / "m.json")
    with pytest.raises(UserError, match=rf"feature cache {copy_cache}: the features of "
                                        rf"{len(test)} of the {len(test)} test images were "
                                        rf"extracted from other images"):
        evaluate.evaluate_run(trained_run, "test", DecodeConfig(beam=1), out=out,
                              progress=False, use_java=False, cache=copy_cache)
    assert not os.path.exists(out)
    run_cfg = RunFolder(trained_run).load_config()           # its other images are the run's
    found = evaluate._load_split(trained_run, "val", run_cfg, copy_cache, run_cfg.captions)
    assert found.keys and not found.without


def test_split_images_missing_from_the_captions_are_noted_for_a_run_without_caption_data(
        shapes_data, run_copy, tmp_path, monkeypatch):
    # A run made before runs recorded their caption data (no `caption_data` in split.json),
    # evaluated with a caption file that lacks one test image: 7 of 8 images were scored
    # with no note saying why, the metrics read as the whole split's.
    monkeypatch.setattr(evaluate, "_decode", lambda captioner, found, progress: {
        k: captioner_lib.Caption(["a"], 0.0, np.zeros((2, 64))) for k in found.keys})
    with open(run_copy.split) as f:
        split = json.load(f)
    del split["caption_data"]
    with open(run_copy.split, "w") as f:
        json.dump(split, f)
    test_keys = split["splits"]["test"]
    with open(shapes_data["captions"]) as f:
        captions = json.load(f)
    captions["images"] = [i for i in captions["images"] if i["filename"] != test_keys[0]]
    for image in captions["images"]:   # and one whose captions hold no word: scored, said
        if image["filename"] == test_keys[1]:
            image["sentences"] = [{"raw": "."}, {"raw": "!!"}]
    other = str(tmp_path / "other.json")
    with open(other, "w") as f:
        json.dump(captions, f)
    metrics = evaluate.evaluate_run(run_copy.path, "test", progress=False, use_java=False,
                                    out=str(tmp_path / "m.json"), captions=other)
    assert metrics["images"] == len(test_keys) - 1
    assert metrics["notes"][0].startswith(
        f"1 of the {len(test_keys)} images of the run's test split is not in {other} "
        f"(e.g. {test_keys[0]!r}): scored the other {len(test_keys) - 1}; ")
    assert f"{test_keys[1]!r}: '.', '!!'" in metrics["notes"][0]   # the note was overwritten


def test_a_run_split_by_image_hash_is_scored_on_its_whole_split_with_flickr8k_lists_beside(
        shapes_data, tmp_path):
    """A Flickr8k run split by image hash (made before the official lists were read) and
    evaluated with the lists beside its caption file: the images in none of the lists were
    left out of the references, and its test images among them were "removed" from the
    split (scored on fewer, a note blaming the caption file). Read as the run was split, its
    whole test split is scored."""
    from test_train import flickr8k_run

    run, cfg, data, captions = flickr8k_run(shapes_data, tmp_path, lists=False)
    test = data.splits["test"]
    for split, name in (("train", "Flickr_8k.trainImages.txt"),
                        ("val", "Flickr_8k.devImages.txt"), ("test", "Flickr_8k.testImages.txt")):
        with open(tmp_path / name, "w") as f:   # the lists name every image but test[0]
            f.writelines(f"{k}\n" for k in data.splits[split] if k != test[0])
    found = evaluate._load_split(run.path, "test", cfg, shapes_data["cache"], captions)
    assert found.keys == test and found.references_note == ""


def test_a_run_split_by_the_flickr8k_lists_is_scored_whatever_the_lists_say_now(
        shapes_data, tmp_path):
    """split.json decides the split evaluate scores, yet the Flickr8k lists were read again:
    a test image taken out of its list since was left out of the references and "removed"
    from the split (scored on fewer, with a note blaming the caption file), and a list moved
    away stopped evaluate with the lists' error. They are not read."""
    from test_train import flickr8k_run

    run, cfg, data, captions = flickr8k_run(shapes_data, tmp_path)
    assert run.split_by_lists()
    test = data.splits["test"]
    with open(tmp_path / "Flickr_8k.testImages.txt", "w") as f:     # test[0] taken out
        f.writelines(f"{k}\n" for k in test[1:])
    found = evaluate._load_split(run.path, "test", cfg, shapes_data["cache"], captions)
    assert found.keys == test and found.references_note == ""
    os.remove(tmp_path / "Flickr_8k.devImages.txt")                 # a list moved away
    found = evaluate._load_split(run.path, "test", cfg, shapes_data["cache"], captions)
    assert found.keys == test


def _with_other_objects(shapes_data, tmp_path, key, change):
    """The run's caption file with `change` applied to the entry of image `key`, saved as
    tmp_path/other.json (its captions unchanged)."""
    with open(shapes_data["captions"]) as f:
        captions = json.load(f)
    change([i for i in captions["images"] if i["filename"] == key][0])
    other = str(tmp_path / "other.json")
    with open(other, "w") as f:
        json.dump(captions, f)
    return other


def _decoded_as_a(monkeypatch):
    monkeypatch.setattr(evaluate, "_decode", lambda captioner, found, progress: {
        k: captioner_lib.Caption(["a"], 0.0, np.zeros((2, 64))) for k in found.keys})


def test_other_ground_truth_objects_are_scored_with_a_note(shapes_data, trained_run, tmp_path,
                                                           monkeypatch):
    # Only the `objects` of a test image changed (scene accuracy's and grounding's ground
    # truth): scored against the new objects without a word, as if they were the run's.
    _decoded_as_a(monkeypatch)
    with open(os.path.join(trained_run, "split.json")) as f:
        test_keys = json.load(f)["splits"]["test"]

    def recolour(image):
        image["objects"][0]["color"] = "purple" if image["objects"][0]["color"] != "purple" \
            else "red"
    other = _with_other_objects(shapes_data, tmp_path, test_keys[2], recolour)
    metrics = evaluate.evaluate_run(trained_run, "test", progress=False, use_java=False,
                                    out=str(tmp_path / "m.json"), captions=other)
    assert metrics["notes"][0] == (
        f"the ground-truth `objects` in {other} differ from the ones the run was trained with "
        f"in its test split: 1 of {len(test_keys)} images has other objects (e.g. "
        f"{test_keys[2]!r}); scene accuracy and grounding are against {other}")
    # the size places the boxes on the attention grid: part of grounding's ground truth
    other = _with_other_objects(shapes_data, tmp_path, test_keys[0],
                                lambda image: image.update(width=598))
    metrics = evaluate.evaluate_run(trained_run, "test", progress=False, use_java=False,
                                    out=str(tmp_path / "m.json"), captions=other)
    assert f"1 of {len(test_keys)} images has other objects (e.g. {test_keys[0]!r})" in \
        metrics["notes"][0]
    # another split's objects are not this split's news; the run's own file says nothing
    with open(os.path.join(trained_run, "split.json")) as f:
        train_key = json.load(f)["splits"]["train"][0]
    other = _with_other_objects(shapes_data, tmp_path, train_key, recolour)
    for captions in (other, None):
        metrics = evaluate.evaluate_run(trained_run, "test", progress=False, use_java=False,
                                        out=str(tmp_path / "m.json"), captions=captions)
        assert not any("objects" in n for n in metrics["notes"]), metrics["notes"]


def test_references_without_a_word_are_scored_as_pycocoevalcap_scores_them(
        shapes_data, trained_run, tmp_path, monkeypatch):
    # A reference "." (no word: not trained on) was dropped from the references too, so
    # CIDEr was 0.168429 where pycocoevalcap, given the whole file, said 0.166932.
    words = ["a", "red", "circle"]
    monkeypatch.setattr(evaluate, "_decode", lambda captioner, found, progress: {
        k: captioner_lib.Caption(words, 0.0, np.zeros((4, 64))) for k in found.keys})
    with open(os.path.join(trained_run, "split.json")) as f:
        test_keys = json.load(f)["splits"]["test"]
    other = _with_other_objects(shapes_data, tmp_path, test_keys[0], lambda image: image[
        "sentences"].extend([{"raw": "."}, {"raw": " ... "}]))
    metrics = evaluate.evaluate_run(trained_run, "test", progress=False, use_java=False,
                                    out=str(tmp_path / "m.json"), captions=other)
    _, refs = _references(shapes_data, test_keys)
    hyps = {k: "a red circle" for k in test_keys}
    without, _ = coco_metrics.coco_metrics(refs, hyps, use_java=False)
    refs[test_keys[0]] += [".", " ... "]
    direct, _ = coco_metrics.coco_metrics(refs, hyps, use_java=False)
    assert direct["CIDEr"] != pytest.approx(without["CIDEr"])  # the test can tell
    for name, value in direct.items():
        assert metrics[name] == pytest.approx(value), name
    assert not any("references" in n for n in metrics["notes"]), metrics["notes"]


def test_a_caption_file_without_the_objects_the_run_had_says_the_metrics_are_not_computed(
        shapes_data, trained_run, tmp_path, monkeypatch):
    # The run was trained with ground-truth objects; a file without them made scene accuracy
    # and grounding disappear from the metrics without a word.
    _decoded_as_a(monkeypatch)
    with open(shapes_data["captions"]) as f:
        captions = json.load(f)
    for image in captions["images"]:
        del image["objects"]
    other = str(tmp_path / "no_objects.json")
    with open(other, "w") as f:
        json.dump(captions, f)
    metrics = evaluate.evaluate_run(trained_run, "test", progress=False, use_java=False,
                                    out=str(tmp_path / "m.json"), captions=other)
    assert "scene_accuracy" not in metrics and "grounding" not in metrics
    assert metrics["notes"][0] == (
        f"{other} has no ground-truth `objects` for the images of the test split, which the "
        f"run was trained with: scene accuracy and grounding are not computed")


@pytest.mark.parametrize("use_java", [False, pytest.param(True, marks=pytest.mark.skipif(
    not coco_metrics.java_available(), reason="needs Java on PATH"))])
def test_an_image_whose_references_all_have_no_word_is_scored_as_pycocoevalcap_does(
        shapes_data, trained_run, tmp_path, monkeypatch, use_java):
    # A test image whose captions are all "." or "..." (empty once PTB-tokenized) was left
    # out as "removed" from the caption file; pycocoevalcap scores it (0 against nothing).
    words = ["a", "red", "circle"]
    monkeypatch.setattr(evaluate, "_decode", lambda captioner, found, progress: {
        k: captioner_lib.Caption(words, 0.0, np.zeros((4, 64))) for k in found.keys})
    if use_java:  # METEOR's jar is slow to start; the tokens are the point here
        monkeypatch.setattr(coco_metrics, "_meteor", lambda gts, res: 0.5)
    with open(os.path.join(trained_run, "split.json")) as f:
        test_keys = json.load(f)["splits"]["test"]
    silent = [".", " ... ", "?"]
    other = _with_other_objects(shapes_data, tmp_path, test_keys[0], lambda image: image.update(
        sentences=[{"raw": c} for c in silent]))
    metrics = evaluate.evaluate_run(trained_run, "test", progress=False, use_java=use_java,
                                    out=str(tmp_path / "m.json"), captions=other)
    images, refs = _references(shapes_data, test_keys)
    refs[test_keys[0]] = silent
    hyps = {k: "a red circle" for k in test_keys}
    direct, _ = coco_metrics.coco_metrics(refs, hyps, use_java=use_java)
    without, _ = coco_metrics.coco_metrics({k: refs[k] for k in test_keys[1:]},
                                           {k: hyps[k] for k in test_keys[1:]},
                                           use_java=use_java)
    assert direct["Bleu_1"] != pytest.approx(without["Bleu_1"])  # the test can tell
    assert metrics["images"] == len(test_keys)
    for name, value in direct.items():
        assert metrics[name] == pytest.approx(value), name
    with open(metrics["results_file"]) as f:
        assert {r["image_id"] for r in json.load(f)} == {images[k]["imgid"] for k in test_keys}
    note = [n for n in metrics["notes"] if test_keys[0] in n]
    assert note and "removed" not in note[0] and "without a word" in note[0], metrics["notes"]


def test_a_run_that_did_not_record_its_objects_says_they_could_not_be_checked(
        shapes_data, run_copy, tmp_path, monkeypatch):
    # A run made before runs recorded the digests of their ground-truth objects: nothing
    # can tell whether the objects scored against are the ones it had, and the metrics say so.
    _decoded_as_a(monkeypatch)
    with open(run_copy.split) as f:
        split = json.load(f)
    del split["caption_data"]["objects"]
    with open(run_copy.split, "w") as f:
        json.dump(split, f)
    metrics = evaluate.evaluate_run(run_copy.path, "test", progress=False, use_java=False,
                                    out=str(tmp_path / "m.json"))
    assert metrics["notes"][0] == (
        f"the run did not record the ground-truth `objects` of its images (made before runs "
        f"recorded them): scene accuracy and grounding are against the ones in "
        f"{shapes_data['captions']}, which could not be compared with the run's")


def test_an_out_whose_path_is_not_utf8_is_written_as_valid_utf8_json(trained_run, tmp_path,
                                                                     monkeypatch, capsys,
                                                                     no_java):
    # --out in a folder named b"\xff": the metrics JSON could not be encoded, a traceback
    # after decoding, and the results file left alone blocked every later evaluate there
    _decoded_as_a(monkeypatch)
    folder = os.fsdecode(os.path.join(os.fsencode(str(tmp_path)), b"\xff"))
    out = os.path.join(folder, "m.json")
    for _ in range(2):                                   # its own outputs are replaced
        assert main(["evaluate", "--run", trained_run, "--out", out]) == 0
        assert f"metrics: {tmp_path}/\\xff/m.json" in capsys.readouterr().out
        with open(out, "rb") as f:
            metrics = json.loads(f.read().decode("utf-8"))          # strict UTF-8
        assert metrics["metrics_file"] == f"{tmp_path}/\\xff/m.json"
        assert metrics["results_file"] == f"{tmp_path}/\\xff/m_results.json"
        assert os.path.exists(os.path.join(folder, "m_results.json"))


def test_a_cache_not_utf8_is_refused_before_the_model_loads(trained_run, copy_cache,
                                                            tmp_path):
    """evaluate reads the features in TensorFlow, by UTF-8 paths: --cache of a folder named
    b'caf\\xe9' crashed (ValueError: Error converting unicode string) instead."""
    cache = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    os.rename(copy_cache, cache)
    out = str(tmp_path / "m.json")
    with pytest.raises(UserError) as e:
        evaluate.evaluate_run(trained_run, "test", DecodeConfig(), progress=False,
                              use_java=False, out=out, cache=cache)
    assert str(e.value).startswith(f"--cache {tmp_path}/caf\\xe9: not a UTF-8 path")
    assert not os.path.exists(out)
