"""What `train` reads before its first step (captions, split, vocabulary and feature files),
and the batches of every epoch made from it (`EpochData`).

Everything is checked first and written last: `load_train_data` reads the caption file and the
feature cache and builds (or, on resume, reloads) the split and the vocabulary without writing
anything; `TrainData.fix_in` then saves them into the run folder, so a command that fails on
its input leaves the run folder as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Optional, Sequence

import numpy as np

from caption_attn import data as data_lib
from caption_attn import distribute, feature_cache, pipeline
from caption_attn.cider import DocumentFrequency
from caption_attn.backbone import BACKBONE, FEATURE_SHAPE
from caption_attn.config import FEATURE_DTYPES, RunConfig
from caption_attn.errors import UserError
from caption_attn.fileio import write_json_atomic
from caption_attn.run import RunFolder, splits_digest
from caption_attn.scst import references_digest, train_document_frequency
from caption_attn.vocab import SPECIAL_TOKENS, Vocabulary, tokenize_all


# What split.json holds (`TrainData.fix_in`): a run whose file lacks one of them (made before
# it was recorded) gets it at its next load, which a rerun therefore does not skip
# (`train.rerun_without_data`)
SPLIT_FIELDS = ("captions", "format", "splits", "split_source", "images_dir", "splits_sha256",
                "cache_identity", "caption_data", "caption_file", "image_digests",
                "without_features", "vocab_sha256", "settings_sha256")


@dataclasses.dataclass
class TrainData:
    vocab: Vocabulary
    splits: dict                  # split -> image keys (all of them, as saved in split.json)
    caption_ids: dict             # split -> {image key: [token id lists]} (with features)
    references: dict              # split -> {image key: [raw captions]}
    feature_paths: dict           # image key -> .npy path (images with valid features only)
    reader: pipeline.NpyReader
    manifest: dict
    format: str                   # of the caption file
    skipped_captions: int         # captions whose image has no usable features
    skipped_images: int
    problems: str = ""            # why (`feature_cache.describe_problems`), or ""
    caption_data: Optional[dict] = None  # fingerprint of the caption data (split.json)
    image_digests: Optional[dict] = None  # image key -> digest of the image its features are of
    unusable: Optional[dict] = None       # image key -> why its feature file cannot be used
    truncated: int = 0            # train captions longer than --max-length (cut, <end> kept)
    recorded_digests: Optional[dict] = None  # the run's image digests so far (on resume)
    refused_note: Optional[str] = None    # the caption file's refused image paths
    empty_note: Optional[str] = None      # its empty captions, images left without one
    repeated_note: Optional[str] = None   # its CSV rows read once as repeats
    beside_note: Optional[str] = None     # other images of its names beside it (a new run)
    truncated_val: int = 0        # val captions cut the same way (val_loss is measured on them)
    split_source: Optional[str] = None    # "file", "lists" or "hash" (`data.CaptionSet`)
    split_note: Optional[str] = None      # what train says about the split
    images_note: Optional[str] = None     # that no source image could be checked
    unfound_note: Optional[str] = None    # that some could not, being in no images folder
    captions: Optional[str] = None    # the caption file
    images_dir: Optional[str] = None  # where the source images were checked (or None)
    images_why: str = ""              # why there (`images_line`)
    cache: Optional[str] = None       # the feature cache
    caption_file: Optional[dict] = None   # `data.file_stamp` of the caption file's bytes read

    def describe(self, problems: dict) -> str:
        """`feature_cache.describe_problems` of some of `unusable`, with the whole
        `extract-features` command for this caption file and images folder."""
        return feature_cache.describe_problems(problems, self.cache, manifest=self.manifest,
                                               captions=self.captions,
                                               images_dir=self.images_dir)

    def images_line(self) -> Optional[str]:
        """Where the features' source images were checked and why there (train's opening
        lines); None when nowhere (`images_note` says why)."""
        return checked_in_line(self.images_dir, self.images_why)

    def items(self, split: str) -> tuple[list[str], list[list[int]]]:
        """(feature path, token ids) of every caption of `split`, one pair per caption."""
        pairs = [(self.feature_paths[k], ids) for k, lists in self.caption_ids[split].items()
                 for ids in lists]
        return [p for p, _ in pairs], [t for _, t in pairs]

    def fix_in(self, run: RunFolder, captions: str, settings: Optional[str] = None) -> None:
        """Save split.json (with the identity of the feature cache, the fingerprint of the
        caption data, the digest of every image the run has had features of, the images
        without usable features now, and `settings`: the run's `RunConfig.settings_digest`, which
        config.json must match from then on) and vocab.json (the ones this data was made with,
        unchanged when they were read from the run): from here on they are fixed for the life
        of the run. Digests recorded earlier stay: an image skipped now (its features unusable)
        is still checked when its features come back. `caption_file` stamps the bytes the
        caption data was read from (a rerun with nothing left to train and the same bytes
        need not read them again: `train.rerun_without_data`)."""
        record = {"captions": os.path.abspath(captions), "format": self.format,
                  "splits": self.splits, "split_source": self.split_source,
                  "images_dir": self.images_dir, "splits_sha256": splits_digest(self.splits),
                  "cache_identity": feature_cache.cache_identity(self.manifest),
                  "caption_data": self.caption_data, "caption_file": self.caption_file,
                  "image_digests": dict(sorted({**(self.recorded_digests or {}),
                                                **(self.image_digests or {})}.items())),
                  "without_features": sorted(self.unusable or {}),
                  "vocab_sha256": self.vocab.digest(),
                  **({"settings_sha256": settings} if settings else {})}
        assert set(record) <= set(SPLIT_FIELDS), set(record) - set(SPLIT_FIELDS)
        write_json_atomic(run.split, record, file_names=True)  # captions, images_dir
        self.vocab.save(run.vocab)


def check_manifest(cache: str) -> dict:
    """The cache's manifest, refused unless its features are what the model reads."""
    manifest = feature_cache.read_manifest(cache)
    path = feature_cache.manifest_path(cache)
    shape = list(manifest.get("feature_shape", []))
    if shape != list(FEATURE_SHAPE):
        raise UserError(f"{path}: feature_shape {shape}, expected {list(FEATURE_SHAPE)}")
    if manifest.get("dtype") not in FEATURE_DTYPES:
        raise UserError(f"{path}: dtype {manifest.get('dtype')!r}, expected one of "
                        f"{FEATURE_DTYPES}")
    # an InceptionV3 cache of another version's image handling; features of another backbone
    # (the benchmarks' synthetic ones) train as they are: `caption` and `export` refuse them
    if manifest.get("backbone") == BACKBONE:
        feature_cache.refuse_other_images_to_features(
            cache, manifest, "`caption` and `export` would give a model trained on them other "
            "features of the same images: extract the images again into a new --cache folder")
    return manifest


