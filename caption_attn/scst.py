"""Self-critical sequence training (Rennie et al. 2017): after cross-entropy, sample captions
from the model, reward each by its CIDEr-D against the image's references (`cider.py`), and
push up the log-probability of samples that beat a baseline.

One self-critical step on a batch of N images (`SelfCritical`):
1. `sample`: K captions per image from the batched in-graph sampler of decode.py, the
   output dropout on (the policy being trained), and with the `greedy` baseline the greedy
   caption of each image, dropout off; no gradient flows through sampling. Sample k of an
   image draws its tokens from the random stream of (seed, id * K + k) (`decode.sample`)
   and its dropout mask at step t from the key (seed, t, that stream)
   (`ShowAttendTell.keyed_dropout_mask`), whatever its row, batch or replica;
2. `score`: rewards with the train split's CIDEr-D (vectorised numpy, through
   `tf.numpy_function`), the baseline, and the advantage of every sample (`advantages`);
3. `loss`: the samples are teacher-forced through the same recurrence as cross-entropy (its
   hand-written backward pass included): loss = -sum_t advantage * log p(w_t | w_<t, image)
   over every sampled token up to and including `<end>`, summed here and divided by the
   global count of real tokens by the caller. The output dropout of every sampled token is
   the mask the sampler drew it with, drawn again from its key (seed, t, stream), not stored:
   log p is the sampler's (up to float rounding), and the gradient is that of the policy
   that drew the samples, as when back-propagating through the sampling pass itself
   (self-critical.pytorch). The recurrence has no dropout, so its hidden states are the
   sampler's too; the masks enter after it, ahead of the output layer.
The reward includes `<end>` in its n-grams (see cider.py); the doubly stochastic attention
regulariser is not applied in these epochs (the objective is the reward alone).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple, Optional

import numpy as np
import tensorflow as tf

from caption_attn import decode
from caption_attn.captioner import BANNED, masked_step
from caption_attn.cider import CiderD, DocumentFrequency
from caption_attn.errors import UserError
from caption_attn.fileio import read_json, write_json_atomic
from caption_attn.vocab import PAD, START


def train_document_frequency(path: str, references: dict, vocab_size: int,
                             save: bool, log=lambda line: None) -> DocumentFrequency:
    """The train split's CIDEr-D document frequencies: read from `path` (a run keeps them in
    its folder as JSON) when they were counted on exactly `references` {train image id: [id
    lists]}, else counted from them and, with `save`, written there.

    The file records a digest of the references it was counted on: a resume whose train
    images gained or lost features (or a file copied from another run with the same
    vocabulary size) kept the old counts, an idf over other images. A file written before
    the digest was recorded is kept if it counted as many images. A file that cannot be read
    (damaged, another version) is counted again, with a note to `log`: it is a cache, and
    its error came after an epoch's steps, which were lost with no checkpoint. So is one
    that cannot be written (a full disk, a quota: the file is ~65 MB at COCO's size): kept
    in memory, with a note (the epoch's checkpoint, written next, says what a full disk
    stops)."""
    digest = references_digest(references)
    if os.path.exists(path):
        try:
            stored = read_json(path)
            df = DocumentFrequency.from_json(stored, source=path)
        except UserError as e:
            log(f"note: {e}; counting the document frequencies again")
            return _count_document_frequency(path, references, vocab_size, save, digest, log)
        recorded = stored.get("references_sha256")
        if df.vocab_size == vocab_size and (
                recorded == digest if recorded is not None
                else df.num_images == len(references)):
            return df
    return _count_document_frequency(path, references, vocab_size, save, digest, log)


def _count_document_frequency(path: str, references: dict, vocab_size: int, save: bool,
                              digest: str, log) -> DocumentFrequency:
    df = DocumentFrequency.build(references, vocab_size)
    if save:
        try:
            write_json_atomic(path, {**df.to_json(), "references_sha256": digest})
        except OSError as e:
            log(f"note: cannot write {path} ({e.strerror or e}): the document frequencies "
                f"are kept in memory, and counted again by the next train of this run")
    return df


def recorded_digest(path: str):
    """The digest of the references `path` (a cider_df.json) records it was counted on; None
    when there is no such file, it cannot be read, or it records none (an older run's)."""
    try:
        digest = read_json(path).get("references_sha256") if os.path.exists(path) else None
    except (UserError, OSError, AttributeError):
        return None
    return digest if isinstance(digest, str) else None


def references_digest(references: dict) -> str:
    """sha256 of {image id: [id lists]} in image id order."""
    payload = json.dumps([[int(k), [[int(i) for i in ids] for ids in references[k]]]
                          for k in sorted(references)], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


class Scored(NamedTuple):
    """Samples of one batch and what the reward made of them (N images, K samples, T steps).

    `streams` and `seed` key each sample's dropout masks (`SelfCritical.sample`); a model
    with dropout needs them for the loss pass."""
    tokens: tf.Tensor       # (N, K, T) int32 sampled ids, `<end>` then PAD
    rewards: tf.Tensor      # (N, K) float32 CIDEr-D of each sample
    baseline: tf.Tensor     # (N, K) float32 what each sample's reward is compared with
    advantage: tf.Tensor    # (N, K) float32 rewards - baseline
    streams: Optional[tf.Tensor] = None   # (N, K) int64 random stream of each sample
    seed: Optional[tf.Tensor] = None      # () int64 the step's sampling seed


class SelfCritical:
    """The self-critical objective of `model` with `reward` over the train images.

    `image_ids` given to `score` are the integer keys of `reward`'s references (the index of
    each train image); `samples` K per image; `baseline` "mean" or "greedy"; `max_length`
    caps the sampled captions (the run's --max-length + 1, `<end>` included).
    """

    def __init__(self, model, reward: CiderD, samples: int, baseline: str, max_length: int):
        if baseline not in BASELINES:
            raise ValueError(f"`baseline` must be one of {BASELINES}, got {baseline!r}")
        self.model, self.reward = model, reward
        self.samples, self.baseline, self.max_length = samples, baseline, max_length
        self._greedy_step = masked_step(model.decode_step)

    def sample(self, features, seed, ids):
        """features (N, P, F), their train-image ids (N,) -> (sampled tokens (N, K, T) in
        stream order, greedy tokens (N, 1, T') or a (N, 1, 1) PAD placeholder when the baseline is "mean").

        Each image draws from the random streams of (seed, its id), not of its row: under a
        mirrored strategy every replica's row i drew the same numbers as the others' row i."""
        state, context = self.model.init_decoder(features)
        sampled = self._policy_samples(state, context, seed, ids)
        if self.baseline == "greedy":
            greedy = decode.greedy(self._greedy_step, state, context, self.max_length).tokens
        else:
            greedy = tf.fill([tf.shape(features)[0], 1, 1], PAD)
        return tf.stop_gradient(sampled.tokens), tf.stop_gradient(greedy)

    def policy_samples(self, features, seed, ids) -> decode.DecodeResult:
        """The K samples of each image (N, K, ...) with their log-probabilities under the
        masks they were drawn with, in stream order (sample k drew from stream id * K + k)."""
        return self._policy_samples(*self.model.init_decoder(features), seed, ids)

    def _policy_samples(self, state, context, seed, ids):
        seed = tf.cast(seed, tf.int64)
        streams = decode.sample_streams(ids, self.samples)           # (N*K,)
        model = self.model

        # the K samples of an image share its context, untiled (`decode_step_per_image`);
        # the state carries the step t (N*K,) that keys the dropout masks with the stream
        @decode.per_image_context
        def step(tokens, state, context):
            model_state, t = state
            mask = model.keyed_dropout_mask(seed, t, streams)         # (N*K, E) or None
            logits, model_state, alpha = model.decode_step_per_image(
                tokens, model_state, context, output_mask=mask)
            return logits, (model_state, t + 1), alpha

        steps = tf.zeros([tf.shape(ids)[0]], tf.int32)                # (N,), tiled to N*K
        return decode.sample(masked_step(step), (state, steps), context, self.max_length,
                             num_samples=self.samples, seed=seed, ids=ids, sort=False)

    def score(self, features, image_ids, seed) -> Scored:
        """Sample, then reward, baseline and advantage of every sample (no gradient)."""
        tokens, greedy = self.sample(features, seed, image_ids)
        rewards, baseline = tf.numpy_function(
            self._rewards, [image_ids, tokens, greedy], [tf.float32, tf.float32],
            stateful=False)
        shape = tf.shape(tokens)[:2]
        rewards, baseline = tf.reshape(rewards, shape), tf.reshape(baseline, shape)
        streams = tf.reshape(decode.sample_streams(image_ids, self.samples), shape)  # (N, K)
        return Scored(tokens, rewards, baseline, rewards - baseline, streams,
                      tf.cast(seed, tf.int64))

    def _rewards(self, image_ids, tokens, greedy):
        """numpy: image_ids (N,), tokens (N, K, T), greedy (N, 1, T') -> rewards, baseline
        (N, K) float32."""
        n, k, t = tokens.shape
        rewards = self.reward(np.repeat(image_ids, k), tokens.reshape(n * k, t))  # (N*K,)
        rewards = rewards.reshape(n, k)                                          # (N, K)
        greedy_rewards = self.reward(image_ids, greedy[:, 0]) \
            if self.baseline == "greedy" else None                              # (N,)
        advantage = advantages(rewards, self.baseline, greedy_rewards)          # (N, K)
        return rewards.astype(np.float32), (rewards - advantage).astype(np.float32)

    def loss(self, features, scored: Scored, training: bool = True):
        """Summed policy-gradient loss, the number of real sampled tokens and the summed
        entropy of the policy at those tokens (for the TensorBoard curve), <pad> and <start>
        banned from the policy as in sampling (`ShowAttendTell.self_critical_loss`, the
        cross-entropy step's path: at E 256, U 512, V 5001 `bench_train.py` trained about
        1.2x the sampled captions per second it did through `call`'s logits of every row).

        features (N, P, F) with each image once; scored.tokens (N, K, T). With `training`,
        each token's output dropout is the sampler's mask of it (keyed by `scored.streams`
        and `scored.seed`, which a model with dropout needs).
        """
        dropout_key = None
        if training and self.model.out_dropout.rate > 0:
            if scored.streams is None or scored.seed is None:
                raise ValueError("`scored` must carry the samples' `streams` and `seed` (as "
                                 "`score` returns it): the loss pass draws the sampler's "
                                 "dropout masks again from them; got None")
            dropout_key = (scored.seed, tf.reshape(scored.streams, [-1]))  # (), (N*K,)
        n, k = tf.shape(scored.tokens)[0], tf.shape(scored.tokens)[1]
        targets = tf.reshape(scored.tokens, [n * k, -1])                 # (N*K, T)
        inputs = tf.concat([tf.fill([n * k, 1], START), targets[:, :-1]], axis=1)  # (N*K, T)
        image_index = tf.repeat(tf.range(n), k)                          # (N*K,)
        return self.model.self_critical_loss(
            features, image_index, inputs, targets, tf.reshape(scored.advantage, [n * k]),
            banned=BANNED, training=training, dropout_key=dropout_key)


# --------------------------------------------------------------------------- baselines
BASELINES = ("mean", "greedy")


def advantages(rewards, baseline: str = "mean", greedy_rewards=None) -> np.ndarray:
    """Reward minus baseline for K sampled captions of each of B images.

    rewards:        (B, K) reward of each sample
    baseline:       "mean": the mean reward of the image's OTHER K-1 samples (the "new
                    self-critical" baseline of self-critical.pytorch: no greedy decode, and
                    a sample never lowers its own baseline; needs K >= 2);
                    "greedy": the reward of the image's greedy caption (Rennie et al. 2017)
    greedy_rewards: (B,) reward of each image's greedy caption, for "greedy" only
    -> (B, K) float64 advantages
    """
    if baseline not in BASELINES:
        raise ValueError(f"`baseline` must be one of {BASELINES}, got {baseline!r}")
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"`rewards` must have shape (B, K), got {rewards.shape}")
    b, k = rewards.shape
    if baseline == "mean":
        if k < 2:
            raise ValueError(f"`baseline` \"mean\" needs K >= 2 samples per image (the mean "
                             f"of the other K-1), got `rewards` with K={k}")
        if greedy_rewards is not None:
            raise ValueError("`greedy_rewards` is for `baseline` \"greedy\"; got it with "
                             "\"mean\"")
        others = (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)   # (B, K)
        return rewards - others                                             # (B, K)
    if greedy_rewards is None:
        raise ValueError("`baseline` \"greedy\" needs `greedy_rewards` of shape (B,)")
    greedy = np.asarray(greedy_rewards, np.float64)
    if greedy.shape != (b,):
        raise ValueError(f"`greedy_rewards` must have shape (B,) = ({b},), got {greedy.shape}")
    return rewards - greedy[:, None]                                        # (B, K)
