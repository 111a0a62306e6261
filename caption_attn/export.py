"""`caption-attn export`: a trained run as one model that needs TensorFlow only.

SavedModel (DIR), signature `serving_default` (N images, K beams, L = max_length):
    images         string (N,)           encoded image files (JPEG, PNG, GIF, BMP, WebP)
 -> captions       string (N,)           best caption, words joined by spaces, no special tokens
    scores         float32 (N,)          its log-probability; -inf: the image was not decodable
                                         (or every beam died: `load_images`' decoded says)
    words          string (N, L)         its words, "" after the last
    attention      float32 (N, L, 8, 8)  the 8x8 map of each word, zero after the last
    beam_captions  string (N, K)         all K beams, best first ("" for a dead beam)
    beam_scores    float32 (N, K)        their log-probabilities
and signature `load_images`, the TFLite model's input prepared with TensorFlow alone:
    images         string (N,)           encoded image files, as above
 -> pixels         uint8 (N, 299, 299, 3)
                                         each decoded and resized as serving_default does
                                         (zero where not decodable)
    decoded        bool (N,)             whether it was

Everything is in the graph: decoding and resizing (`graph_images`, which imitates
images.load_image), InceptionV3 with the weights and feature scale of the run's cache
(`Backbone.forward`), the run's model with its feature standardisation, the decoder of
`caption` (`captioner.make_decoder`: beam search or greedy in one tf.while_loop) and the id ->
word lookup (a constant). Images are decoded by a tf.data pipeline with `ignore_errors`: one
that cannot be decoded is left out before the backbone and gets "" and -inf, the others are
captioned as usual.

TFLite (DIR/captioner.tflite with DIR/vocab.json), signature `serving_default`:
    image      uint8 (1, 299, 299, 3)  an RGB image already resized like images.load_image
 -> token_ids  int32 (1, L)            the greedy caption's ids up to <end>, then 0 (<pad>)
    scores     float32 (1,)            its log-probability
    attention  float32 (1, L, 8, 8)    the map of each token id (<end> included), then zero
Built-in TFLite ops only: the decoder's tf.while_loop becomes a WHILE op. It computes in
float32 even for a bfloat16 run (bfloat16 is not a TFLite type): export says so, and
export.json records each part's precision there (`tflite.precision`, `tflite.converted`).

Nothing is written under DIR until the export is complete: it is made in a hidden temporary
folder next to DIR and renamed into place. DIR/assets.extra/ (TF Serving's place for a
version's extra files, such as its warmup requests) is copied into the new export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import hashlib
import os
import re
import shutil
import time
import warnings
from typing import Optional

import numpy as np
import tensorflow as tf

from caption_attn import __version__, graph_images, interrupts, quiet
from caption_attn.backbone import GRID, IMAGE_SIZE, NUM_PIXELS, Backbone, build_backbone
from caption_attn.captioner import EXPORT_NEEDS, Captioner, make_decoder, run_images_folders
from caption_attn.config import DecodeConfig, ExportConfig
from caption_attn.errors import UserError, counted, free_space
from caption_attn.feature_cache import (IMAGE_DIGEST_CHARS, is_stale_temp, read_manifest,
                                         source_images)
from caption_attn.fileio import (check_utf8_path, file_digest, holding_lock, is_inside,
                                 read_json, remove_path, temp_name, write_bytes_atomic,
                                 write_json_atomic)
from caption_attn.images import ImageError, load_image
from caption_attn.model import ShowAttendTell
from caption_attn.run import RunFolder, check_folder_writable, metric_text
from caption_attn.vocab import END, PAD, START

INFO_FILE = "export.json"        # what was exported from which run; marks DIR as an export
TFLITE_FILE = "captioner.tflite"
VOCAB_FILE = "vocab.json"
# What an export writes into DIR (tf.saved_model.save's files, then ours): replaced by the next.
EXPORT_FILES = ("saved_model.pb", "fingerprint.pb", "variables", "assets", INFO_FILE,
                TFLITE_FILE, VOCAB_FILE)
# TF Serving's folder for the user's extra files of a version (its warmup requests,
# assets.extra/tf_serving_warmup_requests): carried over into the next export of DIR.
KEPT = "assets.extra"
EXPORT_FORMAT = 1
SIGNATURE = "serving_default"
LOAD_SIGNATURE = "load_images"   # the SavedModel's second: the TFLite model's input
# What an image that cannot be decoded gets, per output.
FILL = {"captions": "", "scores": float("-inf"), "words": "", "attention": 0.0,
        "beam_captions": "", "beam_scores": float("-inf")}


# ----------------------------------------------------------------------------- the command
def export_run(run_dir: str, out: str, decode_cfg: DecodeConfig, cfg: ExportConfig,
               cache: Optional[str] = None, log=print) -> dict:
    """Export the best model of `run_dir` into folder `out`; returns export.json's content.
    `cache` replaces the run's feature cache, whose manifest gives the backbone.

    Bad input (unknown run, no best model, an `out` that is not an earlier export of this run
    or holds other files besides it, without `cfg.force`; with it too, an `out` that is no
    export but holds files, or the run, its cache, caption file or images folders; an
    unwritable `out`, one that cannot be renamed: `.`, `..`, a mount point; an assets.extra/
    that cannot be read) is a one-line UserError before any work. The new export replaces
    `out`, whose assets.extra/ it keeps."""
    if decode_cfg.method == "sample":
        raise UserError("export decodes with beam search or greedy, not --sample")
    # `serving/current/` (a shell completes a symlink so) names the link's target to the OS:
    # the checks saw the earlier export there, and the final rename of the link failed
    out = out.rstrip(os.sep + (os.altsep or "")) or out
    _refuse_dot_names(out)
    check_utf8_path("--out", out, "writes the SavedModel")
    run = RunFolder(run_dir)
    # no `train --fresh` deleting the run meanwhile, and one export into `out` at a time
    with run.reading_lock("export"), contextlib.ExitStack() as hold:
        return _export(run, run_dir, out, decode_cfg, cfg, cache, log, hold)


def _export(run: RunFolder, run_dir: str, out: str, decode_cfg: DecodeConfig,
            cfg: ExportConfig, cache: Optional[str], log, hold: contextlib.ExitStack) -> dict:
    """`export_run`'s work; `hold` is given its lock on `out`, once `out` passed its checks
    (the lock file's folder is made then), and `out` is checked again under it."""
    run_cfg = run.load_config()
    cache_dir = cache or run_cfg.cache
    keep = (run.path, cache_dir, run_cfg.captions)
    images = run_images_folders(run, cache_dir)
    _check_out(out, run, cfg.force, keep=keep, cache=cache_dir, images=images)
    hold.enter_context(_exporting_to(out))
    _restore_killed_publish(out, log)
    # what is there now, locked
    _check_out(out, run, cfg.force, keep=keep, cache=cache_dir, images=images)
    replaced = _earlier_info(out)
    checked = _not_written_by_exports(out)      # what replacing `out` may delete
    start = time.perf_counter()
    # A run still training can replace best.keras (and best.json) at any time: export.json
    # records the best epoch read with the model, and a model replaced while it was being
    # loaded is refused (the record, read 40 s later at the end, named the next best epoch).
    captioner, best_record = run.read_best_unchanged(
        lambda: Captioner.from_run(run_dir, decode_cfg, cache=cache, needed_for=EXPORT_NEEDS,
                                   computes=False,     # traced only: runs under any cap
                                   needs_backbone=True),
        "the export", "export")
    backbone = captioner.backbone
    _remove_killed_exports(out, log)
    tmp = temp_name(out)
    try:
        try:
            os.makedirs(tmp)
        except OSError as e:
            raise UserError(f"--out {out}: cannot create {tmp} ({e.strerror})") from None
        try:
            log(f"saving the SavedModel (beam {decode_cfg.beam}, max length "
                f"{captioner.max_length}) ...")
            save_servable(tmp, captioner, backbone)
            info = _describe(run, captioner, backbone, best=best_record)
            info["saved_model"]["bytes"] = _folder_bytes(tmp)
            if cfg.tflite:
                log("converting the TFLite model ...")
                info["tflite"] = write_tflite(tmp, run, captioner, backbone, cfg)
                if info["tflite"]["converted"]:
                    log(f"note: {converted_note(info['tflite']['converted'])}")
            _carry_over(out, tmp)
            info["seconds"] = round(time.perf_counter() - start, 1)
            # its run and cache paths as their own bytes (`_earlier_export` reads them back)
            write_json_atomic(os.path.join(tmp, INFO_FILE), info, file_names=True)
        except (tf.errors.OpError, OSError) as e:
            raise _write_failed(out, e) from None
        _refuse_files_added(out, checked)
        left = _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only when something failed
    if replaced:
        changed = changed_settings(replaced, info)
        if changed or not _identifies_model(replaced):
            log(f"note: {replaced_note(out, changed)}")
    if left:
        log(f"note: {left}")
    return info


def _earlier_info(out: str) -> Optional[dict]:
    """export.json of the export in `out` that this one replaces (None: none, or one that
    cannot be read, which only --force replaces)."""
    try:
        info = read_json(os.path.join(out, INFO_FILE), file_names=True)
    except (UserError, OSError):
        return None
    return info if isinstance(info, dict) else None


def _settings(info: dict) -> dict:
    """What an export was made of and with, by the name its note gives it (a field an older
    export.json lacks is left out). The model itself is told by its weights' digest (a run
    retrained at the same path, whose best epoch is often the same, is another model),
    its vocabulary's and the backbone weights' (a cache extracted again at the same path):
    digests by their first 12 hex digits."""
    found = {k: info[k] for k in ("beam", "length_penalty", "max_length") if k in info}
    if isinstance(info.get("cache"), str):   # the same folder, whichever path named it
        found["cache"] = os.path.realpath(info["cache"])
    if isinstance(info.get("run"), str):
        found["run"] = info.get("run_realpath") or os.path.realpath(info["run"])
    if isinstance(info.get("best"), dict):
        best = info["best"]
        found["best epoch"] = best.get("epoch")
        if "value" in best:
            found["best value"] = f"{best.get('monitor')}={best['value']}"
    if isinstance(info.get("weights_sha256"), str):
        found["model weights"] = info["weights_sha256"][:12]
    if "vocab_size" in info:
        found["vocabulary size"] = info["vocab_size"]
    if isinstance(info.get("vocab_sha256"), str):
        found["vocabulary"] = info["vocab_sha256"][:12]
    if isinstance(info.get("backbone"), dict):
        backbone = info["backbone"]
        if isinstance(backbone.get("weights_sha256"), str):
            found["backbone weights"] = backbone["weights_sha256"][:12]
        if "feature_scale" in backbone:
            found["backbone feature scale"] = backbone["feature_scale"]
    for part in ("backbone", "decoder"):
        if isinstance(info.get(part), dict) and "precision" in info[part]:
            found[f"{part} precision"] = info[part]["precision"]
    if isinstance(info.get("saved_model"), dict):   # a signature TF Serving may not have yet
        found["signatures"] = ", ".join(sorted(
            [SIGNATURE] + ([LOAD_SIGNATURE] if "load_images" in info["saved_model"] else [])))
    # the graph: the code that built it, and the TensorFlow that ran it (TF Serving keeps a
    # loaded version's graph whatever the export folder holds since)
    if isinstance(info.get("tensorflow"), str):
        found["tensorflow"] = info["tensorflow"]
    if isinstance(info.get("code_sha256"), str):
        found["caption_attn code"] = info["code_sha256"][:12]
    if "tflite" in info:
        lite = info["tflite"]
        found["tflite"] = "off" if not isinstance(lite, dict) else \
            {"none": "float32"}.get(lite.get("quantize"), lite.get("quantize"))
    return found


def _identifies_model(info: dict) -> bool:
    """Whether export.json `info` records its model's weights digest (exports made before
    it was recorded do not: whether a re-export replaced another model cannot be told)."""
    return isinstance(info.get("weights_sha256"), str)


def changed_settings(earlier: dict, info: dict) -> list:
    """"NAME OLD -> NEW" of each setting (`_settings`) of export.json `info` that differs
    from the `earlier` one's."""
    old, new = _settings(earlier), _settings(info)
    return [f"{k} {old[k]} -> {new.get(k)}" for k in new if k in old and old[k] != new[k]]


def replaced_note(out: str, changed: list) -> str:
    """What a re-export into `out` says when it replaced an export made otherwise
    (`changed`), or (none changed) one whose export.json does not identify its model:
    TF Serving does not load a version number again."""
    parent, version = os.path.split(os.path.abspath(out))
    if version.isdigit():
        taken = []
        with contextlib.suppress(OSError):
            taken = [int(n) for n in os.listdir(parent) if n.isdigit()]
        hint = (f"a TF Serving server that already loaded version {version} will not load it "
                f"again: export into a new version folder, e.g. "
                f"{os.path.join(parent, str(max(taken + [int(version)]) + 1))}")
    else:
        hint = ("a TF Serving server that already loaded it will not load it again: give "
                "each export a new version folder (MODELS/NAME/VERSION)")
    what = f"made with other settings: {'; '.join(changed)}" if changed else (
        f"whose {INFO_FILE} (of an older caption_attn) records no digest of its model: "
        f"whether it held another model cannot be told")
    return f"replaced the export in {out}, {what}; {hint}"


@contextlib.contextmanager
def _exporting_to(out: str):
    """Held from `_check_out` until `_publish`: an exclusive flock on `.NAME.export.lock`
    beside `out` (NAME its name; its folder made for it). Two exports into one --out both
    reported success while the last one's rename won, or the loser failed on the folder the
    other had just published, leaving the earlier export under a hidden temporary name."""
    parent, name = os.path.split(os.path.abspath(out))
    with holding_lock(os.path.join(parent, f".{name}.export.lock"), lambda who: (
            f"--out {out}: another `caption-attn export`{who} is exporting into it now; "
            f"two would replace each other's export: wait for it to end, or choose another "
            f"--out"), make_folder=True):
        yield


# What a write that free space or a writable folder mends fails with
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.EFBIG)