def load_train_data(cfg: RunConfig, run: RunFolder, reuse: bool = True,
                    images_dir: Optional[str] = None) -> TrainData:
    """Captions, split, vocabulary and feature files of a run (with `reuse`, the split and
    vocabulary of the run folder when it has them: they never change under a run; --fresh
    makes new ones). Writes nothing.

    The feature files' source images are checked in `images_dir` (`train --images`: the
    folder of the caption file's images), or else (resumed) where the run last checked them
    (`RunFolder.images_dir`; `feature_cache.usable_features_checked_in`), or else in the
    folder the cache was last extracted from: a cache into which another folder with
    same-named images was extracted holds that folder's features under these names, which
    checked against it looked right. So a new run without `images_dir` is refused when the
    caption file's images may be others: the cache's folders share its image names
    (`_refuse_shared_names`), or its own folder holds them with other content
    (`_check_other_images_beside`), and told when a folder beside it holds the features'
    images too (the same function's note, `beside_note`)."""
    manifest = check_manifest(cfg.cache)
    if reuse:
        run.check_cache(cfg.cache, manifest)
    reader = pipeline.NpyReader.from_manifest(manifest)
    resumed = reuse and os.path.exists(run.split)
    captions = data_lib.load_dataset(cfg.captions, cfg.data,
                                     lists=run.split_by_lists() if resumed else True)
    split_note = captions.split_note
    if resumed:
        splits = run.load_splits()
        split_note = _resumed_split_note(run, cfg.captions, captions) or split_note
    else:
        data_lib.refuse_unused_fractions(captions, cfg.data)
        splits = {s: sorted(r.image for r in captions.split(s)) for s in data_lib.SPLITS}
    fingerprint = data_lib.caption_fingerprint(captions.records, splits)  # hashed once
    if reuse and os.path.exists(run.split):
        run.check_captions(cfg.captions, captions.records, splits, fingerprint,
                           captions if captions.split_source == "lists" else None)
    records = {r.image: r for r in captions.records}
    keys = [k for split_keys in splits.values() for k in split_keys if k in records]
    given = images_dir
    if given is None and not resumed:
        _refuse_shared_names(cfg, manifest, keys)
    images_dir, paths, problems, digests, recorded_digests, unfound = _usable_features(
        cfg, run, manifest, keys, reuse, images_dir)
    beside = _check_other_images_beside(cfg, manifest, digests, images_dir) \
        if given is None and not resumed else None
    skipped_captions = sum(len(records[k].captions) for k in problems)
    words = {k: tokenize_all(records[k].captions) for k in paths}  # for vocabulary and ids
    if reuse and os.path.exists(run.vocab):
        vocab = run.load_vocab()
        vocab.refuse_words_never_tokenized(run.vocab)
    else:
        # on the words the model trains on: a word seen only past --max-length's cut took a
        # place (and --min-count counted it) that a trained word then lost to <unk>
        cut = cfg.vocab.max_length
        vocab = Vocabulary.fit_words((w[:cut] for k in splits["train"] if k in paths
                                      for w in words[k]),
                                     cfg.vocab.vocab_size, cfg.vocab.min_count)
        if len(vocab) == len(SPECIAL_TOKENS):
            _refuse_empty_vocabulary(cfg, [w for k in splits["train"] if k in paths
                                           for caption in words[k] for w in caption[:cut]])
    caption_ids, references = {}, {}
    for split, keys in splits.items():
        keys = [k for k in keys if k in paths]
        caption_ids[split] = {k: [vocab.encode_words(w, cfg.vocab.max_length)
                                  for w in words[k]] for k in keys}
        references[split] = {k: records[k].captions for k in keys}
    data = TrainData(vocab, splits, caption_ids, references, paths, reader, manifest,
                     captions.format, skipped_captions, len(problems), "",
                     fingerprint, dict(sorted(digests.items())), problems, 0,
                     recorded_digests, captions.refused_note(), captions.empty_note(),
                     captions=cfg.captions, images_dir=images_dir, cache=cfg.cache,
                     images_why=images_why(cfg, run, given, images_dir, reuse),
                     split_source=captions.split_source, split_note=split_note,
                     caption_file=captions.stamp)
    data.problems = data.describe(problems) if problems else ""
    data.repeated_note = captions.repeated_note()
    data.beside_note = beside
    data.images_note = feature_cache.unchecked_images_note(
        cfg.cache, manifest, images_dir, run.images_dir(existing=False) if reuse else None)
    data.unfound_note = feature_cache.unfound_images_note(unfound, len(paths), images_dir,
                                                          cfg.cache)
    _check_not_empty(cfg, splits, caption_ids, problems, data.describe,
                     captions.split_source == "lists")
    truncated, truncated_val = (sum(len(w) > cfg.vocab.max_length for k in caption_ids[split]
                                    for w in words[k]) for split in ("train", "val"))
    data.truncated, data.truncated_val = truncated, truncated_val
    return data


