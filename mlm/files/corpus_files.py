"""Reading a corpus's texts in bounded pieces, whatever its files: parquet shards, JSON lines, CSV and text files,
plain or compressed (.gz, .zst). Every problem with a file (missing column, nulls, non-text column, bad UTF-8, a
broken record) is one MLMError line naming the file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from mlm.errors import MLMError

FORMATS = (".parquet", ".jsonl", ".json", ".csv", ".txt")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
# Raw bytes read from a line-based file at a time. Larger blocks only make pyarrow's parse more parallel.
BLOCK_BYTES = 8 << 20
PARQUET_BATCH_ROWS = 4096
HEADER_BYTES = 1 << 16  # read at a time to find a CSV file's header line, which names its separator
QUOTE, NEWLINE, CARRIAGE_RETURN = ord('"'), ord("\n"), ord("\r")


def file_format(file: Path) -> tuple[str, str | None] | None:
    """(format suffix, compression codec or None) of a corpus file, e.g. ('.jsonl', 'zstd'); None if not one."""
    suffixes = ["", *(suffix.lower() for suffix in file.suffixes[-2:])]
    compression = COMPRESSIONS.get(suffixes[-1])
    suffix = suffixes[-2] if compression else suffixes[-1]
    return (suffix, compression) if suffix in FORMATS and not (compression and suffix == ".parquet") else None


def iter_texts(files: list[Path], *, text_column: str = "text", one_document_per_file: bool = False,
               block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[list[str], int]]:
    """Yield (texts, bytes_read) batch by batch through `files` (corpus files: mlm/files/data_files.py) in order,
    never holding more than one batch (about `block_bytes` of raw text, or one document when longer) plus pyarrow's
    read-ahead. bytes_read counts the files' bytes on disk (compressed, when they are) consumed so far. A .txt file
    holds one document per line, or is one document with `one_document_per_file`. Batch boundaries depend only on
    the files' bytes, so two reads of the same files yield the same batches."""
    done = 0
    for file in files:
        suffix, compression = file_format(file)
        try:
            if suffix == ".parquet":
                batches = _parquet_batches(file, text_column)
            elif suffix == ".txt" and one_document_per_file:
                batches = _document_file(file, compression)
            else:
                batches = _record_batches(file, suffix, compression, text_column, block_bytes)
            for texts, position in batches:
                yield texts, done + position
        except (OSError, pa.ArrowException, EOFError) as err:
            reason = " ".join(str(err).split()).rstrip(".") or type(err).__name__  # the message adds its own "."
            raise MLMError(f"Cannot read {file}: {reason}. Check that it is a valid {suffix[1:]} file"
                           f"{' compressed with ' + compression if compression else ''}.") from None
        done += file.stat().st_size


def _open(file: Path, compression: str | None):
    """(raw file, stream to read): the raw file's tell() is the progress through the file on disk."""
    raw = open(file, "rb")  # noqa: SIM115 - closed by the caller
    return raw, pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), compression) if compression else raw


def _record_blocks(file: Path, compression: str | None, block_bytes: int,
                   separator: bytes | None) -> Iterator[tuple[bytes, int]]:
    """Yield (bytes of whole records, raw position): blocks cut after a newline that ends a record. In CSV (the
    fields' `separator` given), a line end inside a quoted field does not end a record, and a lone "\\r" does
    (`_record_ends`). A record longer than `block_bytes` makes the block grow until it ends; nothing in pyarrow's
    reader limits its size."""
    raw, stream = _open(file, compression)
    with raw:
        pending = b""
        while block := stream.read(max(block_bytes, len(pending))):  # a long record: read in doubling steps
            data = pending + block
            # Each block starts a record, so its quoted fields can be read from its start.
            cut = int(_record_ends(data, separator)[-1:].sum()) if separator else data.rfind(b"\n") + 1
            if cut:
                yield data[:cut], raw.tell()
            pending = data[cut:]
        if pending:  # the end of the file, where no line end closes the last record
            yield pending, raw.tell()