def _write_failed(out: str, e: Exception) -> Exception:
    """The UserError (exit 1) of a write into the temporary folder that failed: a full disk
    (TensorFlow's SaveV2 raises a ResourceExhaustedError, not an OSError, and printed a
    16-frame traceback), a folder that became read-only. `e` itself when free space or a
    writable folder would not mend it: a broken pipe of the log, TensorFlow running out of
    memory, any other TensorFlow error or OSError (a bug, an I/O error), shown as it is."""
    if isinstance(e, BrokenPipeError):
        return e
    if isinstance(e, tf.errors.OpError):
        message = (e.message or str(e)).strip()
        if "OOM" in message or not isinstance(e, (tf.errors.ResourceExhaustedError,
                                                  tf.errors.PermissionDeniedError)):
            return e   # not a write that failed: a bug, shown as it is
        # "{{function_node ...}} DIR/variables_temp/part-...; No space left on device [Op:SaveV2]"
        reason = re.sub(r"\s*\[Op:\w+\]$", "", message).split("; ")[-1]
    elif e.errno not in _WRITE_ERRNOS:
        return e
    else:
        reason = _reason(e, named=False)
    folder = os.path.dirname(os.path.abspath(out))
    return UserError(f"--out {out}: cannot write the export into {folder} "
                     f"({reason.splitlines()[0][:200]}): "
                     f"{free_space(alternative='make it writable')}; {out} is as it was",
                     exit_code=1)


