"""Tokenizers of each family: WordPiece (uncased and cased) and byte-level BPE laid out as RoBERTa's.

Their special tokens come from their own files, their word ids are the pre-tokenizer's splits, `save` writes what
each family needs, and the corpus store and the tokenizing shortcuts give exactly the plain path's tokens."""

from __future__ import annotations

import dataclasses
import json
import unicodedata

import numpy as np
import pytest
import torch
from conftest import CASED_VOCAB, TINY_BPE
from tokenizers import Tokenizer as BackendTokenizer

import mlm.corpus_store as corpus_store
from mlm.corpus import load_chunks
from mlm.data import tokenize, tokenize_and_chunk
from mlm.masking import MaskingCollator, word_starts
from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.speed.fast_encode import fast_tokenizer
from mlm.tokenizer import load_tokenizer, template_ids
from mlm.vocabulary import add_words

# Runs of blanks of every kind, words glued to punctuation, an emoji (several byte-level pieces), a contraction.
LONG = " ".join(["The plot  was\n\n really", "boring,\t\tI'd say", "😀 ACTOR123", "great   acting.\r\n Wow"] * 30)
TEXTS = ["a good movie, really.", LONG, "the plot was bad!", "I love this film", LONG[:500] + "  ", "  great acting"]


@pytest.fixture(scope="module", params=["uncased", "cased", "bpe"])
def family(request, tiny_tokenizer_dir, cased_tokenizer_dir):
    return load_tokenizer({"uncased": tiny_tokenizer_dir, "cased": cased_tokenizer_dir, "bpe": TINY_BPE}[
        request.param])


