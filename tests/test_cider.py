"""CIDEr-D reward: against a plain-Python coco-caption CiderScorer and pycocoevalcap itself."""

import collections
import json
import math
import os

import numpy as np
import pytest

from caption_attn.errors import UserError
from caption_attn.cider import CiderD, DocumentFrequency
from caption_attn.ngrams import MAX_VOCAB_SIZE, CodeIndex, check_vocab_size
from caption_attn.scst import advantages
from caption_attn.vocab import END, PAD, START, UNK

V = 40                 # small, so that captions share n-grams
T = 12                 # candidates' maximum length


# --------------------------------------------------------------------------- reference code
def precook(words, n=4):
    """coco-caption's precook on a list of tokens: {n-gram tuple: count}."""
    counts = collections.defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def plain_df(references, with_end=True):
    """coco-caption's compute_doc_freq: images whose references (as a set) hold the n-gram."""
    df = collections.defaultdict(int)
    for refs in references.values():
        for ngram in {g for r in refs for g in precook(list(r) + [END] * with_end)}:
            df[ngram] += 1
    return df


def plain_cider_d(candidate, refs, df, num_images, sigma=6.0, clip=True):
    """coco-caption's CiderScorer.compute_cider for one candidate (token lists), dicts only."""
    log_n = math.log(float(num_images))

    def counts2vec(counts):
        vec, norm, length = [{} for _ in range(4)], [0.0] * 4, 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            vec[k][ngram] = float(tf) * (log_n - math.log(max(1.0, df.get(ngram, 0))))
            norm[k] += vec[k][ngram] ** 2
            if k == 1:
                length += tf            # coco-caption's "length" counts bigrams
        return vec, [math.sqrt(x) for x in norm], length

    vec, norm, length = counts2vec(precook(candidate))
    score = [0.0] * 4
    for ref in refs:
        vec_r, norm_r, length_r = counts2vec(precook(ref))
        for k in range(4):
            val = 0.0
            for ngram, v in vec[k].items():
                r = vec_r[k].get(ngram, 0.0)
                val += (min(v, r) if clip else v) * r
            if norm[k] != 0 and norm_r[k] != 0:
                val /= norm[k] * norm_r[k]
            score[k] += val * math.e ** (-((length - length_r) ** 2) / (2 * sigma ** 2))
    return sum(score) / 4 / len(refs) * 10.0


def words_of(candidate, with_end):
    """The tokens the reward sees: up to the first <end>/<pad>, <end> kept with `with_end`;
    a candidate's <unk> as a token no reference holds (it matches nothing, as the "<unk>" of
    a caption matches no real word in `evaluate`)."""
    out = []
    for t in candidate:
        if t in (END, PAD):
            if t == END and with_end:
                out.append(END)
            break
        out.append("unk" if t == UNK else int(t))
    return out


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data():
    """50 images x 5 references (10 of them 4 or 7; 3-10 words, Zipf-like over ids 3..V-2: some <unk>, and
    V-1 in none) and 6 candidates each (0-12 words: half end with <end>, some are cut at T,
    one copies a reference)."""
    rng = np.random.default_rng(7)
    p = 1.0 / np.arange(1, V - UNK) ** 1.1
    p /= p.sum()
    words = lambda k: [int(w) for w in rng.choice(np.arange(UNK, V - 1), k, p=p)]
    count = lambda i: {3: 7, 7: 4}.get(i % 10, 5)          # COCO has images with 4..7 too
    references = {2 * i + 1: [words(rng.integers(3, 11)) for _ in range(count(i))]
                  for i in range(50)}
    image_index, candidates = [], []
    for key, refs in references.items():
        for j in range(6):
            c = list(refs[j])[:T] if j == 0 else words(rng.integers(0, T + 1))
            row = c + [END] * (len(c) < T and j % 2 == 0)
            image_index.append(key)
            candidates.append(row + [PAD] * (T - len(row)))
    return references, np.array(image_index), np.array(candidates)