def _record_ends(data: bytes, separator: bytes) -> np.ndarray:
    """(K,) int64: the offsets just past each line end of `data` outside quoted fields; `data` starts a CSV record.

    A CSV line ends at each "\\n" and each "\\r" not followed by one. pyarrow reads old Mac files, whose lines end in
    "\\r" alone; cutting only at "\\n" made such a file one header line and an empty corpus. A "\\r" that ends
    `data` may be half of a "\\r\\n" that the next block completes, so it is left for that block."""
    array = np.frombuffer(data, np.uint8)
    lone = np.flatnonzero(array[:-1] == CARRIAGE_RETURN)
    newlines = np.union1d(np.flatnonzero(array == NEWLINE), lone[array[lone + 1] != NEWLINE])
    starts, ends, _ = _quoted_fields(data, separator)
    if not len(starts):
        return newlines + 1
    field = np.searchsorted(starts, newlines, side="right") - 1  # the last quoted field opened before each newline
    inside = (field >= 0) & (newlines < ends[np.maximum(field, 0)])
    return newlines[~inside] + 1


def _line_breaks(data: bytes, csv: bool) -> int:
    """The lines that `data` ends: its "\\n", and in CSV also each "\\r" not before a "\\n" (`_record_ends`)."""
    return data.count(b"\n") + (data.count(b"\r") - data.count(b"\r\n") if csv else 0)