def _killed_exports(out: str) -> list:
    """The temporary folders (or, for a symlink `out`, links) that exports to `out` killed
    before their end (kill -9, power loss) left next to it: their process is gone."""
    parent, base = os.path.split(os.path.abspath(out))
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    paths = [os.path.join(parent, name) for name in names if name.startswith(f".{base}.tmp.")]
    return [path for path in paths if (os.path.isdir(path) or os.path.islink(path))
            and is_stale_temp(path, os.path.basename(path))]


def _remove_killed_exports(out: str, log) -> None:
    """Delete what exports to `out` killed before their end left next to it
    (`_killed_exports`), saying so; one that cannot be deleted is named, and left."""
    for path in _killed_exports(out):
        try:
            remove_path(path)       # a symlink .old (`--out current`): the link, not its target
        except OSError as e:
            log(f"note: could not remove {path}, left by an export that did not finish "
                f"({_reason(e)}): remove it yourself")
            continue
        log(f"removed {path}, left by an export that did not finish")


def _restore_killed_publish(out: str, log) -> None:
    """Put back the earlier export that an export killed between `_publish`'s two renames
    left under its hidden .old name, `out` missing (kill -9, power loss): the next export
    deleted it with the other leftovers, and a server had no model until an export ended.
    The killed export's new one beside it goes with the leftovers. Called under the lock
    on `out`, before it is checked: the export put back is checked as any. Only a .old
    beside its own export's temporary folder (a kill between the renames leaves both): a
    lone one is what a failed removal left (`_publish`'s note), maybe half deleted, and
    `out` may have been removed by hand since."""
    if os.path.lexists(out):
        return
    leftovers = _killed_exports(out)
    earlier = [path for path in leftovers if path.endswith(".old")]
    if len(earlier) != 1 or earlier[0][:-len(".old")] not in leftovers:
        return                      # none, several (not which one), or no kill between
    try:
        os.replace(earlier[0], out)
    except OSError as e:
        log(f"note: could not put back the earlier export {earlier[0]} as {out} "
            f"({_reason(e)})")
        return
    log(f"restored the earlier export in {out}: an export killed while it replaced it had "
        f"left it as {earlier[0]}")


def _reason(e: OSError, named: bool = True) -> str:
    """`e`'s reason, as a message gives it; `named`: after its file, where it has one."""
    reason = e.strerror or str(e) or type(e).__name__
    return f"{e.filename}: {reason}" if named and e.filename else reason


