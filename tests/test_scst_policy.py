"""Self-critical training's policy is the model with its output dropout on: the loss pass
must score each sampled caption under the dropout masks the sampler drew it with (keyed by
seed, step and the sample's random stream), not under a fresh mask."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_attn import decode
from caption_attn.captioner import masked_step
from caption_attn.model import DROPOUT_SALT, ShowAttendTell
from caption_attn.scst import Scored, SelfCritical
from caption_attn.vocab import PAD, START

V, E, U, F = 12, 8, 16, 32


def _lengths_reward(ids, tokens):
    """A stand-in for CIDEr-D: (N*K,) rewards from the tokens alone."""
    return np.sum(tokens != PAD, axis=1).astype(np.float64)


def _setup(dropout, samples=4, images=3, seed=3):
    keras.utils.set_random_seed(seed)
    model = ShowAttendTell(V, E, U, dropout=dropout, feature_dim=F)
    # logits of a larger scale, so that dropping units moves log p by more than rounding
    model.logits.kernel.assign(model.logits.kernel * 4.0)
    scst = SelfCritical(model, reward=_lengths_reward, samples=samples, baseline="mean",
                        max_length=6)
    features = tf.constant(np.random.default_rng(0).normal(size=(images, 64, F)), tf.float32)
    return model, scst, features


def _loss_pass_log_p(scst, features, scored, training=True):
    """Each sample's log p in the loss pass: d loss / d advantage = -sum_t log p(w_t)."""
    adv = tf.ones(tf.shape(scored.advantage))
    with tf.GradientTape() as tape:
        tape.watch(adv)
        loss_sum = scst.loss(features, scored._replace(advantage=adv), training)[0]
    return -tape.gradient(loss_sum, adv).numpy()                     # (N, K)


def test_the_loss_pass_scores_each_sample_under_the_masks_it_was_drawn_with():
    """The samples came from p(. | mask 1) and the loss took log p(w | mask 2) of a fresh
    mask: a policy gradient of another policy than the one that drew them (an auditor
    measured -3.96 vs -6.16 nats per caption at dropout 0.2). The loss pass now draws the
    sampler's masks again, so its log p of every sample is the sampler's."""
    model, scst, features = _setup(dropout=0.5)
    ids, seed = tf.constant([10, 11, 12]), tf.constant(7, tf.int64)
    drawn = scst.policy_samples(features, seed, ids)                   # (N, K, ...)
    scored = scst.score(features, ids, seed)
    np.testing.assert_array_equal(scored.tokens.numpy(), drawn.tokens.numpy())
    sampler = drawn.log_probs.numpy()                                  # (N, K)
    got = _loss_pass_log_p(scst, features, scored)
    np.testing.assert_allclose(got, sampler, rtol=1e-4, atol=1e-4)
    # and dropout matters here: without it the same tokens score otherwise
    no_dropout = _loss_pass_log_p(scst, features, scored, training=False)
    assert np.abs(no_dropout - sampler).max() > 0.1


def test_the_loss_pass_needs_the_samples_keys_when_the_model_has_dropout():
    model, scst, features = _setup(dropout=0.5, images=1, samples=2)
    tokens = tf.constant([[[5, 2, PAD], [6, 6, 2]]], tf.int32)
    adv = tf.constant([[1.0, -1.0]])
    with pytest.raises(ValueError, match="`scored` must carry the samples' `streams`"):
        scst.loss(features, Scored(tokens, adv, adv, adv))


