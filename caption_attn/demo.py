"""The offline end-to-end demo: every stage of the product on the built-in shapes dataset.

make-shapes -> extract-features (seeded random InceptionV3, no network) -> train ->
evaluate (test split) -> caption a few test images with attention heatmaps, all inside one
work folder. Rerunning reuses what is already there (the dataset, the feature cache, a
finished run), like the individual commands do; a rerun with settings that shape those is
refused (`--fresh` starts over).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import stat
import time
from typing import Optional

from caption_attn import backbone as backbone_lib
from caption_attn import shapes
from caption_attn.backbone import native_bfloat16
from caption_attn.config import (BACKBONE_PRECISIONS, DataConfig, DecodeConfig, DemoConfig,
                                 ExtractConfig, ModelConfig, RunConfig, ShapesConfig,
                                 TrainConfig)
from caption_attn.feature_cache import extract_command
from caption_attn.fileio import (check_utf8_path, file_digest, holding_lock, read_json,
                                 remove_path, write_json_atomic)
from caption_attn.errors import OutOfMemory, UserError
from caption_attn.run import check_folder_writable, folder_write_problem

TARGETS = {"scene_accuracy": 0.95, "Bleu_4": 0.90, "grounding": 0.90}
# What the demo makes in its work folder, and the settings that may change between reruns
# (the others shape the dataset, the cache or the model, which a rerun reuses).
MADE = ("shapes", "features_cache", os.path.join("models", "shapes"), "heatmaps", "demo.json")
RERUN_MAY_CHANGE = ("workdir", "fresh", "epochs", "scst_after", "beam", "show")
# Settings added to demo.json after it came to exist, and the value a demo made before then
# had: its demo.json lacks them (stop 69: --ema; those demos trained without the average).
RECORDED_SINCE = {"ema": 0.0}


def check_workdir(cfg: DemoConfig) -> None:
    """Refuse to reuse a work folder made with other settings (listing the differences);
    with `cfg.fresh` delete what the demo made there first. Records the settings in
    `<workdir>/demo.json`."""
    work = os.path.abspath(cfg.workdir)
    record = os.path.join(work, "demo.json")
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RERUN_MAY_CHANGE}
    _refuse_inside_another_demo(cfg.workdir)
    if not os.path.exists(record):
        # the demo writes demo.json before anything else: without it, these are someone
        # else's (`--workdir .` in a project holds its own features_cache and models/shapes),
        # which --fresh must never delete, nor a demo extract or train into
        foreign = [name for name in MADE if os.path.lexists(os.path.join(work, name))]
        if foreign:
            raise UserError(
                f"--workdir {cfg.workdir}: holds {', '.join(foreign)} but no demo.json, so "
                f"they are not a demo's (or an old demo's, made before demo.json): the demo "
                f"neither reuses nor deletes them (not even with --fresh): choose an empty or "
                f"new --workdir, or delete them by hand if they are an old demo's")
    if cfg.fresh:
        _delete_made(work)
    elif os.path.exists(record):
        saved = read_json(record)
        if not isinstance(saved, dict):
            raise UserError(f"{record}: a JSON {type(saved).__name__}, not the object of "
                            f"settings the demo writes, so what {work} holds cannot be told "
                            f"apart from a demo made with other settings; add --fresh to "
                            f"delete it and start over, or choose another --workdir")
        # every other setting has been in demo.json since it exists: one missing is an
        # edited (or foreign) record, not an older demo's, and cannot vouch for the folder
        saved = {**RECORDED_SINCE, **saved}
        differences = [f"{k}: {saved[k]!r} -> {v!r}" if k in saved else
                       f"{k}: not recorded -> {v!r}"
                       for k, v in settings.items() if k not in saved or saved[k] != v]
        if differences:
            raise UserError(
                f"{work} holds a demo made with other settings:",
                lines=[*(f"  {d}" for d in differences),
                       "rerun with the same flags to reuse it, choose another --workdir, or add "
                       "--fresh to delete it and start over"])
    write_json_atomic(record, settings)


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Held while a demo works in `workdir` (made for it): an exclusive flock on
    WORKDIR/.demo.lock. A `demo --fresh` beside a running demo deleted everything that demo
    was making, and a second demo without --fresh was refused halfway in train's or
    extract-features' terms (their --run, --cache: flags the demo does not have)."""
    with holding_lock(os.path.join(workdir, ".demo.lock"), lambda who: (
            f"--workdir {workdir}: another `caption-attn demo`{who} is working in it now; "
            f"a second demo (or its --fresh) would delete or write over what that one "
            f"makes: wait for it to end, or choose another --workdir"), make_folder=True):
        yield


