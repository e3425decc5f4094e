"""mlm/corpus_store.py and mlm/files/corpus_files.py: every layout and compression, resumable preparation, and
whole-word masks from the store equal to those of the course's word ids."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mlm.corpus_store as corpus_store
from mlm.corpus import load_chunks
from mlm.data import split_train_test, tokenize_and_chunk
from mlm.errors import MLMError
from mlm.files.corpus_files import iter_texts
from mlm.files.data_files import load_texts
from mlm.masking import MaskingCollator
from mlm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"
TEXTS = ["a good movie, really.", "the plot was bad!", "i love this film", "boring and too long", "great acting"]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def compress(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    elif path.suffix == ".zst":
        with pa.CompressedOutputStream(str(path), "zstd") as out:
            out.write(data)
    else:
        path.write_bytes(data)
    return path


def encoded(fmt: str, texts: list[str]) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    if fmt == "csv":
        return ("id,text\n" + "".join(f'{i},"{t.replace(chr(34), 2 * chr(34))}"\n' for i, t in enumerate(texts))
                ).encode()
    return "".join(t + "\n" for t in texts).encode()


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "txt"])
@pytest.mark.parametrize("zipped", ["", ".gz", ".zst"])
def test_every_format_and_compression_reads_the_same_texts(tmp_path, fmt, zipped):
    file = compress(tmp_path / f"train.{fmt}{zipped}", encoded(fmt, TEXTS))
    assert load_texts(file) == TEXTS


def test_folder_at_any_depth_glob_and_parquet_shards(tmp_path):
    for index, text in enumerate(TEXTS):
        compress(tmp_path / "deep" / f"part{index % 2}" / f"{index}.jsonl.gz", encoded("jsonl", [text]))
    ordered = [TEXTS[i] for i in (0, 2, 4, 1, 3)]  # sorted by path: part0/ then part1/
    assert load_texts(tmp_path / "deep") == ordered
    assert load_texts(str(tmp_path / "deep" / "**" / "*.jsonl.gz")) == ordered
    (tmp_path / "shards").mkdir()
    for shard in range(2):
        pq.write_table(pa.table({"text": TEXTS[shard::2]}), tmp_path / "shards" / f"x-{shard}.parquet")
    assert load_texts(tmp_path / "shards") == TEXTS[0::2] + TEXTS[1::2]


def test_folder_of_documents_one_per_file(tmp_path, tokenizer):
    docs = tmp_path / "notes"
    (docs / "b").mkdir(parents=True)
    (docs / "a.txt").write_text("first line\nsecond line\n")
    (docs / "b" / "c.txt").write_text("another document")
    (docs / "empty.txt").write_text("\n")
    assert load_texts(docs) == ["first line\nsecond line\n", "another document"]
    chunks = load_chunks(docs, "train", tokenizer, chunk_size=4, cache_dir=tmp_path / "c")
    assert chunks.n_reviews == 2


def test_mixed_or_unreadable_files_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "mixed").mkdir()
    compress(tmp_path / "mixed" / "a.jsonl", encoded("jsonl", TEXTS))
    compress(tmp_path / "mixed" / "b.csv", encoded("csv", TEXTS))
    with pytest.raises(MLMError, match=r"b\.csv is a csv file but .*a\.jsonl is jsonl"):
        load_texts(tmp_path / "mixed")
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"text": "ok"}\n')[:-8])
    with pytest.raises(MLMError, match=r"Cannot read .*broken\.jsonl\.gz") as err:
        load_texts(broken)
    assert "\n" not in str(err.value)


def test_records_over_a_block_and_quoted_newlines(tmp_path, monkeypatch):
    big = "word " * (300 << 10)  # 1.5 MiB in one record
    texts = [big, 'a "quoted"\nreview, with\r\nnewlines', "short"] * 3
    for fmt in ("jsonl", "csv"):
        file = compress(tmp_path / f"t.{fmt}", encoded(fmt, texts))
        assert load_texts(file) == texts
        # Small blocks put record and quote boundaries everywhere.
        batches = list(iter_texts([file], block_bytes=1000))
        assert [t for batch, _ in batches for t in batch] == texts and len(batches) >= 3


def test_dictionary_and_string_view_columns(tmp_path):
    plain = pa.array(TEXTS)
    for name, column in (("dict", plain.dictionary_encode()), ("view", plain.cast(pa.string_view()))):
        pq.write_table(pa.table({"text": column}), tmp_path / f"{name}.parquet", store_schema=True)
        assert load_texts(tmp_path / f"{name}.parquet") == TEXTS


def test_a_huge_document_is_tokenized_in_slices_as_a_whole(tokenizer, monkeypatch):
    monkeypatch.setattr(corpus_store, "SLICE_CHARS", 50)
    monkeypatch.setattr(corpus_store, "SLICES_PER_STRETCH", 3)
    text = " ".join(["the plot", "was\nreally", "boring", "actor123"] * 40)
    stretches = list(corpus_store._stretches([TEXTS[0], text, TEXTS[1]], tokenizer))
    ids = np.concatenate([s[0] for s in stretches])
    words = np.concatenate([s[1] for s in stretches])
    expected = [tokenizer.backend.encode(t) for t in (TEXTS[0], text, TEXTS[1])]
    assert ids.tolist() == sum((e.ids for e in expected), [])
    assert words.tolist() == sum(([-1 if w is None else w for w in e.word_ids] for e in expected), [])
    assert len(stretches) > 4 and sum(len(s[2]) for s in stretches) == 3  # three documents end


@pytest.mark.parametrize("group_size", [None, 3])
def test_store_equals_the_course_chunks_and_their_whole_word_masks(tmp_path, monkeypatch, group_size):
    """On the smoke corpus, in many pieces: the same ids, and the same whole-word masks, chunk starts and
    [SEP] [CLS] boundaries included, as the course's word ids give."""
    monkeypatch.setattr(corpus_store, "PIECE_CHARS", 3000)
    tokenizer = load_tokenizer(SMOKE)
    course = tokenize_and_chunk(load_texts(SMOKE / "reviews.jsonl"), tokenizer, chunk_size=32, group_size=group_size)
    stored = load_chunks(SMOKE / "reviews.jsonl", "train", tokenizer, chunk_size=32, group_size=group_size,
                         cache_dir=tmp_path)
    assert len(stored) == len(course) and (stored.n_reviews, stored.n_tokens) == (course.n_reviews, course.n_tokens)
    np.testing.assert_array_equal(stored.input_ids, course.input_ids)
    collator = MaskingCollator.from_tokenizer(tokenizer, whole_word=True, mlm_probability=0.3)
    masks = [collator.mask(torch.from_numpy(c.input_ids.astype(np.int64)),
                           torch.from_numpy(c.word_ids.astype(np.int64)), generator=torch.Generator().manual_seed(1))
             for c in (course, stored)]
    for name in ("input_ids", "labels"):
        assert torch.equal(masks[0][name], masks[1][name])
    ids_file = stored.cache_path / "ids.bin"
    assert ids_file.stat().st_size == len(stored) * 32 * 2  # uint16 for a vocabulary that fits 16 bits
    assert (stored.cache_path / "words.bin").stat().st_size == len(stored) * 2 * 4  # two bits per token


