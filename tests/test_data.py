"""mlm.data and its store: reading, tokenizing, chunking, caching and splitting, checked against plain Python
references. The store (mlm/corpus_store.py) runs data.py's own functions piece by piece: every chunking test here
runs through both, so a bug planted in the chapter's chunker fails for both paths."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mlm.corpus_store as corpus_store
import mlm.data as data
from mlm.chunks import Chunks
from mlm.corpus import load_chunks
from mlm.corpus_store import default_cache_dir
from mlm.data import check_chunk_size, split_train_test, tokenize, tokenize_and_chunk
from mlm.errors import MLMError
from mlm.files.data_files import find_data_files, load_texts
from mlm.masking import word_starts
from mlm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import prepare_data  # noqa: E402

SHARED_IMDB = ROOT.parent / "shared" / "hub" / "datasets" / "stanfordnlp" / "imdb"
SHARED_TOKENIZER = ROOT.parent / "shared" / "hub" / "models" / "distilbert-base-uncased"
# Words of the tiny tokenizer (tests/conftest.py) plus words that split into ## pieces, an out-of-vocabulary
# word spelled letter by letter, and a literal [MASK].
WORDS = ["the", "a", "movie", "film", "plot", "good", "bad", "great", "was", "is", "not", "really", ".", ",", "!",
         "'", "acting", "plots", "actors", "watched", "lovely", "zebra42", "[MASK]"]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def make_corpus(seed: int, n_reviews: int, max_words: int = 40) -> list[str]:
    """Random reviews of 0..max_words words, with suffixes that split into ## pieces and a literal [MASK]."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_words))) for _ in range(n_reviews)]


def reference_chunks(texts, tokenizer, chunk_size, group_size=None):
    """The course's tokenize_function + group_texts, in plain Python lists (per review, per token)."""
    encodings = [tokenizer.backend.encode(text) for text in texts]
    ids = [e.ids for e in encodings]
    words = [[-1 if w is None else w for w in e.word_ids] for e in encodings]
    group_size = group_size or len(texts)
    out_ids, out_words = [], []
    for start in range(0, len(texts), group_size):
        flat_ids = sum(ids[start : start + group_size], [])
        flat_words = sum(words[start : start + group_size], [])
        total = len(flat_ids) // chunk_size * chunk_size
        out_ids += [flat_ids[i : i + chunk_size] for i in range(0, total, chunk_size)]
        out_words += [flat_words[i : i + chunk_size] for i in range(0, total, chunk_size)]
    return np.array(out_ids, dtype=np.int32).reshape(-1, chunk_size), np.array(out_words, dtype=np.int32).reshape(
        -1, chunk_size
    )


def write_parquet(path: Path, texts, column="text", **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: pa.array(texts, type=None if texts else pa.string()), **extra}), path)
    return path