def _check_out(out: str, run: RunFolder, force: bool, keep=(), cache=None,
               images=()) -> None:
    """Refuse an `out` that holds something else than an earlier export of `run`, or files
    besides such an export (other than assets.extra/, which is kept) (unless `force`), and,
    even with `force`: an `out` that would replace a path of `keep`, that is, holds or lies
    inside an images folder of `images` ((folder, what it is) pairs), that is inside the
    feature cache `cache` or one of the run's own files or folders, that exists and is no
    export but holds files an export does not write (`export --out IMAGES --force` replaced
    the run's training images), or whose parent is not writable."""
    if not out or not out.strip():
        raise UserError("--out must name a folder, got an empty string")
    target, real_run = os.path.abspath(out), os.path.realpath(run.path)
    real = os.path.realpath(out)  # a symlink on the way must not hide the run or cache
    own = "give the export a folder of its own, e.g. serving/NAME/1"
    for folder in keep:
        if target in _ancestors(folder) or real in _ancestors(folder):
            raise UserError(f"--out {out}: would replace {folder}, which the export reads")
    for folder, what in images:
        if target in _ancestors(folder) or real in _ancestors(folder):
            raise UserError(f"--out {out}: would replace {folder}, {what}; refused even with "
                            f"--force: {own}")
        if is_inside(real, folder):
            raise UserError(f"--out {out}: inside {folder}, {what}: the export would lie "
                            f"among the images; refused even with --force: {own}")
    if cache and is_inside(real, cache):
        raise UserError(f"--out {out}: inside the feature cache {cache}; {own}")
    if is_inside(real, run.path):
        part = os.path.relpath(real, real_run).split(os.sep)[0]
        if part in RunFolder.FILES + RunFolder.DIRS:
            raise UserError(f"--out {out}: {part} is one of the run's own files or folders; "
                            f"{own}")
    if not os.path.islink(out) and os.path.ismount(out):
        # the export is renamed into place: renaming a mount point fails (EBUSY), at the end
        raise UserError(f"--out {out}: a mount point, which cannot be replaced (the export "
                        f"is made beside it and renamed into place); export into a folder "
                        f"inside it, e.g. {os.path.join(out, '1')}")
    if os.path.lexists(out):
        _refuse_folder_of_exports(out)
        earlier, about = _earlier_export(out)
        damaged = about if earlier is None else None
        if damaged and not force:
            raise UserError(f"--out {out}: cannot tell which run it is an export of "
                            f"({damaged}); repair or delete that file, use another --out, or "
                            f"add --force to replace {out}")
        # the same run folder, whichever path (a symlink) named it then or names it now
        if earlier is not None and about != real_run and not force:
            raise UserError(f"--out {out}: holds an export of another run ({earlier}); use "
                            f"another --out or add --force to replace it")
        if about is None:                                  # no export.json: no export
            _refuse_what_is_no_export(out, force)
        # a link is replaced, the folder it points to kept: replacing it deletes none of them
        others = [] if os.path.islink(out) else _not_written_by_exports(out)
        shown = _some(others)
        if damaged and others:   # another tool's export.json, or one cut short, beside them
            raise UserError(f"--out {out}: cannot tell which run it is an export of "
                            f"({damaged}), and it holds {shown}, which an export does not "
                            f"write; refused even with --force, which replaces only an "
                            f"earlier export: use another --out (or move those files out)")
        if earlier is not None and others and not force:
            raise UserError(f"--out {out}: holds {shown}, which an export does not write and "
                            f"replacing the earlier export would delete; move it out (extra "
                            f"files for TF Serving go in {os.path.join(out, KEPT)}, which is "
                            f"kept), or add --force to delete it")
        unreadable = _unreadable_extra(out)
        if unreadable:
            raise UserError(f"--out {out}: cannot read {unreadable}, which the new export "
                            f"copies from {os.path.join(out, KEPT)} (kept, as TF Serving's "
                            f"extra files); make it readable (chmod -R u+rX), or move "
                            f"{os.path.join(out, KEPT)} aside, and rerun this command")
    check_folder_writable(os.path.dirname(target), "--out", given=out)


def _refuse_dot_names(out: str) -> None:
    """UserError for an `out` whose last part is `.` or `..`: the export is renamed into
    place, and such a folder cannot be renamed (EBUSY), so `--out .` (or `DIR/.`) failed
    once the whole export was built."""
    if os.path.basename(out) in (os.curdir, os.pardir):
        raise UserError(f"--out {out}: ends in `{os.path.basename(out)}`, which cannot be "
                        f"replaced (the export is made beside it and renamed into place); "
                        f"name the folder itself, e.g. --out "
                        f"{os.path.abspath(out)}")


def _unreadable_extra(out: str) -> Optional[str]:
    """The first file or folder under `out`/assets.extra that the copy into the new export
    (`_carry_over`) cannot read, or None: found only then, after the whole build, it was
    reported as a write that free space mends. Symlinks are copied as links: not read."""
    extra = os.path.join(out, KEPT)
    if os.path.islink(extra) or not os.path.lexists(extra):
        return None
    if not os.path.isdir(extra):
        return None if os.access(extra, os.R_OK) else extra
    if not os.access(extra, os.R_OK | os.X_OK):
        return extra
    for root, folders, files in os.walk(extra):   # top-down: a folder checked, then walked
        for name in folders:
            path = os.path.join(root, name)
            if not os.path.islink(path) and not os.access(path, os.R_OK | os.X_OK):
                return path
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path) and not os.access(path, os.R_OK):
                return path
    return None


def _refuse_what_is_no_export(out: str, force: bool) -> None:
    """`out` exists and holds no export.json: a file, or a folder with files an export does
    not write, is refused even with `force` (--force replaces exports, not whatever is
    there: `--out IMAGES --force` deleted a dataset); a folder of only export-written files
    (no export.json) needs `force`; an empty folder passes, as one of only assets.extra/."""
    if not os.path.isdir(out):
        raise UserError(f"--out {out}: a file, not an export; refused even with --force "
                        f"(which replaces only an earlier export): use another --out")
    others = _not_written_by_exports(out)
    if others:
        shown = _some(others)
        raise UserError(f"--out {out}: exists and is not an export of a run (no {INFO_FILE}; "
                        f"it holds {shown}); refused even with --force, which replaces only "
                        f"an earlier export: use another --out (or move those files out)")
    # (an assets.extra/ alone, made for the first export's warmup requests: kept, as empty)
    if set(os.listdir(out)) - {KEPT} and not force:
        raise UserError(f"--out {out}: exists and is not an export of a run (no {INFO_FILE}); "
                        f"use another --out or add --force to replace it")


def _some(names: list) -> str:
    """The first three of `names`, "..." after them when there are more."""
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def _refuse_files_added(out: str, checked: list) -> None:
    """UserError (exit 1) when files an export does not write appeared in `out` since it
    was checked (`checked`: those there then): replacing `out` deleted a README.txt put
    there during the export's minutes, exit 0, --force or not."""
    if os.path.islink(out):     # the link is replaced, the folder it points to kept
        return
    added = sorted(set(_not_written_by_exports(out)) - set(checked))
    if added:
        raise UserError(f"--out {out}: {_some(added)} appeared in it during the export, which "
                        f"an export does not write and replacing {out} would delete; move it "
                        f"out (extra files for TF Serving go in {os.path.join(out, KEPT)}, "
                        f"which is kept) and rerun this command; {out} is as it was",
                        exit_code=1)


# What tf.saved_model.save writes inside the export's folders: assets/ (TensorFlow's documented
# place for a model's extra files) stays empty, variables/ holds the index and the data shards.
WRITTEN_INSIDE = {"assets": re.compile(r"(?!)"),
                  "variables": re.compile(r"variables\.(index|data-\d{5}-of-\d{5})")}


def _not_written_by_exports(out: str) -> list:
    """The names in folder `out` that an export neither writes nor keeps (sorted), and those
    inside its assets/ and variables/ ("assets/labels.txt"): a re-export deleted a file put
    there without a word."""
    if not os.path.isdir(out):
        return []
    names = sorted(n for n in os.listdir(out) if n not in EXPORT_FILES + (KEPT,))
    for folder, written in WRITTEN_INSIDE.items():
        path = os.path.join(out, folder)
        if os.path.isdir(path) and not os.path.islink(path):
            try:
                names += sorted(f"{folder}/{n}" for n in os.listdir(path)
                                if not written.fullmatch(n))
            except OSError as e:   # what it holds is not known to be the export's
                names.append(f"{folder}/ (unreadable: {e.strerror})")
    return names