def test_train_all_and_test_percent(tmp_path, tokenizer):
    chunks = load_chunks(SMOKE / "reviews.jsonl", "train", tokenizer, chunk_size=16, cache_dir=tmp_path)
    train, test = split_train_test(chunks, train_size="all", test_size="5%", seed=42)
    assert len(test) == -(-len(chunks) * 5 // 100) and len(train) + len(test) == len(chunks)
    course_train, course_test = split_train_test(chunks, train_size=len(train), test_size=len(test), seed=42)
    np.testing.assert_array_equal(train.input_ids, course_train.input_ids)
    np.testing.assert_array_equal(test.word_ids, course_test.word_ids)
    for bad, setting in (("0%", "test_size"), ("100%", "test_size"), ("all", "test_size"), ("x", "train_size")):
        with pytest.raises(MLMError, match=f"`{setting}`"):
            split_train_test(chunks, **{setting: bad})
    from mlm.settings import TrainConfig
    with pytest.raises(MLMError, match="`test_size`"):
        TrainConfig(test_size="105%").validate()


def test_prepare_data_flags_take_all_and_percent(tmp_path, tiny_tokenizer_dir, capsys):
    from mlm.cli.prepare_data import main
    main(["--dataset", str(SMOKE / "reviews.jsonl"), "--tokenizer", str(tiny_tokenizer_dir), "--chunk-size", "16",
          "--cache-dir", str(tmp_path), "--train-size", "all", "--test-size", "5%"])
    out = capsys.readouterr().out
    chunks = int(out.splitlines()[1].split()[3].replace(",", ""))
    test = -(-chunks * 5 // 100)
    assert f"{chunks - test:,} train chunks, {test:,} test chunks" in out



def test_a_corpus_too_small_for_the_draw_keeps_its_store_and_says_so(tmp_path, tiny_tokenizer_dir, capsys):
    """The preparation succeeded, yet an `error:` line and exit status 2 said it had failed: the draw is a note."""
    from mlm.cli.prepare_data import main
    main(["--dataset", str(SMOKE / "reviews.jsonl"), "--tokenizer", str(tiny_tokenizer_dir), "--cache-dir",
          str(tmp_path)])
    (store,) = (tmp_path / "chunks").glob("train-*")
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and re.match(r"note: .*Cannot draw 10000 train \+ 1000 test chunks from .* --train-size "
                                        r"\(`all` .*--test-size.* 5%.* The chunks are stored \(", notes[0]), out
    assert str(store) in notes[0]
    main(["--dataset", str(SMOKE / "reviews.jsonl"), "--tokenizer", str(tiny_tokenizer_dir), "--cache-dir",
          str(tmp_path), "--train-size", "50", "--test-size", "50"])
    assert "% of the chunks left to train on (--train-size all takes them all)" in capsys.readouterr().out
    main(["--dataset", str(SMOKE / "reviews.jsonl"), "--tokenizer", str(tiny_tokenizer_dir), "--cache-dir",
          str(tmp_path), "--train-size", "1", "--test-size", "50"])
    assert "; under 1% of the chunks left to train on" in capsys.readouterr().out  # it said "0%" of them


def test_the_preparation_bar_is_drawn_on_a_terminal_only_and_names_the_split(tmp_path, tokenizer, capsys,
                                                                                monkeypatch):
    """`mlm-train > out 2> err` wrote carriage returns into err, under the cache key's name."""
    data = compress(tmp_path / "data" / "train.jsonl", encoded("jsonl", TEXTS * 50))
    load_chunks(data, "train", tokenizer, chunk_size=16, cache_dir=tmp_path / "plain", progress=True)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    load_chunks(data, "train", tokenizer, chunk_size=16, cache_dir=tmp_path / "terminal", progress=True)
    assert "\rtokenizing train (train):" in capsys.readouterr().err


def test_a_failed_preparation_leaves_the_cache_clean(tmp_path, tokenizer):
    data = compress(tmp_path / "data" / "train.jsonl", encoded("jsonl", TEXTS * 50))
    with pytest.raises(MLMError, match="column"):
        load_chunks(data, "train", tokenizer, chunk_size=16, text_column="body", cache_dir=tmp_path / "cache")
    assert [path.name for path in (tmp_path / "cache").rglob("*")] == ["chunks"]


KILLER = """
import os, signal, sys
import mlm.corpus_store as cs
from mlm.corpus import load_chunks
from mlm.tokenizer import load_tokenizer
cs.PIECE_CHARS = 3000
calls = []
pack = cs.pack_words
def pack_then_die(words):
    calls.append(1)
    if len(calls) == 5:  # mid-piece: this stretch's ids are written, its word bits are not
        os.kill(os.getpid(), signal.SIGKILL)
    return pack(words)
cs.pack_words = pack_then_die
load_chunks(sys.argv[1], "train", load_tokenizer(sys.argv[2]), chunk_size=32, group_size=3, cache_dir=sys.argv[3])
"""


def test_kill_9_then_the_same_command_resumes_byte_identical(tmp_path, monkeypatch):
    corpus = SMOKE / "reviews.jsonl"
    killed = subprocess.run([sys.executable, "-c", KILLER, str(corpus), str(SMOKE), str(tmp_path / "a")],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -9
    partial = [p for p in (tmp_path / "a" / "chunks").iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and json.loads((partial[0] / "progress.json").read_text())["pieces"] == 4

    monkeypatch.setattr(corpus_store, "PIECE_CHARS", 3000)
    pieces = []
    end = corpus_store._Writer.end_piece
    monkeypatch.setattr(corpus_store._Writer, "end_piece", lambda self: pieces.append(1) or end(self))
    tokenizer = load_tokenizer(SMOKE)
    resumed = load_chunks(corpus, "train", tokenizer, chunk_size=32, group_size=3, cache_dir=tmp_path / "a")
    resumed_pieces = len(pieces)
    whole = load_chunks(corpus, "train", tokenizer, chunk_size=32, group_size=3, cache_dir=tmp_path / "b")
    assert resumed_pieces == len(pieces) - resumed_pieces - 4  # the four done pieces were not redone
    for name in ("ids.bin", "words.bin", "header.json"):
        assert (resumed.cache_path / name).read_bytes() == (whole.cache_path / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a" / "chunks").iterdir()) == [resumed.cache_path.name]


def test_leftover_temporary_files_are_removed_and_files_are_readable(tmp_path, tokenizer):
    chunks_dir = tmp_path / "chunks"
    chunks_dir.mkdir()
    leftovers = [chunks_dir / ".header.json.abc123.mlm.tmp", chunks_dir / ".progress.json.x1y2z3.mlm.tmp"]
    for file in leftovers:
        file.write_bytes(b"half")
    old = os.umask(0o022)
    try:
        chunks = load_chunks(SMOKE / "reviews.jsonl", "train", tokenizer, chunk_size=8, cache_dir=tmp_path)
    finally:
        os.umask(old)
    assert not any(file.exists() for file in leftovers)
    for file in chunks.cache_path.iterdir():
        assert file.stat().st_mode & 0o777 == 0o644


def test_step_batches_read_rows_from_the_store(tmp_path, tokenizer):
    from mlm.train import StepBatches, epoch_order
    chunks = load_chunks(SMOKE / "reviews.jsonl", "train", tokenizer, chunk_size=16, cache_dir=tmp_path)
    train, _ = split_train_test(chunks, train_size="all", test_size="5%")
    collator = MaskingCollator.from_tokenizer(tokenizer, whole_word=True)
    batches = StepBatches(train, epoch_order(len(train), 0, 0), collator, batch_size=4, grad_accum=1, rank=0,
                          world_size=1, seed=0, epoch=0)
    in_memory = tokenize_and_chunk(load_texts(SMOKE / "reviews.jsonl"), tokenizer, chunk_size=16)
    memory_train, _ = split_train_test(in_memory, train_size="all", test_size="5%")
    reference = StepBatches(memory_train, epoch_order(len(train), 0, 0), collator, batch_size=4, grad_accum=1,
                            rank=0, world_size=1, seed=0, epoch=0)
    for step in (0, len(batches) - 1):
        (got,), _, _ = batches[step]
        (want,), _, _ = reference[step]
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])


def test_a_data_file_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """The store's key and the run record share one memoised hash: no second read of an unchanged file."""
    import hashlib

    from mlm.files import hashing
    file = tmp_path / "data.txt"
    file.write_bytes(b"one")
    old = 1_000_000_000_000_000_000
    os.utime(file, ns=(old, old))
    monkeypatch.setattr(hashing, "RACY_NS", -(1 << 62))  # the ctime is now: remember it anyway
    reads = []
    monkeypatch.setattr(hashing, "open", lambda *a: reads.append(a) or open(*a), raising=False)
    assert hashing.file_sha256(file) == hashlib.sha256(b"one").hexdigest()
    assert hashing.file_sha256(tmp_path / "." / "data.txt") == hashing.file_sha256(file) and len(reads) == 1
    file.write_bytes(b"three")
    os.utime(file, ns=(old, old))  # the same mtime, as `cp -p` or `touch -r` leave it
    assert hashing.file_sha256(file) == hashlib.sha256(b"three").hexdigest() and len(reads) == 2
    monkeypatch.setattr(hashing, "RACY_NS", 2_000_000_000)
    fresh = tmp_path / "fresh.txt"
    fresh.write_bytes(b"new")  # changed just now: not remembered, in case a rewrite follows within the tick
    hashing.file_sha256(fresh)
    hashing.file_sha256(fresh)
    assert len(reads) == 4


SHARED_HUB = ROOT.parent / "shared" / "hub"
SHARED_TOKENIZER = SHARED_HUB / "models" / "distilbert-base-uncased"
SHARED_IMDB = SHARED_HUB / "datasets" / "stanfordnlp" / "imdb"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_IMDB.is_dir() and SHARED_TOKENIZER.is_dir()),
                    reason="needs a local copy of IMDb and its tokenizer")
@pytest.mark.parametrize("group_size, n_chunks", [(None, 61_302), (1000, 61_291)])
def test_the_course_figures_on_imdb_through_the_store(tmp_path, group_size, n_chunks):
    """IMDb's train split through the store: the course's chunk counts, and the same 10,000/1,000 draw and frozen
    whole-word and token masks as the in-memory course path."""
    from mlm.masking import freeze_eval_masks

    tokenizer = load_tokenizer(SHARED_TOKENIZER)
    stored = load_chunks(SHARED_IMDB, "train", tokenizer, chunk_size=128, group_size=group_size, cache_dir=tmp_path)
    course = tokenize_and_chunk(load_texts(SHARED_IMDB, "train"), tokenizer, chunk_size=128, group_size=group_size)
    assert len(stored) == len(course) == n_chunks
    for a, b in zip(split_train_test(stored, seed=42), split_train_test(course, seed=42)):
        assert len(a) == len(b) and np.array_equal(a.input_ids, b.input_ids)
    test = [split_train_test(chunks, seed=42)[1] for chunks in (stored, course)]
    for whole_word in (False, True):
        masks = [freeze_eval_masks(torch.from_numpy(c.input_ids.astype(np.int64)),
                                   torch.from_numpy(c.word_ids.astype(np.int64)), mask_token_id=tokenizer.mask_token_id,
                                   vocab_size=tokenizer.vocab_size, special_token_ids=tokenizer.special_token_ids,
                                   seed=42, whole_word=whole_word) for c in test]
        for name in ("input_ids", "labels"):
            assert torch.equal(masks[0][name], masks[1][name])


# ---------------------------------------------------------------------------------------------------------
# What a user's own corpus can get wrong


def test_a_partial_store_shorter_than_its_progress_starts_over(tmp_path, monkeypatch):
    """A crash that loses appended bytes (power loss, a full disk) but keeps progress.json: zero-filling the gap
    would make a store that passes its checksums with [PAD] rows in it."""
    monkeypatch.setattr(corpus_store, "PIECE_CHARS", 3000)
    tokenizer, corpus = load_tokenizer(SMOKE), SMOKE / "reviews.jsonl"
    end = corpus_store._Writer.end_piece

    def stop_after_two(self):
        end(self)
        if self.state["pieces"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(corpus_store._Writer, "end_piece", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        load_chunks(corpus, "train", tokenizer, chunk_size=32, cache_dir=tmp_path / "a")
    monkeypatch.setattr(corpus_store._Writer, "end_piece", end)
    (partial,) = (tmp_path / "a" / "chunks").glob(".*.partial")
    (partial / "ids.bin").write_bytes((partial / "ids.bin").read_bytes()[:100])
    resumed = load_chunks(corpus, "train", tokenizer, chunk_size=32, cache_dir=tmp_path / "a")
    whole = load_chunks(corpus, "train", tokenizer, chunk_size=32, cache_dir=tmp_path / "b")
    for name in ("ids.bin", "words.bin"):
        assert (resumed.cache_path / name).read_bytes() == (whole.cache_path / name).read_bytes()


def test_a_bad_byte_in_a_later_block_of_a_csv_names_its_line(tmp_path):
    file = tmp_path / "t.csv"
    file.write_bytes(b'text\n"a"\n"b"\n"c"\n"caf\xe9"\n')
    for block_bytes in (4, 1 << 20):  # the header is a block's first record, or the file's
        with pytest.raises(MLMError, match=r"byte 21 \(line 5\)"):
            list(iter_texts([file], block_bytes=block_bytes))


@pytest.mark.parametrize("body", ['text,n\n"good",1\n"unterminated,2\n"bad",3\n"fine",4\n', '"text\nabc\n',
                                  'text,n\nhe is 6\'2" tall,0\n"unterminated,2\n"bad",3\n'])  # an even count
def test_csv_with_an_unterminated_quote_is_refused(tmp_path, body):
    """pyarrow accepts a quote left open at the end of the file: every record after the stray quote would be
    silently merged into one."""
    file = tmp_path / "t.csv"
    file.write_text(body)
    with pytest.raises(MLMError, match=r"t\.csv has a quoted field that is never closed.*line [13]") as err:
        load_texts(file)
    assert "\n" not in str(err.value)


def test_a_quote_inside_an_unquoted_field_is_text(tmp_path):
    """A quote opens a quoted field only as the field's first character; pyarrow reads one elsewhere as text (6'2"),
    so it is not a quote left open."""
    file = tmp_path / "t.csv"
    file.write_text('text,n\nhe is 6\'2" tall,1\n"a ""quoted"" one",2\nthird,3\n')
    assert load_texts(file) == ['he is 6\'2" tall', 'a "quoted" one', "third"]


def test_a_json_array_file_says_json_lines_are_expected(tmp_path):
    for name, text in (("a.json", json.dumps([{"text": "x"}])), ("b.json", json.dumps([{"text": "x"}], indent=1))):
        (tmp_path / name).write_text(text)
        with pytest.raises(MLMError, match=f"{name} holds a JSON array.*one JSON object per line.*jq"):
            load_texts(tmp_path / name)


def test_an_empty_corpus_names_its_files(tmp_path, tokenizer):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("\n \n")
    (tmp_path / "notes" / "b.txt").write_text("")
    with pytest.raises(MLMError, match=r"No text in .*a\.txt and 1 other file.*empty") as err:
        load_chunks(tmp_path / "notes", "train", tokenizer, chunk_size=8, cache_dir=tmp_path / "c")
    assert "column" not in str(err.value)


def test_a_folder_without_data_files_or_split_names(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("not data")
    with pytest.raises(MLMError, match=r"No data files \(\.parquet, \.jsonl.*in .*docs"):
        load_texts(tmp_path / "docs")
    (tmp_path / "notes" / "x").mkdir(parents=True)
    (tmp_path / "notes" / "x" / "part-1.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(MLMError, match=r"notes has no split names.*only the 'train' split.*'test' was asked"):
        load_texts(tmp_path / "notes", "test")


def test_train_all_with_every_chunk_held_out(tmp_path, tokenizer):
    chunks = load_chunks(SMOKE / "reviews.jsonl", "train", tokenizer, chunk_size=16, cache_dir=tmp_path)
    with pytest.raises(MLMError, match=f"`train_size` all leaves no chunk.*`test_size` {len(chunks)}"):
        split_train_test(chunks, train_size="all", test_size=len(chunks))


def test_a_file_pyarrow_cannot_read_is_one_sentence(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"not parquet")
    with pytest.raises(MLMError) as err:
        load_texts(tmp_path / "a.parquet")
    assert ".." not in str(err.value)


def test_a_corrupt_store_is_one_warning_line_in_the_commands(tmp_path, tiny_tokenizer_dir, capsys):
    from mlm.cli.prepare_data import main
    from mlm.errors import run_cli
    argv = ["--dataset", str(SMOKE / "reviews.jsonl"), "--tokenizer", str(tiny_tokenizer_dir), "--chunk-size", "16",
            "--cache-dir", str(tmp_path), "--no-progress", "--train-size", "all", "--test-size", "5%"]
    run_cli(lambda: main(argv))
    (ids,) = (tmp_path / "chunks").glob("*/ids.bin")
    raw = bytearray(ids.read_bytes())
    raw[100] ^= 1
    ids.write_bytes(bytes(raw))
    capsys.readouterr()
    run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert err.startswith("warning: Ignoring corrupt chunk store") and err.count("\n") == 1, err


def test_prepare_data_help_is_true_to_the_flags(capsys):
    from mlm.cli.prepare_data import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in out and "(default: True)" not in out and "(default: False)" not in out
    assert "column holding the text in parquet, JSON-lines and CSV files" in out
    assert "(default: 128)" in out and "(default: stanfordnlp/imdb)" in out


def test_a_folder_as_validation_file_is_named_as_one(tmp_path, tokenizer):
    from mlm.corpus import load_train_eval_chunks
    with pytest.raises(MLMError, match=r"--validation-file .* is a folder.*one file"):
        load_train_eval_chunks(SMOKE / "reviews.jsonl", tokenizer, validation_file=tmp_path, chunk_size=16,
                               cache_dir=tmp_path / "c", train_size="all", test_size=2)


def test_ctrl_c_in_prepare_data_says_the_same_command_continues(tmp_path, tiny_tokenizer_dir, monkeypatch, capsys):
    from mlm.cli import prepare_data
    from mlm.errors import run_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_data, "load_chunks", interrupted)
    argv = ["--dataset", str(SMOKE / "reviews.jsonl"), "--tokenizer", str(tiny_tokenizer_dir), "--cache-dir",
            str(tmp_path)]
    for no_cache in ([], ["--no-cache"]):  # --no-cache keeps nothing to continue from
        with pytest.raises(SystemExit) as stop:
            run_cli(lambda args=argv + no_cache: prepare_data.main(args))
        err = capsys.readouterr().err
        assert stop.value.code == 130 and err.count("\n") == 1 and "--resume" not in err
        assert ("Run the same command again" in err) != bool(no_cache), err


def test_a_utf16_file_is_not_told_to_convert_from_latin1(tmp_path):
    for name in ("a.txt", "b.csv", "c.jsonl"):
        (tmp_path / name).write_text('text\n"good movie"\n', encoding="utf-16")
        with pytest.raises(MLMError, match=r"UTF-16.*iconv -f utf-16 -t utf-8"):
            load_texts(tmp_path / name)


def test_a_run_on_relative_paths_resumes_from_another_directory(tmp_path, monkeypatch, capsys):
    """run.json is read again from wherever --resume or mlm-evaluate runs: a relative --dataset recorded as typed
    named nothing there (or a Hub repo), and a relative --cache-dir prepared the store again."""
    from mlm.cli.train import main
    (tmp_path / "work" / "notes").mkdir(parents=True)
    (tmp_path / "work" / "notes" / "a.jsonl").write_bytes((SMOKE / "reviews.jsonl").read_bytes())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    main(["--model", str(SMOKE), "--init", "random", "--dataset", "notes", "--cache-dir", "cache", "--chunk-size",
          "32", "--train-size", "16", "--test-size", "8", "--batch-size", "8", "--max-steps", "1", "--output-dir",
          str(tmp_path / "run"), "--no-progress", "--prompt", "a [MASK]."])
    monkeypatch.chdir(tmp_path / "elsewhere")
    main(["--resume", "latest", "--output-dir", str(tmp_path / "run"), "--extend", "--max-steps", "2"])
    assert "status                 finished" in capsys.readouterr().out
    assert not (tmp_path / "elsewhere" / "cache").exists()


def test_json_and_jsonl_files_are_one_format(tmp_path):
    compress(tmp_path / "a.jsonl", encoded("jsonl", TEXTS[:2]))
    compress(tmp_path / "b.json.gz", encoded("jsonl", TEXTS[2:]))
    assert load_texts(tmp_path) == TEXTS


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_or_sighup_in_prepare_data_is_one_line_and_the_same_command_continues(tmp_path, tiny_tokenizer_dir,
                                                                                    monkeypatch, capsys, sig, code):
    from mlm.cli import prepare_data
    from mlm.errors import run_cli

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), sig)

    monkeypatch.setattr(prepare_data, "load_chunks", signalled)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: prepare_data.main(["--dataset", str(SMOKE / "reviews.jsonl"), "--tokenizer",
                                           str(tiny_tokenizer_dir), "--cache-dir", str(tmp_path)]))
    err = capsys.readouterr().err
    assert stop.value.code == code and err.count("\n") == 1 and signal.Signals(sig).name in err
    assert "Run the same command again" in err


def test_a_quote_inside_an_unquoted_field_does_not_shift_where_records_end(tmp_path):
    """Counting quotes would read every newline after a 6'2" as inside quotes and the next quoted field's newline
    as outside: blocks cut inside a record (wrong texts) or never cut (memory no longer bounded by a block)."""
    import csv
    import io

    rows = [["he is 6'2\" tall"], ["a \"quoted\"\nreview\nover lines"], ["plain"], ['say "hi" twice "x'], ["end"]]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([["text"], *rows * 20])
    body = out.getvalue().replace('"he is 6\'2"" tall"', "he is 6'2\" tall")  # unquoted, as spreadsheets write it
    body = body.replace('"say ""hi"" twice ""x"', 'say "hi" twice "x')
    file = tmp_path / "t.csv"
    file.write_text(body)
    expected = [row[0] for row in csv.reader(io.StringIO(body))][1:]
    assert expected == [row[0] for row in rows * 20]  # Python's csv reads the stray quotes as text too
    for block_bytes in (1, 7, 30, 64, 1000, 1 << 20):
        batches = list(iter_texts([file], block_bytes=block_bytes))
        assert [t for batch, _ in batches for t in batch] == expected, block_bytes
        if block_bytes == 64:
            assert len(batches) > 20  # cut at records all along, not one block from the first stray quote on


WAITER = """
import os, sys, time
import mlm.corpus_store as cs
from mlm.corpus import load_chunks
from mlm.tokenizer import load_tokenizer
cs.PIECE_CHARS = 3000
add, log = cs._Writer.add, open(sys.argv[4], "a")
def slow_add(self, *stretch):  # holds the lock long enough for the other process to arrive and wait
    log.write(f"add {os.getpid()}\\n"); log.flush()
    time.sleep(0.05)
    add(self, *stretch)
cs._Writer.add = slow_add
log.write(f"start {os.getpid()} {time.time()}\\n"); log.flush()
chunks = load_chunks(sys.argv[1], "train", load_tokenizer(sys.argv[2]), chunk_size=32, cache_dir=sys.argv[3])
log.write(f"done {os.getpid()} {time.time()} {len(chunks)} {chunks.cache_path}\\n"); log.flush()
"""


def test_processes_wanting_one_store_wait_for_the_one_that_prepares_it(tmp_path):
    """As torchrun's ranks do: two processes start on one cold store; one tokenizes, the other waits for it and
    reads the finished store."""
    log = tmp_path / "log"
    args = [sys.executable, "-c", WAITER, str(SMOKE / "reviews.jsonl"), str(SMOKE), str(tmp_path / "cache"), str(log)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(args, cwd=ROOT, env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = [line.split() for line in log.read_text().splitlines()]
    preparers = {pid for word, pid, *_ in lines if word == "add"}
    starts = [float(rest[0]) for word, _, *rest in lines if word == "start"]
    done = [rest for word, _, *rest in lines if word == "done"]
    assert len(preparers) == 1 and len(done) == 2
    assert max(starts) < min(float(time) for time, *_ in done)  # the second started before the first finished
    assert done[0][1:] == done[1][1:]  # the same chunks from the same store
    assert len(list((tmp_path / "cache" / "chunks").glob("*/header.json"))) == 1


def test_a_data_file_written_to_while_it_is_read_is_not_stored(tmp_path, tokenizer, monkeypatch):
    # The key hashes the files before they are read: a file written to meanwhile was stored under its old hash, and a
    # later run on the file as it is now would have read no store, or one of other text.
    corpus = tmp_path / "r.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS * 20))
    real = corpus_store._stretches

    def stretches_then_append(texts, tokenizer):
        with open(corpus, "a") as file:
            file.write(json.dumps({"text": "a review added later"}) + "\n")
        return real(texts, tokenizer)

    monkeypatch.setattr(corpus_store, "_stretches", stretches_then_append)
    with pytest.raises(MLMError, match="r.jsonl changed while it was being read; run the same command again"):
        load_chunks(corpus, "train", tokenizer, chunk_size=8, cache_dir=tmp_path / "c")
    assert list((tmp_path / "c" / "chunks").iterdir()) == []  # nothing kept under the old hash
