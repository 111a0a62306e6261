"""A trained run, ready to caption: model + vocabulary + compiled batched decoders.

`Captioner.from_run(run_dir)` loads the best model of a run; `decode(features)` captions a
batch of cached feature maps; `caption_images(paths)` decodes and resizes image files exactly
as `extract-features` did, runs the backbone that made the run's cache, and captions them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import math
import os
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf

from caption_attn import decode as decode_lib
from caption_attn import model as _model  # noqa: F401  registers the Keras classes to load
from caption_attn.backbone import (FEATURE_SHAPE, GRID, Backbone, prefer_wide_xla_vectors,
                                   refuse_aborting_precision)
from caption_attn.config import DecodeConfig, RunConfig
from caption_attn.errors import OutOfMemory, UserError, counted, out_of_memory
from caption_attn.feature_cache import (MANIFEST, cache_images_folders, manifest_path,
                                         read_manifest)
from caption_attn.fileio import (holding_lock, is_inside, longest_temp_name, one_line,
                                 usable_cores)
from caption_attn.images import (ImageError, heatmap_source, is_heatmap_file, left_out_note,
                                 list_images, load_image_and_view, printable_name)
from caption_attn.run import RunFolder
from caption_attn.vocab import PAD, START, Vocabulary

BANNED = (PAD, START)  # never generated: <pad> only follows <end>, <start> only begins


@dataclasses.dataclass
class Caption:
    """One generated caption of one image."""

    words: list[str]
    log_prob: float             # log p(caption) including <end>
    attention: np.ndarray       # (len(words) + ended, 64): one row per word, then <end>
    ended: bool = True          # False: cut at max_length before <end> was generated

    @property
    def steps(self) -> list[str]:
        """The generated tokens, one per attention row."""
        return self.words + ["<end>"] if self.ended else list(self.words)

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def probability(self) -> float:
        return math.exp(self.log_prob)


def masked_step(step_fn, banned: Sequence[int] = BANNED, **step_kwargs):
    """`step_fn` (called with `step_kwargs`) whose logits of the `banned` ids are -inf."""
    def step(tokens, state, context):
        logits, state, attention = step_fn(tokens, state, context, **step_kwargs)
        vocab_size = tf.shape(logits)[-1]
        mask = tf.reduce_sum(tf.one_hot(list(banned), vocab_size), axis=0)  # (V,)
        return tf.where(mask > 0, float("-inf"), logits), state, attention
    if decode_lib.takes_per_image_context(step_fn):
        decode_lib.per_image_context(step)
    return step


def make_decoder(model, cfg: DecodeConfig, max_length: int, fixed_weights: bool = False):
    """features (B, 64, 2048) float32 -> DecodeResult, for any batch size (a sampler also
    takes ids (B,) int64: each image's own random stream, see `decode.sample`): one tf.function
    that encodes the features (`init_decoder`, the standardisation folded into the encoder of
    a float32 model) and runs the whole decoding loop, the loop XLA-compiled with `cfg.xla`,
    and by default (see `xla_min_images`) for batches of known size B >= cfg.xla_min_images
    of a float32 model only. Called inside another tf.function on a batch of unknown size
    (`export`), it is the plain loop.

    `fixed_weights` says the model's weights are not expected to change (the `Captioner`'s
    best model; not a model in training): batches compiled by size then look every step's GRU
    input gates up in the model's `gate_table` instead of a matmul per step. The table is
    built at the first such batch, and again should the embedding or `gru_embed` weights it
    comes from have changed since (a check of ~1 ms per batch)."""
    # By batch size: not for samples (their decoder takes each image's ids too; `--xla` draws
    # the same samples, see `decode._hashed_uniform`), nor for a model that computes in
    # bfloat16/float16: XLA's fusions round differently there, and near-ties would then
    # decode differently in a batch of 32 than alone.
    by_size = bool(cfg.xla_min_images) and not cfg.xla and cfg.method != "sample" \
        and getattr(model, "compute_dtype", "float32") == "float32"
    if cfg.xla or by_size:
        prefer_wide_xla_vectors()   # before XLA's first compile in this process
    plain = _decoder_function(model, cfg, max_length, jit_compile=cfg.xla)
    if not by_size:
        return plain
    compiled = _decoder_function(model, cfg, max_length, jit_compile=True,
                                 gates=fixed_weights)
    cores = decoding_slices()
    sliced = {}  # slices -> the compiled decoder of a batch in that many slices, once needed
    sources = (model.embedding.embeddings, model.gru_embed.kernel, model.gru_embed.bias) \
        if fixed_weights else ()
    table = []   # [the gate table, copies of its sources], once built

    def run(features):
        n = features.shape[0]
        if n is None or n < cfg.xla_min_images:
            return plain(features)
        slices = max(1, min(cores, n // MIN_SLICE_IMAGES))
        if slices > 1 and slices not in sliced:
            sliced[slices] = _decoder_function(model, cfg, max_length, jit_compile=True,
                                               gates=fixed_weights, slices=slices)
        decoder = sliced[slices] if slices > 1 else compiled
        if not fixed_weights:
            return decoder(features)
        with tf.init_scope():   # eager even when called while tracing
            if not table or not all(bool(tf.reduce_all(tf.equal(v, copy)))
                                    for v, copy in zip(sources, table[1])):
                table[:] = [model.gate_table(), [tf.identity(v) for v in sources]]  # (V, 3U)
        return decoder(features, table[0])
    run.plain, run.compiled, run.slices = plain, compiled, sliced
    return run


# A compiled batch is decoded in slices of at least this many images (`decoding_slices`).
MIN_SLICE_IMAGES = 16
MAX_SLICES = 8


def decoding_slices() -> int:
    """Into how many slices, decoded side by side (`decode.in_slices`), a batch compiled by
    `make_decoder` is cut at most: XLA's compiled CPU loop keeps about one core busy, so one
    slice per core this process may run on (at most `MAX_SLICES`: more were never measured,
    and slices of `MIN_SLICE_IMAGES`), and no more than TensorFlow runs side by side (its
    inter-op threads, where set); 1 with a GPU, which runs the loop on its own cores."""
    if tf.config.list_logical_devices("GPU"):
        return 1
    cores = usable_cores()
    inter_op = tf.config.threading.get_inter_op_parallelism_threads()
    return max(1, min(cores, inter_op or cores, MAX_SLICES))


def _decoder_function(model, cfg: DecodeConfig, max_length: int, jit_compile: bool,
                      gates: bool = False, slices: int = 1):
    """The tf.function of `make_decoder`; with `gates` (not for samples) it also takes the
    model's gate table (V, 3U), whose rows the steps look up; with `slices` > 1 (not for
    samples) it decodes the batch in that many slices side by side (`decode.in_slices`)."""
    spec = [tf.TensorSpec([None, *FEATURE_SHAPE], tf.float32)]
    if gates:
        spec.append(tf.TensorSpec([None, None], model.compute_dtype))
    # the untiled context for beam search (`decode_step_per_image`), where the model has it
    # (export's TFLite wrapper of the model only has `decode_step`)
    model_step = getattr(model, "decode_step_per_image", model.decode_step)

    def init(features):   # one pass less over the features (`ShowAttendTell._folded_encoder`)
        return model.init_decoder(features, fold_standardization=True)

    def step(table):      # table: () or (the gate table,)
        return masked_step(model_step, **({"gates": table[0]} if table else {}))
    kwargs = {"max_length": max_length}
    if cfg.method == "beam":
        # each beam's best candidates by chunks of ids on a CPU: the same choice as a top_k
        # over whole rows, which is slower there, most of all XLA's (`decode.beam_search`).
        # Decided when the decoder is built and kept in its graph: a SavedModel exported on a
        # CPU keeps the chunks on a GPU too.
        kwargs.update(beam_size=cfg.beam, length_penalty=cfg.length_penalty,
                      chunked_top_k=not tf.config.list_logical_devices("GPU"))
    elif cfg.method == "sample":
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed)

        @tf.function(jit_compile=jit_compile or None, autograph=False)
        def sample_loop(state, context, ids):
            return decode_lib.sample(step(()), state, context, ids=ids, **kwargs)

        @tf.function(input_signature=[spec[0], tf.TensorSpec([None], tf.int64)],
                     autograph=False)
        def run_sample(features, ids):
            return sample_loop(*init(features), ids)
        return run_sample

    @tf.function(jit_compile=jit_compile or None, autograph=False)
    def loop(state, context, *table):
        return decode_lib.decode(step(table), state, context, cfg.method, **kwargs)

    # The encoder and key projection outside XLA: oneDNN's matmuls of (B * 64) rows were
    # ~12% faster than XLA's (49-52 against 56-61 ms at 256 images, on 2 cores)
    @tf.function(input_signature=spec, autograph=False)
    def run(features, *table):
        return decode_lib.in_slices(lambda state, context: loop(state, context, *table),
                                    *init(features), slices)
    return run


def to_captions(result: decode_lib.DecodeResult, vocab: Vocabulary) -> list[list[Caption]]:
    """Per image, its live captions best first (dead beams dropped)."""
    tokens = result.tokens.numpy()                                    # (B, K, T)
    log_probs = result.log_probs.numpy()                              # (B, K)
    attention = result.attention.numpy()                              # (B, K, T, P)
    lengths = result.lengths.numpy()                                  # (B, K)
    out = []
    for b in range(tokens.shape[0]):
        captions = []
        for k in range(tokens.shape[1]):
            if not np.isfinite(log_probs[b, k]):
                continue
            words = vocab.decode(tokens[b, k])
            ended = bool(lengths[b, k] > len(words))
            captions.append(Caption(words, float(log_probs[b, k]),
                                    attention[b, k, :len(words) + ended], ended))
        out.append(captions)
    return out


# a folder given that holds no image, among other images given (`expand_image_args`)
NO_IMAGES = "no image files in this folder"
# An image whose every hypothesis ended with probability 0 (non-finite logits)
NO_CAPTION = "no caption could be decoded (every hypothesis has probability 0: the model's " \
    "outputs are not finite numbers; a damaged or diverged best.keras?)"

# Why `caption` and `export` need the feature cache, for the message when it is gone.
CAPTION_NEEDS = ("`caption` rebuilds the backbone from its manifest.json (and, for random "
                 "weights, the weights saved there)")
EXPORT_NEEDS = ("`export` builds the backbone into the SavedModel from its manifest.json "
                "(and, for random weights, the weights saved there)")


def check_run_records(run: RunFolder) -> None:
    """UserError when the run has trained (a best model) but lost split.json, as `train`
    refuses it: the file records the identity of the feature cache and the order of the
    vocabulary the model was trained with, and without it `RunFolder.check_cache` and
    `load_vocab` check nothing (`caption --cache OTHER` captioned another backbone's
    features, exit 0). A split.json of a run made before it recorded them is not refused."""
    if os.path.exists(run.split):
        return
    trained = [p for p in (run.best_model, run.best_weights) if os.path.exists(p)]
    if trained:
        raise UserError(f"{run.split}: missing, but {run.path} has trained "
                        f"({os.path.basename(trained[0])}); the file records the identity of "
                        f"the feature cache and the order of the vocabulary the model was "
                        f"trained with, and without it other features or words would go "
                        f"unnoticed: restore it, or train the run again with --fresh")


def check_feature_cache(cache: str, given: bool, run: Optional[RunFolder] = None,
                        needed_for: str = CAPTION_NEEDS) -> None:
    """UserError unless `cache` is a feature cache (with a manifest), naming --cache when the
    user gave it (`given`), else the run's recorded cache and how to point at a moved one;
    with `run`, also unless it holds features of the backbone the run was trained on
    (`RunFolder.check_cache`). Cheap: checked before the model is loaded."""
    if not os.path.exists(os.path.join(cache, MANIFEST)):
        why = ("is a file, not a folder" if os.path.isfile(cache) else
               "has no manifest.json: not a cache made by `extract-features`"
               if os.path.isdir(cache) else "does not exist")
        if given:
            raise UserError(f"--cache {cache}: {why}; give the feature cache the run "
                            f"was trained on (or a copy of it)")
        raise UserError(f"the run's feature cache {cache} {why}: {needed_for}; if it "
                        f"moved, pass --cache NEW_FOLDER")
    if run is not None:
        run.check_cache(cache, read_manifest(cache))


def check_run(run: RunFolder, cache: str, given: bool, needed_for: str = CAPTION_NEEDS,
              needs_backbone: bool = False) -> None:
    """What is checked before a run's model is loaded, in this order: its records
    (`check_run_records`), that it has a best model (without loading it), its feature cache
    (`check_feature_cache`; `given`: as --cache), and with `needs_backbone` what rebuilding
    the cache's backbone needs (`Backbone.check_manifest`: its weights file is there)."""
    check_run_records(run)
    if not os.path.exists(run.best_model):
        run.load_best_model()   # its refusal: no best model yet, or how to rewrite a lost one
    check_feature_cache(cache, given, run, needed_for)
    if needs_backbone:
        Backbone.check_manifest(cache)


