"""Show, Attend and Tell: Bahdanau attention over InceptionV3 features and a GRU decoder.

Shapes: B batch, T caption steps, P = 64 feature positions (8x8, row-major), F = 2048 feature
channels, E embedding size, U GRU/attention units, V vocabulary size.

What differs from the TensorFlow tutorial this project replaces:
- the attention's key projection W_k(features) is computed once per batch (`init_decoder`),
  not at every time step;
- the GRU cell really receives its previous hidden state, which starts from the mean of the
  features (Show, Attend and Tell's f_init) instead of zeros;
- the embedding's share of the GRU gates and the deep output layer run on all time steps at
  once, outside the recurrent loop;
- back-propagation through the teacher-forced loop is written out (`teacher_forced_recurrence`,
  checked against autodiff by the tests): the backward loop carries only what is recurrent,
  and the weight gradients are computed after it as one matmul over all T * B rows instead
  of T small ones accumulated step by step (training ~1.2x faster on a 2-core CPU);
- each of the 2048 feature channels is standardised with the mean and variance of training
  images (`FeatureStandardization`, set by `train`): channels of a backbone differ by orders
  of magnitude in scale and offset, which slows the encoder's learning (on the shapes demo
  scene accuracy went from 0.84 to 0.93 with everything else equal);
- a gating scalar beta_t = sigmoid(f_beta(h_{t-1})) scales the context (Show, Attend and Tell
  section 4.2.1), and the attention weights are returned for the doubly stochastic
  regulariser and for the heatmaps;
- the attention score has no bias: a softmax over the positions ignores a shift of every
  score, so such a bias gets a zero gradient and never learns (its float32 and bfloat16
  "gradients" were rounding noise of opposite signs on different CPUs).

Saved models carry `MODEL_FORMAT` in their config; `best.keras` files of an older format are
refused on loading with a message (see `check_model_format`).
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from caption_attn.backbone import FEATURE_DIM

# Version of the saved model's layout. 2: no attention score bias, f_beta without an unused
# activation, no `num_pixels` argument (format 1 is caption_attn 0.1's).
MODEL_FORMAT = 2



@keras.saving.register_keras_serializable(package="caption_attn")
class FeatureStandardization(keras.layers.Layer):
    """(x - mean) / sqrt(variance + epsilon) per feature channel, in float32.

    `mean` and `variance` (F,) are non-trainable weights (saved with the model and in
    checkpoints), identity until `set_statistics` fills them from training features. Unlike
    `keras.layers.Normalization`, the statistics are live variables, so restoring a checkpoint
    restores them too, and `epsilon` keeps near-constant channels from being blown up to unit
    variance (features are O(1): ImageNet activations, or a random backbone's times the
    cache's `feature_scale`).

    Computes in the layer's dtype policy; `ShowAttendTell` gives it float32 even under a mixed
    policy, since x - mean cancels digits that bfloat16's 8-bit mantissa does not have.
    """

    def __init__(self, feature_dim: int, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.feature_dim, self.epsilon = feature_dim, epsilon

    def build(self, input_shape):
        if input_shape[-1] != self.feature_dim:
            raise ValueError(f"`input_shape` must end with feature_dim={self.feature_dim}, "
                             f"got {input_shape}")
        self.mean = self.add_weight(shape=(self.feature_dim,), initializer="zeros",
                                    trainable=False, name="mean")
        self.variance = self.add_weight(shape=(self.feature_dim,), initializer="ones",
                                        trainable=False, name="variance")

    def set_statistics(self, mean, variance):
        if not self.built:
            self.build((None, self.feature_dim))
        self.mean.assign(tf.cast(mean, self.mean.dtype))
        self.variance.assign(tf.cast(variance, self.variance.dtype))

    def call(self, features):
        x = tf.cast(features, self.compute_dtype)                     # (..., F)
        mean, variance = (tf.cast(v, self.compute_dtype) for v in (self.mean, self.variance))
        return (x - mean) * tf.math.rsqrt(variance + self.epsilon)    # (..., F)

    def get_config(self):
        return {**super().get_config(), "feature_dim": self.feature_dim,
                "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="caption_attn")
class BahdanauAttention(keras.layers.Layer):
    """Additive attention: alpha = softmax_p(w^T tanh(W_k a_p + b_k + W_q h)), context =
    sum_p alpha_p a_p (Bahdanau et al. 2015; Show, Attend and Tell eq. 4-6).

    `call((values, query))`: values (B, P, D), query (B, Q) -> context (B, D), weights (B, P)
    float32. A decoder splits this in two, since the keys W_k a_p + b_k (B, P, U) depend on the
    image only: `keys(values)` once per batch, then `additive_attention` at every step with
    the projected query and `score_proj.kernel`. The score w has no bias (a softmax over p
    ignores it). `build` takes `(values_shape, query_shape)`.
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.key_proj = keras.layers.Dense(units, name="key_proj", dtype=self.dtype_policy)
        self.query_proj = keras.layers.Dense(units, use_bias=False, name="query_proj",
                                             dtype=self.dtype_policy)
        self.score_proj = keras.layers.Dense(1, use_bias=False, name="score_proj",
                                             dtype=self.dtype_policy)

    def build(self, input_shape):
        values_shape, query_shape = input_shape
        self.key_proj.build(values_shape)
        self.query_proj.build(query_shape)
        self.score_proj.build((None, self.units))

    def keys(self, values):
        return self.key_proj(values)                                  # (B, P, U)

    def call(self, inputs):
        values, query = inputs                                        # (B, P, D), (B, Q)
        context, weights, _ = additive_attention(
            self.keys(values), values, self.query_proj(query), self.score_proj.kernel)
        return context, weights                                       # (B, D), (B, P)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class StepWeights(NamedTuple):
    """The recurrent step's weights, in the compute dtype (see `ShowAttendTell.step_weights`):
    attention query (U, U) and score (U, 1); gate f_beta (U, E) and bias (E,); GRU context
    kernel (E, 3U), recurrent kernel (U, 3U) and bias (3U,)."""
    query: tf.Tensor
    score: tf.Tensor
    beta: tf.Tensor
    beta_bias: tf.Tensor
    gru_context: tf.Tensor
    gru_recurrent: tf.Tensor
    gru_bias: tf.Tensor


class StepSaved(NamedTuple):
    """What one step keeps for its backward pass (`teacher_forced_recurrence`)."""
    e: tf.Tensor          # (B, P, U) tanh(keys + query)
    raw: tf.Tensor        # (B, E) attention-weighted features before the gate
    beta: tf.Tensor       # (B, E) gate
    z: tf.Tensor          # (B, U) GRU update gate
    r: tf.Tensor          # (B, U) GRU reset gate
    hh: tf.Tensor         # (B, U) recurrent share of the candidate, before r *
    candidate: tf.Tensor  # (B, U)


def additive_attention(keys, values, q, score):
    """keys (B, P, U), values (B, P, E), projected query q (B, U), score (U, 1) -> context
    (B, E), weights (B, P) float32, e = tanh(keys + q) (B, P, U)."""
    units = keys.shape[-1]
    e = tf.tanh(keys + q[:, None, :])                                 # (B, P, U)
    # A 2-D matmul, not a tensordot on (B, P, U), whose gradient inside the time loop needs
    # runtime transpose permutations that XLA (--xla) cannot compile.
    scores = tf.reshape(tf.matmul(tf.reshape(e, [-1, units]), score),
                        tf.shape(e)[:2])                              # (B, P)
    weights = tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1)     # (B, P) float32
    context = tf.einsum("bp,bpe->be", tf.cast(weights, values.dtype), values)  # (B, E)
    return context, weights, e