def _delete_made(work: str) -> None:
    """--fresh: delete what the demo made in `work` (refused, nothing deleted, when its
    heatmaps folder holds files the demo did not draw: a rerun refuses them too). A link
    among them (a big cache moved elsewhere and linked back) is removed as a link, never its
    target's contents: the target is outside the work folder, and may hold more than the
    demo's files. Every folder to be
    emptied is checked before anything is deleted: a refusal halfway (rmtree refused a link
    after `shapes` was gone) left a half-deleted work folder."""
    heatmaps = os.path.join(work, "heatmaps")
    listed = _foreign_heatmaps(heatmaps)   # as a rerun refuses them (`check_heatmaps_folder`)
    if listed:
        raise UserError(f"--fresh: {heatmaps} holds files the demo did not draw ({listed}); "
                        f"nothing was deleted: move them out of it, or choose another "
                        f"--workdir")
    doomed = [os.path.join(work, name) for name in MADE
              if os.path.lexists(os.path.join(work, name))]
    for path in doomed:
        folders = [os.path.dirname(path)]
        if os.path.isdir(path) and not os.path.islink(path):
            folders += [folder for folder, _, _ in os.walk(path)]   # links are not followed
        for folder in folders:
            problem = folder_write_problem(folder)   # (os.access alone says yes to root)
            if problem:
                raise UserError(f"--fresh: cannot delete what the demo made in --workdir "
                                f"{work}: {problem}; nothing was deleted")
    for path in doomed:
        try:
            remove_path(path)
        except OSError as e:
            raise UserError(f"--fresh: cannot delete {e.filename or path} ({e.strerror}); "
                            f"delete what is left of {path} by hand, then rerun") from None


FOLDERS = (("shapes", "dataset"), ("cache", "feature cache"), ("run", "run folder"),
           ("heatmaps", "heatmaps folder"))


