import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from caption_attn import model as model_lib
from caption_attn.model import (MODEL_FORMAT, BahdanauAttention, FeatureStandardization,
                                ShowAttendTell, additive_attention, masked_loss)

V, E, U, P, F = 30, 8, 16, 64, 2048


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(1)
    return ShowAttendTell(V, E, U, dropout=0.5)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    features = tf.constant(rng.random((3, P, F), np.float32))          # (B, P, F)
    tokens = tf.constant(rng.integers(1, V, (3, 6)), tf.int32)         # (B, T)
    return features, tokens


def test_shapes(model, batch):
    logits, alphas = model(batch)
    assert logits.shape == (3, 6, V) and logits.dtype == tf.float32
    assert alphas.shape == (3, 6, P)
    np.testing.assert_allclose(alphas.numpy().sum(-1), 1.0, rtol=1e-5)


def test_stepwise_decoding_equals_teacher_forcing(model, batch):
    features, tokens = batch
    logits, alphas = model(batch)
    state, context = model.init_decoder(features)
    for t in range(tokens.shape[1]):
        step_logits, state, alpha = model.decode_step(tokens[:, t], state, context)
        np.testing.assert_allclose(step_logits.numpy(), logits[:, t].numpy(), atol=1e-5)
        np.testing.assert_allclose(alpha.numpy(), alphas[:, t].numpy(), atol=1e-6)


def test_decode_step_per_image_equals_decode_step_on_the_tiled_context(model, batch):
    features, tokens = batch
    k = 3
    state, context = model.init_decoder(features)                      # (B, .)
    tiled_state, tiled_context = tf.nest.map_structure(
        lambda x: tf.repeat(x, k, axis=0), (state, context))           # (B*K, .)
    ids = tf.repeat(tokens, k, axis=0)                                 # (B*K, T)
    ids = tf.concat([ids[:, :1], tf.roll(ids[:, 1:], 1, axis=0)], 1)   # rows of an image differ
    a_state = b_state = tiled_state
    for t in range(tokens.shape[1]):
        a_logits, a_state, a_alpha = model.decode_step(ids[:, t], a_state, tiled_context)
        b_logits, b_state, b_alpha = model.decode_step_per_image(ids[:, t], b_state, context)
        np.testing.assert_allclose(b_logits.numpy(), a_logits.numpy(), atol=1e-5)
        np.testing.assert_allclose(b_alpha.numpy(), a_alpha.numpy(), atol=1e-6)
        np.testing.assert_allclose(b_state[0].numpy(), a_state[0].numpy(), atol=1e-6)
    assert not np.allclose(a_logits[0].numpy(), a_logits[1].numpy())  # the K rows differ


@pytest.mark.parametrize("per_image", [False, True])
def test_decoding_steps_with_the_gate_table_equal_the_steps_without(model, batch, per_image):
    """`gate_table` row w is the GRU input gates a step computes for token w: a step given the
    table looks its rows up and gives the same logits, state and attention."""
    features, tokens = batch
    table = model.gate_table()
    assert table.shape == (V, 3 * U)
    np.testing.assert_allclose(table.numpy()[tokens[:, 0].numpy()],
                               model.gru_embed(model.embedding(tokens[:, 0])).numpy(),
                               atol=1e-6)
    step = model.decode_step_per_image if per_image else model.decode_step
    a_state = b_state = model.init_decoder(features)[0]
    context = model.init_decoder(features)[1]
    for t in range(tokens.shape[1]):
        a_logits, a_state, a_alpha = step(tokens[:, t], a_state, context)
        b_logits, b_state, b_alpha = step(tokens[:, t], b_state, context, gates=table)
        np.testing.assert_allclose(b_logits.numpy(), a_logits.numpy(), atol=1e-5)
        np.testing.assert_allclose(b_alpha.numpy(), a_alpha.numpy(), atol=1e-6)
        np.testing.assert_allclose(b_state[0].numpy(), a_state[0].numpy(), atol=1e-6)
    # the table is what the step reads: another table, other logits
    c_logits = step(tokens[:, 0], model.init_decoder(features)[0], context,
                    gates=table + 1.0)[0]
    a_logits = step(tokens[:, 0], model.init_decoder(features)[0], context)[0]
    assert not np.allclose(c_logits.numpy(), a_logits.numpy(), atol=1e-3)