class Captioner:
    """The best model of a run with its vocabulary and decoding settings."""

    def __init__(self, model, vocab: Vocabulary, run_cfg: RunConfig, cfg: DecodeConfig,
                 run_dir: str = "", cache: Optional[str] = None, computes: bool = True):
        self.model, self.vocab, self.run_cfg, self.cfg = model, vocab, run_cfg, cfg
        self.run_dir = run_dir
        self.computes = computes              # runs its models here (export only traces them)
        self.cache = cache or run_cfg.cache   # where the run's features (and backbone) are
        self._cache_flag = bool(cache)        # given as --cache (not the run's own)
        self.max_length = cfg.max_length or run_cfg.vocab.max_length + 1
        self._decoder = make_decoder(model, cfg, self.max_length, fixed_weights=True)
        self._backbone = None

    @classmethod
    def from_run(cls, run_dir: str, cfg: Optional[DecodeConfig] = None,
                 cache: Optional[str] = None, needed_for: str = CAPTION_NEEDS,
                 computes: bool = True, needs_backbone: bool = False) -> "Captioner":
        """The best model of the run in `run_dir`; `cache` replaces the run's feature cache
        (a cache that moved, or a copy; it must hold features of the same backbone). The
        run and its feature cache are checked before the model is loaded (`check_run`;
        `needed_for`: why the command needs the cache, for the message when it is gone;
        `needs_backbone`: the caller captions image files, so the weights file of the cache's
        backbone is checked too: `evaluate`, which reads features only, needs none).
        `computes`: the caller runs the models here, so a precision oneDNN's cap would abort
        in is refused (`refuse_aborting_precision`); export, which only traces them, runs
        under the cap."""
        cfg = cfg or DecodeConfig()
        run = RunFolder(run_dir)
        run_cfg = run.load_config()
        check_run(run, cache or run_cfg.cache, bool(cache), needed_for, needs_backbone)
        vocab = run.load_vocab()
        model = run.load_best_model()      # computes nothing yet
        if computes:   # in its own precision, which a resume in another one keeps a while
            refuse_aborting_precision(model.compute_dtype, f"{run.best_model}: the run's "
                                      f"best model computes in {model.compute_dtype}",
                                      "use a best model trained in float32")
        if model.vocab_size != len(vocab):
            raise UserError(f"{run.best_model}: model vocabulary {model.vocab_size} does not "
                            f"match {run.vocab} ({len(vocab)})")
        # a best.keras copied from another run of the same vocabulary size loaded and
        # captioned, silently, with words of this run's vocabulary
        found = {k: getattr(model, k, None) for k in ("embedding_dim", "units")}
        wanted = {k: getattr(run_cfg.model, k) for k in found}
        if found != wanted:
            def show(d):
                return ", ".join(f"{k} {v}" for k, v in d.items())
            raise UserError(f"{run.best_model}: a model with {show(found)}, but "
                            f"{run.config} says {show(wanted)}: not this run's best model "
                            f"(copied from another run?)")
        return cls(model, vocab, run_cfg, cfg, run_dir, cache, computes)

    # -- features -> captions ----------------------------------------------------------
    def decode(self, features: np.ndarray, ids: Optional[Sequence[int]] = None
               ) -> list[list[Caption]]:
        """features (B, 64, 2048) -> per image its captions, best first. With --sample, image
        b draws from the random stream `ids[b]` (default b): give each image its index in
        the whole set, so that its sample does not depend on how the set is batched."""
        features = tf.constant(features, tf.float32)
        if self.cfg.method != "sample":
            return to_captions(self._decoder(features), self.vocab)
        ids = range(features.shape[0]) if ids is None else ids
        return to_captions(self._decoder(features, tf.constant(list(ids), tf.int64)),
                           self.vocab)

    def decode_batches(self, features_iter, progress=None,
                       ids: Optional[Sequence[int]] = None) -> list[list[Caption]]:
        """`decode` of every batch; with --sample, image i of the whole set draws from stream
        `ids[i]` (default i: its place in the set; `evaluate` gives each image's place in
        the split, so an image left out does not change the others' samples)."""
        out = []
        for batch in features_iter:
            where = range(len(out), len(out) + len(batch))
            with self._said_out_of_memory(len(batch)):
                out += self.decode(batch, where if ids is None else [ids[i] for i in where])
            if progress is not None:
                progress.add(len(batch))
        return out

    # -- images -> captions ------------------------------------------------------------
    def check_cache(self, needed_for: str = CAPTION_NEEDS) -> None:
        """`check_feature_cache` of this captioner's cache (without the identity check)."""
        check_feature_cache(self.cache, self._cache_flag, needed_for=needed_for)

    @property
    def backbone(self) -> Backbone:
        if self._backbone is None:
            check_feature_cache(self.cache, self._cache_flag,
                                RunFolder(self.run_dir) if self.run_dir else None)
            if self.computes:
                precision = read_manifest(self.cache)["precision"]
                refuse_aborting_precision(precision, f"{manifest_path(self.cache)}: the "
                                          f"cache's backbone computes in {precision}",
                                          "use a cache extracted with --precision float32")
            self._backbone = Backbone.from_manifest(self.cache)
        return self._backbone

    def caption_images(self, paths: Sequence[str]) -> tuple[dict, dict]:
        """(path -> (image, captions), path -> error reason); the image is the photo to
        draw heatmaps on (`images.heatmap_view`: uint8 (H, W, 3) in its own proportions, at
        most 299 on its longest side), not the 299x299 the model saw."""
        results, errors = {}, {}
        for batch_results, batch_errors, _ in self.caption_batches(paths):
            results.update(batch_results)
            errors.update(batch_errors)
        return results, errors

    @contextlib.contextmanager
    def _said_out_of_memory(self, images: int):
        """TensorFlow's out of memory in the backbone or the decoder (a --batch-size too
        large for a GPU: it was a traceback) as a one-line `UserError`, exit 1."""
        try:
            yield
        except Exception as e:
            what = out_of_memory(e)
            if what is None:
                raise
            raise OutOfMemory(f"out of memory captioning a batch of {counted(images, 'image')} "
                              f"(--batch-size {self.cfg.batch_size}; {what}); rerun with a "
                              f"lower --batch-size", what) from None

    def caption_batches(self, paths: Sequence[str]) -> Iterator[tuple[dict, dict, int]]:
        """`caption_images` a batch at a time, in the order of `paths`: yields (results,
        errors, paths done) for every `batch_size` readable images (and the files that
        failed on the way), so only one batch of images is in memory and each batch's
        captions can be shown before the next is read. Unreadable files do not shrink a
        batch (every full batch has one size: one XLA compilation)."""
        images, views, ids, errors, done = {}, {}, {}, {}, 0
        for done, path in enumerate(paths, 1):
            try:
                images[path], views[path] = load_image_and_view(path)
                ids.setdefault(path, done - 1)  # its index in `paths`: its samples' stream
            except ImageError as e:
                errors[path] = str(e)
            if len(images) == self.cfg.batch_size or done == len(paths):
                results, decoded = {}, []
                if images:
                    with self._said_out_of_memory(len(images)):
                        feats = self.backbone(np.stack(list(images.values())))  # (B, 64, 2048)
                        decoded = self.decode(feats, [ids[key] for key in images])
                    for key, captions in zip(images, decoded):
                        if captions:
                            results[key] = (views[key], captions)
                        else:   # every beam died: reported, not an empty block of captions
                            errors[key] = NO_CAPTION
                yield results, errors, done
                images, views, ids, errors = {}, {}, {}, {}


