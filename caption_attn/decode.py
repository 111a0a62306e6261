"""Greedy, beam-search and sampling decoders driven by a step function.

Decoding knows nothing about the model: every decoder takes a step function

    step_fn(tokens, state, context) -> (logits, new_state, attention)
        tokens:    (N,) int32, the previous token of each sequence (`start_id` at step 0)
        state:     nested tensors with leading dim N (e.g. the GRU hidden state (N, units))
        context:   nested tensors with leading dim N, constant over steps (e.g. encoded
                   features (N, P, emb)); beam search and `num_samples` tile it once.
                   A step function marked with `per_image_context` takes it untiled
                   instead, one row per image (B, ...): sequence n is image n // K's.
        logits:    (N, V) next-token logits
        new_state: same structure and shapes as `state`
        attention: (N, P) attention weights of this step over the P pixels

and loops with `tf.while_loop`, batched over images (N = B * K sequences), stopping early
once every sequence has produced `end_id`. The decoders work eagerly and inside a caller's
`tf.function` (an `input_signature` with a `None` batch dim traces once for every batch
size). `max_length`, `beam_size`, `top_k`, `num_samples` and `temperature` are Python
numbers: they fix the graph.

After `end_id` a sequence is finished: it emits `PAD` with log-probability 0 and zero
attention, so its log-probability and score stay frozen.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import tensorflow as tf

from caption_attn.vocab import END, PAD, START

StepFn = Callable[[tf.Tensor, Any, Any], tuple]
NEG_INF = float("-inf")


class DecodeResult(NamedTuple):
    """`K` captions per image, best first (highest `scores`).

    tokens:          (B, K, T) int32, generated ids without the start token, up to and
                     including `end_id`, `PAD` after; T <= max_length is the longest one
    log_probs:       (B, K) float32, sum of the token log-probabilities including `end_id`
                     (exp() is the caption's probability under the model)
    scores:          (B, K) float32, the ranking score: `log_probs`, divided by the length
                     penalty in beam search
    token_log_probs: (B, K, T) float32, 0 after `end_id`
    attention:       (B, K, T, P) float32, the attention of the step that produced each token
    lengths:         (B, K) int32, tokens including `end_id` (max_length if it never came)

    Beam search with `beam_size` above the number of distinct sequences returns "dead" beams:
    `log_probs` and `scores` -inf, all-`PAD` tokens, zero attention, `lengths` 0.
    """

    tokens: tf.Tensor
    log_probs: tf.Tensor
    scores: tf.Tensor
    token_log_probs: tf.Tensor
    attention: tf.Tensor
    lengths: tf.Tensor


class _Beams(NamedTuple):
    """While-loop state over N sequences; the history buffers hold L = max_length steps."""

    step: tf.Tensor             # () int32, steps taken so far
    last: tf.Tensor             # (N,) int32, the token fed to the next step
    state: Any                  # nested, leading dim N
    log_probs: tf.Tensor        # (N,) float32
    lengths: tf.Tensor          # (N,) int32
    finished: tf.Tensor         # (N,) bool
    tokens: tf.Tensor           # (N, L) int32
    token_log_probs: tf.Tensor  # (N, L) float32
    attention: tf.Tensor        # (N, L, P) float32


# Per-sequence fields that beam search reorders by parent beam (`state` and `last` are
# replaced by the step's output instead).
_HISTORY = ("log_probs", "lengths", "finished", "tokens", "token_log_probs", "attention")


# ----------------------------------------------------------------------------- public API

def greedy(step_fn: StepFn, state, context, max_length: int, start_id: int = START,
           end_id: int = END) -> DecodeResult:
    """The most probable next token at every step (ties: the lower id). K = 1."""
    max_length = _check_int("max_length", max_length, 1)
    log_probs = tf.zeros([_batch_size(state, context)])  # (B,)
    beams = _run(step_fn, state, context, log_probs, max_length, start_id,
                 _greedy_advance(end_id))
    return _finalize(beams, 1)


def beam_search(step_fn: StepFn, state, context, beam_size: int, max_length: int,
                length_penalty: float = 0.0, start_id: int = START,
                end_id: int = END, chunked_top_k: bool = False) -> DecodeResult:
    """The `beam_size` best sequences per image found by beam search. K = beam_size.

    Each step expands every beam by every token and keeps the `beam_size` best candidates
    per image, ranked by log-probability divided by the GNMT length penalty
    ((5 + length) / 6) ** length_penalty (Wu et al. 2016; 0 ranks by plain log-probability).
    Finished beams stay in the beam with a frozen score and compete with live ones; the
    search stops when every beam has finished. Ties go to the lower beam, then the lower id,
    so `beam_size=1` is `greedy`.

    `chunked_top_k` finds each beam's best candidates through the best of each 64-id chunk
    of the vocabulary where it holds at least 4 chunks per beam (`_best_continuations`; else
    by a top_k over whole rows): the same choice, faster on a CPU where the decoder is
    XLA-compiled (whose top_k over whole rows is slow), faster or the same uncompiled; not
    measured on a GPU.
    """
    beam_size = _check_int("beam_size", beam_size, 1)
    max_length = _check_int("max_length", max_length, 1)
    batch = _batch_size(state, context)
    # Only beam 0 is alive at first, so the first step does not pick the same token K times.
    first = tf.constant([0.0] + [NEG_INF] * (beam_size - 1))  # (K,)
    log_probs = tf.reshape(tf.tile(first[None, :], [batch, 1]), [-1])  # (B*K,)
    state, context = _tile_for(step_fn, state, context, beam_size)  # (B*K, ...), ...
    beams = _run(step_fn, state, context, log_probs, max_length, start_id,
                 _beam_advance(beam_size, length_penalty, end_id, chunked_top_k))
    return _finalize(beams, beam_size, length_penalty)


def sample(step_fn: StepFn, state, context, max_length: int, temperature: float = 1.0,
           top_k: int = 0, seed: int = 0, num_samples: int = 1, start_id: int = START,
           end_id: int = END, ids=None, sort: bool = True) -> DecodeResult:
    """Random captions: each token drawn from softmax(logits / temperature), restricted to
    the `top_k` most likely tokens (0 = all; ties with the k-th are kept). K = num_samples.

    Stateless random ops seeded by `seed` (an int or an int tensor, so a caller's
    `tf.function` can vary it without retracing) make the draw reproducible for the same
    batch. With `ids` ((B,) ints, e.g. each image's index in the whole dataset), each image
    draws from its own stream of (`seed`, id) instead of the stream of its row, so its
    samples do not depend on the batch it is decoded in (its size, the other images).
    `log_probs` are under the model (temperature 1, full vocabulary), not under the
    sampling distribution; samples are sorted by them, or with `sort=False` left in stream
    order: sample k of image b is sequence b * K + k, the one that drew from stream
    `sample_streams(ids, K)[b * K + k]` (self-critical training keys its dropout by it).
    """
    max_length = _check_int("max_length", max_length, 1)
    top_k = _check_int("top_k", top_k, 0)
    num_samples = _check_int("num_samples", num_samples, 1)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not temperature > 0:
        raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
    log_probs = tf.zeros([_batch_size(state, context) * num_samples])  # (B*K,)
    state, context = _tile_for(step_fn, state, context, num_samples)  # (B*K, ...), ...
    seed = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])  # (2,)
    streams = None if ids is None else sample_streams(ids, num_samples)  # (B*K,)
    beams = _run(step_fn, state, context, log_probs, max_length, start_id,
                 _sample_advance(float(temperature), top_k, seed, end_id, streams))
    return _finalize(beams, num_samples, sort=sort)


def sample_streams(ids, num_samples: int):
    """The random stream of each sequence `sample(..., ids=ids)` draws: ids (B,) ints ->
    (B*K,) int64, id * K + k for sample k of each image, an image's K adjacent."""
    return tf.reshape(tf.cast(ids, tf.int64)[:, None] * num_samples
                      + tf.range(num_samples, dtype=tf.int64)[None, :], [-1])   # (B*K,)


def keyed_uniform(seed, steps, streams, width: int, salt: int):
    """(N, width) uniform numbers in (0, 1), row n a hash of (`salt`, `seed`, `steps[n]`,
    `streams[n]`, column): the same numbers wherever and in whatever batch they are computed
    (with and without XLA), from what identifies them alone. seed () int, steps and streams
    (N,) ints. `salt` tells one use of a (seed, step, stream) from another: the sampler's
    Gumbel noise is the unsalted hash (`_hashed_uniform`), so any salt here draws other
    numbers than the ones that chose the tokens."""
    return _hashed_uniform(seed, tf.reshape(steps, [-1, 1]), streams, width, salt=salt)


_METHODS = {"greedy": greedy, "beam": beam_search, "sample": sample}


def decode(step_fn: StepFn, state, context, method: str = "greedy", **kwargs) -> DecodeResult:
    """`greedy`, `beam_search` or `sample` by name ("greedy", "beam", "sample"); `kwargs` go
    to that decoder."""
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {sorted(_METHODS)}, got {method!r}")
    return _METHODS[method](step_fn, state, context, **kwargs)


def per_image_context(step_fn):
    """Mark `step_fn` (a function, or a method in its class body) as taking the context with
    one row per image, (B, ...), while tokens and state have N = B * K rows, an image's K
    sequences adjacent: beam search and `num_samples` then do not tile the context K times
    (they still tile the state). The step must give the same result as on the tiled context.
    Unmarked step functions (or wrappers that drop the mark) get the tiled context."""
    step_fn.per_image_context = True
    return step_fn


def takes_per_image_context(step_fn) -> bool:
    return getattr(step_fn, "per_image_context", False) is True


# ----------------------------------------------------------------------------- the loop

def in_slices(run: Callable[[Any, Any], DecodeResult], state, context,
              slices: int) -> DecodeResult:
    """`run(state, context)` (a decoding loop over a batch: the `DecodeResult` of `decode`)
    on `slices` equal slices of the batch, merged into the batch's result. The slices' loops
    do not depend on each other, so TensorFlow runs them side by side: XLA's compiled CPU
    loop keeps about one core busy, and 2 slices decoded 256 images 1.12x (greedy) and 1.18x
    (beam-3) as fast as one loop on 2 cores (Intel Xeon with AMX; see the README's Speed).

    Every image is decoded on its own, so the values are the whole batch's loop's. The last
    slice is padded to the others' size with copies of the batch's first image (one shape:
    one XLA compile), which are dropped again; a slice that stopped after fewer steps gets
    its histories padded as a finished sequence's are (PAD, log-probability 0, zero
    attention)."""
    if slices == 1:
        return run(state, context)
    n = _batch_size(state, context)
    size = -(-n // slices)                                            # ceil(n / slices)
    pad = size * slices - n

    def padded(x):
        return tf.concat([x, tf.repeat(x[:1], pad, axis=0)], axis=0)  # (size * slices, ...)
    state, context = tf.nest.map_structure(padded, (state, context))
    results = [run(*tf.nest.map_structure(lambda x: x[i * size:(i + 1) * size],
                                          (state, context)))
               for i in range(slices)]
    steps = tf.reduce_max([tf.shape(r.tokens)[2] for r in results])   # the longest slice's T

    def merged(field, fill):
        parts = []
        for r in results:
            x = getattr(r, field)                           # (size, K) or (size, K, T, ...)
            if x.shape.rank >= 3:                                     # a history over steps
                widths = [[0, 0], [0, 0], [0, steps - tf.shape(x)[2]]] + \
                    [[0, 0]] * (x.shape.rank - 3)
                x = tf.pad(x, widths, constant_values=fill)
            parts.append(x)
        return tf.concat(parts, axis=0)[:n]
    return DecodeResult(**{field: merged(field, PAD if field == "tokens" else 0)
                           for field in DecodeResult._fields})


def _run(step_fn, state, context, log_probs, max_length, start_id, advance) -> _Beams:
    """Step all N sequences until each has produced END or `max_length` tokens.

    `advance(beams, logits, new_state, attention)` chooses the next token of each sequence
    and appends it. The first step runs before the loop: its output fixes P and the state's
    dtypes and shapes for the loop variables.
    """
    n = tf.shape(log_probs)[0]
    start = tf.fill([n], tf.constant(start_id, tf.int32))  # (N,)
    logits, state, attention = step_fn(start, state, context)  # (N, V), ..., (N, P)
    empty = _empty(state, log_probs, max_length, static_dim(attention, 1))
    beams = advance(empty, logits, state, attention)
    if max_length == 1:
        # No loop: compiled with XLA, a loop whose condition is false from the start made
        # the process abort (a failed check on the trimmed history's dynamic shape in
        # TensorFlow 2.21): `evaluate --max-length 1` on 32 images.
        return beams

    def cond(beams):
        return (beams.step < max_length) & ~tf.reduce_all(beams.finished)

    def body(beams):
        logits, state, attention = step_fn(beams.last, beams.state, context)
        return [advance(beams, logits, state, attention)]

    # Gathers and reshapes lose the static batch dim, so only dim 0 is left free.
    invariants = tf.nest.map_structure(
        lambda x: tf.TensorShape([None]).concatenate(x.shape[1:]) if x.shape.rank else x.shape,
        beams)
    (beams,) = tf.while_loop(cond, body, [beams], shape_invariants=[invariants])
    return beams


def _empty(state, log_probs, max_length, num_pixels) -> _Beams:
    """Loop state before the first token: empty history buffers of `max_length` steps."""
    n = tf.shape(log_probs)[0]
    return _Beams(
        step=tf.constant(0),
        last=tf.zeros([n], tf.int32),                                 # (N,)
        state=state,
        log_probs=log_probs,                                          # (N,)
        lengths=tf.zeros([n], tf.int32),                              # (N,)
        finished=tf.zeros([n], tf.bool),                              # (N,)
        tokens=tf.fill([n, max_length], tf.constant(PAD, tf.int32)),  # (N, L)
        token_log_probs=tf.zeros([n, max_length]),                    # (N, L)
        attention=tf.zeros([n, max_length, num_pixels]),              # (N, L, P)
    )


def _append(beams: _Beams, token, token_log_prob, state, attention, end_id) -> _Beams:
    """Write each sequence's chosen `token` (N,) at position `beams.step`.

    `token_log_prob` (N,) is already 0 for finished sequences (or -inf for a beam search
    candidate that continues a finished beam with anything but PAD); `attention` (N, P) is
    this step's. Finished sequences get PAD and zero attention.
    """
    done = beams.finished                                                 # (N,)
    token = tf.where(done, PAD, token)                                    # (N,)
    attention = tf.where(done[:, None], 0.0, tf.cast(attention, tf.float32))  # (N, P)
    log_probs = beams.log_probs + token_log_prob                          # (N,)
    at = tf.equal(tf.range(beams.tokens.shape[1]), beams.step)            # (L,)
    return _Beams(
        step=beams.step + 1,
        last=token,
        state=state,
        log_probs=log_probs,
        lengths=beams.lengths + tf.cast(~done, tf.int32),                 # (N,)
        # -inf: a dead beam (fewer distinct candidates than beams); it must not keep the
        # loop running.
        finished=done | tf.equal(token, end_id) | tf.equal(log_probs, NEG_INF),
        tokens=tf.where(at[None, :], token[:, None], beams.tokens),       # (N, L)
        token_log_probs=tf.where(at[None, :], token_log_prob[:, None],
                                 beams.token_log_probs),                  # (N, L)
        attention=tf.where(at[None, :, None], attention[:, None, :],
                           beams.attention),                              # (N, L, P)
    )


def _finalize(beams: _Beams, k: int, length_penalty: float = 0.0,
              sort: bool = True) -> DecodeResult:
    """Trim the history to the steps taken, reshape (N, ...) -> (B, K, ...), sort best first
    (unless not `sort`)."""
    t = beams.step
    dead = tf.equal(beams.log_probs, NEG_INF)                                     # (N,)
    result = DecodeResult(
        tokens=tf.where(dead[:, None], PAD, beams.tokens[:, :t]),                 # (N, T)
        log_probs=beams.log_probs,                                                # (N,)
        scores=beams.log_probs / _length_penalty(beams.lengths, length_penalty),  # (N,)
        token_log_probs=tf.where(dead[:, None], 0.0, beams.token_log_probs[:, :t]),  # (N, T)
        attention=tf.where(dead[:, None, None], 0.0, beams.attention[:, :t]),     # (N, T, P)
        lengths=tf.where(dead, 0, beams.lengths),                                 # (N,)
    )
    result = tf.nest.map_structure(lambda x: _split_batch(x, k), result)         # (B, K, ...)
    if not sort:
        return result
    order = tf.argsort(result.scores, axis=1, direction="DESCENDING", stable=True)  # (B, K)
    return tf.nest.map_structure(lambda x: tf.gather(x, order, batch_dims=1), result)


# ----------------------------------------------------------------------------- choosing tokens

def _greedy_advance(end_id):
    def advance(beams, logits, state, attention):
        logits = tf.cast(logits, tf.float32)                              # (N, V)
        # Two reductions of the logits, without an (N, V) log-softmax or top_k (top_k with
        # k=1 took 1.4 ms a step for 256 x 5001 logits under XLA, and XLA wrote the whole
        # log-softmax out to gather one value a row from it).
        top = tf.reduce_max(logits, axis=1, keepdims=True)                # (N, 1)
        ids = tf.range(tf.shape(logits)[1])[None, :]                      # (1, V)
        # (a row with NaN has no maximum: its token is the last id, as arbitrary as before)
        token = tf.reduce_min(tf.where(tf.equal(logits, top), ids, tf.shape(logits)[1] - 1),
                              axis=1)                                     # (N,) ties: lower id
        # its log_softmax (x - max) - log(sum(exp(x - max))) with x = max (tf.nn.log_softmax
        # may differ in the last bit)
        token_log_prob = -tf.math.log(tf.reduce_sum(tf.exp(logits - top), axis=1))  # (N,)
        token_log_prob = tf.where(beams.finished, 0.0, token_log_prob)    # (N,)
        return _append(beams, token, token_log_prob, state, attention, end_id)
    return advance


def _sample_advance(temperature, top_k, seed, end_id, streams=None):
    def advance(beams, logits, state, attention):
        logits = tf.cast(logits, tf.float32)                              # (N, V)
        # the row's largest logit first: divided by a small temperature, logits overflowed
        # to +-inf, and the lowest id among the +inf ones (<end>), or <pad>, was drawn
        top = tf.reduce_max(logits, axis=1, keepdims=True)                # (N, 1)
        sampling_logits = _keep_top_k((logits - top) / temperature, top_k)  # (N, V)
        step_seed = tf.random.experimental.stateless_fold_in(seed, beams.step)  # (2,)
        if streams is None:   # row n draws the n-th numbers of the step's stream
            token = tf.random.stateless_categorical(
                sampling_logits, 1, step_seed, dtype=tf.int32)[:, 0]      # (N,)
        else:                 # row n draws from its own stream (Gumbel-max: exact sampling)
            token = tf.argmax(sampling_logits + _gumbel_noise(
                seed[0], beams.step, streams, tf.shape(logits)[1]), axis=1,
                output_type=tf.int32)                                     # (N,)
        step_log_probs = tf.nn.log_softmax(logits)                        # (N, V)
        token_log_prob = _own_log_prob(step_log_probs, token, beams.finished)  # (N,)
        return _append(beams, token, token_log_prob, state, attention, end_id)
    return advance


def _gumbel_noise(seed, step, streams, vocab_size):
    """(N, V) Gumbel(0, 1) noise; row n is stream `streams[n]` of `seed` at `step`."""
    uniform = _hashed_uniform(seed, step, streams, vocab_size)          # (N, V)
    return -tf.math.log(-tf.math.log(uniform))                          # (N, V)


def _hashed_uniform(seed, step, streams, vocab_size, salt=None):
    """(N, V) uniform numbers in (0, 1), each a hash of (seed, step, streams[n], column),
    begun with `salt` when one is given (`keyed_uniform`). `step` () or (N, 1).

    Integer ops in uint32 give the same bits with and without XLA; TensorFlow's stateless
    random ops do not (XLA draws other numbers, even with alg="philox"), so `--sample --xla`
    drew other captions than the same --seed without it. (XLA's log may still differ in the
    last bit: like the logits it rounds, that decides only exact near-ties.)

    The column comes last, hashed itself, into the hash of (seed, step, stream): begun with
    it, a row was one fixed bijection of (column XOR a hash of its stream), and two streams
    whose hashes agree above the column bits (1 pair in 2**18 at 10,000 words) drew the same
    noise permuted (column j of one, column j XOR d of the other) at every step.
    """
    h = tf.zeros([1, 1], tf.uint32)                                     # (1, 1)
    columns = tf.cast(tf.range(vocab_size), tf.uint32)[None, :]         # (1, V)
    salted = () if salt is None else (tf.constant(salt, tf.uint32),)    # ()
    for word in (*salted, *_uint32_words(seed), *_uint32_words(step),   # (), () or (N, 1)
                 *_uint32_words(streams[:, None]), columns):            # (N, 1), (1, V)
        h = _fmix32(tf.bitwise.bitwise_xor(h, _fmix32(word + _GOLDEN)))  # (N, V) at the end
    h = _fmix32(h + _GOLDEN)   # a second round after the column: adjacent columns decorrelate
    odd = tf.bitwise.left_shift(tf.bitwise.right_shift(h, 9), 1) + 1    # (N, V) < 2**24
    return tf.cast(odd, tf.float32) * 2.0 ** -24                        # (N, V) exact


_GOLDEN = 0x9E3779B9   # 2**32 / golden ratio: no word hashes as 0


def _uint32_words(x):
    """Low and high uint32 halves of int tensor `x` (as int64), same shape."""
    x = tf.cast(x, tf.int64)
    mask = tf.constant(0xFFFFFFFF, tf.int64)
    return (tf.cast(tf.bitwise.bitwise_and(x, mask), tf.uint32),
            tf.cast(tf.bitwise.bitwise_and(tf.bitwise.right_shift(x, 32), mask), tf.uint32))


def _fmix32(h):
    """MurmurHash3's finalizer: a bijection of uint32 in which every input bit flips about
    half of the output bits (uint32 products wrap, with and without XLA)."""
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, shift)) \
            * tf.constant(multiplier, tf.uint32)
    return tf.bitwise.bitwise_xor(h, tf.bitwise.right_shift(h, 16))


def _beam_advance(beam_size, length_penalty, end_id, chunked_top_k=False):
    def advance(beams, logits, state, attention):
        logits = tf.cast(logits, tf.float32)                              # (N, V)
        # In two stages, without the (B, K*V) top_k: an image's `beam_size` best candidates
        # are among the `beam_size` best of each of its beams (ties: the lower id, as
        # below), and these are computed and rounded as in one stage, so they tie the same.
        v = static_dim(logits, 1)
        k = min(beam_size, v) if isinstance(v, int) else tf.minimum(beam_size, v)
        alive = ~beams.finished                                           # (N,)
        lengths = beams.lengths + tf.cast(alive, tf.int32)                # (N,)
        penalty = _length_penalty(lengths, length_penalty)[:, None]       # (N, 1)
        row_scores, ids, step = _best_continuations(logits, beams.log_probs, penalty, k,
                                                    chunked_top_k)        # (N, k) each
        # A finished beam has one continuation, PAD for free, so its score stays frozen.
        first = tf.range(k) == 0                                          # (k,)
        frozen = tf.where(first, 0.0, NEG_INF)                            # (k,)
        step = tf.where(alive[:, None], step, frozen[None, :])            # (N, k)
        row_scores = tf.where(alive[:, None], row_scores,
                              (beams.log_probs[:, None] + frozen) / penalty)  # (N, k)
        ids = tf.where(alive[:, None], ids, PAD)                          # (N, k)
        scores = tf.reshape(row_scores, [-1, beam_size * k])              # (B, K*k)
        # top_k is sorted and puts equal values in index order: lower beam, then lower id
        # (a beam's candidates are in id order among equal logits).
        best = tf.math.top_k(scores, beam_size).indices                   # (B, K)
        first_beam = tf.range(tf.shape(best)[0])[:, None] * beam_size     # (B, 1)
        parent = tf.reshape(first_beam + best // k, [-1])                # (N,)
        token, token_log_prob = (
            tf.reshape(tf.gather(tf.reshape(x, [-1, beam_size * k]), best, batch_dims=1), [-1])
            for x in (ids, step))                                         # (N,) each
        beams = beams._replace(**{f: tf.gather(getattr(beams, f), parent) for f in _HISTORY})
        state = tf.nest.map_structure(lambda x: tf.gather(x, parent), state)
        return _append(beams, token, token_log_prob, state, tf.gather(attention, parent),
                       end_id)
    return advance


# `_best_continuations` in chunks of this many ids, where a row holds at least 4 chunks per
# candidate (a choice: only k 3 was measured. XLA-compiled on 2 cores of a Zen 5, 768 rows x
# 5001 ids, k 3: 3.4-3.6 ms against 6.3-6.6 ms for top_k over whole rows; chunks of 128 and
# 256 ids 3.6-3.7 and 4.0 ms, rows padded to whole chunks 4.7-5.6 ms; uncompiled, beam-3 at
# 256 images 1.06-1.07x as fast, one image the same within noise. On an Intel Xeon with AMX,
# beam-3 at 256 images 1.055x compiled and 1.06x uncompiled).
TOP_K_CHUNK = 64


def _best_continuations(logits, log_probs, penalty, k, chunked: bool):
    """Each row's `k` best continuations, best first, ties to the lower id: (scores, ids,
    log-probabilities), each (N, k), as `top_k((log_probs + log_softmax(logits)) / penalty)`
    with the log-softmax values of the ids it picks. `log_probs` (N,), `penalty` (N, 1).

    `chunked` finds the same ones without a top_k over whole rows, where V is static and
    holds at least 4k chunks of `TOP_K_CHUNK` ids (else it is the top_k): the row's best k
    lie in the k chunks whose best candidates are best (ties to the lower chunk, whose ids
    are the lower ones), so top_k runs over the chunks' maxima, then over the k chunks
    chosen, taken in id order. Every score is the same expression on the same log-softmax
    values as in the top_k over whole rows (uncompiled, one kernel's; under XLA, the same
    op compiled in both), so the same candidates win, ties included (a row with a NaN logit
    has only NaN scores and may pick other ids).
    """
    step_log_probs = tf.nn.log_softmax(logits)                            # (N, V)

    def score(x):                                                         # x: log-softmax
        return (log_probs[:, None] + x) / penalty

    v = static_dim(logits, 1)
    chunks = v // TOP_K_CHUNK if isinstance(v, int) else 0
    if not chunked or not isinstance(k, int) or chunks < 4 * k:
        scores, ids = tf.math.top_k(score(step_log_probs), k)            # (N, k) each
        return scores, ids, tf.gather(step_log_probs, ids, batch_dims=1)
    whole = chunks * TOP_K_CHUNK
    best = tf.reduce_max(tf.reshape(score(step_log_probs[:, :whole]),
                                    [-1, chunks, TOP_K_CHUNK]), axis=2)   # (N, C)
    if whole < v:   # the last ids, fewer than a chunk
        best = tf.concat([best, tf.reduce_max(score(step_log_probs[:, whole:]), axis=1,
                                              keepdims=True)], axis=1)    # (N, C + 1)
    chosen = tf.sort(tf.math.top_k(best, k).indices, axis=1)              # (N, k) ascending
    candidates = tf.reshape(chosen[:, :, None] * TOP_K_CHUNK + tf.range(TOP_K_CHUNK),
                            [-1, k * TOP_K_CHUNK])                        # (N, k * 64) ids
    x = tf.gather(step_log_probs, tf.minimum(candidates, v - 1), batch_dims=1)  # (N, k * 64)
    # ids past V (the last chunk's) score -inf and come after every real id of that score
    scores, where = tf.math.top_k(tf.where(candidates < v, score(x), NEG_INF), k)
    return (scores, tf.gather(candidates, where, batch_dims=1),
            tf.gather(x, where, batch_dims=1))


def _own_log_prob(step_log_probs, token, finished):
    """Log-probability (N,) of each sequence's `token` in its row of `step_log_probs`
    (N, V); 0 for finished sequences."""
    token_log_prob = tf.gather(step_log_probs, token, batch_dims=1)       # (N,)
    return tf.where(finished, 0.0, token_log_prob)                        # (N,)


def _keep_top_k(logits, top_k):
    """`logits` (N, V) with everything below the k-th largest per row set to -inf."""
    if top_k == 0:
        return logits
    k = tf.minimum(top_k, tf.shape(logits)[1])
    kth = tf.math.top_k(logits, k).values[:, -1:]                         # (N, 1)
    return tf.where(logits < kth, NEG_INF, logits)                        # (N, V)


# ----------------------------------------------------------------------------- helpers

def _length_penalty(lengths, alpha):
    """GNMT length penalty ((5 + length) / 6) ** alpha; exactly 1 for alpha = 0."""
    return tf.pow((5.0 + tf.cast(lengths, tf.float32)) / 6.0, alpha)     # (N,)


def _tile(structure, k):
    """Repeat every tensor's rows `k` times: (B, ...) -> (B*k, ...), copies of an image
    adjacent."""
    if k == 1:
        return structure
    return tf.nest.map_structure(lambda x: tf.repeat(x, k, axis=0), structure)


def _tile_for(step_fn, state, context, k):
    """The state tiled k times, and the context too unless `step_fn` takes it per image."""
    if takes_per_image_context(step_fn):
        return _tile(state, k), context
    return _tile((state, context), k)


def _split_batch(x, k):
    """(B*k, ...) -> (B, k, ...), keeping the static trailing dims."""
    trailing = [d if d is not None else tf.shape(x)[i]
                for i, d in enumerate(x.shape[1:], start=1)]
    return tf.reshape(x, [-1, k] + trailing)


def static_dim(x, axis):
    """Static size of `x` along `axis` when known (a Python int: a reshape to it needs no
    Shape op), else the dynamic one (a scalar tensor). The recurrence uses it too."""
    return x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]


def _batch_size(state, context):
    leaves = tf.nest.flatten((state, context))
    if not leaves:
        raise ValueError("`state` and `context` hold no tensors; the batch size comes from "
                         f"their leading dim, got state={state!r}, context={context!r}")
    return tf.shape(leaves[0])[0]


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)
