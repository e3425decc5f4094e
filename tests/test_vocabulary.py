"""A domain vocabulary (mlm/vocabulary.py): the fertility report's figures, new tokens whose rows start as the mean
of their pieces', and a run with `add_tokens` from start to resume."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BPE, TINY_VOCAB, build_tiny_tokenizer, write_tiny_tokenizer
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

import mlm.train
from mlm.cli.prepare_data import main as prepare_data
from mlm.data import tokenize
from mlm.errors import MLMError
from mlm.files.pretrained import load_model, load_pretrained, save_pretrained
from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.run.processes import start_processes
from mlm.settings import TrainConfig
from mlm.tokenizer import load_tokenizer
from mlm.vocabulary import add_words, added_words, count_words, split_words

# Pieces under the tiny WordPiece: cinematography 14 (one per letter), naive 5, actors 2 (actor ##s), acted 2.
DENSE_VOCAB = list(dict.fromkeys(TINY_VOCAB))  # the tiny vocabulary without its repeats ("a", "i", "##s")
V = len(DENSE_VOCAB)  # 122: new tokens get ids V, V + 1, ...
TEXTS = ["Cinematography was great, the cinematography!", "The actors acted", "Naïve cinematography"]


@pytest.fixture(scope="module")
def dense_tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny WordPiece tokenizer with ids 0 … V - 1 and no gap (TINY_VOCAB's repeats leave three)."""
    folder = write_tiny_tokenizer(tmp_path_factory.mktemp("dense-tokenizer"))
    build_tiny_tokenizer(DENSE_VOCAB).save(str(folder / "tokenizer.json"))
    return folder


def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def tiny_model(vocab_size: int, tied: bool = True) -> DistilBertForMaskedLM:
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                                   max_position_embeddings=64, tie_word_embeddings=tied))
    with torch.no_grad():  # the reference init zeroes biases: random ones show that the bias is averaged too
        model.vocab_projector.bias.normal_()
    return model