def check_paths(cfg: DemoConfig, paths: dict) -> None:
    """`UserError` in the demo's terms unless each of its folders (`paths`) is a folder or
    can be made as one: a file `WORKDIR/models` was found by train, after make-shapes and
    extract-features had run in full, naming train's --run. What --fresh will delete is
    taken as gone."""
    work = os.path.abspath(cfg.workdir)
    doomed = {os.path.join(work, name) for name in MADE} if cfg.fresh else set()
    for key, label in FOLDERS:
        probe = paths[key]
        while (probe in doomed or not os.path.lexists(probe)) \
                and probe != os.path.dirname(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise UserError(f"--workdir {cfg.workdir}: {probe} is not a folder, but the demo "
                            f"makes its {label} {paths[key]} there: move it away, or choose "
                            f"another --workdir")
        check_folder_writable(probe, f"--workdir {cfg.workdir}: the demo's {label} in")


def _refuse_inside_another_demo(workdir: str) -> None:
    """UserError when `workdir` is inside what another demo's work folder owns (its dataset,
    cache, run or heatmaps): that demo's --fresh, re-rendering or heatmaps (redrawn on every
    run) would delete this one, and this one's files would sit in that one's folders."""
    real = os.path.realpath(workdir)
    parent = os.path.dirname(real)
    while parent != os.path.dirname(parent):
        if os.path.isfile(os.path.join(parent, "demo.json")):
            rel = os.path.relpath(real, parent)
            for name in MADE[:-1]:
                if rel == name or rel.startswith(name + os.sep):
                    raise UserError(
                        f"--workdir {workdir}: inside {os.path.join(parent, name)}, which the "
                        f"demo in {parent} owns (it deletes or rewrites it on reruns and with "
                        f"--fresh); choose a folder outside it")
        parent = os.path.dirname(parent)


def _other_dataset(saved, cfg: DemoConfig) -> Optional[str]:
    """Why the captions.json `saved` is not the dataset the demo renders with `cfg` (None
    when it is): other images, splits or captions than --seed and --num-images give."""
    shapes_cfg = ShapesConfig(num_images=cfg.num_images, seed=cfg.seed)
    if not isinstance(saved, dict) or saved.get("dataset") != shapes.DATASET_NAME \
            or not isinstance(saved.get("images"), list):
        return "not a shapes dataset"
    images = saved["images"]
    if len(images) != cfg.num_images:
        return f"{len(images)} images, not --num-images {cfg.num_images}"
    names, splits = shapes.names_and_splits(shapes_cfg)
    if [(r.get("filename"), r.get("split")) if isinstance(r, dict) else None
            for r in images] != [(n, splits[n]) for n in names]:
        return f"other image names or splits than --seed {cfg.seed} gives"
    for index in sorted({0, cfg.num_images - 1}):
        _, record = shapes.make_example(index, cfg.seed, shapes_cfg.image_size)
        if any(images[index].get(k) != v for k, v in record.items()):
            return f"other scenes or captions than --seed {cfg.seed} gives ({names[index]})"
    return None


def _dataset(cfg: DemoConfig, folder: str, log) -> dict:
    captions = os.path.join(folder, "captions.json")
    if os.path.exists(captions):
        why = _other_dataset(read_json(captions), cfg)
        if why is None:
            log(f"reusing {captions}")
            return {"images_dir": os.path.join(folder, "images"), "captions": captions}
        if os.path.isdir(os.path.join(os.path.dirname(folder), "features_cache")):
            # replaced after the demo made it (make-shapes --replace into it): extracting
            # and training on it would overwrite the cache's features of the demo's images
            raise UserError(f"{captions}: not the dataset this demo renders with these "
                            f"settings ({why}): replaced since (make-shapes --replace), or "
                            f"rendered by an older version of the demo; add --fresh to start "
                            f"the demo over, or choose another --workdir")
    # the demo owns this folder: a half-rendered dataset of a killed run is replaced
    summary = shapes.make_shapes(folder, ShapesConfig(num_images=cfg.num_images, seed=cfg.seed,
                                                      replace=True))
    log(f"rendered {summary['images']} images in {summary['seconds']:.1f} s")
    return summary


def _recorded_precision(cache: str) -> Optional[str]:
    """The backbone precision the manifest of `cache` records; None without a (readable)
    one, whose problems extract-features names."""
    try:
        manifest = read_json(os.path.join(cache, "manifest.json"), file_names=True)
    except (UserError, OSError):
        return None
    precision = manifest.get("precision") if isinstance(manifest, dict) else None
    return precision if precision in BACKBONE_PRECISIONS else None


def backbone_precision(cfg: DemoConfig, cache: str, log) -> str:
    """The precision of the demo's backbone: bfloat16 where it runs natively
    (`native_bfloat16`), float32 elsewhere (AVX2-only CPUs, oneDNN off, GPUs before
    Ampere); but a cache already extracted keeps the precision it was made in (its
    manifest records it), so a rerun reuses it on any CPU (one made on another CPU kind, or
    under the README's ONEDNN_MAX_CPU_ISA=AVX2) as the README promises. The demo has no
    --precision, so the refusal extract-features gave there named flags it has not."""
    mine = "bfloat16" if native_bfloat16() else "float32"
    recorded = _recorded_precision(cache)
    if recorded is None or recorded == mine:
        return mine
    cap = backbone_lib.onednn_aborts_on("bfloat16")
    if recorded == "bfloat16" and cap:
        # oneDNN capped below bfloat16 gets bfloat16 ops it has no kernel for: the process
        # aborts (in extract-features or in captioning the test images)
        raise UserError(f"--workdir {cfg.workdir}: its feature cache {cache} was extracted "
                        f"with a bfloat16 backbone, which oneDNN capped at {cap} "
                        f"(ONEDNN_MAX_CPU_ISA) cannot run: unset ONEDNN_MAX_CPU_ISA to reuse "
                        f"it, or add --fresh to start the demo over in float32")
    slower = " (bfloat16 is emulated here: slower)" if recorded == "bfloat16" else ""
    log(f"note: {cache} was extracted in {recorded}, and the demo keeps its precision to "
        f"reuse it{slower}; this machine would pick {mine} (--fresh starts over in {mine})")
    return recorded


# The demo's advice where a run's images changed since it trained on them: train's says
# --cache, --run or a new run, which the demo has not got.
_CHANGED_IMAGES_ADVICE = ("add --fresh to render the dataset again and start the demo over, or "
                          "choose another --workdir")


def check_images_unchanged(cfg: DemoConfig, images_dir: str, run: str) -> None:
    """UserError, before extraction, when images the demo's run trained on (the digests its
    split.json records) have other contents in `images_dir` now: extract-features took them
    as changed and extracted them again over the run's features, and only then train
    refused, in its terms (`RunFolder.check_image_digests`: --cache, a new run). An image
    only touched (same bytes) passes; a missing or unreadable one, and a split.json that
    cannot be read, are left to the stages that name them."""
    from caption_attn.feature_cache import IMAGE_DIGEST_CHARS
    from caption_attn.run import RunFolder

    try:
        recorded = RunFolder(run).image_digests()
    except (UserError, OSError):
        return
    changed = []
    for key, digest in recorded.items():
        try:
            now = file_digest(os.path.join(images_dir, key))[:IMAGE_DIGEST_CHARS]
        except OSError:
            continue
        if now != digest:
            changed.append(key)
    if changed:
        listed = ", ".join(sorted(changed)[:3]) + (", ..." if len(changed) > 3 else "")
        raise UserError(f"--workdir {cfg.workdir}: {len(changed)} of the {len(recorded)} images "
                        f"the demo trained on changed in {images_dir} since ({listed}): the "
                        f"demo would extract their features again over those the run was "
                        f"trained on; {_CHANGED_IMAGES_ADVICE}")


def extract_config(cfg: DemoConfig, paths: dict, precision: str) -> ExtractConfig:
    """The extract-features settings of the demo's cache."""
    return ExtractConfig(cache=paths["cache"], weights="random", seed=cfg.seed,
                         dtype="float16", precision=precision)


def extract_stage(cfg: DemoConfig, data: dict, paths: dict, precision: str) -> dict:
    """Stage 2: `extract.extract_features` with the demo's settings. A cache of other
    settings was refused in extract-features' terms (--cache, --precision, --dtype), flags
    the demo has not: said in the demo's instead."""
    from caption_attn import extract
    from caption_attn.feature_cache import OtherCache

    try:
        return extract.extract_features(data["images_dir"],
                                        extract_config(cfg, paths, precision))
    except OtherCache as e:
        raise UserError(f"--workdir {cfg.workdir}: its feature cache {e.cache} holds "
                        f"features made with {e.made}, the demo asks for {e.wanted}: add "
                        f"--fresh to start the demo over, or choose another --workdir",
                        e.exit_code, e.lines) from None


@contextlib.contextmanager
def out_of_memory_advice(cfg: DemoConfig, doing: str, advice: str):
    """A stage's out of memory (`OutOfMemory`) said in the demo's terms: `doing` what, and
    the `advice`. The stages' own messages name flags the demo has not (extract-features'
    and evaluate's --batch-size, train's --memory-cache-gb) or has for another stage (its
    --batch-size is training's)."""
    try:
        yield
    except OutOfMemory as e:
        raise OutOfMemory(f"--workdir {cfg.workdir}: out of memory {doing} ({e.what}); "
                          f"{advice}", e.what) from None


def _out_of_memory_advice(cfg: DemoConfig, stage: str, data: dict, paths: dict,
                          precision: str):
    """`out_of_memory_advice` for the demo's `stage` (extract, train, evaluate, caption):
    what it did, and the command that does it in smaller batches (what is done is kept)."""
    extract_cfg = extract_config(cfg, paths, precision)
    images = (extract_cfg if stage == "extract" else DecodeConfig()).batch_size
    fewer = f"--batch-size {max(1, images // 4)}"
    run = shlex.quote(paths["run"])
    if stage == "extract":
        settings = {name: getattr(extract_cfg, name)    # the manifest's, as recorded
                    for name in ("weights", "seed", "dtype", "precision")}
        # as the demo extracts: every image of the folder (no --captions)
        command = extract_command(paths["cache"], settings, images_dir=data["images_dir"])
        command = f"{command} {fewer}"
        return out_of_memory_advice(
            cfg, f"extracting features, {images} images at a time",
            f"extract the rest in smaller batches, then rerun the demo (it keeps the features "
            f"written): {command}")
    if stage == "train":
        return out_of_memory_advice(
            cfg, "while training", f"rerun the demo with --fresh and a lower --batch-size "
            f"(now {cfg.batch_size}), or smaller --units / --embedding-dim (now {cfg.units} / "
            f"{cfg.embedding_dim})")
    if stage == "evaluate":
        return out_of_memory_advice(
            cfg, f"evaluating the test split, {images} images at a time",
            f"the model is trained: evaluate it in smaller batches: caption-attn evaluate "
            f"--run {run} --beam {cfg.beam} {fewer}")
    return out_of_memory_advice(
        cfg, f"captioning the test images, {images} at a time", f"the model is trained and "
        f"evaluated: caption in smaller batches: caption-attn caption --run {run} --beam "
        f"{cfg.beam} {fewer} --plot-attention {shlex.quote(paths['heatmaps'])} IMAGE...")


def run_config(cfg: DemoConfig, captions: str, cache: str) -> RunConfig:
    return RunConfig(
        captions=captions, cache=cache, data=DataConfig(seed=cfg.seed),
        model=ModelConfig(embedding_dim=cfg.embedding_dim, units=cfg.units,
                          dropout=cfg.dropout, attention_reg=cfg.attention_reg),
        train=TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size,
                          learning_rate=cfg.learning_rate, ema=cfg.ema,
                          # cosine over the cross-entropy epochs; --scst-after 0 has none
                          lr_schedule="constant" if cfg.scst_after == 0 else "cosine",
                          patience=cfg.epochs, sample_images=2,
                          scst_after=None if cfg.scst_after == cfg.epochs else cfg.scst_after))


