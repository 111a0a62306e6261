"""The decoder's recurrent step and the training path's hand-written gradients.

`attend_and_update` is one step (Bahdanau attention, gated context, GRU), the same function
for decoding (`ShowAttendTell.decode_step`; `grouped_attend_and_update`, the same values, for
beam search's K sequences per image over the image's context held once) and teacher
forcing. `teacher_forced_recurrence` runs it over all T steps with back-propagation through
time written out: the backward loop carries only what is recurrent, and every weight
gradient is one large matmul over all T * B rows after it. `output_cross_entropy` is the
output layer's cross-entropy with its gradient written out, and `dense_rows` a Dense layer as
one 2-D matmul. The tests check all of them against autodiff of `ShowAttendTell.call`.

Shapes: B batch, T steps, P = 64 feature positions, E embedding size, U units, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import keras
import tensorflow as tf

from caption_attn import fused
from caption_attn.decode import static_dim


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


def _saved_widths(U, E):
    """Widths of StepSaved's (B, .) fields after e, as saved side by side in one (B, 2E + 4U)
    row per step: raw, beta (E each), z, r, hh, candidate (U each)."""
    return [E, E, U, U, U, U]


def _per_step(x) -> tf.TensorArray:
    """x (T, ...) as a TensorArray whose read(t) is x[t]: inside a time loop one op, where
    x[t] is a strided slice and the three small ops that build its bounds. (Each op of a
    time loop costs the executor microseconds whatever its size: the shapes demo's model
    at batch 8 spent 1.0 ms per time step of a training step, nearly all of it that, on a
    2-core Zen 5; 0.7 ms with the loops' ops cut by a quarter.)"""
    return tf.TensorArray(x.dtype, size=tf.shape(x)[0]).unstack(x)


def additive_attention(keys, values, q, score, kernel=None):
    """keys (B, P, U), values (B, P, E), projected query q (B, U), score (U, 1) -> context
    (B, E), weights (B, P) float32, e = tanh(keys + q) (B, P, U). With `kernel` (the fused
    kernel's module, `fused.library`), e and the scores come from it in one pass over the
    keys."""
    units = keys.shape[-1]
    if kernel is not None:
        scores, e = kernel.additive_attention_scores(keys, q, tf.reshape(score, [units]))
    else:
        e = tf.tanh(keys + q[:, None, :])                             # (B, P, U)
        # A 2-D matmul, not a tensordot on (B, P, U), whose gradient inside the time loop
        # needs runtime transpose permutations that XLA (--xla) cannot compile.
        scores = tf.reshape(tf.matmul(tf.reshape(e, [-1, units]), score),
                            [-1, static_dim(keys, 1)])                # (B, P)
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


def _update(w: StepWeights, x_gates, h, q, h_beta, h_gates, keys, encoded, kernel=None):
    """`attend_and_update` from h's three projections: the attention query q (B, U), the
    gate's h_beta (B, E) and the GRU's recurrent share h_gates (B, 3U), biases included;
    `kernel` as `additive_attention`'s."""
    raw, alpha, e = additive_attention(keys, encoded, q, w.score, kernel)  # (B, E), (B, P), .
    h_new, context, (beta, z, r, hh, candidate) = _gru_update(w, x_gates, h, h_beta, h_gates,
                                                              raw)
    return h_new, context, alpha, StepSaved(e, raw, beta, z, r, hh, candidate)


def _gru_update(w: StepWeights, x_gates, h, h_beta, h_gates, raw):
    """The step after the attention, from its attention-weighted features raw (B, E):
    gated context, GRU -> new h (B, U), gated context (B, E) and (beta, z, r, hh,
    candidate), the intermediates `StepSaved` keeps."""
    beta = tf.sigmoid(h_beta)                                        # (B, E)
    context = beta * raw                                             # (B, E)
    xz, xr, xh = tf.split(x_gates + tf.matmul(context, w.gru_context), 3, axis=-1)
    hz, hr, hh = tf.split(h_gates, 3, axis=-1)                       # (B, U) each
    z = tf.sigmoid(xz + hz)                                          # (B, U)
    r = tf.sigmoid(xr + hr)                                          # (B, U)
    candidate = tf.tanh(xh + r * hh)                                 # (B, U)
    h_new = z * h + (1.0 - z) * candidate                            # (B, U)
    return h_new, context, (beta, z, r, hh, candidate)


def teacher_forced_recurrence(w: StepWeights, x_gates, h0, keys, encoded,
                              use_kernel: Optional[bool] = None):
    """`attend_and_update` over all T steps, with back-propagation through time written out.

    x_gates (T, B, 3U), h0 (B, U), keys (B, P, U), encoded (B, P, E) -> hs (T, B, U),
    contexts (T, B, E), alphas (T, B, P) float32.

    The forward pass is the function `decode_step` runs step by step (beam search's
    grouped step computes the same values). The backward pass differs from what autodiff of
    the loop builds: its time loop carries only what is recurrent (dh, the key gradient, the
    score vector's gradient) and one fused matmul through the transposed
    query/gate/recurrent kernels; every weight gradient, the feature gradient and the
    input-gate gradient are then computed after the loop as one large matmul over all T * B
    rows, instead of T small ones accumulated step by step.

    The attention scores and their gradient come from the fused kernel (`fused`), one pass
    over the (B, P, U) tensors each, where it is `fused.usable` (float32 on CPUs, not XLA) or
    `use_kernel` says so; elsewhere from TensorFlow's ops. Both keep the same `StepSaved`.
    """
    use = fused.usable(keys.dtype) if use_kernel is None else use_kernel
    kernel = fused.library() if use else None
    if use and kernel is None:
        raise RuntimeError(fused.unavailable_note())

    @tf.custom_gradient
    def run(x_gates, h0, keys, encoded, *weights):
        w = StepWeights(*weights)
        T = tf.shape(x_gates)[0]
        steps = _per_step(x_gates)
        # Per-step tensors go into TensorArrays; the saved ones are read back by the backward
        # loop one step at a time, never stacked (e alone is T x B x P x U). The saved (B, .)
        # rows go into one TensorArray, side by side (`_saved_widths`).
        outputs = [tf.TensorArray(h0.dtype, size=T), tf.TensorArray(h0.dtype, size=T),
                   tf.TensorArray(tf.float32, size=T)]
        saved = (tf.TensorArray(h0.dtype, size=T), tf.TensorArray(h0.dtype, size=T))

        # h feeds the query, the gate and the recurrent gates: one matmul per step instead
        # of three (the same kernels, concatenated once per batch).
        U, E = h0.shape[-1], encoded.shape[-1]
        h_kernels = tf.concat([w.query, w.beta, w.gru_recurrent], axis=1)  # (U, U+E+3U)
        h_bias = tf.concat([tf.zeros([U], h0.dtype), w.beta_bias, w.gru_bias], 0)

        def body(t, h, outputs, saved):
            q, h_beta, h_gates = tf.split(tf.nn.bias_add(tf.matmul(h, h_kernels), h_bias),
                                          [U, E, 3 * U], axis=-1)   # (B, U), (B, E), (B, 3U)
            h, context, alpha, s = _update(w, steps.read(t), h, q, h_beta, h_gates, keys,
                                           encoded, kernel)
            outputs = [a.write(t, x) for a, x in zip(outputs, (h, context, alpha))]
            return t + 1, h, outputs, (saved[0].write(t, s.e),
                                       saved[1].write(t, tf.concat(s[1:], axis=-1)))

        _, _, outputs, saved = tf.while_loop(lambda t, *_: t < T, body,
                                             (tf.constant(0), h0, outputs, saved))
        hs, contexts, alphas = (a.stack() for a in outputs)          # (T, B, .) each

        def grad(d_hs, d_contexts, d_alphas):
            d_hs, d_contexts, d_alphas = (
                tf.zeros_like(x) if d is None else tf.cast(d, x.dtype)
                for d, x in ((d_hs, hs), (d_contexts, contexts), (d_alphas, alphas)))
            return _recurrence_backward(w, h0, keys, encoded, hs, contexts, alphas, saved,
                                        d_hs, d_contexts, d_alphas, kernel)

        return (hs, contexts, alphas), grad

    return run(x_gates, h0, keys, encoded, *w)


def _recurrence_backward(w, h0, keys, encoded, hs, contexts, alphas, saved, d_hs,
                         d_contexts, d_alphas, kernel=None):
    """Gradients of `teacher_forced_recurrence` w.r.t. x_gates, h0, keys, encoded and the
    `StepWeights`, in that order; `kernel` as there."""
    dt, U, E = h0.dtype, h0.shape[-1], encoded.shape[-1]
    T = tf.shape(hs)[0]
    # dh flows back through the query, the gate and the recurrent kernels in one matmul.
    # The kernels are transposed once here: oneDNN's matmul with transpose_b took 1.5-1.7x
    # as long for these 64-row products.
    h_kernels_t = tf.transpose(tf.concat([w.query, w.beta, w.gru_recurrent], axis=1))
    gru_context_t = tf.transpose(w.gru_context)                       # (3U, E)
    score_row = tf.reshape(tf.cast(w.score, tf.float32), [1, U])      # (1, U)
    h_prev = tf.concat([h0[None], hs[:-1]], axis=0)                   # (T, B, U)
    # What each step reads of the (T, B, .) tensors, one TensorArray read per dtype
    by_step = _per_step(tf.concat([d_hs, h_prev, d_contexts], axis=-1))     # (B, 2U + E)
    by_step_f32 = _per_step(tf.concat([alphas, d_alphas], axis=-1))        # (B, 2P)
    P = static_dim(keys, 1)
    e_saved, rows_saved = saved

    score_vector = tf.reshape(w.score, [U]) if kernel is not None else None

    def body(t, dh, d_keys, d_score, d_xs, d_hs_all, d_raws):
        s = StepSaved(e_saved.read(t), *tf.split(rows_saved.read(t), _saved_widths(U, E), -1))
        d_h, h_before, d_context = tf.split(by_step.read(t), [U, U, E], axis=-1)
        alpha, d_alpha_out = tf.split(by_step_f32.read(t), 2, axis=-1)  # (B, P) float32
        dh = dh + d_h                                                 # (B, U)
        # GRU: h' = z h + (1 - z) c,  c = tanh(xh + r hh), z = sigmoid(.), r = sigmoid(.)
        d_cand = tf.raw_ops.TanhGrad(y=s.candidate, dy=dh * (1.0 - s.z))
        d_z = tf.raw_ops.SigmoidGrad(y=s.z, dy=dh * (h_before - s.candidate))
        d_r = tf.raw_ops.SigmoidGrad(y=s.r, dy=d_cand * s.hh)
        d_x = tf.concat([d_z, d_r, d_cand], axis=-1)                  # (B, 3U) input gates
        # context = beta * raw feeds the GRU's input gates
        d_ctx = tf.matmul(d_x, gru_context_t) + d_context             # (B, E)
        d_beta = tf.raw_ops.SigmoidGrad(y=s.beta, dy=d_ctx * s.raw)   # (B, E)
        d_raw = d_ctx * s.beta                                        # (B, E)
        # attention: raw = sum_p alpha_p encoded_p, alpha = softmax_p(e_p w)
        d_alpha = tf.cast(tf.einsum("be,bpe->bp", d_raw, encoded), tf.float32) + d_alpha_out
        ds = alpha * (d_alpha - tf.reduce_sum(alpha * d_alpha, axis=-1, keepdims=True))
        # The attention's gradients in float32 under mixed precision too: the key and score
        # gradients are sums over all T steps, which bfloat16 (8 bits of mantissa) cannot
        # hold (300 equal steps summed to about 256 of them). (Saving e in float32 as well
        # made a CPU's bfloat16 step 5-8 % faster, but doubled the largest saved tensor.)
        if kernel is not None:   # float32 throughout; d_keys updated in place
            d_keys, d_q, d_w = kernel.additive_attention_scores_grad(
                s.e, score_vector, ds, d_keys)                       # (B, P, U), (B, U), (U,)
            d_score = d_score + tf.reshape(d_w, [1, U])               # (1, U)
        else:
            e = tf.cast(s.e, tf.float32)                              # (B, P, U)
            # ds_bp w_u as a K=1 matmul: a broadcasting multiply took twice as long
            d_e = tf.raw_ops.TanhGrad(y=e, dy=tf.reshape(
                tf.matmul(tf.reshape(ds, [-1, 1]), score_row), [-1, P, U]))  # (B, P, U)
            d_score = d_score + tf.matmul(tf.reshape(ds, [1, -1]),
                                          tf.reshape(e, [-1, U]))     # (1, U)
            d_q = tf.cast(tf.reduce_sum(d_e, axis=1), dt)             # (B, U)
            d_keys = d_keys + d_e
        # h feeds the query, the gate and the recurrent gates: one matmul back through all
        d_h_all = tf.concat([d_q, d_beta, d_z, d_r, d_cand * s.r], axis=-1)  # (B, U+E+3U)
        dh = dh * s.z + tf.matmul(d_h_all, h_kernels_t)              # (B, U)
        return (t - 1, dh, d_keys, d_score, d_xs.write(t, d_x),
                d_hs_all.write(t, d_h_all), d_raws.write(t, d_raw))

    arrays = [tf.TensorArray(dt, size=T) for _ in range(3)]
    _, dh0, d_keys, d_score, *arrays = tf.while_loop(
        lambda t, *_: t >= 0, body,
        (T - 1, tf.zeros_like(h0), tf.zeros(tf.shape(keys), tf.float32),
         tf.zeros([1, U], tf.float32), *arrays))
    d_keys, d_score = tf.cast(d_keys, keys.dtype), tf.cast(d_score, dt)
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


def dense_rows(layer: keras.layers.Dense, x):
    """`layer(x)` for x (..., D) as one 2-D matmul, so that oneDNN fuses the bias and the
    activation into it (Keras' Dense on 3-D inputs runs tensordot, then separate ops)."""
    dt = layer.compute_dtype
    y = tf.matmul(tf.reshape(tf.cast(x, dt), [-1, x.shape[-1]]),
                  tf.cast(layer.kernel, dt))                          # (rows, units)
    if layer.use_bias:
        y = tf.nn.bias_add(y, tf.cast(layer.bias, dt))
    y = layer.activation(y)
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [layer.units]], 0))  # (..., units)


