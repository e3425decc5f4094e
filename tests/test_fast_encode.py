"""mlm/speed/fast_encode.py: both shortcuts give exactly the plain way's ids and word ids on every hard case and
on the whole IMDb train split; tokenizers outside their arguments, and shortcuts planted wrong, get caught."""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

import mlm.speed.fast_encode as fast_encode
from mlm.corpus import load_chunks
from mlm.data import tokenize_and_chunk
from mlm.masking import word_starts
from mlm.tokenizer import encoded_arrays, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"
SHARED_HUB = ROOT.parent / "shared" / "hub"
SHARED_TOKENIZER = SHARED_HUB / "models" / "distilbert-base-uncased"
SHARED_IMDB_TRAIN = SHARED_HUB / "datasets" / "stanfordnlp" / "imdb" / "plain_text" / "train-00000-of-00001.parquet"
TEXTS = ["a good movie, really.", "the plot was bad!", "i love this film", "boring and too long", "great acting"]
# Every case the arguments name: literal special and added tokens in any case, inside and beside words; [UNK]
# (unknown characters, a word over max_input_chars_per_word); "#" and "##" in the text; punctuation; what the
# normalizer removes, strips, splits or maps (control characters, tabs and line breaks, accents, zero-width
# characters, CJK); upper case; empty texts.
HARD_TEXTS = ["[SEP]", "a [SEP] b[SEP]c [UNK]d [MASK]", "[CLS][CLS]x[PAD]", "[sep] [cls] [Sep]", "##s ## # #",
              "a## ###a ##the the##", "x" * 101 + " x" * 3, "X" * 101 + " X" * 3, "\U0001f600 ☃ 😀x", "", " ",
              "\t\n \r", "\x00", "\u0301", "a\x00b \u0301c \u200bd \ufeffe", "naïve café ÉTAT", "中文字x 日本",
              "don't, stop. (really)!?", "the movie was great", "THE MOVIE Was GREAT", "onewordonly", "a", "...",
              "i" * 7 + "!" * 5, "Tab\there\r\nCR\x0bvt\x0cff\x01soh\x7fdel\x1fus end", "[Mask] [MASK] [mask]"]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def tokenizers_to_check(tiny_tokenizer_dir):
    folders = [SMOKE, tiny_tokenizer_dir] + ([SHARED_TOKENIZER] if SHARED_TOKENIZER.is_dir() else [])
    return [load_tokenizer(folder) for folder in folders]


def exact_stream(tokenizer, texts, special=True):
    return encoded_arrays(tokenizer.backend.encode_batch(texts, add_special_tokens=special))


def skips_normalizer(encode) -> bool:
    """Whether `encode` (from fast_encoder) takes the normalizer shortcut: the tests below check that shortcut only
    where it runs, so they assert that it does."""
    calls, real = [], fast_encode._encode_batch
    with mock.patch.object(fast_encode, "_encode_batch", lambda *args: calls.append(args[3]) or real(*args)):
        encode(["x"], True)
    return calls[0] is not None


def assert_same_as_plain(encode, tokenizer, texts):
    for special in (True, False):
        for batch in ([text] for text in texts):  # each alone, as a first and last text too
            np.testing.assert_array_equal(np.concatenate(encode(batch, special)[:2]),
                                          np.concatenate(exact_stream(tokenizer, batch, special)[:2]))
        for got, want in zip(encode(texts, special), exact_stream(tokenizer, texts, special)):
            np.testing.assert_array_equal(got, want)


def test_both_shortcuts_equal_the_tokenizer_on_every_hard_case(tiny_tokenizer_dir):
    texts = HARD_TEXTS + [" ".join(HARD_TEXTS), "".join(HARD_TEXTS)] + TEXTS
    for tokenizer in tokenizers_to_check(tiny_tokenizer_dir):
        encode = fast_encode.fast_encoder(tokenizer)
        assert encode is not None and skips_normalizer(encode)  # BERT-style WordPiece: both shortcuts
        assert_same_as_plain(encode, tokenizer, texts)