def test_report_counts_words_as_the_tokenizer_splits_them(tmp_path, tiny_tokenizer_dir, capsys):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    counts = count_words(jsonl(tmp_path / "train.jsonl", TEXTS), ("train",), tokenizer)
    # Normalized (lowercased, accents stripped) and split at punctuation, as the tokenizer's word ids number them.
    assert counts == Counter({"cinematography": 3, "the": 2, "was": 1, "great": 1, ",": 1, "!": 1, "actors": 1,
                              "acted": 1, "naive": 1})
    words, tokens, split = split_words(counts, tokenizer)
    assert (words, tokens) == (12, 3 * 14 + 6 + 2 + 2 + 5)  # 6: the one-token words
    assert tokens == len(tokenize(TEXTS, tokenizer)[0]) - 2 * len(TEXTS)  # the tokenizer's own count
    assert split == [("cinematography", 3, ["c", *("##" + c for c in "inematography")]),
                     ("naive", 1, ["n", "##a", "##i", "##v", "##e"]), ("acted", 1, ["act", "##ed"]),
                     ("actors", 1, ["actor", "##s"])]  # by tokens saved (39, 4, 1, 1), ties by word
    prepare_data(["--dataset", str(tmp_path / "train.jsonl"), "--tokenizer", str(tiny_tokenizer_dir),
                  "--vocab-report", "2"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "12 words (9 distinct) make 57 tokens: 4.750 tokens per word (the template's special tokens not " \
                     "counted)"
    assert out[1].startswith("6 occurrences (50.0%) are of words of letters cut in pieces")
    assert [line.split()[:3] for line in out[3:]] == [["cinematography", "3", "14"], ["naive", "1", "5"]]
    # Words the tokenizer never cuts: no header of an empty table
    prepare_data(["--dataset", str(jsonl(tmp_path / "whole.jsonl", ["the actor was great"])), "--tokenizer",
                  str(tiny_tokenizer_dir), "--vocab-report", "2"])
    assert capsys.readouterr().out.splitlines()[1:] == [
        "No word of letters is cut in pieces: the tokenizer has a token for each, and --add-tokens has nothing to add."]


def test_byte_level_words_keep_the_space_before_them(tmp_path):
    tokenizer = load_tokenizer(TINY_BPE)
    counts = count_words(jsonl(tmp_path / "train.jsonl", ["great movie great", "great"]), ("train",), tokenizer)
    assert counts == Counter({"great": 2, "Ġmovie": 1, "Ġgreat": 1})  # a text's first word has no "Ġ"
    assert split_words(counts, tokenizer) == (4, 6, [("great", 2, ["gre", "at"])])


@pytest.mark.parametrize("tied", [True, False])
def test_new_rows_are_the_mean_of_their_pieces(dense_tokenizer_dir, tied):
    tokenizer = load_tokenizer(dense_tokenizer_dir)
    model = tiny_model(V, tied)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    pieces = [tokenizer.backend.encode(word, add_special_tokens=False).ids for word in ("cinematography", "naive")]
    extended, grown = add_words(tokenizer, model, ["Cinematography", "naïve", "cinematography"])
    assert added_words(extended) == ["cinematography", "naive"] and added_words(tokenizer) == []  # normalized, once
    new = [extended.backend.token_to_id(word) for word in ("cinematography", "naive")]
    assert new == [V, V + 1] and extended.vocab_size == grown.config.vocab_size == V + 2
    after = grown.state_dict()
    for name in ("distilbert.embeddings.word_embeddings.weight", "vocab_projector.weight", "vocab_projector.bias"):
        assert torch.equal(after[name][:V], before[name])  # the old rows untouched
        for index, rows in zip(new, pieces):
            assert torch.equal(after[name][index], before[name][rows].mean(0))
    assert (grown.vocab_projector.weight is grown.distilbert.embeddings.word_embeddings.weight) == tied
    logits = grown(torch.tensor([[2, V, V + 1, 3]])).logits
    assert logits.shape == (1, 4, V + 2)


def test_an_added_word_is_one_token_as_a_whole_word_only(tmp_path, dense_tokenizer_dir):
    extended, _ = add_words(load_tokenizer(dense_tokenizer_dir), tiny_model(V), ["cinematography"])
    extended.save(tmp_path / "saved")
    for tokenizer in (extended, load_tokenizer(tmp_path / "saved")):
        encoding = tokenizer.backend.encode("The CINEMATOGRAPHY, cinematographys")
        assert encoding.tokens[:4] == ["[CLS]", "the", "cinematography", ","]  # matched in the lowercased text
        assert encoding.tokens[4:7] == ["c", "##i", "##n"] and encoding.word_ids[:5] == [None, 0, 1, 2, 3]
    bpe, _ = add_words(load_tokenizer(TINY_BPE), tiny_model(577), ["cinematography"])
    bpe.save(tmp_path / "bpe")
    for tokenizer in (bpe, load_tokenizer(tmp_path / "bpe")):
        # " cinematography" is one token, the space before it included, as RoBERTa's <mask> takes it.
        assert tokenizer.backend.encode("a cinematography").ids == [0, 68, 577, 2]
        assert tokenizer.backend.encode("cinematography").ids == [0, 577, 2]
        assert len(tokenizer.backend.encode("cinematographys").ids) > 3
    assert not (tmp_path / "bpe" / "vocab.txt").exists()


def test_words_that_cannot_be_added_are_refused(tmp_path, dense_tokenizer_dir, tiny_tokenizer_dir):
    tokenizer, model = load_tokenizer(dense_tokenizer_dir), tiny_model(V)
    with pytest.raises(MLMError, match="'movie' is one token already"):
        add_words(tokenizer, model, ["cinematography", "Movie"])
    with pytest.raises(MLMError, match="'good plot' is not one word"):
        add_words(tokenizer, model, ["good plot"])
    assert model.config.vocab_size == V  # refused before anything grew
    config = TrainConfig(dataset=str(jsonl(tmp_path / "train.jsonl", TEXTS)))
    for bad, message in ((0, "a count >= 1"), (str(tmp_path / "missing.txt"), "neither a count nor a file")):
        with pytest.raises(MLMError, match=message):
            mlm.vocabulary.extend_vocabulary(TrainConfig(**{**vars(config), "add_tokens": bad}), tokenizer, model)


def test_a_word_the_vocabulary_holds_as_a_piece_is_refused_by_name_and_skipped_in_a_count(tmp_path):
    # "ment" is a token of the tiny BPE (a piece inside words) while " ment" is Ġ + ment: `tokenizers` would give the
    # new word that piece's id, not a new one.
    tokenizer = load_tokenizer(TINY_BPE)
    with pytest.raises(MLMError, match="'ment' is a token of the vocabulary already"):
        add_words(tokenizer, tiny_model(577), ["cinematography", "ment"])
    corpus = jsonl(tmp_path / "train.jsonl", ["the ment ment ment cinematography was great ."] * 20)
    config = TrainConfig(dataset=str(corpus), add_tokens=2)
    extended, model = mlm.vocabulary.extend_vocabulary(config, tokenizer, tiny_model(577))
    assert added_words(extended) == ["cinematography"] and model.config.vocab_size == 578


def test_with_add_prefix_space_an_added_word_takes_the_space_before_it(tmp_path):
    folder = tmp_path / "prefix-space"
    folder.mkdir()
    spec = json.loads((TINY_BPE / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_bytes((TINY_BPE / "tokenizer_config.json").read_bytes())
    extended, _ = add_words(load_tokenizer(folder), tiny_model(577), ["cinematography"])
    encoding = extended.backend.encode("a cinematography", add_special_tokens=False)
    assert encoding.ids[-1] == 577 and len(encoding.ids) == 2  # "Ġa" and the word: no stray "Ġ" between them


def test_only_the_vocabulary_rows_grow(tmp_path, dense_tokenizer_dir):
    # Positions and the feed-forward width happen to equal the vocabulary size: they must keep their shapes.
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, hidden_dim=V,
                                                   max_position_embeddings=V))
    _, grown = add_words(load_tokenizer(dense_tokenizer_dir), model, ["cinematography"])
    assert grown.distilbert.embeddings.position_embeddings.weight.shape == (V, 16)
    assert grown.distilbert.transformer.layer[0].ffn.lin1.out_features == V
    save_pretrained(grown, tmp_path / "saved")
    assert load_pretrained(tmp_path / "saved").config.vocab_size == V + 1


def test_a_words_file_is_read_as_utf8_without_its_byte_order_mark(tmp_path, dense_tokenizer_dir):
    tokenizer, base = load_tokenizer(dense_tokenizer_dir), tiny_model(V)
    words = tmp_path / "words.txt"
    words.write_bytes("cinematography\nnaive\n".encode("utf-8-sig"))
    config = TrainConfig(dataset=str(jsonl(tmp_path / "train.jsonl", TEXTS)), add_tokens=str(words))
    extended, _ = mlm.vocabulary.extend_vocabulary(config, tokenizer, base)
    assert added_words(extended) == ["cinematography", "naive"]
    words.write_bytes("na\xefve\n".encode("latin-1"))
    with pytest.raises(MLMError, match="is not UTF-8 text"):
        mlm.vocabulary.extend_vocabulary(config, tokenizer, tiny_model(V))


# ---------------------------------------------------------------------------------------------------------------
# A run with `add_tokens`


@pytest.fixture()
def run_inputs(tmp_path) -> tuple[Path, Path]:
    """A pretrained-looking tiny model (random weights and output bias) with the tiny tokenizer, and a corpus whose
    words cut in the most pieces are cinematography (13 tokens saved per occurrence) and naive (4)."""
    folder = write_tiny_tokenizer(tmp_path / "model")
    build_tiny_tokenizer(DENSE_VOCAB).save(str(folder / "tokenizer.json"))
    save_pretrained(tiny_model(V), folder)
    corpus = jsonl(tmp_path / "train.jsonl", ["the cinematography was naive and the plot was good ."] * 200)
    return folder, corpus


def run_config(folder: Path, corpus: Path, output: Path, **overrides) -> TrainConfig:
    values = dict(model=str(folder), dataset=str(corpus), add_tokens=2, chunk_size=16, train_size=16, test_size=16,
                  batch_size=8, eval_batch_size=8, epochs=1, save_every=2, log_every=1, lr=1e-3,
                  output_dir=str(output), cache_dir=str(output.parent / "cache"), progress_bar=False,
                  prompts=("the [MASK] was good .",), device="cpu")
    return TrainConfig(**{**values, **overrides})


def test_the_run_starts_from_the_mean_of_the_pieces(tmp_path, run_inputs):
    folder, corpus = run_inputs
    base, tokenizer = load_pretrained(folder), load_tokenizer(folder)
    setup = mlm.train.set_up(run_config(folder, corpus, tmp_path / "run"), start_processes("cpu"))
    new = [setup.tokenizer.backend.token_to_id(word) for word in ("cinematography", "naive")]
    assert new == [V, V + 1] and setup.facts()["added_tokens"] == ["cinematography", "naive"]
    for word, index in zip(("cinematography", "naive"), new):
        pieces = tokenizer.backend.encode(word, add_special_tokens=False).ids
        for ours, theirs in ((setup.model.distilbert.embeddings.word_embeddings.weight,
                              base.distilbert.embeddings.word_embeddings.weight),
                             (setup.model.vocab_projector.bias, base.vocab_projector.bias)):
            assert torch.equal(ours[index], theirs[pieces].mean(0))
    assert setup.model.vocab_projector.weight is setup.model.distilbert.embeddings.word_embeddings.weight
    # The chunks are cut from the extended tokenization: the new ids are in them.
    assert {V, V + 1} <= set(setup.train_chunks.input_ids.flatten().tolist())


def test_a_run_with_added_tokens_saves_them_and_resumes(tmp_path, run_inputs, capsys):
    folder, corpus = run_inputs
    run = tmp_path / "run"
    first = mlm.train.train(run_config(folder, corpus, run, add_tokens=3))
    assert first.status == "finished" and first.steps == 2
    # The words were said nowhere but in run.json, and the card quoted the perplexities without their caveat.
    assert "note: added 2 tokens (of 3 asked: no other word of letters in the corpus is cut in pieces and new): " \
           "cinematography, naive. Both perplexities" in capsys.readouterr().out
    card = (run / "README.md").read_text()
    assert "| added tokens (`add_tokens`) | 2: cinematography, naive |" in card and "not comparable" in card
    record = json.loads((run / "run.json").read_text())
    assert record["settings"]["add_tokens"] == 3 and record["derived"]["added_tokens"] == ["cinematography", "naive"]
    saved = load_tokenizer(run)
    assert saved.backend.encode("Cinematography", add_special_tokens=False).ids == [V]
    assert json.loads((run / "config.json").read_text())["vocab_size"] == V + 2
    # The resume finds the same words in the same data: the same tokenizer (its sha256 is checked), 127 rows.
    resumed = mlm.train.train(run_config(folder, corpus, run, add_tokens=3, resume="latest", extend=True, epochs=2))
    assert resumed.status == "finished" and resumed.steps == 4
    assert load_tokenizer(run).backend.to_str() == saved.backend.to_str()


@pytest.mark.parametrize("change", ["deleted", "edited"])
def test_a_resume_adds_the_recorded_words_whatever_became_of_the_words_file(tmp_path, run_inputs, change):
    # It read the file again: deleted, "neither a count nor a file of words"; edited, "the tokenizer differs".
    folder, corpus = run_inputs
    run, words = tmp_path / "run", tmp_path / "words.txt"
    words.write_text("cinematography\nnaive\n")
    first = mlm.train.train(run_config(folder, corpus, run, add_tokens=str(words)))
    saved = load_tokenizer(run).backend.to_str()
    words.unlink() if change == "deleted" else words.write_text("plot\n")
    resumed = mlm.train.train(run_config(folder, corpus, run, add_tokens=str(words), resume="latest", extend=True,
                                         epochs=2))
    assert first.steps == 2 and resumed.status == "finished" and resumed.steps == 4
    assert load_tokenizer(run).backend.to_str() == saved


def test_the_tokenizing_shortcuts_stay_exact_and_fast_with_added_words(dense_tokenizer_dir):
    from mlm.speed import fast_encode

    extended, _ = add_words(load_tokenizer(dense_tokenizer_dir), tiny_model(V), ["cinematography", "naive"])
    fast = fast_encode.fast_tokenizer(extended)
    # Both shortcuts kept: the added words have no blank, so the lowered text matches them as the normalized one.
    assert fast is not extended and fast_encode._text_shortcut(extended) is not None
    texts = ["The Cinematography\twas NAIVE.", "cinematographys naive\n cinematography", "the plot", "Naïve [MASK]",
             "x\tcinematography\r\nnaive!", "CINEMATOGRAPHY", ""]
    for a, b in zip(fast.encode(texts), extended.encode(texts)):
        np.testing.assert_array_equal(a, b)
    blank = dataclasses.replace(extended, backend=BackendTokenizer.from_str(extended.backend.to_str()))
    blank.backend.add_tokens([AddedToken("good plot", normalized=True)])  # matched across a \t in the normalized text
    assert fast_encode._text_shortcut(blank) is None


def test_a_roberta_run_adds_words_with_the_space_before_them(tmp_path):
    # A random tiny RoBERTa (tests/fixtures/tiny-roberta's config) with the tiny byte-level BPE: the new row is the
    # mean of the pieces of " cinematography" (Ġc i n e m at o g r a p h y), the word as it is met after a space.
    folder = tmp_path / "roberta"
    folder.mkdir()
    config = json.loads((TINY_BPE.parent / "tiny-roberta" / "config.json").read_text()) | {"vocab_size": 577}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((TINY_BPE / name).read_bytes())
    corpus = jsonl(tmp_path / "train.jsonl", ["the cinematography was great , Cinematography aside ."] * 100)
    (tmp_path / "words.txt").write_text("cinematography\n\n")
    settings = run_config(folder, corpus, tmp_path / "run", init="random", add_tokens=str(tmp_path / "words.txt"),
                          prompts=("the <mask> was great .",))
    torch.manual_seed(settings.seed)
    base = load_model(folder, init="random")
    setup = mlm.train.set_up(settings, start_processes("cpu"))
    pieces = load_tokenizer(TINY_BPE).backend.encode(" cinematography", add_special_tokens=False).ids
    assert len(pieces) == 13 and setup.facts()["added_tokens"] == ["cinematography"]
    assert setup.model.config.family == "roberta" and setup.model.config.vocab_size == 578
    assert torch.equal(setup.model.distilbert.embeddings.word_embeddings.weight[577],
                       base.distilbert.embeddings.word_embeddings.weight[pieces].mean(0))
    # " cinematography" is one token; "Cinematography" (cased, no normalizer) keeps its pieces.
    encode = setup.tokenizer.backend.encode
    assert encode("the cinematography").ids[-2:] == [577, 2] and 577 not in encode("the Cinematography").ids
    assert 577 in setup.train_chunks.input_ids


def test_a_words_file_is_recorded_by_its_absolute_path_and_a_count_as_given(tmp_path, monkeypatch):
    """A resume or mlm-evaluate reads run.json from other directories, where a relative path names nothing."""
    import mlm.cli.train

    given = []
    monkeypatch.setattr(mlm.cli.train, "train", lambda config: given.append(config) or exit(0))
    monkeypatch.chdir(tmp_path)
    Path("words.txt").write_text("cinematography\n")
    for add, recorded in (("words.txt", str(tmp_path / "words.txt")), ("12", "12")):
        with pytest.raises(SystemExit):
            mlm.cli.train.main(["--add-tokens", add, "--model", "m", "--dataset", "d", "--output-dir", "o"])
        assert given.pop().add_tokens == recorded
