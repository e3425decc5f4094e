"""Finding and reading the texts of a corpus: a Hub dataset repo, a local folder with the Hub layout, or one file.

`find_data_files` locates the files of a split (`plain_text/{split}-*.parquet` in the Hub's IMDb repo) and
`read_texts` reads their text column, checking what a corpus file can get wrong (missing column, nulls, bad
UTF-8) with a one-line error. mlm/data.py turns the texts into chunks.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from mlm.errors import MLMError
from mlm.files.hub import resolve_repo

DEFAULT_DATASET = "stanfordnlp/imdb"
SPLITS = ("train", "test", "unsupervised")
DATA_EXTENSIONS = (".parquet", ".jsonl", ".json", ".csv", ".txt")


def find_data_files(source: str | Path, split: str = "train", *, revision: str | None = None) -> list[Path]:
    """The files that hold `split` of `source`, sorted by name (shard order).

    `source` is a single data file, a local folder, or a Hub dataset repo id. In a folder (or a downloaded
    snapshot), the files of a split are those named `{split}-*.{ext}` or `{split}.{ext}` anywhere below it,
    e.g. the Hub's `plain_text/train-00000-of-00001.parquet`. A single file has one split, "train", as
    `datasets.load_dataset("parquet", data_files=path)` names it; asking it for any other split is an error.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if split != "train":
            raise MLMError(
                f"{path} is a single file, which holds only the 'train' split, but split {split!r} was asked "
                "for. Pass a folder with one file per split to use other splits."
            )
        return [path]
    # Download only this split's files. In huggingface_hub's patterns `*` also matches "/", so "*/train-*"
    # finds plain_text/train-00000-of-00001.parquet at any depth.
    patterns = [f"{prefix}{split}{rest}" for prefix in ("", "*/") for ext in DATA_EXTENSIONS
                for rest in (f"-*{ext}", ext)]
    folder = resolve_repo(source, repo_type="dataset", revision=revision, allow_patterns=patterns)
    files = sorted(
        (file for file in folder.rglob("*") if file.is_file() and _names_split(file.name, split)),
        key=lambda file: str(file.relative_to(folder)),
    )
    if not files:
        found = sorted({name for file in folder.rglob("*") if (name := _split_of(file.name))})
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
    return files


def _names_split(name: str, split: str) -> bool:
    return name.endswith(DATA_EXTENSIONS) and (name.startswith(split + "-") or name.rsplit(".", 1)[0] == split)


def _split_of(name: str) -> str | None:
    if not name.endswith(DATA_EXTENSIONS):
        return None
    return name.rsplit(".", 1)[0].split("-", 1)[0]


def load_texts(
    source: str | Path, split: str = "train", *, text_column: str = "text", revision: str | None = None
) -> list[str]:
    """The reviews of one split, as a list of str in file order.

    `source`: a Hub dataset repo id (default layout `plain_text/{split}-*.parquet`), a local folder with the
    same layout, or a single .parquet / .jsonl / .csv / .txt file (see `find_data_files` for what `split`
    means then). `text_column` names the column in parquet, JSON lines and CSV files; a text file has one
    review per line. Raises MLMError for a missing column, an empty split, or an unreadable or non-UTF-8 file.
    """
    return read_texts(find_data_files(source, split, revision=revision), text_column=text_column)


def read_texts(files: list[Path], *, text_column: str = "text") -> list[str]:
    """The text of every row of `files`, concatenated in order (one review per row or per text line)."""
    texts: list[str] = []
    for file in files:
        texts += _read_file(file, text_column)
    if not texts:
        raise MLMError(f"No reviews in {', '.join(map(str, files))}: the split is empty.")
    return texts


def _read_file(file: Path, text_column: str) -> list[str]:
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    try:
        if file.suffix == ".txt":
            return _read_text_lines(file)
        if file.suffix == ".parquet":
            names = pyarrow.parquet.read_schema(file).names
            if text_column not in names:
                raise _missing_column(file, text_column, names)
            column = pyarrow.parquet.read_table(file, columns=[text_column]).column(text_column)
        elif file.suffix == ".csv":  # a header line, then one review per record (quoted when it holds commas)
            data = file.read_bytes()
            _decode_utf8(data, file)  # names the line of a bad byte, which pyarrow's own check does not
            # Read as text whatever it looks like: a column of numbers is still a column of reviews here.
            options = pyarrow.csv.ConvertOptions(column_types={text_column: pa.string()})
            table = pyarrow.csv.read_csv(pa.BufferReader(data), convert_options=options)
            if text_column not in table.column_names:
                raise _missing_column(file, text_column, table.column_names)
            column = table.column(text_column)
        else:  # .jsonl / .json: JSON lines, one object per review
            data = file.read_bytes()
            _decode_utf8(data, file)  # pyarrow's JSON reader would keep invalid bytes in the strings
            table = pyarrow.json.read_json(pa.BufferReader(data))
            if text_column not in table.column_names:
                raise _missing_column(file, text_column, table.column_names)
            column = table.column(text_column)
    except (OSError, pa.ArrowException) as err:
        raise MLMError(f"Cannot read {file}: {err}. Check that it is a valid {file.suffix[1:]} file.") from None

    if len(column) == 0:  # an empty shard; its column may even have Arrow's "null" type
        return []
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise MLMError(f"Column {text_column!r} of {file} holds {column.type}, not text; pass --text-column.")
    if column.null_count:
        raise MLMError(f"Column {text_column!r} of {file} has {column.null_count} missing (null) values; "
                       "drop those rows or fill them in.")
    try:
        # Parquet and Arrow do not check that string bytes are UTF-8; decoding them later would fail halfway.
        column.validate(full=True)
    except pa.ArrowInvalid as err:
        raise MLMError(f"Column {text_column!r} of {file} is not valid UTF-8 ({err}); re-encode it.") from None
    return column.to_pylist()


def _missing_column(file: Path, text_column: str, names: list[str]) -> MLMError:
    return MLMError(f"{file} has no column {text_column!r} (it has: {', '.join(names) or 'none'}); "
                    "pass the right one with --text-column.")


def _decode_utf8(data: bytes, file: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise MLMError(
            f"{file} is not UTF-8: byte {err.start} (line {line}) cannot be decoded ({err.reason}). "
            "Re-encode it as UTF-8, e.g. with `iconv -f latin1 -t utf-8`."
        ) from None


def _read_text_lines(file: Path) -> list[str]:
    # One review per "\n"-ended line ("\r\n" too). Not str.splitlines(), which also splits at form feeds and
    # Unicode line separators inside a review. Blank lines are skipped: each would be a bare [CLS] [SEP].
    lines = _decode_utf8(file.read_bytes(), file).split("\n")
    return [line.removesuffix("\r") for line in lines if line.strip()]
