"""Decoders tested with fake step functions (no model): scripted one-hot × 1e9 logits, and
per-image Markov chains over a 6-token vocabulary whose best captions are found by brute force.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from caption_attn.decode import (DecodeResult, beam_search, decode, greedy, in_slices,
                                 per_image_context, sample)
from caption_attn.vocab import END, PAD, START

V = 6      # PAD, START, END, UNK, and two words
A, B = 4, 5
P = 16     # attention "pixels"
L = 8      # longest script


# ----------------------------------------------------------------------------- fake steps

def markov_step(tokens, state, context):
    """Logits: the row of the previous token in the image's transition matrix.

    context["log_p"] (N, V, V); state {"step": (N,), "prev": (N,) the token before `tokens`}.
    Attention marks the step (0.5 at pixel `step`) and the last two tokens of the path
    (0.25 at pixel 8 + token each), so a beam that kept another path's history shows it.
    """
    logits = tf.gather(context["log_p"], tokens, batch_dims=1)                    # (N, V)
    step, prev = state["step"], state["prev"]                                     # (N,), (N,)
    attention = (0.5 * tf.one_hot(step, P) + 0.25 * tf.one_hot(8 + tokens, P)
                 + 0.25 * tf.one_hot(8 + prev, P))                                # (N, P)
    return logits, {"step": step + 1, "prev": tokens}, attention


def markov_inputs(probs):
    """state and context for `markov_step` from transition probabilities (B, V, V)."""
    batch = probs.shape[0]
    state = {"step": tf.zeros([batch], tf.int32), "prev": tf.fill([batch], START)}
    return state, {"log_p": tf.constant(np.log(probs), tf.float32)}


def random_chains(batch, seed, concentration=1.0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(V, concentration), size=(batch, V))  # (B, V, V)


def expected_attention(tokens, lengths):
    """What `markov_step` attended for each produced token (zero after the caption)."""
    out = np.zeros(tokens.shape + (P,), np.float32)
    for idx in np.ndindex(tokens.shape[:-1]):
        path = [START, START] + list(tokens[idx])
        for t in range(lengths[idx]):
            out[idx + (t, t)] += 0.5
            out[idx + (t, 8 + path[t + 1])] += 0.25
            out[idx + (t, 8 + path[t])] += 0.25
    return out


def script_step(tokens, state, context):
    """Logits 1e9 on the ids allowed at this step by context["script"] (N, L, V) multi-hot
    (several ids = a tie), 0 elsewhere; attention one-hot at the step index."""
    step = state                                                                   # (N,)
    allowed = tf.gather(context["script"], tf.minimum(step, L - 1), batch_dims=1)  # (N, V)
    return allowed * 1e9, step + 1, tf.one_hot(step, P)  # (N, V), (N,), (N, P)


def script_inputs(*scripts):
    """One script per image: a list of steps, each an id or a tuple of tied ids; the last
    step repeats."""
    table = np.zeros((len(scripts), L, V), np.float32)
    for b, script in enumerate(scripts):
        for t in range(L):
            ids = script[min(t, len(script) - 1)]
            table[b, t, list(ids) if isinstance(ids, tuple) else [ids]] = 1.0
    return tf.zeros([len(scripts)], tf.int32), {"script": tf.constant(table)}


def brute_force(log_p, max_length):
    """Every hypothesis a decoder can return (ends with END, or max_length tokens without
    it) -> its log-probability, for one transition matrix (V, V)."""
    out = {}
    for n in range(1, max_length + 1):
        for seq in itertools.product(range(V), repeat=n):
            if END in seq[:-1] or (n < max_length and seq[-1] != END):
                continue
            out[seq] = sum(log_p[prev, tok] for prev, tok in zip((START,) + seq, seq))
    return out


def penalized(log_prob, length, alpha):
    return log_prob / ((5.0 + length) / 6.0) ** alpha


def caption(result, b=0, k=0):
    r = tf.nest.map_structure(np.asarray, result)
    return tuple(r.tokens[b, k, :r.lengths[b, k]])


def greedy_is_not_best():
    """START -> A 0.55 / B 0.43; A -> END 0.4; B -> END 0.9: greedy says "A END" (0.22),
    the best caption is "B END" (0.387)."""
    probs = np.full((V, V), 0.01)
    probs[START, [A, B]] = 0.55, 0.43
    probs[A, [END, A, B]] = 0.4, 0.3, 0.27
    probs[B, END] = 0.9
    return (probs / probs.sum(1, keepdims=True))[None]  # (1, V, V)


# ----------------------------------------------------------------------------- greedy

def test_greedy_follows_script_per_image_and_stops_early():
    state, context = script_inputs([A, B, END], [END], [B, B, A, END])
    calls = []

    def counting_step(*args):
        calls.append(1)
        return script_step(*args)

    r = greedy(counting_step, state, context, max_length=10)
    np.testing.assert_array_equal(r.tokens[:, 0], [[A, B, END, PAD], [END, PAD, PAD, PAD],
                                                   [B, B, A, END]])
    np.testing.assert_array_equal(r.lengths, [[3], [1], [4]])
    np.testing.assert_array_equal(r.log_probs, np.zeros((3, 1)))
    assert len(calls) == 4  # stopped when the longest caption ended, not at max_length
    np.testing.assert_array_equal(r.attention[0, 0], np.eye(4, P) * [[1], [1], [1], [0]])


def test_output_types_and_shapes():
    state, context = markov_inputs(random_chains(3, seed=0))
    r = beam_search(markov_step, state, context, beam_size=4, max_length=5)
    assert isinstance(r, DecodeResult)
    assert r.tokens.dtype == tf.int32 and r.lengths.dtype == tf.int32
    assert r.log_probs.dtype == r.scores.dtype == r.attention.dtype == tf.float32
    t = r.tokens.shape[2]
    assert 1 <= t <= 5 and t == int(tf.reduce_max(r.lengths))
    assert r.token_log_probs.shape == (3, 4, t) and r.attention.shape == (3, 4, t, P)
    assert r.log_probs.shape == r.scores.shape == r.lengths.shape == (3, 4)


@pytest.mark.parametrize("decoder", [
    lambda s, c: greedy(script_step, s, c, max_length=5),
    lambda s, c: beam_search(script_step, s, c, beam_size=3, max_length=5),
    lambda s, c: sample(script_step, s, c, max_length=5, seed=1),
])
def test_end_at_first_step_gives_empty_caption(decoder):
    r = decoder(*script_inputs([END], [END]))
    np.testing.assert_array_equal(r.tokens[:, 0, 0], [END, END])
    assert np.all(np.asarray(r.tokens)[:, 0, 1:] == PAD)  # beam search ran on for the others
    np.testing.assert_array_equal(r.lengths[:, 0], [1, 1])
    np.testing.assert_array_equal(r.log_probs[:, 0], [0.0, 0.0])
    np.testing.assert_array_equal(r.attention[:, 0, 0], np.eye(2, P)[[0, 0]])


@pytest.mark.parametrize("max_length", [1, 3])
def test_max_length_truncates_captions_without_end(max_length):
    state, context = script_inputs([A])
    for r in (greedy(script_step, state, context, max_length),
              beam_search(script_step, state, context, 2, max_length)):
        np.testing.assert_array_equal(r.tokens[0, 0], [A] * max_length)
        assert int(r.lengths[0, 0]) == max_length
        assert float(r.log_probs[0, 0]) == 0.0


def test_ties_go_to_the_lower_id():
    state, context = script_inputs([(A, B), END])
    np.testing.assert_array_equal(greedy(script_step, state, context, 4).tokens[0, 0], [A, END])
    compiled = tf.function(lambda s, c: greedy(script_step, s, c, 4).tokens, jit_compile=True)
    np.testing.assert_array_equal(compiled(state, context)[0, 0], [A, END])
    r = beam_search(script_step, state, context, beam_size=3, max_length=4)
    np.testing.assert_array_equal(r.tokens[0, :2, :2], [[A, END], [B, END]])
    assert np.all(np.asarray(r.tokens)[0, :2, 2:] == PAD)
    assert float(r.scores[0, 0]) == float(r.scores[0, 1])
    assert float(r.scores[0, 2]) < -1e8  # the third beam had to take a 1e9-penalised token


# ----------------------------------------------------------------------------- beam search

def test_beam_search_finds_the_best_caption_greedy_misses():
    probs = greedy_is_not_best()
    state, context = markov_inputs(probs)
    exact = brute_force(np.log(probs[0]), max_length=4)
    best = max(exact, key=exact.get)
    assert best == (B, END)
    assert caption(greedy(markov_step, state, context, 4)) == (A, END)
    r = beam_search(markov_step, state, context, beam_size=2, max_length=4)
    assert caption(r) == best
    np.testing.assert_allclose(r.log_probs[0, 0], exact[best], rtol=1e-5)
    np.testing.assert_allclose(np.exp(r.log_probs[0, 0]), 0.43 / 1.02 * 0.9 / 0.95, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_larger_than_vocabulary_is_exhaustive_and_dead_beams_rank_last(alpha):
    # max_length 2 has 31 hypotheses ([END] and 5 * 6 pairs) and 36 beams hold them all.
    probs = random_chains(2, seed=1)
    state, context = markov_inputs(probs)
    r = beam_search(markov_step, state, context, beam_size=36, max_length=2,
                    length_penalty=alpha)
    r = tf.nest.map_structure(np.asarray, r)
    assert not any(np.isnan(x).any() for x in r)
    for b in range(2):
        exact = brute_force(np.log(probs[b]), max_length=2)
        ranked = sorted(exact, key=lambda s: -penalized(exact[s], len(s), alpha))
        assert [caption(r, b, k) for k in range(31)] == ranked
        np.testing.assert_allclose(r.log_probs[b, :31], [exact[s] for s in ranked], rtol=1e-5)
        np.testing.assert_allclose(
            r.scores[b, :31], [penalized(exact[s], len(s), alpha) for s in ranked], rtol=1e-5)
        assert np.all(r.scores[b, 31:] == -np.inf) and np.all(r.log_probs[b, 31:] == -np.inf)
        assert np.all(r.tokens[b, 31:] == PAD) and np.all(r.lengths[b, 31:] == 0)
        assert np.all(r.attention[b, 31:] == 0)
    np.testing.assert_allclose(r.attention, expected_attention(r.tokens, r.lengths))


def test_beam_search_keeps_the_attention_and_state_of_the_parent_path():
    # Flat chains make the beams swap parents often; the fake attention records the last
    # two tokens of the path (one of them read from the state), so any history or state
    # left on the wrong beam shows up.
    probs = random_chains(3, seed=2, concentration=5.0)
    state, context = markov_inputs(probs)
    r = tf.nest.map_structure(
        np.asarray, beam_search(markov_step, state, context, beam_size=4, max_length=6))
    np.testing.assert_allclose(r.attention, expected_attention(r.tokens, r.lengths))
    for b, k in np.ndindex(3, 4):
        seq = caption(r, b, k)
        steps = [np.log(probs[b, prev, tok]) for prev, tok in zip((START,) + seq, seq)]
        np.testing.assert_allclose(r.token_log_probs[b, k, :len(seq)], steps, rtol=1e-5)
        assert np.all(r.token_log_probs[b, k, len(seq):] == 0)
        np.testing.assert_allclose(r.log_probs[b, k], sum(steps), rtol=1e-5)
    assert np.all(np.diff(r.scores, axis=1) <= 0)  # best first
    assert all(len({caption(r, b, k) for k in range(4)}) == 4 for b in range(3))  # distinct


def test_finished_beams_stay_finished_with_frozen_scores():
    # Image 0 finishes "END" at step 1; it must survive while longer beams keep going.
    probs = greedy_is_not_best()
    state, context = markov_inputs(probs)
    r = beam_search(markov_step, state, context, beam_size=3, max_length=4)
    captions = [caption(r, 0, k) for k in range(3)]
    assert captions == [(B, END), (A, END), (A, A, END)]
    assert np.all(np.asarray(r.tokens)[0, :2, 2:] == PAD)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_of_one_equals_greedy(seed):
    state, context = markov_inputs(random_chains(4, seed=seed, concentration=2.0))
    g = greedy(markov_step, state, context, max_length=7)
    b = beam_search(markov_step, state, context, beam_size=1, max_length=7)
    for name in ("tokens", "lengths", "attention"):
        np.testing.assert_array_equal(getattr(g, name), getattr(b, name), err_msg=name)
    # greedy's log-probability is not gathered from tf.nn.log_softmax: the last bit may differ
    for name in ("log_probs", "scores", "token_log_probs"):
        np.testing.assert_allclose(getattr(g, name), getattr(b, name), rtol=1e-6, atol=0,
                                   err_msg=name)


def test_length_penalty_changes_the_ranking():
    # START -> END 0.4 ("" caption) or A 0.6; A -> END 0.6: P("") = 0.4 > P("A") = 0.36, but
    # divided by ((5 + 2) / 6) ** 1 the longer caption ranks first.
    probs = np.full((V, V), 1e-6)
    probs[START, [END, A]] = 0.4, 0.6
    probs[A, [END, B]] = 0.6, 0.4
    state, context = markov_inputs((probs / probs.sum(1, keepdims=True))[None])
    plain = beam_search(markov_step, state, context, 2, max_length=3)
    penalised = beam_search(markov_step, state, context, 2, max_length=3, length_penalty=1.0)
    assert [caption(plain, 0, k) for k in range(2)] == [(END,), (A, END)]
    assert [caption(penalised, 0, k) for k in range(2)] == [(A, END), (END,)]
    np.testing.assert_array_equal(plain.scores, plain.log_probs)
    np.testing.assert_allclose(penalised.scores[0],
                               penalised.log_probs[0] / np.array([7 / 6, 1.0]), rtol=1e-6)
    assert penalised.log_probs[0, 0] < penalised.log_probs[0, 1]  # ranked by score instead


def test_length_penalty_applies_during_the_search():
    # Step 1 keeps two of: "END" (finished, 0.3), "A END" (0.33), "A B" (0.27). By plain
    # log-probability "A B" is dropped; by score (-1.31 / (7/6) > -1.20 / 1) "END" is, and
    # "A B" goes on to "A B END" (0.243). Penalising only the finished beams at the end would
    # return "END" second.
    probs = np.full((V, V), 1e-6)
    probs[START, [END, A, B]] = 0.3, 0.6, 0.1
    probs[A, [END, B]] = 0.55, 0.45
    probs[B, [END, A]] = 0.9, 0.1
    state, context = markov_inputs((probs / probs.sum(1, keepdims=True))[None])
    plain = beam_search(markov_step, state, context, 2, max_length=4)
    penalised = beam_search(markov_step, state, context, 2, max_length=4, length_penalty=1.0)
    assert [caption(plain, 0, k) for k in range(2)] == [(A, END), (END,)]
    assert [caption(penalised, 0, k) for k in range(2)] == [(A, END), (A, B, END)]


def test_beams_ruled_out_by_minus_inf_logits_are_dead_and_do_not_delay_the_stop():
    # Only END has a finite logit, so beams 1 and 2 have no distinct caption to hold.
    state, context = script_inputs([END])
    calls = []

    def masked_step(tokens, state, context):
        calls.append(1)
        logits, state, attention = script_step(tokens, state, context)
        return tf.where(logits > 0, 0.0, -np.inf), state, attention

    r = tf.nest.map_structure(np.asarray, beam_search(masked_step, state, context,
                                                      beam_size=3, max_length=6))
    assert len(calls) == 1 and r.tokens.shape == (1, 3, 1)
    np.testing.assert_array_equal(r.tokens[0, :, 0], [END, PAD, PAD])
    np.testing.assert_array_equal(r.scores[0], [0.0, -np.inf, -np.inf])
    np.testing.assert_array_equal(r.lengths[0], [1, 0, 0])
    assert not any(np.isnan(x).any() for x in r)


@pytest.mark.parametrize("decoder", [
    lambda s, c: greedy(markov_step, s, c, max_length=6),
    lambda s, c: beam_search(markov_step, s, c, beam_size=3, max_length=6, length_penalty=0.7),
])
def test_batch_gives_the_same_captions_as_one_by_one(decoder):
    probs = random_chains(4, seed=3, concentration=3.0)
    batched = tf.nest.map_structure(np.asarray, decoder(*markov_inputs(probs)))
    for b in range(4):
        alone = tf.nest.map_structure(np.asarray, decoder(*markov_inputs(probs[b:b + 1])))
        t = alone.tokens.shape[2]
        np.testing.assert_array_equal(batched.tokens[b, :, :t], alone.tokens[0])
        assert np.all(batched.tokens[b, :, t:] == PAD)
        np.testing.assert_array_equal(batched.lengths[b], alone.lengths[0])
        np.testing.assert_allclose(batched.log_probs[b], alone.log_probs[0], rtol=1e-6)
        np.testing.assert_allclose(batched.attention[b, :, :t], alone.attention[0])
    assert len({caption(batched, b) for b in range(4)}) > 1  # the images really differ


# ----------------------------------------------------------------------------- sampling

def test_sampling_is_reproducible_with_a_seed():
    state, context = markov_inputs(random_chains(2, seed=4, concentration=20.0))
    draw = lambda seed: sample(markov_step, state, context, max_length=6, seed=seed,
                               num_samples=8).tokens.numpy()
    np.testing.assert_array_equal(draw(7), draw(7))
    assert not np.array_equal(draw(7), draw(8))


def test_sampling_with_ids_does_not_depend_on_the_batch():
    # Without ids, row b draws the b-th numbers of the seed's stream, so an image's sample
    # changed with its place in the batch (`caption --sample --batch-size 1` vs the default).
    probs = random_chains(4, seed=8, concentration=0.5)
    draw = lambda rows, ids: sample(markov_step, *markov_inputs(probs[rows]), max_length=6,
                                    seed=2, num_samples=3, ids=ids).tokens.numpy()
    together = draw([0, 1, 2, 3], [10, 11, 12, 13])
    for b in range(4):
        alone = draw([b], [10 + b])[0]
        np.testing.assert_array_equal(together[b, :, :alone.shape[1]], alone)
    first = draw([2, 2], [0, 1])       # one image, two streams: other samples
    assert not np.array_equal(first[0], first[1])


def test_sampling_with_ids_follows_the_distribution():
    probs = random_chains(1, seed=7)
    state, context = markov_inputs(np.repeat(probs, 4000, axis=0))
    r = sample(markov_step, state, context, max_length=1, temperature=2.0, seed=0,
               ids=np.arange(4000))
    first = np.asarray(r.tokens)[:, 0, 0]
    tempered = probs[0, START] ** 0.5 / (probs[0, START] ** 0.5).sum()
    np.testing.assert_allclose(np.bincount(first, minlength=V) / first.size, tempered,
                               atol=0.025)


def test_sampling_noise_is_the_same_with_and_without_xla():
    # TensorFlow's stateless random ops draw other numbers under XLA (even alg="philox"):
    # `caption --sample --xla` gave other captions than the same --seed without --xla. The
    # noise is all the randomness of `sample` with ids (compiling a whole sampler: 6 s).
    from caption_attn.decode import _gumbel_noise, _hashed_uniform
    streams = tf.constant([3, 1, 1 << 40], tf.int64)
    args = tf.constant(11, tf.int64), tf.constant(2), streams, 500
    uniform = np.asarray(_hashed_uniform(*args))                          # (3, 500)
    np.testing.assert_array_equal(uniform, tf.function(
        _hashed_uniform, jit_compile=True)(*args))                        # the same bits
    noise = np.asarray(_gumbel_noise(*args))
    np.testing.assert_allclose(noise, tf.function(_gumbel_noise, jit_compile=True)(*args),
                               rtol=1e-5, atol=1e-6)                      # XLA's log: 1 ulp
    for other in (_hashed_uniform(tf.constant(12, tf.int64), *args[1:]),
                  _hashed_uniform(args[0], tf.constant(3), *args[2:])):
        assert (np.asarray(other) != uniform).mean() > 0.99               # seed, step count
    assert len(np.unique(uniform)) > 1490 and 0 < uniform.min() and uniform.max() < 1
    assert abs(noise.mean() - np.euler_gamma) < 0.15 and abs(noise.std() - 1.28) < 0.15


def test_no_two_streams_draw_the_same_noise_permuted():
    # The column was the hash's start: row n was one bijection of (column XOR a hash of
    # stream n), so streams whose hashes agreed above the column bits drew the same numbers
    # in permuted columns at every step (here 5 pairs of the 16384 rows; 1 pair in 2**18
    # at 10,000 words): their samples were not independent.
    from caption_attn.decode import _hashed_uniform
    rows = np.sort(np.asarray(_hashed_uniform(tf.constant(7, tf.int64), tf.constant(3),
                                              tf.range(1 << 14, dtype=tf.int64), 256)), axis=1)
    assert len(np.unique(rows, axis=0)) == len(rows)


def test_sampling_draws_fresh_randomness_at_every_step():
    # Every row the same distribution (END excluded): reusing one seed at every step would
    # repeat each sample's first token for the whole caption.
    row = np.full(V, 1.0 / (V - 1))
    row[END] = 0.0
    state, context = markov_inputs(np.tile(row + 1e-9, (1, V, 1)))
    tokens = np.asarray(sample(markov_step, state, context, max_length=6, seed=5,
                               num_samples=50).tokens)[0]
    constant = np.all(tokens == tokens[:, :1], axis=1)
    assert constant.sum() < 5


def test_sampling_top_k_1_and_cold_temperature_equal_greedy():
    state, context = markov_inputs(random_chains(3, seed=5, concentration=2.0))
    g = greedy(markov_step, state, context, max_length=6)
    # 1e-30: logits / T overflowed to +-inf, and the lowest id among the +inf ones was drawn
    # (<end> at the first step), or <pad> when all were negative (dead captions)
    negative = lambda *a: (lambda out: (out[0] - 50.0, *out[1:]))(markov_step(*a))  # noqa
    for step, kwargs in ((markov_step, {"top_k": 1, "temperature": 3.0}),
                         (markov_step, {"temperature": 1e-6}),
                         (markov_step, {"temperature": 1e-30}),
                         (negative, {"temperature": 1e-30}),
                         (negative, {"temperature": 1e-30, "num_samples": 2})):
        s = sample(step, state, context, max_length=6, seed=11, **kwargs)
        k = kwargs.get("num_samples", 1)
        np.testing.assert_array_equal(s.tokens, np.repeat(g.tokens, k, axis=1))
        np.testing.assert_allclose(s.log_probs, np.repeat(g.log_probs, k, axis=1), rtol=1e-5)


def test_sampling_top_k_only_draws_the_k_most_likely_tokens():
    probs = random_chains(1, seed=6, concentration=5.0)
    state, context = markov_inputs(probs)
    r = tf.nest.map_structure(np.asarray, sample(markov_step, state, context, max_length=4,
                                                 top_k=2, seed=3, num_samples=200))
    top2 = np.argsort(-probs[0], axis=1)[:, :2]  # (V, 2) per previous token
    seen = set()
    for k in range(200):
        seq = caption(r, 0, k)
        for prev, tok in zip((START,) + seq, seq):
            assert tok in top2[prev]
        seen.add(seq[0])
    assert seen == set(top2[START])
    assert np.all(np.diff(r.scores[0]) <= 0)  # samples sorted best first


def test_sampling_temperature_flattens_the_distribution_and_log_probs_stay_the_models():
    probs = random_chains(1, seed=7)
    state, context = markov_inputs(probs)
    r = sample(markov_step, state, context, max_length=1, temperature=2.0, seed=0,
               num_samples=20000)
    first = np.asarray(r.tokens)[0, :, 0]
    tempered = probs[0, START] ** 0.5 / (probs[0, START] ** 0.5).sum()
    np.testing.assert_allclose(np.bincount(first, minlength=V) / first.size, tempered,
                               atol=0.015)
    np.testing.assert_allclose(r.log_probs[0], np.log(probs[0, START, first]), rtol=1e-5)


# ----------------------------------------------------------------------------- API

def test_decode_dispatches_by_method():
    state, context = markov_inputs(greedy_is_not_best())
    assert caption(decode(markov_step, state, context, max_length=4)) == (A, END)
    assert caption(decode(markov_step, state, context, "beam", beam_size=2,
                          max_length=4)) == (B, END)
    r = decode(markov_step, state, context, "sample", max_length=4, num_samples=3)
    assert r.tokens.shape[1] == 3


@pytest.mark.parametrize("call, message", [
    (lambda s, c: beam_search(markov_step, s, c, beam_size=0, max_length=3),
     "`beam_size` must be an integer >= 1, got 0"),
    (lambda s, c: beam_search(markov_step, s, c, beam_size=2.0, max_length=3),
     "`beam_size` must be an integer >= 1, got 2.0"),
    (lambda s, c: greedy(markov_step, s, c, max_length=0),
     "`max_length` must be an integer >= 1, got 0"),
    (lambda s, c: sample(markov_step, s, c, max_length=3, temperature=0.0),
     "`temperature` must be a number > 0, got 0.0"),
    (lambda s, c: sample(markov_step, s, c, max_length=3, temperature=-1),
     "`temperature` must be a number > 0, got -1"),
    (lambda s, c: sample(markov_step, s, c, max_length=3, top_k=-1),
     "`top_k` must be an integer >= 0, got -1"),
    (lambda s, c: sample(markov_step, s, c, max_length=3, num_samples=0),
     "`num_samples` must be an integer >= 1, got 0"),
    (lambda s, c: decode(markov_step, s, c, "nucleus", max_length=3),
     "`method` must be one of ['beam', 'greedy', 'sample'], got 'nucleus'"),
])
def test_bad_arguments_raise_naming_the_argument(call, message):
    with pytest.raises(ValueError) as info:
        call(*markov_inputs(random_chains(1, seed=0)))
    assert str(info.value) == message


@pytest.mark.parametrize("decoder", [
    lambda s, c, seed: greedy(markov_step, s, c, max_length=5),
    lambda s, c, seed: beam_search(markov_step, s, c, beam_size=3, max_length=5,
                                   length_penalty=0.6),
    lambda s, c, seed: sample(markov_step, s, c, max_length=5, top_k=3, seed=seed,
                              num_samples=2),
])
def test_tf_function_matches_eager_and_traces_once_for_any_batch_size(decoder):
    spec = ({"step": tf.TensorSpec([None], tf.int32), "prev": tf.TensorSpec([None], tf.int32)},
            {"log_p": tf.TensorSpec([None, V, V], tf.float32)},
            tf.TensorSpec([], tf.int64))
    compiled = tf.function(decoder, input_signature=spec)
    for batch, seed in ((2, 0), (5, 1)):
        state, context = markov_inputs(random_chains(batch, seed=seed + 10, concentration=3.0))
        seed = tf.constant(seed, tf.int64)
        graph, eager = compiled(state, context, seed), decoder(state, context, seed)
        assert graph.tokens.shape[0] == batch
        for name in DecodeResult._fields:
            np.testing.assert_allclose(getattr(graph, name), getattr(eager, name), rtol=1e-6,
                                       err_msg=name)
    assert compiled.experimental_get_tracing_count() == 1


# ----------------------------------------------------------------------------- context per image

def per_image_markov_step(rows_seen):
    """`markov_step` taking the context once per image (`per_image_context`): it records the
    context's rows and repeats them itself, image n // K for sequence n."""
    @per_image_context
    def step(tokens, state, context):
        rows = tf.shape(context["log_p"])[0]
        rows_seen.append(int(rows))
        k = tf.shape(tokens)[0] // rows
        return markov_step(tokens, state, {"log_p": tf.repeat(context["log_p"], k, axis=0)})
    return step