def write_hub_layout(root: Path, splits: dict[str, list[str]], shards: int = 1) -> Path:
    """A folder laid out like the Hub's stanfordnlp/imdb: plain_text/{split}-0000i-of-0000n.parquet."""
    for split, texts in splits.items():
        per_shard = -(-len(texts) // shards)
        for shard in range(shards):
            part = texts[shard * per_shard : (shard + 1) * per_shard]
            write_parquet(root / "plain_text" / f"{split}-{shard:05d}-of-{shards:05d}.parquet", part,
                          label=[0] * len(part))
    return root


# ---------------------------------------------------------------------------------------------------------
# Chunking equals concatenate-and-slice


def chunks_by(path: str, texts, tokenizer, tmp_path, monkeypatch, **sizes) -> Chunks:
    """The chunks of `texts` in memory (tokenize_and_chunk) or through the store, cut into pieces of 60
    characters, so that nearly every review's tokens cross a piece boundary (and long reviews are sliced)."""
    if path == "memory":
        return tokenize_and_chunk(texts, tokenizer, **sizes)
    monkeypatch.setattr(corpus_store, "PIECE_CHARS", 60)
    monkeypatch.setattr(corpus_store, "SLICE_CHARS", 50)
    file = tmp_path / "corpus.jsonl"
    file.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return load_chunks(file, "train", tokenizer, cache_dir=tmp_path / "cache", **sizes)


@pytest.mark.parametrize("path", ["memory", "store"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [2, 5, 16, 37])
@pytest.mark.parametrize("group_size", [None, 1, 3, 10, 1000])
def test_chunks_equal_concatenate_and_slice(tokenizer, tmp_path, monkeypatch, path, seed, chunk_size, group_size):
    texts = make_corpus(seed, n_reviews=45)
    expected_ids, expected_words = reference_chunks(texts, tokenizer, chunk_size, group_size)
    sizes = dict(chunk_size=chunk_size, group_size=group_size)
    if len(expected_ids) == 0:
        with pytest.raises(MLMError, match="not enough to fill one chunk"):
            chunks_by(path, texts, tokenizer, tmp_path, monkeypatch, **sizes)
        return
    chunks = chunks_by(path, texts, tokenizer, tmp_path, monkeypatch, **sizes)
    assert chunks.input_ids.dtype == chunks.word_ids.dtype == np.int32
    assert chunks.input_ids.shape == chunks.word_ids.shape == (len(expected_ids), chunk_size)
    np.testing.assert_array_equal(chunks.input_ids, expected_ids)
    if path == "memory":
        np.testing.assert_array_equal(chunks.word_ids, expected_words)
    # The store keeps word starts, not the tokenizer's numbers: the same words, hence the same whole-word masks.
    for got, want in zip(word_starts(chunks.word_ids), word_starts(expected_words)):
        assert torch.equal(got, want)
    assert chunks.n_reviews == len(texts)
    assert chunks.n_tokens == sum(len(tokenizer.backend.encode(t)) for t in texts)


def test_the_store_keeps_ids_beyond_16_bits(tmp_path, monkeypatch):
    """A vocabulary of more than 65,536 tokens (multilingual models) needs 32-bit ids in the store."""
    from conftest import write_tiny_tokenizer
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    folder = write_tiny_tokenizer(tmp_path / "tok")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "low": 5, "high": 70_000}
    vocab.update({f"w{i}": i for i in range(6, 70_000)})
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    backend.save(str(folder / "tokenizer.json"))
    big = load_tokenizer(folder)
    texts = ["low high " * 20] * 5
    store = chunks_by("store", texts, big, tmp_path, monkeypatch, chunk_size=8)
    np.testing.assert_array_equal(store.input_ids, tokenize_and_chunk(texts, big, chunk_size=8).input_ids)
    assert store.input_ids.max() == 70_000


def test_small_tokenize_batches_change_nothing(tokenizer, monkeypatch):
    texts = make_corpus(3, n_reviews=50)
    whole = tokenize(texts, tokenizer)
    monkeypatch.setattr(data, "ENCODE_BATCH_TEXTS", 7)
    batched = tokenize(texts, tokenizer)
    for a, b in zip(whole, batched, strict=True):
        np.testing.assert_array_equal(a, b)
    assert whole[2].sum() == len(whole[0]) and whole[2].dtype == np.int64


def test_every_review_is_wrapped_in_cls_sep_with_minus_one_word_ids(tokenizer):
    texts = ["good movie", "", "the plot"]
    input_ids, word_ids, lengths = tokenize(texts, tokenizer)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert lengths.tolist() == [4, 2, 4]
    assert input_ids.tolist() == [cls, *tokenizer.backend.encode("good movie", add_special_tokens=False).ids,
                                  sep, cls, sep, cls, *tokenizer.backend.encode("the plot",
                                                                                add_special_tokens=False).ids, sep]
    assert word_ids.tolist() == [-1, 0, 1, -1, -1, -1, -1, 0, 1, -1]


def test_word_ids_stay_with_their_tokens_across_chunk_boundaries(tokenizer):
    # "actings" is act ##ing ##s: one word of three tokens. Chunks of 3 cut it after "act" in the second review.
    texts = ["good", "actings good"]  # [CLS] good [SEP] | [CLS] act ##ing | ##s good [SEP]
    chunks = tokenize_and_chunk(texts, tokenizer, chunk_size=3)
    vocab = tokenizer.backend.get_vocab()
    assert chunks.input_ids.tolist() == [
        [vocab["[CLS]"], vocab["good"], vocab["[SEP]"]],
        [vocab["[CLS]"], vocab["act"], vocab["##ing"]],
        [vocab["##s"], vocab["good"], vocab["[SEP]"]],
    ]
    assert chunks.word_ids.tolist() == [[-1, 0, -1], [-1, 0, 0], [0, 1, -1]]


def test_word_ids_are_minus_one_exactly_at_template_tokens(tokenizer):
    chunks = tokenize_and_chunk(make_corpus(4, 60), tokenizer, chunk_size=16)
    template = np.isin(chunks.input_ids, [tokenizer.cls_token_id, tokenizer.sep_token_id])
    np.testing.assert_array_equal(chunks.word_ids == -1, template)


def test_group_size_drops_each_groups_tail(tokenizer):
    texts = ["good"] * 5  # 3 tokens each
    assert len(tokenize_and_chunk(texts, tokenizer, chunk_size=2)) == 7  # 15 tokens // 2
    assert len(tokenize_and_chunk(texts, tokenizer, chunk_size=2, group_size=2)) == 3 + 3 + 1  # 6, 6, 3 tokens


# ---------------------------------------------------------------------------------------------------------
# Train/test downsampling


def make_chunks(n: int, chunk_size: int = 4) -> Chunks:
    ids = np.arange(n * chunk_size, dtype=np.int32).reshape(n, chunk_size)
    return Chunks(ids, ids.copy(), n_reviews=n, n_tokens=n * chunk_size)


def test_split_is_disjoint_reproducible_and_matches_datasets_scheme():
    chunks = make_chunks(100)
    train, test = split_train_test(chunks, train_size=60, test_size=15, seed=42)
    assert train.input_ids.shape == (60, 4) and test.input_ids.shape == (15, 4)
    train_rows, test_rows = set(train.input_ids[:, 0] // 4), set(test.input_ids[:, 0] // 4)
    assert len(train_rows) == 60 and len(test_rows) == 15 and not train_rows & test_rows
    # datasets.Dataset.train_test_split: test = permutation[:n_test], train = permutation[n_test:n_test+n_train].
    permutation = np.random.default_rng(42).permutation(100)
    np.testing.assert_array_equal(test.input_ids[:, 0] // 4, permutation[:15])
    np.testing.assert_array_equal(train.input_ids[:, 0] // 4, permutation[15:75])
    np.testing.assert_array_equal(train.word_ids, train.input_ids)
    again, _ = split_train_test(chunks, train_size=60, test_size=15, seed=42)
    np.testing.assert_array_equal(again.input_ids, train.input_ids)
    other, _ = split_train_test(chunks, train_size=60, test_size=15, seed=43)
    assert not np.array_equal(other.input_ids, train.input_ids)


def test_percentages_round_as_datasets_does_so_that_they_add_up():
    # datasets' train_test_split: ceil(test fraction * n) test rows, floor(train fraction * n) train rows. Both
    # rounded up, 90% + 10% of 71 chunks asked for 64 + 8 and was refused.
    train, test = split_train_test(make_chunks(71), train_size="90%", test_size="10%")
    assert (len(train), len(test)) == (63, 8)
    train, test = split_train_test(make_chunks(3_657), train_size="80%", test_size="20%")
    assert (len(train), len(test)) == (2_925, 732)
    with pytest.raises(MLMError, match="^`train_size` 1% of 50 chunks is no chunk at all: give a number of chunks, "
                                       "`all` or a larger percentage.$"):
        split_train_test(make_chunks(50), train_size="1%", test_size=5)


def test_split_needs_enough_chunks():
    with pytest.raises(MLMError, match="Cannot draw 10 train \\+ 5 test chunks from 14"):
        split_train_test(make_chunks(14), train_size=10, test_size=5)
    with pytest.raises(MLMError, match="`train_size` '0': give a positive number of chunks"):
        split_train_test(make_chunks(14), train_size=0, test_size=5)
    with pytest.raises(MLMError, match="`test_size` 14 takes all 14 chunks: lower `test_size`, e.g. to 5%.$"):
        split_train_test(make_chunks(14), train_size="all", test_size=14)
    # It said "`test_size` 1 takes all 1 chunks. Lower `test_size`, e.g. to 5%" to one who gave 5%.
    with pytest.raises(MLMError, match="`test_size` 5% takes all 1 chunk: use a larger corpus or a smaller "):
        split_train_test(make_chunks(1), train_size="all", test_size="5%")


# ---------------------------------------------------------------------------------------------------------
# Sources


def test_hub_layout_folder_reads_shards_in_order(tmp_path):
    texts = [f"review {i}" for i in range(10)]
    root = write_hub_layout(tmp_path / "imdb", {"train": texts, "test": ["a"], "unsupervised": ["b", "c"]},
                            shards=3)
    assert [f.name for f in find_data_files(root, "train")] == [
        "train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00002-of-00003.parquet"]
    assert load_texts(root, "train") == texts
    assert load_texts(root, "unsupervised") == ["b", "c"]
    assert load_texts(root / "plain_text", "test") == ["a"]


def test_single_files_are_the_train_split(tmp_path):
    texts = ["good movie", "bad film", "caf\u00e9 \u2014 na\u00efve"]
    parquet = write_parquet(tmp_path / "reviews.parquet", texts)
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in texts), encoding="utf-8")
    txt = tmp_path / "reviews.txt"
    txt.write_bytes(("\r\n".join(texts) + "\n\n   \n").encode("utf-8"))  # blank lines are skipped
    for path in (parquet, jsonl, txt):
        assert load_texts(path) == texts
        assert load_texts(str(path), "train") == texts
        with pytest.raises(MLMError, match="holds only the 'train' split"):
            load_texts(path, "test")


def test_text_file_splits_only_at_newlines(tmp_path):
    txt = tmp_path / "r.txt"
    txt.write_text("one\x0cpage\u2028still one\ntwo\n", encoding="utf-8")
    assert load_texts(txt) == ["one\x0cpage\u2028still one", "two"]


def test_other_text_column(tmp_path):
    path = write_parquet(tmp_path / "r.parquet", ["x"], column="review")
    assert load_texts(path, text_column="review") == ["x"]


def test_hub_id_downloads_only_the_split(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    snapshot = write_hub_layout(tmp_path / "snapshot", {"train": ["good movie"], "test": ["bad"],
                                                        "unsupervised": ["fun"]})
    hub_files = ["README.md", "plain_text/train-00000-of-00001.parquet",
                 "plain_text/test-00000-of-00001.parquet", "plain_text/unsupervised-00000-of-00001.parquet"]
    calls = []

    def fake_snapshot_download(repo_id, repo_type, revision, allow_patterns):
        calls.append((repo_id, repo_type, revision))
        assert list(filter_repo_objects(hub_files, allow_patterns=allow_patterns)) == [hub_files[1]]
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert load_texts("stanfordnlp/imdb", "train", revision="main") == ["good movie"]
    assert calls == [("stanfordnlp/imdb", "dataset", "main")]


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_missing_text_column(tmp_path):
    with pytest.raises(MLMError, match="has no column 'text' \\(it has: 'review', 'label'\\).*--text-column"):
        load_texts(write_parquet(tmp_path / "a.parquet", ["x"], column="review", label=[1]))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"review": "x", "stars": 4}\n{"review": "y"}\n')
    with pytest.raises(MLMError, match="has no column 'text' \\(it has: 'review', 'stars'\\).*--text-column"):
        load_texts(jsonl)


def test_a_text_column_named_twice_is_refused(tmp_path):
    # CSV: a KeyError traceback ('Field "text" exists 2 times in schema'); parquet: the first one, silently.
    csv = tmp_path / "a.csv"
    csv.write_text("text,text\na,b\n")
    with pytest.raises(MLMError, match="a.csv has 2 columns named 'text': rename all but the one that holds the text"):
        load_texts(csv)
    table = pa.table([pa.array(["a"]), pa.array(["b"])], names=["text", "text"])
    pq.write_table(table, tmp_path / "a.parquet")
    with pytest.raises(MLMError, match="a.parquet has 2 columns named 'text'"):
        load_texts(tmp_path / "a.parquet")


def test_a_text_column_of_numbers_in_json_lines_names_its_line(tmp_path):
    # Parsing the text column alone as strings, pyarrow said "Column(/text) changed from string to number in row 0";
    # and two objects on one line gave a traceback where the columns were listed.
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": 5}\n')
    # The column is the right one, and one line is wrong: it said "pass --text-column" only.
    with pytest.raises(MLMError, match="a.jsonl, line 2: 'text' holds int '5', not text: make it a string, or pass "
                                       "--text-column if another key holds the text.$"):
        load_texts(jsonl)
    # A line without it said "Column 'text' of a.jsonl has 1 missing (null) values", with no line.
    # Two objects on one line are two rows to pyarrow: one without the text was an AttributeError traceback, two
    # with it were read as two texts.
    for second in ('{"x": 2}', '{"text": "b"}'):
        jsonl.write_text(f'{{"text": "a"}}{second}\n{{"text": "c"}}\n')
        with pytest.raises(MLMError, match="a.jsonl, line 1, is not a JSON object \\(Extra data"):
            load_texts(jsonl)
    for missing in ('{"title": "x"}', '{"text": null}'):
        jsonl.write_text(f'{{"text": "fine"}}\n\n{missing}\n{{"text": "fine"}}\n')
        with pytest.raises(MLMError, match="a.jsonl, line 3, has no 'text' \\(or it is null\\), which the other "
                                           "lines have: drop that line or give it its text.$"):
            load_texts(jsonl)
    jsonl.write_text('{"review": 1}{"x": 2}\n{"review": "y"}\n')
    with pytest.raises(MLMError, match="has no column 'text' \\(it has: 'review'\\)"):
        load_texts(jsonl)


def test_a_column_that_is_not_read_may_change_type(tmp_path):
    # pyarrow parsed every column, and refused the file: "Column(/meta) changed from number to string in row 1".
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "x", "meta": 1}\n{"text": "y", "meta": "one"}\n{"text": "z", "meta": {"a": [1]}}\n')
    assert load_texts(jsonl) == ["x", "y", "z"]


def test_empty_split(tmp_path):
    root = write_hub_layout(tmp_path / "d", {"train": ["x"], "test": []})
    with pytest.raises(MLMError, match="No reviews in .*the split is empty"):
        load_texts(root, "test")
    with pytest.raises(MLMError, match="No files for split 'unsupervised'.*Splits found there: test, train"):
        load_texts(root, "unsupervised")
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("\n\n")
    with pytest.raises(MLMError, match="the split is empty"):
        load_texts(empty_txt)


def test_split_spread_over_several_configurations(tmp_path):
    write_parquet(tmp_path / "d" / "one" / "train-00000-of-00001.parquet", ["x"])
    write_parquet(tmp_path / "d" / "two" / "train-00000-of-00001.parquet", ["y"])
    with pytest.raises(MLMError, match="several folders.*one, two"):
        load_texts(tmp_path / "d")


def test_missing_path(tmp_path):
    with pytest.raises(MLMError, match="No such folder"):
        load_texts(tmp_path / "nowhere")


def test_corpus_shorter_than_one_chunk(tokenizer):
    with pytest.raises(MLMError, match="6 tokens in 2 documents, not enough to fill one chunk of 128"):
        tokenize_and_chunk(["good", "bad"], tokenizer)
    with pytest.raises(MLMError, match="in any group of 1 document.*`group_size`"):
        tokenize_and_chunk(["good", "bad"], tokenizer, chunk_size=4, group_size=1)


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_file_too_short_for_one_chunk_is_named(tokenizer, tmp_path, use_cache):
    """A --validation-file too short for one chunk was "The corpus has 4 tokens in 1 reviews": which corpus?"""
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("good film\n")
    with pytest.raises(MLMError) as err:
        load_chunks(tiny, "train", tokenizer, cache_dir=tmp_path / "cache", use_cache=use_cache)
    assert f"The corpus in {tiny} has 4 tokens in 1 document, not enough to fill one chunk of 128" in str(err.value)


def test_bad_chunk_and_group_sizes(tokenizer, tmp_path):
    with pytest.raises(MLMError, match="at least 2"):
        tokenize_and_chunk(["good movie"], tokenizer, chunk_size=1)
    with pytest.raises(MLMError, match="longer than the model takes \\(512 tokens"):
        check_chunk_size(513, 512)
    check_chunk_size(512, 512)
    with pytest.raises(MLMError, match="longer than the model takes"):
        load_chunks(tmp_path / "nowhere", "train", tokenizer, chunk_size=600, max_length=512)
    with pytest.raises(MLMError, match="`group_size` must be a positive"):
        tokenize_and_chunk(["good movie"], tokenizer, chunk_size=2, group_size=0)


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "a.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(MLMError, match="Cannot read .*a.parquet.*valid parquet"):
        load_texts(garbage)
    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text('{"text": "x"\nnope\n')
    with pytest.raises(MLMError, match="a.jsonl, line 1, is not a JSON object \\(Expecting ',' delimiter"):
        load_texts(bad_json)
    # pyarrow said "JSON parse error: … in row 1" of line 2 (its rows count from 0), or "Column() changed from object
    # to string in row 0" of a line that is a JSON string.
    for lines, line in (('{"text": "x"}\n{"text": "y\n', 2), ('{"text": "x"}\n\n"just text"\n', 3)):
        bad_json.write_text(lines)
        with pytest.raises(MLMError, match=f"a.jsonl, line {line}, is not a JSON object .*one object per line, e.g. "):
            load_texts(bad_json)
    numbers = write_parquet(tmp_path / "n.parquet", [1, 2])
    with pytest.raises(MLMError, match="holds int64, not text"):
        load_texts(numbers)
    nulls = write_parquet(tmp_path / "null.parquet", ["x", None])
    with pytest.raises(MLMError, match="1 missing \\(null\\) values"):
        load_texts(nulls)


def test_non_utf8_files(tmp_path):
    txt = tmp_path / "latin1.txt"
    txt.write_bytes("good\nmovie caf\u00e9\n".encode("latin-1"))
    with pytest.raises(MLMError, match="not UTF-8: byte 14 \\(line 2\\).*iconv"):
        load_texts(txt)
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(MLMError, match="not UTF-8"):
        load_texts(jsonl)
    # Arrow does not validate string bytes when writing or reading parquet, so build such a column by hand.
    offsets = pa.py_buffer(np.array([0, 2, 3], dtype=np.int32).tobytes())
    column = pa.StringArray.from_buffers(2, offsets, pa.py_buffer(b"ok\xff"))
    bad_parquet = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": column}), bad_parquet)
    with pytest.raises(MLMError, match="not valid UTF-8"):
        load_texts(bad_parquet)


# ---------------------------------------------------------------------------------------------------------
# Cache


@pytest.fixture
def corpus_dir(tmp_path):
    return write_hub_layout(tmp_path / "imdb", {"train": make_corpus(5, 80), "test": make_corpus(6, 30)})


def fail_if_called(*args, **kwargs):
    raise AssertionError("tokenize_and_chunk ran although the cache should have answered")


def test_cache_miss_then_hit(corpus_dir, tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_chunks(corpus_dir, "train", tokenizer, chunk_size=8, cache_dir=cache)
    assert first.cache_path is not None and first.cache_path.parent == cache / "chunks"
    assert first.cache_path.name.startswith("train-8-") and first.cache_path.is_dir()
    assert [p.name for p in (cache / "chunks").iterdir()] == [first.cache_path.name]  # no temporary left
    assert sorted(p.name for p in first.cache_path.iterdir()) == ["header.json", "ids.bin", "words.bin"]
    expected = tokenize_and_chunk(load_texts(corpus_dir, "train"), tokenizer, chunk_size=8)
    np.testing.assert_array_equal(first.input_ids, expected.input_ids)

    monkeypatch.setattr(data, "tokenize_and_chunk", fail_if_called)
    second = load_chunks(corpus_dir, "train", tokenizer, chunk_size=8, cache_dir=cache)
    assert second.cache_path == first.cache_path
    np.testing.assert_array_equal(second.input_ids, first.input_ids)
    np.testing.assert_array_equal(second.word_ids, first.word_ids)
    assert (second.n_reviews, second.n_tokens) == (first.n_reviews, first.n_tokens) == (80, expected.n_tokens)
    assert second.input_ids.dtype == np.int32 and second.input_ids.flags.writeable
    # The store renumbers words per chunk; the word starts, which decide whole-word masking, are the same.
    from mlm.masking import word_starts
    for stored, original in zip(word_starts(second.word_ids), word_starts(expected.word_ids)):
        np.testing.assert_array_equal(stored.numpy(), original.numpy())


def test_cache_is_invalidated_by_every_input(corpus_dir, tokenizer, tiny_tokenizer_dir, tmp_path):
    cache = tmp_path / "cache"

    def cache_path(source=corpus_dir, tok=tokenizer, chunk_size=8, group_size=None):
        chunks = load_chunks(source, "train", tok, chunk_size=chunk_size, group_size=group_size, cache_dir=cache)
        return chunks.cache_path

    base = cache_path()
    assert cache_path() == base
    assert len({base, cache_path(chunk_size=9), cache_path(group_size=10), cache_path(group_size=11)}) == 4
    # Another tokenizer (one more vocabulary entry) gives another key.
    other_dir = tmp_path / "other-tokenizer"
    other_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other_dir / name).write_bytes((tiny_tokenizer_dir / name).read_bytes())
    other = load_tokenizer(other_dir)
    other.backend.add_tokens(["zebra"])
    assert cache_path(tok=other) != base
    # Same bytes in another place: still a hit, since the key is the content. Changed content: a miss.
    copy = tmp_path / "copy" / "plain_text"
    copy.mkdir(parents=True)
    for file in (corpus_dir / "plain_text").iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    assert cache_path(source=copy) == base
    write_hub_layout(corpus_dir, {"train": make_corpus(7, 80)})
    assert cache_path() != base


def test_text_column_is_part_of_the_key(tmp_path, tokenizer):
    file = write_parquet(tmp_path / "r.parquet", make_corpus(8, 20), review=make_corpus(9, 20))
    a = load_chunks(file, "train", tokenizer, chunk_size=4, cache_dir=tmp_path / "c")
    b = load_chunks(file, "train", tokenizer, chunk_size=4, cache_dir=tmp_path / "c", text_column="review")
    assert a.cache_path != b.cache_path and not np.array_equal(a.input_ids[:5], b.input_ids[:5])


def test_the_files_format_is_part_of_the_key_and_a_text_files_column_is_not(tmp_path, tokenizer):
    # The same bytes as data.txt and, renamed, as data.csv hit one store: the header line and every column of the CSV
    # were trained on as text. And --text-column, which .txt files do not read, made a second, identical store.
    rows = "text,label\n" + "".join(f'"{review}",1\n' for review in make_corpus(8, 30))
    (tmp_path / "t").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "t" / "data.txt").write_text(rows)
    (tmp_path / "c" / "data.csv").write_text(rows)
    as_text, as_csv = (load_chunks(tmp_path / folder / name, "train", tokenizer, chunk_size=4, cache_dir=tmp_path / "s")
                       for folder, name in (("t", "data.txt"), ("c", "data.csv")))
    assert as_text.cache_path != as_csv.cache_path and as_csv.n_reviews == 30 and as_text.n_reviews == 31
    again = load_chunks(tmp_path / "t" / "data.txt", "train", tokenizer, chunk_size=4, cache_dir=tmp_path / "s",
                        text_column="body")
    assert again.cache_path == as_text.cache_path


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty", "header"])
def test_corrupt_store_is_detected_and_rebuilt(corpus_dir, tokenizer, tmp_path, damage):
    cache = tmp_path / "cache"
    good = load_chunks(corpus_dir, "train", tokenizer, chunk_size=8, cache_dir=cache)
    file = good.cache_path / ("header.json" if damage in ("garbage", "header") else "words.bin")
    raw = file.read_bytes()
    damaged = {
        "truncate": raw[: len(raw) - 10],
        "flip": raw[:-10] + bytes([raw[-10] ^ 1]) + raw[-9:],  # one bit of a word plane: only the checksum sees it
        "garbage": b"not a header",
        "empty": b"",
        "header": raw.replace(b'"n_reviews": 80', b'"n_reviews": 81'),  # every header field is checksummed
    }[damage]
    assert damaged != raw
    file.write_bytes(damaged)
    with pytest.warns(UserWarning, match="Ignoring corrupt chunk store"):
        rebuilt = load_chunks(corpus_dir, "train", tokenizer, chunk_size=8, cache_dir=cache)
    np.testing.assert_array_equal(rebuilt.input_ids, good.input_ids)
    np.testing.assert_array_equal(rebuilt.word_ids, good.word_ids)
    assert rebuilt.cache_path == good.cache_path and rebuilt.n_reviews == 80
    with warnings.catch_warnings():  # the rewritten store is trusted again
        warnings.simplefilter("error")
        reread = load_chunks(corpus_dir, "train", tokenizer, chunk_size=8, cache_dir=cache)
    np.testing.assert_array_equal(reread.word_ids, good.word_ids)


