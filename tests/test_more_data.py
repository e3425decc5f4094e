"""More data: .csv files, several training splits, an eval split of its own, and a --validation-file."""

from __future__ import annotations

import csv
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from mlm.corpus import load_chunks, load_train_eval_chunks
from mlm.data import concatenate_splits, draw, split_train_test
from mlm.errors import MLMError
from mlm.files.corpus_files import iter_texts
from mlm.files.data_files import find_data_files, load_texts
from mlm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"


def smoke_texts() -> list[str]:
    return [json.loads(line)["text"] for line in (SMOKE / "reviews.jsonl").read_text().splitlines()]


def write_csv(path: Path, texts: list[str], column: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", column])
        writer.writerows([index % 2, text] for index, text in enumerate(texts))
    return path


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """The smoke reviews as a folder with three splits, in three formats: train (jsonl), test (csv), unsupervised."""
    texts = smoke_texts()
    root = tmp_path / "corpus"
    write_jsonl(root / "train.jsonl", texts[:300])
    write_csv(root / "test.csv", texts[300:450])
    write_jsonl(root / "unsupervised.jsonl", texts[450:])
    return root


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SMOKE)


def test_csv_reads_quoted_commas_newlines_and_number_like_reviews(tmp_path):
    texts = ['a review, with a comma', 'two\nlines and "quotes"', "12345", "", "naïve café"]
    path = write_csv(tmp_path / "reviews.csv", texts)
    assert load_texts(path) == texts
    assert find_data_files(write_csv(tmp_path / "folder" / "test.csv", texts).parent, "test") == [
        tmp_path / "folder" / "test.csv"]


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_csv_separated_by_semicolons_or_tabs_is_read_by_its_header(tmp_path, separator):
    # A spreadsheet in a comma-decimal locale saves "CSV" with semicolons; its texts still hold commas.
    texts = ["a review, with a comma", 'two\nlines and "quotes"', "3,5 stars"]
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="", encoding="utf-8") as file:
        csv.writer(file, delimiter=separator).writerows([["label", "text"], *([1, text] for text in texts)])
    assert load_texts(path) == texts
    # Read in blocks of a few bytes, each parsed under the header: the separator holds for every block.
    assert [text for batch, _ in iter_texts([path], block_bytes=8) for text in batch] == texts
    # Only the marks between the column names count, however long the header line: a quoted name may hold a comma.
    path.write_text(f'"Title, short"{separator}{"c" * 70_000}{separator}text\nA{separator}b{separator}"x, y"\n')
    assert load_texts(path) == ["x, y"]


def test_csv_errors_are_one_actionable_line(tmp_path):
    # pyarrow's own words named neither the cause nor the fix: "CSV parse error: Expected 2 columns, got 4: ...".
    (ragged := tmp_path / "ragged.csv").write_text("label,text\n1,fine\n20,one, two, three\n")
    with pytest.raises(MLMError, match="ragged.csv has a record of 4 fields where its header names 2 \\('20,one, two, "
                                       "three'\\): quote a field that holds a comma, as in \"one, two\".$"):
        load_texts(ragged)
    (short := tmp_path / "short.csv").write_text("label,text\n1,fine\n2\n")  # it said "1 fields", and to quote
    with pytest.raises(MLMError, match="short.csv has a record of 1 field where its header names 2 \\('2'\\): give "
                                       "every column a value, an empty one too \\(a comma more\\).$"):
        load_texts(short)
    with pytest.raises(MLMError, match=r"has no column 'text' \(it has: 'label', 'body'\).*--text-column"):
        load_texts(write_csv(tmp_path / "body.csv", ["x"], column="body"))
    (quoted := tmp_path / "quoted.csv").write_text('id,"body, text"\n1,x\n')  # it listed "id, body, text"
    with pytest.raises(MLMError, match=r"has no column 'text' \(it has: 'id', 'body, text'\)"):
        load_texts(quoted)
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("label,text\n1,fine\n0,caf\xe9\n".encode("latin-1"))
    # cp1252, not latin1, which turns a Windows file's quotes and dashes into control characters
    with pytest.raises(MLMError, match=r"not UTF-8: byte \d+ \(line 3\).*e\.g\. with `iconv -f cp1252 -t utf-8`\.$"):
        load_texts(bad)


def test_default_draw_is_the_courses_split_of_the_train_split(corpus, tokenizer, tmp_path):
    args = dict(chunk_size=32, cache_dir=tmp_path / "cache")
    train, held_out = load_train_eval_chunks(corpus, tokenizer, train_size=100, test_size=20, seed=5, **args)
    expected_train, expected_test = split_train_test(load_chunks(corpus, "train", tokenizer, **args),
                                                     train_size=100, test_size=20, seed=5)
    np.testing.assert_array_equal(train.input_ids, expected_train.input_ids)
    np.testing.assert_array_equal(held_out.input_ids, expected_test.input_ids)


