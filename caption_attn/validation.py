"""What `train` measures on the validation images after every epoch besides the loss:
greedy captions, their BLEU-4 (`val_bleu4`) and CIDEr-D (`val_cider`), and the sample
captions with attention that TensorBoard and `attention/` show.

Decoding is the captioner's (`captioner.make_decoder` / `to_captions`): one greedy decoder
traced once, over (up to) `--bleu-images` validation images in batches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from caption_attn import captioner, pipeline
from caption_attn.backbone import IMAGE_SIZE
from caption_attn.cider import CiderD, DocumentFrequency
from caption_attn.coco_metrics import corpus_bleu4
from caption_attn.config import DecodeConfig
from caption_attn.vocab import tokenize_all

DECODE_BATCH = 128   # images per greedy decoding call
SAMPLE_WORDS = 15    # word panels per epoch heatmap (3 x 5 grid): ~5 ms of drawing each; an
#                      untrained model's 39-word captions took 0.75 s per heatmap (issue #11)


@dataclasses.dataclass
class Sample:
    """One validation image's greedy caption after an epoch."""
    image: str                    # image key
    caption: captioner.Caption


class Validator:
    """Greedy decoding of fixed validation images and the metrics computed from it.

    features(keys) -> iterable of (B, P, F) batches in key order (the trainer's in-memory
    table or the feature files); references {key: [raw captions]}, which CIDEr-D takes
    whole (`evaluate`'s references are not cut at --max-length either), words out of the
    vocabulary as `<unk>`; `df` the train split's document frequencies (built on first use
    by `df_factory` when CIDEr-D is needed).
    """

    def __init__(self, model, vocab, max_length: int,
                 features: Callable[[Sequence[str]], object], references: dict,
                 bleu_images: int, sample_images: int,
                 df_factory: Callable[[], DocumentFrequency]):
        self.vocab, self._features = vocab, features
        self.references = references
        self.metric_keys = sorted(references)[:bleu_images]
        self.sample_keys = sorted(references)[:sample_images]
        self._decoder = captioner.make_decoder(model, DecodeConfig(beam=1, xla_min_images=0),
                                               max_length)
        self._df_factory = df_factory
        self._cider: Optional[CiderD] = None
        self._metric_index = {k: i for i, k in enumerate(self.metric_keys)}

    def greedy(self, keys: Sequence[str]) -> dict:
        """key -> its greedy `Caption`."""
        out = {}
        if not keys:
            return out
        # a damaged or unreadable feature file: `pipeline.DamagedFeatures`, as in training
        batches = pipeline.checked(self._features(list(keys)))
        for start, feats in zip(range(0, len(keys), DECODE_BATCH), batches):
            result = self._decoder(tf.cast(feats, tf.float32))
            for key, captions in zip(keys[start:start + DECODE_BATCH],
                                     captioner.to_captions(result, self.vocab)):
                out[key] = captions[0]
        return out

    def metrics(self, names: Sequence[str]) -> dict:
        """`val_bleu4` and/or `val_cider` of the greedy captions of the metric images."""
        if not names or not self.metric_keys:
            return {}
        captions = self.greedy(self.metric_keys)
        out = {}
        if "val_bleu4" in names:
            out["val_bleu4"] = corpus_bleu4({k: self.references[k] for k in captions},
                                            {k: c.text for k, c in captions.items()})
        if "val_cider" in names:
            out["val_cider"] = self.cider(captions)
        return out

    def cider(self, captions: dict) -> float:
        """Mean CIDEr-D (words only, no `<end>`: the evaluation metric's form) of `captions`
        against their references' ids, with the train split's document frequencies."""
        index = self._metric_index
        if self._cider is None:
            self._cider = CiderD({index[k]: [self.vocab.encode_words(w) for w in
                                             tokenize_all(self.references[k])]
                                  for k in self.metric_keys}, self._df_factory(),
                                 with_end=False)
        keys = list(captions)
        ids = [[self.vocab.id(w) for w in captions[k].words] for k in keys]
        width = max(1, max(len(i) for i in ids))
        tokens = np.zeros((len(keys), width), np.int64)                 # (N, T), PAD after
        for row, i in enumerate(ids):
            tokens[row, :len(i)] = i
        image_index = np.array([index[k] for k in keys])                # (N,)
        return float(np.mean(self._cider(image_index, tokens)))

    def samples(self) -> list[Sample]:
        """The sample images' greedy captions (for TensorBoard and the heatmap files)."""
        return [Sample(k, c) for k, c in self.greedy(self.sample_keys).items()]


class SampleFigures:
    """Callable epoch -> [{image, caption, png}]: the sample images' greedy captions drawn as
    attention heatmaps, once per epoch and shared by the TensorBoard and heatmap callbacks.
    Images come from `images_dir` (a gray square when it is unknown or an image is gone:
    `log` gets a note the first time an image cannot be read, naming it and why).

    With `background`, the captions are decoded when called (the epoch's weights) and the
    drawing (~0.08 s of CPU per heatmap) goes to one background thread while the next epoch
    trains: the call returns a Future of the list, which the callbacks accept."""

    def __init__(self, validator: Validator, images_dir: Optional[str],
                 background: bool = False, log: Callable[[str], None] = print):
        self.validator, self.images_dir, self.log = validator, images_dir, log
        self._unreadable: dict = {}   # image key -> the reason last noted
        self._epoch, self._figures = None, []
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="heatmaps") if background else None

    def __call__(self, epoch: int):
        if epoch != self._epoch:
            decoded = [(s, self._image(s.image)) for s in self.validator.samples()]
            self._figures = self._pool.submit(_draw, decoded) if self._pool else _draw(decoded)
            self._epoch = epoch
        return self._figures

    def _image(self, key: str) -> np.ndarray:
        from caption_attn import images

        if self.images_dir:
            path = os.path.join(self.images_dir, key)
            try:
                image = images.heatmap_view(images.decode_image(
                    images.read_image_file(path)[0]))
                self._unreadable.pop(key, None)
                return image
            except images.ImageError as e:
                if self._unreadable.get(key) != str(e):
                    self._unreadable[key] = str(e)
                    self.log(f"note: sample image {images.printable_name(path)!r}: {e}; its "
                             f"attention heatmaps are drawn on a gray square until it can be "
                             f"read")
        return np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 128, np.uint8)


def _draw(decoded: list) -> list[dict]:
    from caption_attn import plot

    return [{"image": s.image, "caption": s.caption.text,
             "png": plot.figure_to_png(captioner.attention_plot(
                 image, s.caption, s.image, max_words=SAMPLE_WORDS))}
            for s, image in decoded]


def table_or_files(reader: pipeline.NpyReader, paths: dict,
                   table: Optional[pipeline.FeatureTable]):
    """features(keys) for `Validator`: gathered from the in-memory table when it holds the
    images, else read from their files."""
    def features(keys):
        if table is not None and all(paths[k] in table.index for k in keys):
            rows = [table.index[paths[k]] for k in keys]
            return (table.batch(rows[i:i + DECODE_BATCH])
                    for i in range(0, len(rows), DECODE_BATCH))
        return pipeline.image_dataset([paths[k] for k in keys], DECODE_BATCH, reader)
    return features