def _quoted_fields(data: bytes, separator: bytes) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(starts (Q,), ends (Q,)) int64: the offsets of the opening and just past the closing quote of each quoted
    field of `data` (CSV that starts a record, its fields separated by `separator`), ends len(data) for one still
    open at the end; and the start of the first field not closed where it ends, None if every one is: one closed
    before more text (pyarrow joins the text to it: a stray quote merged records), else one never closed.

    Read as pyarrow reads CSV: a quote opens a field only as its first character (elsewhere, as in 6'2", it is
    text, so counting quotes is not enough), and "" inside a quoted field is one quote. A loop over the quotes
    only: a block has few of them next to its bytes.
    """
    starts, ends, unclosed, opened, escaped = [], [], None, None, False
    for at in np.flatnonzero(np.frombuffer(data, np.uint8) == QUOTE).tolist():
        if escaped:
            escaped = False
        elif opened is None:
            if at == 0 or data[at - 1] in separator + b"\r\n":
                opened = at
        elif data[at + 1 : at + 2] == b'"':
            escaped = True
        else:
            if data[at + 1 : at + 2] not in (b"", separator, b"\r", b"\n") and unclosed is None:
                unclosed = opened
            starts.append(opened)
            ends.append(at + 1)
            opened = None
    if opened is not None:
        starts.append(opened)
        ends.append(len(data))
    return np.array(starts, np.int64), np.array(ends, np.int64), opened if unclosed is None else unclosed


def _record_batches(file: Path, suffix: str, compression: str | None, text_column: str,
                    block_bytes: int) -> Iterator[tuple[list[str], int]]:
    header, csv = b"", suffix == ".csv"
    separator = _csv_separator(file, compression) if csv else None
    line, offset = 1, 0
    for data, position in _record_blocks(file, compression, block_bytes, separator):
        text = _decode(data, file, line, offset, csv=csv)
        # Counted before a CSV's header is taken off the block, so that later lines and bytes keep their numbers.
        line, offset, first_line = line + _line_breaks(data, csv), offset + len(data), line
        if suffix == ".txt":
            # One document per "\n"-ended line ("\r\n" too), not str.splitlines(), which also splits at form
            # feeds and Unicode line separators inside a text. Blank lines would each be a bare [CLS] [SEP].
            texts = [t.removesuffix("\r") for t in text.split("\n") if t.strip()]
        elif csv:
            # pyarrow accepts a quote left open at the end of the file (only the last block can end inside one),
            # and text after a closing quote: either would silently merge the records after a stray quote.
            if (opened := _quoted_fields(data, separator)[2]) is not None:
                opened_line = first_line + _line_breaks(data[:opened], csv=True)
                raise MLMError(f"{file} has a quoted field that is never closed, opened on line {opened_line}. "
                               'Close it, or double a quote inside a quoted field ("").')
            if not header:  # the first record names the columns; every later block is parsed under it
                ends = _record_ends(data, separator)
                end = int(ends[0]) if len(ends) else len(data)
                header, data = data[:end], data[end:]
                if not header.strip():
                    raise MLMError(f"{file} has no header line naming its columns; add one (e.g. {text_column}).")
        elif data.lstrip()[:1] == b"[":  # pyarrow's own message ("changed from object to array") does not say so
            raise MLMError(f"{file} holds a JSON array, not JSON lines: .json and .jsonl files are read as one JSON "
                           f"object per line. Convert it, e.g. with `jq -c '.[]' {file} > "
                           f"{file.name.split('.')[0]}.jsonl`.")
        if suffix != ".txt":  # CSV records under their header, or JSON lines
            texts = _table_texts(header + data, separator, file, text_column, first_line) if data.strip() else []
        if texts:
            yield texts, position


def _csv_separator(file: Path, compression: str | None) -> bytes:
    """The CSV file's field separator: a comma, or the semicolon (or tab) its header line holds instead. A spreadsheet
    in a locale whose decimal mark is a comma saves "CSV" separated by semicolons."""
    raw, stream = _open(file, compression)
    with raw:
        header = b""
        while block := stream.read(HEADER_BYTES):
            header += block
            if re.search(rb"[\r\n]", block):
                break
    # A column name in quotes may hold any of them ("Title, short";text): only the marks between names count.
    names = re.sub(rb'"(?:[^"]|"")*"', b"", re.split(rb"[\r\n]", header, maxsplit=1)[0])
    return next((mark for mark in (b",", b";", b"\t") if mark in names), b",")


def _table_texts(data: bytes, separator: bytes | None, file: Path, text_column: str, first_line: int) -> list[str]:
    """The texts of whole CSV records (the header first, their fields separated by `separator`) or JSON lines
    (`separator` None; `first_line` the file's line number of the first), parsed as one pyarrow block: pyarrow
    refuses a record that straddles two of its blocks."""
    import pyarrow.csv
    import pyarrow.json

    if separator:
        try:
            table = pyarrow.csv.read_csv(
                pa.BufferReader(data),
                read_options=pyarrow.csv.ReadOptions(block_size=len(data) + 1),
                parse_options=pyarrow.csv.ParseOptions(delimiter=separator.decode(), newlines_in_values=True),
                # Read as text whatever it looks like: a column of numbers is still a column of texts here.
                convert_options=pyarrow.csv.ConvertOptions(column_types={text_column: pa.string()}),
            )
        except pa.ArrowInvalid as err:  # most often a text with the separator in it, left unquoted
            if not (found := re.search(r"Expected (\d+) columns, got (\d+): (.*)", str(err))):
                raise
            mark = {b",": "comma", b";": "semicolon", b"\t": "tab"}[separator]
            got, wanted = int(found[2]), int(found[1])
            fix = (f"quote a field that holds a {mark}, as in \"one{separator.decode()} two\"" if got > wanted else
                   f"give every column a value, an empty one too (a {mark} more)")
            raise MLMError(f"{file} has a record of {got} field{'s' * (got != 1)} where its header names {wanted} ("
                           f"{found[3].strip()[:60]!r}): {fix}.") from None
    else:
        # Only the text column is parsed: another one whose type varies from row to row (a number, then a string)
        # made pyarrow refuse a valid file.
        only_text = pyarrow.json.ParseOptions(explicit_schema=pa.schema([(text_column, pa.string())]),
                                              unexpected_field_behavior="ignore")
        try:
            table = pyarrow.json.read_json(pa.BufferReader(data), parse_options=only_text,
                                           read_options=pyarrow.json.ReadOptions(block_size=len(data) + 1))
        except pa.ArrowInvalid:  # pyarrow counts rows from 0 in its block, in its own words: name the line instead
            _refuse_the_first_bad_line(data, file, first_line, text_column)
            raise
        if (nulls := table.column(text_column).null_count) == table.num_rows:  # in no row: name the rows' keys
            rows = [value for *_, value, _ in _json_lines(data) if isinstance(value, dict)]
            _check_column(file, text_column, list(dict.fromkeys(key for row in rows for key in row)))
        elif nulls:  # in some rows only: name the first line without it (or that is not one object)
            _refuse_the_first_bad_line(data, file, first_line, text_column)
            number = next(number for number, _, row, _ in _json_lines(data, first_line) if row.get(text_column) is None)
            raise MLMError(f"{file}, line {number}, has no {text_column!r} (or it is null), which the other lines "
                           "have: drop that line or give it its text.")
        if table.num_rows != sum(1 for line in data.split(b"\n") if line.strip()):  # pyarrow reads {..}{..} as two
            _refuse_the_first_bad_line(data, file, first_line, text_column)
    _check_column(file, text_column, table.column_names)
    return texts_of(table.column(text_column), file, text_column)


def _refuse_the_first_bad_line(data: bytes, file: Path, first_line: int, text_column: str) -> None:
    """MLMError naming the first line of `data` that is not a JSON object, or whose text is not a string."""
    for number, line, value, reason in _json_lines(data, first_line):
        if not isinstance(value, dict):
            raise MLMError(f"{file}, line {number}, is not a JSON object ({reason}: {line[:40]!r}): a JSON-lines file "
                           f"holds one object per line, e.g. {{\"{text_column}\": \"a text\"}}.")
        if not isinstance(text := value.get(text_column), str | None):
            raise MLMError(f"{file}, line {number}: {text_column!r} holds {type(text).__name__} {str(text)[:30]!r}, "
                           "not text: make it a string, or pass --text-column if another key holds the text.")


def _json_lines(data: bytes, first_line: int = 1) -> Iterator[tuple[int, bytes, object, str]]:
    """(line number, line, its JSON value or None, why it is no object) of each non-blank line of `data`."""
    for number, line in enumerate(data.split(b"\n"), first_line):
        if line.strip():
            try:
                yield number, line, json.loads(line), "valid JSON, but not an object"
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                yield number, line, None, str(err)


def _parquet_batches(file: Path, text_column: str) -> Iterator[tuple[list[str], int]]:
    import pyarrow.parquet

    with pyarrow.parquet.ParquetFile(file) as parquet:
        _check_column(file, text_column, parquet.schema_arrow.names)
        total_rows, rows, size = max(parquet.metadata.num_rows, 1), 0, file.stat().st_size
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_column]):
            rows += batch.num_rows
            if texts := texts_of(batch.column(0), file, text_column):
                yield texts, size * rows // total_rows


def _document_file(file: Path, compression: str | None) -> Iterator[tuple[list[str], int]]:
    raw, stream = _open(file, compression)
    with raw:
        data = stream.read()
        position = raw.tell()
    # The file as it is: its lines stay joined by their newlines, which the tokenizer reads as spaces.
    text = _decode(data, file, 1, 0)
    if text.strip():
        yield [text], position


def texts_of(column, file: Path, text_column: str) -> list[str]:
    """The strings of a text column (Array or ChunkedArray), checked: text, no nulls, valid UTF-8."""
    if len(column) == 0:  # an empty shard; its column may even have Arrow's "null" type
        return []
    if pa.types.is_dictionary(column.type):  # e.g. a pandas category column
        column = column.cast(column.type.value_type)
    if pa.types.is_string_view(column.type):
        column = column.cast(pa.large_string())
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


def _check_column(file: Path, text_column: str, names: list[str]) -> None:
    if text_column not in names:
        raise MLMError(f"{file} has no column {text_column!r} (it has: {', '.join(map(repr, names)) or 'none'}); "
                       "pass the right one with --text-column.")
    if (times := names.count(text_column)) > 1:  # pyarrow would take the first, or fail on the name
        raise MLMError(f"{file} has {times} columns named {text_column!r}: rename all but the one that holds the text, "
                       "or pass another column with --text-column.")


def _decode(data: bytes, file: Path, first_line: int, offset: int, *, csv: bool = False) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if offset == 0 and data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # converted as latin1, it would be garbage
            raise MLMError(f"{file} is UTF-16 (it starts with its byte-order mark), not UTF-8. Re-encode it, e.g. "
                           "with `iconv -f utf-16 -t utf-8`.") from None
        line = first_line + _line_breaks(data[:err.start], csv)
        # Most such files come from Windows: cp1252 reads latin-1's letters alike, and its quotes and dashes (bytes
        # 0x80-0x9F), which latin1 turns into control characters that the tokenizer then deletes.
        raise MLMError(f"{file} is not UTF-8: byte {offset + err.start} (line {line}) cannot be decoded "
                       f"({err.reason}). Re-encode it as UTF-8, e.g. with `iconv -f cp1252 -t utf-8`.") from None
