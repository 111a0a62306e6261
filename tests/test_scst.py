import os

import numpy as np
import pytest

from caption_attn.scst import advantages


def test_mean_baseline_is_the_mean_of_the_other_samples():
    rewards = np.array([[1.0, 2.0, 6.0], [0.5, 0.5, 0.5]])
    got = advantages(rewards, "mean")
    want = [[1 - 4, 2 - 3.5, 6 - 1.5], [0.0, 0.0, 0.0]]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)
    np.testing.assert_allclose(got.sum(axis=1), [(3 * 9 - 3 * 9) / 2, 0.0], atol=1e-12)


def test_greedy_baseline_subtracts_the_greedy_reward():
    rewards = np.array([[1.0, 2.0, 6.0], [0.5, 0.0, 0.25]])
    got = advantages(rewards, "greedy", greedy_rewards=np.array([2.0, 0.5]))
    np.testing.assert_array_equal(got, [[-1.0, 0.0, 4.0], [0.0, -0.5, -0.25]])


def test_advantage_refusals():
    with pytest.raises(ValueError, match=r"`baseline` \"mean\" needs K >= 2.*K=1"):
        advantages(np.ones((2, 1)), "mean")
    with pytest.raises(ValueError, match=r"`baseline` must be one of .*'max'"):
        advantages(np.ones((2, 3)), "max")
    with pytest.raises(ValueError, match=r"`baseline` \"greedy\" needs `greedy_rewards`"):
        advantages(np.ones((2, 3)), "greedy")
    with pytest.raises(ValueError, match=r"`greedy_rewards` must have shape \(B,\) = \(2,\)"):
        advantages(np.ones((2, 3)), "greedy", greedy_rewards=np.ones(3))
    with pytest.raises(ValueError, match="`greedy_rewards` is for"):
        advantages(np.ones((2, 3)), "mean", greedy_rewards=np.ones(2))


# --------------------------------------------------------------------------- the loss
def test_policy_gradient_raises_the_better_sample_and_lowers_the_worse():
    import keras
    import tensorflow as tf

    from caption_attn.model import ShowAttendTell
    from caption_attn.scst import Scored, SelfCritical
    from caption_attn.vocab import END, PAD

    keras.utils.set_random_seed(3)
    model = ShowAttendTell(12, 8, 16, dropout=0.0, feature_dim=32)
    scst = SelfCritical(model, reward=None, samples=2, baseline="mean", max_length=5)
    features = tf.constant(np.random.default_rng(0).normal(size=(1, 64, 32)), tf.float32)
    tokens = tf.constant([[[5, 6, END, PAD], [7, 7, 8, END]]], tf.int32)   # (N=1, K=2, T=4)
    rewards = tf.constant([[2.0, 0.0]])
    scored = Scored(tokens, rewards, tf.constant([[0.0, 2.0]]), tf.constant([[2.0, -2.0]]))

    def sample_log_p():
        targets = tf.reshape(tokens, [2, -1])
        inputs = tf.concat([tf.fill([2, 1], 1), targets[:, :-1]], axis=1)
        logits, _ = model((features, tf.zeros([2], tf.int32), inputs))
        log_p = tf.gather(tf.nn.log_softmax(logits), targets, batch_dims=2)
        return tf.reduce_sum(tf.where(targets != PAD, log_p, 0.0), axis=1).numpy()

    before = sample_log_p()
    with tf.GradientTape() as tape:
        loss_sum, real_tokens, entropy = scst.loss(features, scored)
    assert float(real_tokens) == 3 + 4 and float(entropy) > 0
    grads = tape.gradient(loss_sum, model.trainable_variables)
    for var, g in zip(model.trainable_variables, grads):
        var.assign_sub(0.05 / 7 * tf.convert_to_tensor(g))
    after = sample_log_p()
    assert after[0] > before[0] and after[1] < before[1]   # advantage +2 up, -2 down


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_an_images_samples_do_not_depend_on_its_place_in_the_batch(dropout):
    """Self-critical samples drew from the stream of their row in the step's batch: under
    --strategy mirrored every replica's first image drew the same random numbers as the
    other replicas' first image (the noise of the global batch correlated), and one image's
    samples changed with the batch it came in. Each image now draws from the stream of its
    train-image id (the reward's key), whatever replica or row it has; so do its output
    dropout masks (they were the layer's, of the row and of the calls before)."""
    import keras
    import tensorflow as tf

    from caption_attn.model import ShowAttendTell
    from caption_attn.scst import SelfCritical

    keras.utils.set_random_seed(3)
    model = ShowAttendTell(12, 8, 16, dropout=dropout, feature_dim=32)
    scst = SelfCritical(model, reward=None, samples=3, baseline="mean", max_length=6)
    features = tf.constant(np.random.default_rng(0).normal(size=(3, 64, 32)), tf.float32)
    whole, _ = scst.sample(features, 7, ids=tf.constant([10, 11, 12]))       # (3, K, T)
    alone, _ = scst.sample(features[2:], 7, ids=tf.constant([12]))           # as a replica's
    np.testing.assert_array_equal(alone.numpy()[0], whole.numpy()[2])
    same_row, _ = scst.sample(features[:1], 7, ids=tf.constant([11]))  # another image's id
    assert not np.array_equal(same_row.numpy()[0], whole.numpy()[0])