@pytest.mark.parametrize("decoder", [
    lambda step, s, c: beam_search(step, s, c, beam_size=3, max_length=6, length_penalty=0.7),
    lambda step, s, c: sample(step, s, c, max_length=6, seed=3, num_samples=4),
    lambda step, s, c: sample(step, s, c, max_length=6, seed=3, num_samples=4,
                              ids=tf.constant([7, 2, 5])),
    lambda step, s, c: greedy(step, s, c, max_length=6),
])
def test_a_step_taking_the_context_per_image_gets_it_untiled_and_decodes_the_same(decoder):
    state, context = markov_inputs(random_chains(3, seed=5, concentration=2.0))
    rows_seen = []
    untiled = decoder(per_image_markov_step(rows_seen), state, context)
    assert rows_seen and set(rows_seen) == {3}  # one row per image at every step
    tiled = decoder(markov_step, state, context)
    for name in DecodeResult._fields:
        np.testing.assert_array_equal(getattr(untiled, name), getattr(tiled, name),
                                      err_msg=name)
    assert len({caption(tiled, b) for b in range(3)}) > 1  # the images' rows were not mixed


def test_a_step_without_the_mark_gets_the_context_tiled():
    state, context = markov_inputs(random_chains(2, seed=6))
    rows_seen = []
    marked = per_image_markov_step(rows_seen)
    beam_search(lambda *args: marked(*args), state, context, beam_size=3, max_length=3)
    assert rows_seen and set(rows_seen) == {6}  # the wrapper dropped the mark: B * K rows