def _usable_features(cfg: RunConfig, run: RunFolder, manifest: dict, keys: list[str],
                     reuse: bool, images_dir: Optional[str]) -> tuple:
    """(images folder checked in, {key: feature path} usable, {key: why not}, {key: digest
    of its source image}, the run's recorded digests, the usable keys whose source image was
    found nowhere) of the images `keys`, for `load_train_data` (`reuse`: a resume, whose
    recorded digests are checked) and `features_as_recorded`. Writes nothing. `images_dir`
    (--images) that holds none of them is refused: nothing could be checked, nor drawn."""
    given = images_dir
    checked_in = None if images_dir or not reuse else run.images_dir()  # a resume: as before
    images_dir = os.path.abspath(images_dir) if images_dir else \
        checked_in or feature_cache.source_images(manifest)
    digests = {}   # of every split's images, so `evaluate --cache` can tell other images
    recorded_digests = run.image_digests() if reuse else {}
    # --images given is the folder to check in; a resume's recorded one may be an older copy
    unfound: list = []
    paths, problems = feature_cache.usable_features_checked_in(
        cfg.cache, keys, manifest, images_dir, recorded_digests if checked_in else {}, digests,
        unfound)
    # (one stat in the usual case; `unfound` cannot tell: the cache's other images folders
    # may hold what --images lacks)
    if given and paths and not any(os.path.isfile(os.path.join(images_dir, k)) for k in paths):
        raise UserError(f"--images {given}: none of the {len(paths)} images of {cfg.captions} "
                        f"with features in {cfg.cache} is in it (e.g. no "
                        f"{os.path.join(images_dir, next(iter(paths)))}), so none can be "
                        f"checked there against its features, nor drawn: give the folder "
                        f"the caption file's image paths are relative to")
    if reuse:   # before split.json records today's digests as the run's own
        run.check_image_digests(cfg.cache, list(paths), digests,
                                images_dir or manifest.get("images_dir"))
    return images_dir, paths, problems, digests, recorded_digests, unfound