def _why_missing(path: str) -> str:
    """Why `path`, which os.path.exists denies, is not there: a symlink loop and a broken
    symlink (naming its target) were "no such image file or folder", like a typo; so was
    "-", given for standard input."""
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return (f"a symlink loop ({e.strerror}): point the link at an image, or "
                        f"remove it")
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                return (f"a broken symlink to {os.readlink(path)}, which does not exist: "
                        f"point the link at an image, or remove it")
            return f"unreadable ({e.strerror})"
    if path == "-":   # the usual name of standard input, which is no image argument here
        return ("standard input is not read: give image files or folders (save a piped "
                "image to a file first, e.g. `... > photo.jpg`)")
    return "no such image file or folder"


def expand_image_args(args: Sequence[str], heatmaps: Optional[str] = None,
                      unreadable: Optional[dict] = None,
                      drawn: Optional[list] = None,
                      left_out: Optional[list] = None,
                      same: Optional[dict] = None) -> list[str]:
    """Image files given on the command line, each once; folders expand to the images under
    them, except those in the folder `heatmaps` below them (`--plot-attention`: `caption
    photos --plot-attention photos/heat` run again captioned the heatmaps of the first run
    as photos); `heatmaps` that is a folder given, or the folder of an image given, or a
    folder above either, is refused (its heatmaps, which need not overwrite an image, would be
    captioned by a later run on that folder); `check_heatmap_targets` refuses one below
    holding anything but heatmaps, whose images would be left out here. A folder given that
    holds no image is a UserError alone (or without `unreadable`), else reported in
    `unreadable` as a file that cannot be read is. A path that does not
    exist is a UserError (before the model is loaded: it is a typo, not one bad image of
    many); an existing file that is no image is reported later, by
    `Captioner.caption_images`, while the others are captioned. So is a folder below a folder
    given that cannot be listed: `unreadable`, when given, receives {its path + "/": why}
    (they were skipped without a word), and `left_out` the paths of the files in the folders
    given that are not taken for their extension (`list_images`). Heatmaps caption-attn drew
    (`images.is_heatmap_file`) found in a folder are left out too, wherever they are
    (`caption photos` after `caption photos --plot-attention photos/heat` captioned them as
    photos), and those outside `heatmaps` listed in `drawn`. A file given twice is captioned
    once, under the name it is first given; `same`, when given, receives {each other name it
    is given under: that first name} (`caption --json link.png a.png`, link.png -> a.png, had
    one entry, without a word, for a script matching its inputs to the outputs)."""
    if any(not arg for arg in args):
        raise UserError("IMAGE_OR_DIR must name a file or folder, got an empty string")
    missing = [arg for arg in args if not os.path.exists(arg)]
    if missing:
        raise UserError(f"{missing[0]}: {_why_missing(missing[0])}"
                        + (f" (and {len(missing) - 1} more: {', '.join(missing[1:4])})"
                           if len(missing) > 1 else ""))
    # empty: (a folder given without images, its report among others, its refusal alone);
    # drawn_only: (a folder given that holds heatmaps caption-attn drew and nothing else, as
    # `caption photos/*` after `caption photos/* --plot-attention photos/heat` gives
    # photos/heat: its heatmaps, left out among other images with the note on them)
    out, empty, drawn_only = [], [], []
    for arg in args:
        if os.path.isdir(arg):
            folders: dict = {}
            others: list = []
            ours: list = []     # heatmaps caption-attn drew
            found = [os.path.join(arg, k)
                     for k in list_images(arg, folders, others, flag="", heatmaps=ours)]
            ours = [os.path.join(arg, k) for k in ours]
            if left_out is not None:
                left_out += [os.path.join(arg, k) for k in others]
            if unreadable is not None:
                unreadable.update({os.path.join(arg, k): why for k, why in folders.items()})
            skip, top = os.path.realpath(heatmaps or arg), os.path.realpath(arg)
            if ours and not found and not others and not folders:
                drawn_only.append((arg, ours))
                continue
            if heatmaps and skip == top:
                _refuse_heatmaps_among_images(heatmaps, arg, f"the folder {arg} of the "
                                                              f"images being captioned")
            if heatmaps and is_inside(top, skip):
                _refuse_heatmaps_among_images(heatmaps, heatmaps, f"a folder above {arg}, a "
                                                                   f"folder being captioned")
            below = skip != top and os.path.commonpath([skip, top]) == top
            if below:   # the heatmaps in it go without a note: they are where they belong
                def outside(p: str) -> bool:
                    return os.path.commonpath([os.path.realpath(p), skip]) != skip
                found, ours = list(filter(outside, found)), list(filter(outside, ours))
            if drawn is not None:
                drawn += ours
            if not found:
                locked = (f" it could list ({len(folders)} folder(s) below it cannot be read, "
                          f"e.g. {os.path.join(arg, next(iter(folders)))}: "
                          f"{next(iter(folders.values()))})" if folders else "")
                outside = f" (outside --plot-attention {heatmaps})" if below else ""
                # (reported among others, the notes on what it holds instead say the rest)
                empty.append((arg, NO_IMAGES + outside, NO_IMAGES + locked + outside
                              + (f" besides {len(ours)} heatmap(s) caption-attn drew"
                                 if ours else "")
                              + (f"; {left_out_note(others, 'there')}" if others else "")))
            out += found
        else:
            folder = os.path.dirname(arg) or "."
            if heatmaps and os.path.realpath(heatmaps) == os.path.realpath(folder):
                _refuse_heatmaps_among_images(heatmaps, folder, f"the folder of {arg}, an "
                                                                 f"image being captioned")
            if heatmaps and is_inside(folder, heatmaps):
                _refuse_heatmaps_among_images(heatmaps, heatmaps, f"a folder above {arg}, an "
                                                                   f"image being captioned")
            out.append(arg)
    if drawn_only and not out:   # nothing else given: no image to caption, as before
        arg, ours = drawn_only[0]
        raise UserError(f"{arg}: {NO_IMAGES} besides {len(ours)} heatmap(s) caption-attn drew")
    for _, ours in drawn_only:
        if drawn is not None:
            drawn += ours
    # a folder without images among others is one item's report (`caption photos/*` whose
    # glob matched an empty folder was refused whole); alone, nothing could be captioned
    if empty and (not out or unreadable is None):
        raise UserError(f"{empty[0][0]}: {empty[0][2]}")
    if unreadable is not None:
        unreadable.update({os.path.join(arg, ""): why for arg, why, _ in empty})
    # one file spelled twice (x.png ./x.png, a folder and a file in it, a folder reached
    # through a symlink beside it: `list_images` lists both paths) is captioned once, under
    # its first spelling, in the order given
    first = {}
    for p in out:
        kept = first.setdefault(os.path.realpath(p), p)
        if kept != p and same is not None:
            same.setdefault(p, kept)
    return list(first.values())