def _carry_over(out: str, tmp: str) -> None:
    """Copy `out`/assets.extra (a folder, file or symlink) into the new export `tmp`: TF
    Serving reads a version's warmup requests from there, and a re-export deleted them. A
    copy, not a move: a failed or killed export leaves `out` as it was."""
    extra, target = os.path.join(out, KEPT), os.path.join(tmp, KEPT)
    try:
        if os.path.islink(extra):
            os.symlink(os.readlink(extra), target)
        elif os.path.isdir(extra):
            shutil.copytree(extra, target, symlinks=True)
        elif os.path.lexists(extra):
            shutil.copy2(extra, target)
    except shutil.Error as e:   # copytree's list of (source, target, why), one per file
        first = e.args[0][0] if e.args and e.args[0] else ("?", "?", str(e))
        raise UserError(f"--out {out}: cannot copy {extra} into the new export ({len(e.args[0])} "
                        f"file(s), e.g. {first[0]}: {first[2]}); fix its files (or move the "
                        f"folder aside) and rerun this command; {out} is as it was",
                        exit_code=1) from None
    except OSError as e:        # reading `extra` (a write into `tmp`: `_write_failed`'s)
        if not (e.filename and is_inside(os.fsdecode(e.filename), extra)):
            raise
        raise UserError(f"--out {out}: cannot copy {extra} into the new export "
                        f"({_reason(e)}); fix its files (or move the folder aside) and rerun "
                        f"this command; {out} is as it was", exit_code=1) from None


def _refuse_folder_of_exports(out: str) -> None:
    """UserError, even with --force, when `out` (not a symlink) holds exports in folders of
    its own: TF Serving's MODELS/NAME with its versions 1/, 2/ ... given without a version,
    or the MODELS/ root of NAME/VERSION/ exports, which replacing would delete with every
    version in it."""
    if os.path.islink(out) or not os.path.isdir(out):
        return
    found = sorted(os.path.relpath(os.path.dirname(p), out) for depth in ("*", "*/*")
                   for p in glob.glob(os.path.join(glob.escape(out), depth, INFO_FILE)))
    if found:
        name = os.path.dirname(found[0])          # "" for versions right below `out`
        numbers = [int(os.path.basename(v)) for v in found
                   if os.path.dirname(v) == name and os.path.basename(v).isdigit()]
        shown = ", ".join(f"{v}/" for v in found[:3]) + (" ..." if len(found) > 3 else "")
        raise UserError(f"--out {out}: holds exports in folders of its own ({shown}), which "
                        f"replacing it would delete (even with --force); give the export a "
                        f"folder of its own, e.g. "
                        f"{os.path.join(out, name, str(max(numbers, default=0) + 1))}")


def _ancestors(path: str) -> set:
    """`path` and the folders above it, as given (absolute) and with symlinks resolved."""
    found = set()
    for p in (os.path.abspath(path), os.path.realpath(path)):
        while True:
            found.add(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
    return found


def _earlier_export(out: str) -> tuple:
    """(the run path recorded in `out`/export.json, the real path of that run folder) when it
    names one; (None, what is wrong with the file, naming it) when it cannot be read or names
    no run; (None, None) without the file."""
    path = os.path.join(out, INFO_FILE)
    if not os.path.isfile(path):
        return None, None
    try:
        info = read_json(path, file_names=True)
    except UserError as e:
        return None, str(e)                                 # names the file and the place
    if isinstance(info, dict) and isinstance(info.get("run"), str):
        # the folder it was then (`run_realpath`): a symlink given as --run may point at
        # another run by now; exports made before it was recorded: the path's target now
        real = info.get("run_realpath")
        return info["run"], real if isinstance(real, str) else os.path.realpath(info["run"])
    return None, f"{path}: names no run (expected {{\"run\": PATH, ...}} as export writes)"


def _publish(tmp: str, out: str) -> Optional[str]:
    """Rename the finished export `tmp` to `out`, replacing what was there. An error
    between the two renames puts the earlier export back: `out` was left missing, the
    earlier export only under its hidden .old name, and the caller then deleted the new one
    (a server had no model until a rerun). Ctrl-C and SIGTERM wait for the renames and the
    removal of the earlier export (`interrupts.held`): one right after the second rename
    left that full copy next to `out` until the next export into it. Returns a note when
    the earlier export cannot be removed (files of another user in it): the new one is in
    place all the same (the export failed with exit 2, "Permission denied", no summary)."""
    old = None
    with interrupts.held():
        try:
            if os.path.lexists(out):
                old = temp_name(out, ".old")
                os.replace(out, old)
            os.replace(tmp, out)
        except BaseException:
            if old is not None and os.path.lexists(old) and not os.path.lexists(out):
                os.replace(old, out)
            raise
        if old is not None:  # a symlink (to an earlier export) goes, not what it points to
            try:
                remove_path(old)
            except OSError as e:
                return (f"the new export is in {out}, but the earlier one, moved aside to "
                        f"{old}, could not be removed ({_reason(e)}): remove it yourself")
    return None


def _describe(run: RunFolder, captioner: Captioner, backbone: Backbone, best=None) -> dict:
    m = read_manifest(captioner.cache)
    return {
        "format": EXPORT_FORMAT, "run": os.path.abspath(run.path),
        "run_realpath": os.path.realpath(run.path), "best": best,
        # the model exported: a re-export tells by it that it replaces another model
        "weights_sha256": weights_digest(captioner.model),
        # the backbone's weights and feature scale come from this cache's manifest (--cache)
        "cache": os.path.abspath(captioner.cache),
        "beam": captioner.cfg.beam, "length_penalty": captioner.cfg.length_penalty,
        "max_length": captioner.max_length, "vocab_size": len(captioner.vocab),
        "vocab_sha256": captioner.vocab.digest(),
        "backbone": {k: m.get(k) for k in ("weights", "weights_sha256", "precision")}
        | {"feature_scale": backbone.feature_scale},
        # the SavedModel computes as `caption` does: the run's (train --precision)
        "decoder": {"precision": captioner.model.compute_dtype},
        "saved_model": {"signature": SIGNATURE, "inputs": {"images": "string (N,)"},
                        "outputs": _signature_outputs(captioner),
                        "load_images": {"signature": LOAD_SIGNATURE,
                                        "inputs": {"images": "string (N,)"},
                                        "outputs": {"pixels": "uint8 (N, 299, 299, 3)",
                                                    "decoded": "bool (N,)"}}},
        "tflite": None, "caption_attn": __version__, "tensorflow": tf.__version__,
        "code_sha256": code_digest(),
    }


def code_digest() -> str:
    """sha256 of the caption_attn package's Python files (names and bytes, in name order):
    the code that built the graph. Its version number alone did not change with it, and a
    re-export after an upgrade (another decoding of the images) said nothing, while a TF
    Serving server that had loaded that version kept the old graph."""
    folder = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    # (not an editor's files: Emacs' `.#export.py` lock is a dangling link)
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".py")
                       and not n.startswith(".") and os.path.isfile(os.path.join(folder, n))):
        digest.update(f"{name}\0{file_digest(os.path.join(folder, name))}\0".encode())
    return digest.hexdigest()