def test_the_text_shortcut_covers_plain_ascii_only(tokenizer):
    _, prepare, covered = fast_encode._text_shortcut(tokenizer)
    assert covered("The Movie was GREAT!\tReally.\r\n") and prepare("The MOVIE\t") == "the movie\t"
    for text in ("café", "a\x00b", "a\x7f", "x\x0by", "see [SEP] here", "[MASK]", "\u200b"):
        assert not covered(text), repr(text)
    assert covered("[sep] [mask]")  # not an added token's spelling: the normalizer only lowercases it


def test_a_literal_sep_and_one_word_documents_keep_their_word_starts(tokenizer):
    """A literal [SEP] is in a word, unlike the template's; two one-word documents in a row share word id 0,
    which the course's collator reads as one word across [SEP] [CLS]: the word starts must say so either way."""
    texts = ["[SEP]", "word", "word", "two words", "[SEP] x"]
    got = fast_encode.fast_encoder(tokenizer)(texts, True)
    want = exact_stream(tokenizer, texts)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(word_starts(got[1][None]), word_starts(want[1][None])):
        assert torch.equal(a, b)
    assert (got[1][np.cumsum(got[2])[0] - 2] == 0)  # the literal [SEP] has a word id


def with_backend(tokenizer, change):
    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    change(backend)
    return dataclasses.replace(tokenizer, backend=backend)


@pytest.mark.parametrize("change", ["cased", "no_clean_text", "lowercase_raw_added_token", "normalized_added_token",
                                    "other_normalizer", "wrong_cover", "wrong_prepare"])
def test_the_text_shortcut_only_where_its_argument_holds(monkeypatch, change):
    """A cased BertNormalizer keeps the shortcut (nothing to lower); so does an added token matched in the raw
    text, but not on a text whose lowering spells it ("A Good Movie"); a normalized added token or another
    normalizer gets the derivation alone; a shortcut planted wrong fails the probe and is not used."""
    changes = {
        "cased": lambda b: setattr(b, "normalizer", normalizers.BertNormalizer(lowercase=False)),
        "no_clean_text": lambda b: setattr(b, "normalizer", normalizers.BertNormalizer(clean_text=False)),
        "lowercase_raw_added_token": lambda b: b.add_tokens([AddedToken("good movie", normalized=False)]),
        "normalized_added_token": lambda b: b.add_tokens([AddedToken("good movie", normalized=True)]),
        "other_normalizer": lambda b: setattr(b, "normalizer", normalizers.Lowercase()),
        "wrong_cover": lambda b: None,
        "wrong_prepare": lambda b: None,
    }
    if change == "wrong_cover":  # control characters let through: the normalizer would have removed them
        monkeypatch.setattr(fast_encode, "_CONTROL", fast_encode.re.compile(r"\x00"))
    if change == "wrong_prepare":  # the text given as it is: the normalizer would have lowered it
        shortcut = fast_encode._text_shortcut
        monkeypatch.setattr(fast_encode, "_text_shortcut", lambda t: (lambda s: s and (s[0], str, s[2]))(shortcut(t)))
    changed = with_backend(load_tokenizer(SMOKE), changes[change])  # its ids have no gap for an added token
    encode = fast_encode.fast_encoder(changed)
    assert encode is not None and skips_normalizer(encode) == (change in ("cased", "no_clean_text",
                                                                          "lowercase_raw_added_token"))
    assert_same_as_plain(encode, changed, HARD_TEXTS + TEXTS + ["A Good Movie"])


@pytest.mark.parametrize("change", ["whitespace_split", "added_prefixed_token", "added_token_reusing_an_id",
                                    "truncation", "padding", "word_level_model", "wrong_derivation"])