def _standardized():
    """A float32 model with standardisation statistics and features drawn from them: channels
    of very different offsets and scales, as a backbone's are, some offset by 60 standard
    deviations (x (s W) and (m s) W then cancel ~6 bits)."""
    keras.utils.set_random_seed(3)
    m = ShowAttendTell(V, E, U)
    rng = np.random.default_rng(1)
    m.feature_norm.set_statistics(rng.uniform(0, 2, F), 10.0 ** rng.uniform(-3, 1, F))
    features = tf.constant(rng.normal(m.feature_norm.mean.numpy(), np.sqrt(
        m.feature_norm.variance.numpy()), (3, P, F)).astype(np.float32))
    return m, features


def test_folded_standardization_gives_the_same_decoder_inputs(batch):
    m, features = _standardized()
    (h, ), (keys, encoded) = m.init_decoder(features)
    (h_f,), (keys_f, encoded_f) = m.init_decoder(features, fold_standardization=True)
    assert np.abs(encoded.numpy()).max() > 1.0                         # not all ReLU-zero
    for a, b in ((encoded, encoded_f), (keys, keys_f), (h, h_f)):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=2e-5 * np.abs(a.numpy()).max())


@pytest.mark.precision("bfloat16")
def test_a_bfloat16_model_never_folds_its_standardization(batch):
    m, features = _standardized()
    bf16 = ShowAttendTell(V, E, U, dtype="mixed_bfloat16")
    bf16.set_weights(m.get_weights())
    np.testing.assert_array_equal(bf16.init_decoder(features)[1][1],
                                  bf16.init_decoder(features, fold_standardization=True)[1][1])


def test_attention_keys_computed_once_per_batch(batch, monkeypatch):
    keras.utils.set_random_seed(2)
    m = ShowAttendTell(V, E, U)
    calls = []
    original = model_lib.dense_rows
    monkeypatch.setattr(model_lib, "dense_rows",
                        lambda layer, x: calls.append(layer.name) or original(layer, x))
    features, _ = batch
    long_tokens = tf.ones((3, 25), tf.int32)
    m((features, long_tokens))
    assert calls.count("key_proj") == 1  # not once per time step (25)


def test_dense_rows_of_a_wide_relu_layer_equals_keras_dense():
    # dense_rows (the encoder: more inputs than units, ReLU) as Keras' Dense, gradients too
    keras.utils.set_random_seed(3)
    layer = keras.layers.Dense(5, activation="relu")
    layer.build((None, 40))
    x = tf.constant(np.random.default_rng(3).normal(size=(2, 7, 40)), tf.float32)
    weights = tf.constant(np.random.default_rng(4).normal(size=(2, 7, 5)), tf.float32)
    grads = []
    for dense in (model_lib.dense_rows, lambda layer, x: layer(x)):   # ours, Keras'
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = dense(layer, x)
            loss = tf.reduce_sum(y * weights)
        grads.append([y] + tape.gradient(loss, [x, layer.kernel, layer.bias]))
    assert 0.2 < float(tf.reduce_mean(tf.cast(grads[1][0] > 0, tf.float32))) < 0.8
    for ours, keras_grad in zip(*grads):
        np.testing.assert_allclose(ours.numpy(), keras_grad.numpy(), rtol=1e-5, atol=1e-5)


def test_gru_receives_previous_hidden_state(model, batch):
    # The same token at every step must still give different outputs per step, because the
    # hidden state carries over (the TF tutorial's decoder never passed it).
    features, _ = batch
    same = tf.fill((3, 5), 7)
    logits, _ = model((features, same))
    assert not np.allclose(logits[:, 0].numpy(), logits[:, 1].numpy(), atol=1e-4)