def test_special_tokens_come_from_each_tokenizers_files(tiny_tokenizer_dir, cased_tokenizer_dir):
    bpe, cased = load_tokenizer(TINY_BPE), load_tokenizer(cased_tokenizer_dir)
    ids = lambda t: (t.cls_token_id, t.sep_token_id, t.pad_token_id, t.mask_token_id, t.unk_token_id)  # noqa: E731
    assert ids(bpe) == (0, 2, 1, 576, 3) and bpe.mask_token == "<mask>" and bpe.vocab_size == 577
    assert ids(cased) == tuple(CASED_VOCAB.index(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"))
    assert ids(cased) == (240, 241, 238, 242, 239)
    assert [t.tolist() for t in template_ids(bpe)] == [[0], [2]]
    collator = MaskingCollator.from_tokenizer(bpe)
    assert (collator.mask_token_id, collator.pad_token_id, collator.special_token_ids) == (576, 1, (0, 1, 2, 3, 576))
    # A literal <mask> in the text is the mask token, the space before it swallowed as RoBERTa's is.
    assert bpe.backend.encode("a great <mask>.").ids == [0, 68, 401, 576, 17, 2]


@pytest.mark.parametrize("files", ["special_tokens_map.json", "tokenizer.json alone"])
def test_a_folder_naming_its_special_tokens_elsewhere_or_nowhere_saves_them(tmp_path, files):
    # roberta-base on the Hub ships tokenizer.json with neither tokenizer_config.json nor special_tokens_map.json:
    # transformers takes RoBERTa's names then. Other folders name them in special_tokens_map.json only.
    folder, saved = tmp_path / "given", tmp_path / "saved"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((TINY_BPE / "tokenizer.json").read_bytes())
    if files == "special_tokens_map.json":
        names = json.loads((TINY_BPE / "tokenizer_config.json").read_text())
        (folder / files).write_text(json.dumps({key: value for key, value in names.items() if key.endswith("_token")}))
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    given = load_tokenizer(folder)
    given.save(saved)
    for tokenizer in (given, load_tokenizer(saved)):
        assert (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id,
                tokenizer.unk_token_id, tokenizer.mask_token) == (0, 2, 1, 576, 3, "<mask>")
    assert json.loads((saved / "tokenizer_config.json").read_text())["mask_token"] == "<mask>"


def test_cased_wordpiece_keeps_the_case(cased_tokenizer_dir, tiny_tokenizer_dir):
    cased, uncased = load_tokenizer(cased_tokenizer_dir), load_tokenizer(tiny_tokenizer_dir)
    assert cased.backend.encode("The MOVIE movie").tokens == ["[CLS]", "The", "MOVIE", "movie", "[SEP]"]
    assert uncased.backend.encode("The MOVIE movie").tokens == ["[CLS]", "the", "movie", "movie", "[SEP]"]


def test_bpe_word_ids_are_the_pre_tokenizer_splits():
    # Built independently: each split of the ByteLevel pre-tokenizer is a word, tokenized by the BPE model alone.
    tokenizer = load_tokenizer(TINY_BPE)
    text = "The plot  was\n\n hyperparameterized, I'd say 😀!"
    splits = tokenizer.backend.pre_tokenizer.pre_tokenize_str(text)
    pieces = [tokenizer.backend.model.tokenize(split) for split, _ in splits]
    ids, words, lengths = tokenize([text], tokenizer)
    assert ids.tolist() == [0] + [token.id for split in pieces for token in split] + [2]
    assert words.tolist() == [-1] + [word for word, split in enumerate(pieces) for _ in split] + [-1]
    assert lengths.tolist() == [len(ids)]
    # So a piece spelt with "Ġ" (a space before it) always starts a word: it continues nothing.
    starts, _ = word_starts(torch.from_numpy(words[None]))
    spaced = np.array([tokenizer.backend.id_to_token(int(i)).startswith("Ġ") for i in ids])
    assert starts[0].numpy()[spaced].all() and len(splits) == 11 and len(ids) > len(splits) + 2


def test_save_writes_what_each_family_needs(tmp_path, family):
    family.save(tmp_path)
    wordpiece = family.mask_token == "[MASK]"
    written = {"tokenizer.json", "tokenizer_config.json"} | ({"vocab.txt"} if wordpiece else set())
    assert {file.name for file in tmp_path.iterdir()} == written
    if wordpiece:  # the WordPiece vocabulary in id order, for slow loaders
        vocab = family.backend.get_vocab(with_added_tokens=False)
        assert (tmp_path / "vocab.txt").read_text().splitlines() == sorted(vocab, key=vocab.get)
    reloaded = load_tokenizer(tmp_path)
    for a, b in zip(tokenize(TEXTS, reloaded), tokenize(TEXTS, family)):
        np.testing.assert_array_equal(a, b)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["mask_token"] == family.mask_token


def test_store_equals_the_in_memory_chunks_with_long_documents_in_slices(tmp_path, monkeypatch, family):
    # Slices of 20 to 43 characters end at every kind of place. For byte-level BPE a run of blanks is a word of its
    # own before the next word's "Ġ": a slice cut anywhere but at a run's last blank would split it in two words.
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    memory = tokenize_and_chunk(TEXTS, family, chunk_size=16, group_size=2)
    monkeypatch.setattr(corpus_store, "PIECE_CHARS", 700)
    for slice_chars in range(20, 44):
        monkeypatch.setattr(corpus_store, "SLICE_CHARS", slice_chars)
        stored = load_chunks(corpus, "train", family, chunk_size=16, group_size=2,
                             cache_dir=tmp_path / str(slice_chars))
        assert (stored.n_tokens, stored.n_reviews, len(stored)) == (memory.n_tokens, memory.n_reviews, len(memory))
        np.testing.assert_array_equal(stored.input_ids, memory.input_ids)
        starts = [word_starts(torch.from_numpy(chunks.word_ids))[0] for chunks in (stored, memory)]
        assert torch.equal(*starts), slice_chars


# Words parted only by no-break or ideographic spaces, or by newlines alone, and a vertical tab, which BERT deletes.
BLANKS = "\u00a0".join(["words\u00a0kept\u00a0apart", "by\u3000ideographic\u3000spaces", "one\nword\nper\nline",
                   "glued\x0bby\x0bvtabs"] * 20)


def cut_as_a_whole(monkeypatch, tokenizer, text: str) -> None:
    """`text` as one long document, cut in slices of every size from 22 characters (more than the 19 of
    "glued\x0bby\x0bvtabs", which has nowhere to cut) to 49, tokenizes as it does whole."""
    ids, words, _ = tokenizer.encode([text])
    for slice_chars in range(22, 50):
        monkeypatch.setattr(corpus_store, "SLICE_CHARS", slice_chars)
        stretches = list(corpus_store._stretches([text], tokenizer))
        assert np.concatenate([s[0] for s in stretches]).tolist() == ids.tolist(), slice_chars
        assert np.concatenate([s[1] for s in stretches]).tolist() == words.tolist(), slice_chars


def test_a_long_document_is_cut_only_where_the_tokenizer_splits_alike(monkeypatch, family):
    # Cuts came before " \n\t\r" only: a document of words parted by no-break spaces was cut inside a word. A run of
    # blanks at the very end of a document must stay whole too.
    cut_as_a_whole(monkeypatch, family, BLANKS + "\n\n")
    assert set(corpus_store.BLANKS) == set("\t\n\r") | {chr(c) for c in range(0x110000)
                                                         if unicodedata.category(chr(c)) == "Zs"}


def test_a_bpe_that_adds_a_prefix_space_is_cut_at_spaces_only(monkeypatch):
    # It adds a space before a text that does not start with one: before each slice that started with a newline too.
    spec = json.loads(load_tokenizer(TINY_BPE).backend.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    bpe = dataclasses.replace(load_tokenizer(TINY_BPE), backend=BackendTokenizer.from_str(json.dumps(spec)))
    cut_as_a_whole(monkeypatch, bpe, BLANKS.replace("\u00a0", " "))  # spaces to cut at: there is nowhere else


def test_tokens_that_take_the_blanks_before_them_keep_them_across_a_cut(monkeypatch):
    # An added word (byte-level BPE's, `add_tokens`) and RoBERTa's <mask> take every blank before them: a cut inside
    # that run of blanks left the first ones as words of their own.
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=577, dim=8, n_layers=1, n_heads=1, hidden_dim=8))
    bpe, _ = add_words(load_tokenizer(TINY_BPE), model, ["cinematography"])
    text = "".join(f"the plot{' ' * (n % 3)}\n\n  cinematography was great,\t <mask> ok. " for n in range(12))
    cut_as_a_whole(monkeypatch, bpe, text)


def test_tokenizing_shortcuts_are_exact_or_absent(family):
    fast = fast_tokenizer(family)
    if family.mask_token == "<mask>":  # no shortcut's argument holds for byte-level BPE: the plain tokenizer
        assert fast is family
    texts = TEXTS + ["Hyperparameterized 😀 naïve CAFÉ [MASK] <mask> \t x"]
    for a, b in zip(fast.encode(texts), family.encode(texts)):
        np.testing.assert_array_equal(a, b)