# what the demo's stage 5 leaves in its heatmaps folder besides the heatmaps (marked PNGs):
# the lock of `captioner.heatmap_lock`, and a heatmap's temporary file a killed run left
# (`fileio.temp_name`: `.NAME.png.tmp.<pid>.<host>`)
_OWN_EXTRAS = re.compile(r"\.caption-attn\.lock|\..+\.png\.tmp\.\d+\..+")


def _own_heatmap_files(folder: str) -> tuple[list, list]:
    """(the demo's files in its heatmaps `folder`, the names of the others) by what they
    are: a regular file marked as a heatmap (`images.is_heatmap_file`, never a link) or one
    of `_OWN_EXTRAS`; anything else, a folder included (the demo makes none there), is not
    the demo's. Both empty for a missing folder."""
    from caption_attn.images import is_heatmap_file

    own, others = [], []
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for name in names:
        path = os.path.join(folder, name)
        if is_heatmap_file(path) or (_OWN_EXTRAS.fullmatch(name)
                                     and stat.S_ISREG(os.lstat(path).st_mode)):
            own.append(path)
        else:
            others.append(name + "/" if os.path.isdir(path) and not os.path.islink(path)
                          else name)
    return own, others


def _foreign_heatmaps(folder: str) -> str:
    """The first names of what the heatmaps `folder` holds that the demo did not draw
    (`_own_heatmap_files`), "" when nothing; a link is removed as a link: not looked into."""
    others = [] if os.path.islink(folder) else _own_heatmap_files(folder)[1]
    return ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")