def test_initial_state_depends_on_features(model, batch):
    features, tokens = batch
    (h_a,), _ = model.init_decoder(features)
    (h_b,), _ = model.init_decoder(features * 2.0)
    assert not np.allclose(h_a.numpy(), h_b.numpy())


def test_dropout_only_in_training(model, batch):
    a, _ = model(batch, training=False)
    b, _ = model(batch, training=False)
    c, _ = model(batch, training=True)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(a.numpy(), c.numpy())


def test_feature_standardization_is_identity_until_set():
    layer = FeatureStandardization(4, epsilon=0.0)
    x = tf.constant([[1.0, -2.0, 3.0, 0.5]])
    np.testing.assert_allclose(layer(x).numpy(), x.numpy())
    layer.set_statistics([1.0, 0.0, 2.0, 0.5], [4.0, 1.0, 0.25, 1.0])
    np.testing.assert_allclose(layer(x).numpy(), [[0.0, -2.0, 2.0, 0.0]], atol=1e-6)


def test_feature_standardization_epsilon_tames_constant_channels():
    layer = FeatureStandardization(2, epsilon=1e-3)
    layer.set_statistics([0.0, 5.0], [1.0, 0.0])                  # channel 1 never varies
    out = layer(tf.constant([[1.0, 5.01]])).numpy()
    assert abs(out[0, 0] - 1.0) < 1e-3 and abs(out[0, 1]) < 0.5   # not 0.01 / 1e-7


def test_save_load_identical_outputs(batch, tmp_path):
    keras.utils.set_random_seed(2)
    model = ShowAttendTell(V, E, U, dropout=0.5)
    rng = np.random.default_rng(3)
    model.feature_norm.set_statistics(rng.random(F), rng.random(F) + 0.5)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, ShowAttendTell)
    np.testing.assert_array_equal(loaded.feature_norm.mean.numpy(),
                                  model.feature_norm.mean.numpy())
    assert loaded.get_config()["units"] == U and loaded.vocab_size == V
    for x, y in zip(model(batch), loaded(batch)):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_attention_layer_config_round_trip():
    layer = BahdanauAttention(12, name="att")
    clone = BahdanauAttention.from_config(layer.get_config())
    assert clone.units == 12 and clone.name == "att"


@pytest.mark.precision("bfloat16")
def test_bfloat16_policy_runs(batch):
    m = ShowAttendTell(V, E, U, dtype=keras.DTypePolicy("mixed_bfloat16"))
    logits, alphas = m(batch)
    assert m.encoder.compute_dtype == "bfloat16"
    assert logits.dtype == tf.float32 and np.isfinite(logits.numpy()).all()


def test_masked_loss_divides_by_real_tokens():
    logits = tf.zeros((2, 4, 5))                          # uniform: CE = log(5) per token
    targets = tf.constant([[3, 2, 0, 0], [4, 4, 4, 2]])   # 2 + 4 real tokens
    alphas = tf.fill((2, 4, P), 1.0 / P)
    ce_sum, n, reg = masked_loss(logits, targets, alphas, attention_reg=0.0)
    assert float(n) == 6.0
    np.testing.assert_allclose(float(ce_sum) / float(n), np.log(5), rtol=1e-6)
    assert float(reg) == 0.0


def test_attention_regulariser_prefers_covering_every_pixel():
    targets = tf.ones((1, P), tf.int32)                   # P real steps
    logits = tf.zeros((1, P, 5))
    spread = tf.eye(P)[None]                              # each pixel attended once
    focused = tf.one_hot(tf.zeros((1, P), tf.int32), P)   # always pixel 0
    _, _, reg_spread = masked_loss(logits, targets, spread, attention_reg=1.0)
    _, _, reg_focused = masked_loss(logits, targets, focused, attention_reg=1.0)
    assert float(reg_spread) == pytest.approx(0.0, abs=1e-6)
    assert float(reg_focused) > 1.0