def run_images_folders(run: RunFolder, cache: str) -> list:
    """(folder, what it is) of every images folder the run and its feature cache `cache`
    name: the run's (split.json's `images_dir`), then each the cache was extracted from (its
    manifest; none when the manifest cannot be read yet: its own checks say why, later).
    Where `export --out` and `caption --plot-attention` may not go: `caption` refused only
    the cache's last folder, so a heatmap could overwrite an image of an earlier one."""
    found = []
    recorded = run.images_dir(existing=False)
    if recorded:
        found.append((recorded, "the images folder the run was trained on (split.json's "
                                "images_dir)"))
    extracted = cache_images_folders(cache)
    seen = {os.path.realpath(f) for f, _ in found}
    for folder in extracted:
        if os.path.realpath(folder) not in seen:
            seen.add(os.path.realpath(folder))
            found.append((folder, f"an images folder the feature cache {cache} was "
                                  f"extracted from"))
    return found


def check_heatmap_folder(out_dir: str, run_dir: str, cache: Optional[str] = None) -> None:
    """UserError when the `--plot-attention` folder is the run folder or inside it
    (`--plot-attention RUN/attention/epoch_1` wrote over the heatmaps `train` drew there), or
    inside the run's feature cache (`cache`, default the run's) or an images folder of the
    run or that cache (`run_images_folders`: `--plot-attention shapes/images` wrote a heatmap
    over the dataset image of its name; `train --run` is refused there for the same
    reason)."""
    own = "give the heatmaps a folder of their own, e.g. heatmaps"
    if is_inside(out_dir, run_dir):
        raise UserError(f"--plot-attention {out_dir}: inside the run folder {run_dir}, whose "
                        f"files and folders `train` and `evaluate` write (its own heatmaps in "
                        f"{RunFolder(run_dir).attention}); {own}")
    run = RunFolder(run_dir)
    if cache is None:
        try:
            cache = run.load_config().cache
        except UserError:
            return              # not a run: said when it is loaded
    if is_inside(out_dir, cache):
        raise UserError(f"--plot-attention {out_dir}: inside the feature cache {cache}, whose "
                        f"files `extract-features` writes; {own}")
    for folder, what in run_images_folders(run, cache):
        if is_inside(out_dir, folder):
            raise UserError(f"--plot-attention {out_dir}: inside {folder}, {what}: a heatmap "
                            f"would overwrite the dataset image of its name, and an "
                            f"extraction would take the heatmaps for images; {own}")


