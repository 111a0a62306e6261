import json

import pytest

from caption_attn.errors import UserError
from caption_attn.vocab import END, PAD, SPECIAL_TOKENS, START, UNK, Vocabulary, standardize, \
    tokenize, tokenize_all


@pytest.mark.parametrize("raw, expected", [
    ("A Dog, running!", "a dog running"),
    ("  two\tspaces \n and\r\nlines ", "two spaces and lines"),
    ("Café CRÈME brûlée", "café crème brûlée"),
    ("a man's hat.", "a man s hat"),
    ("«quoted» — text…", "quoted text"),
    ("", ""),
])
def test_standardize(raw, expected):
    assert standardize(raw) == expected


def test_tokenize_keeps_non_ascii_letters():
    assert tokenize("Ein Mädchen trinkt Café.") == ["ein", "mädchen", "trinkt", "café"]


def test_special_ids_are_fixed():
    assert (PAD, START, END, UNK) == (0, 1, 2, 3)
    vocab = Vocabulary(["a"])
    assert vocab.tokens[:4] == list(SPECIAL_TOKENS)


def test_fit_orders_by_count_then_alphabet_and_caps():
    captions = ["b a c", "a b", "a", "d"]
    vocab = Vocabulary.fit(captions, vocab_size=3)
    # a:3, b:2, c:1, d:1 -> top 3 by count, ties alphabetical
    assert vocab.tokens[4:] == ["a", "b", "c"]
    assert len(vocab) == 7


def test_fit_min_count():
    vocab = Vocabulary.fit(["x y", "x z", "x"], vocab_size=10, min_count=2)
    assert vocab.tokens[4:] == ["x"]


def test_encode_decode_round_trip():
    vocab = Vocabulary.fit(["a red circle", "a blue square"])
    ids = vocab.encode("A red, SQUARE!")
    assert ids[0] == START and ids[-1] == END
    assert vocab.decode(ids) == ["a", "red", "square"]
    assert vocab.decode(ids + [PAD, PAD]) == ["a", "red", "square"]


def test_unknown_words_map_to_unk():
    vocab = Vocabulary.fit(["a circle"])
    ids = vocab.encode("a hexagon")
    assert ids[2] == UNK
    assert vocab.decode(ids) == ["a", "<unk>"]


def test_encode_truncates_to_max_length():
    vocab = Vocabulary.fit(["a b c d e"])
    ids = vocab.encode("a b c d e", max_length=2)
    assert vocab.decode(ids) == ["a", "b"] and ids[-1] == END and len(ids) == 4


def test_word_list_forms_equal_text_forms():
    captions = ["A dog's ball", "the dog, the BALL", "café au lait", "a dog"]
    words = tokenize_all(captions)
    assert words == [tokenize(c) for c in captions]
    assert words[0][1] is words[1][1]                           # "dog": one interned string
    fitted = Vocabulary.fit(captions, vocab_size=4, min_count=1)
    assert Vocabulary.fit_words(words, vocab_size=4, min_count=1) == fitted
    assert fitted.tokens[4:] == ["dog", "a", "ball", "the"]
    for caption, w in zip(captions, words):
        assert fitted.encode_words(w, 2) == fitted.encode(caption, 2)
    assert fitted.encode_words(["a", "dog", "ball"], 2) == [START, fitted.id("a"),
                                                           fitted.id("dog"), END]


def test_decode_stops_at_end_and_skips_start():
    vocab = Vocabulary(["x", "y"])
    assert vocab.decode([START, 4, END, 5]) == ["x"]


def test_save_load_identical(tmp_path):
    vocab = Vocabulary.fit(["café au lait", "un café noir"])
    path = str(tmp_path / "vocab.json")
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.tokens == vocab.tokens
    assert loaded.encode("café noir") == vocab.encode("café noir")
    assert "café" in open(path, encoding="utf-8").read()  # readable JSON, not escaped


def test_load_rejects_foreign_json(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"words": ["a"]}))
    with pytest.raises(UserError, match="not a caption_attn vocabulary"):
        Vocabulary.load(str(path))


def test_load_malformed_json_names_file(tmp_path):
    path = tmp_path / "v.json"
    path.write_text("{oops")
    with pytest.raises(UserError, match=r"v\.json: malformed JSON at line 1"):
        Vocabulary.load(str(path))


def test_bad_arguments():
    with pytest.raises(ValueError, match="`vocab_size`"):
        Vocabulary.fit(["a"], vocab_size=0)
    with pytest.raises(ValueError, match="`min_count`"):
        Vocabulary.fit(["a"], min_count=0)
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary(["<end>"])


@pytest.mark.parametrize("words, problem", [
    (["dog", "dog"], "unique"), (["dog", "<end>"], "special"), (["dog", 3], "strings"),
    (["dog", ""], "strings")])
def test_load_refuses_a_damaged_words_list_naming_the_file(tmp_path, words, problem):
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"special_tokens": list(SPECIAL_TOKENS), "words": words}))
    with pytest.raises(UserError) as e:
        Vocabulary.load(str(path))
    assert str(path) in str(e.value) and problem in str(e.value)


@pytest.mark.parametrize("raw, expected", [
    ("一只狗在草地上跑", ["一", "只", "狗", "在", "草", "地", "上", "跑"]),  # no spaces in Chinese
    ("犬が走る dog", ["犬", "が", "走", "る", "dog"]),
    ("a dog ❤️ here", ["a", "dog", "here"]),          # VS16 after the emoji: no invisible word
    ("family 👨\u200d👩\u200d👧 here", ["family", "here"]),  # ZWJ sequence
    ("zero\u200bwidth", ["zero", "width"]),
    ("co\u00adoperate\ufeff", ["cooperate"]),
    ("bell\x07ring", ["bell", "ring"]),
    ("😀 ❤️", []),
])
def test_tokenize_cjk_and_invisible_characters(raw, expected):
    assert tokenize(raw) == expected


@pytest.mark.parametrize("word", ["Dog", "two words", "一只狗", "a\u200db", "dog."])
def test_training_on_refuses_words_tokenize_never_makes(tmp_path, word):
    # a hand-edited vocabulary, or one made when a Chinese caption was a single word: its
    # words never match an encoded caption, so resuming would silently train on <unk>.
    # Decoding (caption, evaluate, export) never tokenizes: it loads as it is.
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps({"special_tokens": list(SPECIAL_TOKENS),
                                "words": ["dog", word]}))
    vocab = Vocabulary.load(str(path))
    assert vocab.decode([len(SPECIAL_TOKENS) + 1]) == [word]
    with pytest.raises(UserError, match="train --fresh") as e:
        vocab.refuse_words_never_tokenized(str(path))
    assert str(path) in str(e.value) and repr(word) in str(e.value)


@pytest.mark.parametrize("caption", ["J\u030cungle", "T\u0308ime", "W\u030arong",
                                     "\u03aa\u0301", "e\u00ad\u0301te"])
def test_a_word_tokenize_makes_is_one_it_makes_again(caption):
    """lower() and the removed soft hyphen can leave text that NFC composes further ("J" +
    combining caron lowers to "j" + caron, which NFC makes one character): a vocabulary word
    saved so was refused by the run's own resume."""
    words = tokenize(caption)
    assert all(tokenize(w) == [w] for w in words), words