def _stepwise_loss_and_grads(model, features, image_index, tokens, targets):
    """Reference: the loss of `decode_step` run step by step, differentiated by autodiff."""
    with tf.GradientTape() as tape:
        state, context = model.init_decoder(features, image_index)
        logits, alphas = [], []
        for t in range(tokens.shape[1]):
            step_logits, state, alpha = model.decode_step(tokens[:, t], state, context)
            logits.append(step_logits)
            alphas.append(alpha)
        ce, _, reg = masked_loss(tf.stack(logits, 1), targets, tf.stack(alphas, 1), 2.0)
        loss = ce + reg
    return loss, tape.gradient(loss, model.trainable_variables)


def test_hand_written_backward_equals_autodiff():
    # The teacher-forced loop's gradient is written out by hand (teacher_forced_recurrence);
    # every trainable variable's gradient must match autodiff of the step-by-step decoder.
    keras.utils.set_random_seed(4)
    m = ShowAttendTell(V, 6, 10, dropout=0.0, feature_dim=32)
    rng = np.random.default_rng(5)
    features = tf.constant(rng.normal(size=(3, P, 32)), tf.float32)   # 3 images
    image_index = tf.constant([0, 2, 2, 1])                           # 4 captions
    tokens = tf.constant(rng.integers(1, V, (4, 7)), tf.int32)
    targets = tf.concat([tokens[:, 1:], tf.constant([[2], [0], [3], [0]])], axis=1)
    targets = targets * tf.constant([[1] * 7, [1] * 4 + [0] * 3, [1] * 7, [1] * 2 + [0] * 5])
    expected_loss, expected = _stepwise_loss_and_grads(m, features, image_index, tokens, targets)
    with tf.GradientTape() as tape:
        logits, alphas = m((features, image_index, tokens))
        ce, _, reg = masked_loss(logits, targets, alphas, 2.0)
        loss = ce + reg
    grads = tape.gradient(loss, m.trainable_variables)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-5)
    assert len(grads) == len(expected) == len(m.trainable_variables)
    for var, g, e in zip(m.trainable_variables, grads, expected):
        g, e = tf.convert_to_tensor(g).numpy(), tf.convert_to_tensor(e).numpy()
        assert np.abs(e).max() > 1e-4, var.path                      # every weight is reached
        np.testing.assert_allclose(g, e, rtol=2e-4, atol=1e-5 * np.abs(e).max(),
                                   err_msg=var.path)


@pytest.mark.precision("bfloat16")
def test_hand_written_backward_under_tf_function_and_bfloat16(batch):
    features, tokens = batch
    grads = {}
    for policy in ("float32", "mixed_bfloat16"):
        keras.utils.set_random_seed(6)
        m = ShowAttendTell(V, E, U, dropout=0.0, dtype=keras.DTypePolicy(policy))

        @tf.function
        def step(features, tokens):
            with tf.GradientTape() as tape:
                logits, alphas = m((features, tokens[:, :-1]))
                ce, n, reg = masked_loss(logits, tokens[:, 1:], alphas)
                loss = ce / n + reg
            return [tf.convert_to_tensor(g) for g in tape.gradient(loss, m.trainable_variables)]
        grads[policy] = [g.numpy() for g in step(features, tokens)]
        assert all(g.dtype == np.float32 and np.isfinite(g).all() for g in grads[policy])
    for g32, g16 in zip(grads["float32"], grads["mixed_bfloat16"]):
        # bfloat16 keeps 8 bits of mantissa: the same direction, not the same digits
        cos = np.sum(g32 * g16) / (np.linalg.norm(g32) * np.linalg.norm(g16) + 1e-30)
        assert cos > 0.95