def attend_and_update(w: StepWeights, x_gates, h, keys, encoded):
    """One decoder step: attention over the image, gated context, GRU (reset_after, as
    Keras/cuDNN) over [embedding; context].

    x_gates (B, 3U) is the embedding's share of the GRU gates (computed for all steps at
    once), h (B, U), keys (B, P, U), encoded (B, P, E) -> new h (B, U), gated context (B, E),
    attention (B, P) float32, and the `StepSaved` intermediates.
    """
    return _update(w, x_gates, h, tf.matmul(h, w.query),                # (B, U)
                   tf.matmul(h, w.beta) + w.beta_bias,                  # (B, E)
                   tf.matmul(h, w.gru_recurrent) + w.gru_bias,          # (B, 3U)
                   keys, encoded)


def _update(w: StepWeights, x_gates, h, q, h_beta, h_gates, keys, encoded):
    """`attend_and_update` from h's three projections: the attention query q (B, U), the
    gate's h_beta (B, E) and the GRU's recurrent share h_gates (B, 3U), biases included."""
    raw, alpha, e = additive_attention(keys, encoded, q, w.score)    # (B, E), (B, P), .
    beta = tf.sigmoid(h_beta)                                        # (B, E)
    context = beta * raw                                             # (B, E)
    xz, xr, xh = tf.split(x_gates + tf.matmul(context, w.gru_context), 3, axis=-1)
    hz, hr, hh = tf.split(h_gates, 3, axis=-1)                       # (B, U) each
    z = tf.sigmoid(xz + hz)                                          # (B, U)
    r = tf.sigmoid(xr + hr)                                          # (B, U)
    candidate = tf.tanh(xh + r * hh)                                 # (B, U)
    h_new = z * h + (1.0 - z) * candidate                            # (B, U)
    return h_new, context, alpha, StepSaved(e, raw, beta, z, r, hh, candidate)