def test_unwritable_cache_dir_warns_and_continues(corpus_dir, tokenizer, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="Could not write the chunk store"):
        chunks = load_chunks(corpus_dir, "train", tokenizer, chunk_size=8, cache_dir=blocker)
    assert chunks.cache_path is None and len(chunks) > 0


def test_no_cache_reads_and_writes_nothing(corpus_dir, tokenizer, tmp_path):
    chunks = load_chunks(corpus_dir, "train", tokenizer, chunk_size=8, cache_dir=tmp_path / "c", use_cache=False)
    assert chunks.cache_path is None and not (tmp_path / "c").exists()


def test_default_cache_dir(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("MLM_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MLM_CACHE")
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    assert default_cache_dir() == tmp_path / "hf" / "mlm"


# ---------------------------------------------------------------------------------------------------------
# scripts/prepare_data.py


def test_prepare_data_prints_a_table(corpus_dir, tiny_tokenizer_dir, tmp_path, capsys):
    argv = ["--dataset", str(corpus_dir), "--tokenizer", str(tiny_tokenizer_dir), "--splits", "train,test",
            "--chunk-size", "8", "--cache-dir", str(tmp_path / "c"), "--train-size", "20", "--test-size", "5"]
    prepare_data.main(argv)
    out = capsys.readouterr().out
    train = load_chunks(corpus_dir, "train", load_tokenizer(tiny_tokenizer_dir), chunk_size=8,
                        cache_dir=tmp_path / "c")
    rows = {line.split()[0]: line.split() for line in out.splitlines()}
    assert rows["split"] == ["split", "texts", "tokens", "chunks", "load", "s", "cache"]
    assert rows["train"][1:4] == [f"{train.n_reviews:,}", f"{train.n_tokens:,}", f"{len(train):,}"]
    assert rows["train"][5] == str(train.cache_path) and rows["test"][1] == "30"
    assert "20 train chunks, 5 test chunks of 8 tokens" in out


def test_prepare_data_reports_errors(corpus_dir, tiny_tokenizer_dir, capsys):
    argv = ["--dataset", str(corpus_dir), "--tokenizer", str(tiny_tokenizer_dir), "--text-column", "body",
            "--no-cache"]
    done = subprocess.run([sys.executable, str(prepare_data.__file__), *argv], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "no column 'body'" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------------------
# The real data, when a local copy is at hand


@pytest.mark.skipif(not (SHARED_IMDB.is_dir() and SHARED_TOKENIZER.is_dir()),
                    reason="needs a local copy of IMDb and its tokenizer")
def test_real_imdb_first_reviews_match_the_reference():
    tokenizer = load_tokenizer(SHARED_TOKENIZER)
    texts = load_texts(SHARED_IMDB, "train")[:300]
    chunks = tokenize_and_chunk(texts, tokenizer, chunk_size=128, group_size=100)
    expected_ids, expected_words = reference_chunks(texts, tokenizer, 128, 100)
    np.testing.assert_array_equal(chunks.input_ids, expected_ids)
    np.testing.assert_array_equal(chunks.word_ids, expected_words)
    assert chunks.input_ids[0, 0] == 101 and (chunks.word_ids == -1).sum() > 0