def test_document_frequencies_are_recounted_when_the_train_references_change(tmp_path):
    """cider_df.json was read whenever it existed: a resume whose train images gained (or
    lost) features kept the idf of the images counted before, and so did a file copied from
    another run with the same vocabulary size. It now records a digest of its references."""
    import json

    from caption_attn.cider import DocumentFrequency
    from caption_attn.scst import train_document_frequency
    path, V = str(tmp_path / "cider_df.json"), 20
    before = {0: [[1, 5, 6, 2]], 1: [[1, 7, 8, 2]]}
    gained = {**before, 2: [[1, 5, 9, 2]]}
    df = train_document_frequency(path, before, V, save=True)
    assert df.num_images == 2
    with open(path) as f:
        stored = json.load(f)
    assert len(stored["references_sha256"]) == 64
    # the same references: the file is read (its counts marked to tell it from a recount)
    with open(path, "w") as f:
        json.dump({**stored, "num_images": 7}, f)
    assert train_document_frequency(path, before, V, save=True).num_images == 7
    again = train_document_frequency(path, gained, V, save=True)      # one image gained
    assert again.num_images == 3 and again.get((9,)) == 1
    assert DocumentFrequency.load(path).num_images == 3               # and written back
    # a file written before the digest: kept for as many images, else counted again
    old = DocumentFrequency.build(before, V).to_json()
    with open(path, "w") as f:
        json.dump({**old, "num_images": 2}, f)
    assert train_document_frequency(path, {0: [[1, 9, 2]], 1: [[1, 5, 2]]}, V,
                                    save=False).get((6,)) == 1        # kept (old rule)
    assert train_document_frequency(path, gained, V, save=False).num_images == 3


@pytest.mark.parametrize("damage", ['{"format": "caption_attn', '{"format": "other"}'])
def test_a_damaged_document_frequency_file_is_counted_again_with_a_note(tmp_path, damage):
    """A truncated cider_df.json (or one of another version) stopped `train` with its error
    after the epoch's steps, which were lost without a checkpoint; it is a cache: counted
    again, with a note, and written back."""
    from caption_attn.cider import DocumentFrequency
    from caption_attn.scst import train_document_frequency

    path, V = str(tmp_path / "cider_df.json"), 20
    references = {0: [[1, 5, 6, 2]], 1: [[1, 7, 8, 2]]}
    with open(path, "w") as f:
        f.write(damage)
    notes = []
    df = train_document_frequency(path, references, V, save=True, log=notes.append)
    assert df.num_images == 2 and df.get((5, 6)) == 1
    assert len(notes) == 1 and notes[0].startswith(f"note: {path}: ")
    assert notes[0].endswith("; counting the document frequencies again")
    assert DocumentFrequency.load(path).num_images == 2               # written back
    assert train_document_frequency(path, references, V, save=True, log=notes.append).get(
        (5, 6)) == 1 and len(notes) == 1                              # read, no note