def _refuse_heatmaps_among_images(heatmaps: str, folder: str, what: str) -> None:
    raise UserError(f"--plot-attention {heatmaps} is {what}: the heatmaps would lie among "
                    f"the photos, where a heatmap can take a photo's name and other tools "
                    f"take them for photos; give them a folder of their own (a new one inside "
                    f"a captioned folder, such as {os.path.join(folder, 'heat')}, is left out "
                    f"when it is captioned)")


def display_names(paths: Sequence[str]) -> dict:
    """path -> the shortest trailing part of it that, as printed, tells it apart from the
    other paths: the file name, or as many parent folders with it as needed (a/cat.jpg,
    b/cat.jpg); printable (`images.printable_name`, `one_line`); in the order of `paths`
    (which `heatmap_files` numbers by). Told apart on the printed form: x<newline>y.png and
    a file named x\\ny.png both print as x\\ny.png (as do a Latin-1 caf<byte e9>.png and one
    named caf\\xe9.png), and were shown, and their heatmaps titled, alike. Two whole paths
    printed alike are told apart by their bytes in hex (`_by_bytes`)."""
    parts = {p: os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths}
    names, left, depth = {}, set(parts), 1
    while left:
        shown = {p: one_line(printable_name("/".join(parts[p][-depth:]))) for p in left}
        counts = collections.Counter(shown.values())
        alike = [p for p in left if counts[shown[p]] > 1 and depth >= len(parts[p])]
        names.update(_by_bytes({p: shown[p] for p in alike}, parts))
        for p in list(left):
            if counts[shown[p]] == 1 or p in names:
                names.setdefault(p, shown[p])
                left.discard(p)
        depth += 1
    return {p: names[p] for p in parts}