GIVEN_WHY = "given by --images"   # (the demo, which has no such flag, words it its own way)


def images_why(cfg: RunConfig, run: RunFolder, given: Optional[str], folder: Optional[str],
               reuse: bool = True) -> str:
    """Why the source images were checked in `folder` (`_usable_features`): --images
    (`given`), the run's recorded folder (a resume), or the folder the cache was last
    extracted from, which may hold another dataset's images of the caption file's names."""
    if given is not None:
        return GIVEN_WHY
    if reuse and folder is not None and folder == run.images_dir():
        return f"the run's images folder, recorded in {run.split}"
    return (f"the folder {cfg.cache} was last extracted from; pass --images to name the "
            f"caption file's folder")


def checked_in_line(folder: Optional[str], why: str) -> Optional[str]:
    """train's line saying where the features' source images were checked (None: nowhere)."""
    return f"source images checked in {folder} ({why})" if folder else None


def _refuse_shared_names(cfg: RunConfig, manifest: dict, keys: list[str]) -> None:
    """A new run without --images, whose cache was extracted from several images folders
    holding images of the caption file's names (`feature_cache.shared_names`: another
    dataset of the same file names extracted into it with --replace-other-images): its
    features were checked in the last folder, whose images of those names looked right,
    whichever dataset the caption file is. Refused, naming the folders."""
    shared = feature_cache.shared_names(manifest, keys)
    if shared is None:
        return
    key, folders, n, looked = shared
    raise UserError(f"--cache {cfg.cache} was extracted from more than one images folder, and "
                    f"images named as the caption file's are in more than one of them (e.g. "
                    f"{key!r} in {' and '.join(folders)}; {n} of {looked} names looked up): "
                    f"its features of such a name are of one folder's image, and which folder "
                    f"holds the images of {cfg.captions} cannot be told (by default they are "
                    f"checked in the last one extracted, {manifest.get('images_dir')}); pass "
                    f"--images DIR with the caption file's images folder")


