"""The training path (`ShowAttendTell.teacher_forced_loss`) against `masked_loss` of `call`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_attn.model import ShowAttendTell, masked_loss, output_cross_entropy

V, P = 30, 64


def _batch(feature_dim, seed=5):
    rng = np.random.default_rng(seed)
    features = tf.constant(rng.normal(size=(3, P, feature_dim)), tf.float32)  # 3 images
    image_index = tf.constant([0, 2, 2, 1])                           # 4 captions
    tokens = tf.constant(rng.integers(1, V, (4, 7)), tf.int32)
    targets = tf.concat([tokens[:, 1:], tf.constant([[2], [0], [3], [0]])], axis=1)
    targets = targets * tf.constant([[1] * 7, [1] * 4 + [0] * 3, [1] * 7, [1] * 2 + [0] * 5])
    return features, image_index, tokens, targets


def test_output_cross_entropy_equals_tensorflows():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(5, 8)), tf.float32)
    kernel = tf.constant(rng.normal(size=(8, V)) * 10, tf.float32)   # far-apart logits
    bias = tf.constant(rng.normal(size=(V,)), tf.float32)
    targets = tf.constant([0, 3, 29, 3, 7])
    d_ce = tf.constant([1.0, 0.5, 2.0, 0.0, -1.0])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, kernel, bias])
        ce = output_cross_entropy(x, kernel, bias, targets)
        expected = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=targets, logits=tf.matmul(x, kernel) + bias)
        loss, expected_loss = tf.reduce_sum(ce * d_ce), tf.reduce_sum(expected * d_ce)
    np.testing.assert_allclose(ce.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    for g, e in zip(tape.gradient(loss, [x, kernel, bias]),
                    tape.gradient(expected_loss, [x, kernel, bias])):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention_reg, real_tokens_only", [(0.0, True), (2.0, True),
                                                              (2.0, False)])
def test_training_loss_and_gradients_equal_masked_loss_of_call(attention_reg,
                                                                real_tokens_only):
    keras.utils.set_random_seed(4)
    m = ShowAttendTell(V, 6, 10, dropout=0.0, feature_dim=32)
    features, image_index, tokens, targets = _batch(32)
    with tf.GradientTape() as tape:
        logits, alphas = m((features, image_index, tokens))
        expected = masked_loss(logits, targets, alphas, attention_reg)
        expected_loss = expected[0] + expected[2]
    expected_grads = tape.gradient(expected_loss, m.trainable_variables)
    with tf.GradientTape() as tape:
        got = m.teacher_forced_loss(features, image_index, tokens, targets, False,
                                    attention_reg, real_tokens_only)
        loss = got[0] + got[2]
    grads = tape.gradient(loss, m.trainable_variables)
    np.testing.assert_allclose([float(x) for x in got], [float(x) for x in expected],
                               rtol=1e-5)
    for var, g, e in zip(m.trainable_variables, grads, expected_grads):
        g, e = tf.convert_to_tensor(g).numpy(), tf.convert_to_tensor(e).numpy()
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-5 * np.abs(e).max(),
                                   err_msg=var.path)


@pytest.mark.precision("bfloat16")
def test_training_loss_under_tf_function_and_bfloat16():
    features, image_index, tokens, targets = _batch(32, seed=6)
    results = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.utils.set_random_seed(6)
        m = ShowAttendTell(V, 8, 16, dropout=0.0, feature_dim=32,
                           dtype=keras.DTypePolicy(policy))

        @tf.function
        def step(features, image_index, tokens, targets):
            with tf.GradientTape() as tape:
                ce, n, reg = m.teacher_forced_loss(features, image_index, tokens, targets)
                loss = ce / n + reg
            grads = tape.gradient(loss, m.trainable_variables)
            return loss, [tf.convert_to_tensor(g) for g in grads]
        loss, grads = step(features, image_index, tokens, targets)
        results[policy] = float(loss), [g.numpy() for g in grads]
        assert all(g.dtype == np.float32 and np.isfinite(g).all() for g in results[policy][1])
    assert results["mixed_bfloat16"][0] == pytest.approx(results["float32"][0], rel=0.02)
    for g32, g16 in zip(results["float32"][1], results["mixed_bfloat16"][1]):
        cos = np.sum(g32 * g16) / (np.linalg.norm(g32) * np.linalg.norm(g16) + 1e-30)
        assert cos > 0.95


def test_training_loss_dropout_only_in_training():
    keras.utils.set_random_seed(7)
    m = ShowAttendTell(V, 6, 10, dropout=0.5, feature_dim=32)
    features, image_index, tokens, targets = _batch(32)
    a = m.teacher_forced_loss(features, image_index, tokens, targets)[0]
    b = m.teacher_forced_loss(features, image_index, tokens, targets)[0]
    c = m.teacher_forced_loss(features, image_index, tokens, targets, training=True)[0]
    assert float(a) == float(b) != float(c)


def test_output_cross_entropy_with_banned_tokens_and_entropy():
    """-inf in the bias bans a token (probability 0, no gradient); the entropy is that of
    the distribution left, with no gradient of its own."""
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(4, 8)), tf.float32)
    kernel = tf.constant(rng.normal(size=(8, V)) * 3, tf.float32)
    bias = tf.constant(rng.normal(size=(V,)), tf.float32)
    banned = tf.constant([-np.inf, -np.inf] + [0.0] * (V - 2), tf.float32)   # tokens 0, 1
    targets = tf.constant([2, 5, 29, 5])
    d_ce = tf.constant([1.0, -0.5, 2.0, 0.25])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, kernel, bias])
        ce, entropy = output_cross_entropy(x, kernel, bias + banned, targets, entropy=True)
        logits = tf.matmul(x, kernel) + bias
        log_p = tf.nn.log_softmax(logits[:, 2:])                     # tokens 2.. only
        expected = -tf.gather(log_p, targets - 2, batch_dims=1)
        loss, expected_loss = tf.reduce_sum(ce * d_ce), tf.reduce_sum(expected * d_ce)
    np.testing.assert_allclose(ce.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        entropy.numpy(), (-tf.reduce_sum(tf.exp(log_p) * log_p, axis=-1)).numpy(), rtol=1e-5)
    grads = tape.gradient(loss, [x, kernel, bias])
    for g, e in zip(grads, tape.gradient(expected_loss, [x, kernel, bias])):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.any(grads[1].numpy()[:, :2]) and not np.any(grads[2].numpy()[:2])
    for g in tape.gradient(tf.reduce_sum(entropy), [x, kernel, bias]):
        assert g is None or not np.any(g.numpy())