@pytest.mark.precision("bfloat16")
def test_bfloat16_attention_gradients_accumulate_in_float32():
    # Under mixed precision the attention's key and score gradients are sums over every time
    # step; summed in bfloat16 (8 bits of mantissa) 300 equal steps stall near 256 of them.
    # With a zero query kernel every step attends alike and only the alphas get a gradient,
    # so each step adds exactly the same key and score gradient: T steps give T times one.
    from caption_attn.recurrence import StepWeights, teacher_forced_recurrence
    rng = np.random.default_rng(3)
    b, p, u, e, T = 2, 4, 8, 6, 300

    def r(*shape):
        return tf.constant(rng.standard_normal(shape).astype(np.float32))
    w = StepWeights(tf.zeros([u, u]), r(u, 1), r(u, e), r(e), r(e, 3 * u), r(u, 3 * u),
                    r(3 * u))
    inputs = [r(1, b, 3 * u), r(b, u), r(b, p, u), r(b, p, e)]
    weight = r(b, p)

    def grads(steps):
        x_gates = tf.cast(tf.tile(inputs[0], [steps, 1, 1]), tf.bfloat16)
        h0, keys, encoded = (tf.cast(x, tf.bfloat16) for x in inputs[1:])
        w16 = StepWeights(*(tf.cast(x, tf.bfloat16) for x in w))
        with tf.GradientTape() as tape:
            tape.watch([keys, w16.score])
            _, _, alphas = teacher_forced_recurrence(w16, x_gates, h0, keys, encoded)
            loss = tf.reduce_sum(alphas * weight)
        return [tf.cast(g, tf.float32).numpy() for g in tape.gradient(loss, [keys, w16.score])]

    for one, many in zip(grads(1), grads(T)):
        # each is rounded to bfloat16 once at the end: within its 2^-8, not 15 % off
        np.testing.assert_allclose(many, T * one, rtol=2 ** -7, atol=1e-6 * T * np.abs(one).max())


@pytest.mark.parametrize("use_kernel", [False, True])
def test_time_loops_read_each_step_without_shape_ops(use_kernel):
    # Every op of a time loop costs the executor microseconds, whatever its size: for small
    # batches that, not arithmetic, is most of a step. x[t] is a strided slice plus the
    # ops that build its bounds, a reshape to tf.shape(.) a Shape op more, each
    # StepSaved field its own TensorArray and loop variable: the loops read and save each
    # step's rows whole (one TensorArray per dtype and kind) and reshape to static shapes.
    from caption_attn.recurrence import StepWeights, teacher_forced_recurrence
    rng = np.random.default_rng(4)
    b, p, u, e, T = 2, 4, 8, 6, 5

    def r(*shape):
        return tf.constant(rng.standard_normal(shape).astype(np.float32))
    w = StepWeights(r(u, u), r(u, 1), r(u, e), r(e), r(e, 3 * u), r(u, 3 * u), r(3 * u))
    inputs = [r(T, b, 3 * u), r(b, u), r(b, p, u), r(b, p, e)]

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3 * u]),
                                  tf.TensorSpec([None, u]), tf.TensorSpec([None, p, u]),
                                  tf.TensorSpec([None, p, e])])
    def grads(x_gates, h0, keys, encoded):
        with tf.GradientTape() as tape:
            tape.watch([x_gates, keys])
            hs, contexts, alphas = teacher_forced_recurrence(w, x_gates, h0, keys, encoded,
                                                             use_kernel)
            loss = tf.reduce_sum(hs) + tf.reduce_sum(contexts) + tf.reduce_sum(alphas ** 2)
        return tape.gradient(loss, [x_gates, keys])

    graph = grads.get_concrete_function().graph.as_graph_def()
    bodies = {f.signature.name: collections.Counter(n.op for n in f.node_def)
              for f in graph.library.function if "while" in f.signature.name
              and "body" in f.signature.name}
    assert len(bodies) == 2, sorted(bodies)                            # forward, backward
    for name, ops in bodies.items():
        assert not ops["Shape"] and not ops["Pack"], (name, ops)
    forward, backward = sorted(bodies.values(), key=lambda ops: ops["TensorListGetItem"])
    assert forward["TensorListSetItem"] == 5          # h, context, alpha, e, the saved rows
    assert forward["TensorListGetItem"] == 1          # the step's input gates
    assert backward["TensorListGetItem"] == 4         # e, saved rows, per-step inputs x 2
    assert ("AdditiveAttentionScoresGrad" in backward) == use_kernel
    assert not backward["StridedSlice"], backward
    assert all(np.all(np.isfinite(g.numpy())) for g in grads(*inputs))