def _check_other_images_beside(cfg: RunConfig, manifest: dict, digests: dict,
                               checked_in: Optional[str]) -> Optional[str]:
    """A new run without --images on the cache of another dataset with the caption file's
    image names: the caption file's folder (or a subfolder, `images/`) holds images of its
    names of other content than the features' (`feature_cache.other_images_beside`).
    Refused, naming both folders. When another folder beside it holds the features' images,
    which of the two the caption file describes cannot be told (two datasets of the same
    names side by side, or a resized copy beside the originals): the note that says so."""
    found = feature_cache.other_images_beside(cfg.captions, digests, checked_in)
    if found is None:
        return None
    folder, key, same = found
    source = checked_in or manifest.get("images_dir")
    if same is not None:   # two folders beside it: either may be the caption file's
        if checked_in and os.path.realpath(same) == os.path.realpath(checked_in):
            whose = (f"whose images the features in --cache {cfg.cache} were extracted from "
                     f"and are checked against")
        else:   # a copy of the folder the features were extracted from
            checked = (f"checked in {checked_in}" if checked_in else
                       f"not checked: {source or 'the folder it was extracted from'} is not "
                       f"on this machine")
            whose = (f"which holds the very images the features in --cache {cfg.cache} were "
                     f"extracted from ({checked})")
        return (f"{folder}, beside --captions {cfg.captions}, holds other images of its "
                f"names (e.g. {key!r}) than {same}, also beside it, {whose}: if the caption file "
                f"describes {folder}'s images (not a resized copy of the same pictures), stop "
                f"and train with --fresh --images {folder} (features of other images are left "
                f"out), or extract it into a cache of its own; --images {same} says those are "
                f"the caption file's images")
    raise UserError(f"{folder}, beside --captions {cfg.captions}, holds its images, but the "
                    f"features in --cache {cfg.cache} were extracted from other images of "
                    f"those names (e.g. {key!r} in {source}): the cache of another dataset? "
                    f"Pass --images {folder} to check the features against the caption "
                    f"file's images (those of other content are left out), or --images "
                    f"{source} if those are the caption file's images; or extract {folder} "
                    f"into a cache of its own")


def features_as_recorded(cfg: RunConfig, run: RunFolder,
                         images_dir: Optional[str] = None) -> bool:
    """Whether `load_train_data` would find what the run recorded when it last started
    (split.json) of its feature cache and of every image of its split: the same cache
    identity, the same images folder checked, usable features for every image (none went
    without then), each extracted from the image recorded then, none new. Then the load
    would neither note nor record anything of them (`TrainData.fix_in` would write what
    split.json holds). Its refusals are raised as there (another cache; features extracted
    from other images); nothing is written. For `train.rerun_without_data`."""
    manifest = check_manifest(cfg.cache)
    run.check_cache(cfg.cache, manifest)
    if run.cache_identity() != feature_cache.cache_identity(manifest) or \
            run.without_features() != set():   # or a run too old to have recorded them
        return False
    keys = [k for split in run.load_splits().values() for k in split]
    folder, paths, problems, digests, recorded, _ = _usable_features(cfg, run, manifest, keys,
                                                                     True, images_dir)
    return not problems and folder == run.images_dir(existing=False) and \
        all(recorded.get(k) == digest for k, digest in digests.items())


