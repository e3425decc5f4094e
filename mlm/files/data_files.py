"""Finding and reading the texts of a corpus: a Hub dataset repo, a local folder (the Hub layout, or any files at
any depth), a glob, or one file.

`find_corpus` locates the files of a split (`plain_text/{split}-*.parquet` in the Hub's IMDb repo) and
`read_texts` reads their text column through mlm/files/corpus_files.py, which checks what a corpus file can get
wrong (missing column, nulls, bad UTF-8) with a one-line error. mlm/data.py and mlm/corpus_store.py turn the texts
into chunks.
"""

from __future__ import annotations

import glob
from pathlib import Path

from mlm.errors import MLMError
from mlm.files.corpus_files import check_one_format, file_format, iter_texts
from mlm.files.hub import resolve_repo

DEFAULT_DATASET = "stanfordnlp/imdb"
SPLITS = ("train", "test", "unsupervised")
DATA_EXTENSIONS = (".parquet", ".jsonl", ".json", ".csv", ".txt")


def find_data_files(source: str | Path, split: str = "train", *, revision: str | None = None) -> list[Path]:
    """The files that hold `split` of `source`, sorted by path (shard order); see `find_corpus`."""
    return find_corpus(source, split, revision=revision)[0]


def find_corpus(source: str | Path, split: str = "train", *,
                revision: str | None = None) -> tuple[list[Path], bool]:
    """(the files that hold `split` of `source` in shard order, whether each .txt file is one document).

    `source` is a single data file, a glob, a local folder, or a Hub dataset repo id. In a folder (or a
    downloaded snapshot), the files of a split are those named `{split}-*.{ext}` or `{split}.{ext}` anywhere below
    it, e.g. the Hub's `plain_text/train-00000-of-00001.parquet`. A folder without such files, and a glob, are one
    corpus, the 'train' split: every data file at any depth, and there a .txt file is one document (its lines
    joined by their newlines); elsewhere a .txt file holds one document per line. A single file has one split,
    "train", as `datasets.load_dataset("parquet", data_files=path)` names it. Data files may be compressed (.gz,
    .zst; not parquet, which compresses inside). Raises MLMError for a split asked of a one-split corpus and for
    files of mixed formats.
    """
    path = Path(source).expanduser()
    if not path.exists() and any(char in str(source) for char in "*?["):
        return _only_train(_globbed(str(path)), split, str(source)), True
    if path.is_file():
        _only_train([path], split, str(path))
        return _checked([path]), False
    # Download only this split's files. In huggingface_hub's patterns `*` also matches "/", so "*/train-*"
    # finds plain_text/train-00000-of-00001.parquet at any depth.
    patterns = [f"{prefix}{split}{rest}{zipped}" for prefix in ("", "*/") for ext in DATA_EXTENSIONS
                for rest in (f"-*{ext}", ext) for zipped in ("", ".gz", ".zst")]
    folder = resolve_repo(source, repo_type="dataset", revision=revision, allow_patterns=patterns)
    every = sorted((file for file in folder.rglob("*") if file.is_file() and file_format(file)
                    and not _hidden(file.relative_to(folder))), key=lambda file: str(file.relative_to(folder)))
    files = [file for file in every if _names_split(file.name, split)]
    one_corpus = bool(every) and not any(_split_of(file.name) in SPLITS for file in every)
    if not files and one_corpus:  # a folder of files, no split names
        return _only_train(every, split, f"{folder} has no split names in its file names, so it"), True
    if not files and not every and path.is_dir():  # a Hub snapshot holds only the split's files: said below
        raise MLMError(f"No data files (.parquet, .jsonl, .json, .csv or .txt, optionally .gz or .zst) in {folder} "
                       "or below it (hidden files and folders are skipped). Pass the folder that holds them.")
    if not files:
        found = sorted({name for file in every if (name := _split_of(file.name))})
        raise MLMError(
            f"No files for split {split!r} in {folder} (looked for {split}-*.parquet and {split}.parquet, "
            f".jsonl, .csv, .txt). Splits found there: {', '.join(found) or 'none'}."
        )
    parents = {file.parent for file in files}
    if len(parents) > 1:
        # A repo with several configurations (e.g. plain_text/ and another/) would otherwise be silently mixed.
        raise MLMError(
            f"Split {split!r} has files in several folders of {folder}: "
            f"{', '.join(sorted(str(p.relative_to(folder)) for p in parents))}. Pass the one folder to use."
        )
    return _checked(files), False


def check_validation_file(path: str | Path) -> None:
    """Raise MLMError unless --validation-file `path` is one file."""
    if Path(path).expanduser().is_dir():
        raise MLMError(f"--validation-file {path} is a folder: pass one file of it (a .parquet, .jsonl, .csv or "
                       ".txt), or use --eval-split with a folder that has split names.")
    if not Path(path).expanduser().is_file():
        raise MLMError(f"--validation-file {path}: no such file (a .parquet, .jsonl, .csv or .txt).")


def _globbed(pattern: str) -> list[Path]:
    files = sorted(Path(name) for name in glob.glob(pattern, recursive=True) if Path(name).is_file())
    if not files:
        raise MLMError(f"No files match {pattern}; check the pattern (use ** for any depth, quoted in the shell).")
    return files


def _only_train(files: list[Path], split: str, what: str) -> list[Path]:
    if split != "train":
        raise MLMError(
            f"{what} is a single corpus, which holds only the 'train' split, but split {split!r} was asked "
            "for. Pass a folder with one file per split to use other splits."
        )
    return _checked(files)


def _checked(files: list[Path]) -> list[Path]:
    for file in files:
        if file_format(file) is None:
            raise MLMError(f"{file} is not a corpus file: use .parquet, .jsonl, .json, .csv or .txt files, "
                           "optionally compressed as .gz or .zst.")
    check_one_format(files)
    return files


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _names_split(name: str, split: str) -> bool:
    return file_format(Path(name)) is not None and (name.startswith(split + "-") or _stem(name) == split)


def _split_of(name: str) -> str | None:
    if file_format(Path(name)) is None:
        return None
    return _stem(name).split("-", 1)[0]


def _stem(name: str) -> str:
    return name.split(".", 1)[0]


def load_texts(
    source: str | Path, split: str = "train", *, text_column: str = "text", revision: str | None = None
) -> list[str]:
    """The reviews of one split, as a list of str in file order.

    `source`: a Hub dataset repo id (default layout `plain_text/{split}-*.parquet`), a local folder with the
    same layout, or a single .parquet / .jsonl / .csv / .txt file (see `find_data_files` for what `split`
    means then). `text_column` names the column in parquet, JSON lines and CSV files; a text file has one
    review per line. Raises MLMError for a missing column, an empty split, or an unreadable or non-UTF-8 file.
    """
    files, one_document_per_file = find_corpus(source, split, revision=revision)
    return read_texts(files, text_column=text_column, one_document_per_file=one_document_per_file)


def read_texts(files: list[Path], *, text_column: str = "text", one_document_per_file: bool = False) -> list[str]:
    """The text of every row of `files`, concatenated in order (one review per row or per text line)."""
    texts: list[str] = []
    for batch, _ in iter_texts(files, text_column=text_column, one_document_per_file=one_document_per_file):
        texts += batch
    if not texts:
        raise MLMError(f"No reviews in {', '.join(map(str, files))}: the split is empty.")
    return texts