# ----------------------------------------------------------------------------- beam advance

def one_stage_beam_choice(log_probs, lengths, finished, logits, beam_size, alpha):
    """The documented rule written out over all K * V candidates of an image (numpy): score
    (log_prob + log_softmax) / ((5 + length) / 6) ** alpha, a finished beam's only
    continuation PAD for free; the best `beam_size` first, ties to the lower beam, then the
    lower id -> parent (N,), token (N,), token log-prob (N,)."""
    step = tf.nn.log_softmax(logits).numpy()                              # (N, V) as TF rounds
    n, v = step.shape
    frozen = np.where(np.arange(v) == PAD, 0.0, -np.inf).astype(np.float32)
    step = np.where(finished[:, None], frozen, step)
    grown = lengths + ~finished
    penalty = (((5.0 + grown.astype(np.float32)) / 6.0) ** np.float32(alpha)).astype(np.float32)
    scores = ((log_probs[:, None] + step) / penalty[:, None]).astype(np.float32)
    parents, tokens, token_log_probs = [], [], []
    for b in range(n // beam_size):
        flat = scores[b * beam_size:(b + 1) * beam_size].reshape(-1)      # (K*V,)
        order = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:beam_size]
        for i in order:
            parent, token = b * beam_size + i // v, i % v
            parents.append(parent)
            tokens.append(token)
            token_log_probs.append(step[parent, token])
    return np.array(parents), np.array(tokens), np.array(token_log_probs, np.float32)