def weights_digest(model) -> str:
    """sha256 of a Keras model's weights (each one's dtype, shape and values, in order): the
    same model read again gives the same digest, a model trained again another."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        w = np.ascontiguousarray(w)
        digest.update(f"{w.dtype.str}{w.shape};".encode())
        digest.update(w.tobytes())
    return digest.hexdigest()


def _signature_outputs(captioner: Captioner) -> dict:
    L, K = captioner.max_length, captioner.cfg.beam
    return {"captions": "string (N,)", "scores": "float32 (N,)", "words": f"string (N, {L})",
            "attention": f"float32 (N, {L}, {GRID}, {GRID})",
            "beam_captions": f"string (N, {K})", "beam_scores": f"float32 (N, {K})"}


def format_summary(info: dict, out: str) -> str:
    """The lines `caption-attn export` prints."""
    model = info["saved_model"]
    lines = [f"SavedModel  {out} ({_megabytes(model['bytes'])}): signature {SIGNATURE}, images "
             f"-> {', '.join(model['outputs'])}; beam {info['beam']}, max length "
             f"{info['max_length']} ({info['seconds']:.0f} s)"]
    best = info.get("best")
    if isinstance(best, dict) and best.get("epoch"):   # which epoch's model ships (it said not)
        value = best.get("value")
        measured = f", {best.get('monitor')}={metric_text(value)}" \
            if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        lines.append(f"model       the run's best model, of epoch {best['epoch']}{measured}")
    lite = info["tflite"]
    if lite:
        kind = {"none": "float32", "float16": "float16 weights",
                "dynamic": "int8 weights (dynamic range)"}[lite["quantize"]]
        float_size = "" if lite["quantize"] == "none" else \
            f"; the float32 model is {_megabytes(lite['float32_bytes'])}"
        lines.append(f"TFLite      {os.path.join(out, lite['file'])} "
                     f"({_megabytes(lite['bytes'])}, {kind}{float_size}) + {lite['vocab']}")
        lines.append(f"input       of the TFLite model: {out}'s signature {LOAD_SIGNATURE}, "
                     f"images -> pixels, decoded")
        agreement = lite.get("agreement")
        if agreement and agreement["images"]:
            lines.append(f"agreement   greedy captions equal to the float32 model's on "
                         f"{agreement['same_captions']}/{agreement['images']} test images "
                         f"({100 * agreement['fraction']:.1f}%); their log-probabilities "
                         f"differ by up to {agreement['max_score_difference']:.4f}")
            if agreement.get("note"):
                lines.append(f"            ({agreement['note']})")
        elif agreement:
            lines.append(f"agreement   not measured: {agreement['note']}")
    lines.append(f"inspect     saved_model_cli show --dir {out} --all")
    return "\n".join(lines)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(folder) for name in names)


# ----------------------------------------------------------------------------- SavedModel
def serving_function(captioner: Captioner, backbone: Backbone):
    """tf.function: images (N,) string -> the signature's outputs (see the module doc)."""
    decoder = make_decoder(captioner.model, captioner.cfg, captioner.max_length)
    vocab = tf.constant(captioner.vocab.tokens)                        # (V,) id -> word
    length, beam = captioner.max_length, captioner.cfg.beam
    shapes = {"words": [None, length], "attention": [None, length, GRID, GRID],
              "beam_captions": [None, beam], "beam_scores": [None, beam]}

    def caption(pixels):                                              # (M, 299, 299, 3)
        result = decoder(backbone.features(pixels))                   # (M, K, ...)
        return caption_outputs(result, vocab, length)

    def nothing():  # no decodable image: the backbone's convolutions fail on 0 images
        return {k: tf.zeros([0] + shapes.get(k, [None])[1:], tf.constant(v).dtype)
                for k, v in FILL.items()}

    @tf.function(input_signature=[IMAGES_SPEC], autograph=False)
    def serve(images):
        images = checked_rank(images)
        index, pixels = decode_batch(images)                          # (M,), (M, 299, 299, 3)
        outputs = tf.cond(tf.size(index) > 0, lambda: caption(pixels), nothing)
        outputs = scatter(outputs, index, tf.shape(images)[0])        # (N, ...)
        return {k: tf.ensure_shape(v, shapes.get(k, [None])) for k, v in outputs.items()}
    return serve


IMAGES_SPEC = tf.TensorSpec([None], tf.string, name="images")


@tf.function(input_signature=[IMAGES_SPEC], autograph=False)
def prepare_images(images):
    """The `load_images` signature: images (N,) string -> pixels (N, 299, 299, 3) uint8, as
    `serve` decodes and resizes them (zero where not decodable), and decoded (N,) bool."""
    images = checked_rank(images)
    index, pixels = decode_batch(images)                              # (M,), (M, 299, ...)
    n = tf.shape(images)[0]
    return {"pixels": tf.scatter_nd(index[:, None], pixels, [n, IMAGE_SIZE, IMAGE_SIZE, 3]),
            "decoded": tf.scatter_nd(index[:, None], tf.ones_like(index), [n]) > 0}


def checked_rank(images):
    """images, once its rank is checked at run time: a loaded signature does not check its
    declared shape (N,), and one image passed as a scalar (or a 2-D input) failed deep in
    the graph naming nothing. The declared rank 1 is static, so tf.rank, assert_rank and
    Rank or Size ops of the shape are folded to constants (by Python or Grappler) and check
    nothing: the shape goes through a serialisation, whose parsed tensor has no static shape."""
    shape = tf.io.parse_tensor(tf.io.serialize_tensor(tf.shape(images)), tf.int32)
    rank = tf.size(shape)
    message = tf.strings.format(
        "`images` must be a 1-D string tensor of encoded images (N,), got rank {} (shape {}); "
        "pass one image as a list: images=[data] or tf.constant([data])", (rank, shape))
    with tf.control_dependencies([tf.debugging.Assert(tf.equal(rank, 1), [message])]):
        return tf.identity(images)


