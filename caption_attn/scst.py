"""Self-critical sequence training (Rennie et al. 2017): after cross-entropy, sample captions
from the model, reward each by its CIDEr-D against the image's references (`cider.py`), and
push up the log-probability of samples that beat a baseline.

One self-critical step on a batch of N images (`SelfCritical`):
1. `sample`: K captions per image from the batched in-graph sampler of decode.py, dropout
   on (the policy being trained), and with the `greedy` baseline the greedy caption of each
   image, dropout off; no gradient flows through sampling;
2. `score`: rewards with the train split's CIDEr-D (vectorised numpy, through
   `tf.numpy_function`), the baseline, and the advantage of every sample (`advantages`);
3. `loss`: the samples are teacher-forced through the same recurrence as cross-entropy (its
   hand-written backward pass included): loss = -sum_t advantage * log p(w_t | w_<t, image)
   over every sampled token up to and including `<end>`, summed here and divided by the
   global count of real tokens by the caller. The output dropout is on in this pass too, with
   a fresh mask: the sampled tokens come from one draw of the dropout policy and the
   gradient is that of another, the usual approximation (the recurrence itself has no
   dropout, so the hidden states are the sampler's).
The reward includes `<end>` in its n-grams (see cider.py); the doubly stochastic attention
regulariser is not applied in these epochs (the objective is the reward alone).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple

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
    its error came after an epoch's steps, which were lost with no checkpoint."""
    digest = references_digest(references)
    if os.path.exists(path):
        try:
            stored = read_json(path)
            df = DocumentFrequency.from_json(stored, source=path)
        except UserError as e:
            log(f"note: {e}; counting the document frequencies again")
            return _count_document_frequency(path, references, vocab_size, save, digest)
        recorded = stored.get("references_sha256")
        if df.vocab_size == vocab_size and (
                recorded == digest if recorded is not None
                else df.num_images == len(references)):
            return df
    return _count_document_frequency(path, references, vocab_size, save, digest)


def _count_document_frequency(path: str, references: dict, vocab_size: int, save: bool,
                              digest: str) -> DocumentFrequency:
    df = DocumentFrequency.build(references, vocab_size)
    if save:
        write_json_atomic(path, {**df.to_json(), "references_sha256": digest})
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
    """Samples of one batch and what the reward made of them (N images, K samples, T steps)."""
    tokens: tf.Tensor       # (N, K, T) int32 sampled ids, `<end>` then PAD
    rewards: tf.Tensor      # (N, K) float32 CIDEr-D of each sample
    baseline: tf.Tensor     # (N, K) float32 what each sample's reward is compared with
    advantage: tf.Tensor    # (N, K) float32 rewards - baseline


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
        # the K samples of an image share its context, untiled (`decode_step_per_image`)
        self._sampling_step = masked_step(decode.per_image_context(
            lambda t, s, c: model.decode_step_per_image(t, s, c, True)))
        self._greedy_step = masked_step(model.decode_step)

    def sample(self, features, seed, ids):
        """features (N, P, F), their train-image ids (N,) -> (sampled tokens (N, K, T),
        greedy tokens (N, 1, T') or a (N, 1, 1) PAD placeholder when the baseline is "mean").

        Each image draws from the random stream of (seed, its id), not of its row: under a
        mirrored strategy every replica's row i drew the same numbers as the others' row i."""
        state, context = self.model.init_decoder(features)
        sampled = decode.sample(self._sampling_step, state, context, self.max_length,
                                num_samples=self.samples, seed=seed, ids=ids)
        if self.baseline == "greedy":
            greedy = decode.greedy(self._greedy_step, state, context, self.max_length).tokens
        else:
            greedy = tf.fill([tf.shape(features)[0], 1, 1], PAD)
        return tf.stop_gradient(sampled.tokens), tf.stop_gradient(greedy)

    def score(self, features, image_ids, seed) -> Scored:
        """Sample, then reward, baseline and advantage of every sample (no gradient)."""
        tokens, greedy = self.sample(features, seed, image_ids)
        rewards, baseline = tf.numpy_function(
            self._rewards, [image_ids, tokens, greedy], [tf.float32, tf.float32],
            stateful=False)
        shape = tf.shape(tokens)[:2]
        rewards, baseline = tf.reshape(rewards, shape), tf.reshape(baseline, shape)
        return Scored(tokens, rewards, baseline, rewards - baseline)

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

        features (N, P, F) with each image once; scored.tokens (N, K, T).
        """
        n, k = tf.shape(scored.tokens)[0], tf.shape(scored.tokens)[1]
        targets = tf.reshape(scored.tokens, [n * k, -1])                 # (N*K, T)
        inputs = tf.concat([tf.fill([n * k, 1], START), targets[:, :-1]], axis=1)  # (N*K, T)
        image_index = tf.repeat(tf.range(n), k)                          # (N*K,)
        return self.model.self_critical_loss(
            features, image_index, inputs, targets, tf.reshape(scored.advantage, [n * k]),
            banned=BANNED, training=training)


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
