"""Resuming from the newest intact checkpoint.

`tf.train.CheckpointManager` keeps the last few checkpoints of a run (`ckpt-STEP.index` +
`ckpt-STEP.data-*`). A checkpoint can be damaged after it was written (a full disk, a copy that
stopped half-way, a bad sector): restoring it raises deep inside TensorFlow ("Read less bytes
than requested") without naming the file. `restore_newest_intact` tries the checkpoints newest
first, skips damaged ones with the reason, renames their files to `damaged-ckpt-STEP.*` so that
they are never tried (or rotated into) again, and points the manager's state file at what is
left.

The manager deletes only the checkpoints its state file (`checkpoint`) lists with their
times: a process killed between writing ckpt-N and the state file, or a deleted state file,
left the others on disk for good. `keep_newest` deletes them on resume, and lists the ones
kept so that the manager made afterwards rotates them.

TensorFlow writes a checkpoint's shards into a folder `ckpt-N_temp/` beside it, then merges
them into ckpt-N.* and deletes the folder (`functional_saver.MultiDeviceSaver.save`): a
process killed while saving, or a save that failed (a full disk), left that folder, with
shards as large as the checkpoint, for good. A failed save removes its own
(`remove_failed_save`); `remove_save_leftovers` deletes the others on resume.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import re
import time
from typing import Optional

import tensorflow as tf
from tensorflow.python.util import deprecation  # TF has no public switch for its notices

_INDEX = re.compile(r"^ckpt-(\d+)\.index$")
_FILE = re.compile(r"^ckpt-(\d+)\.(?:index|data-\d{5}-of-\d{5})$")   # TF's names, no others
CHECKPOINT_FILE = _FILE

# What a save that was stopped leaves (TF 2.x, seen with kill -9 at several moments of a
# save): the folder `<prefix>-N_temp/` of the shards of ckpt-N, holding shard files
# `part-SSSSS-of-NNNNN.{index,data-00000-of-00001}` (`functional_saver.sharded_filename`),
# each while being written with `.tempstate` and a random uint64 after it (BundleWriter).
_TEMP_DIR = re.compile(r"^ckpt-\d+_temp$")
_TEMP_FILE = re.compile(r"^part-\d{5}-of-\d{5}\.(?:index|data-\d{5}-of-\d{5})"
                        r"(?:\.tempstate\d+)?$")
TEMP_DIR, TEMP_FILE = _TEMP_DIR, _TEMP_FILE   # (what `RunFolder.is_own` takes for the run's)

KEEP = 3   # checkpoints a run keeps (its CheckpointManager's max_to_keep): older ones to fall
#            back to when the newest is damaged


def list_checkpoints(directory: str) -> list[str]:
    """Checkpoint prefixes in `directory`, newest (highest step) first."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.index")):
        match = _INDEX.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path[:-len(".index")]))
    return [prefix for _, prefix in sorted(found, reverse=True)]


# What reading a damaged checkpoint raises: a file cut to a few bytes raised IndexError ("Read
# less bytes than requested") from the reader, which only restoring caught.
DAMAGED = (tf.errors.OpError, ValueError, AssertionError, IndexError, KeyError, TypeError)


def _try_restore(checkpoint: tf.train.Checkpoint, prefix: str) -> Optional[str]:
    """None if `prefix` restored every object of `checkpoint`, else the reason it did not."""
    status = None
    try:
        status = checkpoint.restore(prefix)
        status.assert_existing_objects_matched()
        return None
    except DAMAGED as e:
        _expect_partial_of_failed_restore(e)
        text = getattr(e, "message", None) or str(e) or type(e).__name__
        return f"{type(e).__name__}: {text.strip().splitlines()[0][:200]}"
    finally:
        # values `checkpoint` has no object for (`EPOCH_START`, read by name; or all of a
        # restore that failed) are no news: TensorFlow warned of each when the status went
        if status is not None:
            status.expect_partial()


