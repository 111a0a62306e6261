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
- a gate beta_t = sigmoid(f_beta(h_{t-1})) scales the context (Show, Attend and Tell section
  4.2.1, whose gate is one scalar; here one per embedding channel, (B, E), as in sgrvinod's
  implementation), and the attention weights are returned for the doubly stochastic
  regulariser and for the heatmaps;
- the attention score has no bias: a softmax over the positions ignores a shift of every
  score, so such a bias gets a zero gradient and never learns (its float32 and bfloat16
  "gradients" were rounding noise of opposite signs on different CPUs).

Saved models carry `MODEL_FORMAT` in their config; `best.keras` files of an older format are
refused on loading with a message (see `check_model_format`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from caption_attn.backbone import FEATURE_DIM
from caption_attn.decode import keyed_uniform, per_image_context
from caption_attn.recurrence import (StepWeights, additive_attention, attend_and_update,
                                     dense_rows, grouped_attend_and_update,
                                     output_cross_entropy, teacher_forced_recurrence)

# `keyed_uniform`'s salt for the policy's output dropout masks (`keyed_dropout_mask`): any
# constant, so long as the sampler's Gumbel noise (unsalted) is other numbers.
DROPOUT_SALT = 0x5C57

# Version of the saved model's layout. 2: no attention score bias, f_beta without an unused
# activation, no `num_pixels` argument (format 1: models saved before 30 November 2026).
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


class ReplicaDropout(keras.layers.Dropout):
    """Keras' Dropout, with a mask of its own on every replica of a distribution strategy.

    The seed generator's state is one mirrored variable: under `--strategy mirrored` every
    replica drew the same mask (row i of each replica's slice dropped the same units, so two
    replicas trained otherwise than one device). There, the replica's id is folded into the
    step's seed; on one device (or one replica) this is Keras' Dropout, mask for mask.
    """

    def call(self, inputs, training=False):
        ctx = tf.distribute.get_replica_context()
        if not training or self.rate == 0 or ctx is None or ctx.num_replicas_in_sync == 1:
            return super().call(inputs, training=training)
        # as Keras' TensorFlow backend makes its int64 state a stateless op's int32 seed
        seed = tf.cast(tf.math.floormod(self.seed_generator.next(), tf.int32.max - 1),
                       tf.int32)                                       # (2,)
        # folded in, not added: the generator advances by 1 a call, so replica r's seed
        # plus r was replica 0's seed r calls later (shifted copies of one mask sequence)
        seed = tf.random.experimental.stateless_fold_in(
            seed, tf.cast(ctx.replica_id_in_sync_group, tf.int32))
        return tf.nn.experimental.stateless_dropout(inputs, self.rate, seed,
                                                    noise_shape=self.noise_shape)


def parameter_count(vocab_size: int, embedding_dim: int, units: int,
                    feature_dim: int = FEATURE_DIM) -> int:
    """The number of weights of `ShowAttendTell(vocab_size, embedding_dim, units)` (its
    `count_params()`, the feature statistics included), from the sizes alone: `train` checks
    that a model fits in memory before it builds one (tests/test_model.py checks the sum)."""
    V, E, U, F = vocab_size, embedding_dim, units, feature_dim
    return (2 * F + F * E + E                      # feature statistics, encoder
            + E * U + U + U * U + U                # attention: keys, query, score
            + V * E + E * U + U + U * E + E        # embedding, init_h, f_beta
            + 2 * E * 3 * U + U * 3 * U + 6 * U    # GRU: embedding, context, recurrent
            + U * E + E * E + E * V + V)           # deep output: hidden, context, logits


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
        self.out_dropout = ReplicaDropout(dropout, name="out_dropout")
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

    def _output(self, embedded, h, context, training=False, output_mask=None):
        """Deep output layer; works on (B, E) or (B, T, E) alike. `output_mask` (a
        `keyed_dropout_mask`, same shape as x) replaces the layer's own dropout."""
        x = embedded + self.out_hidden(h) + self.out_context(context)  # (..., E)
        x = self._dropout(x, training, output_mask)                  # (..., E)
        return tf.cast(self.logits(x), tf.float32)                   # (..., V)

    def _dropout(self, x, training, output_mask):
        if output_mask is None:
            return self.out_dropout(x, training=training)
        return x * tf.cast(output_mask, x.dtype)

    def keyed_dropout_mask(self, seed, steps, streams):
        """The output dropout's mask of N rows, each drawn from its key (`seed`, steps[n],
        streams[n]) alone (`decode.keyed_uniform`): seed () int, steps (N,) int (the decoding
        step), streams (N,) int (the sample's random stream) -> (N, E) float32 of 0 (rate)
        and 1 / (1 - rate), or None at rate 0. Self-critical training draws its policy's
        masks so: the sampler at each step, the loss pass again for the same sampled
        tokens, without storing them."""
        rate = self.out_dropout.rate                                  # the layer's, as in training
        if rate == 0:
            return None
        u = keyed_uniform(seed, steps, streams, self.embedding_dim, DROPOUT_SALT)  # (N, E)
        return tf.cast(u >= rate, tf.float32) / (1.0 - rate)         # (N, E)

    # ------------------------------------------------------------------ decoding API
    def init_decoder(self, features, image_index=None, fold_standardization=False):
        """features (N, P, F) -> state (h,), context (keys, encoded), one row per caption.

        With `image_index` (B,), features hold each image once and caption b uses row
        image_index[b]: the encoder and the key projection then run once per image.
        `fold_standardization` (decoding: `captioner.make_decoder`) folds the feature
        standardisation into the encoder of a float32 model (`_folded_encoder`).
        """
        # 3-D denses as 2-D matmuls with the bias (and ReLU) fused in: Keras' Dense on 3-D
        # inputs goes through tensordot, and they stay apart
        if fold_standardization and self.encoder.compute_dtype == "float32":
            encoded = self._folded_encoder(features)                 # (N, P, E)
        else:
            encoded = dense_rows(self.encoder, self.feature_norm(features))  # (N, P, E)
        keys = dense_rows(self.attention.key_proj, encoded)           # (N, P, U)
        h = self.init_h(tf.reduce_mean(encoded, axis=1))             # (N, U)
        if image_index is not None:
            encoded, keys, h = (tf.gather(x, image_index) for x in (encoded, keys, h))
        return (h,), (keys, encoded)                                 # (B, U), (B, P, .)

    def _folded_encoder(self, features):
        """The encoder of the standardised features, relu(((x - m) s) W + b), computed as
        relu(x (s W) + (b - (m s) W)): the kernel and bias change once per call instead of
        the (N, P, F) features (a pass of 14 ms over 256 images' features, on 2 cores). The
        same values up to float32 rounding; training keeps the two steps (float32 only:
        x (s W) and (m s) W would cancel digits a bfloat16 matmul does not have)."""
        norm = self.feature_norm
        scale = tf.math.rsqrt(norm.variance + norm.epsilon)           # (F,)
        kernel = self.encoder.kernel * scale[:, None]                 # (F, E)
        bias = self.encoder.bias - tf.linalg.matvec(kernel, norm.mean, transpose_a=True)
        y = tf.matmul(tf.reshape(tf.cast(features, tf.float32), [-1, self.feature_dim]),
                      kernel)                                         # (N * P, E)
        y = self.encoder.activation(tf.nn.bias_add(y, bias))
        return tf.reshape(y, tf.concat([tf.shape(features)[:-1], [self.embedding_dim]], 0))

    def gate_table(self):
        """Every word's embedding share of the GRU gates, (V, 3U) in the compute dtype: row w
        is what a decoding step computes for token w with one (N, E) x (E, 3U) matmul. Given
        to `decode_step(..., gates=)`, its rows are looked up instead: for a decoder whose
        weights do not change (`captioner.make_decoder(..., fixed_weights=True)`, which builds
        it again should they)."""
        return self.gru_embed(self.embedding.embeddings)

    def decode_step(self, tokens, state, context, training=False, gates=None,
                    output_mask=None):
        """tokens (B,) int32 -> logits (B, V) float32, new state, attention (B, P) float32.

        `training` switches the output dropout on; `output_mask` (B, E) (a
        `keyed_dropout_mask`: self-critical sampling) is applied instead of it; `gates` is
        this model's `gate_table()`, or None to compute the rows needed."""
        return self._decode_with(attend_and_update, tokens, state, context, training, gates,
                                 output_mask)

    @per_image_context
    def decode_step_per_image(self, tokens, state, context, training=False, gates=None,
                              output_mask=None):
        """`decode_step` with the context of `init_decoder` held once per image while the
        tokens and state have K rows per image (N = B * K, an image's rows adjacent): beam
        search and `num_samples` then do not tile it (`decode.per_image_context`). The same
        values as `decode_step` on the context tiled K times."""
        return self._decode_with(grouped_attend_and_update, tokens, state, context, training,
                                 gates, output_mask)

    def _decode_with(self, update, tokens, state, context, training, gates, output_mask):
        """One decoding step around `update` (the recurrence's attention and GRU step)."""
        (h,), (keys, encoded) = state, context
        embedded = self.embedding(tokens)                            # (N, E)
        x_gates = (self.gru_embed(embedded) if gates is None
                   else tf.gather(gates, tokens))                    # (N, 3U)
        h, ctx, alpha = update(self.step_weights(), x_gates, h, keys, encoded)[:3]
        return self._output(embedded, h, ctx, training, output_mask), (h,), alpha

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
        x, alphas = self._output_rows(features, image_index, tokens)  # (T * B, E), (T, B, P)
        targets = tf.reshape(tf.transpose(targets), [-1])            # (T * B,)
        mask = tf.cast(tf.not_equal(targets, 0), tf.float32)         # (T * B,)
        if real_tokens_only:
            real = tf.where(mask > 0)[:, 0]                          # (R,)
            x, rows_targets = tf.gather(x, real), tf.gather(targets, real)  # (R, E), (R,)
        else:
            rows_targets = targets
        ce = self._token_cross_entropy(x, rows_targets, training)    # (R,)
        ce_sum = tf.reduce_sum(ce if real_tokens_only else ce * mask)
        mask = tf.reshape(mask, tf.shape(alphas)[:2])                # (T, B)
        coverage = tf.reduce_sum(alphas * mask[..., None], axis=0)   # (B, P)
        reg = attention_reg * tf.reduce_mean(tf.square(1.0 - coverage), axis=-1)  # (B,)
        return ce_sum, tf.reduce_sum(mask), tf.reduce_sum(reg)

    def self_critical_loss(self, features, image_index, tokens, targets, weights,
                           banned=(), training=False, dropout_key=None):
        """The policy-gradient sums of sampled captions, computed as `teacher_forced_loss`
        computes cross-entropy (time-major, the output layer on real tokens only, its
        gradient written out): -weight x log p(token) is the caption's weight times that
        token's cross-entropy.

        features (N, P, F), image_index (B,), decoder inputs tokens (B, T), the sampled
        targets (B, T) (0 = <pad> after <end>), weights (B,) float32 (each caption's
        advantage), `banned` token ids the policy never chooses (probability 0, as in
        sampling) -> (sum of weight x cross-entropy over the real tokens, their number, the
        summed entropy of the policy at them, without gradient).

        With `training` and `dropout_key` (seed () int, streams (B,) int: each caption's
        random stream), the output dropout of caption b at step t is
        `keyed_dropout_mask(seed, t, streams[b])`, the mask the sampler drew it with: the
        log-probabilities are those of the policy that drew the tokens, not of a fresh mask.
        """
        x, _ = self._output_rows(features, image_index, tokens)      # (T * B, E)
        targets = tf.reshape(tf.transpose(targets), [-1])            # (T * B,)
        real = tf.where(tf.not_equal(targets, 0))[:, 0]              # (R,) row t * B + b
        rows = tf.cast(tf.shape(tokens)[0], real.dtype)              # () B
        caption = real % rows                                        # (R,) its b
        mask = None
        if training and dropout_key is not None:
            seed, streams = dropout_key
            mask = self.keyed_dropout_mask(seed, real // rows,
                                           tf.gather(streams, caption))  # (R, E) or None
        ce, entropy = self._token_cross_entropy(
            tf.gather(x, real), tf.gather(targets, real), training, banned, entropy=True,
            output_mask=mask)
        loss_sum = tf.reduce_sum(tf.gather(weights, caption) * ce)
        return (loss_sum, tf.cast(tf.size(real), tf.float32),
                tf.reduce_sum(tf.stop_gradient(entropy)))

    def _output_rows(self, features, image_index, tokens):
        """The teacher-forced decoder, time-major, up to the output layer: decoder inputs
        tokens (B, T) -> the output layer's input of every step and caption (T * B, E), row
        t * B + b, before the dropout, and the attention (T, B, P) float32."""
        (h0,), (keys, encoded) = self.init_decoder(features, image_index)  # (B, .)
        embedded = self.embedding(tf.transpose(tokens))              # (T, B, E)
        x_gates = dense_rows(self.gru_embed, embedded)              # (T, B, 3U)
        hs, contexts, alphas = teacher_forced_recurrence(
            self.step_weights(), x_gates, h0, keys, encoded)         # (T, B, .) each
        x = embedded + self.out_hidden(hs) + self.out_context(contexts)  # (T, B, E)
        return tf.reshape(x, [-1, self.embedding_dim]), alphas

    def _token_cross_entropy(self, x, targets, training, banned=(), entropy=False,
                             output_mask=None):
        """The output dropout (or `output_mask` (R, E)), then `output_cross_entropy` of rows
        x (R, E) with targets (R,); `banned` token ids get -inf logits."""
        dt = self.compute_dtype
        x = tf.cast(self._dropout(x, training, output_mask), dt)     # (its policy: float32)
        bias = tf.cast(self.logits.bias, dt)
        if banned:
            bias = bias + tf.cast(tf.reduce_sum(tf.one_hot(list(banned), self.vocab_size,
                                                           on_value=float("-inf")), 0), dt)
        return output_cross_entropy(x, tf.cast(self.logits.kernel, dt), bias, targets,
                                    entropy)

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
            f"{MODEL_FORMAT} (format 1, of models saved before 30 November 2026, had an "
            f"attention score bias that could not learn and was removed). Resume its run "
            f"with `caption-attn train` (its checkpoints still load) to save a best model in "
            f"the current format")


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