def teacher_forced_recurrence(w: StepWeights, x_gates, h0, keys, encoded):
    """`attend_and_update` over all T steps, with back-propagation through time written out.

    x_gates (T, B, 3U), h0 (B, U), keys (B, P, U), encoded (B, P, E) -> hs (T, B, U),
    contexts (T, B, E), alphas (T, B, P) float32.

    The forward pass is the same function the decoder runs step by step. The backward pass
    differs from what autodiff of the loop builds: its time loop carries only what is
    recurrent (dh, the key gradient, the score vector's gradient) and one fused matmul
    through the transposed query/gate/recurrent kernels; every weight gradient, the feature
    gradient and the input-gate gradient are then computed after the loop as one large matmul
    over all T * B rows, instead of T small ones accumulated step by step.
    """
    @tf.custom_gradient
    def run(x_gates, h0, keys, encoded, *weights):
        w = StepWeights(*weights)
        T = tf.shape(x_gates)[0]
        # Per-step tensors go into TensorArrays; the saved ones are read back by the backward
        # loop one step at a time, never stacked (e alone is T x B x P x U).
        outputs = [tf.TensorArray(h0.dtype, size=T), tf.TensorArray(h0.dtype, size=T),
                   tf.TensorArray(tf.float32, size=T)]
        saved = StepSaved(*(tf.TensorArray(h0.dtype, size=T) for _ in StepSaved._fields))

        # h feeds the query, the gate and the recurrent gates: one matmul per step instead
        # of three (the same kernels, concatenated once per batch).
        U, E = h0.shape[-1], encoded.shape[-1]
        h_kernels = tf.concat([w.query, w.beta, w.gru_recurrent], axis=1)  # (U, U+E+3U)
        h_bias = tf.concat([tf.zeros([U], h0.dtype), w.beta_bias, w.gru_bias], 0)

        def body(t, h, outputs, saved):
            q, h_beta, h_gates = tf.split(tf.nn.bias_add(tf.matmul(h, h_kernels), h_bias),
                                          [U, E, 3 * U], axis=-1)   # (B, U), (B, E), (B, 3U)
            h, context, alpha, step_saved = _update(w, x_gates[t], h, q, h_beta, h_gates, keys,
                                                    encoded)
            outputs = [a.write(t, x) for a, x in zip(outputs, (h, context, alpha))]
            return t + 1, h, outputs, StepSaved(*(a.write(t, x)
                                                  for a, x in zip(saved, step_saved)))

        _, _, outputs, saved = tf.while_loop(lambda t, *_: t < T, body,
                                             (tf.constant(0), h0, outputs, saved))
        hs, contexts, alphas = (a.stack() for a in outputs)          # (T, B, .) each

        def grad(d_hs, d_contexts, d_alphas):
            d_hs, d_contexts, d_alphas = (
                tf.zeros_like(x) if d is None else tf.cast(d, x.dtype)
                for d, x in ((d_hs, hs), (d_contexts, contexts), (d_alphas, alphas)))
            return _recurrence_backward(w, h0, keys, encoded, hs, contexts, alphas, saved,
                                        d_hs, d_contexts, d_alphas)

        return (hs, contexts, alphas), grad

    return run(x_gates, h0, keys, encoded, *w)