def output_cross_entropy(x, kernel, bias, targets, entropy: bool = False):
    """Cross-entropy of the output layer, with its gradient written out.

    x (R, E), kernel (E, V), bias (V,) in the compute dtype, targets (R,) int -> ce (R,)
    float32 = logsumexp(l) - l[target] of the logits l = x kernel + bias. Equals
    `tf.nn.sparse_softmax_cross_entropy_with_logits` on those logits, but the (R, V) softmax
    comes from oneDNN's multi-threaded softmax (TensorFlow's cross-entropy kernel took 15 ms
    of a 220 ms step for 830 x 5001 logits on 2 cores) and is kept for the backward pass,
    whose d_logits = (softmax - onehot) * d_ce goes straight into the two matmuls.

    A -inf in `bias` bans that token (self-critical training bans <pad> and <start>): its
    probability is 0 and it gets no gradient; no target may be banned. With `entropy`, the
    result is (ce, entropy (R,) float32): the entropy of each row's distribution, for the
    logs (no gradient flows from it).
    """
    @tf.custom_gradient
    def run(x, kernel, bias):
        logits = tf.cast(tf.nn.bias_add(tf.matmul(x, kernel), bias), tf.float32)  # (R, V)
        probs = tf.nn.softmax(logits)                                 # (R, V)
        # logsumexp = max l - log(max p): the largest probability is >= 1/V, so its log is
        # exact where a p[target] near 0 would not be.
        lse = tf.reduce_max(logits, -1) - tf.math.log(tf.reduce_max(probs, -1))  # (R,)
        ce = lse - tf.gather(logits, targets, batch_dims=1)          # (R,)

        def grad(d_ce, *_):                                          # (R,); entropy's: none
            if d_ce is None:
                d_ce = tf.zeros_like(ce)
            rows = tf.stack([tf.range(tf.shape(targets)[0], dtype=targets.dtype), targets], 1)
            d_logits = tf.tensor_scatter_nd_sub(probs * d_ce[:, None], rows, d_ce)  # (R, V)
            d_logits = tf.cast(d_logits, x.dtype)
            # on the kernel transposed first: a transpose_b matmul is ~20% slower here, and
            # an einsum, unlike tf.transpose, is not folded back into one by Grappler
            return (tf.matmul(d_logits, tf.einsum("ev->ve", kernel)),  # (R, E)
                    tf.matmul(x, d_logits, transpose_a=True),         # (E, V)
                    tf.reduce_sum(d_logits, axis=0))                  # (V,)
        if not entropy:
            return ce, grad
        # -sum p log p = lse - sum p l; a banned token's p l is 0 * -inf, taken as 0
        return (ce, lse - tf.reduce_sum(tf.math.multiply_no_nan(logits, probs), -1)), grad

    return run(x, kernel, bias)