def _expect_partial_of_failed_restore(error: BaseException) -> None:
    """`expect_partial` on the restore that raised `error` inside `Checkpoint.restore` (a
    shape mismatch), which returned no status to call it on: its "deleted with unrestored
    values" warnings (six lines after the message, when the process ended) said nothing the
    message does not. TensorFlow has no public handle on it: its restore coordinator is a
    local of the frames the error went through."""
    tb = error.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if type(value).__name__ == "_CheckpointRestoreCoordinator":
                with contextlib.suppress(AttributeError):
                    value.expect_partial = True
        tb = tb.tb_next


def _step(prefix: str) -> int:
    return int(prefix.rsplit("-", 1)[1])


def _without_index(directory: str) -> list[str]:
    """Prefixes of checkpoints in `directory` with data files but no `.index` (which
    `list_checkpoints` cannot see), newest first."""
    found = {os.path.join(directory, m.group(1))
             for path in glob.glob(os.path.join(glob.escape(directory), "ckpt-*.data-*"))
             for m in [re.match(r"^(ckpt-\d+)\.data-", os.path.basename(path))] if m}
    return sorted((p for p in found if not os.path.exists(p + ".index")), key=_step,
                  reverse=True)


def _skip_without_index(directory: str, restored: Optional[str], log,
                        set_aside: bool) -> list[str]:
    """Checkpoints newer than `restored` (None: any) that have data files but no `.index`:
    not listed, so never tried, they were passed over with no word but a note blaming "the
    process that stopped" for the training lost. Each is named with why (and with
    `set_aside` renamed like a damaged one); returns them."""
    newer = [p for p in _without_index(directory)
             if restored is None or _step(p) > _step(restored)]
    start = (f"resuming from {os.path.basename(restored)}, and the steps after it are "
             f"trained again") if restored else "training starts again from the first step"
    for bad in newer:
        name = os.path.basename(bad)
        log(f"note: skipped the checkpoint {name} of {directory}: {name}.index is missing "
            f"(deleted, or a copy that left it out), so its data files cannot be read; "
            f"{start}"
            + (". Its files were renamed to damaged-*" if set_aside else ""))
        if set_aside:
            _set_aside(bad)
    return newer


def _likely_cause(failures: list) -> str:
    """What the reasons of checkpoints that all failed to restore point at."""
    if any("incompatible tensor with shape" in reason for _, reason in failures):
        # every checkpoint of the run has the model's sizes: config.json's are others
        return ("their shapes differ from the model config.json describes: its model sizes "
                "(embedding_dim, units) or vocabulary are not the checkpoints' (config.json "
                "edited by hand, or copied from another run?); restore the run's config.json, "
                "or start the run over with --fresh")
    return "if the run was made by an older caption_attn, start it over with --fresh"


def _set_aside(prefix: str) -> list[str]:
    directory, name = os.path.split(prefix)
    moved = []
    for path in glob.glob(glob.escape(prefix) + ".*"):
        target = os.path.join(directory, "damaged-" + os.path.basename(path))
        os.replace(path, target)
        moved.append(target)
    return moved


def _newest_restoring(checkpoint: tf.train.Checkpoint,
                      directory: str) -> tuple[Optional[str], list]:
    """(the newest checkpoint of `directory` that restored into `checkpoint`, None when there
    is none; the (prefix, reason) of each newer one that did not). When there are
    checkpoints and none restores, the refusal naming them all is raised."""
    failures = []
    for prefix in list_checkpoints(directory):
        reason = _try_restore(checkpoint, prefix)
        if reason is None:
            return prefix, failures
        failures.append((prefix, reason))
    if failures:
        from caption_attn.errors import UserError
        raise UserError(
            "no checkpoint of this run can be restored:",
            lines=[*(f"  {p}: {r}" for p, r in failures), _likely_cause(failures)])
    return None, failures


def refuse_unrestorable(checkpoint: tf.train.Checkpoint, directory: str) -> None:
    """`restore_newest_intact`'s refusal when `directory` has checkpoints and none of them
    restores into `checkpoint`, with nothing set aside, deleted or logged (the restore that
    follows does that); restores the newest that does."""
    _newest_restoring(checkpoint, directory)