def _recurrence_backward(w, h0, keys, encoded, hs, contexts, alphas, saved, d_hs,
                         d_contexts, d_alphas):
    """Gradients of `teacher_forced_recurrence` w.r.t. x_gates, h0, keys, encoded and the
    `StepWeights`, in that order."""
    dt, U, E = h0.dtype, h0.shape[-1], encoded.shape[-1]
    T = tf.shape(hs)[0]
    # dh flows back through the query, the gate and the recurrent kernels in one matmul.
    # The kernels are transposed once here: oneDNN's matmul with transpose_b took 1.5-1.7x
    # as long for these 64-row products.
    h_kernels_t = tf.transpose(tf.concat([w.query, w.beta, w.gru_recurrent], axis=1))
    gru_context_t = tf.transpose(w.gru_context)                       # (3U, E)
    score_row = tf.reshape(w.score, [1, U])                           # (1, U)
    h_prev = tf.concat([h0[None], hs[:-1]], axis=0)                   # (T, B, U)

    def body(t, dh, d_keys, d_score, d_xs, d_hs_all, d_raws):
        s = StepSaved(*(a.read(t) for a in saved))
        dh = dh + d_hs[t]                                             # (B, U)
        # GRU: h' = z h + (1 - z) c,  c = tanh(xh + r hh), z = sigmoid(.), r = sigmoid(.)
        d_cand = tf.raw_ops.TanhGrad(y=s.candidate, dy=dh * (1.0 - s.z))
        d_z = tf.raw_ops.SigmoidGrad(y=s.z, dy=dh * (h_prev[t] - s.candidate))
        d_r = tf.raw_ops.SigmoidGrad(y=s.r, dy=d_cand * s.hh)
        d_x = tf.concat([d_z, d_r, d_cand], axis=-1)                  # (B, 3U) input gates
        # context = beta * raw feeds the GRU's input gates
        d_ctx = tf.matmul(d_x, gru_context_t) + d_contexts[t]        # (B, E)
        d_beta = tf.raw_ops.SigmoidGrad(y=s.beta, dy=d_ctx * s.raw)   # (B, E)
        d_raw = d_ctx * s.beta                                        # (B, E)
        # attention: raw = sum_p alpha_p encoded_p, alpha = softmax_p(e_p w)
        alpha = alphas[t]                                             # (B, P) float32
        d_alpha = tf.cast(tf.einsum("be,bpe->bp", d_raw, encoded), tf.float32) + d_alphas[t]
        ds = alpha * (d_alpha - tf.reduce_sum(alpha * d_alpha, axis=-1, keepdims=True))
        ds_c = tf.cast(ds, dt)                                        # (B, P)
        # ds_bp w_u as a K=1 matmul: a broadcasting multiply took twice as long
        d_e = tf.raw_ops.TanhGrad(y=s.e, dy=tf.reshape(
            tf.matmul(tf.reshape(ds_c, [-1, 1]), score_row), tf.shape(s.e)))  # (B, P, U)
        d_score = d_score + tf.matmul(tf.reshape(ds_c, [1, -1]),
                                      tf.reshape(s.e, [-1, U]))       # (1, U)
        d_q = tf.reduce_sum(d_e, axis=1)                              # (B, U)
        # h feeds the query, the gate and the recurrent gates: one matmul back through all
        d_h_all = tf.concat([d_q, d_beta, d_z, d_r, d_cand * s.r], axis=-1)  # (B, U+E+3U)
        dh = dh * s.z + tf.matmul(d_h_all, h_kernels_t)              # (B, U)
        return (t - 1, dh, d_keys + d_e, d_score, d_xs.write(t, d_x),
                d_hs_all.write(t, d_h_all), d_raws.write(t, d_raw))

    arrays = [tf.TensorArray(dt, size=T) for _ in range(3)]
    _, dh0, d_keys, d_score, *arrays = tf.while_loop(
        lambda t, *_: t >= 0, body,
        (T - 1, tf.zeros_like(h0), tf.zeros_like(keys), tf.zeros([1, U], dt), *arrays))
    d_x, d_h_all, d_raw = (a.stack() for a in arrays)       # (T, B, .) each

    # Everything that is not recurrent, over all T * B rows at once.
    def rows(x):
        return tf.reshape(x, [-1, x.shape[-1]])                      # (T * B, .)
    d_h_kernels = tf.matmul(rows(h_prev), rows(d_h_all), transpose_a=True)  # (U, U+E+3U)
    d_query, d_beta_kernel, d_recurrent = tf.split(d_h_kernels, [U, E, 3 * U], axis=1)
    # the gate's and the recurrent gates' biases sit behind the same columns of d_h_all
    d_h_bias = tf.reduce_sum(rows(d_h_all), axis=0)                   # (U+E+3U,)
    d_encoded = tf.einsum("tbp,tbe->bpe", tf.cast(alphas, dt), d_raw)  # (B, P, E)
    weights = StepWeights(
        query=d_query,
        score=tf.transpose(d_score),
        beta=d_beta_kernel,
        beta_bias=d_h_bias[U:U + E],
        gru_context=tf.matmul(rows(contexts), rows(d_x), transpose_a=True),  # (E, 3U)
        gru_recurrent=d_recurrent,
        gru_bias=d_h_bias[U + E:])
    return (d_x, dh0, d_keys, d_encoded, *weights)