# ----------------------------------------------------------------------------- decoding only

def grouped_attend_and_update(w: StepWeights, x_gates, h, keys, encoded):
    """`attend_and_update` for K sequences per image over the image's context held once
    (beam search's K beams, `num_samples` samples), for decoding only (no gradient written
    out, no `StepSaved`).

    x_gates (N, 3U), h (N, U) with N = B * K, sequence n belonging to image n // K (an
    image's K sequences adjacent); keys (B, P, U), encoded (B, P, E) -> new h (N, U), gated
    context (N, E), attention (N, P) float32. Tiling the context K times first and calling
    `attend_and_update` gives the same values; this reads the keys and features once per
    image instead of K times (beam-3's keys alone were 100 MB per step at 256 images).
    """
    raw, alpha = grouped_additive_attention(keys, encoded, tf.matmul(h, w.query),
                                            w.score)                 # (N, E), (N, P)
    h, context, _ = _gru_update(w, x_gates, h, tf.matmul(h, w.beta) + w.beta_bias,   # (N, E)
                                tf.matmul(h, w.gru_recurrent) + w.gru_bias, raw)  # (N, 3U)
    return h, context, alpha


def grouped_additive_attention(keys, values, q, score):
    """`additive_attention` of K queries per image: keys (B, P, U), values (B, P, E),
    projected queries q (N, U) with N = B * K (query n asks image n // K), score (U, 1) ->
    context (N, E), weights (N, P) float32."""
    units, dim = keys.shape[-1], values.shape[-1]
    q = tf.reshape(q, [tf.shape(keys)[0], -1, units])                # (B, K, U)
    e = tf.tanh(keys[:, None, :, :] + q[:, :, None, :])              # (B, K, P, U)
    scores = tf.reshape(tf.matmul(tf.reshape(e, [-1, units]), score),
                        tf.shape(e)[:3])                             # (B, K, P)
    weights = tf.nn.softmax(tf.cast(scores, tf.float32), axis=-1)    # (B, K, P) float32
    context = tf.matmul(tf.cast(weights, values.dtype), values)      # (B, K, E)
    pixels = static_dim(keys, 1)
    return tf.reshape(context, [-1, dim]), tf.reshape(weights, [-1, pixels])  # (N, E), (N, P)