@pytest.mark.parametrize("beam_size, alpha, seed", [(3, 0.0, 0), (3, 0.8, 1), (4, 1.0, 2),
                                                    (8, 0.0, 3)])
def test_beam_advance_in_two_stages_chooses_as_over_all_candidates(beam_size, alpha, seed):
    """The per-beam top-k then per-image top-k equals the rule over all K * V candidates,
    with ties (equal logits, equal beams), -inf logits, finished beams and dead beams."""
    from caption_attn.decode import _HISTORY, _beam_advance, _empty
    rng = np.random.default_rng(seed)
    batch, v = 5, 7                                             # beam 8 > V: k = V per beam
    n = batch * beam_size
    logits = rng.integers(-2, 3, (n, v)).astype(np.float32)     # many equal logits
    logits[rng.random((n, v)) < 0.15] = -np.inf                 # banned tokens
    logits[1] = logits[0]                                       # two beams alike: ties
    log_probs = rng.choice([-1.0, -2.0, -3.5], n).astype(np.float32)
    log_probs[1] = log_probs[0]
    log_probs[rng.random(n) < 0.15] = -np.inf                   # dead beams
    finished = rng.random(n) < 0.3
    lengths = rng.integers(1, 6, n).astype(np.int32)
    # image 1: one live beam whose 3 tokens' scores differ by less than float32 resolves
    # at -300: a tie after rounding, which goes to the lower id, not to the larger logit
    log_probs[beam_size:2 * beam_size], finished[beam_size:2 * beam_size] = -np.inf, False
    log_probs[beam_size] = -300.0
    logits[beam_size] = -np.inf
    logits[beam_size, [3, 4, 5]] = 0.0, 5e-7, 1e-6
    last = slice(n - beam_size, n)                              # one finished beam, the
    log_probs[last][1:], finished[last][0] = -np.inf, True      # others dead: K - 1 stay dead
    beams = _empty(tf.zeros([n]), tf.constant(log_probs), 6, 2)._replace(
        step=tf.constant(3), lengths=tf.constant(lengths), finished=tf.constant(finished))
    history = dict(zip(_HISTORY, (tf.constant(log_probs), tf.constant(lengths),
                                  tf.constant(finished))))
    beams = beams._replace(**history, tokens=tf.reshape(tf.range(n * 6), [n, 6]))
    out = _beam_advance(beam_size, alpha, END)(beams, tf.constant(logits), tf.range(n),
                                               tf.zeros([n, 2]))
    parent, token, token_log_prob = one_stage_beam_choice(log_probs, lengths, finished,
                                                          logits, beam_size, alpha)
    np.testing.assert_array_equal(out.state, parent)            # the state follows the parent
    np.testing.assert_array_equal(out.tokens[:, :3], beams.tokens.numpy()[parent, :3])
    np.testing.assert_array_equal(out.tokens[:, 3], np.where(finished[parent], PAD, token))
    np.testing.assert_array_equal(out.token_log_probs[:, 3], token_log_prob)
    np.testing.assert_array_equal(out.log_probs, log_probs[parent] + token_log_prob)
    assert np.isneginf(out.log_probs.numpy()[last][1:]).all()
    assert out.tokens.numpy()[last][0, 3] == PAD             # the finished beam, frozen
    assert out.log_probs.numpy()[last][0] == log_probs[last][0]


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("k, v", [(1, 5001), (3, 40 * 64), (10, 5001)])
def test_best_continuations_in_chunks_are_top_k_over_whole_rows(k, v, jit_compile):
    """With XLA and without, for a batch of any size, each row's best k found through 64-id
    chunks (as the `Captioner` asks for on a CPU) are top_k's over the whole row, to the bit:
    equal logits all over a row, a row all alike, a tie made by rounding, -inf logits with
    the last id among the few finite ones (in a last, partial chunk where V is not a multiple
    of 64), the best k spanning two chunks, a tie between ids of two chunks whose order by
    their best is not their ids' order, dead rows and length penalties."""
    from caption_attn.decode import TOP_K_CHUNK, _best_continuations
    assert v // TOP_K_CHUNK >= 4 * k                            # the chunked path is taken
    rng = np.random.default_rng(k)
    n = 32
    logits = rng.normal(size=(n, v)).astype(np.float32) * 4
    logits[:8] = rng.integers(-3, 4, (8, v))                    # many equal logits
    logits[8] = 0.0                                             # a row all alike
    logits[9] = -np.inf
    logits[9, [v - 1, 5, 700]] = 1.0                            # finite in three spots only
    logits[10] = -np.inf                                        # at -300 their scores round
    logits[10, [3, 4, 5]] = 0.0, 5e-7, 1e-6                     # equal: the lower id first
    logits[11, 7 * TOP_K_CHUNK - 2:7 * TOP_K_CHUNK + 9] = 50.0  # the best across two chunks
    tied = 2 * TOP_K_CHUNK + 2                                  # ties id 10, in a chunk whose
    logits[15] = -np.inf                                        # best (id tied + 1) comes
    logits[15, [10, tied, tied + 1]] = 1.0, 1.0, 5.0            # first: still id 10 first
    log_probs = rng.choice([-1.0, -2.0, -3.5, 0.0], n).astype(np.float32)
    log_probs[10] = -300.0
    log_probs[12:15] = -np.inf                                  # dead rows
    penalty = rng.choice([1.0, 1.3, 2.25], (n, 1)).astype(np.float32)
    args = [tf.constant(x) for x in (logits, log_probs, penalty)]
    spec = [tf.TensorSpec([None, v]), tf.TensorSpec([None]), tf.TensorSpec([None, 1])]
    chunked, whole = (tf.function(lambda *a, c=c: _best_continuations(*a, k, c),
                                  input_signature=spec, jit_compile=jit_compile)(*args)
                      for c in (True, False))
    for got, want in zip(chunked, whole):                       # scores, ids, log-probs
        np.testing.assert_array_equal(got, want)
    assert whole[1][10, 0] == 3 and set(whole[1][11, :min(k, 11)].numpy()) <= set(
        range(7 * TOP_K_CHUNK - 2, 7 * TOP_K_CHUNK + 9))
    assert list(whole[1][15, :3].numpy())[:k] == [tied + 1, 10, tied][:k]