def _dense_rows(layer: keras.layers.Dense, x):
    """`layer(x)` for x (..., D) as one 2-D matmul, so that oneDNN fuses the bias and the
    activation into it (Keras' Dense on 3-D inputs runs tensordot, then separate ops)."""
    dt = layer.compute_dtype
    y = tf.matmul(tf.reshape(tf.cast(x, dt), [-1, x.shape[-1]]),
                  tf.cast(layer.kernel, dt))                          # (rows, units)
    if layer.use_bias:
        y = tf.nn.bias_add(y, tf.cast(layer.bias, dt))
    y = layer.activation(y)
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [layer.units]], 0))  # (..., units)


def output_cross_entropy(x, kernel, bias, targets):
    """Cross-entropy of the output layer, with its gradient written out.

    x (R, E), kernel (E, V), bias (V,) in the compute dtype, targets (R,) int -> ce (R,)
    float32 = logsumexp(l) - l[target] of the logits l = x kernel + bias. Equals
    `tf.nn.sparse_softmax_cross_entropy_with_logits` on those logits, but the (R, V) softmax
    comes from oneDNN's multi-threaded softmax (TensorFlow's cross-entropy kernel took 15 ms
    of a 220 ms step for 830 x 5001 logits on 2 cores) and is kept for the backward pass,
    whose d_logits = (softmax - onehot) * d_ce goes straight into the two matmuls.
    """
    @tf.custom_gradient
    def run(x, kernel, bias):
        logits = tf.cast(tf.nn.bias_add(tf.matmul(x, kernel), bias), tf.float32)  # (R, V)
        probs = tf.nn.softmax(logits)                                 # (R, V)
        # logsumexp = max l - log(max p): the largest probability is >= 1/V, so its log is
        # exact where a p[target] near 0 would not be.
        lse = tf.reduce_max(logits, -1) - tf.math.log(tf.reduce_max(probs, -1))  # (R,)
        ce = lse - tf.gather(logits, targets, batch_dims=1)          # (R,)

        def grad(d_ce):                                              # (R,)
            rows = tf.stack([tf.range(tf.shape(targets)[0], dtype=targets.dtype), targets], 1)
            d_logits = tf.tensor_scatter_nd_sub(probs * d_ce[:, None], rows, d_ce)  # (R, V)
            d_logits = tf.cast(d_logits, x.dtype)
            # on the kernel transposed first: a transpose_b matmul is ~20% slower here, and
            # an einsum, unlike tf.transpose, is not folded back into one by Grappler
            return (tf.matmul(d_logits, tf.einsum("ev->ve", kernel)),  # (R, E)
                    tf.matmul(x, d_logits, transpose_a=True),         # (E, V)
                    tf.reduce_sum(d_logits, axis=0))                  # (V,)
        return ce, grad

    return run(x, kernel, bias)