def _resumed_split_note(run: RunFolder, path: str,
                        captions: data_lib.CaptionSet) -> Optional[str]:
    """On resume, the run keeps the split it was made with: split by image hash (or made
    before Flickr8k's official lists were read), it was loaded so (`split_by_lists`), and with
    the lists beside the caption file now, that is said (None when nothing needs saying).
    Split by the lists, which are gone now, it is refused: split by image hash, its captions
    would differ from the recorded ones only in their split, a refusal that said "restore the
    file's earlier captions"."""
    if run.split_by_lists() and captions.split_source != "lists":
        raise UserError(f"{run.path} was split by Flickr8k's official lists "
                        f"{data_lib.LISTS_GLOB} beside its caption file, but they are not "
                        f"beside {path} now: put them back beside it, or add --fresh to start "
                        f"this run over split by image hash")
    if captions.split_source == "hash" and captions.format in data_lib.LIST_FORMATS and \
            data_lib.has_split_lists(path):
        return (f"{run.path} keeps the split by image hash it was made with ({run.split}); "
                f"Flickr8k's official lists {data_lib.LISTS_GLOB} beside {path} split a new "
                f"run: add --fresh to train on them (most of their test and dev images are "
                f"in this run's train split)")
    return None



def _refuse_empty_vocabulary(cfg: RunConfig, train_words: list) -> None:
    """A vocabulary of special tokens only (every word <unk>) trains a model that says
    nothing: refused, naming --min-count and what it would have to be."""
    if not train_words:
        return  # no training caption with features: _check_not_empty says so
    word, count = collections.Counter(train_words).most_common(1)[0]
    raise UserError(f"--min-count {cfg.vocab.min_count} leaves no word in the vocabulary: "
                    f"the train split's word seen most often ({word!r}) appears {count} "
                    f"times; lower --min-count")


def _check_not_empty(cfg: RunConfig, splits: dict, caption_ids: dict, problems: dict,
                     describe, by_lists: bool = False) -> None:
    """UserError when the train or val split has no caption with usable features, saying why
    (`describe`: `feature_cache.describe_problems` of some `problems`, with the fix). With
    `by_lists` (split by Flickr8k's official lists beside the caption file, for which
    --val-fraction and --test-fraction are refused) an empty split names its list instead."""
    if not splits["train"]:
        counts = ", ".join(f"{len(splits[s])} {s}" for s in data_lib.SPLITS if splits[s])
        fix = (f"{_split_list(cfg, 'train')} names none of its images; list its train images "
               f"there, an image name a line" if by_lists else
               f"lower --val-fraction ({cfg.data.val_fraction}) / --test-fraction "
               f"({cfg.data.test_fraction}) for a file without a split of its own, or give "
               f"the file train images")
        raise UserError(f"the train split of {cfg.captions} has no images (its images: "
                        f"{counts or 'none'}): {fix}")
    train_problems = {k: problems[k] for k in splits["train"] if k in problems}
    if not caption_ids["train"] and train_problems:  # feature files there, but not usable
        raise UserError(f"no training captions have usable features in {cfg.cache}: "
                        + describe(train_problems))
    if not caption_ids["train"]:
        raise UserError(f"no training captions have features in {cfg.cache}; run "
                        f"`caption-attn extract-features` for {cfg.captions} first")
    if not caption_ids["val"]:
        val_problems = {k: problems[k] for k in splits["val"] if k in problems}
        why = (f": {describe(val_problems)}" if val_problems else "")
        give = (f"List val images in {_split_list(cfg, 'val')}" if by_lists else
                "Give the caption file val images, raise --val-fraction (for files without "
                "splits)")
        raise UserError(
            f"the val split of {cfg.captions} has no images with features in {cfg.cache} "
            f"({len(splits['val'])} val images); validation drives early stopping and the "
            f"best model. {give}, or extract their features{why}")


def _split_list(cfg: RunConfig, split: str) -> str:
    """"PATH (Flickr8k's official SPLIT list beside it)": the list of `split` beside
    `cfg.captions`."""
    return f"{data_lib.split_list_path(cfg.captions, split)} (Flickr8k's official {split} " \
           f"list beside it)"