@pytest.mark.parametrize("advantage", [[[2.0, -2.0]], [[0.5, 1.5]]])
def test_the_loss_and_its_gradients_are_those_of_the_policy_through_call(advantage):
    """The loss runs on the real tokens only, time-major, with the output layer's gradient
    written out (as cross-entropy training does); its values and gradients are those of the
    policy computed through `call`: log-softmax over the words with <pad> and <start>
    banned, -advantage x log p of every real sampled token, the entropy of each step's
    distribution at those tokens."""
    import keras
    import tensorflow as tf

    from caption_attn.model import ShowAttendTell
    from caption_attn.scst import Scored, SelfCritical
    from caption_attn.vocab import END, PAD, START

    keras.utils.set_random_seed(5)
    model = ShowAttendTell(12, 8, 16, dropout=0.0, feature_dim=32)
    # <pad> and <start> made likely, so that banning them changes every distribution
    model.logits.bias.assign(tf.one_hot(PAD, 12) * 3.0 + tf.one_hot(START, 12) * 2.0)
    scst = SelfCritical(model, reward=None, samples=2, baseline="mean", max_length=5)
    features = tf.constant(np.random.default_rng(1).normal(size=(2, 64, 32)), tf.float32)
    tokens = tf.constant([[[5, 6, END, PAD], [7, 7, 8, END]],
                          [[END, PAD, PAD, PAD], [9, END, PAD, PAD]]], tf.int32)  # (2, 2, 4)
    adv = tf.constant(advantage * 2, tf.float32)                      # (N=2, K=2)
    scored = Scored(tokens, adv, adv, adv)

    def through_call():
        targets = tf.reshape(tokens, [4, -1])
        inputs = tf.concat([tf.fill([4, 1], START), targets[:, :-1]], axis=1)
        logits, _ = model((features, tf.constant([0, 0, 1, 1]), inputs))
        logits = tf.where(tf.reduce_any(tf.one_hot([PAD, START], 12) > 0, 0), -np.inf,
                          logits)
        log_p = tf.nn.log_softmax(logits)
        real = targets != PAD
        token_log_p = tf.where(real, tf.gather(log_p, targets, batch_dims=2), 0.0)
        p = tf.exp(log_p)
        entropy = -tf.reduce_sum(tf.where(p > 0, p * log_p, 0.0), axis=-1)
        mask = tf.cast(real, tf.float32)
        return (-tf.reduce_sum(tf.reshape(adv, [4, 1]) * token_log_p), tf.reduce_sum(mask),
                tf.reduce_sum(entropy * mask))

    with tf.GradientTape() as tape:
        got = scst.loss(features, scored)
    grads = tape.gradient(got[0], model.trainable_variables)
    with tf.GradientTape() as tape:
        expected = through_call()
    expected_grads = tape.gradient(expected[0], model.trainable_variables)
    np.testing.assert_allclose([float(x) for x in got], [float(x) for x in expected],
                               rtol=1e-5)
    assert float(got[1]) == 3 + 4 + 1 + 2
    for var, g, e in zip(model.trainable_variables, grads, expected_grads):
        if e is None:                                   # not in the policy: no gradient
            assert g is None or not np.any(tf.convert_to_tensor(g).numpy()), var.path
            continue
        np.testing.assert_allclose(tf.convert_to_tensor(g).numpy(),
                                   tf.convert_to_tensor(e).numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=var.path)


def test_a_document_frequency_file_that_cannot_be_written_is_kept_in_memory(tmp_path,
                                                                            monkeypatch):
    """Counted in the validation of the last cross-entropy epoch, after its steps and before
    its checkpoint: a failed write (a quota, a full disk; ~65 MB at COCO's size) ended train
    there, and its steps were lost. It is a cache: kept in memory, with a note."""
    import errno

    from caption_attn import scst
    path = str(tmp_path / "cider_df.json")

    def full(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", path)
    monkeypatch.setattr(scst, "write_json_atomic", full)
    notes = []
    df = scst.train_document_frequency(path, {0: [[1, 5, 6, 2]], 1: [[1, 7, 8, 2]]}, 20,
                                       save=True, log=notes.append)
    assert df.num_images == 2 and df.get((5, 6)) == 1 and not os.path.exists(path)
    assert notes == [f"note: cannot write {path} (Disk quota exceeded): the document "
                     f"frequencies are kept in memory, and counted again by the next train "
                     f"of this run"]