@keras.saving.register_keras_serializable(package="caption_attn")
class ShowAttendTell(keras.Model):
    """Caption decoder over (B, P, F) image features.

    `call((features, tokens))` runs teacher forcing: features (B, P, F), tokens (B, T) of the
    decoder *inputs* (`<start> w1 ... wn`, padded) -> logits (B, T, V) float32 and attention
    (B, T, P) float32. `call((features, image_index, tokens))` does the same with each image's
    features once (training batches hold several captions of one image). `init_decoder` /
    `decode_step` expose the same computation one step at a time for `decode.py`.
    """

    def __init__(self, vocab_size: int, embedding_dim: int = 256, units: int = 512,
                 dropout: float = 0.5, feature_dim: int = FEATURE_DIM, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.units = units
        self.dropout = dropout
        self.feature_dim = feature_dim
        dense = self._dense
        # float32 whatever the policy: see FeatureStandardization
        self.feature_norm = FeatureStandardization(feature_dim, name="feature_norm",
                                                   dtype="float32")
        self.encoder = dense(embedding_dim, activation="relu", name="encoder")
        self.attention = BahdanauAttention(units, name="attention", dtype=self.dtype_policy)
        self.embedding = keras.layers.Embedding(vocab_size, embedding_dim, name="embedding",
                                                dtype=self.dtype_policy)
        self.init_h = dense(units, activation="tanh", name="init_h")
        # The gate's sigmoid is applied inside the step (`attend_and_update`), which reads
        # only this layer's kernel and bias.
        self.f_beta = dense(embedding_dim, name="f_beta")
        # GRU (reset_after, as Keras/cuDNN) over [embedding; gated context], weights split so
        # the embedding share is computed for all steps at once.
        self.gru_embed = dense(3 * units, name="gru_embed")
        self.gru_context = dense(3 * units, use_bias=False, name="gru_context")
        self.gru_recurrent = dense(3 * units, name="gru_recurrent")
        # Deep output: logits = L_o(dropout(E y_{t-1} + L_h h_t + L_z z_t)).
        self.out_hidden = dense(embedding_dim, use_bias=False, name="out_hidden")
        self.out_context = dense(embedding_dim, use_bias=False, name="out_context")
        self.out_dropout = keras.layers.Dropout(dropout, name="out_dropout")
        self.logits = dense(vocab_size, name="logits")
        self.build(None)

    def _dense(self, units, **kwargs):
        return keras.layers.Dense(units, dtype=self.dtype_policy, **kwargs)

    def build(self, input_shape=None):
        """Builds every layer from the sizes given to `__init__` (the inputs' shapes follow
        from them), so a new model has its weights at once, as checkpoints need."""
        E, U = self.embedding_dim, self.units
        self.feature_norm.build((None, None, self.feature_dim))
        self.encoder.build((None, None, self.feature_dim))
        self.attention.build(((None, None, E), (None, U)))
        self.embedding.build((None, None))
        self.init_h.build((None, E))
        self.f_beta.build((None, U))
        self.gru_embed.build((None, None, E))
        self.gru_context.build((None, E))
        self.gru_recurrent.build((None, U))
        self.out_hidden.build((None, None, U))
        self.out_context.build((None, None, E))
        self.logits.build((None, None, E))
        self.built = True

    # ------------------------------------------------------------------ pieces
    def step_weights(self) -> StepWeights:
        """The recurrent step's kernels and biases, cast to the compute dtype."""
        attention, dt = self.attention, self.compute_dtype
        weights = (attention.query_proj.kernel, attention.score_proj.kernel,
                   self.f_beta.kernel, self.f_beta.bias,
                   self.gru_context.kernel, self.gru_recurrent.kernel, self.gru_recurrent.bias)
        return StepWeights(*(tf.cast(x, dt) for x in weights))

    def _output(self, embedded, h, context, training=False):
        """Deep output layer; works on (B, E) or (B, T, E) alike."""
        x = embedded + self.out_hidden(h) + self.out_context(context)  # (..., E)
        x = self.out_dropout(x, training=training)
        return tf.cast(self.logits(x), tf.float32)                   # (..., V)

    # ------------------------------------------------------------------ decoding API
    def init_decoder(self, features, image_index=None):
        """features (N, P, F) -> state (h,), context (keys, encoded), one row per caption.

        With `image_index` (B,), features hold each image once and caption b uses row
        image_index[b]: the encoder and the key projection then run once per image.
        """
        encoded = self.encoder(self.feature_norm(features))          # (N, P, E)
        keys = self.attention.keys(encoded)                          # (N, P, U)
        h = self.init_h(tf.reduce_mean(encoded, axis=1))             # (N, U)
        if image_index is not None:
            encoded, keys, h = (tf.gather(x, image_index) for x in (encoded, keys, h))
        return (h,), (keys, encoded)                                 # (B, U), (B, P, .)

    def decode_step(self, tokens, state, context, training=False):
        """tokens (B,) int32 -> logits (B, V) float32, new state, attention (B, P) float32.

        `training` switches the output dropout on (sampling for self-critical training)."""
        (h,), (keys, encoded) = state, context
        embedded = self.embedding(tokens)                            # (B, E)
        x_gates = self.gru_embed(embedded)                           # (B, 3U)
        h, ctx, alpha, _ = attend_and_update(self.step_weights(), x_gates, h, keys, encoded)
        return self._output(embedded, h, ctx, training), (h,), alpha

    # ------------------------------------------------------------------ teacher forcing
    def call(self, inputs, training=False):
        """inputs: (features (B, P, F), tokens (B, T)) or (features (N, P, F), image_index
        (B,), tokens (B, T)) with each image once (see `init_decoder`)."""
        features, tokens = inputs[0], inputs[-1]                     # (N, P, F), (B, T)
        image_index = inputs[1] if len(inputs) == 3 else None        # (B,) or None
        (h0,), (keys, encoded) = self.init_decoder(features, image_index)
        embedded = self.embedding(tokens)                            # (B, T, E)
        x_gates = self.gru_embed(embedded)                           # (B, T, 3U)
        hs, contexts, alphas = teacher_forced_recurrence(
            self.step_weights(), tf.transpose(x_gates, [1, 0, 2]), h0, keys,
            encoded)                                                 # (T, B, .) each
        hs = tf.transpose(hs, [1, 0, 2])                             # (B, T, U)
        contexts = tf.transpose(contexts, [1, 0, 2])                 # (B, T, E)
        alphas = tf.transpose(alphas, [1, 0, 2])                     # (B, T, P)
        return self._output(embedded, hs, contexts, training), alphas

    def teacher_forced_loss(self, features, image_index, tokens, targets, training=False,
                            attention_reg: float = 1.0, real_tokens_only: bool = True):
        """`masked_loss` of `call`'s outputs, computed the way training needs it:
        features (N, P, F), image_index (B,) or None, decoder inputs tokens (B, T), targets
        (B, T) (0 = <pad>) -> (ce_sum, num_tokens, reg_sum).

        Unlike `call`, everything stays time-major (T, B, .), as the recurrence wants it (no
        transposes), and the output layer and its cross-entropy (`output_cross_entropy`) run
        on the R real tokens only, not on the bucket's padding. `real_tokens_only=False`
        runs them on all T * B rows and masks the result, for XLA, which needs static shapes.
        """
        # init_decoder's computation, its 3-D denses as 2-D matmuls with the bias (and ReLU)
        # fused in (Keras' Dense on 3-D inputs goes through tensordot, and they stay apart)
        encoded = _dense_rows(self.encoder, self.feature_norm(features))  # (N, P, E)
        keys = _dense_rows(self.attention.key_proj, encoded)        # (N, P, U)
        h0 = self.init_h(tf.reduce_mean(encoded, axis=1))            # (N, U)
        if image_index is not None:
            encoded, keys, h0 = (tf.gather(x, image_index) for x in (encoded, keys, h0))
        targets = tf.reshape(tf.transpose(targets), [-1])            # (T * B,)
        embedded = self.embedding(tf.transpose(tokens))              # (T, B, E)
        x_gates = _dense_rows(self.gru_embed, embedded)              # (T, B, 3U)
        hs, contexts, alphas = teacher_forced_recurrence(
            self.step_weights(), x_gates, h0, keys, encoded)         # (T, B, .) each
        x = embedded + self.out_hidden(hs) + self.out_context(contexts)  # (T, B, E)
        x = tf.reshape(x, [-1, self.embedding_dim])                  # (T * B, E)
        mask = tf.cast(tf.not_equal(targets, 0), tf.float32)         # (T * B,)
        if real_tokens_only:
            real = tf.where(mask > 0)[:, 0]                          # (R,)
            x, rows_targets = tf.gather(x, real), tf.gather(targets, real)  # (R, E), (R,)
        else:
            rows_targets = targets
        dt = self.compute_dtype
        x = tf.cast(self.out_dropout(x, training=training), dt)      # (its policy: float32)
        ce = output_cross_entropy(x, tf.cast(self.logits.kernel, dt),
                                  tf.cast(self.logits.bias, dt), rows_targets)  # (R,)
        ce_sum = tf.reduce_sum(ce if real_tokens_only else ce * mask)
        mask = tf.reshape(mask, tf.shape(alphas)[:2])                # (T, B)
        coverage = tf.reduce_sum(alphas * mask[..., None], axis=0)   # (B, P)
        reg = attention_reg * tf.reduce_mean(tf.square(1.0 - coverage), axis=-1)  # (B,)
        return ce_sum, tf.reduce_sum(mask), tf.reduce_sum(reg)

    def get_config(self):
        return {**super().get_config(), "vocab_size": self.vocab_size,
                "embedding_dim": self.embedding_dim, "units": self.units,
                "dropout": self.dropout, "feature_dim": self.feature_dim,
                "model_format": MODEL_FORMAT}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        check_model_format(config.pop("model_format", 1))
        return cls(**config)


def check_model_format(found) -> None:
    """ValueError unless a saved model's `model_format` is this version's."""
    if found != MODEL_FORMAT:
        raise ValueError(
            f"the saved model has model format {found!r}; this caption_attn reads format "
            f"{MODEL_FORMAT} (format 1, caption_attn 0.1, had an attention score bias that "
            f"could not learn and was removed). Resume its run with `caption-attn train` (its "
            f"checkpoints still load) to save a best model in the current format")


def masked_loss(logits, targets, alphas, attention_reg: float = 1.0):
    """Cross-entropy over real tokens plus the doubly stochastic attention regulariser.

    logits (B, T, V) float32, targets (B, T) int (0 = <pad>), alphas (B, T, P).
    Returns (loss_sum, num_tokens, reg_sum): the caller divides the sums by the *global*
    token and caption counts, so a replica's share adds up to the mean over the whole batch.
    """
    mask = tf.cast(tf.not_equal(targets, 0), tf.float32)             # (B, T)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(targets, tf.int32), logits=logits)            # (B, T)
    coverage = tf.reduce_sum(alphas * mask[..., None], axis=1)       # (B, P)
    # Show, Attend and Tell eq. 14, averaged over pixels as in sgrvinod's implementation so
    # the weight is comparable across grid sizes: lambda * mean_p (1 - sum_t alpha_tp)^2.
    reg = attention_reg * tf.reduce_mean(tf.square(1.0 - coverage), axis=-1)  # (B,)
    return tf.reduce_sum(ce * mask), tf.reduce_sum(mask), tf.reduce_sum(reg)