def _by_bytes(shown: dict, parts: dict) -> dict:
    """path -> its file name, printed, plus the bytes of that name in hex (x\\ny.png (bytes
    780a792e706e67)); where two of `shown` (path -> its whole path printed) have file names of
    the same bytes (folders printed alike), the whole path printed and its bytes in hex."""
    def hexed(p, whole):
        return os.fsencode("/".join(parts[p] if whole else parts[p][-1:])).hex()
    named = collections.Counter(hexed(p, False) for p in shown)
    return {p: f"{shown[p]} (bytes {hexed(p, True)})" if named[hexed(p, False)] > 1 else
            f"{one_line(printable_name(parts[p][-1]))} (bytes {hexed(p, False)})"
            for p in shown}


# The longest heatmap file name (bytes, without .png): 255 (NAME_MAX on common file systems)
# less what `fileio.temp_name` adds (a 7-digit pid), ".png" and room for a "-999" suffix.
HEATMAP_NAME_BYTES = 255 - longest_temp_name("") - len(".png-999")


def _fit_name(stem: str) -> str:
    """`stem` cut to HEATMAP_NAME_BYTES of UTF-8 (on a character boundary): the heatmap of an
    image with a legal 250-byte name (82 CJK characters) stopped `caption --plot-attention`
    with 'File name too long' (its temporary name is longer), exit 2 with the rest of the
    images not captioned."""
    data = stem.encode("utf-8", "surrogateescape")
    if len(data) <= HEATMAP_NAME_BYTES:
        return stem
    return data[:max(HEATMAP_NAME_BYTES, 1)].decode("utf-8", "ignore")