@pytest.mark.parametrize("jit_compile", [False, True])
def test_beam_search_in_chunks_decodes_as_over_whole_rows(jit_compile):
    """`chunked_top_k` on a 5001-word step with many equal logits, banned words and beams
    that finish, with XLA and without: the same captions, scores and attention, to the bit."""
    rng = np.random.default_rng(0)
    v, batch = 5001, 6
    table = rng.integers(-4, 5, (97, v)).astype(np.float32)    # logits by the last token
    table[:, [11, 12]] = -np.inf                                # never chosen
    table[::5, END] = 6.0                                       # some words lead to END
    table = tf.constant(table)

    def step(tokens, state, context):
        logits = tf.gather(table, tokens % 97) + context        # (N, V)
        return logits, state + 1, tf.one_hot((tokens + state) % P, P)

    state = tf.zeros([batch], tf.int32)
    context = tf.constant(rng.normal(size=(batch, v)).astype(np.float32) * 0.5)
    chunked, whole = (tf.nest.map_structure(np.asarray, tf.function(
        lambda s, c, flag=flag: beam_search(step, s, c, 3, 8, length_penalty=0.7,
                                            chunked_top_k=flag),
        jit_compile=jit_compile)(state, context)) for flag in (True, False))
    for got, want in zip(chunked, whole):
        np.testing.assert_array_equal(got, want)
    assert (whole.lengths < 8).any() and (whole.lengths == 8).any()  # some beams finished