def restore_newest_intact(checkpoint: tf.train.Checkpoint, directory: str,
                          log=print, set_aside: bool = True, keep: int = KEEP) -> Optional[str]:
    """Restore `checkpoint` from the newest checkpoint in `directory` that loads completely;
    returns its prefix (None when there is none). Every damaged newer one is reported through
    `log`, naming the file and why, and (with `set_aside`: the process that owns `directory`)
    renamed; then only the newest `keep` intact checkpoints are kept, listed in the state
    file, so a CheckpointManager made afterwards continues from them and rotates them
    (`keep_newest`).

    If none of several checkpoints loads, nothing is set aside and the error names them all.
    """
    prefix, failures = _newest_restoring(checkpoint, directory)
    if prefix is None:
        _skip_without_index(directory, None, log, set_aside)
        if set_aside:
            remove_save_leftovers(directory, log)
        return None
    for bad, reason in failures:
        log(f"note: skipped the damaged checkpoint {bad} ({reason}); resuming from "
            f"{os.path.basename(prefix)}" + (". Its files were renamed to damaged-*"
                                             if set_aside else ""))
        if set_aside:
            _set_aside(bad)
    _skip_without_index(directory, prefix, log, set_aside)
    if set_aside:
        keep_newest(directory, keep, log)
        remove_save_leftovers(directory, log)
    return prefix