def heatmap_files(names: dict) -> dict:
    """path -> heatmap file name: the display name without its extension, "/" as "__", plus
    .png; where two of those would clash (a.jpg and a.png) the extension is kept (a.jpg.png);
    a name still taken (by the image a.jpg.png, or A.png on a case-insensitive disk) gets -2,
    -3, ... so no heatmap overwrites another. A name too long for the file system (with the
    temporary name it is written under, `fileio.temp_name`) is cut (`_fit_name`)."""
    stems = {p: os.path.splitext(n)[0].replace("/", "__") for p, n in names.items()}
    clash = collections.Counter(stems.values())
    wanted = {p: _fit_name(stems[p] if clash[stems[p]] == 1 else names[p].replace("/", "__"))
              + ".png" for p in names}
    unique = collections.Counter(f.lower() for f in wanted.values())
    files, used = {}, set()
    for p in names:
        name, n = wanted[p], 2
        while name.lower() in used or (name != wanted[p] and name.lower() in unique):
            name, n = f"{wanted[p][:-len('.png')]}-{n}.png", n + 1
        used.add(name.lower())
        files[p] = name
    return files


def check_heatmap_targets(out_dir: str, paths: Sequence[str],
                          images: Sequence[str] = ()) -> None:
    """UserError when `--plot-attention` OUT_DIR holds a file the heatmaps of `paths` (named
    by `heatmap_files`) would overwrite or remove, or any image, that is not a heatmap
    `caption` drew (`images.is_heatmap_file`): one of `paths` or `images` (the images' own
    folder: the heatmap of x.png is DIR/x.png), another file (`caption photos/cat.jpg
    --plot-attention photos` wrote over the photo photos/cat.png; the heatmap of an image
    failing now deleted a photo of its name), or any image under OUT_DIR (a heatmap folder
    inside a folder being captioned is left out of it, `expand_image_args`: photos kept
    there were skipped without a word)."""
    protected = {os.path.realpath(p): p for p in [*images, *paths]}
    for path, name in heatmap_files(display_names(list(paths))).items():
        target = os.path.join(out_dir, name)
        hit = protected.get(os.path.realpath(target))
        if hit is not None:
            raise UserError(f"--plot-attention {out_dir}: the heatmap of {path} would "
                            f"overwrite {hit}, an image being captioned; give the heatmaps a "
                            f"folder of their own")
        if os.path.lexists(target) and not is_heatmap_file(target):
            raise UserError(f"--plot-attention {out_dir}: the heatmap of {path} would "
                            f"overwrite {target}, which is not a heatmap caption-attn drew; "
                            f"give the heatmaps a folder of their own")
    if os.path.isdir(out_dir):
        others = list_images(out_dir, flag="--plot-attention")   # heatmaps left out
        if others:
            raise UserError(f"--plot-attention {out_dir}: holds {counted(len(others), 'image')}"
                            f" that caption-attn did not "
                            f"draw ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}"
                            f"); give the heatmaps a new or empty folder of their own")


# ----------------------------------------------------------------------------- output
def format_probability(p: float) -> str:
    return f"{p:.6f}" if p >= 1e-6 else f"{p:.2e}"


def format_captions(path: str, captions: list[Caption], name: Optional[str] = None) -> str:
    """im2txt's layout: `Captions for image NAME:` then ` 0) words . (p=...)` lines (NAME:
    `name`, e.g. a `display_names` entry where file names alone are ambiguous, else the file
    name of `path`).

    The final "." stands for the `<end>` token (punctuation is not in the vocabulary); a
    caption cut at the maximum length before `<end>` ends with "..." instead.
    """
    lines = [f"Captions for image {name or os.path.basename(path)}:"]
    for i, c in enumerate(captions):
        text = " ".join(c.words + (["."] if c.ended else ["..."]))
        lines.append(f" {i}) {text} (p={format_probability(c.probability)})")
    return "\n".join(lines)


def captions_json(results: dict, errors: dict, same: Optional[dict] = None) -> dict:
    """JSON-able form of `caption_images` output, with each word's 8x8 attention map; every
    string valid Unicode (image names as `images.json_name` gives them). `same` (see
    `expand_image_args`: another name a file was given under -> the name it was captioned
    under) adds an entry per other name, right after the first name's, the same captions or
    error, with `same_as`: the first name (so each name given has its entry)."""
    from caption_attn.images import json_name, printable_name

    side = GRID
    others = collections.defaultdict(list)   # the name captioned -> the other names
    for other, kept in (same or {}).items():
        others[kept].append(other)
    images = []
    for path, (_, captions) in results.items():
        images.append({**json_name(path), "captions": [{
            "caption": c.text, "words": c.words, "ended": c.ended, "log_prob": c.log_prob,
            "p": c.probability,
            # rounded in float64: float32 values rounded to 5 decimals printed as 7.0000001e-05
            "attention": [{"word": w, "map": np.round(c.attention[t].reshape(side, side)
                                                      .astype(np.float64), 5).tolist()}
                          for t, w in enumerate(c.steps)],
        } for c in captions]})
        images += [{**json_name(other), "same_as": json_name(path)["image"],
                    "captions": images[-1]["captions"]} for other in others[path]]
    errors_out = []
    for path, reason in errors.items():
        errors_out.append({**json_name(path), "error": printable_name(reason)})
        errors_out += [{**json_name(other), "same_as": json_name(path)["image"],
                        "error": printable_name(reason)} for other in others[path]]
    return {"images": images, "errors": errors_out}