def test_tokenizers_the_argument_does_not_cover_keep_the_exact_word_ids(tmp_path, tokenizer, monkeypatch, change):
    """Where the derivation is not shown exact, the store asks the tokenizer for word ids, and still equals the
    course's chunks."""
    changes = {
        # "##s" is then a word whose first piece is the vocabulary's continuation "##s"
        "whitespace_split": lambda b: setattr(b, "pre_tokenizer", pre_tokenizers.WhitespaceSplit()),
        "added_prefixed_token": lambda b: b.add_tokens(["##zz"]),
        # the tiny vocabulary lists "a" and "i" twice, so its ids have gaps and the new token takes "##7"'s id
        "added_token_reusing_an_id": lambda b: b.add_tokens(["good movie"]),
        "truncation": lambda b: b.enable_truncation(8),
        "padding": lambda b: b.enable_padding(length=8),
        "word_level_model": lambda b: setattr(b, "model", models.WordLevel(b.get_vocab(), unk_token="[UNK]")),
        "wrong_derivation": lambda b: None,
    }
    if change == "wrong_derivation":  # the probe catches a derivation that disagrees with the tokenizer
        derive = fast_encode.derived_word_ids
        monkeypatch.setattr(fast_encode, "derived_word_ids", lambda *args: derive(*args) + 1)
    changed = with_backend(tokenizer, changes[change])
    assert fast_encode.fast_encoder(changed) is None
    if change in ("whitespace_split", "added_prefixed_token"):  # where the derivation would indeed be wrong
        vocab = changed.backend.get_vocab(with_added_tokens=True)
        continuation = np.array([token.startswith("##") for token, _ in sorted(vocab.items(), key=lambda x: x[1])])
        ids, words, lengths = exact_stream(changed, ["##s the ##zz"])
        assert not np.array_equal(fast_encode.derived_word_ids(ids, lengths, continuation, 1, 1), words)
    if change in ("truncation", "padding"):
        return  # the course path does not tokenize with these on either
    texts = ["##s ##s the ##s movie", "the film ##zz was good", "i love it ##a", "a good movie"] * 4
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    course = tokenize_and_chunk(texts, changed, chunk_size=8)
    stored = load_chunks(tmp_path / "c.jsonl", "train", changed, chunk_size=8, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(stored.input_ids, course.input_ids)
    for a, b in zip(word_starts(stored.word_ids), word_starts(course.word_ids)):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_IMDB_TRAIN.is_file() and SHARED_TOKENIZER.is_dir()),
                    reason="needs a local copy of IMDb and its tokenizer")
def test_both_shortcuts_equal_the_tokenizer_on_the_whole_imdb_train_split():
    tokenizer = load_tokenizer(SHARED_TOKENIZER)
    texts = pq.read_table(SHARED_IMDB_TRAIN, columns=["text"]).column("text").to_pylist()
    encode = fast_encode.fast_encoder(tokenizer)
    assert skips_normalizer(encode)
    _, _, covered = fast_encode._text_shortcut(tokenizer)
    assert 0.8 < np.mean([covered(text) for text in texts]) < 1  # both routes are taken
    for first in range(0, len(texts), 5000):
        batch = texts[first : first + 5000]
        for got, want in zip(encode(batch, True), exact_stream(tokenizer, batch)):
            np.testing.assert_array_equal(got, want)


def test_random_texts_with_each_ascii_character_and_the_tricky_others(tiny_tokenizer_dir):
    """Seeded random texts of words and spaces, each with up to two rare pieces: any ASCII character that is not
    a letter or digit, the special tokens' spellings, or a character the normalizer treats apart (accents,
    combining marks, CJK, zero-width, U+FFFD, non-ASCII spaces), so that each rare piece is often a text's only
    one and a shortcut wrong about it alone shows."""
    import random

    common = list(string.ascii_letters + string.digits) + [" "] * 10 + ["the", "The", "movie", "##"]
    rare = [c for c in map(chr, range(128)) if not c.isalnum()] + [
        "[SEP]", "[CLS]", "[MASK]", "[UNK]", "[PAD]", "[sep]", "é", "É", "\u0301", "中", "\u200b", "\ufffd", "\u00a0",
        "\u3000", "\u2028", "\x85"]
    rng = random.Random(0)

    def text():
        pieces = [rng.choice(common) for _ in range(rng.randint(0, 30))]
        for _ in range(rng.randint(0, 2)):
            pieces.insert(rng.randint(0, len(pieces)), rng.choice(rare))
        return "".join(pieces)

    for tokenizer in tokenizers_to_check(tiny_tokenizer_dir):
        encode = fast_encode.fast_encoder(tokenizer)
        assert skips_normalizer(encode)
        for _ in range(300):
            texts = [text() for _ in range(rng.randint(1, 8))]
            for special in (True, False):
                for got, want in zip(encode(texts, special), exact_stream(tokenizer, texts, special)):
                    np.testing.assert_array_equal(got, want)