@pytest.mark.parametrize("jit_compile", [False, True])
def test_greedy_ties_go_to_the_lower_id_in_a_large_vocabulary(jit_compile):
    """Greedy's argmax on 5001 logits with 2 to 5 equal maxima anywhere in a row (XLA's
    vectorised reduction included) takes the lowest of their ids."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 5001)).astype(np.float32)
    lowest = []
    for row in logits:
        ids = np.sort(rng.choice(5001, rng.integers(2, 6), replace=False))
        row[ids] = row.max() + 1.0
        lowest.append(ids[0])

    def step(tokens, state, context):
        return context, state, tf.zeros([tf.shape(tokens)[0], P])
    decoder = tf.function(lambda c: greedy(step, tf.zeros([64]), c, 1).tokens,
                          jit_compile=jit_compile)
    np.testing.assert_array_equal(decoder(tf.constant(logits))[:, 0, 0], lowest)


def test_slices_decoded_side_by_side_merge_into_the_whole_batchs_result():
    """`in_slices` runs a decoding loop on equal slices of the batch (the last padded with
    copies of the first image, dropped again) and merges their results: a slice that stopped
    after fewer steps gets its histories padded as finished sequences are (PAD, 0, zero
    attention), so the merged result is the one the whole batch's loop would give."""
    calls = []

    def run(state, context):           # a loop whose steps depend on the slice's first row
        m = tf.shape(state)[0]
        calls.append(state.shape[0])
        steps = 1 + tf.cast(state[0, 0], tf.int32)
        ids = tf.cast(state[:, 0], tf.int32)                              # (m,)
        tokens = tf.tile((ids + 5)[:, None, None], [1, 1, steps])        # (m, 1, T)
        return DecodeResult(
            tokens=tokens, log_probs=-tf.cast(ids, tf.float32)[:, None],
            scores=-2.0 * tf.cast(ids, tf.float32)[:, None],
            token_log_probs=-tf.ones([m, 1, steps]),
            attention=tf.ones([m, 1, steps, 4]) + context[:, None, None, :1],
            lengths=tf.fill([m, 1], steps))

    n, parts = 7, 3                    # slices [0 1 2] [3 4 5] [6 + 2 copies of 0]
    state = tf.range(n, dtype=tf.float32)[:, None]                        # (7, 1)
    context = 10.0 * state
    got = in_slices(run, state, context, parts)
    assert calls == [3, 3, 3]          # one shape for every slice (one XLA compile)
    steps_of = {0: 1, 1: 1, 2: 1, 3: 4, 4: 4, 5: 4, 6: 7}
    assert got.tokens.shape == (n, 1, 7) and got.attention.shape == (n, 1, 7, 4)
    for b, t in steps_of.items():
        np.testing.assert_array_equal(got.tokens[b, 0], [b + 5] * t + [PAD] * (7 - t))
        np.testing.assert_array_equal(got.token_log_probs[b, 0], [-1.0] * t + [0.0] * (7 - t))
        np.testing.assert_array_equal(got.attention[b, 0, :, 0],
                                      [1.0 + 10 * b] * t + [0.0] * (7 - t))
    np.testing.assert_array_equal(got.log_probs[:, 0], -np.arange(n))
    np.testing.assert_array_equal(got.scores[:, 0], -2.0 * np.arange(n))
    np.testing.assert_array_equal(got.lengths[:, 0], [steps_of[b] for b in range(n)])
    whole = in_slices(run, state, context, 1)                              # no slicing
    assert whole.tokens.shape == (n, 1, 1) and calls[-1] == n