@pytest.fixture(scope="module")
def df(data):
    return DocumentFrequency.build(data[0], V)


def plain_scores(data, df, with_end):
    references, image_index, candidates = data
    table = plain_df(references)
    return np.array([plain_cider_d(words_of(c, with_end),
                                   [list(r) + [END] * with_end for r in references[i]],
                                   table, df.num_images)
                     for i, c in zip(image_index, candidates)])


# --------------------------------------------------------------------------- document freq.
def test_document_frequency_counts_images_as_coco_caption(data, df):
    table = plain_df(data[0])
    assert df.num_images == 50 and len(df) == len(table)
    assert all(df.get(ngram) == count for ngram, count in table.items())
    assert df.get((V - 1, V - 1, V - 1, V - 1)) == 0


def test_references_may_be_encoded_with_start_end_and_padding(data, df):
    encoded = {k: [[START] + r + [END, PAD, PAD] for r in refs] for k, refs in data[0].items()}
    again = DocumentFrequency.build(encoded, V)
    assert np.array_equal(again.codes, df.codes) and np.array_equal(again.counts, df.counts)


def test_df_json_round_trip(df, tmp_path):
    path = str(tmp_path / "run" / "cider_df.json")
    df.save(path)
    again = DocumentFrequency.load(path, vocab_size=V)
    assert (again.num_images, again.vocab_size) == (df.num_images, df.vocab_size)
    assert np.array_equal(again.codes, df.codes) and np.array_equal(again.counts, df.counts)
    assert not [f for f in os.listdir(tmp_path / "run") if f.startswith(".")]  # no temp left


def test_df_file_from_another_vocabulary_is_refused(df, tmp_path):
    path = str(tmp_path / "cider_df.json")
    df.save(path)
    with pytest.raises(UserError, match="cider_df.json.*41"):
        DocumentFrequency.load(path, vocab_size=V + 1)


@pytest.mark.parametrize("damage", ["truncated", "not_integers", "wrong_n", "no_format",
                                    "count_too_big", "group_not_object"])