def test_keyed_dropout_masks_depend_on_their_key_alone():
    model = ShowAttendTell(V, 64, U, dropout=0.5, feature_dim=F)
    steps = tf.constant(np.repeat(np.arange(40), 50), tf.int32)          # (2000,)
    streams = tf.constant(np.tile(np.arange(50) + 1000, 40), tf.int64)   # (2000,)
    masks = model.keyed_dropout_mask(tf.constant(9, tf.int64), steps, streams).numpy()
    assert set(np.unique(masks)) == {0.0, 2.0}                       # dropped, or 1 / (1 - rate)
    assert abs(np.mean(masks == 0) - 0.5) < 0.02
    assert len({row.tobytes() for row in masks}) == 2000             # every key its own mask
    # the same keys in another order and batch: the same rows
    again = model.keyed_dropout_mask(tf.constant(9, tf.int64), steps[::-7], streams[::-7])
    np.testing.assert_array_equal(again.numpy(), masks[::-7])
    # not the uniforms that chose the tokens (the sampler's Gumbel noise, unsalted)
    salted = decode.keyed_uniform(9, steps[:50], streams[:50], 64, DROPOUT_SALT)
    unsalted = decode._hashed_uniform(9, steps[:50, None], streams[:50], 64)
    assert np.mean(salted.numpy() == unsalted.numpy()) < 0.01
    assert model.keyed_dropout_mask(9, steps, streams) is not None
    assert ShowAttendTell(V, E, U, dropout=0.0, feature_dim=F).keyed_dropout_mask(
        9, steps, streams) is None


def test_the_greedy_baseline_decodes_with_dropout_off():
    model, _, features = _setup(dropout=0.5)
    scst = SelfCritical(model, reward=None, samples=2, baseline="greedy", max_length=6)
    ids = tf.constant([10, 11, 12])
    _, greedy_a = scst.sample(features, 1, ids)
    _, greedy_b = scst.sample(features, 2, ids)
    state, context = model.init_decoder(features)
    plain = decode.greedy(masked_step(model.decode_step), state, context, 6)
    np.testing.assert_array_equal(greedy_a.numpy(), greedy_b.numpy())
    np.testing.assert_array_equal(greedy_a.numpy(), plain.tokens.numpy())


@pytest.mark.parametrize("baseline_advantage", [[2.0, -1.0, 0.5], [-0.5, 1.5, 1.0]])
def test_the_loss_gradient_under_the_sampled_masks_equals_autodiff(baseline_advantage):
    """The loss pass (the recurrence's hand-written backward pass, the output layer's
    written-out gradient, the keyed masks between them) against autodiff of the step-by-step
    decoder under the same masks."""
    model, scst, features = _setup(dropout=0.5, samples=3, images=2)
    ids, seed = tf.constant([4, 9]), tf.constant(11, tf.int64)
    scored = scst.score(features, ids, seed)
    adv = tf.constant([baseline_advantage, baseline_advantage[::-1]], tf.float32)  # (N, K)
    scored = scored._replace(advantage=adv)
    n, k = 2, 3
    targets = tf.reshape(scored.tokens, [n * k, -1])                   # (B, T)
    inputs = tf.concat([tf.fill([n * k, 1], START), targets[:, :-1]], axis=1)
    streams = tf.reshape(scored.streams, [-1])                         # (B,)

    def stepwise():
        state, context = model.init_decoder(features, tf.repeat(tf.range(n), k))
        total = 0.0
        for t in range(targets.shape[1]):
            mask = model.keyed_dropout_mask(seed, tf.fill([n * k], t), streams)
            logits, state, _ = model.decode_step(inputs[:, t], state, context,
                                                 output_mask=mask)    # (B, V)
            logits = tf.where(tf.reduce_any(tf.one_hot([PAD, START], V) > 0, 0), -np.inf,
                              logits)
            log_p = tf.gather(tf.nn.log_softmax(logits), targets[:, t], batch_dims=1)
            log_p = tf.where(targets[:, t] != PAD, log_p, 0.0)         # (B,)
            total -= tf.reduce_sum(tf.reshape(adv, [-1]) * log_p)
        return total

    with tf.GradientTape() as tape:
        got = scst.loss(features, scored)[0]
    grads = tape.gradient(got, model.trainable_variables)
    with tf.GradientTape() as tape:
        expected = stepwise()
    expected_grads = tape.gradient(expected, model.trainable_variables)
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-5)
    reached = 0
    for var, g, e in zip(model.trainable_variables, grads, expected_grads):
        if e is None:                                   # not in the policy: no gradient
            assert g is None or not np.any(tf.convert_to_tensor(g).numpy()), var.path
            continue
        e = tf.convert_to_tensor(e).numpy()
        reached += np.abs(e).max() > 1e-6
        np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(), e, rtol=1e-4,
                                   atol=1e-6 + 1e-5 * np.abs(e).max(), err_msg=var.path)
    assert reached >= 10