def remove_save_leftovers(directory: str, log=print) -> list[str]:
    """Delete the shards that saves which were stopped left in `directory` (its `ckpt-N_temp/`
    folders, `_TEMP_DIR`), for the process that owns `directory`, which saves nothing
    meanwhile; returns the folders deleted. Only real folders of that name are looked into
    (not a link), and only regular files with TensorFlow's names of shards (`_TEMP_FILE`)
    deleted from them: a folder holding anything else stays, named with what it holds."""
    deleted, size = [], 0
    for name in sorted(os.listdir(directory) if os.path.isdir(directory) else []):
        folder = os.path.join(directory, name)
        if not _TEMP_DIR.match(name) or os.path.islink(folder) or not os.path.isdir(folder):
            continue
        foreign, shards, freed = _remove_shards(folder)
        if foreign:
            log(f"note: left {folder} in place" +
                (f" (deleted the {shards} shard file(s) in it, {freed / 1e6:.1f} MB)"
                 if shards else "") +
                f": a folder TensorFlow writes a checkpoint's shards into while saving, but "
                f"it holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                f"which TensorFlow does not write")
            continue
        os.rmdir(folder)
        deleted.append(name)
        size += freed
    if deleted:
        log(f"note: deleted {', '.join(name + '/' for name in deleted)} of {directory} "
            f"({size / 1e6:.1f} MB): the shards TensorFlow writes a checkpoint into while "
            f"saving, left behind by a save that was killed or failed")
    return deleted


def _remove_shards(folder: str) -> tuple[list[str], int, int]:
    """Delete the regular files with TensorFlow's names of shards (`_TEMP_FILE`) in the
    `ckpt-N_temp/` folder `folder`; returns (the names of the other entries, sorted; the
    shards deleted; their bytes)."""
    foreign, shards, freed = [], 0, 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _TEMP_FILE.match(entry.name) and entry.is_file(follow_symlinks=False):
            freed += entry.stat(follow_symlinks=False).st_size
            os.remove(entry.path)
            shards += 1
        else:
            foreign.append(entry.name)
    return foreign, shards, freed


def remove_failed_save(directory: str, step: int) -> None:
    """Best effort, after the save of ckpt-`step` into `directory` failed (a full disk): delete
    the shards it left in `ckpt-STEP_temp/` and the folder (only TensorFlow's shards, as
    `remove_save_leftovers`; not a link): they took the room of a checkpoint on a disk
    already full, and the rerun blamed them on a process killed while saving."""
    folder = os.path.join(directory, f"ckpt-{step}_temp")
    with contextlib.suppress(OSError):
        if os.path.isdir(folder) and not os.path.islink(folder) and \
                not _remove_shards(folder)[0]:
            os.rmdir(folder)


def keep_newest(directory: str, keep: int = KEEP, log=print) -> list[str]:
    """Delete the checkpoints of `directory` older than its newest `keep` ones with an
    `.index` (and the data files of older ones without), then make the state file list those
    `keep` with the times `tf.train.CheckpointManager` rotates them by (it deletes no other,
    nor any listed without a time). Only files with TensorFlow's names of a checkpoint's
    files older than the newest one are deleted; returns their paths."""
    kept = list_checkpoints(directory)[:keep]
    old = _older_files(directory, kept)
    for path in old:   # the .index first: a stop half-way leaves data files, deleted later
        os.remove(path)
    if old:
        names = sorted({_FILE.match(os.path.basename(p)).group(1) for p in old}, key=int)
        log(f"note: deleted the checkpoint(s) {', '.join('ckpt-' + n for n in names)} of "
            f"{directory}: older than the newest {keep} a run keeps, and left behind as its "
            f"state file `checkpoint` did not list them for deletion (a process killed while "
            f"saving, or the file deleted)")
    if kept and not _state_lists(directory, kept):
        names = [os.path.basename(p) for p in reversed(kept)]        # oldest first
        now = time.time()
        times = [min(os.path.getmtime(p + ".index"), now) for p in reversed(kept)]
        with deprecation.silence():  # its notice went to stderr on every such resume
            tf.compat.v1.train.update_checkpoint_state(
                os.path.abspath(directory), names[-1], all_model_checkpoint_paths=names,
                all_model_checkpoint_timestamps=times, last_preserved_timestamp=min(times) - 1)
    return old


def _older_files(directory: str, kept: list[str]) -> list[str]:
    """The files named as a checkpoint's (`_FILE`) in `directory` of steps older than the
    newest of `kept` and not among them; `.index` files first."""
    if not kept:
        return []
    steps = {_step(p) for p in kept}
    found = [(name.endswith(".index"), name) for name in os.listdir(directory)
             for m in [_FILE.match(name)] if m and int(m.group(1)) not in steps and
             int(m.group(1)) < max(steps)]
    return [os.path.join(directory, name) for _, name in sorted(found, reverse=True)]


def _state_lists(directory: str, kept: list[str]) -> bool:
    """Whether the state file names `kept` (newest first) as the checkpoints, each with a
    time the manager rotates it by."""
    try:
        state = tf.train.get_checkpoint_state(directory)
    except Exception:  # noqa: BLE001 - a damaged text proto raises parse errors of any kind
        return False
    if state is None:
        return False
    listed = [os.path.abspath(p) for p in state.all_model_checkpoint_paths]
    times = list(state.all_model_checkpoint_timestamps)
    return os.path.abspath(state.model_checkpoint_path) == os.path.abspath(kept[0]) and \
        listed == [os.path.abspath(p) for p in reversed(kept)] and \
        len(times) == len(listed) and all(t > state.last_preserved_timestamp for t in times)


def restores_as_it_is(checkpoint: tf.train.Checkpoint, directory: str,
                      keep: int = KEEP) -> Optional[str]:
    """The newest checkpoint in `directory` (its prefix) when it restores into `checkpoint`
    completely and `restore_newest_intact` would skip, set aside, delete and rewrite nothing
    (no newer data files without an `.index`, no checkpoint past the newest `keep`, a state
    file that lists those); else None. Nothing is renamed or written. The shards of a save
    that was stopped (`remove_save_leftovers`) are no matter: the caller deletes them."""
    prefixes = list_checkpoints(directory)
    if not prefixes or any(_step(p) > _step(prefixes[0]) for p in _without_index(directory)):
        return None
    kept = prefixes[:keep]
    if _older_files(directory, kept) or not _state_lists(directory, kept):
        return None
    if _try_restore(checkpoint, prefixes[0]) is not None:
        return None
    return prefixes[0]


def _newest_counters(directory: str, names: tuple) -> Optional[tuple]:
    """The int variables `names` of the newest whole checkpoint in `directory` (`newest_whole`),
    read without building the model; None when there is none."""
    prefix = newest_whole(directory)
    if prefix is None:
        return None
    try:
        reader = tf.train.load_checkpoint(prefix)
        return tuple(int(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))
                     for name in names)
    except DAMAGED:   # not a checkpoint of a run: restore_newest_intact reports it
        return None