def decode_batch(images):
    """images (N,) string -> index (M,) int32 of the decodable ones, their pixels (M, 299,
    299, 3) uint8. Decoding errors drop the image (tf.data `ignore_errors`); images are
    decoded in parallel, in order."""
    n = tf.shape(images)[0]
    items = tf.data.Dataset.from_tensor_slices((tf.range(n), images))
    items = items.map(lambda i, data: (i, graph_images.load(data)),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    # One always-present last element, so the single batch exists even when no image decodes.
    last = tf.data.Dataset.from_tensors(
        (tf.constant(-1), tf.zeros([IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8)))
    index, pixels = items.concatenate(last).batch(tf.cast(n, tf.int64) + 1) \
        .get_single_element()                                         # (M+1,), (M+1, ...)
    return index[:-1], pixels[:-1]


def caption_outputs(result, vocab, length: int) -> dict:
    """DecodeResult over M images -> the signature's outputs for them (see FILL)."""
    tokens = result.tokens                                            # (M, K, T)
    pad = [[0, 0], [0, length - tf.shape(tokens)[2]]]                # T -> L
    is_word = (tokens != PAD) & (tokens != START) & (tokens != END)  # (M, K, T)
    words = tf.where(is_word, tf.gather(vocab, tokens), "")           # (M, K, T)
    sentences = tf.strings.strip(
        tf.strings.reduce_join(words, axis=-1, separator=" "))        # (M, K)
    attention = tf.where(is_word[:, 0, :, None], result.attention[:, 0], 0.0)  # (M, T, P)
    return {"captions": sentences[:, 0], "scores": result.log_probs[:, 0],
            "words": tf.pad(words[:, 0], pad, constant_values=""),    # (M, L)
            "attention": tf.reshape(tf.pad(attention, pad + [[0, 0]]),
                                    [-1, length, GRID, GRID]),         # (M, L, 8, 8)
            "beam_captions": sentences, "beam_scores": result.log_probs}


def scatter(outputs: dict, index, n) -> dict:
    """Outputs of the M decoded images (rows `index`) -> N rows; the others get FILL."""
    m = tf.shape(index)[0]
    slot = tf.tensor_scatter_nd_update(tf.fill([n], m), index[:, None], tf.range(m))  # (N,)

    def place(x, fill):
        filler = tf.fill(tf.concat([[1], tf.shape(x)[1:]], 0), tf.constant(fill, x.dtype))
        return tf.gather(tf.concat([x, filler], 0), slot)            # (N, ...)
    return {k: place(v, FILL[k]) for k, v in outputs.items()}


def _module(function, *models) -> tf.Module:
    """A tf.Module holding the concrete function of `function` (its signature's) and the
    variables of the Keras `models` (tracked as plain variables: Keras objects themselves are
    not saved, so loading needs no Keras). The concrete function, not the tf.function: saving
    a tf.function traced it again in the save's context: a second trace of the backbone and
    the decoder in each SavedModel written (the export's and the TFLite model's staging one)."""
    module = tf.Module()
    module.weights = [v.value for model in models for v in model.variables]  # tf.Variables
    module.function = function.get_concrete_function()
    return module


def save_servable(path: str, captioner: Captioner, backbone: Backbone) -> None:
    serve = serving_function(captioner, backbone)
    module = _module(serve, backbone.inference_model, captioner.model)
    module.load = prepare_images.get_concrete_function()
    tf.saved_model.save(module, path, signatures={SIGNATURE: module.function,
                                                  LOAD_SIGNATURE: module.load})


# ----------------------------------------------------------------------------- TFLite
class _StaticAttention:
    """`model` whose decode_step returns the attention as (N, 64) with a static 64: inside
    the while loop TFLite's converter cannot infer it through the model's reshape, and then
    lowers decode.py's `attention[:, None, :]` to a select TF op instead of a RESHAPE."""

    def __init__(self, model):
        self._init, self._step = model.init_decoder, model.decode_step

    def init_decoder(self, features, fold_standardization=False):
        """The model's, never with the standardisation folded into the encoder: the TFLite
        model may be quantized (int8, float16), and x (s W) - (m s) W cancels digits those
        types do not have."""
        return self._init(features)

    def decode_step(self, tokens, state, context):
        logits, state, attention = self._step(tokens, state, context)
        return logits, state, tf.reshape(attention, [-1, NUM_PIXELS])  # (N, 64)


def tflite_function(model, backbone: Backbone, cfg: DecodeConfig, length: int):
    """tf.function: image (1, 299, 299, 3) uint8 -> token_ids, scores, attention (greedy)."""
    # greedy: beam 1 and no length penalty (a --length-penalty kept for the SavedModel's beam
    # search made this DecodeConfig refuse itself, after the SavedModel was built)
    greedy_cfg = dataclasses.replace(cfg, beam=1, length_penalty=0.0)
    decoder = make_decoder(_StaticAttention(model), greedy_cfg, length)
    spec = tf.TensorSpec([1, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8, name="image")

    @tf.function(input_signature=[spec], autograph=False)
    def greedy(image):
        result = decoder(backbone.features(image))                    # (1, 1, T, ...)
        pad = [[0, 0], [0, length - tf.shape(result.tokens)[2]]]       # T -> L
        return {"token_ids": tf.reshape(tf.pad(result.tokens[:, 0], pad), [1, length]),
                "scores": tf.reshape(result.log_probs[:, 0], [1]),
                "attention": tf.reshape(tf.pad(result.attention[:, 0], pad + [[0, 0]]),
                                        [1, length, GRID, GRID])}
    return greedy


def float32_copies(model, backbone: Backbone):
    """The decoder and backbone computing in float32 (copies only when they do not)."""
    if model.compute_dtype != "float32":
        config = {k: v for k, v in model.get_config().items() if k != "dtype"}
        copy = ShowAttendTell.from_config(config)
        copy.set_weights(model.get_weights())
        model = copy
    if backbone.model.compute_dtype != "float32":
        copy = build_backbone("random", 0, "float32")                 # same layers, then weights
        copy.set_weights(backbone.model.get_weights())
        backbone = Backbone(copy, backbone.feature_scale, stored_dtype=backbone.stored_dtype)
    return model, backbone


def convert(saved_model_dir: str, quantize: str = "none") -> bytes:
    """TFLite flatbuffer of a SavedModel's serving signature, built-in ops only."""
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, [SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic range: int8 weights
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def write_tflite(folder: str, run: RunFolder, captioner: Captioner, backbone: Backbone,
                 cfg: ExportConfig) -> dict:
    """captioner.tflite (+ vocab.json) into `folder`; returns its description, with the
    precision each part computes in there and the run's precision of each part converted to
    float32 for it (`converted`: `caption` computes those in their own precision)."""
    converted = {part: dtype for part, dtype in (
        ("decoder", captioner.model.compute_dtype), ("backbone", backbone.model.compute_dtype))
        if dtype != "float32"}
    model, backbone = float32_copies(captioner.model, backbone)
    greedy = tflite_function(model, backbone, captioner.cfg, captioner.max_length)
    staging = os.path.join(folder, ".tflite_saved_model")
    module = _module(greedy, backbone.inference_model, model)
    tf.saved_model.save(module, staging, signatures={SIGNATURE: module.function})
    float_model = convert(staging)
    blob = float_model if cfg.tflite_quantize == "none" else \
        convert(staging, cfg.tflite_quantize)
    shutil.rmtree(staging)
    write_bytes_atomic(os.path.join(folder, TFLITE_FILE), blob)
    captioner.vocab.save(os.path.join(folder, VOCAB_FILE))
    info = {"file": TFLITE_FILE, "vocab": VOCAB_FILE, "quantize": cfg.tflite_quantize,
            "bytes": len(blob), "float32_bytes": len(float_model), "max_length":
            captioner.max_length, "signature": SIGNATURE,
            "precision": {"decoder": model.compute_dtype,
                          "backbone": backbone.model.compute_dtype},
            "converted": converted}
    if cfg.tflite_quantize != "none" and cfg.check_images:
        info["agreement"] = quantized_agreement(float_model, blob, run, captioner,
                                                cfg.check_images)
    return info


def converted_note(converted: dict) -> str:
    """What export says of the parts (`converted`: part -> the run's precision) the TFLite
    model computes in float32 where `caption` does not (bfloat16 is no TFLite type)."""
    why = {"decoder": "train --precision", "backbone": "the feature cache's --precision"}
    parts = " and ".join(f"the {part} (run in {dtype} by `caption`: {why[part]} {dtype})"
                         for part, dtype in converted.items())
    return (f"the TFLite model computes {parts} in float32: its greedy token ids may differ "
            f"from those of `caption --beam 1` where two words are near a tie")


def interpreter(blob: bytes):
    """A TFLite interpreter of `blob` (TensorFlow's; it warns that LiteRT is its future,
    and its XNNPACK delegate announces itself on stderr: both are kept quiet)."""
    with warnings.catch_warnings(), quiet.known_notices_dropped():
        warnings.simplefilter("ignore")
        it = tf.lite.Interpreter(model_content=blob, num_threads=os.cpu_count())
        it.allocate_tensors()          # where the delegate is applied, and says so
        return it.get_signature_runner(SIGNATURE)


def quantized_agreement(float_model: bytes, quantized: bytes, run: RunFolder,
                        captioner: Captioner, limit: int) -> dict:
    """Greedy captions of both TFLite models on up to `limit` test-split images of the run
    (`_test_images`: where `evaluate` finds them, confirmed by their digests)."""
    pixels, folder, notes = _test_images(run, captioner.cache, limit)
    if not pixels:
        return {"images": 0, "images_dir": folder,
                "note": "; ".join(notes) or f"no test images found in {folder}"}
    runs = [interpreter(blob) for blob in (float_model, quantized)]
    score_diff = []                          # of the images whose captions are the same
    for image in pixels:
        a, b = (r(image=image[None]) for r in runs)
        if np.array_equal(a["token_ids"], b["token_ids"]):
            score_diff.append(abs(float(a["scores"][0]) - float(b["scores"][0])))
    found = {"images": len(pixels), "images_dir": folder, "same_captions": len(score_diff),
             "fraction": round(len(score_diff) / len(pixels), 4),
             "max_score_difference": round(max(score_diff, default=0.0), 6)}
    return found | ({"note": "; ".join(notes)} if notes else {})


def _test_images(run: RunFolder, cache: str, limit: int) -> tuple:
    """(pixels of up to `limit` of the run's test images, the folder they were read in,
    notes). The folder is the run's (split.json's `images_dir`, as `evaluate` takes it), or
    when the run recorded none or it is gone (said), the one `cache` was last extracted
    from. An image whose digest is not the one the run recorded (another image of the same
    name: that folder was the cache's measured as the run's, silently) is left out, said."""
    recorded, folder = run.images_dir(existing=False), run.images_dir()
    notes = [] if folder or not recorded else \
        [f"the run's images folder {recorded} is not a folder on this machine"]
    manifest = read_manifest(cache)
    folder = folder or source_images(manifest)
    keys = run.load_splits().get("test", [])[:limit]
    last = manifest.get("images_dir")
    if not keys:
        return [], folder, notes + ["the run's test split is empty"]
    if folder is None and last and last != recorded:
        notes.append(f"the images folder {last} of the feature cache {cache} is not a folder "
                     f"on this machine")
    elif folder is None and not recorded:
        notes.append(f"neither the run nor its feature cache {cache} records an images folder")
    if folder is None:
        return [], folder, notes
    if notes:
        notes[0] += f"; measured in {folder}, the feature cache's images folder"
    digests, pixels = run.image_digests(), []
    missing, other, unconfirmed, unreadable = [], [], [], []
    for key in keys:
        path = os.path.join(folder, key)
        try:
            digest = file_digest(path)[:IMAGE_DIGEST_CHARS]
        except OSError:
            missing.append(key)
            continue
        if key in digests and digests[key] != digest:
            other.append(key)
            continue
        try:
            pixels.append(load_image(path))
        except ImageError:
            unreadable.append(key)
            continue
        if key not in digests:
            unconfirmed.append(key)
    if other:
        notes.append(f"{counted(len(other), 'test image')} in {folder} (e.g. {other[0]}) "
                     f"differ from the run's images of the same name (their digests in "
                     f"{run.split}): left out")
    if missing or unreadable:
        notes.append(f"{counted(len(missing + unreadable), 'test image')} missing or "
                     f"unreadable in {folder} (e.g. {(missing + unreadable)[0]}): left out")
    if unconfirmed:
        notes.append(f"{counted(len(unconfirmed), 'test image')} could not be confirmed to be "
                     f"the run's ({run.split} records no digest of them): measured as they are")
    return pixels, folder, notes