def test_malformed_df_file_is_a_user_error_naming_it(df, tmp_path, damage):
    path = str(tmp_path / "cider_df.json")
    df.save(path)
    text = open(path, encoding="utf-8").read()
    d = json.loads(text)
    if damage == "truncated":
        text = text[:len(text) // 2]
    else:
        if damage == "not_integers":
            d["ngrams"]["2"]["1"] += " 7x"
        elif damage == "wrong_n":
            d["ngrams"]["1"]["1"] = d["ngrams"]["3"]["1"]
        elif damage == "no_format":
            del d["format"]
        elif damage == "count_too_big":
            d["ngrams"]["1"]["51"] = "1"
        elif damage == "group_not_object":
            d["ngrams"]["4"] = ["1 2 3"]
        text = json.dumps(d)
    open(path, "w", encoding="utf-8").write(text)
    with pytest.raises(UserError, match="cider_df.json"):
        DocumentFrequency.load(path)


def test_vocab_size_is_checked():
    assert check_vocab_size(MAX_VOCAB_SIZE) == MAX_VOCAB_SIZE
    assert (MAX_VOCAB_SIZE + 1) ** 4 > 2 ** 63 - 1 >= MAX_VOCAB_SIZE ** 4 - 1
    with pytest.raises(ValueError, match=r"`vocab_size`.*55109"):
        DocumentFrequency.build({0: [[5, 6]]}, MAX_VOCAB_SIZE + 1)
    with pytest.raises(ValueError, match=r"`references` holds ids outside 0\.\.39.*45"):
        DocumentFrequency.build({0: [[5, 45]]}, V)


def test_code_index_finds_every_code_and_only_them():
    """1000 codes in a 4096-slot table (collisions certain), some differing only in their top
    bits, queried with absent codes mixed in, in any order."""
    rng = np.random.default_rng(3)
    codes = np.unique(np.concatenate([rng.integers(1, 2 ** 62, 900),
                                      np.arange(1, 101, dtype=np.int64) << 56]))
    codes = rng.permutation(codes)
    index = CodeIndex(codes)
    queries = np.concatenate([codes, rng.integers(1, 2 ** 62, 500), [0, 2 ** 63 - 1]])
    position = {int(c): i for i, c in enumerate(codes)}
    want = [position.get(int(q), -1) for q in queries]
    assert index.find(queries).tolist() == want
    assert CodeIndex(np.zeros(0, np.int64)).find(np.array([5])).tolist() == [-1]


# --------------------------------------------------------------------------- CIDEr-D
@pytest.mark.parametrize("with_end", [True, False])
def test_reward_equals_plain_cider_d(data, df, with_end):
    _, image_index, candidates = data
    got = CiderD(data[0], df, with_end=with_end)(image_index, candidates)
    want = plain_scores(data, df, with_end)
    assert got.shape == (300,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert (want > 0).mean() > 0.5 and want.max() > 1.0   # the data exercises real matches


@pytest.mark.parametrize("with_end", [True, False])
def test_reward_equals_pycocoevalcap_cider(data, df, with_end):
    """pycocoevalcap's Cider (what `evaluate` reports) is CIDEr-D: it clips and has the
    sigma-6 length penalty, and counts df over the references it is given. Given exactly the
    references the df was counted on, one candidate per image, it gives our reward."""
    from pycocoevalcap.cider.cider import Cider

    references, image_index, candidates = data
    scorer = CiderD(references, df, with_end=with_end)
    text = lambda ids: " ".join(map(str, ids))
    gts = {k: [text(list(r) + [END] * with_end) for r in refs] for k, refs in references.items()}
    for j in range(6):                      # candidate j of every image, one corpus each
        rows = np.arange(j, image_index.size, 6)
        res = {int(k): [text(words_of(c, with_end))]
               for k, c in zip(image_index[rows], candidates[rows])}
        _, theirs = Cider().compute_score(gts, res)
        np.testing.assert_allclose(scorer(image_index[rows], candidates[rows]), theirs,
                                   rtol=1e-9, atol=1e-12)


def test_an_unknown_word_in_a_candidate_matches_nothing():
    """References hold <unk> where a word is out of the vocabulary ("a <unk> on grass" for
    "a zebra on grass"). A candidate's <unk> matched them: "a <unk> on grass" scored 4.79
    against 1.40 for "a on grass" in val_cider, while `evaluate`'s CIDEr (the caption's
    "<unk>" matches no real word) ranked it lowest, and the self-critical reward paid for
    saying <unk>. Now a candidate's <unk> scores as a word no reference has (id V - 1)."""
    references = {0: [[5, UNK, 7, 8]], 1: [[9, 10]], 2: [[11, UNK]]}
    df = DocumentFrequency.build(references, V)
    for with_end in (True, False):
        score = CiderD(references, df, with_end=with_end)
        unk, unseen, dropped = score([0, 0, 0], np.array([[5, UNK, 7, 8, END],
                                                          [5, V - 1, 7, 8, END],
                                                          [5, 7, 8, END, PAD]]))
        assert unk == pytest.approx(unseen, rel=1e-12)
        assert unk < 10.0 - 1e-6      # no longer the reference word for word
        assert dropped > unk          # leaving the word out ranks above <unk>, as in evaluate


def test_clipping_is_part_of_the_score():
    """A candidate repeating a reference's word: clipped (coco-caption, pycocoevalcap) and
    unclipped similarity differ, and the reward is the clipped one."""
    from pycocoevalcap.cider.cider import Cider

    references = {0: [[5, 6, 7]], 1: [[8, 9, 10]], 2: [[11, 12]]}
    df = DocumentFrequency.build(references, V)
    table = plain_df(references, with_end=False)
    candidate = [5, 5, 5, 6]
    got = CiderD(references, df, with_end=False)([0], np.array([candidate + [END]]))[0]
    clipped = plain_cider_d(candidate, references[0], table, 3)
    unclipped = plain_cider_d(candidate, references[0], table, 3, clip=False)
    theirs = Cider().compute_score({k: [" ".join(map(str, r[0]))] for k, r in references.items()},
                                   {0: ["5 5 5 6"], 1: ["8"], 2: ["11"]})[1][0]
    assert got == pytest.approx(clipped, rel=1e-12) and got == pytest.approx(theirs, rel=1e-12)
    assert unclipped > 1.5 * clipped


def test_end_token_rewards_finishing_the_caption():
    """`finished` says "a man riding a horse" and stops; `cut` has the same words but was cut
    at T=5 while going on; `early` stops mid-phrase. Without <end> the reward cannot tell
    `cut` from `finished`; with it, only `finished` gets the n-grams that end the references
    ("horse <end>", "a horse <end>", ...) and `early` earns an unmatched "a <end>"."""
    a, man, riding, horse, dog, on, beach = range(4, 11)
    references = {0: [[a, man, riding, a, horse], [a, man, riding, a, horse],
                      [a, man, on, a, horse]],
                  1: [[a, dog, on, a, beach], [a, dog, on, beach]]}
    df = DocumentFrequency.build(references, V)
    finished = np.array([[a, man, riding, a, horse, END]])
    cut = np.array([[a, man, riding, a, horse]])
    early = np.array([[a, man, riding, a, END, PAD]])
    scores = {}
    for with_end in (True, False):
        reward = CiderD(references, df, with_end=with_end)
        scores[with_end] = [reward([0], c)[0] for c in (finished, cut, early)]
    assert scores[False][0] == pytest.approx(scores[False][1], rel=1e-12)
    assert scores[True][0] > 1.1 * scores[True][1]        # measured 8.11 vs 6.96
    assert scores[True][2] / scores[True][0] < scores[False][2] / scores[False][0]


def test_zero_rewards_are_zeros_and_empty_candidates_are_finite(data, df):
    references = data[0]
    key = next(iter(references))
    unseen = V - 1
    assert df.get((unseen,)) == 0
    candidates = np.array([[unseen] * T, [unseen, unseen, END] + [PAD] * (T - 3),
                           [END] + [PAD] * (T - 1), [PAD] * T])
    for with_end in (True, False):
        rewards = CiderD(references, df, with_end=with_end)([key] * 4, candidates)
        assert np.isfinite(rewards).all() and (rewards >= 0).all()
        assert rewards[0] == 0.0 and rewards[1] == 0.0
        if not with_end:
            assert (rewards == 0.0).all()           # an empty caption has no n-gram at all
    assert (advantages(np.zeros((2, 3))) == 0).all()


def test_reward_input_checks(data, df):
    references, image_index, candidates = data
    reward = CiderD(references, df)
    with pytest.raises(ValueError, match="`image_index` 2 has no references"):
        reward([2], candidates[:1])
    with pytest.raises(ValueError, match=r"`candidates` must be an int array \(N=2, T\)"):
        reward(image_index[:2], candidates[:3])
    with pytest.raises(ValueError, match=r"`candidates` holds ids outside 0\.\.39.*40"):
        reward(image_index[:1], np.full((1, 3), V))
    with pytest.raises(ValueError, match="`sigma`"):
        CiderD(references, df, sigma=0)
    with pytest.raises(ValueError, match=r"`references`\[5\] has no reference"):
        CiderD({5: []}, df)


def test_images_outside_the_df_are_scored_with_train_idf(data, df):
    """Monitoring val captions: references of images the df never counted, with n-grams no
    train image has (V-1) (idf log N, as coco-caption gives an n-gram of df 0)."""
    table = plain_df(data[0])
    val = {1000: [[V - 1, V - 2, 5], [V - 1, 5, 6]], 1001: [[7, 8, V - 2]]}
    candidates = np.array([[V - 1, V - 2, 5, END], [7, 8, V - 1, END]])
    got = CiderD(val, df, with_end=False)([1000, 1001], candidates)
    want = [plain_cider_d([V - 1, V - 2, 5], val[1000], table, 50),
            plain_cider_d([7, 8, V - 1], val[1001], table, 50)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("with_end", [False, True])
def test_new_ngrams_of_val_references_do_not_hide_the_others(data, df, with_end):
    """Val references' n-grams that no train image has got ids after the df's, out of the
    code order by which a candidate's n-grams are searched in its image's: matches were
    missed (val_cider 0.854 for 1.707 in the first case; 199 of 200 COCO-like val images
    scored low, by up to 57 %), and early stopping and best.keras followed those values."""
    train = {0: [[5, 6, 7]], 1: [[8, 9, 10, 5]], 2: [[5, 6, 9]]}
    val = {7: [[30, 5, 6]]}
    got = CiderD(val, DocumentFrequency.build(train, V), with_end=with_end)(
        [7], np.array([[5, 6, END]]))
    want = plain_cider_d([5, 6] + [END] * with_end, [[30, 5, 6] + [END] * with_end],
                         plain_df(train), 3)
    np.testing.assert_allclose(got, [want], rtol=1e-12)
    # at random: every image's references hold n-grams of new words (ids 3..V-1 shuffled)
    rng = np.random.default_rng(3)
    val = {1000 + i: [list(rng.integers(3, V, rng.integers(3, 10))) for _ in range(4)]
           for i in range(30)}
    image_index = np.repeat(sorted(val), 2)
    candidates = np.full((image_index.size, T), PAD)
    for row, i in enumerate(image_index):   # half a reference's words, half random ones
        words = val[i][row % 4][:6] if row % 2 else list(rng.integers(3, V, 6))
        candidates[row, :len(words) + 1] = words + [END]
    got = CiderD(val, df, with_end=with_end)(image_index, candidates)
    table = plain_df(data[0])
    want = [plain_cider_d(words_of(c, with_end), [r + [END] * with_end for r in val[i]],
                          table, df.num_images) for i, c in zip(image_index, candidates)]
    assert min(want) < max(want)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_val_cider_scores_whole_references_and_no_unknown_word():
    """`Validator.cider` (val_cider) against pycocoevalcap's Cider, which `evaluate` reports:
    its references were the training ids, cut at --max-length (here a 45-word reference),
    and a greedy caption's <unk> matched every word out of the vocabulary. With the df
    counted on the same references, the two agree (the <unk> caption as text matches
    nothing there either)."""
    from pycocoevalcap.cider.cider import Cider

    from caption_attn.captioner import Caption
    from caption_attn.validation import Validator
    from caption_attn.vocab import Vocabulary, tokenize_all

    long = " ".join(["a", "dog", "runs"] * 15)                     # 45 words
    references = {"a.jpg": ["a dog on grass", long, "a brown dog on green grass"],
                  "b.jpg": ["a zebra on grass", "a cat sits on a mat"],
                  "c.jpg": ["two cats on a mat", "a cat and a cat"]}
    vocab = Vocabulary.fit_words([w for w in ws if w != "zebra"]      # "zebra" unknown
                                 for refs in references.values() for ws in tokenize_all(refs))
    ids = {i: [vocab.encode_words(w) for w in tokenize_all(references[k])]
           for i, k in enumerate(sorted(references))}
    validator = object.__new__(Validator)
    validator.vocab, validator.references, validator._cider = vocab, references, None
    validator.metric_keys = sorted(references)
    validator._metric_index = {k: i for i, k in enumerate(validator.metric_keys)}
    validator._df_factory = lambda: DocumentFrequency.build(ids, len(vocab))
    captions = {"a.jpg": "a dog runs a dog runs", "b.jpg": "a <unk> on grass",
                "c.jpg": "a cat on a mat"}
    ours = validator.cider({k: Caption(c.split(), 0.0, np.zeros((0, 64))) for k, c in
                            captions.items()})
    gts = {k: [" ".join(w) for w in tokenize_all(refs)] for k, refs in references.items()}
    theirs, _ = Cider().compute_score(gts, {k: [c] for k, c in captions.items()})
    assert ours == pytest.approx(theirs, rel=1e-9)