def newest_whole(directory: str) -> Optional[str]:
    """The newest checkpoint in `directory` whose every value reads, each checked against its
    checksum, without building the model: the one `restore_newest_intact` restores (a damaged
    newer one is its to report). The resume's checks read where the run stands from it: read
    from a newer one with a damaged model value (a bad sector, a copy with flipped bytes),
    whose counters still read, they checked another place than the one restored, and a
    --batch-size changed inside an epoch passed."""
    for prefix in list_checkpoints(directory):
        if _reads_whole(prefix):
            return prefix
    return None


_WHOLE: dict = {}   # (prefix, its files' identities) -> whether every value of it reads


def _reads_whole(prefix: str) -> bool:
    """Whether every value of checkpoint `prefix` that a restore reads reads (its checksum
    checked; not `EPOCH_START`, read by name, and as missing when damaged): one read of the
    checkpoint before the restore reads it again, and kept while its files are the same
    (size, mtime, inode), as a resume asks several times."""
    try:
        files = tuple((f, st.st_size, st.st_mtime_ns, st.st_ino)
                      for f in sorted(glob.glob(glob.escape(prefix) + ".*"))
                      for st in [os.stat(f)])
    except OSError:
        return False
    key = (prefix, files)
    if key not in _WHOLE:
        try:
            reader = tf.train.load_checkpoint(prefix)
            for name in reader.get_variable_to_shape_map():
                if not name.startswith("epoch_start/"):
                    reader.get_tensor(name)
            _WHOLE[key] = True
        except DAMAGED:
            _WHOLE[key] = False
    return _WHOLE[key]


# The facts of the epoch a checkpoint stopped in that a resume inside it must keep, saved
# since they were needed (`Trainer._checkpoint_to_save`; older checkpoints restore without
# them): the learning rate of its first step (history.json's), and the --batch-size and
# --scst-samples it is cut with (config.json's can be edited, or name a later call's).
EPOCH_START = ("learning_rate", "batch_size", "scst_samples")


def epoch_start(prefix: str) -> Optional[dict]:
    """`EPOCH_START` of checkpoint `prefix` by name; None when it holds none (made by an
    older caption_attn, or between epochs of one that never started an epoch)."""
    try:
        values = tf.train.load_checkpoint(prefix).get_tensor(
            "epoch_start/.ATTRIBUTES/VARIABLE_VALUE")
    except DAMAGED:  # NotFoundError: no such variable
        return None
    if len(values) != len(EPOCH_START) or not all(map(math.isfinite, values)):
        return None
    return {name: (float(v) if name == "learning_rate" else int(v))
            for name, v in zip(EPOCH_START, values)}


def newest_epoch_start(directory: str) -> Optional[dict]:
    """`epoch_start` of the newest whole checkpoint in `directory` (the one `position`
    reads)."""
    prefix = newest_whole(directory)
    return None if prefix is None else epoch_start(prefix)


def position(directory: str) -> Optional[tuple[int, int]]:
    """(finished epochs, steps into the next epoch) of the newest whole checkpoint in
    `directory`, read without building the model; None when there is none."""
    return _newest_counters(directory, ("epoch", "step_in_epoch"))


def steps_taken(directory: str) -> Optional[int]:
    """The training steps of the run so far (what --max-steps counts) by the newest whole
    checkpoint in `directory`; None when there is none."""
    found = _newest_counters(directory, ("step",))
    return None if found is None else found[0]
