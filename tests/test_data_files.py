"""mlm/files/data_files.py: which files are a split of --dataset. One rule for folders and globs: symlinks followed
once, split names counted only where the Hub layout puts them, files left out named in one warning line."""

from __future__ import annotations

import gzip
import json
import os
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlm.errors import MLMError
from mlm.files.corpus_files import iter_texts
from mlm.files.data_files import find_corpus, find_data_files, load_texts


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path)
    return path


def quietly(function, *args, **kwargs):
    """function(*args, **kwargs), failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return function(*args, **kwargs)


def warned(function, *args, **kwargs) -> tuple[object, str]:
    """(function's result, the one warning it gave), checked to be one line of reasonable length."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = function(*args, **kwargs)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "\n" not in messages[0] and len(messages[0]) < 400, messages[0]
    return result, messages[0]


def short_error(function, *args, **kwargs) -> str:
    with pytest.raises(MLMError) as err:
        function(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


# ---------------------------------------------------------------------------------------------------------
# Symlinks (issue 28, item 6)


@pytest.fixture()
def linked_notes(tmp_path) -> Path:
    """notes/2023/a.txt; notes/2024 a link to a folder elsewhere; a loop back up; a second name for a.txt."""
    notes = tmp_path / "notes"
    write_text(notes / "2023" / "a.txt", "note a")
    write_text(tmp_path / "elsewhere" / "b.txt", "note b")
    os.symlink(tmp_path / "elsewhere", notes / "2024")
    os.symlink("..", notes / "2023" / "loop")
    os.symlink("2023/a.txt", notes / "latest.txt")
    return notes


def test_the_runs_and_stores_mlm_wrote_inside_a_corpus_folder_are_no_documents(tmp_path):
    # `mlm-train --dataset .` wrote its run (and a cache) below the corpus: the next read took run.json, vocab.txt
    # and header.json for documents (or refused the mix of formats), so the run could neither resume nor be scored.
    corpus = tmp_path / "notes"
    write_text(corpus / "a.txt", "a first note")
    write_text(corpus / "2024" / "b.txt", "a second note")
    record = json.dumps({"run_id": "0" * 32, "settings": {}, "segments": []})
    for folder, names in (("runs/r", ("run.json", "vocab.txt")), ("runs/r/checkpoints/step-000004", ("run.json",)),
                          ("cache/chunks/train-128-abc", ("header.json", "ids.bin"))):
        for name in names:
            write_text(corpus / folder / name, record if name == "run.json" else "{}")
    write_text(corpus / "kept" / "c.txt", "a third note")
    files, _ = quietly(find_corpus, corpus)
    assert [str(f.relative_to(corpus)) for f in files] == ["2024/b.txt", "a.txt", "kept/c.txt"]
    # A data file named run.json, even beside a metrics.jsonl, is data: its folder is read.
    write_jsonl(corpus / "kept" / "run.json", ["a data file of that name"])
    assert "kept/run.json is a json file" in short_error(find_corpus, corpus)


def test_data_files_in_a_format_mlm_does_not_read_are_named(tmp_path):
    # A folder's .jsonl.bz2, .parquet.gz or .ndjson files were left out without a word.
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", ["read"])
    write_jsonl(corpus / "e.JSONL", ["read too"])
    for name in ("b.jsonl.bz2", "c.jsonl.xz", "d.parquet.gz", "f.ndjson"):
        write_text(corpus / name, "not read")
    for name in ("README.md", "a.jsonl.license", "notes.txt.bak", "schema.json.md"):  # no data: nothing said
        write_text(corpus / name, "no data")
    texts, message = warned(load_texts, corpus)
    assert texts == ["read", "read too"]
    assert message.startswith(f"{corpus}: 4 files named like data but in a format mlm does not read, left out: "
                              "b.jsonl.bz2, c.jsonl.xz, d.parquet.gz")
    assert message.endswith("rename a .tsv file to .csv: its tab-separated header is read as such.")


def test_documents_not_in_txt_beside_txt_documents_are_named(tmp_path):
    # A folder of notes read its .txt files and left the Markdown and PDF ones out without a word.
    notes = tmp_path / "notes"
    write_text(notes / "a.txt", "read")
    for name in ("b.md", "2024/c.MD", "d.pdf", "README.md", "LICENSE.md"):  # the last two are about the folder
        write_text(notes / name, "not read")
    texts, message = warned(load_texts, notes)
    assert texts == ["read"]
    assert message.startswith(f"{notes}: 3 documents not in .txt left out: 2024/c.MD, b.md, d.pdf. Each .txt file")
    # Alone, they are named before the folder is refused as holding no data.
    only = tmp_path / "only"
    write_text(only / "b.md", "not read")
    with pytest.warns(UserWarning, match="1 document not in .txt left out: b.md"):
        assert "No data files" in short_error(load_texts, only)
    # Beside parquet, JSON or CSV data, or in a folder laid out by split, a README.md is about the data: nothing said.
    jsonl, split = write_jsonl(tmp_path / "data" / "a.jsonl", ["read"]), write_text(tmp_path / "s" / "train.txt", "x")
    for data in (jsonl, split):
        write_text(data.parent / "README.md", "about the data")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_texts(data.parent)


def test_a_glob_follows_symlinks_once_and_never_a_loop(linked_notes):
    """`**` through `2023/loop -> ..` read every file 41 times (until the OS refused the path), and so put the
    chunks held out for evaluation into training too."""
    files, one_document_per_file = find_corpus(str(linked_notes / "**" / "*.txt"))
    assert files == [linked_notes / "2023" / "a.txt", linked_notes / "2024" / "b.txt"]
    assert one_document_per_file
    assert load_texts(str(linked_notes / "**" / "*.txt")) == ["note a", "note b"]


def test_a_folder_follows_symlinked_subfolders_once_as_a_glob_does(linked_notes):
    """The folder skipped notes/2024 (a link) without a word; now it reads what the glob reads."""
    assert find_corpus(linked_notes) == find_corpus(str(linked_notes / "**" / "*"))
    assert load_texts(linked_notes) == ["note a", "note b"]


def test_a_loop_below_a_split_folder_is_not_read_twice(tmp_path):
    root = tmp_path / "imdb"
    write_parquet(root / "plain_text" / "train-00000-of-00001.parquet", ["x"])
    write_parquet(root / "plain_text" / "test-00000-of-00001.parquet", ["y"])
    os.symlink("..", root / "plain_text" / "up")
    assert quietly(load_texts, root) == ["x"]


def test_files_of_two_splits_that_are_one_file_on_disk_are_read_by_both(tmp_path):
    """The Hub's cache stores equal files once: its snapshot's test and validation shards may link to one blob."""
    blob = write_parquet(tmp_path / "blobs" / "abc", ["same"])
    write_parquet(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet", ["x"])
    for split in ("test", "validation"):
        os.symlink(blob, tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet")
    assert quietly(load_texts, tmp_path / "repo", "test") == ["same"]
    assert quietly(load_texts, tmp_path / "repo", "validation") == ["same"]


def test_a_link_that_leads_nowhere_or_to_itself_is_named_in_a_warning(tmp_path):
    """Both were skipped without a word: a folder or glob of two files trained on one."""
    corpus = tmp_path / "corpus"
    write_jsonl(corpus / "a.jsonl", ["kept"])
    os.symlink(tmp_path / "gone.jsonl", corpus / "b.jsonl")
    os.symlink("c.jsonl", corpus / "c.jsonl")
    for source in (corpus, str(corpus / "*.jsonl")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert load_texts(source) == ["kept"]
        assert len(caught) == 1 and "\n" not in str(caught[0].message), [str(w.message) for w in caught]
        assert "2 symlinks" in str(caught[0].message) and "b.jsonl, c.jsonl" in str(caught[0].message)
        # Attributed inside mlm, so that run_cli prints it as one "warning:" line.
        assert Path(caught[0].filename).name == "data_files.py"
    # A link that would not be read anyway (no data file's name) is not named: the warning is about left-out data.
    (corpus / "b.jsonl").unlink()
    (corpus / "c.jsonl").unlink()
    os.symlink("notes.md", corpus / "notes.md")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_texts(corpus) == ["kept"] and not caught, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------------------
# Where split names count (items 7 and 8)


def test_one_note_named_like_a_split_does_not_hide_the_rest_of_a_folder(tmp_path):
    """notes/2024/train-schedule.txt made the folder a split layout: its lines were read, the 20 other notes not."""
    notes = tmp_path / "notes"
    for index in range(1, 21):
        write_text(notes / "2023" / f"note-{index}.txt", f"note {index}\nits second line")
    write_text(notes / "2024" / "train-schedule.txt", "monday\ntuesday\n")
    files, one_document_per_file = quietly(find_corpus, notes)
    assert len(files) == 21 and one_document_per_file
    texts = load_texts(notes)
    assert len(texts) == 21 and "monday\ntuesday\n" in texts


def test_split_names_deeper_in_a_tree_of_documents_are_documents(tmp_path):
    notes = tmp_path / "notes"
    write_text(notes / "a" / "b" / "test-results.txt", "results")
    write_text(notes / "a" / "b" / "train.txt", "the train to work")
    write_text(notes / "a" / "unsupervised-learning.txt", "a course")
    write_text(notes / "c" / "shopping.txt", "milk")
    assert quietly(load_texts, notes) == ["results", "the train to work", "a course", "milk"]
    message = short_error(load_texts, notes, "test")
    assert "single corpus, which holds only the 'train' split" in message


def test_a_documentation_tree_with_library_test_txt_is_one_corpus(tmp_path):
    """Refused before with a 52,311-byte line listing every file's stem as a split."""
    docs = tmp_path / "docs"
    write_text(docs / "library" / "test.txt", "how to test")
    write_text(docs / "library" / "intro.txt", "the library")
    for index in range(300):
        write_text(docs / "reference" / f"function_{index:03d}_of_the_api.txt", f"function {index}")
    files, one_document_per_file = quietly(find_corpus, docs)
    assert len(files) == 302 and one_document_per_file
    short_error(load_texts, docs, "test")


def test_a_file_beside_a_top_level_split_file_is_named_in_a_warning(tmp_path):
    """train-2023.jsonl beside archive-2024.jsonl prepared 50 of the 400 documents, with no word."""
    root = tmp_path / "corpus"
    write_jsonl(root / "train-2023.jsonl", [f"t{i}" for i in range(50)])
    write_jsonl(root / "archive-2024.jsonl", [f"a{i}" for i in range(350)])
    texts, message = warned(load_texts, root)
    assert texts == [f"t{i}" for i in range(50)]
    assert "archive-2024.jsonl" in message and "left out" in message and str(root) in message


def test_files_a_hub_layout_leaves_out_are_named_a_few_at_a_time(tmp_path):
    root = tmp_path / "imdb"
    write_parquet(root / "plain_text" / "train-00000-of-00001.parquet", ["x"])
    write_parquet(root / "plain_text" / "test-00000-of-00001.parquet", ["y"])
    write_parquet(root / "plain_text" / "notes.parquet", ["z"])
    write_parquet(root / "plain_text" / "deeper" / "train-00000-of-00001.parquet", ["w"])
    for index in range(40):
        write_parquet(root / "extra" / f"part-{index:02d}.parquet", ["v"])
    texts, message = warned(load_texts, root)
    assert texts == ["x"]
    assert message.startswith(f"{root}: 42 data files are not in split 'train'")
    assert message.count(".parquet") == 4  # 3 files named, and the name to give them, train-*.parquet
    assert "extra/part-00.parquet" in message and " and 39 more" in message
    texts, message = warned(load_texts, root / "plain_text", "test")  # the configuration folder itself
    assert texts == ["y"] and message.endswith("1 data file is not in split 'test' and left out of it: notes.parquet. "
                                               "To read them with it, name them test-*.parquet at the top level or one "
                                               "folder down, as in plain_text/; a split is read only when asked for "
                                               "by name.")
    # A compressed file keeps its two suffixes: train-*.gz is no data file's name.
    write_jsonl(tmp_path / "gz" / "train.jsonl", ["x"])
    (tmp_path / "gz" / "more.jsonl.gz").write_bytes(gzip.compress(b'{"text": "y"}\n'))
    assert "name them train-*.jsonl.gz at the top level" in warned(load_texts, tmp_path / "gz")[1]


def test_a_split_of_another_name_is_read_where_split_files_lie(tmp_path):
    root = tmp_path / "corpus"
    write_jsonl(root / "train.jsonl", ["t"])
    write_jsonl(root / "dev.jsonl", ["d"])
    assert quietly(load_texts, root, "dev") == ["d"]
    assert warned(load_texts, root)[0] == ["t"]


def test_split_files_one_folder_down_count_when_they_are_the_hub_layout(tmp_path):
    only_train = tmp_path / "one"
    write_parquet(only_train / "data" / "train-00000-of-00002.parquet", ["a"])
    write_parquet(only_train / "data" / "train-00001-of-00002.parquet", ["b"])
    assert quietly(find_corpus, only_train) == (
        [only_train / "data" / "train-00000-of-00002.parquet", only_train / "data" / "train-00001-of-00002.parquet"],
        False)
    # Two split names one folder down are a split layout whatever lies beside them; a stray file is warned about.
    two = tmp_path / "two"
    write_jsonl(two / "data" / "train.jsonl", ["t"])
    write_jsonl(two / "data" / "validation.jsonl", ["v"])
    write_jsonl(two / "data" / "extra.jsonl", ["e"])
    assert warned(load_texts, two)[0] == ["t"]
    assert warned(load_texts, two, "validation")[0] == ["v"]


def test_an_ambiguous_layout_is_one_short_line_naming_the_file(tmp_path):
    root = tmp_path / "d"
    for index in range(60):
        write_parquet(root / f"configuration_number_{index:02d}" / "train-00000-of-00001.parquet", ["x"])
    message = short_error(load_texts, root)
    assert "several folders" in message and "configuration_number_00, configuration_number_01, " in message
    assert " and 57 more. configuration_number_01/train-00000-of-00001.parquet makes it ambiguous" in message
    both = tmp_path / "both"
    write_jsonl(both / "train.jsonl", ["top"])
    write_jsonl(both / "plain_text" / "train.jsonl", ["below"])
    write_jsonl(both / "plain_text" / "test.jsonl", ["test"])
    message = short_error(load_texts, both)
    assert "several folders of" in message and ": plain_text, the top level. train.jsonl makes" in message


def test_splits_found_are_listed_a_few_at_a_time(tmp_path):
    root = tmp_path / "corpus"
    write_jsonl(root / "train.jsonl", ["t"])
    for index in range(200):
        write_jsonl(root / f"document{index:03d}.jsonl", ["d"])
    message = short_error(load_texts, root, "test")
    assert message.startswith(f"No files for split 'test' in {root}") and "Splits found there: train, " in message
    assert "and 195 more" in message


def test_a_corpus_folder_holding_a_file_named_like_a_split_says_so(tmp_path):
    # A folder of notes with a test.txt among them is read as split files; the error listed the documents as
    # splits ("Splits found there: test, doc000, doc001…") and did not say why, or what to do.
    root = tmp_path / "notes"
    root.mkdir()
    for index in range(5):
        (root / f"doc{index:03d}.txt").write_text("a note\n")
    (root / "test.txt").write_text("a note about tests\n")
    assert short_error(load_texts, root) == (
        f"No files for split 'train' in {root}: test.txt made it a folder of split files (splits there: test, doc000, "
        f"doc001 and 3 more). If it is one corpus, rename it or give its files as a glob: '{root}/**/*.txt'.")
    assert [len(texts) for texts in [load_texts(f"{root}/**/*.txt")]] == [6]  # the glob the message gives reads them


def test_a_hub_repo_reads_split_files_where_the_hub_layout_puts_them(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: str(snapshot))
    write_parquet(snapshot / "data" / "en" / "train-00000-of-00001.parquet", ["deep"])
    # Deeper files of a download are not taken for a corpus of documents: with the test files a later download
    # adds beside them, that corpus would be train and test mixed.
    message = short_error(load_texts, "org/deep", "train")
    assert message.startswith("No files for split 'train' in ") and "Splits found there: none" in message
    write_parquet(snapshot / "plain_text" / "train-00000-of-00001.parquet", ["train"])
    write_parquet(snapshot / "plain_text" / "test-00000-of-00001.parquet", ["test"])
    assert warned(load_texts, "org/deep", "train")[0] == ["train"]


# ---------------------------------------------------------------------------------------------------------
# Globs


def test_a_glob_matches_as_the_shell_does_and_skips_hidden_files(tmp_path):
    root = tmp_path / "data"
    for name in ("a.txt", "sub/b.txt", "sub/deeper/c.txt", ".hidden/d.txt", "sub/.e.txt", "f.md"):
        write_text(root / name, name)
    found = [str(file.relative_to(root)) for file in find_data_files(str(root / "**" / "*.txt"))]
    assert found == ["a.txt", "sub/b.txt", "sub/deeper/c.txt"]
    assert find_data_files(str(root / "*.txt")) == [root / "a.txt"]
    assert find_data_files(str(root / "*" / "*.txt")) == [root / "sub" / "b.txt"]
    assert find_data_files(str(root / "s[uv]b" / "**" / "c.t?t")) == [root / "sub" / "deeper" / "c.txt"]
    with pytest.raises(MLMError, match="f.md is not a corpus file"):
        load_texts(str(root / "*"))
    with pytest.raises(MLMError, match=r"No files match .*\*\.csv"):
        load_texts(str(root / "**" / "*.csv"))


def test_a_relative_glob(tmp_path, monkeypatch):
    write_text(tmp_path / "notes" / "a.txt", "a")
    monkeypatch.chdir(tmp_path)
    assert find_data_files("notes/**/*.txt") == [Path("notes/a.txt")]
    assert find_data_files("**/*.txt") == [Path("notes/a.txt")]


# ---------------------------------------------------------------------------------------------------------
# CSV with old Mac line endings (item 18)


def test_a_csv_with_carriage_return_line_endings_is_read(tmp_path):
    """Records ended by a lone \\r were one block with no record end: its header took the whole file, and the
    corpus was called empty."""
    file = tmp_path / "mac.csv"
    file.write_bytes(b'label,text\r1,first review\r0,"a quoted\rreview, two lines"\r1,last\r')
    expected = ["first review", "a quoted\rreview, two lines", "last"]
    assert load_texts(file) == expected
    for block_bytes in (1, 5, 16, 1 << 20):
        batches = list(iter_texts([file], block_bytes=block_bytes))
        assert [text for batch, _ in batches for text in batch] == expected, block_bytes
    mixed = tmp_path / "mixed.csv"
    mixed.write_bytes(b"text\r\none\rtwo\nthree\r\n")
    assert load_texts(mixed) == ["one", "two", "three"]


def test_a_csv_whose_last_quoted_field_ends_the_file_is_read(tmp_path):
    """A closing quote that was the file's last byte (no final line end) was called never closed."""
    file = tmp_path / "last.csv"
    file.write_bytes(b'label,text\n1,"the end"')
    assert load_texts(file) == ["the end"]


def test_a_carriage_return_csv_error_names_the_right_line(tmp_path):
    file = tmp_path / "mac.csv"
    file.write_bytes(b"label,text\r1,fine\r0,caf\xe9\r")
    with pytest.raises(MLMError, match=r"not UTF-8: byte 23 \(line 3\)"):
        load_texts(file)
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_bytes(b'text\rfine\r"never closed\rmore\r')
    with pytest.raises(MLMError, match="opened on line 3"):
        load_texts(unclosed)