def attention_plot(image: np.ndarray, caption: Caption, name: str = "",
                   max_words: Optional[int] = None):
    """Heatmap Figure of one caption: a panel per word (`<end>` for an empty caption), of
    its first `max_words` words only if given; the title then says the caption goes on. A
    caption cut at the maximum length ends its title with "...", as `format_captions`."""
    from caption_attn import plot

    words = caption.words or ["<end>"]
    p = format_probability(caption.probability)
    title = f"{name}: {caption.text}{'' if caption.ended else ' ...'} (p={p})"
    if max_words is not None and len(words) > max_words:
        words = words[:max_words]
        title = (f"{name}: {' '.join(words)} ... (the first {max_words} of "
                 f"{len(caption.words)} words; p={p} of all)")
    return plot.attention_figure(image, words, caption.attention[:len(words)], title=title)


def heatmap_writer(out_dir: str, paths: Sequence[str], images: Sequence[str] = (),
                   hold: Optional[contextlib.ExitStack] = None,
                   notes: Optional[list] = None) -> Callable[..., tuple[dict, dict]]:
    """A function saving the best caption's heatmap of each image of some `caption_images`
    (or `caption_batches`) results into OUT_DIR, and removing the file of each image of
    `failed` (only a heatmap that records it shows that very image, `images.heatmap_source`:
    H/cat.png of d2/cat.png went when d1/cat.png failed; an older heatmap, recording no image,
    is kept, and a line on it added to `notes` if given), returning (path -> file written,
    path -> why its heatmap could not be written or removed: the others go on, and the
    reason names the heatmap, not its temporary file);
    each of `paths` has a distinct file (`heatmap_files` of all of them, so batches written
    one by one get the names one call would give). UserError first, nothing written, if
    OUT_DIR holds a file a heatmap would overwrite, or any image, that is not a heatmap
    `caption` drew (`check_heatmap_targets`). `hold` (an ExitStack of the caller's) is
    given the `heatmap_lock` of OUT_DIR first: until it closes, no other caption draws
    there."""
    from caption_attn import plot

    if hold is not None:
        hold.enter_context(heatmap_lock(out_dir))
    check_heatmap_targets(out_dir, paths, images)
    names = display_names(list(paths))
    files = heatmap_files(names)

    def write(results: dict, failed: Iterable[str] = ()) -> tuple[dict, dict]:
        written, problems = {}, {}
        for path, (image, captions) in results.items():
            target = os.path.join(out_dir, files[path])
            try:
                plot.save_figure(attention_plot(image, captions[0], names[path]), target,
                                 os.path.realpath(path))
                written[path] = target
            except OSError as e:
                problems[path] = f"cannot write its heatmap {target} ({e.strerror or e})"
        # an image that failed now (unreadable, or no caption) loses the heatmap an earlier
        # run drew of it: left in OUT_DIR, it showed attention the model no longer gives
        # (only a heatmap: `check_heatmap_targets` refused a folder with anything else there),
        # and only one drawn of that very image: another image of its name keeps its heatmap
        for path in failed:
            target = os.path.join(out_dir, files.get(path, ""))
            if path not in files or not is_heatmap_file(target):
                continue
            source = heatmap_source(target)
            if source is None:
                if notes is not None:
                    notes.append(f"kept {one_line(printable_name(target))}: it may be the "
                                 f"heatmap of {one_line(printable_name(path))}, which failed, "
                                 f"but an older caption-attn drew it and it does not record "
                                 f"which image it shows; remove it if it is of that image")
            elif source == os.path.realpath(path):
                try:
                    os.remove(target)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    problems[path] = (f"cannot remove its heatmap {target}, drawn by an "
                                      f"earlier run ({e.strerror or e})")
        return written, problems
    return write


@contextlib.contextmanager
def heatmap_lock(out_dir: str):
    """Held while a caption draws heatmaps into OUT_DIR (made for it): an exclusive flock
    on OUT_DIR/.caption-attn.lock (hidden: the folder walks skip it). Two captions with one
    --plot-attention folder each removed and wrote the other's heatmaps, leaving a mix of
    both runs'."""
    with holding_lock(os.path.join(out_dir, ".caption-attn.lock"), lambda who: (
            f"--plot-attention {out_dir}: another `caption-attn caption`{who} is drawing "
            f"its heatmaps there now; the two would leave a mix of both runs' heatmaps: "
            f"wait for it to end, or give another --plot-attention folder"), make_folder=True):
        yield


def save_attention_plots(out_dir: str, results: dict, images: Sequence[str] = ()) -> dict:
    """`heatmap_writer` for the images of `results` at once: path -> file written; OSError
    (after the others are written) if a heatmap could not be."""
    with contextlib.ExitStack() as hold:   # nothing to draw: no folder made for the lock
        written, problems = heatmap_writer(out_dir, list(results), images,
                                           hold if results else None)(results)
    if problems:
        path, why = next(iter(problems.items()))
        raise OSError(f"{path}: {why}"
                      + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return written