def hash_seed(seed: int, epoch: int) -> int:
    """Shuffle seed of one epoch: a resumed run replays exactly the same order."""
    return (seed * 1_000_003 + epoch) % (2**31 - 1)


# the feature table while it is built: the batches read, then their concatenation
TABLE_COPIES = 2


def size_text(n: int) -> str:
    """Bytes as "31.5 GiB", or "12 MiB" under a tenth of a GiB (not "0.0 GiB"): the unit of
    --memory-cache-gb, which the note that prints them names beside them."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.0f} MiB"


def cgroup_limit_files(proc: str = "/proc/self/cgroup",
                       root: str = "/sys/fs/cgroup") -> list[str]:
    """The files that may hold this process's memory limit: cgroup v2's `memory.max` and
    v1's `memory.limit_in_bytes` of its cgroup (`proc`) and of every cgroup above it (a
    Slurm job's or a systemd unit's is a sub-cgroup of the host's tree), then those at
    `root` itself (a container's namespaced cgroup). The machine's memory is the host's
    there."""
    files = []
    try:
        with open(proc) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[1] == "":                                   # v2: "0::/path"
            base, name = root, "memory.max"
        elif "memory" in parts[1].split(","):                # v1: "4:memory:/path"
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        below = parts[2].strip().strip("/")
        if ".." in below.split("/"):   # outside its namespace's root: not under `root`
            continue
        while below:
            files.append(os.path.join(base, below, name))
            below = os.path.dirname(below)
    return files + [os.path.join(root, "memory.max"),
                    os.path.join(root, "memory", "memory.limit_in_bytes")]


def machine_memory(limits: Optional[Sequence[str]] = None) -> Optional[int]:
    """The memory this process may use in bytes: the machine's physical memory, or its
    cgroup's limit when lower (`limits`: files holding one, by default
    `cgroup_limit_files()`); None where the OS does not say."""
    try:
        found = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):   # no sysconf (Windows)
        return None
    for path in cgroup_limit_files() if limits is None else limits:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():                           # "max" (v2) or a huge number: none
            found = min(found, int(text))
    return found


class EpochData:
    """The input of every epoch of one run, distributed over `strategy`'s replicas: caption
    batches (cross-entropy, validation loss) and image batches (self-critical), with their
    step counts, the in-memory feature table, and the self-critical reward's data (the train
    split's references and CIDEr-D document frequencies)."""

    def __init__(self, cfg: RunConfig, data: TrainData, strategy, run: RunFolder,
                 chief: bool, log=lambda line: None):
        tc = cfg.train
        self.cfg, self.data, self.strategy, self.run, self.chief = cfg, data, strategy, run, chief
        self.log = log
        self.boundaries = pipeline.bucket_boundaries(cfg.vocab.max_length + 2)
        self.items = {s: data.items(s) for s in ("train", "val")}
        self.steps_per_epoch = pipeline.count_batches(
            [len(t) for t in self.items["train"][1]], tc.batch_size, self.boundaries)
        self.train_images = sorted(data.caption_ids["train"])  # self-critical image ids
        self.images_per_step = max(1, tc.batch_size // tc.scst_samples)
        self.scst_steps_per_epoch = math.ceil(len(self.train_images) / self.images_per_step)
        self.table: Optional[pipeline.FeatureTable] = None
        self._df: Optional[DocumentFrequency] = None
        self._df_digest: Optional[str] = None

    def load_table(self) -> None:
        """Keep the train and val features in memory when they fit in --memory-cache-gb,
        and building the table (`TABLE_COPIES` times their bytes) in the memory this process
        may use (`machine_memory`; else a note: an OOM kill, after --fresh had deleted the
        run, said nothing)."""
        gb, d = self.cfg.train.memory_cache_gb, self.data
        paths = sorted({d.feature_paths[k] for split in ("train", "val")  # never the test split
                        for k in d.caption_ids[split]})
        size = len(paths) * d.reader.num_bytes
        if gb <= 0 or size > gb * 2**30:
            return
        memory = machine_memory()
        if memory is not None and TABLE_COPIES * size > memory:
            self.log(f"note: --memory-cache-gb {gb:g}: the train and val features take "
                     f"{size_text(size)}, and building them into a table in memory takes "
                     f"about twice that, more than the {size_text(memory)} this process may "
                     f"use: they are read from the cache on disk instead")
            return
        self.table = pipeline.FeatureTable(
            d.reader, paths, fix=f"run `{self.repair_command()}`: it re-extracts them")

    def repair_command(self) -> str:
        """The `extract-features --verify` command, with every flag, that repairs damaged
        files of this run's cache."""
        return feature_cache.repair_command(self.cfg.cache, self.data.manifest,
                                            self.cfg.captions, self.data.images_dir)

    def captions(self, split: str, epoch: Optional[int] = None, skip: int = 0,
                 batch_size: Optional[int] = None):
        """Caption batches of one epoch (shuffled by its seed; in order without `epoch`);
        every replica gets its slice of each global batch (`pipeline.caption_dataset`), so
        any replica count sees the same data. In order (the validation loss, forward only),
        adjacent length buckets are merged where fewer, fuller batches are faster
        (`pipeline.merged_boundaries`; the loss is a sum over tokens, so batching does not
        change it beyond rounding)."""
        paths, tokens = self.items[split]
        seed = None if epoch is None else hash_seed(self.cfg.data.seed, epoch)
        batch_size = batch_size or self.cfg.train.batch_size
        boundaries = self.boundaries if epoch is not None else pipeline.merged_boundaries(
            [len(t) for t in tokens], batch_size, self.boundaries)
        return distribute.distribute_dataset(self.strategy, lambda replicas, ids: (
            pipeline.caption_dataset(
                paths, tokens, batch_size, boundaries, self.data.reader,
                self.table, shuffle_seed=seed, skip_batches=skip, num_replicas=replicas,
                replica_ids=ids, pad_images=self.cfg.train.xla)))

    def images(self, epoch: int, skip: int = 0):
        """Self-critical batches of one epoch: (features (N, P, F), train image ids (N,)),
        images shuffled by the epoch's seed, `images_per_step` per batch."""
        paths = [self.data.feature_paths[k] for k in self.train_images]
        return distribute.distribute_dataset(self.strategy, lambda replicas, ids: (
            pipeline.shuffled_image_dataset(
                paths, self.images_per_step, self.data.reader, self.table,
                hash_seed(self.cfg.data.seed, epoch), skip_batches=skip,
                num_replicas=replicas, replica_ids=ids)))

    def train_references(self) -> dict:
        """{train image id: [token id lists]}: the references of the self-critical reward."""
        ids = self.data.caption_ids["train"]
        return {i: ids[k] for i, k in enumerate(self.train_images)}

    def df_digest(self) -> str:
        """The digest of the train references the document frequencies are counted on (what
        cider_df.json records): history.json notes it beside each val_cider."""
        if self._df_digest is None:
            self._df_digest = references_digest(self.train_references())
        return self._df_digest

    def document_frequency(self) -> DocumentFrequency:
        """CIDEr-D document frequencies of the train split (counted once per run and kept
        in its folder by the chief)."""
        if self._df is None:
            self._df = train_document_frequency(self.run.cider_df, self.train_references(),
                                                len(self.data.vocab), save=self.chief,
                                                log=self.log)
            df = self._df
            if df.counts.size and bool(np.all(df.counts == df.num_images)):
                self.log(f"note: every n-gram of the train captions occurs in all "
                         f"{df.num_images} train image(s): CIDEr-D weighs each by log(images / "
                         f"images holding it) = 0, so val_cider and the self-critical reward "
                         f"are 0 whatever the caption (it needs more, and more varied, train "
                         f"images)")
        return self._df