def test_eval_split_and_concatenated_train_splits(corpus, tokenizer, tmp_path):
    args = dict(chunk_size=32, cache_dir=tmp_path / "cache")
    chunks = {split: load_chunks(corpus, split, tokenizer, **args) for split in ("train", "test", "unsupervised")}
    everything = len(chunks["train"]) + len(chunks["unsupervised"])
    train, held_out = load_train_eval_chunks(corpus, tokenizer, train_splits=("train", "unsupervised"),
                                             eval_split="test", train_size=everything, test_size=30, seed=1, **args)
    # Every chunk of both training splits, each once; the eval chunks are the test split's, drawn with the seed.
    both = np.concatenate([chunks["train"].input_ids, chunks["unsupervised"].input_ids])
    assert sorted(map(bytes, train.input_ids)) == sorted(map(bytes, both))
    assert train.n_reviews == 300 + 150
    permutation = np.random.default_rng(1).permutation(len(chunks["test"]))
    np.testing.assert_array_equal(held_out.input_ids, chunks["test"].input_ids[permutation[:30]])

    with pytest.raises(MLMError, match=f"Cannot draw {everything + 1} train chunks from {everything}: give "
                                       f"`train_size` {everything} or less"):
        load_train_eval_chunks(corpus, tokenizer, train_splits=("train", "unsupervised"), eval_split="test",
                               train_size=everything + 1, test_size=30, **args)


def test_validation_file_gives_the_eval_chunks(corpus, tokenizer, tmp_path):
    args = dict(chunk_size=32, cache_dir=tmp_path / "cache")
    validation = write_csv(tmp_path / "valid.csv", smoke_texts()[500:])
    _, held_out = load_train_eval_chunks(corpus, tokenizer, validation_file=str(validation), train_size=50,
                                         test_size=10, seed=2, **args)
    np.testing.assert_array_equal(held_out.input_ids,
                                  draw(load_chunks(validation, "train", tokenizer, **args), 10, seed=2).input_ids)
    available = len(load_chunks(validation, "train", tokenizer, **args))
    with pytest.raises(MLMError, match=f"from {available}: give `test_size` {available} or less"):
        load_train_eval_chunks(corpus, tokenizer, validation_file=str(validation), train_size=50,
                               test_size=available + 1, **args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(eval_split="test", validation_file="x.csv"), "give one of them"),
    (dict(eval_split="train"), "`eval_split` train is also a training split"),
    (dict(train_splits=("train", "train")), "`train_splits` must name each split once"),
    (dict(validation_file="missing.csv"), "--validation-file missing.csv: no such file"),
    (dict(eval_split="validation"), "No files for split 'validation'"),
])
def test_bad_data_flags_are_refused(corpus, tokenizer, tmp_path, kwargs, message):
    with pytest.raises(MLMError, match=message):
        load_train_eval_chunks(corpus, tokenizer, train_size=10, test_size=10, chunk_size=32,
                               cache_dir=tmp_path / "cache", **kwargs)


@pytest.mark.parametrize("fields, message", [
    (dict(eval_split="test", validation_file="v.csv"), "give one of them"),
    (dict(eval_split="unsupervised", train_splits=("train", "unsupervised")), "is also a training split"),
])
def test_train_refuses_clashing_eval_data_before_touching_the_output_folder(tmp_path, fields, message):
    from mlm.train import TrainConfig, train

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("an earlier run\n")
    with pytest.raises(MLMError, match=message):
        train(TrainConfig(model=str(SMOKE), init="random", output_dir=str(run), overwrite=True, **fields))
    assert (run / "metrics.jsonl").read_text() == "an earlier run\n"


def test_concatenate_keeps_order_and_counts(corpus, tokenizer):
    a = load_chunks(corpus, "train", tokenizer, chunk_size=32, use_cache=False)
    b = load_chunks(corpus, "unsupervised", tokenizer, chunk_size=32, use_cache=False)
    both = concatenate_splits([a, b])
    np.testing.assert_array_equal(both.word_ids, np.concatenate([a.word_ids, b.word_ids]))
    assert (both.n_reviews, both.n_tokens) == (a.n_reviews + b.n_reviews, a.n_tokens + b.n_tokens)


def test_a_run_on_the_test_split_is_scored_alike_by_evaluate(corpus, tmp_path, monkeypatch, capsys):
    """Train with --eval-split test and --train-splits train,unsupervised; evaluate.py rebuilds the same eval set."""
    from mlm.train import TrainConfig, train

    flags = dict(dataset=str(corpus), chunk_size=32, train_size=64, test_size=16, data_seed=3,
                 cache_dir=str(tmp_path / "cache"), eval_split="test")
    run = tmp_path / "run"
    summary = train(TrainConfig(model=str(SMOKE), init="random", seed=3, batch_size=16, eval_batch_size=8, lr=2e-3,
                                epochs=1,
                                output_dir=str(run), progress_bar=False, lean="off",
                                train_splits=("train", "unsupervised"), **flags))
    record = json.loads((run / "run.json").read_text())
    settings = record["settings"]
    assert settings["eval_split"] == "test" and settings["train_splits"] == ["train", "unsupervised"]
    assert record["derived"]["eval_chunks"] == 16 and record["derived"]["train_chunks"] == 64
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--model", str(run), "--json", "--eval-batch-size", "8",
                                      "--device", "cpu", "--no-progress", "--train-splits", "train,unsupervised",
                                      *[x for k, v in flags.items() if k != "train_size"
                                        for x in (f"--{k.replace('_', '-')}", str(v))]])
    runpy.run_path(str(ROOT / "scripts" / "evaluate.py"), run_name="__main__")  # an error would exit(2) here
    report = json.loads(capsys.readouterr().out)
    assert report["eval_set"]["split"] == "test" and report["eval_set"]["chunks"] == 16
    assert report["models"][0]["perplexity"] == summary.after.perplexity