def check_heatmaps_folder(cfg: DemoConfig, folder: str) -> None:
    """UserError, before the first stage, when the heatmaps `folder` holds anything the demo
    did not draw: a rerun deleted the whole folder, files of one's own put there with it,
    without a word. The demo removes only its own heatmaps (`caption_test_images`) and, as
    it does with other folders it did not make, refuses rather than work beside them (after
    training and evaluating, `caption`'s check of the folder refused images there). A
    heatmaps link is removed as a link (`caption_test_images`): not checked."""
    listed = _foreign_heatmaps(folder)
    if listed:
        raise UserError(f"--workdir {cfg.workdir}: {folder} holds files the demo did not draw "
                        f"({listed}); a rerun redraws the demo's heatmaps there and deletes "
                        f"only those it drew, so it leaves these alone and stops here, nothing "
                        f"deleted: move them out of {folder}, or choose another --workdir")


def _remove_own_heatmaps(folder: str) -> None:
    """Remove the heatmaps an earlier demo run drew in `folder` (`_own_heatmap_files`), and
    the folder if nothing else is left; a link is removed as a link, its target left."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        if os.path.lexists(folder):
            remove_path(folder)
        return
    own, others = _own_heatmap_files(folder)
    for path in own:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    if not others:
        with contextlib.suppress(OSError):   # something put there meanwhile: kept
            os.rmdir(folder)


def caption_test_images(cfg: DemoConfig, paths: dict, images_dir: str, log) -> dict:
    """Stage 5: caption the first `cfg.show` test images and draw their heatmaps into the
    heatmaps folder, after removing every heatmap an earlier demo run drew there: those of a
    larger --show, another --beam, fewer --epochs (an older model) would otherwise stay
    beside the new ones, looking like this model's. Only those: files of one's own there
    are kept (`check_heatmaps_folder` refused them before the first stage). A heatmaps link
    is removed as a link (as by --fresh), its target left alone: rmtree refused it, after
    evaluating. Returns the images that failed (path -> reason)."""
    from caption_attn import captioner

    _remove_own_heatmaps(paths["heatmaps"])
    if not cfg.show:
        log("[5/5] caption test images: skipped (--show 0)")
        return {}
    with open(os.path.join(paths["run"], "split.json"), encoding="utf-8") as f:
        test_keys = json.load(f)["splits"]["test"][:cfg.show]
    # the number captioned: a --show above the test split's size captions all of it
    fewer = f" (all the test split holds; --show {cfg.show})" if len(test_keys) < cfg.show \
        else ""
    log(f"[5/5] caption {len(test_keys)} test images{fewer} -> {paths['heatmaps']}")
    model = captioner.Captioner.from_run(paths["run"], DecodeConfig(beam=cfg.beam))
    images = [os.path.join(images_dir, k) for k in test_keys]
    results, errors = model.caption_images(images)
    for path, (image, captions) in results.items():
        log(captioner.format_captions(path, captions))
    for path, reason in errors.items():
        log(f"could not caption {path}: {reason}")
    captioner.save_attention_plots(paths["heatmaps"], results)
    return errors


def train_stage(cfg: DemoConfig, data: dict, paths: dict, log) -> dict:
    """Stage 3: `train.train` with the demo's settings. Its refusals speak of train's
    flags; the demo passes its --scst-after equal to --epochs (cross-entropy only) on as
    train's `none`, which the demo has not got: said in the demo's terms instead."""
    from caption_attn import train
    from caption_attn.train_data import GIVEN_WHY

    def said(line: str) -> None:   # the demo gives train its images folder: no --images flag
        log(line.replace(f"({GIVEN_WHY})", "(the demo's dataset)"))
    try:
        return train.train(run_config(cfg, data["captions"], paths["cache"]), paths["run"],
                           images_dir=data["images_dir"], log=said)
    except UserError as e:
        message = e.message
        guess = message.find(": the cache of another dataset? Point --cache at the run's")
        if guess > 0 and "extracted from other images than the run's" in message:
            # the cache already holds the changed images' features (an earlier rerun
            # extracted them): `check_images_unchanged` passed, train refused
            raise UserError(f"--workdir {cfg.workdir}: {message[:guess]}: images the demo "
                            f"trained on changed since; {_CHANGED_IMAGES_ADVICE}",
                            e.exit_code, e.lines) from None
        if "--scst-after none" not in message and "(was none" not in message:
            raise
        message = message.replace("(was none", "(was equal to the run's --epochs, "
                                  "cross-entropy only")
        message = message.replace("the run's --scst-after none",
                                  "the run's --scst-after equal to its --epochs (cross-entropy "
                                  "only)")
        message = message.replace("--scst-after none", f"--scst-after {cfg.scst_after} (= "
                                  f"--epochs {cfg.epochs}: cross-entropy only)")
        raise UserError(message, e.exit_code, e.lines) from None


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Run every stage into `cfg.workdir`; returns the metrics and where everything is."""
    from caption_attn import distribute, evaluate, extract, train

    start = time.perf_counter()
    work = os.path.abspath(cfg.workdir)
    paths = {"shapes": os.path.join(work, "shapes"),
             "cache": os.path.join(work, "features_cache"),
             "run": os.path.join(work, "models", "shapes"),
             "heatmaps": os.path.join(work, "heatmaps")}
    timings = {}
    # every setting checked (the training ones by TrainConfig) before anything is written
    check_utf8_path("--workdir", cfg.workdir, "writes the run's checkpoints and logs")
    check_folder_writable(work, "--workdir")
    try:
        distribute.check_strategy("default")
    except UserError:
        raise UserError("the TF_CONFIG environment variable describes a cluster of several "
                        "processes, but the demo trains on this machine alone (and each "
                        "worker started with it would write the same folders): unset "
                        "TF_CONFIG") from None
    run_cfg = run_config(cfg, os.path.join(paths["shapes"], "captions.json"), paths["cache"])
    train.check_train_flags(run_cfg.train)
    try:
        train.check_model_size(run_cfg)
    except UserError as e:   # said in train's flags: the demo has no --vocab-size
        raise e.reworded(e.message.replace(
            "(the TF tutorial's: 512 / 256) or --vocab-size",
            f"(the demo's defaults: {DemoConfig.units} / {DemoConfig.embedding_dim})")) \
            from None
    check_paths(cfg, paths)
    # one demo per work folder at a time, from before --fresh deletes anything to its end
    with workdir_lock(cfg.workdir):
        check_workdir(cfg)
        check_heatmaps_folder(cfg, paths["heatmaps"])
        precision = backbone_precision(cfg, paths["cache"], log)

        log(f"[1/5] make-shapes -> {paths['shapes']}")
        t = time.perf_counter()
        data = _dataset(cfg, paths["shapes"], log)
        timings["make_shapes"] = time.perf_counter() - t

        log(f"[2/5] extract-features (random InceptionV3, seed {cfg.seed}, {precision}) -> "
            f"{paths['cache']}")
        t = time.perf_counter()
        check_images_unchanged(cfg, data["images_dir"], paths["run"])
        with _out_of_memory_advice(cfg, "extract", data, paths, precision):
            summary = extract_stage(cfg, data, paths, precision)
        log(extract.format_summary(summary))
        timings["extract_features"] = time.perf_counter() - t

        log(f"[3/5] train -> {paths['run']}")
        t = time.perf_counter()
        with _out_of_memory_advice(cfg, "train", data, paths, precision):
            trained = train_stage(cfg, data, paths, log)
        log(train.format_summary(trained))
        timings["train"] = time.perf_counter() - t

        log(f"[4/5] evaluate the test split (beam {cfg.beam})")
        t = time.perf_counter()
        with _out_of_memory_advice(cfg, "evaluate", data, paths, precision):
            metrics = evaluate.evaluate_run(paths["run"], "test", DecodeConfig(beam=cfg.beam))
        timings["evaluate"] = time.perf_counter() - t

        t = time.perf_counter()
        with _out_of_memory_advice(cfg, "caption", data, paths, precision):
            errors = caption_test_images(cfg, paths, data["images_dir"], log)
        timings["caption"] = time.perf_counter() - t

        seconds = time.perf_counter() - start
        log("")
        log(evaluate.format_metrics(metrics))
        for note in metrics["notes"]:   # as `evaluate` says them (METEOR n/a without Java)
            log(f"note: {note}")
        for name, target in TARGETS.items():
            value = metrics.get(name)
            mark = "n/a" if value is None else "met" if value >= target else "below target"
            log(f"target {name} >= {target}: {mark}")
        log(f"\ndemo finished in {seconds:.0f} s "
            + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
        log(f"TensorBoard:   tensorboard --logdir {os.path.join(paths['run'], 'logs')}")
        attention = os.path.join(paths['run'], 'attention')
        log(f"heatmaps:      {paths['heatmaps']} (and per epoch in {attention})" if cfg.show else
            f"heatmaps:      none drawn (--show 0); per epoch in {attention}")
        log(f"best model:    {os.path.join(paths['run'], 'best.keras')}")
        log(f"metrics:       {metrics['metrics_file']}")
        log(f"caption more:  caption-attn caption --run {paths['run']} IMAGE...")
        return {"metrics": metrics, "paths": paths, "seconds": seconds, "timings": timings,
                "errors": errors}