def test_every_parameter_can_learn():
    # A parameter whose true gradient is always zero (like a bias on the attention scores,
    # which the softmax cancels) has no place in the model: its float32 and bfloat16
    # "gradients" are rounding noise whose sign depends on the CPU.
    keras.utils.set_random_seed(7)
    m = ShowAttendTell(V, E, U)
    assert not [v.path for v in m.trainable_variables if "score_proj/bias" in v.path]
    assert len(m.attention.score_proj.weights) == 1                   # kernel only
    assert m.f_beta.activation is keras.activations.linear           # sigmoid is in the step


def test_attention_layer_follows_keras_build_contract():
    layer = BahdanauAttention(12, name="att")
    assert not layer.weights                                          # nothing before build
    layer.build(((None, P, E), (None, U)))
    assert [tuple(w.shape) for w in layer.weights] == [(E, 12), (12,), (U, 12), (12, 1)]
    rng = np.random.default_rng(8)
    values = tf.constant(rng.normal(size=(2, P, E)), tf.float32)    # (B, P, D)
    query = tf.constant(rng.normal(size=(2, U)), tf.float32)         # (B, Q)
    context, weights = layer((values, query))
    assert context.shape == (2, E) and weights.shape == (2, P)
    np.testing.assert_allclose(weights.numpy().sum(-1), 1.0, rtol=1e-5)
    # the split form a decoder uses (keys once, then a step) is the same computation
    step_context, step_weights, _ = additive_attention(
        layer.keys(values), values, layer.query_proj(query), layer.score_proj.kernel)
    np.testing.assert_allclose(step_context.numpy(), context.numpy(), rtol=1e-6)
    np.testing.assert_allclose(step_weights.numpy(), weights.numpy(), rtol=1e-6)


def test_feature_standardization_builds_lazily_and_respects_its_policy():
    layer = FeatureStandardization(4, dtype="mixed_bfloat16")
    assert not layer.weights
    out = layer(tf.ones((1, 4)))
    assert out.dtype == tf.bfloat16 and layer.mean.dtype == "float32"
    clone = FeatureStandardization.from_config(layer.get_config())
    assert clone.feature_dim == 4 and clone.dtype_policy.name == "mixed_bfloat16"
    with pytest.raises(ValueError, match="feature_dim=4"):
        FeatureStandardization(4)(tf.ones((1, 5)))
    # the model keeps it in float32 under a mixed policy (x - mean cancels digits)
    m = ShowAttendTell(V, E, U, dtype=keras.DTypePolicy("mixed_bfloat16"))
    assert m.feature_norm.compute_dtype == "float32"


def test_model_of_an_older_format_is_refused_with_advice():
    config = ShowAttendTell(V, E, U).get_config()
    assert config["model_format"] == MODEL_FORMAT and "num_pixels" not in config
    old = {k: v for k, v in config.items() if k != "model_format"}   # caption_attn 0.1
    with pytest.raises(ValueError, match="model format 1.*caption-attn train"):
        ShowAttendTell.from_config(old)
    assert ShowAttendTell.from_config(config).units == U


@pytest.mark.parametrize("sizes", [(29, 8, 16), (101, 32, 24), (7, 5, 3)])
def test_parameter_count_is_the_built_models(sizes):
    """`train` checks the model's size before building it, from this sum."""
    V, E, U = sizes
    assert model_lib.parameter_count(V, E, U) == ShowAttendTell(V, E, U).count_params()
